//! The streams a runtime client follows on its own socket
//! ([`super::RuntimeClient::follow`]), each with its position and the
//! channel its items go to.
//!
//! Owns the typed `stream.resume` of a followed run (on the run's current
//! session, from where delivery stopped) and the routing of stream pushes
//! to followers. Must not send: the driver does. The channels are
//! unbounded because the driver, which also heartbeats, must never wait
//! on a caller.

use std::collections::HashMap;

use serde_json::Value;
use tokio::sync::mpsc;

use super::runs::Run;
use crate::follow::{StreamItem, StreamState};
use rungate_protocol::commands::{StreamResumeCommand, StreamResumeResponse};

/// A stream this client follows and where its items go.
struct Followed {
    state: StreamState,
    items: mpsc::UnboundedSender<StreamItem>,
}

/// Followed streams, by run.
#[derive(Default)]
pub(super) struct Follows(HashMap<String, Followed>);

impl Follows {
    /// Starts following `run` from `from_offset` (or live).
    pub(super) fn start(
        &mut self,
        run: String,
        from_offset: Option<u64>,
        items: mpsc::UnboundedSender<StreamItem>,
    ) {
        self.0.insert(
            run,
            Followed {
                state: StreamState::new(from_offset),
                items,
            },
        );
    }

    /// The runs followed.
    pub(super) fn runs(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }

    /// The `stream.resume` that continues `run`'s stream, if it is followed.
    pub(super) fn resume_request(&self, run: &Run) -> Option<StreamResumeCommand> {
        let followed = self.0.get(run.spec.run_id.as_str())?;
        Some(
            followed
                .state
                .resume_request(run.spec.run_id.clone(), Some(run.session_id.clone())),
        )
    }

    /// The gateway answered `run`'s resume.
    pub(super) fn resumed(&mut self, run: &str, reply: StreamResumeResponse) {
        if let Some(f) = self.0.get_mut(run) {
            let item = f.state.resumed(reply);
            let _ = f.items.send(item);
        }
    }

    /// Stops following `run`; ending the channel ends the follower.
    pub(super) fn stop(&mut self, run: &str) {
        self.0.remove(run);
    }

    /// A stream push (`stream.events`, `stream.gap`, `stream.closed`,
    /// `stream.ended`): delivers its items; answers the run whose stream
    /// must be resumed again (it was closed).
    pub(super) fn pushed(&mut self, kind: &str, payload: &Value) -> Option<String> {
        let run = payload["runId"].as_str()?;
        let f = self.0.get_mut(run)?;
        let (items, resume) = f.state.pushed(kind, payload);
        for item in items {
            let _ = f.items.send(item);
        }
        if f.state.is_ended() {
            self.0.remove(run);
            return None;
        }
        resume.then(|| run.to_owned())
    }
}

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

use tokio::sync::mpsc;

use super::runs::Run;
use crate::ClientError;
use crate::follow::{StreamItem, StreamState};
use rungate_protocol::commands::{StreamResumeCommand, StreamResumeResponse};
use rungate_protocol::push::{Push, PushError};

/// Where a followed stream's items (or its final error) go.
pub(super) type Items = mpsc::UnboundedSender<Result<StreamItem, ClientError>>;

/// A stream this client follows and where its items go.
struct Followed {
    state: StreamState,
    items: Items,
}

/// Followed streams, by run.
#[derive(Default)]
pub(super) struct Follows(HashMap<String, Followed>);

impl Follows {
    /// Starts following `run` from `from_offset` (or live).
    pub(super) fn start(&mut self, run: String, from_offset: Option<u64>, items: Items) {
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
            let _ = f.items.send(Ok(item));
        }
    }

    /// Stops following `run`; ending the channel ends the follower.
    pub(super) fn stop(&mut self, run: &str) {
        self.0.remove(run);
    }

    /// A stream push (`stream.events`, `stream.gap`, `stream.closed`,
    /// `stream.ended`): delivers its items; answers the run whose stream
    /// must be resumed again (it was closed).
    pub(super) fn pushed(&mut self, push: Push) -> Option<String> {
        let run = push.run_id()?.to_string();
        let f = self.0.get_mut(&run)?;
        let (items, resume) = match f.state.pushed(push) {
            Ok(pushed) => pushed,
            Err(error) => {
                self.malformed(&run, error);
                return None;
            }
        };
        for item in items {
            let _ = f.items.send(Ok(item));
        }
        if f.state.is_ended() {
            self.0.remove(&run);
            return None;
        }
        resume.then_some(run)
    }

    /// A push about `run`'s stream broke the protocol: its follower gets
    /// the error, and ends (what followed it cannot be trusted in order).
    pub(super) fn malformed(&mut self, run: &str, error: PushError) {
        if let Some(f) = self.0.remove(run) {
            let _ = f.items.send(Err(ClientError::BadPush(error)));
        }
    }
}

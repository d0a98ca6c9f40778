//! The resend queue: publishes sent but not yet acknowledged, oldest first.
//!
//! A lost socket keeps them all; the next socket carries them again in
//! their original order, each still the typed `events.publish` it was, on
//! the session its run holds by then (a run attached afresh moves its
//! publishes to the new session). Their events keep their `seq`, so a batch
//! the gateway had already stored is stored once.
//!
//! Owns the order and matching acknowledgements to publishes by request
//! id. Must not send: the driver does.

use std::collections::VecDeque;

use tokio::sync::oneshot;

use crate::ClientError;
use rungate_protocol::commands::PublishOutputEventsRequest;
use rungate_protocol::ids::{RunId, SessionId};

type Reply = oneshot::Sender<Result<(), ClientError>>;

/// One publish waiting for its acknowledgement.
pub(super) struct Publication {
    /// Id of its latest send; `None` until sent on the current socket.
    id: Option<String>,
    request: PublishOutputEventsRequest,
    reply: Option<Reply>,
}

impl Publication {
    /// The run published to.
    pub(super) fn run_id(&self) -> &RunId {
        &self.request.run_id
    }

    /// Answers the caller (who may have given up waiting).
    pub(super) fn answer(mut self, result: Result<(), ClientError>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }
}

/// Unacknowledged publishes, oldest first.
#[derive(Default)]
pub(super) struct Outbox(VecDeque<Publication>);

impl Outbox {
    /// Queues a publish (not sent yet); answers its index.
    pub(super) fn push(&mut self, request: PublishOutputEventsRequest, reply: Reply) -> usize {
        self.0.push_back(Publication {
            id: None,
            request,
            reply: Some(reply),
        });
        self.0.len() - 1
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// Publish `index` is being sent as request `id`: the request to send.
    pub(super) fn sending(&mut self, index: usize, id: String) -> &PublishOutputEventsRequest {
        let publication = &mut self.0[index];
        publication.id = Some(id);
        &publication.request
    }

    /// Takes the publish sent as request `id` out of the queue.
    pub(super) fn answered(&mut self, id: &str) -> Option<Publication> {
        let at = self.0.iter().position(|p| p.id.as_deref() == Some(id))?;
        self.0.remove(at)
    }

    /// The socket is gone: no publish is sent on the next one yet.
    pub(super) fn unsent(&mut self) {
        for p in &mut self.0 {
            p.id = None;
        }
    }

    /// The run was attached afresh: its publishes go out on `session_id`.
    pub(super) fn move_to_session(&mut self, run: &RunId, session_id: &SessionId) {
        for p in self.0.iter_mut().filter(|p| &p.request.run_id == run) {
            p.request.session_id = session_id.clone();
        }
    }

    /// The run's session ended for good: its publishes fail with `error`.
    pub(super) fn fail_run(&mut self, run: &str, error: &ClientError) {
        self.0.retain_mut(|p| {
            if p.request.run_id.as_str() != run {
                return true;
            }
            if let Some(reply) = p.reply.take() {
                let _ = reply.send(Err(error.clone()));
            }
            false
        });
    }

    /// The client is closing: every publish fails with `error`.
    pub(super) fn fail_all(&mut self, error: &ClientError) {
        for p in self.0.drain(..) {
            p.answer(Err(error.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rungate_protocol::commands::OutputEvent;
    use rungate_protocol::envelope;

    fn publish(run: &RunId, session_id: &SessionId, seq: u64) -> PublishOutputEventsRequest {
        PublishOutputEventsRequest {
            session_id: session_id.clone(),
            run_id: run.clone(),
            events: vec![OutputEvent::new("log", Some(seq), None, None).unwrap()],
        }
    }

    /// The resend path: after a lost socket and a renewed session, the
    /// same typed publishes go out again, in order, on the new session.
    #[test]
    fn a_renewed_run_resends_its_typed_publishes_on_the_new_session() {
        let (run, other) = (RunId::new("r").unwrap(), RunId::new("o").unwrap());
        let (old, new) = (SessionId::generate(), SessionId::generate());
        let mut outbox = Outbox::default();
        let mut replies = Vec::new();
        for (r, seq) in [(&run, 1), (&other, 1), (&run, 2)] {
            let (tx, rx) = oneshot::channel();
            replies.push(rx);
            let i = outbox.push(publish(r, &old, seq), tx);
            outbox.sending(i, format!("c{i}"));
        }
        outbox.unsent();
        assert!(
            outbox.answered("c0").is_none(),
            "a lost send is not matched"
        );
        outbox.move_to_session(&run, &new);
        let resent: Vec<serde_json::Value> = (0..outbox.len())
            .map(|i| {
                let id = format!("c{}", 10 + i);
                let frame = envelope::encode_command(&id.clone(), outbox.sending(i, id));
                serde_json::from_str(frame.as_str()).unwrap()
            })
            .collect();
        let seen: Vec<(&str, &str, u64)> = resent
            .iter()
            .map(|f| {
                assert_eq!(f["type"], "events.publish");
                let p = &f["payload"];
                (
                    p["runId"].as_str().unwrap(),
                    p["sessionId"].as_str().unwrap(),
                    p["events"][0]["seq"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("r", new.as_str(), 1),
                ("o", old.as_str(), 1),
                ("r", new.as_str(), 2)
            ]
        );
        let acked = outbox.answered("c11").expect("matched by its new id");
        assert_eq!(acked.run_id(), &other);
        acked.answer(Ok(()));
        outbox.fail_run("r", &ClientError::Closed);
        assert_eq!(outbox.len(), 0);
        let answers: Vec<_> = replies.into_iter().map(|mut rx| rx.try_recv()).collect();
        assert!(matches!(answers[0], Ok(Err(ClientError::Closed))));
        assert!(matches!(answers[1], Ok(Ok(()))));
        assert!(matches!(answers[2], Ok(Err(ClientError::Closed))));
    }
}

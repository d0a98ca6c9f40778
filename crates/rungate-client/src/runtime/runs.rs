//! The runs attached through one [`super::RuntimeClient`], main run first:
//! what was asked at attach (kept to attach again after a reconnect), the
//! session each is bound to now, and the `seq` its next published event
//! gets.
//!
//! Owns the typed `runtime.attach` and `events.publish` requests of a run.
//! Must not send or wait: the driver does.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::client::{Attached, Event};
use crate::ClientError;
use rungate_protocol::commands::{
    PublishOutputEventsRequest, RuntimeAttachRequest, RuntimeAttachResponse,
};
use rungate_protocol::ids::{Capability, OpaqueId, RunId, SessionId};

/// The protocol version this client speaks.
const PROTOCOL_VERSION: &str = "1";

/// What the application asked to attach, typed.
pub(super) struct AttachSpec {
    pub(super) run_id: RunId,
    capabilities: Vec<Capability>,
    attempt_id: Option<OpaqueId>,
}

impl AttachSpec {
    /// Types an attach as the application wrote it, or says what the
    /// protocol does not allow in it (nothing is sent then).
    pub(super) fn parse(
        run: &str,
        capabilities: &[&str],
        attempt_id: Option<&str>,
    ) -> Result<AttachSpec, ClientError> {
        let run_id = RunId::new(run).map_err(|e| ClientError::invalid("runId", run, e))?;
        let capabilities = capabilities
            .iter()
            .map(|c| {
                Capability::parse(c).ok_or_else(|| {
                    ClientError::invalid("capability", c, "not a runtime capability")
                })
            })
            .collect::<Result<_, _>>()?;
        let attempt_id = attempt_id
            .map(|a| OpaqueId::new(a).map_err(|e| ClientError::invalid("attemptId", a, e)))
            .transpose()?;
        Ok(AttachSpec {
            run_id,
            capabilities,
            attempt_id,
        })
    }

    /// The `runtime.attach` for this run at `epoch`; `reconnect` to take an
    /// existing session over.
    pub(super) fn request(
        &self,
        instance: &OpaqueId,
        epoch: u64,
        reconnect: bool,
    ) -> RuntimeAttachRequest {
        RuntimeAttachRequest {
            run_id: self.run_id.clone(),
            attempt_id: self.attempt_id.clone(),
            runtime_instance_id: instance.clone(),
            protocol_version: PROTOCOL_VERSION.to_owned(),
            reconnect,
            connection_epoch: Some(epoch),
            capabilities: self.capabilities.clone(),
        }
    }
}

/// A run attached through this client.
pub(super) struct Run {
    pub(super) spec: AttachSpec,
    /// The session the run is bound to now (a renewal changes it).
    pub(super) session_id: SessionId,
    /// The attach answer, given again to a repeated attach of the run.
    pub(super) attached: Attached,
    /// The `seq` the next published event gets.
    next_seq: u64,
}

/// The attached runs; the first is the main run.
#[derive(Default)]
pub(super) struct Runs(Vec<Run>);

impl Runs {
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn get(&self, run: &str) -> Option<&Run> {
        self.0.iter().find(|r| r.spec.run_id.as_str() == run)
    }

    fn get_mut(&mut self, run: &str) -> Option<&mut Run> {
        self.0.iter_mut().find(|r| r.spec.run_id.as_str() == run)
    }

    /// The main run: the first attached.
    pub(super) fn main(&self) -> Option<&Run> {
        self.0.first()
    }

    /// The sub-runs: every run after the main one.
    pub(super) fn subs(&self) -> Vec<RunId> {
        self.0
            .iter()
            .skip(1)
            .map(|r| r.spec.run_id.clone())
            .collect()
    }

    /// Every run, main first.
    pub(super) fn all(&self) -> impl Iterator<Item = &Run> {
        self.0.iter()
    }

    /// The gateway bound the run of `spec` to the session in `reply`: the
    /// run joins (or, attached again, keeps its place and numbering).
    pub(super) fn attached(&mut self, spec: AttachSpec, reply: &RuntimeAttachResponse) -> Attached {
        let attached = Attached {
            session_id: reply.session_id.to_string(),
            run_id: spec.run_id.to_string(),
            heartbeat_interval: Duration::from_millis(reply.heartbeat_interval_ms),
            config_version: reply.config_version.clone(),
        };
        if let Some(run) = self.get_mut(spec.run_id.as_str()) {
            run.session_id = reply.session_id.clone();
            run.attached = attached.clone();
        } else {
            self.0.push(Run {
                spec,
                session_id: reply.session_id.clone(),
                attached: attached.clone(),
                next_seq: initial_seq(),
            });
        }
        attached
    }

    /// The run was attached afresh under `session_id`.
    pub(super) fn renewed(&mut self, run: &str, session_id: &SessionId) {
        if let Some(r) = self.get_mut(run) {
            r.session_id = session_id.clone();
            r.attached.session_id = session_id.to_string();
        }
    }

    /// Forgets the run; `None` if it was not here.
    pub(super) fn remove(&mut self, run: &str) -> Option<Run> {
        let i = self.0.iter().position(|r| r.spec.run_id.as_str() == run)?;
        Some(self.0.remove(i))
    }

    /// The `events.publish` of `events` on the run's session, each event
    /// numbered with the run's next `seq`.
    pub(super) fn publication(
        &mut self,
        run: &str,
        events: &[Event],
    ) -> Result<PublishOutputEventsRequest, ClientError> {
        let Some(r) = self.get_mut(run) else {
            return Err(ClientError::NoSession(run.to_owned()));
        };
        let mut numbered = Vec::with_capacity(events.len());
        for event in events {
            numbered.push(event.to_output_event(r.next_seq)?);
            r.next_seq += 1;
        }
        Ok(PublishOutputEventsRequest {
            session_id: r.session_id.clone(),
            run_id: r.spec.run_id.clone(),
            events: numbered,
        })
    }
}

/// A starting `seq` above any this runtime used for the run before: the
/// wall clock in microseconds. A restarted runtime continues above its
/// predecessor as long as it published, on average, fewer than a million
/// events per second since then.
fn initial_seq() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attach_the_protocol_does_not_allow_is_refused_before_it_is_sent() {
        for (run, caps, attempt) in [
            ("bad/run", &["kv.read"][..], None),
            ("r", &["kv.read", "fly"][..], None),
            // A viewer's capability, not a runtime's.
            ("r", &["run.cancel"][..], None),
            ("r", &[][..], Some("has space")),
        ] {
            let e = AttachSpec::parse(run, caps, attempt)
                .err()
                .expect("refused");
            assert!(matches!(e, ClientError::InvalidRequest(_)), "{e}");
            assert!(!e.is_retryable());
        }
        let spec = AttachSpec::parse("r", &["kv.read", "subtasks.run"], Some("a1")).unwrap();
        let request = spec.request(&OpaqueId::new("inst").unwrap(), 9, false);
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            serde_json::json!({"runId": "r", "attemptId": "a1", "runtimeInstanceId": "inst",
                "protocolVersion": "1", "connectionEpoch": 9,
                "capabilities": ["kv.read", "subtasks.run"]})
        );
    }

    #[test]
    fn each_run_numbers_its_events_on_from_where_it_stopped() {
        let mut runs = Runs::default();
        let reply = |run: &str| RuntimeAttachResponse {
            session_id: SessionId::generate(),
            run_id: RunId::new(run).unwrap(),
            heartbeat_interval_ms: 5_000,
            lease_expires_at: rungate_protocol::time::Timestamp::now(),
            config_version: None,
        };
        let main = reply("m");
        let attached = runs.attached(AttachSpec::parse("m", &[], None).unwrap(), &main);
        assert_eq!(attached.session_id, main.session_id.as_str());
        assert_eq!(attached.heartbeat_interval, Duration::from_millis(5_000));
        runs.attached(AttachSpec::parse("s", &[], None).unwrap(), &reply("s"));
        assert_eq!(runs.subs(), [RunId::new("s").unwrap()]);

        let seqs = |p: &PublishOutputEventsRequest| -> Vec<u64> {
            p.events.iter().map(|e| e.seq.unwrap()).collect()
        };
        let events = [Event::new("a"), Event::new("b")];
        let first = runs.publication("m", &events).unwrap();
        let second = runs.publication("m", &events[..1]).unwrap();
        let (a, b) = (seqs(&first), seqs(&second));
        assert_eq!((a[1], b[0]), (a[0] + 1, a[0] + 2));
        assert_eq!(first.session_id, main.session_id);

        // Attached again: the same run keeps its place and its numbering.
        let again = reply("m");
        runs.attached(AttachSpec::parse("m", &[], None).unwrap(), &again);
        assert_eq!(runs.main().unwrap().session_id, again.session_id);
        assert_eq!(
            seqs(&runs.publication("m", &events[..1]).unwrap())[0],
            a[0] + 3
        );
        assert!(matches!(
            runs.publication("nope", &events),
            Err(ClientError::NoSession(_))
        ));
    }
}

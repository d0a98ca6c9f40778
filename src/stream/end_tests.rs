//! A run's end in the stream engines: after the last event, once per
//! subscription, no appends afterwards, idempotent by outcome, and (in the
//! durable log) back after a restart and after a compaction.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::Instant;

use super::backend::{Backend, Stored};
use super::hub::{Inbox, Visible};
use super::log::{self, StreamLog, SyncPolicy};
use super::ring::Ring;
use super::{
    Delivery, EndRequest, EventDelivery, PublishOutcome, PublishedEvent, Publisher, RunEnd,
    StreamError, StreamFuture, StreamHub, StreamLimits, Subscription,
};
use crate::ids::{RunId, RunOutcome};
use crate::time::Timestamp;

fn run(name: &str) -> RunId {
    RunId::new(name).unwrap()
}

fn end(outcome: RunOutcome, message: Option<&str>) -> EndRequest {
    EndRequest {
        outcome,
        message: message.map(str::to_owned),
        ended_at: Timestamp::from_unix_millis(1_764_064_800_123),
    }
}

fn texts(n: u64) -> Vec<String> {
    (0..n)
        .map(|i| format!(r#"{{"type":"t","seq":{i}}}"#))
        .collect()
}

fn events(texts: &[String]) -> Vec<PublishedEvent<'_>> {
    texts
        .iter()
        .map(|json| PublishedEvent { json, seq: None })
        .collect()
}

/// The answer of the memory hub, which answers at once.
fn at_once<T>(answer: StreamFuture<T>) -> T {
    answer
        .now_or_never()
        .expect("the memory hub answers at once")
}

/// Offsets delivered, then the end, reading `sub` until it has nothing now.
fn drain(sub: &mut Subscription) -> (Vec<u64>, Option<Arc<RunEnd>>) {
    let mut offsets = Vec::new();
    loop {
        match sub.next().now_or_never() {
            Some(Delivery::Frames(frames)) => {
                for f in frames {
                    let v: serde_json::Value = serde_json::from_slice(&f).unwrap();
                    for e in v["payload"]["events"].as_array().unwrap() {
                        offsets.push(e["offset"].as_u64().unwrap());
                    }
                }
            }
            Some(Delivery::Ended(e)) => return (offsets, Some(e)),
            Some(other) => panic!("unexpected {other:?}"),
            None => return (offsets, None),
        }
    }
}

#[test]
fn the_end_comes_after_the_last_event_and_nothing_is_appended_after_it() {
    let hub = StreamHub::new(StreamLimits::default());
    let r = run("r");
    let now = Instant::now();
    let t = texts(3);
    at_once(hub.publish(&r, &events(&t), now)).unwrap();
    let (_, mut live) = hub.resume(&r, Some(1), None, now);
    assert!(hub.ended(&r).is_none());
    let e = at_once(hub.finish(&r, end(RunOutcome::Completed, Some("done \"ok\"")), now)).unwrap();
    // This call made the end.
    assert!(Arc::ptr_eq(&hub.ended(&r).unwrap(), &e));
    assert_eq!(e.next_offset, 3);
    let (offsets, ended) = drain(&mut live);
    assert_eq!(offsets, [1, 2]);
    let ended = ended.expect("the end follows the last event");
    let frame: serde_json::Value = serde_json::from_slice(&ended.frame).unwrap();
    assert_eq!(frame["type"], "stream.ended");
    assert_eq!(frame["payload"]["nextOffset"], 3);
    assert_eq!(frame["payload"]["outcome"], "completed");
    assert_eq!(frame["payload"]["message"], "done \"ok\"");
    assert_eq!(frame["payload"]["endedAt"], "2025-11-25T10:00:00.123Z");
    // One frame per stream, shared by every follower.
    let (info, mut late) = hub.resume(&r, Some(0), None, now);
    assert!(info.ended);
    let (offsets, again) = drain(&mut late);
    assert_eq!(offsets, [0, 1, 2]);
    assert!(Arc::ptr_eq(&again.unwrap(), &ended));

    let more = texts(1);
    assert_eq!(
        at_once(hub.publish(&r, &events(&more), now)),
        Err::<PublishOutcome, _>(StreamError::Ended {
            outcome: RunOutcome::Completed
        })
    );
    assert_eq!(hub.summary(&r).unwrap().next_offset, 3);
    // Idempotent by outcome; another outcome is refused and changes nothing.
    let same = at_once(hub.finish(&r, end(RunOutcome::Completed, None), now)).unwrap();
    // Not made anew: the first end is the answer, and stays the end.
    assert!(Arc::ptr_eq(&same, &ended));
    assert!(Arc::ptr_eq(&hub.ended(&r).unwrap(), &ended));
    assert_eq!(
        at_once(hub.finish(&r, end(RunOutcome::Failed, None), now)).err(),
        Some(StreamError::EndConflict {
            outcome: RunOutcome::Completed
        })
    );
    assert_eq!(hub.ended(&r).unwrap().outcome, RunOutcome::Completed);
}

#[tokio::test]
async fn a_waiting_follower_is_woken_by_the_end_of_a_run_with_no_events() {
    let hub = Arc::new(StreamHub::new(StreamLimits::default()));
    let r = run("empty");
    let (info, mut sub) = hub.resume(&r, None, None, Instant::now());
    assert!(!info.ended);
    let waiting = tokio::spawn(async move { sub.next().await });
    tokio::task::yield_now().await;
    at_once(hub.finish(&r, end(RunOutcome::Failed, None), Instant::now())).unwrap();
    match tokio::time::timeout(Duration::from_secs(10), waiting).await {
        Ok(Ok(Delivery::Ended(e))) => {
            assert_eq!(e.next_offset, 0);
            assert_eq!(e.outcome, RunOutcome::Failed);
        }
        other => panic!("expected the end, got {other:?}"),
    }
}

fn log_limits() -> StreamLimits {
    StreamLimits {
        max_events_per_run: 1000,
        max_bytes_per_run: 1 << 20,
        global_max_bytes: 64 << 20,
        retention: Duration::from_secs(3600),
        max_events_per_delivery: 10_000,
    }
}

#[tokio::test]
async fn the_durable_end_survives_a_restart_and_a_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("durable");
    let epoch;
    {
        let log = log::open(dir.path(), log_limits(), SyncPolicy::Always).unwrap();
        let t = texts(2);
        log.publish(&r, &events(&t), Instant::now()).await.unwrap();
        let e = log
            .finish(&r, end(RunOutcome::Cancelled, Some("stop")), Instant::now())
            .await
            .unwrap();
        assert_eq!(e.next_offset, 2);
        epoch = log.summary(&r).unwrap().stream_epoch;
        log.close().await;
    }
    for round in 0..2 {
        let (log, disk) = StreamLog::open(dir.path(), log_limits(), SyncPolicy::Always).unwrap();
        let summary = log.summary(&r).unwrap();
        assert_eq!(summary.stream_epoch, epoch, "round {round}");
        let e = summary.end.expect("the end came back");
        assert_eq!(
            (e.outcome, e.message.as_deref(), e.next_offset),
            (RunOutcome::Cancelled, Some("stop"), 2)
        );
        let (info, mut sub) = log.resume(&r, Some(0), None, Instant::now());
        assert!(info.ended);
        let mut offsets = Vec::new();
        loop {
            match sub.next_events().now_or_never() {
                Some(EventDelivery::Events(ev)) => offsets.extend(ev.iter().map(|e| e.offset)),
                Some(EventDelivery::Ended(_)) => break,
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
        assert_eq!(offsets, [0, 1]);
        let t = texts(1);
        assert!(matches!(
            log.publish(&r, &events(&t), Instant::now()).await,
            Err(StreamError::Ended { .. })
        ));
        // The second round reads what the compaction wrote.
        disk.compact_now().await;
        log.close().await;
    }
}

/// A backend that takes an end as the log does (set, not yet visible) and
/// reports the write failed, as the log's writer does when the disk does.
struct EndNotWritten;

impl Backend for EndNotWritten {
    fn publish(
        &self,
        ring: &mut Ring,
        events: &[PublishedEvent<'_>],
        _: Option<Publisher<'_>>,
    ) -> Result<Stored<PublishOutcome>, StreamError> {
        Ok(Stored::Now(ring.append(events)?.outcome()))
    }

    fn end(&self, ring: &mut Ring, end: EndRequest) -> Result<Stored<Arc<RunEnd>>, StreamError> {
        ring.finish(end, false);
        Ok(Stored::Later(StreamFuture::ready(Err(
            StreamError::Unavailable("the disk is full".into()),
        ))))
    }
}

/// Asked again while its end is not durable, a run has not ended: the
/// answer is the end only once it is visible (before, a second finish
/// answered the end after a flush even when its write had failed).
#[tokio::test]
async fn a_finish_asked_again_answers_the_end_only_once_it_is_durable() {
    let hub = Arc::new(StreamHub::with_backend(
        StreamLimits::default(),
        Box::new(EndNotWritten),
    ));
    let r = run("unwritten");
    let now = Instant::now();
    let (_, mut sub) = hub.resume(&r, Some(0), None, now);
    let first = hub.finish(&r, end(RunOutcome::Completed, None), now).await;
    assert!(
        matches!(first, Err(StreamError::Unavailable(_))),
        "{first:?}"
    );
    let again = hub.finish(&r, end(RunOutcome::Completed, None), now).await;
    assert!(
        matches!(again, Err(StreamError::Unavailable(_))),
        "{again:?}"
    );
    assert!(sub.next().now_or_never().is_none(), "no end to follow yet");
    // Once the backend shows it (the write went through after all), it is
    // the answer, and followers get it.
    let epoch = hub.summary(&r).unwrap().stream_epoch;
    Inbox::of(&hub).show(&r, &epoch, Visible::CommittedEnd, now);
    let ended = hub.finish(&r, end(RunOutcome::Completed, None), now).await;
    assert_eq!(ended.unwrap().outcome, RunOutcome::Completed);
    assert!(matches!(
        sub.next().now_or_never(),
        Some(Delivery::Ended(_))
    ));
}

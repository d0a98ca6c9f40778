use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;

use super::*;
use crate::stream::tests::decode;
use crate::stream::{Delivery, EventDelivery, StreamEpoch};

fn run(name: &str) -> RunId {
    RunId::new(name).unwrap()
}

fn ev(i: u64) -> String {
    format!(r#"{{"type":"t","data":{i}}}"#)
}

/// A publish to the memory hub, which answers at once.
fn publish_events<'a>(
    hub: &StreamHub,
    r: &RunId,
    events: impl IntoIterator<Item = PublishedEvent<'a>>,
    now: Instant,
) -> Result<PublishOutcome, StreamError> {
    let events: Vec<PublishedEvent<'a>> = events.into_iter().collect();
    hub.publish(r, &events, now)
        .now_or_never()
        .expect("the memory hub answers at once")
}

fn publish(
    hub: &StreamHub,
    r: &RunId,
    range: std::ops::Range<u64>,
    now: Instant,
) -> PublishOutcome {
    let texts: Vec<String> = range.map(ev).collect();
    publish_events(
        hub,
        r,
        texts.iter().map(|t| PublishedEvent { json: t, seq: None }),
        now,
    )
    .unwrap()
}

fn frames(d: Delivery) -> Vec<Bytes> {
    match d {
        Delivery::Frames(f) => f,
        other => panic!("expected frames, got {other:?}"),
    }
}

fn offsets(frames: &[Bytes]) -> Vec<u64> {
    frames
        .iter()
        .flat_map(|f| decode(f))
        .map(|(o, _)| o)
        .collect()
}

fn small(max_events: usize) -> StreamLimits {
    StreamLimits {
        max_events_per_run: max_events,
        ..StreamLimits::default()
    }
}

#[test]
fn hub_and_subscriptions_are_shareable() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<StreamHub>();
    send_sync::<Arc<StreamHub>>();
    let hub = StreamHub::new(StreamLimits::default());
    let (_, mut sub) = hub.resume(&run("r"), None, None, Instant::now());
    send(&sub.next());
    send(&sub.next_events());
    send(&hub.publish(&run("r"), &[], Instant::now()));
}

#[test]
fn resume_at_head_then_receive_next_publish() {
    let hub = StreamHub::new(StreamLimits::default());
    let r = run("r");
    let now = Instant::now();
    publish(&hub, &r, 0..3, now);
    let (info, mut sub) = hub.resume(&r, Some(3), None, now);
    assert_eq!((info.start_offset, info.truncated), (3, false));
    assert!(sub.next().now_or_never().is_none());
    publish(&hub, &r, 3..5, now);
    assert_eq!(
        offsets(&frames(sub.next().now_or_never().unwrap())),
        vec![3, 4]
    );
    assert!(sub.next().now_or_never().is_none());
    assert_eq!(sub.cursor(), 5);
}

#[tokio::test]
async fn resume_before_the_run_exists_then_first_events_arrive() {
    let hub = Arc::new(StreamHub::new(StreamLimits::default()));
    let r = run("not-yet");
    assert!(hub.summary(&r).is_none());
    let (info, mut sub) = hub.resume(&r, None, None, Instant::now());
    assert_eq!(
        (info.first_offset, info.next_offset, info.start_offset),
        (0, 0, 0)
    );
    assert!(!info.truncated);
    // The stream now exists with that epoch, so a publish lands in it.
    assert_eq!(hub.summary(&r).unwrap().stream_epoch, info.stream_epoch);
    let waiter = tokio::spawn(async move { sub.next().await });
    tokio::task::yield_now().await;
    let texts = [r#"{"type":"first"}"#];
    publish_events(
        &hub,
        &r,
        texts.iter().map(|t| PublishedEvent {
            json: t,
            seq: Some(1),
        }),
        Instant::now(),
    )
    .unwrap();
    let got = frames(waiter.await.unwrap());
    assert_eq!(decode(&got[0]), vec![(0, texts[0].to_owned())]);
}

#[tokio::test]
async fn a_waiting_subscriber_is_woken_by_every_publish() {
    let hub = Arc::new(StreamHub::new(StreamLimits::default()));
    let r = run("r");
    let (_, mut sub) = hub.resume(&r, Some(0), None, Instant::now());
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < 200 {
            seen.extend(offsets(&frames(sub.next().await)));
        }
        seen
    });
    for i in 0..100 {
        publish(&hub, &r, i * 2..i * 2 + 2, Instant::now());
        if i % 7 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(reader.await.unwrap(), (0..200).collect::<Vec<_>>());
}

#[test]
fn all_subscribers_at_a_boundary_share_one_frame() {
    let hub = StreamHub::new(StreamLimits::default());
    let r = run("r");
    let now = Instant::now();
    let mut subs: Vec<Subscription> = (0..10).map(|_| hub.resume(&r, None, None, now).1).collect();
    publish(&hub, &r, 0..100, now);
    let got: Vec<Bytes> = subs
        .iter_mut()
        .map(|s| frames(s.next().now_or_never().unwrap()).remove(0))
        .collect();
    for f in &got {
        assert_eq!(f.as_ptr(), got[0].as_ptr());
        assert_eq!(f.len(), got[0].len());
    }
    // A resume from 0 later still gets the very same bytes.
    let (_, mut late) = hub.resume(&r, Some(0), None, now);
    assert_eq!(
        frames(late.next().now_or_never().unwrap())[0].as_ptr(),
        got[0].as_ptr()
    );
    // Mid-batch: a fresh frame, same events.
    let (_, mut mid) = hub.resume(&r, Some(40), None, now);
    let f = frames(mid.next().now_or_never().unwrap());
    assert_ne!(f[0].as_ptr(), got[0].as_ptr());
    assert_eq!(offsets(&f), (40..100).collect::<Vec<_>>());
}

#[test]
fn resume_rules() {
    let hub = StreamHub::new(small(5));
    let r = run("r");
    let now = Instant::now();
    publish(&hub, &r, 0..4, now);
    publish(&hub, &r, 4..8, now); // keeps 3..8
    let s = hub.summary(&r).unwrap();
    assert_eq!((s.first_offset, s.next_offset), (3, 8));
    let epoch = s.stream_epoch.to_string();
    let wrong = "f".repeat(32);
    let case = |from, e: Option<&str>| {
        let (i, sub) = hub.resume(&r, from, e, now);
        assert_eq!(sub.cursor(), i.start_offset);
        assert_eq!((i.first_offset, i.next_offset), (3, 8));
        (i.start_offset, i.truncated)
    };
    assert_eq!(case(None, None), (8, false));
    assert_eq!(case(None, Some(&epoch)), (8, false));
    assert_eq!(case(None, Some(&wrong)), (8, true));
    assert_eq!(case(Some(5), Some(&wrong)), (3, true));
    assert_eq!(case(Some(0), Some(&epoch)), (3, true));
    assert_eq!(case(Some(2), None), (3, true));
    assert_eq!(case(Some(3), None), (3, false));
    assert_eq!(case(Some(6), Some(&epoch)), (6, false));
    assert_eq!(case(Some(8), Some(&epoch)), (8, false));
    // Beyond the head in the same epoch: waits there (a copy that lags
    // another gateway's).
    assert_eq!(case(Some(50), Some(&epoch)), (50, false));
    assert_eq!(case(Some(50), None), (3, true));
}

#[test]
fn too_large_batches_are_refused_whole() {
    let hub = StreamHub::new(small(5));
    let r = run("r");
    let texts: Vec<String> = (0..6).map(ev).collect();
    let err = publish_events(
        &hub,
        &r,
        texts.iter().map(|t| PublishedEvent { json: t, seq: None }),
        Instant::now(),
    )
    .unwrap_err();
    assert!(matches!(
        err,
        StreamError::TooLarge {
            events: 6,
            max_events: 5,
            ..
        }
    ));
    assert_eq!(hub.summary(&r).unwrap().next_offset, 0);
    assert_eq!(hub.total_bytes(), 0);
}

#[test]
fn slow_subscriber_gets_exact_gap_then_continues() {
    let hub = StreamHub::new(small(4));
    let r = run("r");
    let now = Instant::now();
    let (_, mut slow) = hub.resume(&r, Some(0), None, now);
    for i in 0..5 {
        publish(&hub, &r, i * 2..i * 2 + 2, now);
    }
    match slow.next().now_or_never().unwrap() {
        Delivery::Gap { frame, from, to } => {
            assert_eq!((from, to), (0, 5));
            let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
            assert_eq!(v["type"], "stream.gap");
            assert_eq!(v["payload"]["runId"], "r");
            assert_eq!(v["payload"]["fromOffset"], 0);
            assert_eq!(v["payload"]["toOffset"], 5);
        }
        other => panic!("expected a gap, got {other:?}"),
    }
    assert_eq!(
        offsets(&frames(slow.next().now_or_never().unwrap())),
        vec![6, 7, 8, 9]
    );
    // SSE readers see the same gap.
    let (_, mut sse) = hub.resume(&r, Some(6), None, now);
    publish(&hub, &r, 10..13, now);
    assert_eq!(
        sse.next_events().now_or_never().unwrap(),
        EventDelivery::Gap { from: 6, to: 8 }
    );
    let EventDelivery::Events(events) = sse.next_events().now_or_never().unwrap() else {
        panic!("expected events")
    };
    assert_eq!(
        events.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![9, 10, 11, 12]
    );
    assert_eq!(&events[1].json[..], ev(10).as_bytes());
}

#[test]
fn retention_drops_idle_streams_and_closes_subscribers() {
    let limits = StreamLimits {
        retention: Duration::from_secs(60),
        ..StreamLimits::default()
    };
    let hub = StreamHub::new(limits);
    let r = run("r");
    let t0 = Instant::now();
    hub.session_started(&r, t0);
    publish(&hub, &r, 0..3, t0);
    let old_epoch = hub.summary(&r).unwrap().stream_epoch;
    let (_, mut sub) = hub.resume(&r, None, None, t0);
    // Active sessions are never expired.
    assert_eq!(hub.sweep(t0 + Duration::from_secs(3600)).expired_streams, 0);
    hub.session_ended(&r, t0 + Duration::from_secs(10));
    assert_eq!(hub.sweep(t0 + Duration::from_secs(69)).expired_streams, 0);
    assert!(sub.next().now_or_never().is_none());
    assert_eq!(hub.sweep(t0 + Duration::from_secs(70)).expired_streams, 1);
    assert!(hub.summary(&r).is_none());
    assert_eq!(hub.total_bytes(), 0);
    assert_eq!(sub.next().now_or_never(), Some(Delivery::Closed));
    assert_eq!(
        sub.next_events().now_or_never(),
        Some(EventDelivery::Closed)
    );
    // The run's next stream is a new history.
    let (info, _) = hub.resume(&r, Some(3), Some(old_epoch.as_str()), t0);
    assert_ne!(info.stream_epoch, old_epoch);
    assert_eq!(
        (info.start_offset, info.next_offset, info.truncated),
        (0, 0, true)
    );
}

#[tokio::test]
async fn a_waiting_subscriber_is_woken_with_closed() {
    let limits = StreamLimits {
        retention: Duration::ZERO,
        ..StreamLimits::default()
    };
    let hub = StreamHub::new(limits);
    let r = run("r");
    let now = Instant::now();
    publish(&hub, &r, 0..1, now);
    let (_, mut sub) = hub.resume(&r, None, None, now);
    let waiter = tokio::spawn(async move { sub.next().await });
    tokio::task::yield_now().await;
    hub.session_ended(&r, now);
    assert_eq!(hub.sweep(now).expired_streams, 1);
    assert_eq!(waiter.await.unwrap(), Delivery::Closed);
}

#[test]
fn an_empty_watched_stream_outlives_retention() {
    let limits = StreamLimits {
        retention: Duration::from_secs(1),
        ..StreamLimits::default()
    };
    let hub = StreamHub::new(limits);
    let r = run("later");
    let now = Instant::now();
    let (info, sub) = hub.resume(&r, None, None, now);
    let later = now + Duration::from_secs(5);
    assert_eq!(hub.sweep(later).expired_streams, 0);
    assert_eq!(hub.summary(&r).unwrap().stream_epoch, info.stream_epoch);
    drop(sub);
    assert_eq!(hub.sweep(later).expired_streams, 1);
}

#[test]
fn global_budget_drops_idle_streams_first_then_trims_active() {
    // Measure one 10-event frame (run ids all 6 characters long, so
    // every stream's frame has this size), then allow three and a half.
    let probe = StreamHub::new(StreamLimits::default());
    publish(&probe, &run("same-6"), 0..10, Instant::now());
    let one = probe.total_bytes();
    let limits = StreamLimits {
        global_max_bytes: one * 3 + one / 2,
        ..StreamLimits::default()
    };
    let hub = StreamHub::new(limits);
    let t0 = Instant::now();
    let at = |s| t0 + Duration::from_secs(s);
    let (idle_old, idle_new, active_old, active_new) =
        (run("idle-1"), run("idle-2"), run("actv-1"), run("actv-2"));
    publish(&hub, &active_old, 0..10, at(1));
    publish(&hub, &idle_old, 0..10, at(2));
    publish(&hub, &idle_new, 0..10, at(3));
    hub.session_ended(&idle_old, at(4));
    hub.session_ended(&idle_new, at(4));
    let (_, mut watcher) = hub.resume(&idle_old, Some(0), None, at(4));
    assert_eq!(hub.total_bytes(), one * 3);
    // Over budget: the least recently published idle stream goes.
    publish(&hub, &active_new, 0..10, at(5));
    assert!(hub.summary(&idle_old).is_none());
    assert!(hub.summary(&idle_new).is_some());
    assert_eq!(hub.total_bytes(), one * 3);
    assert_eq!(watcher.next().now_or_never(), Some(Delivery::Closed));
    // Again: the other idle one, before any active stream is touched.
    publish(&hub, &active_new, 10..20, at(6));
    assert!(hub.summary(&idle_new).is_none());
    assert_eq!(hub.summary(&active_old).unwrap().first_offset, 0);
    // No idle streams left: the publisher pays with its own oldest
    // events; the other active stream keeps all of its history.
    publish(&hub, &active_new, 20..30, at(7));
    assert_eq!(hub.summary(&active_old).unwrap().first_offset, 0);
    assert!(
        hub.summary(&active_new).unwrap().first_offset > 0,
        "the publisher's own oldest events trimmed"
    );
    assert!(hub.total_bytes() <= hub.limits().global_max_bytes);
    // A third active run with no history to give: refused, nothing
    // stored, nobody else trimmed.
    let third = run("actv-3");
    hub.session_started(&third, at(8));
    let texts: Vec<String> = (0..10).map(ev).collect();
    let refused = publish_events(
        &hub,
        &third,
        texts.iter().map(|t| PublishedEvent { json: t, seq: None }),
        at(8),
    );
    assert!(
        matches!(refused, Err(StreamError::BudgetFull { .. })),
        "{refused:?}"
    );
    assert!(hub.summary(&third).is_none_or(|s| s.next_offset == 0));
    assert_eq!(hub.summary(&active_old).unwrap().first_offset, 0);
    assert!(hub.total_bytes() <= hub.limits().global_max_bytes);
    let listed: Vec<String> = hub.runs().iter().map(|s| s.run_id.to_string()).collect();
    assert_eq!(listed, vec!["actv-1", "actv-2", "actv-3"]);
}

#[test]
fn a_publish_after_a_drop_starts_a_new_history() {
    let limits = StreamLimits {
        retention: Duration::ZERO,
        ..StreamLimits::default()
    };
    let hub = StreamHub::new(limits);
    let r = run("r");
    let now = Instant::now();
    let seq = [(r#"{"a":1}"#, Some(1))];
    publish_events(
        &hub,
        &r,
        seq.iter()
            .map(|(json, seq)| PublishedEvent { json, seq: *seq }),
        now,
    )
    .unwrap();
    let old = hub.summary(&r).unwrap();
    hub.session_ended(&r, now);
    hub.sweep(now);
    let out = publish_events(
        &hub,
        &r,
        seq.iter()
            .map(|(json, seq)| PublishedEvent { json, seq: *seq }),
        now,
    )
    .unwrap();
    // History (and with it dedupe state) is gone; the epoch says so.
    assert_eq!((out.first_offset, out.accepted), (0, 1));
    assert_ne!(hub.summary(&r).unwrap().stream_epoch, old.stream_epoch);
}

/// A started run's stream as a replica fills it: the hub, its inbox, the
/// run, the time, the stream's epoch and the texts of events `0..n`.
fn replica(
    n: u64,
) -> (
    Arc<StreamHub>,
    Inbox,
    RunId,
    Instant,
    StreamEpoch,
    Vec<String>,
) {
    let hub = Arc::new(StreamHub::new(StreamLimits::default()));
    let inbox = Inbox::of(&hub);
    let r = run("r");
    let now = Instant::now();
    hub.session_started(&r, now);
    let epoch = hub.summary(&r).unwrap().stream_epoch;
    (hub, inbox, r, now, epoch, (0..n).map(ev).collect())
}

/// Events `first..to` of `texts` as one replicated batch.
fn replica_batch(texts: &[String], first: u64, to: u64) -> ReplicaBatch<'_> {
    ReplicaBatch {
        first_offset: first,
        events: texts[first as usize..to as usize]
            .iter()
            .map(String::as_str)
            .collect(),
    }
}

#[test]
fn replicate_skips_what_it_holds_and_stops_at_a_hole() {
    let (hub, inbox, r, now, epoch, texts) = replica(6);
    let (_, mut sub) = hub.resume(&r, Some(0), None, now);
    let batch = |first, to| replica_batch(&texts, first, to);
    let replicate = |epoch: &StreamEpoch, batches: &[ReplicaBatch<'_>], last_seq, authoritative| {
        let stored = Visible::Stored {
            batches,
            last_seq,
            authoritative,
        };
        inbox.show(&r, epoch, stored, now)
    };
    let other = StreamEpoch::generate();
    assert_eq!(
        replicate(&other, &[batch(0, 2)], None, false),
        Shown::Absent
    );
    assert_eq!(
        replicate(&epoch, &[batch(0, 2)], Some(2), false),
        Shown::Applied
    );
    // Again (the broadcast after the publisher's own result), and one
    // that overlaps: only the new part is appended.
    assert_eq!(
        replicate(&epoch, &[batch(0, 2), batch(1, 3)], None, false),
        Shown::Applied
    );
    assert_eq!(
        replicate(&epoch, &[batch(4, 6)], None, false),
        Shown::Hole { head: 3 }
    );
    assert_eq!(
        offsets(&frames(sub.next().now_or_never().unwrap())),
        vec![0, 1, 2]
    );
    // From the authority's kept range: 3 was evicted there.
    assert_eq!(
        replicate(&epoch, &[batch(4, 6)], Some(6), true),
        Shown::Applied
    );
    assert!(matches!(
        sub.next().now_or_never(),
        Some(Delivery::Gap { from: 3, to: 3, .. })
    ));
    assert_eq!(
        offsets(&frames(sub.next().now_or_never().unwrap())),
        vec![4, 5]
    );
    let s = hub.summary(&r).unwrap();
    assert_eq!((s.first_offset, s.next_offset), (4, 6));
}

#[test]
fn replace_closes_the_old_history_and_keeps_the_byte_count() {
    let hub = Arc::new(StreamHub::new(StreamLimits::default()));
    let inbox = Inbox::of(&hub);
    let r = run("r");
    let now = Instant::now();
    publish(&hub, &r, 0..3, now);
    let (_, mut sub) = hub.resume(&r, Some(0), None, now);
    let epoch = StreamEpoch::generate();
    inbox.replace(
        Ring::restored(r.clone(), epoch.clone(), hub.ring_limits(), 7, None),
        None,
        now,
    );
    assert_eq!(hub.total_bytes(), 0);
    assert_eq!(
        sub.next().now_or_never(),
        Some(Delivery::Closed),
        "the old history's reader is told"
    );
    let (info, _) = hub.resume(&r, Some(0), None, now);
    assert_eq!((info.stream_epoch, info.first_offset), (epoch.clone(), 7));
    assert!(inbox.remove_replica(&r, &epoch));
    assert!(hub.summary(&r).is_none());
}

#[tokio::test]
async fn the_gateway_calls_answer_as_the_engine_did() {
    let engine: Arc<StreamHub> = Arc::new(StreamHub::new(StreamLimits::default()));
    let r = run("r");
    let now = Instant::now();
    engine.session_started(&r, now);
    let (info, mut sub) = engine.resume(&r, Some(0), None, now);
    assert_eq!(info.start_offset, 0);
    let out = engine
        .publish(
            &r,
            &[PublishedEvent {
                json: "{}",
                seq: None,
            }],
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        PublishOutcome {
            first_offset: 0,
            accepted: 1,
            duplicates: 0,
            next_offset: 1
        }
    );
    assert_eq!(offsets(&frames(sub.next().await)), vec![0]);
    assert_eq!(sub.cursor(), 1);
    assert_eq!(engine.runs().len(), 1);
    assert_eq!(engine.stats().streams, 1);
    assert_eq!(engine.summary(&r).unwrap().next_offset, 1);
    let json = serde_json::to_value(&info).unwrap();
    assert_eq!(json["streamEpoch"], info.stream_epoch.as_str());
    assert_eq!(json["startOffset"], 0);
}

/// The log's writer shows a group quietly, answers its publishers, then
/// wakes the readers: what was shown must be readable at once (a resume
/// after the answer finds it), a reader already asleep must wake only at
/// `Wake::now`, and a `Wake` dropped unsent must still wake it.
#[test]
fn a_quiet_show_is_readable_at_once_and_wakes_the_sleepers_at_its_wake() {
    let (hub, inbox, r, now, epoch, texts) = replica(4);

    for (first, wake_by_drop) in [(0, false), (2, true)] {
        let (_, mut sleeper) = hub.resume(&r, Some(first), None, now);
        let mut sleeping = Box::pin(sleeper.next());
        assert!((&mut sleeping).now_or_never().is_none(), "nothing yet");

        let batches = [replica_batch(&texts, first, first + 2)];
        let stored = Visible::Stored {
            batches: &batches,
            last_seq: None,
            authoritative: false,
        };
        let (shown, wake) = inbox.show_quietly(&r, &epoch, stored, now);
        assert_eq!(shown, Shown::Applied);

        let (_, mut late) = hub.resume(&r, Some(first), None, now);
        assert_eq!(
            offsets(&frames(
                late.next().now_or_never().expect("readable at once")
            )),
            vec![first, first + 1]
        );
        assert!(
            (&mut sleeping).now_or_never().is_none(),
            "a sleeper hears of it only at the wake"
        );

        if wake_by_drop {
            drop(wake);
        } else {
            wake.now();
        }
        assert_eq!(
            offsets(&frames((&mut sleeping).now_or_never().expect("woken"))),
            vec![first, first + 1]
        );
    }
}

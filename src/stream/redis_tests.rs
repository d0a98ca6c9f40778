//! The Redis backend against a real `redis-server`: two or three hubs on
//! one Redis stand for gateways on different machines.
//! Without redis-server the tests skip loudly (and fail under `CI=true`):
//! see `crates/rungate-test-support/src/redis.rs`.

use std::future::Future;
use std::time::Duration;

use futures_util::future::join_all;

use super::*;
use crate::ids::RunId;
use crate::ids::SessionId;
use crate::redis::test_server::{self, TestRedis};
use crate::stream::tests::decode;
use crate::stream::{Delivery, EventDelivery, Subscription};

/// Generous: the machine may be busy with other builds.
const PATIENCE: Duration = Duration::from_secs(30);

fn run(s: &str) -> RunId {
    RunId::new(s).unwrap()
}

fn ev(i: u64) -> String {
    format!(r#"{{"type":"t","data":{i}}}"#)
}

/// A server and a prefix of its own for one test.
fn server() -> Option<(TestRedis, String)> {
    let server = test_server::start()?;
    Some((server, format!("t-{}", SessionId::generate())))
}

/// One gateway's streams, and the switch that holds its channel down.
struct Node {
    hub: Arc<StreamHub>,
    channel_down: Arc<watch::Sender<bool>>,
}

impl std::ops::Deref for Node {
    type Target = StreamHub;
    fn deref(&self) -> &StreamHub {
        &self.hub
    }
}

impl Node {
    /// Holds this node's channel down (`true`) or lets it reconnect, as a
    /// network fault between this node and Redis would.
    fn pause_channel(&self, paused: bool) {
        self.channel_down.send_replace(paused);
    }
}

async fn node(server: &TestRedis, prefix: &str, limits: StreamLimits) -> Node {
    fenced_node(server, prefix, limits, None).await
}

/// A node whose publishes are fenced by the session store of `fenced_as`.
async fn fenced_node(
    server: &TestRedis,
    prefix: &str,
    limits: StreamLimits,
    fenced_as: Option<&str>,
) -> Node {
    let (hub, channel_down) = start(&server.url, prefix, limits, fenced_as)
        .await
        .expect("connect to the test Redis");
    Node { hub, channel_down }
}

/// Two nodes on one Redis and prefix, as two gateways.
async fn two_nodes(server: &TestRedis, prefix: &str, limits: StreamLimits) -> (Node, Node) {
    (
        node(server, prefix, limits.clone()).await,
        node(server, prefix, limits).await,
    )
}

/// Streams dropped by the first sweep after their session ends.
fn no_retention() -> StreamLimits {
    StreamLimits {
        retention: Duration::ZERO,
        ..StreamLimits::default()
    }
}

async fn publish_range(
    engine: &StreamHub,
    r: &RunId,
    range: std::ops::Range<u64>,
    seq: bool,
) -> Result<PublishOutcome, StreamError> {
    let texts: Vec<(u64, String)> = range.map(|i| (i, ev(i))).collect();
    let events: Vec<PublishedEvent<'_>> = texts
        .iter()
        .map(|(i, json)| PublishedEvent {
            json,
            seq: seq.then_some(*i + 1),
        })
        .collect();
    engine.publish(r, &events, Instant::now()).await
}

/// Polls `check` until it holds; the wait is bounded, the check is the
/// assertion.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Reads frames until the cursor reaches `until`; any gap or close fails.
async fn read_to(sub: &mut Subscription, until: u64) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while sub.cursor() < until {
        match within("the next delivery", sub.next()).await {
            Delivery::Frames(frames) => got.extend(frames.iter().flat_map(|f| decode(f))),
            other => panic!("expected frames at {}, got {other:?}", sub.cursor()),
        }
    }
    got
}

fn expected(range: std::ops::Range<u64>) -> Vec<(u64, String)> {
    range.map(|i| (i, ev(i))).collect()
}

fn head(engine: &StreamHub, r: &RunId) -> Option<(StreamEpoch, u64, u64)> {
    engine
        .summary(r)
        .map(|s| (s.stream_epoch, s.first_offset, s.next_offset))
}

async fn redis_conn(server: &TestRedis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn publish_on_one_node_resume_and_tail_on_another() {
    let Some((server, prefix)) = server() else {
        return;
    };
    let (a, b) = two_nodes(&server, &prefix, StreamLimits::default()).await;
    let r = run("r1");
    let out = publish_range(&a, &r, 0..5, true).await.unwrap();
    assert_eq!((out.first_offset, out.accepted, out.next_offset), (0, 5, 5));
    // Read-your-writes: the publisher's node shows it once answered.
    assert_eq!(head(&a, &r).unwrap().2, 5);
    eventually("B holds A's batch", || {
        head(&b, &r).is_some_and(|h| h.2 == 5)
    })
    .await;
    let (info, mut sub) = b.resume(&r, Some(0), None, Instant::now());
    assert_eq!((info.start_offset, info.truncated), (0, false));
    assert_eq!(info.stream_epoch, head(&a, &r).unwrap().0);
    let reader = tokio::spawn(async move { read_to(&mut sub, 15).await });
    publish_range(&a, &r, 5..10, true).await.unwrap();
    let out = publish_range(&b, &r, 10..15, true).await.unwrap();
    assert_eq!(out.first_offset, 10);
    assert_eq!(within("reader", reader).await.unwrap(), expected(0..15));
    eventually("A holds B's batch", || {
        head(&a, &r).is_some_and(|h| h.2 == 15)
    })
    .await;
    assert_eq!(head(&a, &r), head(&b, &r));
    // SSE readers on the other node see the same events.
    let (_, mut sse) = a.resume(&r, Some(13), None, Instant::now());
    let EventDelivery::Events(events) = within("sse", sse.next_events()).await else {
        panic!("expected events")
    };
    assert_eq!(
        events
            .iter()
            .map(|e| (e.offset, String::from_utf8(e.json.to_vec()).unwrap()))
            .collect::<Vec<_>>(),
        expected(13..15)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_two_nodes_share_one_order() {
    let Some((server, prefix)) = server() else {
        return;
    };
    let a = Arc::new(node(&server, &prefix, StreamLimits::default()).await);
    let b = Arc::new(node(&server, &prefix, StreamLimits::default()).await);
    let r = run("busy");
    a.session_started(&r, Instant::now());
    eventually("B knows the stream", || b.summary(&r).is_some()).await;
    let (_, mut sub_a) = a.resume(&r, Some(0), None, Instant::now());
    let (_, mut sub_b) = b.resume(&r, Some(0), None, Instant::now());
    const BATCHES: u64 = 40;
    const PER: u64 = 3;
    let total = 2 * BATCHES * PER;
    let readers = [
        tokio::spawn(async move { read_to(&mut sub_a, total).await }),
        tokio::spawn(async move { read_to(&mut sub_b, total).await }),
    ];
    let publishers = [(a.clone(), 0u64), (b.clone(), 1u64)].map(|(engine, node)| {
        let r = r.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..BATCHES {
                let texts: Vec<String> = (0..PER)
                    .map(|j| format!(r#"{{"node":{node},"batch":{i},"j":{j}}}"#))
                    .collect();
                let events: Vec<PublishedEvent<'_>> = texts
                    .iter()
                    .map(|json| PublishedEvent { json, seq: None })
                    .collect();
                outcomes.push(engine.publish(&r, &events, Instant::now()).await.unwrap());
            }
            outcomes
        })
    });
    let mut offsets: Vec<u64> = Vec::new();
    for outcomes in join_all(publishers).await {
        for o in outcomes.unwrap() {
            assert_eq!(o.accepted as u64, PER);
            offsets.extend(o.first_offset..o.first_offset + PER);
        }
    }
    offsets.sort_unstable();
    assert_eq!(
        offsets,
        (0..total).collect::<Vec<_>>(),
        "contiguous, no reuse"
    );
    let [seen_a, seen_b] = join_all(readers)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    assert_eq!(seen_a, seen_b, "both nodes show one sequence");
    assert_eq!(
        seen_a.iter().map(|e| e.0).collect::<Vec<_>>(),
        (0..total).collect::<Vec<_>>()
    );
    let mut texts: Vec<&String> = seen_a.iter().map(|e| &e.1).collect();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len() as u64, total, "every event exactly once");
    // Each publisher's batches kept their own order.
    for node in 0..2 {
        let batches: Vec<u64> = seen_a
            .iter()
            .filter_map(|(_, t)| {
                let v: serde_json::Value = serde_json::from_str(t).unwrap();
                (v["node"] == node && v["j"] == 0).then(|| v["batch"].as_u64().unwrap())
            })
            .collect();
        assert_eq!(batches, (0..BATCHES).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn seq_duplicates_are_dropped_across_nodes() {
    let Some((server, prefix)) = server() else {
        return;
    };
    let (a, b) = two_nodes(&server, &prefix, StreamLimits::default()).await;
    let r = run("dedupe");
    // seq 1..=3 on A.
    publish_range(&a, &r, 0..3, true).await.unwrap();
    // B resends seq 2..=3 and adds 4..=5, before or after it has seen A's:
    // Redis decides, not B's replica.
    let out = publish_range(&b, &r, 1..5, true).await.unwrap();
    assert_eq!(
        out,
        PublishOutcome {
            first_offset: 3,
            accepted: 2,
            duplicates: 2,
            next_offset: 5
        }
    );
    let all_again = publish_range(&a, &r, 0..5, true).await.unwrap();
    assert_eq!((all_again.accepted, all_again.duplicates), (0, 5));
    let (_, mut sub) = b.resume(&r, Some(0), None, Instant::now());
    let got = read_to(&mut sub, 5).await;
    let texts: Vec<String> = got.into_iter().map(|e| e.1).collect();
    assert_eq!(texts, vec![ev(0), ev(1), ev(2), ev(3), ev(4)]);
}

#[tokio::test]
async fn nodes_agree_on_the_epoch_of_a_stream_both_created() {
    let Some((server, prefix)) = server() else {
        return;
    };
    let (a, b) = two_nodes(&server, &prefix, StreamLimits::default()).await;
    // C only watches: it hears of the stream and the race on the channel.
    let c = node(&server, &prefix, StreamLimits::default()).await;
    let r = run("two-viewers");
    // Both create the stream locally before either hears of the other's.
    let (info_a, mut sub_a) = a.resume(&r, None, None, Instant::now());
    let (info_b, mut sub_b) = b.resume(&r, None, None, Instant::now());
    eventually(
        "one epoch",
        || matches!((head(&a, &r), head(&b, &r)), (Some(x), Some(y)) if x.0 == y.0),
    )
    .await;
    let agreed = head(&a, &r).unwrap().0;
    assert!(agreed == info_a.stream_epoch || agreed == info_b.stream_epoch);
    // The stream that lost was empty: its node takes the other epoch in
    // place, so its viewer stays subscribed (no close), and a resume that
    // names the epoch it was told is not truncated: nothing was lost.
    for (info, engine) in [(&info_a, &a), (&info_b, &b)] {
        let (again, _) = engine.resume(
            &r,
            Some(0),
            Some(info.stream_epoch.as_str()),
            Instant::now(),
        );
        assert_eq!(again.stream_epoch, agreed);
        assert!(!again.truncated, "{again:?}");
    }
    publish_range(&b, &r, 0..2, false).await.unwrap();
    assert_eq!(read_to(&mut sub_a, 2).await, expected(0..2));
    assert_eq!(read_to(&mut sub_b, 2).await, expected(0..2));
    // A third node agrees too.
    eventually("C has the stream", || head(&c, &r).is_some()).await;
    assert_eq!(head(&c, &r).unwrap().0, agreed);
    // The losing proposal is recorded in Redis (its create script runs
    // after the winner's, so it may land after the loser adopted).
    let lost = [&info_a, &info_b]
        .into_iter()
        .map(|i| i.stream_epoch.clone())
        .find(|e| *e != agreed)
        .expect("one proposal lost");
    let mut conn = redis_conn(&server).await;
    let mut recorded = String::new();
    for _ in 0..500 {
        recorded = redis::cmd("HGET")
            .arg(format!("{prefix}:s:{r}"))
            .arg("aliases")
            .query_async::<Option<String>>(&mut conn)
            .await
            .unwrap()
            .unwrap_or_default();
        if !recorded.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(recorded, lost.as_str());
    // So every node takes a resume naming the lost proposal as this
    // history: not truncated, nothing twice (before, only the loser did,
    // until it restarted: the soak's "resume epoch replaced").
    // C had the stream before the loss was recorded: it hears of it on the
    // channel.
    eventually("C knows the lost proposal", || {
        !c.resume(&r, Some(1), Some(lost.as_str()), Instant::now())
            .0
            .truncated
    })
    .await;
    let d = node(&server, &prefix, StreamLimits::default()).await;
    for engine in [&c, &d] {
        let (told, mut sub) = engine.resume(&r, Some(1), Some(lost.as_str()), Instant::now());
        assert_eq!(told.stream_epoch, agreed);
        assert!(!told.truncated, "{told:?}");
        assert_eq!(told.start_offset, 1);
        assert_eq!(read_to(&mut sub, 2).await, expected(1..2));
    }
}

#[tokio::test]
async fn a_node_started_later_loads_every_stream() {
    let Some((server, prefix)) = server() else {
        return;
    };
    let a = node(&server, &prefix, StreamLimits::default()).await;
    let (r1, r2, r3) = (run("one"), run("two"), run("empty"));
    publish_range(&a, &r1, 0..5, true).await.unwrap();
    publish_range(&a, &r2, 0..2, false).await.unwrap();
    publish_range(&a, &r2, 2..3, false).await.unwrap();
    a.session_started(&r3, Instant::now());
    // Let A's creation of r3 reach Redis (its next publish is ordered after).
    publish_range(&a, &r1, 5..6, true).await.unwrap();
    let c = node(&server, &prefix, StreamLimits::default()).await;
    // Loaded before `connect` returned: no waiting.
    for r in [&r1, &r2, &r3] {
        assert_eq!(head(&c, r), head(&a, r), "{r}");
    }
    assert_eq!(c.runs(), a.runs());
    let (info, mut sub) = c.resume(&r2, Some(0), None, Instant::now());
    assert!(!info.truncated);
    assert_eq!(read_to(&mut sub, 3).await, expected(0..3));
    // Its de-duplication continues where A's left off.
    let again = publish_range(&c, &r1, 0..6, true).await.unwrap();
    assert_eq!((again.accepted, again.duplicates), (0, 6));
}

#[tokio::test]
async fn events_published_while_a_node_lost_the_channel_reach_it_after() {
    let Some((server, prefix)) = server() else {
        return;
    };
    let (a, b) = two_nodes(&server, &prefix, StreamLimits::default()).await;
    let r = run("partitioned");
    publish_range(&a, &r, 0..2, false).await.unwrap();
    eventually("B holds 2", || head(&b, &r).is_some_and(|h| h.2 == 2)).await;
    let (_, mut sub) = b.resume(&r, Some(0), None, Instant::now());
    assert_eq!(read_to(&mut sub, 2).await, expected(0..2));
    b.pause_channel(true);
    eventually("B notices", || !b.healthy()).await;
    for i in 0..3 {
        publish_range(&a, &r, 2 + i * 2..4 + i * 2, false)
            .await
            .unwrap();
    }
    // B missed them (it would have them by now otherwise: A's node has).
    tokio::task::yield_now().await;
    assert_eq!(head(&b, &r).unwrap().2, 2);
    b.pause_channel(false);
    assert_eq!(read_to(&mut sub, 8).await, expected(2..8));
    eventually("B healthy again", || b.healthy()).await;
    // And live again afterwards.
    publish_range(&a, &r, 8..9, false).await.unwrap();
    assert_eq!(read_to(&mut sub, 9).await, expected(8..9));
}

#[tokio::test]
async fn a_reader_behind_redis_maxlen_gets_a_gap() {
    let Some((server, prefix)) = server() else {
        return;
    };
    let limits = StreamLimits {
        max_events_per_run: 4,
        ..StreamLimits::default()
    };
    let (a, b) = two_nodes(&server, &prefix, limits.clone()).await;
    let r = run("capped");
    a.session_started(&r, Instant::now());
    eventually("B knows the stream", || b.summary(&r).is_some()).await;
    let (_, mut slow) = b.resume(&r, Some(0), None, Instant::now());
    // B is cut off while 10 events go in; Redis keeps the last 4.
    b.pause_channel(true);
    eventually("B notices", || !b.healthy()).await;
    for i in 0..5 {
        publish_range(&a, &r, i * 2..i * 2 + 2, false)
            .await
            .unwrap();
    }
    let mut conn = redis_conn(&server).await;
    // One entry per batch: two batches of two events.
    let kept: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(format!("{prefix}:x:capped"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let ids: Vec<&str> = kept.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["6-1", "8-1"]);
    assert_eq!(kept.iter().map(|(_, f)| f.len() / 2).sum::<usize>(), 4);
    assert_eq!(head(&b, &r).unwrap().2, 0, "B missed them");
    b.pause_channel(false);
    match within("gap", slow.next()).await {
        Delivery::Gap { from, to, .. } => assert_eq!((from, to), (0, 5)),
        other => panic!("expected a gap, got {other:?}"),
    }
    assert_eq!(read_to(&mut slow, 10).await, expected(6..10));
    let (_, first, next) = head(&b, &r).unwrap();
    assert_eq!((first, next), (6, 10));
    // A node starting now sees the same kept range.
    let c = node(&server, &prefix, limits).await;
    assert_eq!(head(&c, &r), head(&b, &r));
    let (info, _) = c.resume(&r, Some(2), None, Instant::now());
    assert_eq!((info.start_offset, info.truncated), (6, true));
}

#[tokio::test]
async fn a_drop_on_one_node_drops_the_stream_everywhere() {
    let Some((server, prefix)) = server() else {
        return;
    };
    let (a, b) = two_nodes(&server, &prefix, no_retention()).await;
    let r = run("short-lived");
    let t0 = Instant::now();
    a.session_started(&r, t0);
    publish_range(&a, &r, 0..3, true).await.unwrap();
    eventually("B holds it", || head(&b, &r).is_some_and(|h| h.2 == 3)).await;
    let old = head(&b, &r).unwrap().0;
    let (_, mut sub) = b.resume(&r, Some(3), None, Instant::now());
    // Active: no node's sweep drops it.
    assert_eq!(b.sweep(Instant::now()).expired_streams, 0);
    a.session_ended(&r, Instant::now());
    // B learns the session ended (retention counts on every node)...
    eventually("B sees it idle", || {
        b.sweep(Instant::now()).expired_streams == 1
    })
    .await;
    // ...and B's sweep dropped it everywhere.
    assert_eq!(within("closed", sub.next()).await, Delivery::Closed);
    eventually("A dropped it", || a.summary(&r).is_none()).await;
    let mut conn = redis_conn(&server).await;
    let exists: u64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}:s:{r}"))
        .arg(format!("{prefix}:x:{r}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0);
    // The run's next stream is a new history, seq marks and all.
    let out = publish_range(&a, &r, 0..1, true).await.unwrap();
    assert_eq!((out.first_offset, out.accepted), (0, 1));
    let new = head(&a, &r).unwrap().0;
    assert_ne!(new, old);
    eventually("B has the new history", || {
        head(&b, &r).is_some_and(|h| h.0 == new && h.2 == 1)
    })
    .await;
}

#[tokio::test]
async fn a_session_active_on_another_node_keeps_the_stream() {
    let Some((server, prefix)) = server() else {
        return;
    };
    let (a, b) = two_nodes(&server, &prefix, no_retention()).await;
    let r = run("moved");
    a.session_started(&r, Instant::now());
    publish_range(&a, &r, 0..2, false).await.unwrap();
    eventually("B holds it", || head(&b, &r).is_some_and(|h| h.2 == 2)).await;
    let epoch = head(&a, &r).unwrap().0;
    // A's session ends and, while A hears nothing, the run's session
    // starts on B. A's sweep drops its copy, but Redis keeps the stream,
    // and A loads it back without waiting for its channel.
    a.pause_channel(true);
    eventually("A notices", || !a.healthy()).await;
    a.session_ended(&r, Instant::now());
    publish_range(&a, &r, 2..2, false).await.unwrap(); // A's end is in Redis
    b.session_started(&r, Instant::now());
    publish_range(&b, &r, 2..3, false).await.unwrap();
    assert_eq!(a.sweep(Instant::now()).expired_streams, 1);
    eventually("A has it back", || {
        head(&a, &r).is_some_and(|h| h.0 == epoch && h.2 == 3)
    })
    .await;
    assert_eq!(head(&b, &r).unwrap().0, epoch);
    a.pause_channel(false);
    eventually("A healthy", || a.healthy()).await;
}

#[tokio::test]
async fn redis_away_is_unavailable_and_replicas_resync_after() {
    if std::env::var("REDIS_URL").is_ok() {
        return; // Cannot stop a server that is not ours.
    }
    let Some((mut server, prefix)) = server() else {
        return;
    };
    let (a, b) = two_nodes(&server, &prefix, StreamLimits::default()).await;
    let r = run("outage");
    publish_range(&a, &r, 0..3, true).await.unwrap();
    eventually("B holds 3", || head(&b, &r).is_some_and(|h| h.2 == 3)).await;
    let epoch = head(&b, &r).unwrap().0;
    let (_, mut sub) = b.resume(&r, Some(0), None, Instant::now());
    assert_eq!(read_to(&mut sub, 3).await, expected(0..3));
    // A Redis that persists: what it acknowledged survives its restart.
    redis::cmd("SAVE")
        .query_async::<()>(&mut redis_conn(&server).await)
        .await
        .unwrap();
    server.stop();
    let err = within("publish answered", publish_range(&a, &r, 3..6, true))
        .await
        .unwrap_err();
    assert!(matches!(err, StreamError::Unavailable(_)), "{err:?}");
    eventually("A unhealthy", || !a.healthy()).await;
    eventually("B unhealthy", || !b.healthy()).await;
    // Replicas are still served.
    assert_eq!(head(&b, &r).unwrap().2, 3);
    server.restart();
    // The runtime retries the same batch until it is accepted; anything a
    // failed attempt stored after all is dropped by seq.
    let deadline = Instant::now() + PATIENCE;
    let out = loop {
        match publish_range(&a, &r, 3..6, true).await {
            Ok(out) => break out,
            Err(StreamError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    assert_eq!(out.first_offset, 3);
    publish_range(&b, &r, 6..8, true).await.unwrap();
    assert_eq!(read_to(&mut sub, 8).await, expected(3..8));
    eventually("both healthy", || a.healthy() && b.healthy()).await;
    eventually("A holds B's batch", || {
        head(&a, &r).is_some_and(|h| h.2 == 8)
    })
    .await;
    assert_eq!(head(&a, &r).unwrap().0, epoch, "same history throughout");
    let (_, mut from_zero) = a.resume(&r, Some(0), None, Instant::now());
    assert_eq!(read_to(&mut from_zero, 8).await, expected(0..8));
}

#[tokio::test]
async fn too_large_batches_are_refused_before_redis() {
    let Some((server, prefix)) = server() else {
        return;
    };
    let limits = StreamLimits {
        max_events_per_run: 5,
        max_bytes_per_run: 4096,
        ..StreamLimits::default()
    };
    let a = node(&server, &prefix, limits).await;
    let r = run("big");
    let err = publish_range(&a, &r, 0..6, false).await.unwrap_err();
    assert!(
        matches!(
            err,
            StreamError::TooLarge {
                events: 6,
                max_events: 5,
                ..
            }
        ),
        "{err:?}"
    );
    let huge = format!("\"{}\"", "x".repeat(5000));
    let err = a
        .publish(
            &r,
            &[PublishedEvent {
                json: &huge,
                seq: None,
            }],
            Instant::now(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StreamError::TooLarge { .. }), "{err:?}");
    let out = publish_range(&a, &r, 0..5, false).await.unwrap();
    assert_eq!(out.first_offset, 0, "nothing of the refused batches stored");
}

#[test]
fn wall_clock_round_trips() {
    let now = Instant::now();
    for at in [now, now + Duration::from_secs(90)] {
        let back = instant_at(wall_ms(at));
        let diff = if back > at { back - at } else { at - back };
        assert!(diff < Duration::from_millis(50), "{diff:?}");
    }
    // Long before this process (or boot): still in the past.
    assert!(instant_at(1_000) <= Instant::now());
    assert_eq!(redacted("redis://u:p@h:1/0"), "redis://***@h:1/0");
    assert_eq!(redacted("redis://h:1/0"), "redis://h:1/0");
}

#[tokio::test]
async fn close_answers_every_publish_queued_before_it() {
    let Some((server, prefix)) = server() else {
        return;
    };
    let a = node(&server, &prefix, StreamLimits::default()).await;
    let r = run("closing");
    let texts: Vec<String> = (0..20).map(ev).collect();
    let pending: Vec<_> = texts
        .iter()
        .map(|json| a.publish(&r, &[PublishedEvent { json, seq: None }], Instant::now()))
        .collect();
    within("close", a.close()).await;
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(p.await.unwrap().first_offset, i as u64);
    }
    assert_eq!(head(&a, &r).unwrap().2, 20, "applied before close returned");
    let late = publish_range(&a, &r, 20..21, false).await.unwrap_err();
    assert!(matches!(late, StreamError::Unavailable(_)), "{late:?}");
}

/// A publish made on behalf of a session is fenced in the same script as
/// the append: once another node holds the session (or for a session this
/// node never held), nothing is stored, however soon after the takeover.
#[tokio::test]
async fn a_publish_fenced_by_a_lost_session_stores_nothing() {
    use crate::store::conformance::session;
    use crate::store::redis::RedisStore;
    use crate::store::{SessionChange, Store};

    let Some((server, prefix)) = server() else {
        return;
    };
    let (store_a, store_b) = (
        RedisStore::connect(&server.url, &prefix).await.unwrap(),
        RedisStore::connect(&server.url, &prefix).await.unwrap(),
    );
    let a = fenced_node(
        &server,
        &prefix,
        StreamLimits::default(),
        Some(store_a.node()),
    )
    .await;
    let mut s = session("fenced-run", 1);
    let r = s.run_id.clone();
    store_a
        .sessions_save(vec![SessionChange::Put(s.clone())])
        .await
        .unwrap();
    let texts = [ev(0)];
    let events = [PublishedEvent {
        json: &texts[0],
        seq: None,
    }];
    let as_a = |epoch| Publisher {
        session_id: s.session_id.as_str(),
        epoch,
    };
    let held = a.publish_as(&r, &events, as_a(1), Instant::now()).await;
    assert_eq!(held.unwrap().next_offset, 1);
    assert_eq!(
        a.publish_as(&r, &events, as_a(2), Instant::now()).await,
        Err(StreamError::Fenced),
        "not at an epoch it does not hold"
    );

    s.epoch = 2;
    store_b
        .sessions_save(vec![SessionChange::Put(s.clone())])
        .await
        .unwrap();
    for epoch in [1, 2] {
        assert_eq!(
            a.publish_as(&r, &events, as_a(epoch), Instant::now()).await,
            Err(StreamError::Fenced),
            "B holds it now"
        );
    }
    let unknown = SessionId::generate();
    let stranger = Publisher {
        session_id: unknown.as_str(),
        epoch: 1,
    };
    assert_eq!(
        a.publish_as(&r, &events, stranger, Instant::now()).await,
        Err(StreamError::Fenced)
    );
    assert_eq!(
        head(&a, &r).map(|(_, _, next)| next),
        Some(1),
        "nothing stored"
    );
    // Unfenced publishes (an engine used without sessions) still work.
    assert_eq!(
        a.publish(&r, &events, Instant::now())
            .await
            .unwrap()
            .next_offset,
        2
    );
}

/// Redis keeps one entry per batch (a batch over `EVENTS_PER_ENTRY` events
/// takes several) and a catch-up reads them a page at a time: a node
/// started later holds every event once, in order, and can be resumed in
/// the middle of a split batch.
#[tokio::test]
async fn a_late_node_reads_many_entries_and_split_batches() {
    let Some((server, prefix)) = server() else {
        return;
    };
    let a = node(&server, &prefix, StreamLimits::default()).await;
    let r = run("paged");
    a.session_started(&r, Instant::now());
    for i in 0..40 {
        publish_range(&a, &r, i * 5..i * 5 + 5, false)
            .await
            .unwrap();
    }
    let big = 200..200 + 2 * scripts::EVENTS_PER_ENTRY as u64 + 500;
    let end = big.end;
    publish_range(&a, &r, big, false).await.unwrap();

    let c = node(&server, &prefix, StreamLimits::default()).await;
    assert_eq!(head(&c, &r), head(&a, &r));
    let (_, mut all) = c.resume(&r, Some(0), None, Instant::now());
    assert_eq!(read_to(&mut all, end).await, expected(0..end));
    let middle = 200 + scripts::EVENTS_PER_ENTRY as u64 + 7;
    let (info, mut part) = c.resume(&r, Some(middle), None, Instant::now());
    assert_eq!((info.start_offset, info.truncated), (middle, false));
    assert_eq!(read_to(&mut part, end).await, expected(middle..end));
}

/// Trimming keeps whole entries: a batch that starts before the last
/// `max_events_per_run` offsets goes whole, so Redis may keep fewer events
/// than a live replica, and a node started later starts there.
#[tokio::test]
async fn trimming_keeps_whole_batches() {
    let Some((server, prefix)) = server() else {
        return;
    };
    let limits = StreamLimits {
        max_events_per_run: 4,
        ..StreamLimits::default()
    };
    let a = node(&server, &prefix, limits.clone()).await;
    let r = run("straddled");
    for i in 0..4 {
        publish_range(&a, &r, i * 3..i * 3 + 3, false)
            .await
            .unwrap();
    }
    // A's replica took the batches live: the last 4 events.
    assert_eq!(head(&a, &r).map(|h| (h.1, h.2)), Some((8, 12)));
    // Redis kept the batch starting at 9 only (6..9 started before 8).
    let c = node(&server, &prefix, limits).await;
    assert_eq!(head(&c, &r).map(|h| (h.1, h.2)), Some((9, 12)));
    let (info, mut sub) = c.resume(&r, Some(8), None, Instant::now());
    assert_eq!((info.start_offset, info.truncated), (9, true));
    assert_eq!(read_to(&mut sub, 12).await, expected(9..12));
}

/// A viewer that read up to A's head moves to B while B's copy lags (its
/// channel is down, as in a partition): a resume with the epoch waits at
/// its offset instead of starting again at B's head, so nothing reaches
/// it twice; and a catch-up (what SSE asks for, having no epoch) brings
/// B's copy to what Redis held.
#[tokio::test]
async fn a_viewer_moving_to_a_lagging_node_is_handed_nothing_twice() {
    let Some((server, prefix)) = server() else {
        return;
    };
    let (a, b) = two_nodes(&server, &prefix, StreamLimits::default()).await;
    let r = run("moving-viewer");
    publish_range(&a, &r, 0..2, false).await.unwrap();
    eventually("B holds 2", || head(&b, &r).is_some_and(|h| h.2 == 2)).await;
    b.pause_channel(true);
    eventually("B notices", || !b.healthy()).await;
    publish_range(&a, &r, 2..6, false).await.unwrap();
    let (epoch, _, a_head) = head(&a, &r).unwrap();
    assert_eq!(a_head, 6);
    assert_eq!(head(&b, &r).unwrap().2, 2, "B lags");

    // Read 0..6 on A, then resume on B from 6 with the epoch.
    let (_, mut on_a) = a.resume(&r, Some(0), None, Instant::now());
    assert_eq!(read_to(&mut on_a, 6).await, expected(0..6));
    let (info, mut on_b) = b.resume(&r, Some(6), Some(epoch.as_str()), Instant::now());
    assert_eq!(
        (info.start_offset, info.next_offset, info.truncated),
        (6, 2, false),
        "waits at its own offset, beyond B's head"
    );
    assert_eq!(on_b.cursor(), 6);
    publish_range(&a, &r, 6..8, false).await.unwrap();
    b.pause_channel(false);
    assert_eq!(read_to(&mut on_b, 8).await, expected(6..8), "6 and 7, once");

    // A catch-up brings B's copy to Redis's head even with no notice.
    b.pause_channel(true);
    eventually("B notices again", || !b.healthy()).await;
    publish_range(&a, &r, 8..9, false).await.unwrap();
    assert_eq!(head(&b, &r).unwrap().2, 8);
    within("the catch-up", b.catch_up(&r)).await;
    assert_eq!(head(&b, &r).unwrap().2, 9, "caught up without the channel");
    b.pause_channel(false);
}

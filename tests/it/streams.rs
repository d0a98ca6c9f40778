//! Output streams over real sockets (PROTOCOL.md §4): publish, offsets,
//! de-duplication, limits, stream.resume / stream.cancel on both WebSocket
//! endpoints, the race-free hand-over from replay to live, slow
//! subscribers, retention, and every frame checked against the schemas.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::harness::*;
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use rungate_test_support::schema::Spec;
use serde_json::{Value, json};

fn event(i: u64) -> Value {
    json!({ "type": "log", "data": { "i": i, "text": format!("line {i}") } })
}

/// About 1 KiB, to fill socket buffers quickly.
fn big_event(i: u64) -> Value {
    json!({ "type": "log", "data": { "i": i, "pad": "x".repeat(1000) } })
}

/// A runtime socket attached to `run` (with `stream.resume`); returns the
/// socket and the session id.
async fn runtime_on(gw: &TestGateway, run: &str) -> (Client, Value) {
    let mut rt = gw.runtime(run).await;
    let sid = rt.attach(run, "inst-1", &["stream.resume"]).await["sessionId"].clone();
    (rt, sid)
}

async fn publish(rt: &mut Client, sid: &Value, run: &str, range: std::ops::Range<u64>) {
    publish_with(rt, sid, run, range, event).await
}

async fn publish_with(
    rt: &mut Client,
    sid: &Value,
    run: &str,
    range: std::ops::Range<u64>,
    make: fn(u64) -> Value,
) {
    let events: Vec<Value> = range.map(make).collect();
    let reply = rt
        .ok(
            "events.publish",
            json!({ "sessionId": sid, "runId": run, "events": events }),
        )
        .await;
    assert_eq!(reply, json!({ "accepted": true }));
}

async fn viewer(gw: &TestGateway, runs: &str) -> Client {
    let token = gw.token(TokenKind::Viewer, runs, &[]);
    Client::connect(&gw.url("/v1/stream"), &token).await
}

/// Reads `stream.events` / `stream.gap` pushes for `run` until offsets up to
/// `until` (exclusive) are accounted for; returns (delivered offsets, gaps).
async fn collect(client: &mut Client, run: &str, until: u64) -> (Vec<u64>, Vec<(u64, u64)>) {
    collect_with(client, run, until, event).await
}

async fn collect_with(
    client: &mut Client,
    run: &str,
    until: u64,
    made_by: fn(u64) -> Value,
) -> (Vec<u64>, Vec<(u64, u64)>) {
    let mut offsets = Vec::new();
    let mut gaps = Vec::new();
    let mut next = None::<u64>;
    while next.is_none_or(|n| n < until) {
        let frame = client
            .wait_for(|v| {
                (v["type"] == "stream.events" || v["type"] == "stream.gap")
                    && v["payload"]["runId"] == run
            })
            .await;
        let p = &frame["payload"];
        if frame["type"] == "stream.gap" {
            let (from, to) = (
                p["fromOffset"].as_u64().unwrap(),
                p["toOffset"].as_u64().unwrap(),
            );
            assert!(to >= from, "{frame}");
            gaps.push((from, to));
            next = Some(to + 1);
        } else {
            let events = p["events"].as_array().unwrap();
            assert!(!events.is_empty(), "stream.events is never empty");
            for e in events {
                let offset = e["offset"].as_u64().unwrap();
                assert_eq!(e["event"], made_by(offset), "event {offset} as published");
                offsets.push(offset);
                next = Some(offset + 1);
            }
        }
    }
    (offsets, gaps)
}

/// Every offset in `start..until` appears exactly once, in order, either
/// delivered or inside a gap.
fn assert_accounted(start: u64, until: u64, offsets: &[u64], gaps: &[(u64, u64)]) {
    let mut all: Vec<(u64, u64)> = offsets.iter().map(|&o| (o, o)).collect();
    all.extend_from_slice(gaps);
    all.sort();
    let mut expect = start;
    for (from, to) in all {
        assert_eq!(from, expect, "offset {expect} missing or repeated");
        expect = to + 1;
    }
    assert_eq!(expect, until);
    let mut sorted = offsets.to_vec();
    sorted.sort();
    assert_eq!(sorted, offsets, "delivered in offset order");
}

fn check_frames(spec: &Spec, frames: &[Value]) {
    for f in frames {
        let verdict = match f["type"].as_str() {
            Some("error") => spec.check_error(f),
            Some("reply") => Ok(()), // replies are checked where their type is known
            _ => spec.check_push(f),
        };
        verdict.unwrap_or_else(|e| panic!("{f}: {e}"));
    }
}

#[tokio::test]
async fn publish_assigns_offsets_and_resume_replays_then_tails_live() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = runtime_on(&gw, "run-a").await;
    publish(&mut rt, &sid, "run-a", 0..3).await;
    publish(&mut rt, &sid, "run-a", 3..5).await;

    let mut v = viewer(&gw, "run-*").await;
    let id = v
        .send(
            "stream.resume",
            json!({ "runId": "run-a", "fromOffset": 1 }),
        )
        .await;
    // The reply comes before any event of the subscription.
    let first = v
        .wait_for(|f| f.get("id").is_some() || f["type"] == "stream.events")
        .await;
    assert_eq!(first["id"], id.as_str(), "reply first: {first}");
    let info = &first["payload"];
    assert_eq!(info["firstOffset"], 0);
    assert_eq!(info["nextOffset"], 5);
    assert_eq!(info["startOffset"], 1);
    assert_eq!(info["truncated"], false);
    Spec::load()
        .check_reply("stream.resume", &first)
        .expect("resume reply matches the schema");

    let (offsets, gaps) = collect(&mut v, "run-a", 5).await;
    assert_eq!(offsets, vec![1, 2, 3, 4]);
    assert!(gaps.is_empty());

    publish(&mut rt, &sid, "run-a", 5..8).await;
    let (offsets, _) = collect(&mut v, "run-a", 8).await;
    assert_eq!(offsets, vec![5, 6, 7]);

    // No fromOffset: live only.
    let mut live = viewer(&gw, "run-a").await;
    let info = live.ok("stream.resume", json!({ "runId": "run-a" })).await;
    assert_eq!(info["startOffset"], 8);
    publish(&mut rt, &sid, "run-a", 8..9).await;
    let (offsets, _) = collect(&mut live, "run-a", 9).await;
    assert_eq!(offsets, vec![8]);

    let spec = Spec::load();
    check_frames(&spec, &v.seen);
    check_frames(&spec, &live.seen);
}

#[tokio::test]
async fn resent_batches_are_stored_once_by_seq() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = runtime_on(&gw, "dedupe").await;
    let batch = |seqs: &[u64]| {
        let events: Vec<Value> = seqs
            .iter()
            .map(|s| json!({ "type": "t", "seq": s, "data": s }))
            .collect();
        json!({ "sessionId": sid, "runId": "dedupe", "events": events })
    };
    rt.ok("events.publish", batch(&[1, 2, 3])).await;
    // A resend after a reconnect, overlapping with new events.
    rt.ok("events.publish", batch(&[2, 3, 4, 5])).await;
    rt.ok("events.publish", batch(&[1, 2, 3, 4, 5])).await;
    // Events without seq are never de-duplicated.
    let plain =
        json!({ "sessionId": sid, "runId": "dedupe", "events": [{"type": "t"}, {"type": "t"}] });
    rt.ok("events.publish", plain).await;

    let info = rt
        .ok(
            "stream.resume",
            json!({ "sessionId": sid, "runId": "dedupe", "fromOffset": 0 }),
        )
        .await;
    assert_eq!(info["nextOffset"], 7, "{info}");
    let mut seqs = Vec::new();
    while seqs.len() < 7 {
        let p = rt.push("stream.events").await;
        for e in p["events"].as_array().unwrap() {
            seqs.push(e["event"].get("seq").cloned().unwrap_or(Value::Null));
        }
    }
    assert_eq!(
        seqs,
        vec![
            json!(1),
            json!(2),
            json!(3),
            json!(4),
            json!(5),
            Value::Null,
            Value::Null
        ]
    );
}

#[tokio::test]
async fn events_keep_their_json_exactly_as_published() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = runtime_on(&gw, "raw").await;
    // Key order, spacing and number spelling the gateway must not touch.
    let raw_event = r#"{"data" : {"z":1,"a":[1.50,  2e3]},"type":"x"}"#;
    let frame = format!(
        r#"{{"id":"p","type":"events.publish","payload":{{"sessionId":{sid},"runId":"raw","events":[{raw_event}]}}}}"#
    );
    rt.send_text(&frame).await;
    assert_eq!(rt.answer("p").await["type"], "reply");

    let token = gw.token(TokenKind::Viewer, "raw", &[]);
    let mut v = Client::connect(&gw.url("/v1/stream"), &token).await;
    v.ok("stream.resume", json!({ "runId": "raw", "fromOffset": 0 }))
        .await;
    let text = v.next_text().await;
    assert!(
        text.contains(&format!(r#""event":{raw_event}"#)),
        "event bytes unchanged in {text}"
    );
}

#[tokio::test]
async fn oversized_batches_and_events_are_payload_too_large_and_store_nothing() {
    let gw = TestGateway::start_with(|c| {
        c.limits.max_events_per_publish = 10;
        c.limits.max_event_bytes = 1000;
        c.streams.max_bytes_per_run = 4096;
        c.streams.global_max_bytes = 1 << 20;
    })
    .await;
    let (mut rt, sid) = runtime_on(&gw, "big").await;
    let publish_events =
        |events: Vec<Value>| json!({ "sessionId": sid, "runId": "big", "events": events });

    // Too many events in one publish.
    let frame = rt
        .call(
            "events.publish",
            publish_events((0..11).map(event).collect()),
        )
        .await;
    assert_eq!(frame["error"]["code"], "PAYLOAD_TOO_LARGE", "{frame}");

    // One event over the per-event limit: the error names it.
    let fat = json!({ "type": "t", "data": "x".repeat(1100) });
    let frame = rt
        .call("events.publish", publish_events(vec![event(0), fat]))
        .await;
    assert_eq!(frame["error"]["code"], "PAYLOAD_TOO_LARGE", "{frame}");
    assert_eq!(frame["error"]["details"]["path"], "/payload/events/1");

    // Every event fits, but the batch alone exceeds the run's 4 KiB ring.
    let sized = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({ "type": "t", "data": format!("{i:0>500}") }))
            .collect()
    };
    let frame = rt.call("events.publish", publish_events(sized(10))).await;
    assert_eq!(frame["error"]["code"], "PAYLOAD_TOO_LARGE", "{frame}");

    // Nothing of the refused publishes was stored.
    let info = rt
        .ok(
            "stream.resume",
            json!({ "sessionId": sid, "runId": "big", "fromOffset": 0 }),
        )
        .await;
    assert_eq!(info["nextOffset"], 0, "{info}");

    // Batches that fit are stored; the ring evicts the oldest to hold 4 KiB.
    for _ in 0..3 {
        rt.ok("events.publish", publish_events(sized(4))).await;
    }
    let info = rt
        .ok(
            "stream.resume",
            json!({ "sessionId": sid, "runId": "big", "fromOffset": 0 }),
        )
        .await;
    assert_eq!(info["nextOffset"], 12, "{info}");
    assert!(info["firstOffset"].as_u64().unwrap() > 0, "evicted: {info}");
    assert_eq!(info["truncated"], true);

    let spec = Spec::load();
    check_frames(&spec, &rt.seen);
}

#[tokio::test]
async fn who_may_resume_what() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = runtime_on(&gw, "own-run").await;

    // Runtime socket: sessionId required, and the stream.resume capability.
    let frame = rt
        .call("stream.resume", json!({ "runId": "own-run" }))
        .await;
    assert_eq!(frame["error"]["code"], "INVALID_PAYLOAD");
    assert_eq!(frame["error"]["details"]["path"], "/payload/sessionId");
    let mut plain = gw.runtime("other-run").await;
    let other_sid = plain.attach("other-run", "i", &[]).await["sessionId"].clone();
    let code = plain
        .err(
            "stream.resume",
            json!({ "sessionId": other_sid, "runId": "other-run" }),
        )
        .await;
    assert_eq!(code, "FORBIDDEN");
    // A session of this socket for another run does not count.
    let code = rt
        .err(
            "stream.resume",
            json!({ "sessionId": sid, "runId": "other-run" }),
        )
        .await;
    assert_eq!(code, "NOT_ATTACHED");
    rt.ok(
        "stream.resume",
        json!({ "sessionId": sid, "runId": "own-run", "fromOffset": 0 }),
    )
    .await;

    // Viewer socket: no sessionId, and only covered runs.
    let mut v = viewer(&gw, "own-*").await;
    let frame = v
        .call(
            "stream.resume",
            json!({ "runId": "own-run", "sessionId": sid }),
        )
        .await;
    assert_eq!(frame["error"]["code"], "INVALID_PAYLOAD");
    assert_eq!(
        v.err("stream.resume", json!({ "runId": "other-run" }))
            .await,
        "FORBIDDEN"
    );
    v.ok("stream.resume", json!({ "runId": "own-run" })).await;
    // Runtime commands are not offered to viewers, runs.list not to runtimes.
    assert_eq!(
        v.err(
            "events.publish",
            json!({ "sessionId": sid, "runId": "own-run", "events": [] })
        )
        .await,
        "FORBIDDEN"
    );
    assert_eq!(rt.err("runs.list", json!({})).await, "FORBIDDEN");

    // Tokens of the wrong kind never get a socket.
    let runtime_token = gw.token(TokenKind::Runtime, "*", &Capability::ALL);
    assert_eq!(
        connect_status(&gw.url("/v1/stream"), Some(&runtime_token)).await,
        403
    );
    assert_eq!(connect_status(&gw.url("/v1/stream"), None).await, 401);

    let spec = Spec::load();
    check_frames(&spec, &v.seen);
    check_frames(&spec, &rt.seen);
}

#[tokio::test]
async fn cancel_stops_delivery_and_resume_replaces_the_subscription() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = runtime_on(&gw, "c").await;
    publish(&mut rt, &sid, "c", 0..3).await;
    let mut v = viewer(&gw, "*").await;
    v.ok("stream.resume", json!({ "runId": "c", "fromOffset": 0 }))
        .await;
    let (offsets, _) = collect(&mut v, "c", 3).await;
    assert_eq!(offsets, vec![0, 1, 2]);

    // Resuming again replaces the subscription: offsets 1.. once, not twice.
    v.ok("stream.resume", json!({ "runId": "c", "fromOffset": 1 }))
        .await;
    publish(&mut rt, &sid, "c", 3..4).await;
    let (offsets, _) = collect(&mut v, "c", 4).await;
    assert_eq!(offsets, vec![1, 2, 3]);

    assert_eq!(
        v.ok("stream.cancel", json!({ "runId": "c" })).await,
        json!({ "accepted": true })
    );
    publish(&mut rt, &sid, "c", 4..6).await;
    // Cancelling what is not followed is fine.
    v.ok("stream.cancel", json!({ "runId": "never" })).await;
    // A round trip after the publish: had anything of run c been sent, it
    // would have arrived before this reply.
    v.ok("runs.list", json!({})).await;
    let late: Vec<&Value> = v
        .seen
        .iter()
        .skip_while(|f| f["payload"] != json!({ "accepted": true }))
        .filter(|f| f["type"] == "stream.events")
        .collect();
    assert!(late.is_empty(), "events after cancel: {late:?}");
}

/// The heart of it: a runtime publishes without pause while viewers resume
/// from many points; each must see exactly the offsets from its start to
/// the end, once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_while_publishing_loses_and_repeats_nothing() {
    const BATCHES: u64 = 300;
    const PER_BATCH: u64 = 5;
    const TOTAL: u64 = BATCHES * PER_BATCH;
    // Published before any reader resumes: every replaying reader's start
    // (up to offset 18) is then kept, however slowly the publisher runs,
    // so `truncated` is false by the protocol and not by the machine's
    // speed (a start past the head replays from the oldest, truncated).
    const EARLY: u64 = 4;
    let gw = TestGateway::start().await;
    let (mut rt, sid) = runtime_on(&gw, "race").await;
    publish(&mut rt, &sid, "race", 0..EARLY * PER_BATCH).await;

    let publisher = tokio::spawn(async move {
        for b in EARLY..BATCHES {
            let start = b * PER_BATCH;
            let events: Vec<Value> = (start..start + PER_BATCH).map(event).collect();
            // Not waiting for each reply keeps the pressure on.
            rt.send(
                "events.publish",
                json!({ "sessionId": sid, "runId": "race", "events": events }),
            )
            .await;
            if b % 20 == 0 {
                tokio::task::yield_now().await;
            }
        }
        // All replies, so every publish was applied.
        let mut ok = 0;
        while ok < BATCHES - EARLY {
            let f = rt.wait_for(|f| f["type"] == "reply").await;
            assert_eq!(f["payload"]["accepted"], true);
            ok += 1;
        }
        rt
    });

    let mut readers = Vec::new();
    for k in 0..8u64 {
        let token = gw.token(TokenKind::Viewer, "race", &[]);
        let url = gw.url("/v1/stream");
        readers.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(k * 7)).await;
            let mut v = Client::connect(&url, &token).await;
            // Half resume from an early offset (replay then live), half live.
            let payload = if k % 2 == 0 {
                json!({ "runId": "race", "fromOffset": k * 3 })
            } else {
                json!({ "runId": "race" })
            };
            let info = v.ok("stream.resume", payload).await;
            let start = info["startOffset"].as_u64().unwrap();
            assert_eq!(info["truncated"], false);
            // A live reader that resumes after the last publish (a fast
            // machine) starts at the end: nothing more is owed to it.
            let (offsets, gaps) = if start < TOTAL {
                collect(&mut v, "race", TOTAL).await
            } else {
                (Vec::new(), Vec::new())
            };
            assert!(gaps.is_empty(), "no gaps with a big ring: {gaps:?}");
            let expect: Vec<u64> = (start..TOTAL).collect();
            assert_eq!(offsets, expect, "reader {k} from {start}");
            start
        }));
    }
    let _rt = publisher.await.unwrap();
    let mut starts = BTreeSet::new();
    for r in readers {
        starts.insert(r.await.unwrap());
    }
    assert!(starts.len() > 1, "readers started at different offsets");
}

/// A viewer that stops reading neither slows the publisher nor makes the
/// gateway hold more than the ring: it gets a gap naming exactly what it
/// missed, then continues from the oldest kept event.
#[tokio::test]
async fn a_slow_subscriber_gets_an_exact_gap_and_never_blocks_the_publisher() {
    // ~20 MiB: far more than the socket buffers between gateway and viewer
    // can hold, so the gateway's writer is stuck long before the end.
    const TOTAL: u64 = 20_000;
    let gw = TestGateway::start_with(|c| {
        c.streams.max_events_per_run = 100;
        c.limits.outbound_queue = 8;
        // Publishes do not renew the lease, and 20 MiB may take a loaded
        // machine longer than the default 30 s: this test is about gaps.
        c.lease_ttl = Duration::from_secs(600);
    })
    .await;
    let (mut rt, sid) = runtime_on(&gw, "slow").await;
    let mut v = viewer(&gw, "slow").await;
    v.ok("stream.resume", json!({ "runId": "slow", "fromOffset": 0 }))
        .await;
    // The viewer reads nothing while all of this is published; every
    // publish is answered regardless.
    for b in 0..TOTAL / 50 {
        publish_with(&mut rt, &sid, "slow", b * 50..(b + 1) * 50, big_event).await;
    }
    let (offsets, gaps) = collect_with(&mut v, "slow", TOTAL, big_event).await;
    assert_accounted(0, TOTAL, &offsets, &gaps);
    assert!(
        !gaps.is_empty(),
        "{TOTAL} events of 1 KiB cannot all have waited in a 100-event ring, an 8-frame queue and the socket buffers"
    );
    let spec = Spec::load();
    let gap = v.seen.iter().find(|f| f["type"] == "stream.gap").unwrap();
    spec.check_push(gap).unwrap();
}

#[tokio::test]
async fn truncation_is_reported_for_old_offsets_and_other_epochs() {
    let gw = TestGateway::start_with(|c| c.streams.max_events_per_run = 5).await;
    let (mut rt, sid) = runtime_on(&gw, "t").await;
    publish(&mut rt, &sid, "t", 0..4).await;
    publish(&mut rt, &sid, "t", 4..8).await;
    let mut v = viewer(&gw, "t").await;
    let info = v
        .ok("stream.resume", json!({ "runId": "t", "fromOffset": 1 }))
        .await;
    assert_eq!(
        (
            &info["firstOffset"],
            &info["startOffset"],
            &info["truncated"]
        ),
        (&json!(3), &json!(3), &json!(true))
    );
    let epoch = info["streamEpoch"].as_str().unwrap().to_owned();
    let same = v
        .ok(
            "stream.resume",
            json!({ "runId": "t", "fromOffset": 6, "streamEpoch": epoch }),
        )
        .await;
    assert_eq!(
        (&same["startOffset"], &same["truncated"]),
        (&json!(6), &json!(false))
    );
    let other = v
        .ok(
            "stream.resume",
            json!({ "runId": "t", "fromOffset": 6, "streamEpoch": "0123456789abcdef0123456789abcdef" }),
        )
        .await;
    assert_eq!(
        (&other["startOffset"], &other["truncated"]),
        (&json!(3), &json!(true))
    );
}

#[tokio::test]
async fn runs_list_shows_covered_runs_and_their_session_state() {
    let gw = TestGateway::start().await;
    let (mut a, sid_a) = runtime_on(&gw, "team-a").await;
    publish(&mut a, &sid_a, "team-a", 0..2).await;
    let (b, _) = runtime_on(&gw, "team-b").await;
    let (_c, _) = runtime_on(&gw, "other").await;
    b.close().await;

    let mut v = viewer(&gw, "team-*").await;
    // The close is seen by the gateway shortly after; poll until detached.
    let mut runs = Value::Null;
    for _ in 0..100 {
        runs = v.ok("runs.list", json!({})).await["runs"].clone();
        if runs[1]["state"] == "detached" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let list = runs.as_array().unwrap();
    assert_eq!(list.len(), 2, "{runs}");
    assert_eq!(list[0]["runId"], "team-a");
    assert_eq!(list[0]["state"], "attached");
    assert_eq!(list[0]["nextOffset"], 2);
    assert_eq!(list[1]["runId"], "team-b");
    assert_eq!(list[1]["state"], "detached");
    let spec = Spec::load();
    for f in v.seen.iter().filter(|f| f["type"] == "reply") {
        spec.check_reply("runs.list", f).unwrap();
    }
}

#[tokio::test]
async fn a_stream_dropped_after_retention_tells_its_followers() {
    // The lease must outlast attach + publish on a busy machine (300 ms
    // did not, once, at load 8.5: SESSION_EXPIRED before the publish), and
    // its expiry, the retention and the next sweep must all fit in WAIT.
    let gw = TestGateway::start_with(|c| {
        c.heartbeat_interval = Duration::from_millis(1000);
        c.lease_ttl = Duration::from_millis(2000);
        c.streams.retention = Duration::from_millis(200);
    })
    .await;
    let (mut rt, sid) = runtime_on(&gw, "gone").await;
    publish(&mut rt, &sid, "gone", 0..2).await;
    let mut v = viewer(&gw, "gone").await;
    let info = v
        .ok("stream.resume", json!({ "runId": "gone", "fromOffset": 0 }))
        .await;
    rt.close().await;
    // Lease expiry, then retention, then the next sweep (every 2 s).
    let closed = v.push("stream.closed").await;
    assert_eq!(closed["runId"], "gone");
    assert_eq!(closed["streamEpoch"], info["streamEpoch"]);
    check_frames(&Spec::load(), &v.seen);
    // Resuming again finds a new, empty history.
    let again = v
        .ok(
            "stream.resume",
            json!({ "runId": "gone", "fromOffset": 2, "streamEpoch": info["streamEpoch"] }),
        )
        .await;
    assert_ne!(again["streamEpoch"], info["streamEpoch"]);
    assert_eq!(again["truncated"], true);
    assert_eq!(again["nextOffset"], 0);
}

#[tokio::test]
async fn a_viewer_can_follow_a_run_before_it_starts() {
    let gw = TestGateway::start().await;
    let mut v = viewer(&gw, "later").await;
    let info = v
        .ok(
            "stream.resume",
            json!({ "runId": "later", "fromOffset": 0 }),
        )
        .await;
    assert_eq!(info["nextOffset"], 0);
    // Not listed yet: nothing has run.
    assert_eq!(v.ok("runs.list", json!({})).await["runs"], json!([]));
    let (mut rt, sid) = runtime_on(&gw, "later").await;
    publish(&mut rt, &sid, "later", 0..2).await;
    let (offsets, _) = collect(&mut v, "later", 2).await;
    assert_eq!(offsets, vec![0, 1]);
    assert_eq!(
        v.ok("runs.list", json!({})).await["runs"][0]["runId"],
        "later"
    );
}

#[tokio::test]
async fn metrics_count_published_events_and_subscriptions() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = runtime_on(&gw, "m").await;
    publish(&mut rt, &sid, "m", 0..4).await;
    let mut v = viewer(&gw, "m").await;
    v.ok("stream.resume", json!({ "runId": "m" })).await;
    let text = metrics_text(&gw).await;
    assert!(
        text.contains(r#"rungate_stream_events_total{outcome="stored"} 4"#),
        "{text}"
    );
    assert!(
        text.contains(r#"rungate_stream_subscriptions{transport="websocket"} 1"#),
        "{text}"
    );
    assert!(text.contains("rungate_streams 1"), "{text}");
}

/// `GET /metrics` over a plain socket (the response has a length and the
/// connection closes after it).
async fn metrics_text(gw: &TestGateway) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut out))
        .await
        .expect("metrics in time")
        .unwrap();
    out
}

/// Where other gateways stumble: resuming at exactly the head of an idle
/// stream, then getting the first event published after a pause.
#[tokio::test]
async fn resuming_at_the_head_of_an_idle_stream_gets_the_next_event() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = runtime_on(&gw, "idle").await;
    publish(&mut rt, &sid, "idle", 0..3).await;
    let mut v = viewer(&gw, "idle").await;
    let info = v
        .ok("stream.resume", json!({ "runId": "idle", "fromOffset": 3 }))
        .await;
    assert_eq!(
        (
            &info["startOffset"],
            &info["nextOffset"],
            &info["truncated"]
        ),
        (&json!(3), &json!(3), &json!(false))
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish(&mut rt, &sid, "idle", 3..4).await;
    let (offsets, _) = collect(&mut v, "idle", 4).await;
    assert_eq!(offsets, vec![3]);
}

/// A viewer away for longer than every timeout (lease, tombstone) resumes
/// without loss as long as the offsets are still kept.
#[tokio::test]
async fn a_viewer_away_longer_than_any_timeout_resumes_without_loss() {
    let gw = TestGateway::start_with(|c| {
        c.heartbeat_interval = Duration::from_millis(1000);
        c.lease_ttl = Duration::from_millis(200);
        c.session_tombstone_ttl = Duration::from_millis(200);
    })
    .await;
    let (mut rt, sid) = runtime_on(&gw, "away").await;
    publish(&mut rt, &sid, "away", 0..5).await;
    let mut v = viewer(&gw, "away").await;
    let info = v
        .ok("stream.resume", json!({ "runId": "away", "fromOffset": 0 }))
        .await;
    let (offsets, _) = collect(&mut v, "away", 2).await;
    let seen = *offsets.last().unwrap();
    drop(v);
    publish(&mut rt, &sid, "away", 5..8).await;
    rt.close().await;
    // Lease, then tombstone, both long gone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut v = viewer(&gw, "away").await;
    let again = v
        .ok(
            "stream.resume",
            json!({ "runId": "away", "fromOffset": seen + 1, "streamEpoch": info["streamEpoch"] }),
        )
        .await;
    assert_eq!(again["truncated"], false, "{again}");
    assert_eq!(again["streamEpoch"], info["streamEpoch"]);
    let (offsets, _) = collect(&mut v, "away", 8).await;
    let expect: Vec<u64> = (seen + 1..8).collect();
    assert_eq!(offsets, expect);
    // The run is still listed, as expired.
    let runs = v.ok("runs.list", json!({})).await;
    assert_eq!(runs["runs"][0]["state"], "expired", "{runs}");
}

/// Many viewers resuming the same run at the same moment all get the whole
/// history, then the same live events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_viewers_resuming_one_run_at_once_all_see_everything() {
    const VIEWERS: usize = 64;
    let gw = TestGateway::start().await;
    let (mut rt, sid) = runtime_on(&gw, "crowd").await;
    for b in 0..20 {
        publish(&mut rt, &sid, "crowd", b * 50..(b + 1) * 50).await;
    }
    let token = gw.token(TokenKind::Viewer, "crowd", &[]);
    let url = gw.url("/v1/stream");
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(VIEWERS + 1));
    let mut viewers = Vec::new();
    for _ in 0..VIEWERS {
        let (token, url, start) = (token.clone(), url.clone(), start.clone());
        viewers.push(tokio::spawn(async move {
            let mut v = Client::connect(&url, &token).await;
            start.wait().await;
            v.ok(
                "stream.resume",
                json!({ "runId": "crowd", "fromOffset": 0 }),
            )
            .await;
            let (offsets, gaps) = collect(&mut v, "crowd", 1100).await;
            assert!(gaps.is_empty());
            assert_eq!(offsets, (0..1100).collect::<Vec<u64>>());
        }));
    }
    start.wait().await;
    publish(&mut rt, &sid, "crowd", 1000..1100).await;
    for v in viewers {
        v.await.unwrap();
    }
}

/// A peer that takes no data while frames wait for it is closed after the
/// write timeout, so it cannot pin queued frames (and the stream batches
/// they share) forever.
#[tokio::test]
async fn a_viewer_that_never_reads_is_closed_after_the_write_timeout() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut gw = TestGateway::start_with(|c| {
        c.limits.write_timeout = Duration::from_millis(500);
        c.limits.outbound_queue = 4;
    })
    .await;
    let (mut rt, sid) = runtime_on(&gw, "stuck").await;
    // A viewer with a tiny receive window that reads nothing after resuming.
    let tcp = rungate_test_support::http::connect_with_small_window(gw.addr, 4096).await;
    let mut req = gw.url("/v1/stream").into_client_request().unwrap();
    let token = gw.token(TokenKind::Viewer, "stuck", &[]);
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut stuck, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    use futures_util::SinkExt;
    stuck
        .send(tokio_tungstenite::tungstenite::Message::text(
            json!({ "id": "1", "type": "stream.resume", "payload": { "runId": "stuck" } })
                .to_string(),
        ))
        .await
        .unwrap();
    let gateway = gw.gateway.as_ref().unwrap();
    // Wait until the viewer's socket is open (runtime + viewer).
    for _ in 0..200 {
        if gateway.open_connections() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gateway.open_connections(), 2);
    // ~8 MiB the viewer never takes.
    for b in 0..160 {
        publish_with(&mut rt, &sid, "stuck", b * 50..(b + 1) * 50, big_event).await;
    }
    let mut closed = false;
    for _ in 0..1000 {
        if gateway.open_connections() == 1 {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(closed, "the stuck viewer's socket was not closed");
    // The publisher was never held up and still works.
    publish(&mut rt, &sid, "stuck", 8000..8001).await;
    drop(stuck);
    gw.drain().await;
}

//! A run's end and a viewer's stop across two `rungate serve` processes on
//! one Redis: a finish on A reaches a follower on B after every event, a
//! resume and the runs list on B say the run ended, a publish refused on
//! either node; a cancel sent to B reaches the runtime held on A, at once
//! when attached, and on reattach (to either node) when it was detached.

use std::time::Duration;

use crate::harness::*;
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use serde_json::{Value, json};

struct Pair {
    gateways: GatewaysOnRedis,
    _redis: rungate_test_support::redis::TestRedis,
}

impl Pair {
    async fn start() -> Option<Pair> {
        let redis = rungate_test_support::redis::start()?;
        let gateways = GatewaysOnRedis::spawn(&redis.url, 2, &[]).await;
        Some(Pair {
            gateways,
            _redis: redis,
        })
    }

    fn url(&self, i: usize, path: &str) -> String {
        self.gateways.node(i).url(path)
    }

    async fn runtime(&self, i: usize) -> Client {
        let token = mint(
            &self.gateways.key,
            TokenKind::Runtime,
            "*",
            &Capability::ALL,
        );
        Client::connect(&self.url(i, "/v1/runtime"), &token).await
    }

    async fn viewer(&self, i: usize, caps: &[Capability]) -> Client {
        let token = mint(&self.gateways.key, TokenKind::Viewer, "*", caps);
        Client::connect(&self.url(i, "/v1/stream"), &token).await
    }
}

async fn publish(rt: &mut Client, sid: &Value, run: &str, seqs: std::ops::Range<u64>) {
    let events: Vec<Value> = seqs
        .map(|i| json!({ "type": "log", "seq": i + 1, "data": i }))
        .collect();
    rt.ok(
        "events.publish",
        json!({ "sessionId": sid, "runId": run, "events": events }),
    )
    .await;
}

async fn until_ended(viewer: &mut Client, run: &str) -> (Vec<u64>, Value) {
    let mut offsets = Vec::new();
    loop {
        let frame = viewer
            .wait_for(|v| v.get("id").is_none() && v["payload"]["runId"] == run)
            .await;
        match frame["type"].as_str() {
            Some("stream.events") => {
                for e in frame["payload"]["events"].as_array().unwrap() {
                    offsets.push(e["offset"].as_u64().unwrap());
                }
            }
            Some("stream.ended") => return (offsets, frame["payload"].clone()),
            other => panic!("unexpected {other:?}: {frame}"),
        }
    }
}

/// Polls `runs.list` on `viewer` until `run` shows `state`.
async fn wait_state(viewer: &mut Client, run: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list = viewer.ok("runs.list", json!({})).await;
        if let Some(entry) = list["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["runId"] == run && r["state"] == state)
        {
            return entry.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{run} never showed {state}: {list}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_finish_on_a_is_seen_on_b_after_every_event() {
    let Some(pair) = Pair::start().await else {
        return;
    };
    let run = unique("end");
    let mut rt = pair.runtime(0).await;
    let sid = rt.attach(&run, "w", &[]).await["sessionId"].clone();
    let mut follower = pair.viewer(1, &[]).await;
    let info = follower
        .ok("stream.resume", json!({ "runId": run, "fromOffset": 0 }))
        .await;
    assert_eq!(info["ended"], false);
    publish(&mut rt, &sid, &run, 0..5).await;
    publish(&mut rt, &sid, &run, 5..8).await;
    let done = rt
        .ok(
            "runtime.finish",
            json!({ "sessionId": sid, "runId": run, "outcome": "failed", "message": "oom" }),
        )
        .await;
    assert_eq!(done["nextOffset"], 8);
    let (offsets, end) = until_ended(&mut follower, &run).await;
    assert_eq!(
        offsets,
        (0..8).collect::<Vec<_>>(),
        "every event, then the end"
    );
    assert_eq!(end["outcome"], "failed");
    assert_eq!(end["message"], "oom");
    assert_eq!(end["nextOffset"], 8);
    let later = follower.frames_within(Duration::from_millis(300)).await;
    assert!(later.is_empty(), "once: {later:?}");

    // On B: the list, a resume, a refused publish and re-attach.
    let mut other = pair.viewer(1, &[]).await;
    let entry = wait_state(&mut other, &run, "ended").await;
    assert_eq!(entry["outcome"], "failed");
    let info = other
        .ok("stream.resume", json!({ "runId": run, "fromOffset": 6 }))
        .await;
    assert_eq!(info["ended"], true, "{info}");
    let (offsets, again) = until_ended(&mut other, &run).await;
    assert_eq!(offsets, [6, 7]);
    assert_eq!(again, end);
    let mut rt_b = pair.runtime(1).await;
    let attach = rt_b.reattach(&run, "w", 5, &[]).await;
    assert_eq!(attach["error"]["code"], "RUN_ENDED", "{attach}");
    // The same finish again on A: the same answer; another outcome: CONFLICT.
    let again = rt
        .call(
            "runtime.finish",
            json!({ "sessionId": sid, "runId": run, "outcome": "failed" }),
        )
        .await;
    assert_eq!(again["payload"]["nextOffset"], 8, "{again}");
    let conflict = rt
        .call(
            "runtime.finish",
            json!({ "sessionId": sid, "runId": run, "outcome": "completed" }),
        )
        .await;
    assert_eq!(conflict["error"]["code"], "CONFLICT", "{conflict}");
}

#[tokio::test]
async fn a_cancel_on_b_reaches_the_runtime_on_a() {
    let Some(pair) = Pair::start().await else {
        return;
    };
    let run = unique("stop");
    let mut rt = pair.runtime(0).await;
    let sid = rt.attach(&run, "w", &[]).await["sessionId"].clone();
    let mut plain = pair.viewer(1, &[]).await;
    assert_eq!(
        plain.err("run.cancel", json!({ "runId": run })).await,
        "FORBIDDEN"
    );
    let mut ops = pair.viewer(1, &[Capability::RunCancel]).await;
    let asked = ops
        .ok("run.cancel", json!({ "runId": run, "reason": "from B" }))
        .await;
    assert_eq!(asked, json!({ "delivered": true, "ended": false }));
    let push = rt.push("run.cancelRequested").await;
    assert_eq!(push["sessionId"], sid);
    assert_eq!(push["reason"], "from B");

    // Detached on A: kept with the session, pushed on reattach on B.
    rt.close().await;
    let mut watch = pair.viewer(1, &[]).await;
    wait_state(&mut watch, &run, "detached").await;
    let asked = ops
        .ok(
            "run.cancel",
            json!({ "runId": run, "reason": "still from B" }),
        )
        .await;
    assert_eq!(asked["ended"], false);
    // The holder (A) saves it with the session: wait until B's reattach
    // would read it, by letting A's announcement land first.
    let mut back = pair.runtime(1).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let reason = loop {
        let moved = back
            .reattach(&run, "w", 1 + back.seen.len() as u64, &[])
            .await;
        assert_eq!(moved["type"], "reply", "{moved}");
        let frames = back.frames_within(Duration::from_millis(500)).await;
        if let Some(p) = frames.iter().find(|f| f["type"] == "run.cancelRequested") {
            break p["payload"]["reason"].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pending cancel after reattach: {frames:?}"
        );
    };
    assert_eq!(reason, "still from B");
    back.ok(
        "runtime.finish",
        json!({ "sessionId": sid, "runId": run, "outcome": "cancelled" }),
    )
    .await;
    let after = ops.ok("run.cancel", json!({ "runId": run })).await;
    assert_eq!(after, json!({ "delivered": false, "ended": true }));
}

//! Issue #19, hole 1: an answer larger than a socket can carry must not
//! kill the socket. Everything stored within the limits reads back (in
//! several requests if need be); what is refused is `PAYLOAD_TOO_LARGE`
//! under the request's id, and the socket goes on.

use crate::harness::*;
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use serde_json::{Value, json};

/// Stores `count` keys of `value_bytes` each in `run`, `per_set` per
/// `kv.set` (each frame within the frame limit).
async fn fill(
    rt: &mut Client,
    sid: &Value,
    run: &str,
    count: usize,
    value_bytes: usize,
    per_set: usize,
) -> Vec<String> {
    let keys: Vec<String> = (0..count).map(|i| format!("key-{i:03}")).collect();
    for chunk in keys.chunks(per_set) {
        let kv: serde_json::Map<String, Value> = chunk
            .iter()
            .map(|k| {
                (
                    k.clone(),
                    json!(format!("{k}:").repeat(value_bytes / (k.len() + 1) + 1)[..value_bytes]),
                )
            })
            .collect();
        rt.ok(
            "kv.set",
            json!({ "sessionId": sid, "runId": run, "kv": kv }),
        )
        .await;
    }
    keys
}

/// Reads `keys` back, halving a request that is refused as too large;
/// returns the values and how many refusals there were.
async fn read_back(
    rt: &mut Client,
    sid: &Value,
    run: &str,
    keys: &[String],
) -> (serde_json::Map<String, Value>, usize) {
    let mut got = serde_json::Map::new();
    let mut refused = 0;
    let mut todo = vec![keys.to_vec()];
    while let Some(batch) = todo.pop() {
        let answer = rt
            .call(
                "kv.get",
                json!({ "sessionId": sid, "runId": run, "keys": batch }),
            )
            .await;
        if answer["type"] == "reply" {
            for (k, v) in answer["payload"]["kv"].as_object().expect("kv object") {
                got.insert(k.clone(), v.clone());
            }
            continue;
        }
        let error = &answer["error"];
        assert_eq!(error["code"], "PAYLOAD_TOO_LARGE", "{answer}");
        assert_eq!(error["retryable"], false, "{answer}");
        assert!(
            error["details"]["maxReplyBytes"].as_u64().is_some(),
            "{answer}"
        );
        assert!(
            batch.len() > 1,
            "a single key must always be readable: {answer}"
        );
        refused += 1;
        let (a, b) = batch.split_at(batch.len() / 2);
        todo.push(a.to_vec());
        todo.push(b.to_vec());
    }
    (got, refused)
}

/// The case with the default limits: 64 keys × 64 KiB stored in
/// several writes, then one `kv.get` of all of them (a 4 MiB reply, over
/// the 4 MiB write buffer, which used to close the socket with 1005).
#[tokio::test]
async fn a_kv_get_too_large_for_one_reply_is_refused_and_everything_reads_back() {
    let gw = TestGateway::start().await;
    let mut rt = gw.runtime("*").await;
    let sid = rt.attach("big-1", "i", &["kv.read", "kv.write"]).await["sessionId"].clone();
    let value_bytes = 64 * 1024;
    let keys = fill(&mut rt, &sid, "big-1", 64, value_bytes, 15).await;

    let (got, refused) = read_back(&mut rt, &sid, "big-1", &keys).await;
    assert!(refused >= 1, "the 4 MiB reply is refused, not sent");
    assert_eq!(got.len(), 64, "every key reads back");
    for k in &keys {
        assert_eq!(got[k].as_str().map(str::len), Some(value_bytes), "{k}");
    }
    // The socket and its session go on.
    rt.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sid, "runId": "big-1" }),
    )
    .await;
}

/// With a small frame limit (so a small write buffer before the fix), a
/// reply of 64 × 8 KiB is within the reply limit and simply answered.
#[tokio::test]
async fn a_reply_larger_than_the_frame_limit_is_answered_whole() {
    let gw = TestGateway::start_with(|c| c.limits.max_frame_bytes = 64 * 1024).await;
    let mut rt = gw.runtime("*").await;
    let sid = rt.attach("mid-1", "i", &["kv.read", "kv.write"]).await["sessionId"].clone();
    let keys = fill(&mut rt, &sid, "mid-1", 64, 8 * 1024, 6).await;
    let answer = rt
        .call(
            "kv.get",
            json!({ "sessionId": sid, "runId": "mid-1", "keys": keys }),
        )
        .await;
    assert_eq!(
        answer["type"],
        "reply",
        "{}",
        &answer.to_string()[..200.min(answer.to_string().len())]
    );
    assert_eq!(
        answer["payload"]["kv"].as_object().map(|m| m.len()),
        Some(64)
    );
    rt.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sid, "runId": "mid-1" }),
    )
    .await;
}

/// `runs.list` for a viewer covering more runs than one frame of the
/// socket's write buffer holds (2,000 runs, ~300 KiB, with a 64 KiB frame
/// limit): every run is listed, page by page if the reply says so
/// (`nextCursor`), and the socket stays open.
#[tokio::test]
async fn runs_list_covering_many_runs_reads_every_run() {
    let gw = TestGateway::start_with(|c| {
        c.limits.max_frame_bytes = 64 * 1024;
        c.limits.max_sessions_per_socket = 500;
    })
    .await;
    const RUNS: usize = 2000;
    let mut runtimes = Vec::new();
    for s in 0..RUNS / 500 {
        let mut rt = gw.runtime("*").await;
        // Sent without waiting, then answered: 500 attaches per socket.
        let mut ids = Vec::new();
        for i in 0..500 {
            let run = format!("run-with-a-long-name-to-fill-the-list-{:05}", s * 500 + i);
            ids.push(
                rt.send(
                    "runtime.attach",
                    // The socket's first run is its main session; the others
                    // are its sub-runs, which needs subtasks.run.
                    json!({ "runId": run, "runtimeInstanceId": "i", "protocolVersion": "1",
                            "capabilities": if i == 0 { vec!["subtasks.run"] } else { vec![] } }),
                )
                .await,
            );
        }
        for id in ids {
            let answer = rt.answer(&id).await;
            assert_eq!(answer["type"], "reply", "{answer}");
        }
        runtimes.push(rt);
    }
    let token = gw.token(TokenKind::Viewer, "*", &[] as &[Capability]);
    let mut viewer = Client::connect(&gw.url("/v1/stream"), &token).await;
    let mut seen = std::collections::BTreeSet::new();
    let mut payload = json!({});
    for page in 0.. {
        assert!(page < 100, "pages end");
        let answer = viewer.call("runs.list", payload.clone()).await;
        assert_eq!(
            answer["type"],
            "reply",
            "page {page}: {}",
            &answer.to_string()[..300.min(answer.to_string().len())]
        );
        for run in answer["payload"]["runs"].as_array().expect("runs") {
            assert!(
                seen.insert(run["runId"].as_str().unwrap().to_owned()),
                "listed once: {run}"
            );
        }
        match answer["payload"]["nextCursor"].as_str() {
            Some(cursor) => payload = json!({ "cursor": cursor }),
            None => break,
        }
    }
    assert_eq!(seen.len(), RUNS);
    // Explicit pages of 300 give the same runs, once each, in order.
    let mut paged = Vec::new();
    let mut payload = json!({ "limit": 300 });
    loop {
        let answer = viewer.ok("runs.list", payload.clone()).await;
        let runs = answer["runs"].as_array().expect("runs");
        assert!(runs.len() <= 300);
        paged.extend(runs.iter().map(|r| r["runId"].as_str().unwrap().to_owned()));
        match answer["nextCursor"].as_str() {
            Some(cursor) => payload = json!({ "limit": 300, "cursor": cursor }),
            None => break,
        }
    }
    assert_eq!(paged, seen.iter().cloned().collect::<Vec<_>>());
    // A limit out of range is INVALID_PAYLOAD at its member.
    let bad = viewer.call("runs.list", json!({ "limit": 0 })).await;
    assert_eq!(bad["error"]["details"]["path"], "/payload/limit", "{bad}");
}

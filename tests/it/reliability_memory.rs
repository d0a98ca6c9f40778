//! Issue #19, hole 2: a peer that asks for large replies and never reads
//! them costs the gateway a bounded number of bytes, not memory in
//! proportion to what it asked for. Runs the real binary so its resident
//! memory can be read from `/proc`; bounds are generous and nothing depends
//! on how fast the machine is (the flood is sent in full before measuring,
//! and the measure is a peak over a window, compared to a bound far below
//! what the unbounded gateway reaches).

use std::time::Duration;

use crate::harness::*;
use rungate::auth::{AuthKey, TokenKind};
use rungate::ids::Capability;
use serde_json::json;

/// Resident memory of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("a VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

const KEYS: usize = 12;
const VALUE_BYTES: usize = 60 * 1024;
/// kv.get requests the flooder sends and never reads: unbounded, their
/// replies (~720 KiB each) would take the gateway past 400 MiB.
const FLOOD: usize = 600;
/// What the gateway's memory may grow by while flooded: far above the
/// socket's byte budget plus the write buffer, far below the unbounded
/// growth.
const MAX_GROWTH: u64 = 160 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_large_replies_costs_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    let gw = GatewayProcess::spawn(&data, &["--write-timeout-secs", "60"]).await;
    let pid = gw.pid().expect("running");
    let key = AuthKey::load_or_create(&data.join("auth.key")).expect("key");
    let token = mint(&key, TokenKind::Runtime, "*", &Capability::ALL);
    let url = gw.url("/v1/runtime");

    // The flooder's run holds KEYS values of VALUE_BYTES (within limits).
    let mut flooder = Client::connect(&url, &token).await;
    let sid = flooder
        .attach("flood-1", "f", &["kv.read", "kv.write"])
        .await["sessionId"]
        .clone();
    let keys: Vec<String> = (0..KEYS).map(|i| format!("k{i}")).collect();
    let kv: serde_json::Map<String, serde_json::Value> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let c = (b'a' + i as u8) as char;
            (k.clone(), json!(c.to_string().repeat(VALUE_BYTES)))
        })
        .collect();
    flooder
        .ok(
            "kv.set",
            json!({ "sessionId": sid, "runId": "flood-1", "kv": kv }),
        )
        .await;

    // A well-behaved runtime beside it.
    let mut good = Client::connect(&url, &token).await;
    let good_sid = good.attach("good-1", "g", &["kv.read", "kv.write"]).await["sessionId"].clone();
    good.ok(
        "kv.set",
        json!({ "sessionId": good_sid, "runId": "good-1", "kv": { "x": "1" } }),
    )
    .await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = rss_bytes(pid);

    // The flood: FLOOD kv.gets (a few hundred bytes each), replies never
    // read. Sent from a task: once the gateway applies backpressure (stops
    // reading), these sends wait, which is the point.
    let payload = json!({ "sessionId": sid, "runId": "flood-1", "keys": keys });
    let sender = tokio::spawn(async move {
        for _ in 0..FLOOD {
            flooder.send("kv.get", payload.clone()).await;
        }
        flooder
    });

    // Over a window long enough for the unbounded gateway to build every
    // reply, the peak stays bounded and the good runtime is served.
    let mut peak = baseline;
    for round in 0..40 {
        let answer = good
            .call_within(
                "kv.get",
                json!({ "sessionId": good_sid, "runId": "good-1", "keys": ["x"] }),
                Duration::from_secs(20),
            )
            .await;
        assert_eq!(
            answer["payload"]["kv"]["x"], "1",
            "round {round}: the good runtime is served: {answer}"
        );
        peak = peak.max(rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "RSS baseline {} MiB, peak {} MiB",
        baseline >> 20,
        peak >> 20
    );
    assert!(
        growth < MAX_GROWTH,
        "RSS grew by {} MiB (baseline {} MiB, peak {} MiB); the bound is {} MiB",
        growth >> 20,
        baseline >> 20,
        peak >> 20,
        MAX_GROWTH >> 20
    );
    sender.abort();
    gw.kill().await;
}

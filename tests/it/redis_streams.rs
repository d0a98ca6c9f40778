//! `--store redis://`: output streams shared by gateway processes on one
//! Redis. A runtime publishes through one gateway; a viewer of another
//! gateway resumes from offset 0, tails live, and sees every event once, in
//! order, under the same `streamEpoch`; a third gateway started afterwards
//! serves the same stream.

use crate::harness::*;
use rungate::auth::{AuthKey, TokenKind};
use rungate::ids::Capability;
use serde_json::{Value, json};

fn batch(from: u64, to: u64) -> Vec<Value> {
    (from..to)
        .map(|n| json!({ "type": "tick", "seq": n + 1, "data": { "n": n } }))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_on_another_gateway_sees_the_stream_live() {
    let Some(redis) = rungate_test_support::redis::start() else {
        return;
    };
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("auth.key");
    let key = AuthKey::load_or_create(&key_file).unwrap();
    let args = [
        "--store",
        redis.url.as_str(),
        "--auth-key-file",
        key_file.to_str().unwrap(),
    ];
    let (dir_a, dir_b, dir_c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let gw_a = GatewayProcess::spawn(dir_a.path(), &args).await;
    let gw_b = GatewayProcess::spawn(dir_b.path(), &args).await;
    let runtime_token = mint(&key, TokenKind::Runtime, "*", &Capability::ALL);
    let viewer_token = mint(&key, TokenKind::Viewer, "*", &[]);

    let mut rt = Client::connect(&gw_a.url("/v1/runtime"), &runtime_token).await;
    let sid = rt.attach("shared", "w", &[]).await["sessionId"].clone();
    let publish =
        |from, to| json!({ "sessionId": sid, "runId": "shared", "events": batch(from, to) });
    rt.ok("events.publish", publish(0, 5)).await;

    let mut viewer = Client::connect(&gw_b.url("/v1/stream"), &viewer_token).await;
    let info = viewer
        .ok(
            "stream.resume",
            json!({ "runId": "shared", "fromOffset": 0 }),
        )
        .await;
    assert_eq!(info["truncated"], false, "{info}");
    let epoch = info["streamEpoch"].clone();
    // Some or all of the first batch may already be on B; the rest is live.
    rt.ok("events.publish", publish(5, 10)).await;
    // A resend of what was stored is dropped by seq, whichever node it hits.
    rt.ok("events.publish", publish(8, 12)).await;
    let mut next = 0u64;
    while next < 12 {
        let push = viewer.push("stream.events").await;
        assert_eq!(push["streamEpoch"], epoch);
        for e in push["events"].as_array().expect("events") {
            assert_eq!(e["offset"], next, "contiguous, no duplicate");
            assert_eq!(e["event"]["data"]["n"], next);
            next += 1;
        }
    }

    let gw_c = GatewayProcess::spawn(dir_c.path(), &args).await;
    let (epoch_c, data) = read_stream(&gw_c.url("/v1/stream"), &viewer_token, "shared").await;
    assert_eq!(json!(epoch_c), epoch);
    assert_eq!(data, (0..12).map(|n| json!({ "n": n })).collect::<Vec<_>>());
    for gw in [gw_a, gw_b, gw_c] {
        assert_eq!(gw.terminate().await, Some(0));
    }
}

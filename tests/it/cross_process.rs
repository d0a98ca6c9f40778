//! Three processes that share nothing but sockets: the `rungate` binary, a
//! runtime publishing (`examples/raw_publisher.rs`), and this test as a
//! viewer that is cut off again and again and resumes each time from the
//! last offset it saw. They must agree event for event.

use std::time::Duration;

use crate::harness::*;
use rungate::auth::{AuthKey, TokenKind};
use rungate::ids::Capability;
use serde_json::{Value, json};

const COUNT: u64 = 3000;

/// What the publisher sends at offset `o` (its `seq` counts from 1).
fn published(offset: u64) -> Value {
    json!({ "type": "tick", "seq": offset + 1, "data": { "n": offset + 1 } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_cut_off_over_and_over_sees_every_event_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    let gateway = GatewayProcess::spawn(&data, &[]).await;
    let key = AuthKey::load_or_create(&data.join("auth.key")).expect("the gateway made its key");
    let runtime_token = mint(
        &key,
        TokenKind::Runtime,
        "xp-*",
        &[Capability::StreamResume],
    );
    let viewer_token = mint(&key, TokenKind::Viewer, "xp-*", &[]);

    let publisher = example_command("raw_publisher")
        .args([
            "--url",
            &gateway.url("/v1/runtime"),
            "--token",
            &runtime_token,
        ])
        .args(["--run", "xp-1", "--count", &COUNT.to_string()])
        .args(["--batch", "25", "--pause-ms", "3"])
        .kill_on_drop(true)
        .output();
    let publisher = tokio::spawn(publisher);

    let mut next: u64 = 0;
    let mut epoch: Option<Value> = None;
    let mut cuts = 0;
    while next < COUNT {
        let mut viewer = Client::connect(&gateway.url("/v1/stream"), &viewer_token).await;
        let mut resume = json!({ "runId": "xp-1", "fromOffset": next });
        if let Some(e) = &epoch {
            resume["streamEpoch"] = e.clone();
        }
        let info = viewer.ok("stream.resume", resume).await;
        assert_eq!(info["truncated"], false, "nothing was lost: {info}");
        assert_eq!(info["startOffset"], next);
        if let Some(e) = &epoch {
            assert_eq!(&info["streamEpoch"], e, "same history throughout");
        }
        epoch = Some(info["streamEpoch"].clone());

        // Read a random number of events, then cut the connection without
        // a close frame, as a network failure would.
        let budget = 1 + rand::random::<u64>() % 400;
        let mut read = 0;
        while read < budget && next < COUNT {
            let push = viewer.push("stream.events").await;
            assert_eq!(push["runId"], "xp-1");
            for e in push["events"].as_array().expect("events") {
                assert_eq!(e["offset"], next, "contiguous, no duplicate");
                assert_eq!(e["event"], published(next), "offset {next} as published");
                next += 1;
                read += 1;
            }
        }
        drop(viewer);
        cuts += 1;
    }

    let out = tokio::time::timeout(Duration::from_secs(600), publisher)
        .await
        .expect("the publisher finishes")
        .expect("join")
        .expect("cargo runs the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("published {COUNT}")),
        "publisher failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(next, COUNT);
    assert!(cuts >= 5, "the viewer was cut off {cuts} times");

    // Nothing beyond what was published, and nothing published twice.
    let mut viewer = Client::connect(&gateway.url("/v1/stream"), &viewer_token).await;
    let info = viewer
        .ok(
            "stream.resume",
            json!({ "runId": "xp-1", "fromOffset": COUNT }),
        )
        .await;
    assert_eq!(info["nextOffset"], COUNT);
    assert_eq!(info["firstOffset"], 0);
    assert_eq!(gateway.terminate().await, Some(0));
}

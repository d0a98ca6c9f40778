//! The examples, run end to end against a live gateway.

mod common;

use std::time::Duration;

use common::harness::*;
use rungate::auth::TokenKind;
use rungate::ids::Capability;

/// `cargo run --example raw_runtime` against a gateway with the shortest
/// heartbeat interval, so its three heartbeats take three seconds.
#[tokio::test]
async fn raw_runtime_attaches_works_and_reconnects() {
    let gw = TestGateway::start_with(|c| c.heartbeat_interval = Duration::from_millis(1000)).await;
    let token = gw.token(
        TokenKind::Runtime,
        "example-*",
        &[
            Capability::KvRead,
            Capability::KvWrite,
            Capability::CheckpointSave,
            Capability::CheckpointLoad,
        ],
    );
    let url = gw.url("/v1/runtime");
    // A child process, awaited without blocking the runtime the gateway
    // runs on. Cargo builds the example first if `cargo test` did not.
    let run = tokio::process::Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--quiet", "--example", "raw_runtime", "--"])
        .args(["--url", &url, "--token", &token, "--run", "example-1"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("the example finishes in time")
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "raw_runtime failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for expected in [
        "attached: run example-1, session ",
        "heartbeat every 1000 ms",
        "config: {}",
        "kv.get greeting = \"hello from raw_runtime\"",
        "checkpoint saved: ",
        "checkpoint loaded (latest): ",
        "heartbeat 1/3: accepted",
        "heartbeat 3/3: accepted",
        "reconnected on a new socket at epoch 2: same session ",
        "old socket got session.superseded: session ",
        "now at epoch 2",
        "old socket heartbeat refused: STALE_EPOCH",
        "new socket heartbeat accepted",
        "kv.get on the new socket: {\"greeting\":\"hello from raw_runtime\"}",
        "done",
    ] {
        assert!(
            stdout.contains(expected),
            "stdout lacks {expected:?}:\n{stdout}\nstderr:\n{stderr}"
        );
    }
}

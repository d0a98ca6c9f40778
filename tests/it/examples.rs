//! The examples, run end to end against a live gateway.

use std::time::Duration;

use crate::harness::*;
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
    let run = example_command("raw_runtime")
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

/// `cargo run --example NAME -- args` with a generous timeout.
async fn run_example(name: &str, args: &[&str]) -> (String, String) {
    let run = example_command(name).args(args).kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("the example finishes in time")
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{name} failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// The client-library examples together: `runtime` publishes, `tail`
/// prints what it published, and a second `runtime` run picks up its
/// progress from KV.
#[tokio::test]
async fn the_runtime_and_tail_examples_work_together() {
    let files = tempfile::tempdir().unwrap();
    let config = files.path().join("runs.toml");
    std::fs::write(
        &config,
        "[[runs]]\npattern = \"ex-*\"\n[runs.config]\nmodel = \"small\"\n[runs.secrets]\nAPI_KEY = \"s3cr3t\"\n",
    )
    .unwrap();
    let gw = TestGateway::start_with(|c| c.config_file = Some(config.clone())).await;
    let runtime_token = gw.token(TokenKind::Runtime, "ex-*", &Capability::ALL);
    let viewer_token = gw.token(TokenKind::Viewer, "ex-*", &[]);
    let url = gw.url("/v1/runtime");
    let common = ["--url", &url, "--token", &runtime_token, "--run", "ex-1"];
    let (out, _) = run_example(
        "runtime",
        &[&common[..], &["--every-ms", "20", "--count", "25"]].concat(),
    )
    .await;
    assert!(out.contains("attached ex-1: session "), "{out}");
    assert!(out.contains(r#"config: {"model":"small"}"#), "{out}");
    assert!(out.contains(r#"secrets available: ["API_KEY"]"#), "{out}");
    assert!(!out.contains("s3cr3t"), "a secret value was printed: {out}");
    assert!(out.contains("checkpoint "), "{out}");
    assert!(out.contains("published 25 steps"), "{out}");

    // A second run of the worker continues where the first stopped.
    let (out, _) = run_example(
        "runtime",
        &[&common[..], &["--every-ms", "20", "--count", "30"]].concat(),
    )
    .await;
    assert!(out.contains("resuming after 25 events"), "{out}");
    assert!(out.contains("published 30 steps"), "{out}");

    let stream = gw.url("/v1/stream");
    let (out, err) = run_example(
        "tail",
        &[
            "--url",
            &stream,
            "--token",
            &viewer_token,
            "--run",
            "ex-1",
            "--from",
            "0",
            "--count",
            "60",
        ],
    )
    .await;
    assert!(err.contains("following ex-1 from offset 0"), "{err}");
    let offsets: Vec<u64> = out
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(offsets, (0..60).collect::<Vec<u64>>(), "{out}");
    assert!(out.contains("working on item 1\""), "{out}");
}

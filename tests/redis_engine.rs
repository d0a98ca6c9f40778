//! `--store redis://`: the gateway binary keeping KV, checkpoints and
//! sessions in a real Redis. A second gateway process with an empty data
//! directory of its own (only the auth key shared) finds the run's state
//! and session there: the reconnect keeps its `sessionId`, the old epoch is
//! still fenced, and the KV and checkpoint read back.

mod common;

use common::harness::*;
use rungate::auth::{AuthKey, TokenKind};
use serde_json::json;

#[tokio::test]
async fn state_and_sessions_live_in_redis_not_in_the_process() {
    let Some(redis) = common::redis::start() else {
        return;
    };
    let store = ["--store", redis.url.as_str()];
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("auth.key");
    let key = AuthKey::load_or_create(&key_file).unwrap();
    let key_arg = key_file.to_str().unwrap();
    let token = mint(
        &key,
        TokenKind::Runtime,
        "*",
        &rungate::ids::Capability::ALL,
    );
    let caps = ["kv.read", "kv.write", "checkpoint.save", "checkpoint.load"];

    let first_dir = tempfile::tempdir().unwrap();
    let gw = GatewayProcess::spawn(
        first_dir.path(),
        &[&store[..], &["--auth-key-file", key_arg]].concat(),
    )
    .await;
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &token).await;
    let sid = rt.attach("shared-run", "w", &caps).await["sessionId"].clone();
    rt.ok(
        "kv.set",
        json!({ "sessionId": sid, "runId": "shared-run", "kv": { "step": "3" } }),
    )
    .await;
    rt.ok(
        "checkpoint.save",
        json!({ "sessionId": sid, "runId": "shared-run", "checkpointId": "c3", "data": { "at": 3 } }),
    )
    .await;
    gw.kill().await;

    let second_dir = tempfile::tempdir().unwrap();
    let gw = GatewayProcess::spawn(
        second_dir.path(),
        &[&store[..], &["--auth-key-file", key_arg]].concat(),
    )
    .await;
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &token).await;
    let stale = rt.reattach("shared-run", "w", 0, &caps).await;
    assert_eq!(stale["error"]["code"], "STALE_EPOCH", "{stale}");
    let moved = rt.reattach("shared-run", "w", 1, &caps).await;
    assert_eq!(moved["payload"]["sessionId"], sid, "{moved}");
    let kv = rt
        .ok(
            "kv.get",
            json!({ "sessionId": sid, "runId": "shared-run", "keys": ["step"] }),
        )
        .await;
    assert_eq!(kv["kv"], json!({ "step": "3" }));
    let cp = rt
        .ok(
            "checkpoint.load",
            json!({ "sessionId": sid, "runId": "shared-run" }),
        )
        .await;
    assert_eq!(
        (cp["checkpointId"].clone(), cp["data"].clone()),
        (json!("c3"), json!({ "at": 3 }))
    );
    gw.kill().await;
}

#[tokio::test]
async fn an_unreachable_redis_stops_the_gateway_at_start() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis://127.0.0.1:{port}/0");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rungate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &url,
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUNGATE_LOG", "error")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&url), "names the address: {stderr}");
}

//! The `rungate` binary as users run it: durability across restarts (clean
//! and `kill -9`), SIGTERM draining, and the `token` command.

mod common;

use std::time::Duration;

use common::harness::*;
use serde_json::json;

/// `rungate token ...` output: the token alone on one line.
fn cli_token(key_file: &std::path::Path, kind: &str, runs: &str, caps: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rungate"))
        .args(["token", "--auth-key-file"])
        .arg(key_file)
        .args([
            "--kind", kind, "--runs", runs, "--caps", caps, "--ttl", "10m",
        ])
        .output()
        .expect("run rungate token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "one line: {text:?}");
    text.trim().to_owned()
}

const CAPS: &str = "kv.read,kv.write,checkpoint.save,checkpoint.load";
const CAP_LIST: [&str; 4] = ["kv.read", "kv.write", "checkpoint.save", "checkpoint.load"];

async fn write_state(url: &str, token: &str, run: &str) {
    let mut rt = Client::connect(url, token).await;
    let sid = rt.attach(run, "inst", &CAP_LIST).await["sessionId"].clone();
    rt.ok(
        "kv.set",
        json!({ "sessionId": sid, "runId": run, "kv": { "progress": "42", "phase": "b" } }),
    )
    .await;
    rt.ok(
        "checkpoint.save",
        json!({ "sessionId": sid, "runId": run, "checkpointId": "c1", "data": { "step": 42, "nested": [1, {"a": null}] } }),
    )
    .await;
}

async fn read_state(url: &str, token: &str, run: &str) {
    let mut rt = Client::connect(url, token).await;
    // Sessions are not persisted yet: a fresh attach on the new process.
    let sid = rt.attach(run, "inst", &CAP_LIST).await["sessionId"].clone();
    let kv = rt
        .ok(
            "kv.get",
            json!({ "sessionId": sid, "runId": run, "keys": ["progress", "phase"] }),
        )
        .await;
    assert_eq!(kv["kv"], json!({ "progress": "42", "phase": "b" }));
    let cp = rt
        .ok("checkpoint.load", json!({ "sessionId": sid, "runId": run }))
        .await;
    assert_eq!(cp["checkpointId"], "c1");
    assert_eq!(
        cp["data"],
        json!({ "step": 42, "nested": [1, {"a": null}] })
    );
}

#[tokio::test]
async fn kv_and_checkpoints_survive_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let gw = GatewayProcess::spawn(&data, &[]).await;
    // The key file was created on first start; the CLI signs with it.
    let token = cli_token(&data.join("auth.key"), "runtime", "job-*", CAPS);
    write_state(&gw.url("/v1/runtime"), &token, "job-1").await;
    assert_eq!(gw.terminate().await, Some(0), "SIGTERM exits 0");

    let gw = GatewayProcess::spawn(&data, &[]).await;
    read_state(&gw.url("/v1/runtime"), &token, "job-1").await;
    assert_eq!(gw.terminate().await, Some(0));
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let gw = GatewayProcess::spawn(&data, &[]).await;
    let token = cli_token(&data.join("auth.key"), "runtime", "*", CAPS);
    write_state(&gw.url("/v1/runtime"), &token, "job-9").await;
    gw.kill().await;

    let gw = GatewayProcess::spawn(&data, &[]).await;
    read_state(&gw.url("/v1/runtime"), &token, "job-9").await;
    gw.kill().await;
}

#[tokio::test]
async fn sigterm_drains_sockets_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let gw = GatewayProcess::spawn(&data, &["--reconnect-after-ms", "300"]).await;
    let token = cli_token(&data.join("auth.key"), "runtime", "*", CAPS);
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &token).await;
    let sid = rt.attach("drain-1", "inst", &CAP_LIST).await["sessionId"].clone();
    // A write in flight when the signal lands is still answered.
    let id = rt
        .send(
            "kv.set",
            json!({ "sessionId": sid, "runId": "drain-1", "kv": { "k": "v" } }),
        )
        .await;
    let exit = tokio::spawn(gw.terminate());
    let answer = rt.answer(&id).await;
    assert_eq!(answer["type"], "reply", "{answer}");
    let draining = rt.push("gateway.draining").await;
    assert_eq!(draining, json!({ "reconnectAfterMs": 300 }));
    let rest = rt.until_closed().await;
    assert!(rest.iter().all(|f| f["type"] != "error"), "{rest:?}");
    assert_eq!(exit.await.unwrap(), Some(0));
}

#[tokio::test]
async fn draining_refuses_new_sessions_and_reports_not_ready() {
    let mut gw = TestGateway::start_with(|c| c.reconnect_after = Duration::from_millis(1500)).await;
    let mut rt = gw.runtime("*").await;
    rt.attach("d-1", "inst", &[]).await;
    let addr = gw.addr;
    let gateway = gw.gateway.take().unwrap();
    let drained = tokio::spawn(gateway.drain());
    rt.push("gateway.draining").await;
    let code = rt
        .err(
            "runtime.attach",
            json!({ "runId": "d-2", "runtimeInstanceId": "inst", "protocolVersion": "1" }),
        )
        .await;
    assert_eq!(code, "DRAINING");
    // Still listening while draining: readiness says no, upgrades are refused.
    let body = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /readyz HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(body.starts_with("HTTP/1.1 503"), "{body}");
    let frames = rt.until_closed().await;
    assert!(frames.iter().all(|f| f["type"] != "error"), "{frames:?}");
    drained.await.unwrap().expect("drain flushes");
}

//! The `rungate` binary as users run it: durability across restarts (clean
//! and `kill -9`) of state and sessions, SIGTERM draining, and the `token`
//! command.

use std::time::Duration;

use crate::harness::*;
use serde_json::{Value, json};

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

/// Attaches `run` (at epoch 0), writes KV and a checkpoint; returns the
/// session id.
async fn write_state(url: &str, token: &str, run: &str) -> serde_json::Value {
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
    sid
}

/// On a restarted gateway: the session `sid` is still there, fenced at its
/// epoch, and takes a reconnect at a higher one; the state reads back.
async fn read_state(url: &str, token: &str, run: &str, sid: &serde_json::Value) {
    let mut rt = Client::connect(url, token).await;
    // A fresh attach would steal a live session: refused.
    let taken = rt
        .err(
            "runtime.attach",
            json!({ "runId": run, "runtimeInstanceId": "inst", "protocolVersion": "1", "capabilities": CAP_LIST }),
        )
        .await;
    assert_eq!(taken, "CONFLICT");
    // The epoch it had before the restart still fences.
    let stale = rt.reattach(run, "inst", 0, &CAP_LIST).await;
    assert_eq!(stale["error"]["code"], "STALE_EPOCH", "{stale}");
    assert_eq!(stale["error"]["details"]["currentEpoch"], 0, "{stale}");
    let moved = rt.reattach(run, "inst", 1, &CAP_LIST).await;
    assert_eq!(moved["payload"]["sessionId"], *sid, "same session: {moved}");
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
    let sid = write_state(&gw.url("/v1/runtime"), &token, "job-1").await;
    assert_eq!(gw.terminate().await, Some(0), "SIGTERM exits 0");

    let gw = GatewayProcess::spawn(&data, &[]).await;
    read_state(&gw.url("/v1/runtime"), &token, "job-1", &sid).await;
    assert_eq!(gw.terminate().await, Some(0));
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let gw = GatewayProcess::spawn(&data, &[]).await;
    let token = cli_token(&data.join("auth.key"), "runtime", "*", CAPS);
    let sid = write_state(&gw.url("/v1/runtime"), &token, "job-9").await;
    gw.kill().await;

    let gw = GatewayProcess::spawn(&data, &[]).await;
    read_state(&gw.url("/v1/runtime"), &token, "job-9", &sid).await;
    gw.kill().await;
}

/// A reconnect, a heartbeat and a sub-run made just before `kill -9` are
/// all there after it: the sub-run moves with its main session.
#[tokio::test]
async fn session_moves_and_sub_runs_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let gw = GatewayProcess::spawn(&data, &[]).await;
    let token = cli_token(&data.join("auth.key"), "runtime", "*", "subtasks.run");
    let url = gw.url("/v1/runtime");
    let mut first = Client::connect(&url, &token).await;
    first.attach("main", "w", &["subtasks.run"]).await;
    // Moved to a second socket at epoch 7; its sub-run attached there.
    let mut second = Client::connect(&url, &token).await;
    let main = second.reattach("main", "w", 7, &["subtasks.run"]).await;
    let main_sid = main["payload"]["sessionId"].clone();
    let sub = second.attach("sub", "w", &[]).await;
    let sub_sid = sub["sessionId"].clone();
    gw.kill().await;

    let gw = GatewayProcess::spawn(&data, &[]).await;
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &token).await;
    let stale = rt.reattach("main", "w", 7, &["subtasks.run"]).await;
    assert_eq!(stale["error"]["code"], "STALE_EPOCH", "{stale}");
    let main = rt.reattach("main", "w", 8, &["subtasks.run"]).await;
    assert_eq!(main["payload"]["sessionId"], main_sid, "{main}");
    rt.ok(
        "runtime.recoverConnections",
        json!({ "sessionId": main_sid, "mainRunId": "main", "connectionEpoch": 8 }),
    )
    .await;
    rt.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sub_sid, "runId": "sub" }),
    )
    .await;
    gw.kill().await;
}

/// A lease that ran out while the gateway was down is expired when it
/// starts: the reconnect is told `SESSION_EXPIRED`, a fresh attach works.
#[tokio::test]
async fn a_lease_that_ran_out_while_down_expires_on_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // 1 s heartbeats, 1.5 s leases: with the restore slack (a lease plus
    // 2 s), 8 s down is well past the deadline however slow the machine.
    let short = ["--heartbeat-interval-ms", "1000", "--lease-ttl-ms", "1500"];
    let gw = GatewayProcess::spawn(&data, &short).await;
    let token = cli_token(&data.join("auth.key"), "runtime", "*", CAPS);
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &token).await;
    let old = rt.attach("late", "w", &[]).await["sessionId"].clone();
    gw.kill().await;
    tokio::time::sleep(Duration::from_secs(8)).await;

    let gw = GatewayProcess::spawn(&data, &short).await;
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &token).await;
    let late = rt.reattach("late", "w", 1, &[]).await;
    assert_eq!(late["error"]["code"], "SESSION_EXPIRED", "{late}");
    let fresh = rt.attach("late", "w", &[]).await;
    assert_ne!(fresh["sessionId"], old);
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

async fn publish_n(rt: &mut Client, sid: &Value, range: std::ops::Range<u64>) {
    let events: Vec<Value> = range
        .map(|n| json!({ "type": "n", "seq": n + 1, "data": n }))
        .collect();
    rt.ok(
        "events.publish",
        json!({ "sessionId": sid, "runId": "tailed", "events": events }),
    )
    .await;
}

/// A dashboard in another process (the `tail` example, built on
/// `ViewerClient`) follows a run while the gateway is killed and restarted
/// on the same address: it resumes from its last offset and prints every
/// event once, in order, with no note of lost history; the runtime keeps
/// its session across the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_process_resumes_across_a_kill_9_restart() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let gw = GatewayProcess::spawn(&data, &[]).await;
    let addr = gw.addr.to_string();
    let runtime_token = cli_token(&data.join("auth.key"), "runtime", "*", CAPS);
    let viewer_token = cli_token(&data.join("auth.key"), "viewer", "tailed", "");
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &runtime_token).await;
    let sid = rt.attach("tailed", "w", &[]).await["sessionId"].clone();
    publish_n(&mut rt, &sid, 0..50).await;

    let mut tail = example_command("tail")
        .args(["--url", &gw.url("/v1/stream"), "--token", &viewer_token])
        .args(["--run", "tailed", "--from", "0", "--count", "100"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the tail example");
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let mut read_until = async |printed: &mut Vec<String>, n: usize| {
        while printed.len() < n {
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("tail prints in time")
                .expect("read tail's stdout")
                .expect("tail still running");
            printed.push(line);
        }
    };
    read_until(&mut printed, 50).await;

    gw.kill().await;
    let gw = GatewayProcess::spawn(&data, &["--listen", &addr]).await;
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &runtime_token).await;
    let moved = rt.reattach("tailed", "w", 1, &[]).await;
    assert_eq!(moved["payload"]["sessionId"], sid, "{moved}");
    publish_n(&mut rt, &sid, 50..100).await;
    read_until(&mut printed, 100).await;

    let out = tokio::time::timeout(WAIT, tail.wait_with_output())
        .await
        .expect("tail stops after --count events")
        .expect("wait for tail");
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (n, line) in printed.iter().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            fields,
            [n.to_string(), "n".into(), n.to_string()],
            "{line}\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("history before it is gone") && !stderr.contains("missed offsets"),
        "{stderr}"
    );
    assert!(
        stderr.matches("following tailed from offset").count() >= 2,
        "it resumed after the restart: {stderr}"
    );
    gw.kill().await;
}

//! A run's end across restarts of the `rungate` binary (`kill -9`): a
//! restart between publish and finish loses nothing of the run, and one
//! between finish and resume keeps its end (durable log and session store),
//! with the tokens minted by `rungate token` (including `--caps run.cancel`)
//! and a pending cancel that survives the restart too.

use crate::harness::*;
use serde_json::{Value, json};

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
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn publish(rt: &mut Client, sid: &Value, run: &str, seqs: std::ops::Range<u64>) {
    let events: Vec<Value> = seqs
        .map(|i| json!({ "type": "log", "seq": i, "data": i }))
        .collect();
    rt.ok(
        "events.publish",
        json!({ "sessionId": sid, "runId": run, "events": events }),
    )
    .await;
}

/// Offsets delivered for `run` until `stream.ended`, and its payload.
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

#[tokio::test]
async fn the_end_survives_restarts_before_and_after_the_finish() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    let gw = GatewayProcess::spawn(&data, &[]).await;
    let addr = gw.addr.to_string();
    let key = data.join("auth.key");
    let runtime = cli_token(&key, "runtime", "*", "");
    let viewer = cli_token(&key, "viewer", "*", "");
    let stopper = cli_token(&key, "viewer", "proc-*", "run.cancel");

    let mut rt = Client::connect(&gw.url("/v1/runtime"), &runtime).await;
    let sid = rt.attach("proc-1", "w", &[]).await["sessionId"].clone();
    publish(&mut rt, &sid, "proc-1", 0..4).await;
    let (_, before) = read_stream(&gw.url("/v1/stream"), &viewer, "proc-1").await;
    assert_eq!(before.len(), 4);

    // Restart between publish and finish.
    gw.kill().await;
    let gw = GatewayProcess::spawn(&data, &["--listen", &addr]).await;
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &runtime).await;
    let moved = rt.reattach("proc-1", "w", 1, &[]).await;
    assert_eq!(moved["payload"]["sessionId"], sid, "{moved}");
    // A viewer's stop, while the runtime holds it: then the runtime stops.
    let mut ops = Client::connect(&gw.url("/v1/stream"), &stopper).await;
    let asked = ops
        .ok("run.cancel", json!({ "runId": "proc-1", "reason": "r" }))
        .await;
    assert_eq!(asked["delivered"], true);
    assert_eq!(rt.push("run.cancelRequested").await["reason"], "r");
    publish(&mut rt, &sid, "proc-1", 4..6).await;
    let finished = rt
        .ok(
            "runtime.finish",
            json!({ "sessionId": sid, "runId": "proc-1", "outcome": "cancelled" }),
        )
        .await;
    assert_eq!(finished["nextOffset"], 6);

    // Restart between finish and resume.
    gw.kill().await;
    let gw = GatewayProcess::spawn(&data, &["--listen", &addr]).await;
    let mut late = Client::connect(&gw.url("/v1/stream"), &viewer).await;
    let info = late
        .ok(
            "stream.resume",
            json!({ "runId": "proc-1", "fromOffset": 0 }),
        )
        .await;
    assert_eq!(info["ended"], true, "{info}");
    let (offsets, end) = until_ended(&mut late, "proc-1").await;
    assert_eq!(
        offsets,
        (0..6).collect::<Vec<_>>(),
        "nothing lost, in order"
    );
    assert_eq!(end["outcome"], "cancelled");
    assert_eq!(end["nextOffset"], 6);
    // The run id stays closed, and the session is not back.
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &runtime).await;
    let again = rt.reattach("proc-1", "w", 2, &[]).await;
    assert_eq!(again["error"]["code"], "RUN_ENDED", "{again}");
    let fresh = rt
        .call(
            "runtime.attach",
            json!({ "runId": "proc-1", "runtimeInstanceId": "w2", "protocolVersion": "1" }),
        )
        .await;
    assert_eq!(fresh["error"]["code"], "RUN_ENDED", "{fresh}");
    let list = late.ok("runs.list", json!({})).await;
    let entry = list["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["runId"] == "proc-1")
        .cloned()
        .expect("listed");
    assert_eq!(entry["state"], "ended", "{list}");
    assert_eq!(entry["outcome"], "cancelled");
    let mut ops = Client::connect(&gw.url("/v1/stream"), &stopper).await;
    let after = ops.ok("run.cancel", json!({ "runId": "proc-1" })).await;
    assert_eq!(after, json!({ "delivered": false, "ended": true }));
    gw.kill().await;
}

#[tokio::test]
async fn a_pending_cancel_survives_a_restart_of_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    let gw = GatewayProcess::spawn(&data, &[]).await;
    let addr = gw.addr.to_string();
    let key = data.join("auth.key");
    let runtime = cli_token(&key, "runtime", "*", "");
    let stopper = cli_token(&key, "viewer", "*", "run.cancel");
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &runtime).await;
    let sid = rt.attach("proc-2", "w", &[]).await["sessionId"].clone();
    rt.close().await;
    let mut ops = Client::connect(&gw.url("/v1/stream"), &stopper).await;
    let mut asked = Value::Null;
    // The gateway learns of the closed socket a moment later.
    for _ in 0..100 {
        asked = ops
            .ok("run.cancel", json!({ "runId": "proc-2", "reason": "kept" }))
            .await;
        if asked["delivered"] == false {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(asked, json!({ "delivered": false, "ended": false }));

    gw.kill().await;
    let gw = GatewayProcess::spawn(&data, &["--listen", &addr]).await;
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &runtime).await;
    let moved = rt.reattach("proc-2", "w", 1, &[]).await;
    assert_eq!(moved["payload"]["sessionId"], sid, "{moved}");
    let push = rt.push("run.cancelRequested").await;
    assert_eq!(push["reason"], "kept");
    assert_eq!(push["sessionId"], sid);
    gw.kill().await;
}

//! `--store redis://`: the gateway binary keeping KV, checkpoints and
//! sessions in a real Redis. A second gateway process with an empty data
//! directory of its own (only the auth key shared) finds the run's state
//! and session there: the reconnect keeps its `sessionId`, the old epoch is
//! still fenced, and the KV and checkpoint read back.

use crate::harness::*;
use rungate::auth::{AuthKey, TokenKind};
use serde_json::json;

#[tokio::test]
async fn state_and_sessions_live_in_redis_not_in_the_process() {
    let Some(redis) = rungate_test_support::redis::start() else {
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

/// Two gateways in this process on one Redis, sharing one auth key (each
/// with its own data dir, as two machines would have).
async fn two_gateways(
    redis: &rungate_test_support::redis::TestRedis,
    lease: std::time::Duration,
) -> (TestGateway, TestGateway, AuthKey, tempfile::TempDir) {
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("auth.key");
    let key = AuthKey::load_or_create(&key_file).unwrap();
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let (url, key_file) = (redis.url.clone(), key_file.clone());
        gateways.push(
            TestGateway::start_with(move |c| {
                c.store = rungate::config::StoreKind::Redis { url };
                c.auth_key_file = key_file;
                c.lease_ttl = lease;
            })
            .await,
        );
    }
    let b = gateways.pop().unwrap();
    let a = gateways.pop().unwrap();
    (a, b, key, key_dir)
}

/// The frames a socket gets within `quiet` of each other, until it goes
/// quiet (for counting pushes that must come exactly once).
async fn frames_until_quiet(
    client: &mut Client,
    quiet: std::time::Duration,
) -> Vec<serde_json::Value> {
    let mut frames = Vec::new();
    while let Ok(text) = tokio::time::timeout(quiet, client.next_text()).await {
        frames.push(serde_json::from_str(&text).unwrap());
    }
    frames
}

/// A reconnect at a newer epoch on the other gateway takes the session
/// over: same `sessionId`, the old socket is told `session.superseded` and
/// is fenced with `STALE_EPOCH`; a fresh attach of the run anywhere is
/// `CONFLICT`. When the lease then runs out, exactly one socket hears
/// `session.expired`, once, and a late reconnect on either gateway is
/// `SESSION_EXPIRED`.
#[tokio::test]
async fn a_session_moves_between_gateways_and_expires_once() {
    let Some(redis) = rungate_test_support::redis::start() else {
        return;
    };
    let lease = std::time::Duration::from_secs(3);
    let (a, b, key, _key_dir) = two_gateways(&redis, lease).await;
    let token = mint(
        &key,
        TokenKind::Runtime,
        "*",
        &rungate::ids::Capability::ALL,
    );
    let caps = ["kv.read", "kv.write"];

    let mut on_a = Client::connect(&a.url("/v1/runtime"), &token).await;
    let first = on_a.reattach("moving-run", "w", 1, &caps).await;
    assert_eq!(
        first["error"]["code"], "SESSION_EXPIRED",
        "nothing to reconnect to yet: {first}"
    );
    let attached = on_a
        .ok(
            "runtime.attach",
            json!({ "runId": "moving-run", "runtimeInstanceId": "w", "protocolVersion": "1",
                    "connectionEpoch": 1, "capabilities": caps }),
        )
        .await;
    let sid = attached["sessionId"].clone();
    let heartbeat = json!({ "sessionId": sid, "runId": "moving-run" });

    let mut on_b = Client::connect(&b.url("/v1/runtime"), &token).await;
    let same_epoch = on_b.reattach("moving-run", "w", 1, &caps).await;
    assert_eq!(same_epoch["error"]["code"], "STALE_EPOCH", "{same_epoch}");
    assert_eq!(
        on_b.err(
            "runtime.attach",
            json!({ "runId": "moving-run", "runtimeInstanceId": "w", "protocolVersion": "1", "capabilities": caps }),
        )
        .await,
        "CONFLICT",
        "the run is live on the other gateway"
    );
    let moved = on_b.reattach("moving-run", "w", 2, &caps).await;
    assert_eq!(moved["payload"]["sessionId"], sid, "{moved}");

    let superseded = on_a.push("session.superseded").await;
    assert_eq!(superseded["sessionId"], sid);
    assert_eq!(superseded["connectionEpoch"], 2);
    let metrics = rungate_test_support::http::get(a.addr, "/metrics", &[])
        .await
        .text()
        .await;
    assert!(
        metrics.contains("rungate_session_handovers_total{way=\"lost\"} 1"),
        "A counts the session it lost: {metrics}"
    );
    assert_eq!(
        on_a.err("runtime.heartbeat", heartbeat.clone()).await,
        "STALE_EPOCH"
    );
    on_b.ok("runtime.heartbeat", heartbeat.clone()).await;
    on_b.ok(
        "kv.set",
        json!({ "sessionId": sid, "runId": "moving-run", "kv": { "k": "from-b" } }),
    )
    .await;

    // A dashboard on A sees the run as the gateway holding it does; a run
    // whose runtime left B is detached.
    let viewer_token = mint(&key, TokenKind::Viewer, "*", &[]);
    let mut dashboard = Client::connect(&a.url("/v1/stream"), &viewer_token).await;
    assert_eq!(run_state(&mut dashboard, "moving-run").await, "attached");
    let mut leaving = Client::connect(&b.url("/v1/runtime"), &token).await;
    leaving.attach("left-run", "w2", &caps).await;
    // A learns of the new run's stream from Redis a moment later.
    wait_state(&mut dashboard, "left-run", "attached").await;
    leaving.close().await;
    wait_state(&mut dashboard, "left-run", "detached").await;

    // The lease runs out on B (no more heartbeats): one expiry, on B's socket.
    let expired = on_b.push("session.expired").await;
    assert_eq!(expired["sessionId"], sid);
    let quiet = lease * 2;
    let (rest_a, rest_b) = tokio::join!(
        frames_until_quiet(&mut on_a, quiet),
        frames_until_quiet(&mut on_b, quiet)
    );
    let more: Vec<_> = rest_a
        .iter()
        .chain(rest_b.iter())
        .filter(|f| f["type"] == "session.expired")
        .collect();
    assert!(more.is_empty(), "session.expired once, not again: {more:?}");
    assert_eq!(run_state(&mut dashboard, "moving-run").await, "expired");
    for gateway in [&a, &b] {
        let mut late = Client::connect(&gateway.url("/v1/runtime"), &token).await;
        let answer = late.reattach("moving-run", "w", 3, &caps).await;
        assert_eq!(answer["error"]["code"], "SESSION_EXPIRED", "{answer}");
    }
}

/// The `state` `runs.list` gives `run` (`"none"` when it is not listed).
async fn run_state(viewer: &mut Client, run: &str) -> String {
    let list = viewer.ok("runs.list", json!({})).await;
    list["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["runId"] == run)
        .map_or("none".into(), |r| r["state"].as_str().unwrap().to_owned())
}

/// Polls `runs.list` until `run` is in `state`.
async fn wait_state(viewer: &mut Client, run: &str, state: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = run_state(viewer, run).await;
        if now == state {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{run} is {now}, not {state}, after {WAIT:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `recoverConnections` on another gateway moves the sub-runs the old one
/// held, named or not: the old socket hears `session.superseded` for each,
/// and they work on the new socket.
#[tokio::test]
async fn sub_runs_follow_their_main_session_to_another_gateway() {
    let Some(redis) = rungate_test_support::redis::start() else {
        return;
    };
    let (a, b, key, _key_dir) = two_gateways(&redis, std::time::Duration::from_secs(30)).await;
    let token = mint(
        &key,
        TokenKind::Runtime,
        "*",
        &rungate::ids::Capability::ALL,
    );
    for named in [false, true] {
        let (main_run, subs) = if named {
            ("main-named", ["named-a", "named-b"])
        } else {
            ("main-all", ["all-a", "all-b"])
        };
        let mut on_a = Client::connect(&a.url("/v1/runtime"), &token).await;
        let main = on_a
            .ok(
                "runtime.attach",
                json!({ "runId": main_run, "runtimeInstanceId": "w", "protocolVersion": "1",
                        "connectionEpoch": 1, "capabilities": ["subtasks.run", "kv.write"] }),
            )
            .await;
        let mut sub_sessions = Vec::new();
        for sub in subs {
            let attached = on_a
                .ok(
                    "runtime.attach",
                    json!({ "runId": sub, "runtimeInstanceId": "w", "protocolVersion": "1",
                            "connectionEpoch": 1, "capabilities": ["kv.write"] }),
                )
                .await;
            sub_sessions.push(attached["sessionId"].clone());
        }
        let mut on_b = Client::connect(&b.url("/v1/runtime"), &token).await;
        let moved = on_b
            .reattach(main_run, "w", 2, &["subtasks.run", "kv.write"])
            .await;
        assert_eq!(moved["payload"]["sessionId"], main["sessionId"], "{moved}");
        let mut recover = json!({ "sessionId": main["sessionId"], "mainRunId": main_run,
                                  "connectionEpoch": 2 });
        if named {
            recover["subRunIds"] = json!(subs);
        }
        on_b.ok("runtime.recoverConnections", recover).await;
        let mut superseded = Vec::new();
        for _ in 0..3 {
            let push = on_a.push("session.superseded").await;
            superseded.push(push["runId"].as_str().unwrap().to_owned());
        }
        superseded.sort();
        let mut expected = vec![main_run.to_owned(), subs[0].to_owned(), subs[1].to_owned()];
        expected.sort();
        assert_eq!(superseded, expected, "named: {named}");
        for (sub, sid) in subs.iter().zip(&sub_sessions) {
            let write = json!({ "sessionId": sid, "runId": sub, "kv": { "k": "v" } });
            on_b.ok("kv.set", write.clone()).await;
            assert_eq!(on_a.err("kv.set", write).await, "STALE_EPOCH");
        }
    }
}

//! PROTOCOL.md §3 over real sockets: one test per rule.

use std::time::Duration;

use crate::harness::*;
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use serde_json::json;

#[tokio::test]
async fn fresh_attach_returns_a_session_and_a_lease() {
    let gw = TestGateway::start().await;
    let mut rt = gw.runtime("run-*").await;
    let reply = rt.attach("run-1", "inst-1", &[]).await;
    let sid = reply["sessionId"].as_str().unwrap();
    assert_eq!(sid.len(), 32);
    assert_eq!(reply["runId"], "run-1");
    assert_eq!(reply["heartbeatIntervalMs"], 10_000);
    assert!(reply["leaseExpiresAt"].as_str().unwrap().ends_with('Z'));
    assert!(reply["configVersion"].is_string());
    let hb = rt
        .ok(
            "runtime.heartbeat",
            json!({ "sessionId": sid, "runId": "run-1" }),
        )
        .await;
    assert_eq!(hb["accepted"], true);
    assert!(hb["nextHeartbeatDueAt"].is_string());
}

#[tokio::test]
async fn a_second_fresh_attach_of_a_live_run_is_conflict() {
    let gw = TestGateway::start().await;
    let mut a = gw.runtime("run-*").await;
    a.attach("run-1", "inst-1", &[]).await;
    let mut b = gw.runtime("run-*").await;
    let code = b
        .err(
            "runtime.attach",
            json!({ "runId": "run-1", "runtimeInstanceId": "inst-1", "protocolVersion": "1" }),
        )
        .await;
    assert_eq!(code, "CONFLICT");
}

#[tokio::test]
async fn reconnect_with_a_higher_epoch_moves_the_session_and_fences_the_old_socket() {
    let gw = TestGateway::start().await;
    let mut old = gw.runtime("run-*").await;
    let first = old
        .ok(
            "runtime.attach",
            json!({ "runId": "run-1", "runtimeInstanceId": "inst-1", "protocolVersion": "1", "connectionEpoch": 1 }),
        )
        .await;
    let sid = first["sessionId"].clone();

    let mut new = gw.runtime("run-*").await;
    let moved = new.reattach("run-1", "inst-1", 2, &[]).await;
    assert_eq!(moved["type"], "reply", "{moved}");
    assert_eq!(
        moved["payload"]["sessionId"], sid,
        "a reconnect keeps the session id"
    );

    let pushed = old.push("session.superseded").await;
    assert_eq!(
        pushed,
        json!({ "sessionId": sid, "runId": "run-1", "connectionEpoch": 2 })
    );
    let code = old
        .err(
            "runtime.heartbeat",
            json!({ "sessionId": sid, "runId": "run-1" }),
        )
        .await;
    assert_eq!(code, "STALE_EPOCH");
    new.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sid, "runId": "run-1" }),
    )
    .await;
}

#[tokio::test]
async fn reconnect_with_an_equal_or_lower_epoch_is_stale() {
    let gw = TestGateway::start().await;
    let mut a = gw.runtime("run-*").await;
    a.ok(
        "runtime.attach",
        json!({ "runId": "run-1", "runtimeInstanceId": "inst-1", "protocolVersion": "1", "connectionEpoch": 5 }),
    )
    .await;
    let mut b = gw.runtime("run-*").await;
    for epoch in [5, 4, 0] {
        let answer = b.reattach("run-1", "inst-1", epoch, &[]).await;
        assert_eq!(
            answer["error"]["code"], "STALE_EPOCH",
            "epoch {epoch}: {answer}"
        );
        assert_eq!(answer["error"]["details"]["currentEpoch"], 5);
    }
}

#[tokio::test]
async fn reconnect_by_another_instance_is_conflict_and_of_an_unknown_run_is_expired() {
    let gw = TestGateway::start().await;
    let mut a = gw.runtime("run-*").await;
    a.attach("run-1", "inst-1", &[]).await;
    let mut b = gw.runtime("run-*").await;
    let answer = b.reattach("run-1", "inst-2", 9, &[]).await;
    assert_eq!(answer["error"]["code"], "CONFLICT");
    let answer = b.reattach("run-never", "inst-2", 9, &[]).await;
    assert_eq!(answer["error"]["code"], "SESSION_EXPIRED");
}

#[tokio::test]
async fn a_closed_socket_keeps_its_session_for_a_reconnect() {
    let gw = TestGateway::start().await;
    let mut a = gw.runtime("run-*").await;
    let sid = a.attach("run-1", "inst-1", &[]).await["sessionId"].clone();
    a.close().await;
    let mut b = gw.runtime("run-*").await;
    let moved = b.reattach("run-1", "inst-1", 1, &[]).await;
    assert_eq!(moved["payload"]["sessionId"], sid);
}

#[tokio::test]
async fn a_lease_without_heartbeats_expires_and_the_socket_is_told() {
    let gw = TestGateway::start_with(|c| c.lease_ttl = Duration::from_millis(300)).await;
    let mut rt = gw.runtime("run-*").await;
    let sid = rt.attach("run-1", "inst-1", &[]).await["sessionId"].clone();
    let pushed = rt.push("session.expired").await;
    assert_eq!(pushed, json!({ "sessionId": sid, "runId": "run-1" }));
    let code = rt
        .err(
            "runtime.heartbeat",
            json!({ "sessionId": sid, "runId": "run-1" }),
        )
        .await;
    assert_eq!(code, "SESSION_EXPIRED");
    let answer = rt.reattach("run-1", "inst-1", 1, &[]).await;
    assert_eq!(answer["error"]["code"], "SESSION_EXPIRED");
    // A fresh attach starts over with a new session.
    let again = rt.attach("run-1", "inst-1", &[]).await;
    assert_ne!(again["sessionId"], sid);
}

#[tokio::test]
async fn heartbeats_keep_a_short_lease_alive() {
    let gw = TestGateway::start_with(|c| c.lease_ttl = Duration::from_millis(1500)).await;
    let mut rt = gw.runtime("run-*").await;
    let sid = rt.attach("run-1", "inst-1", &[]).await["sessionId"].clone();
    // Heartbeat at a third of the TTL for well past the TTL.
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rt.ok(
            "runtime.heartbeat",
            json!({ "sessionId": sid, "runId": "run-1" }),
        )
        .await;
    }
}

#[tokio::test]
async fn a_detached_session_expires_when_nobody_reconnects() {
    let gw = TestGateway::start_with(|c| c.lease_ttl = Duration::from_millis(300)).await;
    let mut a = gw.runtime("run-*").await;
    a.attach("run-1", "inst-1", &[]).await;
    a.close().await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let mut b = gw.runtime("run-*").await;
    let answer = b.reattach("run-1", "inst-1", 1, &[]).await;
    assert_eq!(answer["error"]["code"], "SESSION_EXPIRED");
}

async fn attach_family(gw: &TestGateway) -> (Client, serde_json::Value) {
    let mut rt = gw.runtime("*").await;
    let main = rt
        .ok(
            "runtime.attach",
            json!({ "runId": "main", "runtimeInstanceId": "inst", "protocolVersion": "1",
                    "connectionEpoch": 1, "capabilities": ["subtasks.run"] }),
        )
        .await;
    for sub in ["sub-a", "sub-b"] {
        rt.ok(
            "runtime.attach",
            json!({ "runId": sub, "runtimeInstanceId": "inst", "protocolVersion": "1", "connectionEpoch": 1 }),
        )
        .await;
    }
    (rt, main)
}

#[tokio::test]
async fn sub_runs_need_subtasks_run_on_the_main_session() {
    let gw = TestGateway::start().await;
    let mut rt = gw.runtime("*").await;
    rt.attach("lonely-main", "inst", &[]).await;
    let code = rt
        .err(
            "runtime.attach",
            json!({ "runId": "sub", "runtimeInstanceId": "inst", "protocolVersion": "1" }),
        )
        .await;
    assert_eq!(code, "FORBIDDEN");
    // With subtasks.run the same shape works (attach_family asserts it).
    let (_rt, _main) = attach_family(&gw).await;
}

#[tokio::test]
async fn recover_connections_moves_every_sub_run() {
    let gw = TestGateway::start().await;
    let (mut old, main) = attach_family(&gw).await;
    let sid = main["sessionId"].clone();
    let mut new = gw.runtime("*").await;
    let moved = new.reattach("main", "inst", 2, &["subtasks.run"]).await;
    assert_eq!(moved["type"], "reply");
    new.ok(
        "runtime.recoverConnections",
        json!({ "sessionId": sid, "mainRunId": "main", "connectionEpoch": 2 }),
    )
    .await;
    // The old socket hears about all three and can no longer use them.
    let mut superseded = Vec::new();
    for _ in 0..3 {
        superseded.push(
            old.push("session.superseded").await["runId"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    superseded.sort();
    assert_eq!(superseded, ["main", "sub-a", "sub-b"]);
}

#[tokio::test]
async fn recover_connections_is_all_or_nothing() {
    let gw = TestGateway::start().await;
    let (mut old, main) = attach_family(&gw).await;
    let sid = main["sessionId"].clone();
    let sub_a_sid = {
        // Learn sub-a's session id the way a runtime would: it attached it.
        let frames = &old.seen;
        frames
            .iter()
            .find(|f| f["payload"]["runId"] == "sub-a")
            .expect("sub-a attach reply")["payload"]["sessionId"]
            .clone()
    };
    let mut new = gw.runtime("*").await;
    new.reattach("main", "inst", 2, &["subtasks.run"]).await;
    let answer = new
        .call(
            "runtime.recoverConnections",
            json!({ "sessionId": sid, "mainRunId": "main", "subRunIds": ["sub-a", "no-such-run"] }),
        )
        .await;
    assert_eq!(answer["error"]["code"], "SESSION_EXPIRED", "{answer}");
    assert_eq!(answer["error"]["details"]["runId"], "no-such-run");
    // sub-a did not move: still usable on the old socket, not on the new one.
    old.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sub_a_sid, "runId": "sub-a" }),
    )
    .await;
    let code = new
        .err(
            "runtime.heartbeat",
            json!({ "sessionId": sub_a_sid, "runId": "sub-a" }),
        )
        .await;
    assert_eq!(code, "NOT_ATTACHED");
}

#[tokio::test]
async fn capabilities_are_checked_at_attach_and_per_command() {
    let gw = TestGateway::start().await;
    let token = gw.token(TokenKind::Runtime, "run-*", &[Capability::KvRead]);
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &token).await;
    let answer = rt
        .call(
            "runtime.attach",
            json!({ "runId": "run-1", "runtimeInstanceId": "i", "protocolVersion": "1",
                    "capabilities": ["kv.read", "secrets.read", "kv.write"] }),
        )
        .await;
    assert_eq!(answer["error"]["code"], "FORBIDDEN");
    assert_eq!(
        answer["error"]["details"]["refused"],
        json!(["secrets.read", "kv.write"])
    );

    let sid = rt.attach("run-1", "i", &[]).await["sessionId"].clone();
    let code = rt
        .err(
            "kv.get",
            json!({ "sessionId": sid, "runId": "run-1", "keys": ["a"] }),
        )
        .await;
    assert_eq!(code, "FORBIDDEN", "kv.read was not asked for at attach");
}

#[tokio::test]
async fn a_token_for_other_runs_is_forbidden() {
    let gw = TestGateway::start().await;
    let mut rt = gw.runtime("team-a-*").await;
    let code = rt
        .err(
            "runtime.attach",
            json!({ "runId": "team-b-1", "runtimeInstanceId": "i", "protocolVersion": "1" }),
        )
        .await;
    assert_eq!(code, "FORBIDDEN");
}

#[tokio::test]
async fn protocol_versions_other_than_1_are_refused() {
    let gw = TestGateway::start().await;
    let mut rt = gw.runtime("*").await;
    for v in ["2", "0.9", "", "1."] {
        let code = rt
            .err(
                "runtime.attach",
                json!({ "runId": "r", "runtimeInstanceId": "i", "protocolVersion": v }),
            )
            .await;
        assert_eq!(code, "UNSUPPORTED_PROTOCOL", "version {v:?}");
    }
    let reply = rt
        .ok(
            "runtime.attach",
            json!({ "runId": "r", "runtimeInstanceId": "i", "protocolVersion": "1.3" }),
        )
        .await;
    assert!(reply["sessionId"].is_string());
}

#[tokio::test]
async fn commands_for_sessions_of_other_sockets_are_not_attached() {
    let gw = TestGateway::start().await;
    let mut a = gw.runtime("*").await;
    let sid = a.attach("r", "i", &[]).await["sessionId"].clone();
    let mut b = gw.runtime("*").await;
    let code = b
        .err(
            "runtime.heartbeat",
            json!({ "sessionId": sid, "runId": "r" }),
        )
        .await;
    assert_eq!(code, "NOT_ATTACHED");
    // Right session, wrong run: also not attached (ids are not probed).
    let code = a
        .err(
            "runtime.heartbeat",
            json!({ "sessionId": sid, "runId": "other" }),
        )
        .await;
    assert_eq!(code, "NOT_ATTACHED");
}

/// A runtime socket follows its run's stream only while it holds the run's
/// session: superseded, it gets no more of the stream (reading it there
/// needs the session, like any command would).
#[tokio::test]
async fn a_superseded_socket_stops_following_the_runs_stream() {
    let gw = TestGateway::start().await;
    let caps = ["stream.resume"];
    let mut old = gw.runtime("*").await;
    let attached = old
        .ok(
            "runtime.attach",
            json!({ "runId": "followed", "runtimeInstanceId": "w", "protocolVersion": "1",
                    "connectionEpoch": 1, "capabilities": caps }),
        )
        .await;
    let sid = attached["sessionId"].clone();
    old.ok(
        "stream.resume",
        json!({ "runId": "followed", "sessionId": sid, "fromOffset": 0 }),
    )
    .await;
    let mut new = gw.runtime("*").await;
    let moved = new.reattach("followed", "w", 2, &caps).await;
    assert_eq!(moved["type"], "reply", "{moved}");
    old.push("session.superseded").await;
    new.ok(
        "events.publish",
        json!({ "sessionId": sid, "runId": "followed",
                "events": [{ "type": "log", "data": { "n": 1 } }] }),
    )
    .await;
    let later = old.frames_within(Duration::from_millis(1500)).await;
    assert!(
        later.iter().all(|f| f["type"] != "stream.events"),
        "nothing of the stream after the session moved: {later:?}"
    );
}

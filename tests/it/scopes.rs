//! Scope checks (issue #5): a token covers runs by pattern (`src/auth.rs`);
//! a session's commands touch only its own run; sub-runs only through their
//! own sessions; streams only for covered runs. Each test tries crossings
//! and expects `FORBIDDEN` where a token does not cover a run, and
//! `NOT_ATTACHED` where a session id does not name a session of that run on
//! this socket (PROTOCOL.md §3) — in both cases without revealing whether
//! the other run exists.

use crate::harness::*;
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use rungate_test_support::http;
use serde_json::{Value, json};

/// A socket whose runtime token covers `runs`, with `run` attached.
async fn attached(gw: &TestGateway, runs: &str, run: &str, instance: &str) -> (Client, String) {
    let mut rt = gw.runtime(runs).await;
    let reply = rt.attach(run, instance, &all_caps()).await;
    (rt, reply["sessionId"].as_str().unwrap().to_owned())
}

async fn viewer_socket(gw: &TestGateway, runs: &str) -> Client {
    let token = gw.token(TokenKind::Viewer, runs, &[]);
    Client::connect(&gw.url("/v1/stream"), &token).await
}

async fn publish(rt: &mut Client, sid: &str, run: &str, n: usize) {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({ "type": "log", "data": i }))
        .collect();
    rt.ok(
        "events.publish",
        json!({ "sessionId": sid, "runId": run, "events": events }),
    )
    .await;
}

/// Every command that names a session and a run, with `sid` and `run`.
fn session_commands(sid: &str, run: &str) -> Vec<(&'static str, Value)> {
    vec![
        (
            "runtime.heartbeat",
            json!({ "sessionId": sid, "runId": run }),
        ),
        ("config.get", json!({ "sessionId": sid, "runId": run })),
        ("secrets.get", json!({ "sessionId": sid, "runId": run })),
        (
            "kv.get",
            json!({ "sessionId": sid, "runId": run, "keys": ["k"] }),
        ),
        (
            "kv.set",
            json!({ "sessionId": sid, "runId": run, "kv": { "k": "stolen" } }),
        ),
        (
            "checkpoint.save",
            json!({ "sessionId": sid, "runId": run, "data": "stolen" }),
        ),
        ("checkpoint.load", json!({ "sessionId": sid, "runId": run })),
        (
            "events.publish",
            json!({ "sessionId": sid, "runId": run, "events": [{ "type": "forged" }] }),
        ),
        (
            "stream.resume",
            json!({ "sessionId": sid, "runId": run, "fromOffset": 0 }),
        ),
        ("stream.cancel", json!({ "sessionId": sid, "runId": run })),
        (
            "runtime.recoverConnections",
            json!({ "sessionId": sid, "mainRunId": run }),
        ),
    ]
}

/// The error frame for a call; panics on a reply.
async fn refused(c: &mut Client, kind: &str, payload: Value) -> Value {
    let frame = c.call(kind, payload).await;
    assert_eq!(frame["type"], "error", "{kind} must be refused: {frame}");
    frame["error"].clone()
}

/// What run B's owner sees after the attempts: nothing changed.
async fn run_b_untouched(b: &mut Client, sid_b: &str) {
    let kv = b
        .ok(
            "kv.get",
            json!({ "sessionId": sid_b, "runId": "b-1", "keys": ["k"] }),
        )
        .await;
    assert_eq!(kv["kv"], json!({ "k": "mine" }));
    let cp = b
        .ok(
            "checkpoint.load",
            json!({ "sessionId": sid_b, "runId": "b-1" }),
        )
        .await;
    assert_eq!(cp["data"], "mine");
}

async fn tenant_b(gw: &TestGateway) -> (Client, String) {
    let (mut b, sid_b) = attached(gw, "b-*", "b-1", "inst-b").await;
    b.ok(
        "kv.set",
        json!({ "sessionId": sid_b, "runId": "b-1", "kv": { "k": "mine" } }),
    )
    .await;
    b.ok(
        "checkpoint.save",
        json!({ "sessionId": sid_b, "runId": "b-1", "data": "mine" }),
    )
    .await;
    publish(&mut b, &sid_b, "b-1", 3).await;
    (b, sid_b)
}

#[tokio::test]
async fn a_runtime_token_attaches_only_runs_it_covers() {
    let gw = TestGateway::start().await;
    let (mut b, sid_b) = tenant_b(&gw).await;
    let mut a = gw.runtime("a-*").await;
    // Fresh attach and reconnect of a run that exists and of one that does
    // not: the same FORBIDDEN, so the answer says nothing about run b-1.
    for run in ["b-1", "b-2", "a", "ab-1"] {
        for reconnect in [false, true] {
            let e = refused(
                &mut a,
                "runtime.attach",
                json!({ "runId": run, "runtimeInstanceId": "inst-b", "protocolVersion": "1",
                        "reconnect": reconnect, "connectionEpoch": 9 }),
            )
            .await;
            assert_eq!(e["code"], "FORBIDDEN", "{run}: {e}");
            assert_eq!(e["details"], json!({ "runId": run }), "{run}: {e}");
        }
    }
    // An exact pattern is not a prefix: "a-1" does not cover "a-10".
    let mut exact = gw.runtime("a-1").await;
    let e = refused(
        &mut exact,
        "runtime.attach",
        json!({ "runId": "a-10", "runtimeInstanceId": "i", "protocolVersion": "1" }),
    )
    .await;
    assert_eq!(e["code"], "FORBIDDEN");
    // Capabilities beyond the token are refused by name.
    let token = gw.token(TokenKind::Runtime, "a-*", &[Capability::KvRead]);
    let mut narrow = Client::connect(&gw.url("/v1/runtime"), &token).await;
    let e = refused(
        &mut narrow,
        "runtime.attach",
        json!({ "runId": "a-1", "runtimeInstanceId": "i", "protocolVersion": "1",
                "capabilities": ["kv.read", "secrets.read"] }),
    )
    .await;
    assert_eq!(e["code"], "FORBIDDEN");
    assert_eq!(e["details"], json!({ "refused": ["secrets.read"] }));
    run_b_untouched(&mut b, &sid_b).await;
    b.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sid_b, "runId": "b-1" }),
    )
    .await;
}

#[tokio::test]
async fn a_session_touches_only_its_own_run() {
    let gw = TestGateway::start().await;
    let (mut b, sid_b) = tenant_b(&gw).await;
    // A token that covers both runs, so only the session rules stand in
    // the way.
    let (mut a, sid_a) = attached(&gw, "a-*,b-*", "a-1", "inst-a").await;
    for (kind, payload) in session_commands(&sid_a, "b-1") {
        let e = refused(&mut a, kind, payload).await;
        assert_eq!(e["code"], "NOT_ATTACHED", "{kind}: {e}");
    }
    // Run b-1's own session id, but on a socket it is not bound to.
    for (kind, payload) in session_commands(&sid_b, "b-1") {
        let e = refused(&mut a, kind, payload).await;
        assert_eq!(e["code"], "NOT_ATTACHED", "{kind}: {e}");
    }
    // b-1's session id with a's run: the id does not name a session of a-1.
    for (kind, payload) in session_commands(&sid_b, "a-1") {
        let e = refused(&mut a, kind, payload).await;
        assert_eq!(e["code"], "NOT_ATTACHED", "{kind}: {e}");
    }
    // A session id that names no session at all answers the same.
    let unknown = "0123456789abcdef0123456789abcdef";
    for (kind, payload) in session_commands(unknown, "b-1") {
        let e = refused(&mut a, kind, payload).await;
        assert_eq!(e["code"], "NOT_ATTACHED", "{kind}: {e}");
    }
    run_b_untouched(&mut b, &sid_b).await;
    // Nothing was published into b-1's stream.
    let mut v = viewer_socket(&gw, "b-*").await;
    let info = v
        .ok("stream.resume", json!({ "runId": "b-1", "fromOffset": 0 }))
        .await;
    assert_eq!(info["nextOffset"], 3);
}

#[tokio::test]
async fn sub_runs_only_through_their_own_sessions() {
    let gw = TestGateway::start().await;
    let mut rt = gw.runtime("m-*").await;
    let main = rt.attach("m-1", "inst", &all_caps()).await;
    let sid_main = main["sessionId"].as_str().unwrap().to_owned();
    let sub = rt.attach("m-1-sub", "inst", &["kv.read", "kv.write"]).await;
    let sid_sub = sub["sessionId"].as_str().unwrap().to_owned();
    rt.ok(
        "kv.set",
        json!({ "sessionId": sid_sub, "runId": "m-1-sub", "kv": { "k": "sub" } }),
    )
    .await;
    // The main session's id for the sub-run, and the sub-run's for the main.
    for (kind, payload) in session_commands(&sid_main, "m-1-sub")
        .into_iter()
        .chain(session_commands(&sid_sub, "m-1"))
    {
        let e = refused(&mut rt, kind, payload).await;
        assert_eq!(e["code"], "NOT_ATTACHED", "{kind}: {e}");
    }
    // A sub-run has only the capabilities it asked for itself.
    let e = refused(
        &mut rt,
        "secrets.get",
        json!({ "sessionId": sid_sub, "runId": "m-1-sub" }),
    )
    .await;
    assert_eq!(e["code"], "FORBIDDEN");
    // A sub-run cannot be the main of a recoverConnections.
    let e = refused(
        &mut rt,
        "runtime.recoverConnections",
        json!({ "sessionId": sid_sub, "mainRunId": "m-1-sub" }),
    )
    .await;
    assert_eq!(e["code"], "FORBIDDEN");
    // Nor moved on its own by a reconnect.
    let mut other = gw.runtime("m-*").await;
    let e = other.reattach("m-1-sub", "inst", 5, &[]).await;
    assert_eq!(e["error"]["code"], "FORBIDDEN", "{e}");
    // Another instance on the same socket is not a sub-run.
    let e = refused(
        &mut rt,
        "runtime.attach",
        json!({ "runId": "m-2", "runtimeInstanceId": "someone-else", "protocolVersion": "1" }),
    )
    .await;
    assert_eq!(e["code"], "FORBIDDEN");
    let kv = rt
        .ok(
            "kv.get",
            json!({ "sessionId": sid_sub, "runId": "m-1-sub", "keys": ["k"] }),
        )
        .await;
    assert_eq!(kv["kv"], json!({ "k": "sub" }));
}

/// `runtime.recoverConnections` moves sub-runs onto the calling socket, so
/// that socket's token must cover them, like an attach: a main run
/// reattached with a token for the main run alone must not take its
/// sub-runs along, and naming an uncovered run must say `FORBIDDEN` whether
/// or not that run exists.
#[tokio::test]
async fn recover_connections_moves_only_runs_the_token_covers() {
    let gw = TestGateway::start().await;
    let (_b, _) = tenant_b(&gw).await;
    // Socket 1: a token for the family; main m-1 with a sub-run m-1-sub.
    let mut first = gw.runtime("m-*").await;
    first
        .ok(
            "runtime.attach",
            json!({ "runId": "m-1", "runtimeInstanceId": "inst", "protocolVersion": "1",
                    "connectionEpoch": 1, "capabilities": all_caps() }),
        )
        .await;
    let sub = first.attach("m-1-sub", "inst", &["kv.read"]).await;
    let sid_sub = sub["sessionId"].as_str().unwrap().to_owned();
    // Socket 2: a token for m-1 only reattaches the main run.
    let token = gw.token(TokenKind::Runtime, "m-1", &Capability::ALL);
    let mut second = Client::connect(&gw.url("/v1/runtime"), &token).await;
    let moved = second.reattach("m-1", "inst", 2, &all_caps()).await;
    assert_eq!(moved["type"], "reply", "{moved}");
    let sid_main = moved["payload"]["sessionId"].as_str().unwrap().to_owned();

    // All sub-runs (none named): m-1-sub is not covered.
    let e = refused(
        &mut second,
        "runtime.recoverConnections",
        json!({ "sessionId": sid_main, "mainRunId": "m-1" }),
    )
    .await;
    assert_eq!(e["code"], "FORBIDDEN", "{e}");
    assert_eq!(e["details"], json!({ "runId": "m-1-sub" }));
    // Named: the same.
    let e = refused(
        &mut second,
        "runtime.recoverConnections",
        json!({ "sessionId": sid_main, "mainRunId": "m-1", "subRunIds": ["m-1-sub"] }),
    )
    .await;
    assert_eq!(e["code"], "FORBIDDEN", "{e}");
    // Runs of someone else, existing (b-1) or not (b-9): the same answer,
    // FORBIDDEN naming the run, so nothing is learned about them.
    let mut answers = Vec::new();
    for run in ["b-1", "b-9"] {
        let e = refused(
            &mut second,
            "runtime.recoverConnections",
            json!({ "sessionId": sid_main, "mainRunId": "m-1", "subRunIds": [run] }),
        )
        .await;
        assert_eq!(e["code"], "FORBIDDEN", "{run}: {e}");
        assert_eq!(e["details"], json!({ "runId": run }));
        answers.push(e["message"].as_str().unwrap().replace(run, "RUN"));
    }
    assert_eq!(answers[0], answers[1], "the messages must not differ");
    // The sub-run stayed where it was, and socket 2 cannot use it.
    let e = refused(
        &mut second,
        "kv.get",
        json!({ "sessionId": sid_sub, "runId": "m-1-sub", "keys": ["k"] }),
    )
    .await;
    assert_eq!(e["code"], "NOT_ATTACHED");
    // A token covering the family may move it.
    let mut third = gw.runtime("m-*").await;
    let moved = third.reattach("m-1", "inst", 3, &all_caps()).await;
    assert_eq!(moved["type"], "reply", "{moved}");
    third
        .ok(
            "runtime.recoverConnections",
            json!({ "sessionId": sid_main, "mainRunId": "m-1" }),
        )
        .await;
    third
        .ok(
            "kv.get",
            json!({ "sessionId": sid_sub, "runId": "m-1-sub", "keys": ["k"] }),
        )
        .await;
}

#[tokio::test]
async fn viewers_follow_only_covered_runs() {
    let gw = TestGateway::start().await;
    let (_b, _) = tenant_b(&gw).await;
    let (mut a, sid_a) = attached(&gw, "a-*", "a-1", "inst-a").await;
    publish(&mut a, &sid_a, "a-1", 2).await;
    let mut v = viewer_socket(&gw, "a-*").await;
    // Existing and missing uncovered runs: one answer.
    for run in ["b-1", "b-9"] {
        for payload in [
            json!({ "runId": run }),
            json!({ "runId": run, "fromOffset": 0 }),
            json!({ "runId": run, "fromOffset": 0, "streamEpoch": "0123456789abcdef" }),
        ] {
            let e = refused(&mut v, "stream.resume", payload).await;
            assert_eq!(e["code"], "FORBIDDEN", "{run}: {e}");
            assert_eq!(e["details"], json!({ "runId": run }));
        }
        let e = refused(&mut v, "stream.cancel", json!({ "runId": run })).await;
        assert_eq!(e["code"], "FORBIDDEN", "{run}: {e}");
    }
    // runs.list shows only covered runs.
    let list = v.ok("runs.list", json!({})).await;
    let runs: Vec<&str> = list["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["runId"].as_str().unwrap())
        .collect();
    assert_eq!(runs, ["a-1"]);
    // A covered run streams; no b-1 event ever reaches this socket.
    let info = v
        .ok("stream.resume", json!({ "runId": "a-1", "fromOffset": 0 }))
        .await;
    assert_eq!(info["nextOffset"], 2);
    let events = v.push("stream.events").await;
    assert_eq!(events["runId"], "a-1");
    assert!(v.seen.iter().all(|f| f["payload"]["runId"] != "b-1"));
}

#[tokio::test]
async fn viewer_tokens_cannot_send_runtime_commands() {
    let gw = TestGateway::start().await;
    let (_b, sid_b) = tenant_b(&gw).await;
    let mut v = viewer_socket(&gw, "*").await;
    let mut commands = session_commands(&sid_b, "b-1");
    commands.retain(|(k, _)| !k.starts_with("stream."));
    commands.push((
        "runtime.attach",
        json!({ "runId": "b-1", "runtimeInstanceId": "inst-b", "protocolVersion": "1" }),
    ));
    for (kind, payload) in commands {
        let e = refused(&mut v, kind, payload).await;
        assert_eq!(e["code"], "FORBIDDEN", "{kind}: {e}");
    }
    // And a runtime socket does not offer runs.list.
    let mut rt = gw.runtime("*").await;
    let e = refused(&mut rt, "runs.list", json!({})).await;
    assert_eq!(e["code"], "FORBIDDEN");
}

/// On `/v1/runtime`, `stream.resume` needs a session of that run on the
/// socket: a runtime token that covers a run is not enough.
#[tokio::test]
async fn a_runtime_socket_follows_only_its_own_sessions_runs() {
    let gw = TestGateway::start().await;
    let (_b, _) = tenant_b(&gw).await;
    let (mut a, sid_a) = attached(&gw, "*", "a-1", "inst-a").await;
    for payload in [
        json!({ "sessionId": sid_a, "runId": "b-1", "fromOffset": 0 }),
        json!({ "sessionId": sid_a, "runId": "b-9", "fromOffset": 0 }),
    ] {
        let e = refused(&mut a, "stream.resume", payload).await;
        assert_eq!(e["code"], "NOT_ATTACHED", "{e}");
    }
    let e = refused(&mut a, "stream.resume", json!({ "runId": "b-1" })).await;
    assert_eq!(e["code"], "INVALID_PAYLOAD");
    assert_eq!(e["details"]["path"], "/payload/sessionId");
}

#[tokio::test]
async fn http_routes_show_only_covered_runs_and_the_right_token_kind() {
    let gw = TestGateway::start().await;
    let (_b, _) = tenant_b(&gw).await;
    let (mut a, sid_a) = attached(&gw, "a-*", "a-1", "inst-a").await;
    publish(&mut a, &sid_a, "a-1", 1).await;
    let view_a = gw.token(TokenKind::Viewer, "a-*", &[]);

    let list = http::get_with_token(gw.addr, "/v1/runs", &view_a)
        .await
        .json()
        .await;
    let runs: Vec<&str> = list["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["runId"].as_str().unwrap())
        .collect();
    assert_eq!(runs, ["a-1"]);

    // SSE for uncovered runs: the same 403 body whether the run exists.
    let mut bodies = Vec::new();
    for run in ["b-1", "b-9"] {
        let response =
            http::get_with_token(gw.addr, &format!("/v1/runs/{run}/events?from=0"), &view_a).await;
        assert_eq!(response.status, 403, "{run}");
        bodies.push(response.text().await);
    }
    assert_eq!(bodies[0], bodies[1]);
    assert!(bodies[0].contains("FORBIDDEN"));

    // The wrong kind of token on each route: 403 before anything else.
    let runtime_all = gw.token(TokenKind::Runtime, "*", &Capability::ALL);
    for path in ["/v1/runs", "/v1/runs/a-1/events"] {
        let response = http::get_with_token(gw.addr, path, &runtime_all).await;
        assert_eq!(response.status, 403, "{path}");
    }
    assert_eq!(
        connect_status(&gw.url("/v1/stream"), Some(&runtime_all)).await,
        403
    );
    let viewer_all = gw.token(TokenKind::Viewer, "*", &[]);
    assert_eq!(
        connect_status(&gw.url("/v1/runtime"), Some(&viewer_all)).await,
        403
    );
    // A token signed with another key is 401 everywhere.
    let forged = rungate::auth::AuthKey::from_secret(b"not the gateway's key");
    let forged = mint(&forged, TokenKind::Viewer, "*", &[]);
    let response = http::get_with_token(gw.addr, "/v1/runs", &forged).await;
    assert_eq!(response.status, 401);
    assert_eq!(
        connect_status(&gw.url("/v1/stream"), Some(&forged)).await,
        401
    );
}

/// A socket or an SSE response is only as good as the token it opened
/// with: when the token expires, the WebSocket is closed (1008, "token
/// expired") and the event stream ends, so a revoked-by-expiry credential
/// stops reading and writing even on a connection it already holds.
#[tokio::test]
async fn connections_end_when_their_token_expires() {
    use rungate::auth::RunScope;

    let gw = TestGateway::start().await;
    let short = |kind, caps: &[Capability]| {
        gw.key
            .mint(
                kind,
                &RunScope::parse_list("*").unwrap(),
                caps.iter().copied().collect(),
                std::time::Duration::from_secs(2),
            )
            .unwrap()
    };
    let runtime_token = short(TokenKind::Runtime, &Capability::ALL);
    let url = format!("{}?token={runtime_token}", gw.url("/v1/runtime"));
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut rt = Client::from_stream(ws);
    rt.attach("short-lived", "w", &[]).await;
    let viewer_token = short(TokenKind::Viewer, &[]);
    let sse = http::get_with_token(gw.addr, "/v1/runs/short-lived/events", &viewer_token).await;
    assert_eq!(sse.status, 200);

    // Within the token's life plus a generous margin: the close frame.
    let close = rt
        .close_frame(std::time::Duration::from_secs(15))
        .await
        .expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "token expired");
    // The SSE response ends by itself too (text() waits for its end).
    let body = sse.text().await;
    assert!(body.contains("event: stream"), "{body}");
}

//! Every limit of issue #5 over real sockets: go one over, get the typed
//! error, close or HTTP status, and see that the same socket (or another
//! client) still works afterwards; and every refusal before an upgrade. Each gateway is configured with small
//! limits so a test needs only a few requests; waits are generous because
//! the tests share two busy cores.

use std::time::{Duration, Instant};

use crate::harness::*;
use futures_util::StreamExt;
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use rungate_test_support::http;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

const CAPS: [&str; 6] = [
    "secrets.read",
    "kv.read",
    "kv.write",
    "checkpoint.save",
    "checkpoint.load",
    "subtasks.run",
];

/// A runtime socket with `run` attached; returns it and the session id.
async fn attached(gw: &TestGateway, run: &str) -> (Client, Value) {
    let mut rt = gw.runtime("*").await;
    let sid = rt.attach(run, "inst", &CAPS).await["sessionId"].clone();
    (rt, sid)
}

fn runtime_token(gw: &TestGateway) -> String {
    gw.token(TokenKind::Runtime, "*", &Capability::ALL)
}

/// An error frame's `error` object; panics on a reply.
async fn error_of(c: &mut Client, kind: &str, payload: Value) -> Value {
    let frame = c.call(kind, payload).await;
    assert_eq!(frame["type"], "error", "{kind} should fail: {frame}");
    frame["error"].clone()
}

/// A WebSocket handshake the gateway must refuse: status, JSON body and
/// `Retry-After`.
async fn refused(url: &str, token: &str) -> (u16, Value, Option<String>) {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("an answer in time")
    {
        Ok(_) => panic!("{url}: the handshake was accepted"),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            let json = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("a JSON body ({e}): {body:?}"));
            let retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (resp.status().as_u16(), json, retry)
        }
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

/// Connects once a place is free (a closed socket gives its place back
/// when its task has finished, a moment after the close).
async fn connect_when_free(url: &str, token: &str) -> Client {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => return Client::from_stream(ws),
            Err(tungstenite::Error::Http(resp)) if Instant::now() < deadline => {
                let status = resp.status().as_u16();
                assert!(status == 429 || status == 503, "status {status}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no place was given back: {e}"),
        }
    }
}

// ------------------------------------------------------------------ KV

#[tokio::test]
async fn a_kv_key_one_byte_over_the_limit_is_payload_too_large() {
    let gw = TestGateway::start_with(|c| c.limits.max_kv_key_bytes = 16).await;
    let (mut rt, sid) = attached(&gw, "kv-key").await;
    let at_limit = "k".repeat(16);
    let over = "k".repeat(17);
    let e = error_of(
        &mut rt,
        "kv.set",
        json!({ "sessionId": sid, "runId": "kv-key", "kv": { "fine": "1", over.as_str(): "2" } }),
    )
    .await;
    assert_eq!(e["code"], "PAYLOAD_TOO_LARGE", "{e}");
    assert_eq!(e["retryable"], false);
    assert_eq!(e["details"]["maxKvKeyBytes"], 16);
    assert_eq!(e["details"]["path"], "/payload/kv");
    assert!(!e["message"].as_str().unwrap().contains(&over), "{e}");
    // All or nothing: the pair that fit was not stored either.
    let got = rt
        .ok(
            "kv.get",
            json!({ "sessionId": sid, "runId": "kv-key", "keys": ["fine"] }),
        )
        .await;
    assert_eq!(got["kv"], json!({}));
    // The same socket goes on, and a key of exactly the limit is fine.
    rt.ok(
        "kv.set",
        json!({ "sessionId": sid, "runId": "kv-key", "kv": { at_limit.as_str(): "v" } }),
    )
    .await;
}

#[tokio::test]
async fn a_kv_value_one_byte_over_the_limit_is_payload_too_large() {
    let gw = TestGateway::start_with(|c| c.limits.max_kv_value_bytes = 32).await;
    let (mut rt, sid) = attached(&gw, "kv-value").await;
    let e = error_of(
        &mut rt,
        "kv.set",
        json!({ "sessionId": sid, "runId": "kv-value", "kv": { "a/b": "v".repeat(33) } }),
    )
    .await;
    assert_eq!(e["code"], "PAYLOAD_TOO_LARGE", "{e}");
    assert_eq!(e["retryable"], false);
    assert_eq!(e["details"]["maxKvValueBytes"], 32);
    // The pointer names the key (RFC 6901 escapes `/`).
    assert_eq!(e["details"]["path"], "/payload/kv/a~1b");
    rt.ok(
        "kv.set",
        json!({ "sessionId": sid, "runId": "kv-value", "kv": { "a/b": "v".repeat(32) } }),
    )
    .await;
    let got = rt
        .ok(
            "kv.get",
            json!({ "sessionId": sid, "runId": "kv-value", "keys": ["a/b"] }),
        )
        .await;
    assert_eq!(got["kv"]["a/b"], "v".repeat(32));
}

#[tokio::test]
async fn one_key_more_than_a_run_may_hold_is_refused_and_overwrites_still_work() {
    let gw = TestGateway::start_with(|c| c.limits.max_kv_keys_per_run = 3).await;
    let (mut rt, sid) = attached(&gw, "kv-full").await;
    rt.ok(
        "kv.set",
        json!({ "sessionId": sid, "runId": "kv-full", "kv": { "a": "1", "b": "2", "c": "3" } }),
    )
    .await;
    let e = error_of(
        &mut rt,
        "kv.set",
        json!({ "sessionId": sid, "runId": "kv-full", "kv": { "a": "changed", "d": "4" } }),
    )
    .await;
    assert_eq!(e["code"], "PAYLOAD_TOO_LARGE", "{e}");
    assert_eq!(e["retryable"], false);
    assert_eq!(e["details"]["maxKvKeysPerRun"], 3);
    let got = rt
        .ok(
            "kv.get",
            json!({ "sessionId": sid, "runId": "kv-full", "keys": ["a", "d"] }),
        )
        .await;
    assert_eq!(
        got["kv"],
        json!({ "a": "1" }),
        "the refused write stored nothing"
    );
    // Existing keys can still be rewritten on the same socket.
    rt.ok(
        "kv.set",
        json!({ "sessionId": sid, "runId": "kv-full", "kv": { "a": "x", "c": "y" } }),
    )
    .await;
    // Another run has its own room.
    let (mut other, osid) = attached(&gw, "kv-other").await;
    other
        .ok(
            "kv.set",
            json!({ "sessionId": osid, "runId": "kv-other", "kv": { "d": "4" } }),
        )
        .await;
}

// ---------------------------------------------------------- checkpoints

#[tokio::test]
async fn a_checkpoint_over_the_limit_is_payload_too_large_and_not_saved() {
    let gw = TestGateway::start_with(|c| c.limits.max_checkpoint_bytes = 64).await;
    let (mut rt, sid) = attached(&gw, "cp").await;
    // `"` + 63 characters + `"` is 65 bytes of JSON: one over.
    let data = "x".repeat(63);
    let e = error_of(
        &mut rt,
        "checkpoint.save",
        json!({ "sessionId": sid, "runId": "cp", "data": data }),
    )
    .await;
    assert_eq!(e["code"], "PAYLOAD_TOO_LARGE", "{e}");
    assert_eq!(e["retryable"], false);
    assert_eq!(e["details"]["maxCheckpointBytes"], 64);
    assert_eq!(e["details"]["path"], "/payload/data");
    let code = rt
        .err(
            "checkpoint.load",
            json!({ "sessionId": sid, "runId": "cp" }),
        )
        .await;
    assert_eq!(code, "NOT_FOUND", "nothing was saved");
    let fits = "x".repeat(62);
    rt.ok(
        "checkpoint.save",
        json!({ "sessionId": sid, "runId": "cp", "data": fits }),
    )
    .await;
    let loaded = rt
        .ok(
            "checkpoint.load",
            json!({ "sessionId": sid, "runId": "cp" }),
        )
        .await;
    assert_eq!(loaded["data"], json!(fits));
}

// ------------------------------------------------------------- sessions

#[tokio::test]
async fn one_session_more_than_a_socket_may_hold_is_rate_limited() {
    let gw = TestGateway::start_with(|c| c.limits.max_sessions_per_socket = 2).await;
    let (mut rt, sid) = attached(&gw, "main").await;
    rt.attach("sub-1", "inst", &[]).await;
    let e = error_of(
        &mut rt,
        "runtime.attach",
        json!({ "runId": "sub-2", "runtimeInstanceId": "inst", "protocolVersion": "1" }),
    )
    .await;
    assert_eq!(e["code"], "RATE_LIMITED", "{e}");
    assert_eq!(e["retryable"], false);
    assert_eq!(e["details"]["maxSessionsPerSocket"], 2);
    // The socket's sessions are untouched.
    rt.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sid, "runId": "main" }),
    )
    .await;
    // The refused run was not created: another socket may attach it.
    let mut other = gw.runtime("*").await;
    other.attach("sub-2", "other", &[]).await;
}

// --------------------------------------------------------- connections

#[tokio::test]
async fn one_socket_more_than_a_token_may_hold_is_429_before_the_upgrade() {
    let gw = TestGateway::start_with(|c| c.limits.max_sockets_per_token = 2).await;
    let url = gw.url("/v1/runtime");
    let token = runtime_token(&gw);
    let first = Client::connect(&url, &token).await;
    let mut second = Client::connect(&url, &token).await;
    let (status, body, retry_after) = refused(&url, &token).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "RATE_LIMITED");
    assert_eq!(body["error"]["retryable"], true);
    assert_eq!(body["error"]["details"]["maxSocketsPerToken"], 2);
    assert_eq!(retry_after.as_deref(), Some("1"));
    // Another token is not affected, and the open sockets still work.
    let other = runtime_token(&gw);
    let mut third = Client::connect(&url, &other).await;
    third.attach("tok-b", "b", &[]).await;
    second.attach("tok-a", "a", &[]).await;
    // Closing one gives its place back.
    first.close().await;
    let mut again = connect_when_free(&url, &token).await;
    again.attach("tok-a2", "a2", &[]).await;
}

#[tokio::test]
async fn an_sse_response_holds_a_place_of_its_token() {
    let gw = TestGateway::start_with(|c| c.limits.max_sockets_per_token = 1).await;
    let viewer = gw.token(TokenKind::Viewer, "*", &[]);
    let sse = http::get_with_token(gw.addr, "/v1/runs/r1/events", &viewer).await;
    assert_eq!(sse.status, 200);
    let mut events = sse.sse();
    assert_eq!(events.next_event().await.unwrap().name(), "stream");
    let (status, body, _) = refused(&gw.url("/v1/stream"), &viewer).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["details"]["maxSocketsPerToken"], 1);
    let second_sse = http::get_with_token(gw.addr, "/v1/runs/r1/events", &viewer).await;
    assert_eq!(second_sse.status, 429);
    assert_eq!(second_sse.json().await["error"]["code"], "RATE_LIMITED");
    // Ending the SSE response frees the place.
    drop(events);
    let mut v = connect_when_free(&gw.url("/v1/stream"), &viewer).await;
    v.ok("runs.list", json!({})).await;
}

#[tokio::test]
async fn one_connection_over_the_gateway_cap_is_503_before_the_upgrade() {
    let gw = TestGateway::start_with(|c| c.limits.max_connections = 2).await;
    let url = gw.url("/v1/runtime");
    let (a, b, c) = (runtime_token(&gw), runtime_token(&gw), runtime_token(&gw));
    let first = Client::connect(&url, &a).await;
    let mut second = Client::connect(&url, &b).await;
    let (status, body, retry_after) = refused(&url, &c).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "RATE_LIMITED");
    assert_eq!(body["error"]["retryable"], true);
    assert_eq!(body["error"]["details"]["maxConnections"], 2);
    assert_eq!(retry_after.as_deref(), Some("1"));
    // SSE and viewer sockets are refused the same way; probes are not.
    let viewer = gw.token(TokenKind::Viewer, "*", &[]);
    let sse = http::get_with_token(gw.addr, "/v1/runs/r/events", &viewer).await;
    assert_eq!(sse.status, 503);
    assert_eq!(http::get(gw.addr, "/healthz", &[]).await.status, 200);
    assert_eq!(http::get(gw.addr, "/readyz", &[]).await.status, 200);
    // The open sockets work; closing one lets the refused client in.
    second.attach("cap-b", "b", &[]).await;
    first.close().await;
    let mut third = connect_when_free(&url, &c).await;
    third.attach("cap-c", "c", &[]).await;
}

// ---------------------------------------------------------------- idle

/// A raw socket, for reading the close frame's code.
async fn raw_socket(
    url: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

/// Reads until the gateway's close frame; its code and reason.
async fn close_frame(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    limit: Duration,
) -> (CloseCode, String) {
    let read = async {
        while let Some(msg) = ws.next().await {
            if let Ok(Message::Close(Some(frame))) = msg {
                return (frame.code, frame.reason.as_str().to_owned());
            }
        }
        panic!("the socket ended without a close frame");
    };
    tokio::time::timeout(limit, read)
        .await
        .expect("closed in time")
}

const IDLE: Duration = Duration::from_secs(3);

#[tokio::test]
async fn a_runtime_socket_that_never_attaches_is_closed_after_the_idle_timeout() {
    let gw = TestGateway::start_with(|c| c.limits.idle_timeout = IDLE).await;
    let token = runtime_token(&gw);
    let opened = Instant::now();
    let mut idle = raw_socket(&gw.url("/v1/runtime"), &token).await;
    // Attached right away on another socket: kept past the timeout.
    let (mut busy, sid) = attached(&gw, "busy").await;
    let (code, reason) = close_frame(&mut idle, IDLE + WAIT).await;
    assert_eq!(code, CloseCode::Policy);
    assert!(reason.contains("idle timeout"), "{reason}");
    assert!(opened.elapsed() >= IDLE, "closed before the timeout");
    tokio::time::sleep(IDLE).await;
    busy.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sid, "runId": "busy" }),
    )
    .await;
    // A viewer socket following nothing is not a runtime socket: kept.
    let viewer = gw.token(TokenKind::Viewer, "*", &[]);
    let mut dashboard = Client::connect(&gw.url("/v1/stream"), &viewer).await;
    tokio::time::sleep(IDLE * 2 + Duration::from_millis(500)).await;
    dashboard.ok("runs.list", json!({})).await;
}

#[tokio::test]
async fn a_socket_whose_session_moved_away_is_closed_once_idle() {
    let gw = TestGateway::start_with(|c| c.limits.idle_timeout = IDLE).await;
    let token = runtime_token(&gw);
    let mut old = raw_socket(&gw.url("/v1/runtime"), &token).await;
    use futures_util::SinkExt;
    old.send(Message::text(
        json!({ "id": "1", "type": "runtime.attach", "payload": {
            "runId": "moving", "runtimeInstanceId": "inst", "protocolVersion": "1" } })
        .to_string(),
    ))
    .await
    .unwrap();
    // The run moves to a new socket at a higher epoch.
    let mut new = gw.runtime("*").await;
    let frame = new.reattach("moving", "inst", 1, &[]).await;
    assert_eq!(frame["type"], "reply", "{frame}");
    let sid = frame["payload"]["sessionId"].clone();
    let moved = Instant::now();
    let (code, _) = close_frame(&mut old, IDLE * 2 + WAIT).await;
    assert_eq!(code, CloseCode::Policy);
    assert!(moved.elapsed() < IDLE * 2 + WAIT);
    new.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sid, "runId": "moving" }),
    )
    .await;
}

// ---------------------------------------------------------------- rate

#[tokio::test]
async fn commands_over_the_socket_rate_are_rate_limited_and_the_socket_lives_on() {
    let gw = TestGateway::start_with(|c| {
        c.limits.max_commands_per_sec = 2;
        c.limits.command_burst = 5;
    })
    .await;
    let (mut rt, sid) = attached(&gw, "rate").await;
    let started = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            rt.send(
                "runtime.heartbeat",
                json!({ "sessionId": sid, "runId": "rate" }),
            )
            .await,
        );
    }
    let (mut ok, mut limited, mut longest_wait) = (0u64, 0u64, 0u64);
    for id in &ids {
        let frame = rt.answer(id).await;
        match frame["type"].as_str() {
            Some("reply") => ok += 1,
            _ => {
                let e = &frame["error"];
                assert_eq!(e["code"], "RATE_LIMITED", "{frame}");
                assert_eq!(e["retryable"], true);
                assert_eq!(e["details"]["maxCommandsPerSec"], 2);
                assert_eq!(e["details"]["commandBurst"], 5);
                let wait = e["details"]["retryAfterMs"].as_u64().expect("retryAfterMs");
                assert!((1..=500).contains(&wait), "{frame}");
                longest_wait = longest_wait.max(wait);
                limited += 1;
            }
        }
    }
    // The burst (less the attach) plus what the rate refilled meanwhile.
    let refilled = (started.elapsed().as_secs_f64() * 2.0).ceil() as u64;
    assert!(
        ok >= 4 && ok <= 4 + refilled,
        "ok {ok}, refilled {refilled}"
    );
    assert_eq!(ok + limited, 20);
    assert!(limited > 0);
    // Another socket of the same token has its own budget.
    let (mut other, osid) = attached(&gw, "rate-other").await;
    other
        .ok(
            "runtime.heartbeat",
            json!({ "sessionId": osid, "runId": "rate-other" }),
        )
        .await;
    // After the wait it was told, the same socket and session go on.
    tokio::time::sleep(Duration::from_millis(longest_wait + 100)).await;
    rt.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sid, "runId": "rate" }),
    )
    .await;
}

// ------------------------------------------------------------- settings

/// Every new limit is a flag with its `RUNGATE_*` variable, listed by
/// `rungate serve --help` with its default.
#[tokio::test]
async fn every_limit_is_in_serve_help_with_its_env_var() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rungate"))
        .args(["serve", "--help"])
        .output()
        .await
        .expect("run rungate serve --help");
    let help = String::from_utf8(out.stdout).unwrap();
    for (flag, default) in [
        ("max-kv-key-bytes", "512"),
        ("max-kv-value-bytes", "65536"),
        ("max-kv-keys-per-run", "1000"),
        ("max-checkpoint-bytes", "1048576"),
        ("max-sessions-per-socket", "128"),
        ("max-sockets-per-token", "1000"),
        ("max-connections", "100000"),
        ("idle-timeout-secs", "60"),
        ("max-commands-per-sec", "1000"),
        ("command-burst", "2000"),
        ("allowed-origins", "same origin only"),
    ] {
        let at = help
            .find(&format!("--{flag} "))
            .unwrap_or_else(|| panic!("--{flag} missing from:\n{help}"));
        // The entry runs to the next line that starts another flag.
        let entry: Vec<&str> = std::iter::once(help[at..].lines().next().unwrap())
            .chain(
                help[at..]
                    .lines()
                    .skip(1)
                    .take_while(|l| !l.trim_start().starts_with('-')),
            )
            .collect();
        let entry = entry.join("\n");
        let env = format!("RUNGATE_{}", flag.to_uppercase().replace('-', "_"));
        assert!(entry.contains(&env), "{env} missing: {entry}");
        assert!(
            entry.contains(&format!("[default: {default}]")),
            "--{flag} default: {entry}"
        );
    }
}

/// The same limits from the `[gateway]` table of `--config` and from the
/// environment, over a real gateway process.
#[tokio::test]
async fn limits_come_from_the_config_file_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rungate.toml");
    std::fs::write(
        &config,
        "[gateway]\nmax_kv_value_bytes = 8\nmax_sessions_per_socket = 1\n",
    )
    .unwrap();
    let data = data_dir(&dir);
    let mut command = GatewayProcess::command(&data, &["--config", config.to_str().unwrap()]);
    command.env("RUNGATE_MAX_KV_KEY_BYTES", "4");
    let gw = GatewayProcess::start(command).await;
    let addr = gw.addr;
    let key = rungate::auth::AuthKey::load_or_create(&data.join("auth.key")).unwrap();
    let token = mint(&key, TokenKind::Runtime, "*", &Capability::ALL);
    let mut rt = Client::connect(&format!("ws://{addr}/v1/runtime"), &token).await;
    let sid = rt.attach("cfg", "inst", &CAPS).await["sessionId"].clone();
    let set = |kv: Value| json!({ "sessionId": sid, "runId": "cfg", "kv": kv });
    let e = error_of(&mut rt, "kv.set", set(json!({ "k": "123456789" }))).await;
    assert_eq!(e["details"]["maxKvValueBytes"], 8, "from the file: {e}");
    let e = error_of(&mut rt, "kv.set", set(json!({ "kkkkk": "v" }))).await;
    assert_eq!(
        e["details"]["maxKvKeyBytes"], 4,
        "from the environment: {e}"
    );
    let e = error_of(
        &mut rt,
        "runtime.attach",
        json!({ "runId": "cfg-sub", "runtimeInstanceId": "inst", "protocolVersion": "1" }),
    )
    .await;
    assert_eq!(e["details"]["maxSessionsPerSocket"], 1, "{e}");
    rt.ok("kv.set", set(json!({ "k": "fits" }))).await;
    gw.kill().await;
}

/// A response's status and JSON body.
async fn status_and_json(r: http::Response) -> (u16, Value) {
    let status = r.status;
    (status, r.json().await)
}

/// Each refusal before an upgrade, on both WebSocket endpoints: its status
/// and an error body of the error frame's shape (code, message, retryable,
/// details only), the code of the one error map (gateway::errors).
#[tokio::test]
async fn every_refusal_before_an_upgrade_has_its_status_and_error_body() {
    let gw = TestGateway::start().await;
    let addr = gw.addr;
    let runtime = runtime_token(&gw);
    let viewer = gw.token(TokenKind::Viewer, "*", &[]);
    let check = |what: &str, status: u16, body: &Value, want: (u16, &str)| {
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (want.0, Some(want.1)),
            "{what}: {body}"
        );
        let error = body["error"].as_object().unwrap();
        assert!(error["message"].is_string(), "{what}: {body}");
        assert_eq!(error["retryable"], false, "{what}: {body}");
        assert!(
            error
                .keys()
                .all(|k| ["code", "message", "retryable", "details"].contains(&k.as_str())),
            "{what}: {body}"
        );
        assert_eq!(body.as_object().unwrap().len(), 1, "{what}: {body}");
    };
    for (path, own, other) in [
        ("/v1/runtime", &runtime, &viewer),
        ("/v1/stream", &viewer, &runtime),
    ] {
        let url = gw.url(path);
        let (status, body) = status_and_json(http::get(addr, path, &[]).await).await;
        check("no token", status, &body, (401, "UNAUTHENTICATED"));
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("a token is required"), "{message}");
        let (status, body, _) = refused(&url, &format!("{own}x")).await;
        check("a forged token", status, &body, (401, "UNAUTHENTICATED"));
        assert_eq!(body["error"]["message"], "the token is not valid");
        let (status, body, _) = refused(&url, other).await;
        check("the other kind of token", status, &body, (403, "FORBIDDEN"));
        // A plain GET with a good token: not an upgrade.
        let (status, body) = status_and_json(http::get_with_token(addr, path, own).await).await;
        check("not an upgrade", status, &body, (400, "BAD_FRAME"));
        let foreign = [("origin", "https://elsewhere.example")];
        let (status, body) =
            status_and_json(http::get(addr, &format!("{path}?token={own}"), &foreign).await).await;
        check("a foreign origin", status, &body, (403, "FORBIDDEN"));
        let (status, body) = raw_http(
            addr,
            &format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let body: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        check("a wrong method", status, &body, (405, "BAD_FRAME"));
        assert_eq!(body["error"]["message"], "method not allowed; use GET");
    }
    let (status, body) = raw_http(
        addr,
        &format!("GET /nowhere HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    let body: Value = serde_json::from_str(&body).unwrap();
    check("no route", status, &body, (404, "NOT_FOUND"));
}

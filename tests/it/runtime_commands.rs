//! Config, secrets, KV and checkpoints over a real socket; many requests in
//! flight; every error code a runtime socket can provoke; the HTTP side.

use std::time::Duration;

use crate::harness::*;
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const ALL_CAPS: [&str; 5] = [
    "secrets.read",
    "kv.read",
    "kv.write",
    "checkpoint.save",
    "checkpoint.load",
];

async fn attached(gw: &TestGateway, run: &str) -> (Client, Value) {
    let mut rt = gw.runtime("*").await;
    let sid = rt.attach(run, "inst", &ALL_CAPS).await["sessionId"].clone();
    (rt, sid)
}

const RUNS_TOML: &str = r#"
[[runs]]
pattern = "*"
[runs.config]
model = "base"
temperature = 0.5
[runs.secrets]
SHARED = "s-shared"

[[runs]]
pattern = "build-*"
[runs.config]
model = "builder"
[runs.secrets]
API_KEY = "s-build"
"#;

#[tokio::test]
async fn config_and_secrets_resolve_by_run_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rungate.toml");
    std::fs::write(&path, RUNS_TOML).unwrap();
    let gw = TestGateway::start_with(|c| c.config_file = Some(path.clone())).await;
    let (mut rt, sid) = attached(&gw, "build-7").await;
    let config = rt
        .ok(
            "config.get",
            json!({ "sessionId": sid, "runId": "build-7" }),
        )
        .await;
    assert_eq!(
        config["config"],
        json!({ "model": "builder", "temperature": 0.5 })
    );
    let secrets = rt
        .ok(
            "secrets.get",
            json!({ "sessionId": sid, "runId": "build-7" }),
        )
        .await;
    assert_eq!(
        secrets["secrets"],
        json!({ "API_KEY": "s-build", "SHARED": "s-shared" })
    );
    let some = rt
        .ok(
            "secrets.get",
            json!({ "sessionId": sid, "runId": "build-7", "names": ["API_KEY"] }),
        )
        .await;
    assert_eq!(some["secrets"], json!({ "API_KEY": "s-build" }));
    let missing = rt
        .call(
            "secrets.get",
            json!({ "sessionId": sid, "runId": "build-7", "names": ["NOPE"] }),
        )
        .await;
    assert_eq!(missing["error"]["code"], "NOT_FOUND");
    assert_eq!(missing["error"]["details"]["missing"], json!(["NOPE"]));
}

#[tokio::test]
async fn config_version_changes_with_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rungate.toml");
    std::fs::write(&path, RUNS_TOML).unwrap();
    let gw = TestGateway::start_with(|c| c.config_file = Some(path.clone())).await;
    let mut rt = gw.runtime("*").await;
    let v1 = rt.attach("build-1", "i", &[]).await["configVersion"].clone();
    let mut rt2 = gw.runtime("*").await;
    let v_same = rt2.attach("build-3", "i3", &[]).await["configVersion"].clone();
    assert_eq!(v1, v_same, "same effective config, same version");
    let mut rt3 = gw.runtime("*").await;
    let v_other = rt3.attach("deploy-1", "i4", &[]).await["configVersion"].clone();
    assert_ne!(v1, v_other, "another effective config");
    // Edit the file: the version follows.
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(&path, RUNS_TOML.replace("builder", "builder-v2")).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut rt4 = gw.runtime("*").await;
    let v_new = rt4.attach("build-4", "i5", &[]).await["configVersion"].clone();
    assert_ne!(v1, v_new, "the config file changed");
}

#[tokio::test]
async fn kv_is_scoped_per_run_and_atomic() {
    let gw = TestGateway::start().await;
    let (mut a, sa) = attached(&gw, "run-a").await;
    let (mut b, sb) = attached(&gw, "run-b").await;
    a.ok(
        "kv.set",
        json!({ "sessionId": sa, "runId": "run-a", "kv": { "x": "1", "y": "2" } }),
    )
    .await;
    let got = a
        .ok(
            "kv.get",
            json!({ "sessionId": sa, "runId": "run-a", "keys": ["x", "y", "z"] }),
        )
        .await;
    assert_eq!(got["kv"], json!({ "x": "1", "y": "2" }));
    let other = b
        .ok(
            "kv.get",
            json!({ "sessionId": sb, "runId": "run-b", "keys": ["x"] }),
        )
        .await;
    assert_eq!(other["kv"], json!({}));
    // A session's commands may not name another run.
    let code = a
        .err(
            "kv.get",
            json!({ "sessionId": sa, "runId": "run-b", "keys": ["x"] }),
        )
        .await;
    assert_eq!(code, "NOT_ATTACHED");
}

#[tokio::test]
async fn checkpoints_save_and_load_latest_or_named() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "run-c").await;
    let none = rt
        .call(
            "checkpoint.load",
            json!({ "sessionId": sid, "runId": "run-c" }),
        )
        .await;
    assert_eq!(none["error"]["code"], "NOT_FOUND");
    let first = rt
        .ok(
            "checkpoint.save",
            json!({ "sessionId": sid, "runId": "run-c", "data": { "step": 1 }, "checkpointId": "one" }),
        )
        .await;
    assert_eq!(first["checkpointId"], "one");
    assert!(first["savedAt"].is_string());
    let second = rt
        .ok(
            "checkpoint.save",
            json!({ "sessionId": sid, "runId": "run-c", "data": [1, 2, 3] }),
        )
        .await;
    let latest = rt
        .ok(
            "checkpoint.load",
            json!({ "sessionId": sid, "runId": "run-c" }),
        )
        .await;
    assert_eq!(latest["checkpointId"], second["checkpointId"]);
    assert_eq!(latest["data"], json!([1, 2, 3]));
    let named = rt
        .ok(
            "checkpoint.load",
            json!({ "sessionId": sid, "runId": "run-c", "checkpointId": "one" }),
        )
        .await;
    assert_eq!(named["data"], json!({ "step": 1 }));
    let missing = rt
        .call(
            "checkpoint.load",
            json!({ "sessionId": sid, "runId": "run-c", "checkpointId": "two" }),
        )
        .await;
    assert_eq!(missing["error"]["code"], "NOT_FOUND");
}

#[tokio::test]
async fn fifty_requests_in_flight_on_one_socket_are_matched_by_id() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "run-m").await;
    let mut ids = Vec::new();
    for i in 0..50 {
        let (kind, payload) = match i % 3 {
            0 => (
                "kv.set",
                json!({ "sessionId": sid, "runId": "run-m", "kv": { format!("k{i}"): format!("v{i}") } }),
            ),
            1 => (
                "runtime.heartbeat",
                json!({ "sessionId": sid, "runId": "run-m" }),
            ),
            _ => ("config.get", json!({ "sessionId": sid, "runId": "run-m" })),
        };
        ids.push((i, kind, rt.send(kind, payload).await));
    }
    // Collect answers in whatever order they come.
    let mut answers = std::collections::HashMap::new();
    while answers.len() < 50 {
        let frame = rt
            .wait_for(|v| v["type"] == "reply" || v["type"] == "error")
            .await;
        let id = frame["id"].as_str().unwrap().to_owned();
        assert!(answers.insert(id, frame).is_none(), "one answer per id");
    }
    for (i, kind, id) in ids {
        let frame = &answers[&id];
        assert_eq!(frame["type"], "reply", "{kind} #{i}: {frame}");
        match kind {
            "kv.set" => assert_eq!(frame["payload"], json!({ "accepted": true })),
            "runtime.heartbeat" => assert_eq!(frame["payload"]["accepted"], true),
            _ => assert!(frame["payload"]["config"].is_object()),
        }
    }
    // Applied in order: every key is there.
    let keys: Vec<String> = (0..50)
        .filter(|i| i % 3 == 0)
        .map(|i| format!("k{i}"))
        .collect();
    let got = rt
        .ok(
            "kv.get",
            json!({ "sessionId": sid, "runId": "run-m", "keys": keys }),
        )
        .await;
    assert_eq!(got["kv"].as_object().unwrap().len(), keys.len());
}

#[tokio::test]
async fn writes_on_one_socket_apply_in_the_order_sent() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "run-o").await;
    for i in 0..100 {
        rt.send(
            "kv.set",
            json!({ "sessionId": sid, "runId": "run-o", "kv": { "k": i.to_string() } }),
        )
        .await;
    }
    let got = rt
        .ok(
            "kv.get",
            json!({ "sessionId": sid, "runId": "run-o", "keys": ["k"] }),
        )
        .await;
    assert_eq!(got["kv"]["k"], "99");
}

/// Each error code a runtime socket can provoke, and the socket (and its
/// session) still works after every one.
#[tokio::test]
async fn every_bad_frame_gets_its_typed_error_and_the_socket_survives() {
    let gw = TestGateway::start_with(|c| c.limits.max_frame_bytes = 64 * 1024).await;
    let (mut rt, sid) = attached(&gw, "run-e").await;
    let long_id = "x".repeat(129);
    let cases: Vec<(String, &str, Value)> = vec![
        ("not json".into(), "BAD_FRAME", Value::Null),
        ("[1,2,3]".into(), "BAD_FRAME", Value::Null),
        (r#"{"type":"runtime.heartbeat","payload":{}}"#.into(), "BAD_FRAME", Value::Null),
        (r#"{"id":"","type":"runtime.heartbeat","payload":{}}"#.into(), "BAD_FRAME", Value::Null),
        (format!(r#"{{"id":"{long_id}","type":"runtime.heartbeat","payload":{{}}}}"#), "BAD_FRAME", Value::Null),
        (r#"{"id":"e1","payload":{}}"#.into(), "BAD_FRAME", json!("e1")),
        (r#"{"id":"e2","type":"runtime.fly","payload":{}}"#.into(), "UNKNOWN_TYPE", json!("e2")),
        (r#"{"id":"e3","type":"runtime.heartbeat","payload":{"runId":"run-e"}}"#.into(), "INVALID_PAYLOAD", json!("e3")),
        (
            format!(r#"{{"id":"e4","type":"runtime.heartbeat","payload":{{"sessionId":{sid},"runId":"run-e","extra":1}}}}"#),
            "INVALID_PAYLOAD",
            json!("e4"),
        ),
        (r#"{"id":"e5","type":"runs.list","payload":{}}"#.into(), "FORBIDDEN", json!("e5")),
        (
            r#"{"id":"e6","type":"runtime.heartbeat","payload":{"sessionId":"0123456789abcdef0123456789abcdef","runId":"run-e"}}"#.into(),
            "NOT_ATTACHED",
            json!("e6"),
        ),
    ];
    for (text, code, id) in &cases {
        rt.send_text(text).await;
        let frame = rt
            .wait_for(|v| v["type"] == "error" && v["id"] == *id)
            .await;
        assert_eq!(frame["error"]["code"], *code, "for {text}: {frame}");
        assert_eq!(frame["error"]["retryable"], false);
    }
    let invalid = rt
        .call(
            "runtime.heartbeat",
            json!({ "sessionId": sid, "runId": "run-e", "extra": 1 }),
        )
        .await;
    assert_eq!(invalid["error"]["details"]["path"], "/payload/extra");

    rt.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    let frame = rt
        .wait_for(|v| v["type"] == "error" && v["id"].is_null())
        .await;
    assert_eq!(frame["error"]["code"], "BAD_FRAME");

    // After all that, the session is fine.
    rt.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sid, "runId": "run-e" }),
    )
    .await;

    // Too large: an error (or close 1009), and the socket closes.
    let huge = format!(
        r#"{{"id":"big","type":"config.get","payload":{{"pad":"{}"}}}}"#,
        "x".repeat(70 * 1024)
    );
    rt.send_text(&huge).await;
    let frames = rt.until_closed().await;
    assert!(
        frames
            .iter()
            .any(|f| f["error"]["code"] == "PAYLOAD_TOO_LARGE"),
        "expected PAYLOAD_TOO_LARGE before the close: {frames:?}"
    );
    // The session outlives its socket.
    let mut again = gw.runtime("*").await;
    let moved = again.reattach("run-e", "inst", 1, &ALL_CAPS).await;
    assert_eq!(moved["payload"]["sessionId"], sid);
}

#[tokio::test]
async fn one_clients_bad_frames_do_not_touch_another_socket() {
    let gw = TestGateway::start().await;
    let (mut good, sid) = attached(&gw, "good").await;
    let mut bad = gw.runtime("*").await;
    for _ in 0..200 {
        bad.send_text("{{{{").await;
    }
    good.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sid, "runId": "good" }),
    )
    .await;
    for _ in 0..200 {
        bad.wait_for(|v| v["error"]["code"] == "BAD_FRAME").await;
    }
}

#[tokio::test]
async fn handshakes_without_a_good_token_are_refused_before_the_upgrade() {
    let gw = TestGateway::start().await;
    let url = gw.url("/v1/runtime");
    assert_eq!(connect_status(&url, None).await, 401);
    assert_eq!(connect_status(&url, Some("garbage")).await, 401);
    let other_key = rungate::auth::AuthKey::from_secret(&[7u8; 32]);
    let forged = mint(&other_key, TokenKind::Runtime, "*", &[]);
    assert_eq!(connect_status(&url, Some(&forged)).await, 401);
    let viewer = gw.token(TokenKind::Viewer, "*", &[]);
    assert_eq!(connect_status(&url, Some(&viewer)).await, 403);
    let runtime = gw.token(TokenKind::Runtime, "*", &[Capability::KvRead]);
    assert_eq!(
        connect_status(&gw.url("/v1/stream"), Some(&runtime)).await,
        403
    );
    assert_eq!(connect_status(&url, Some(&runtime)).await, 101);
    // The browser form, ?token=.
    let with_query = format!("{url}?token={runtime}");
    assert_eq!(connect_status(&with_query, None).await, 101);
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let gw = TestGateway::start().await;
    assert_eq!(http_get(gw.addr, "/healthz").await.0, 200);
    assert_eq!(http_get(gw.addr, "/readyz").await.0, 200);
    let (_rt, _sid) = attached(&gw, "run-metrics").await;
    let (status, body) = http_get(gw.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("rungate_connections{endpoint=\"runtime\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("rungate_sessions{state=\"attached\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("rungate_commands_total{type=\"runtime.attach\",outcome=\"ok\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("rungate_command_duration_seconds_bucket"),
        "{body}"
    );
    assert_eq!(http_get(gw.addr, "/nope").await.0, 404);
}

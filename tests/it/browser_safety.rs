//! Browser safety over real sockets: the `Origin` allow-list on every
//! endpoint a page can reach, viewer tokens that never reach runtime
//! commands, and logs that never carry a token or a secret.

use crate::harness::*;
use rungate::auth::{AuthKey, TokenKind};
use rungate::ids::Capability;
use rungate::origin::AllowedOrigins;
use rungate_test_support::http;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const EVIL: &str = "http://evil.example";

/// A WebSocket handshake with `token` (as a bearer header) and `origin`:
/// 101, or the refusal's status and JSON body.
async fn ws_handshake(url: &str, token: &str, origin: Option<&str>) -> (u16, Option<Value>) {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    if let Some(o) = origin {
        req.headers_mut()
            .insert("origin", HeaderValue::from_str(o).unwrap());
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("an answer in time")
    {
        Ok(_) => (101, None),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            let json = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("a JSON body ({e}): {body:?}"));
            (resp.status().as_u16(), Some(json))
        }
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

fn assert_forbidden(what: &str, status: u16, body: &Value) {
    assert_eq!(status, 403, "{what}: {body}");
    assert_eq!(body["error"]["code"], "FORBIDDEN", "{what}: {body}");
    assert_eq!(body["error"]["retryable"], false, "{what}: {body}");
    assert!(body["error"]["message"].is_string(), "{what}: {body}");
}

/// Every browser-facing endpoint with `origin`: the statuses, in a fixed
/// order (runtime socket, viewer socket, runs list, SSE, page, script).
async fn statuses_with_origin(gw: &TestGateway, origin: Option<&str>) -> Vec<(String, u16)> {
    let viewer = gw.token(TokenKind::Viewer, "*", &[]);
    let runtime = gw.token(TokenKind::Runtime, "*", &Capability::ALL);
    let mut out = Vec::new();
    let (s, body) = ws_handshake(&gw.url("/v1/runtime"), &runtime, origin).await;
    out.push(("/v1/runtime".to_owned(), s, body));
    let (s, body) = ws_handshake(&gw.url("/v1/stream"), &viewer, origin).await;
    out.push(("/v1/stream".to_owned(), s, body));
    let bearer = format!("Bearer {viewer}");
    for path in ["/v1/runs", "/v1/runs/r1/events", "/", "/assets/app.js"] {
        let mut headers = vec![("authorization", bearer.as_str())];
        if let Some(o) = origin {
            headers.push(("origin", o));
        }
        let r = http::get(gw.addr, path, &headers).await;
        let status = r.status;
        let body = if status == 403 {
            Some(r.json().await)
        } else {
            // An SSE body never ends; the status is all that is needed.
            None
        };
        out.push((path.to_owned(), status, body));
    }
    out.into_iter()
        .map(|(path, status, body)| {
            if status == 403 {
                assert_forbidden(&path, status, body.as_ref().unwrap());
            }
            (path, status)
        })
        .collect()
}

/// Whether every endpoint answered as it does for an allowed request:
/// 101 for the sockets, 200 for the rest.
fn all_allowed(statuses: &[(String, u16)]) -> bool {
    statuses.iter().all(|(path, status)| {
        let expected = match path.as_str() {
            "/v1/runtime" | "/v1/stream" => 101,
            _ => 200,
        };
        *status == expected
    })
}

#[tokio::test]
async fn a_foreign_origin_is_refused_on_every_browser_endpoint() {
    let gw = TestGateway::start().await;
    for origin in [EVIL, "null", "http://127.0.0.1:1"] {
        let statuses = statuses_with_origin(&gw, Some(origin)).await;
        assert!(
            statuses.iter().all(|(_, s)| *s == 403),
            "{origin}: {statuses:?}"
        );
    }
    // Probes are not browser-facing: no check.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            http::get(gw.addr, path, &[("origin", EVIL)]).await.status,
            200
        );
    }
    // No Origin (curl, runtimes) and the gateway's own origin (its
    // dashboard) are allowed, on the same gateway afterwards.
    let statuses = statuses_with_origin(&gw, None).await;
    assert!(all_allowed(&statuses), "{statuses:?}");
    let own = format!("http://{}", gw.addr);
    let statuses = statuses_with_origin(&gw, Some(&own)).await;
    assert!(all_allowed(&statuses), "{statuses:?}");
    // The refusals are counted.
    let metrics = http::get(gw.addr, "/metrics", &[]).await.text().await;
    assert!(
        metrics.contains("rungate_limit_refusals_total{limit=\"origin\"} 18"),
        "{metrics}"
    );
}

#[tokio::test]
async fn listed_origins_are_allowed_and_a_star_allows_any() {
    let gw = TestGateway::start_with(|c| {
        c.allowed_origins =
            AllowedOrigins::parse_list("https://app.example, http://localhost:3000").unwrap();
    })
    .await;
    for origin in ["https://app.example", "http://localhost:3000"] {
        let statuses = statuses_with_origin(&gw, Some(origin)).await;
        assert!(all_allowed(&statuses), "{origin}: {statuses:?}");
    }
    // Listing is exact: another scheme or port is another origin.
    for origin in ["http://app.example", "http://localhost:3001", EVIL] {
        let statuses = statuses_with_origin(&gw, Some(origin)).await;
        assert!(
            statuses.iter().all(|(_, s)| *s == 403),
            "{origin}: {statuses:?}"
        );
    }
    let any = TestGateway::start_with(|c| c.allowed_origins = AllowedOrigins::Any).await;
    let statuses = statuses_with_origin(&any, Some(EVIL)).await;
    assert!(all_allowed(&statuses), "{statuses:?}");
}

// ------------------------------------------------------ viewer tokens

const RUNTIME_COMMANDS: [&str; 10] = [
    "runtime.attach",
    "runtime.heartbeat",
    "runtime.recoverConnections",
    "secrets.get",
    "config.get",
    "kv.get",
    "kv.set",
    "events.publish",
    "checkpoint.save",
    "checkpoint.load",
];

#[tokio::test]
async fn a_viewer_token_never_grants_a_runtime_command() {
    let gw = TestGateway::start().await;
    // Even a viewer token that lists every capability.
    let viewer = gw.token(TokenKind::Viewer, "*", &Capability::ALL);
    // Not on the runtime socket, by header or by query string.
    let (status, body) = ws_handshake(&gw.url("/v1/runtime"), &viewer, None).await;
    assert_forbidden("viewer on /v1/runtime", status, &body.unwrap());
    let with_query = format!("{}?token={viewer}", gw.url("/v1/runtime"));
    match tokio_tungstenite::connect_async(with_query).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 403),
        other => panic!("a viewer token in the query opened /v1/runtime: {other:?}"),
    }

    // A live runtime session the viewer knows the id of.
    let mut rt = gw.runtime("*").await;
    let caps = [
        "kv.read",
        "kv.write",
        "secrets.read",
        "checkpoint.save",
        "checkpoint.load",
        "stream.resume",
    ];
    let sid = rt.attach("victim", "inst", &caps).await["sessionId"].clone();
    let mut v = Client::connect(&gw.url("/v1/stream"), &viewer).await;
    let payloads: [Value; 10] = [
        json!({ "runId": "victim", "runtimeInstanceId": "inst", "protocolVersion": "1",
                "reconnect": true, "connectionEpoch": 9 }),
        json!({ "sessionId": sid, "runId": "victim" }),
        json!({ "sessionId": sid, "mainRunId": "victim" }),
        json!({ "sessionId": sid, "runId": "victim" }),
        json!({ "sessionId": sid, "runId": "victim" }),
        json!({ "sessionId": sid, "runId": "victim", "keys": ["k"] }),
        json!({ "sessionId": sid, "runId": "victim", "kv": { "k": "from the viewer" } }),
        json!({ "sessionId": sid, "runId": "victim", "events": [{ "type": "log", "data": 1 }] }),
        json!({ "sessionId": sid, "runId": "victim", "data": "from the viewer" }),
        json!({ "sessionId": sid, "runId": "victim" }),
    ];
    for (kind, payload) in RUNTIME_COMMANDS.iter().zip(payloads) {
        let frame = v.call(kind, payload).await;
        assert_eq!(frame["type"], "error", "{kind}: {frame}");
        assert_eq!(frame["error"]["code"], "FORBIDDEN", "{kind}: {frame}");
    }
    // Nothing the viewer sent took effect: same session, no KV, no
    // checkpoint, no event.
    rt.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sid, "runId": "victim" }),
    )
    .await;
    let kv = rt
        .ok(
            "kv.get",
            json!({ "sessionId": sid, "runId": "victim", "keys": ["k"] }),
        )
        .await;
    assert_eq!(kv["kv"], json!({}));
    assert_eq!(
        rt.err(
            "checkpoint.load",
            json!({ "sessionId": sid, "runId": "victim" })
        )
        .await,
        "NOT_FOUND"
    );
    let resumed = v
        .ok(
            "stream.resume",
            json!({ "runId": "victim", "fromOffset": 0 }),
        )
        .await;
    assert_eq!(resumed["nextOffset"], 0);
    // The viewer socket itself still works for what it is for.
    v.ok("runs.list", json!({})).await;
}

// ---------------------------------------------------------------- logs

const SECRET: &str = "s3cr3t-VALUE-never-logged-7f1c";

/// `rungate serve` at the most verbose log level, its stderr in a file.
struct LoggedGateway {
    gateway: GatewayProcess,
    log: std::path::PathBuf,
    key: AuthKey,
    _dir: tempfile::TempDir,
}

async fn logged_gateway() -> LoggedGateway {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rungate.toml");
    std::fs::write(
        &config,
        format!("[[runs]]\npattern = \"*\"\n[runs.secrets]\nAPI_KEY = \"{SECRET}\"\n"),
    )
    .unwrap();
    let data = data_dir(&dir);
    let log = dir.path().join("stderr.log");
    let config_arg = config.to_str().unwrap();
    let mut command = GatewayProcess::command(&data, &["--config", config_arg]);
    command
        .env("RUNGATE_LOG", "trace")
        .stderr(std::fs::File::create(&log).unwrap());
    let gateway = GatewayProcess::start(command).await;
    let key = AuthKey::load_or_create(&data.join("auth.key")).unwrap();
    LoggedGateway {
        gateway,
        log,
        key,
        _dir: dir,
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn tokens_in_query_strings_and_secrets_never_reach_the_logs() {
    let gw = logged_gateway().await;
    let runtime = mint(&gw.key, TokenKind::Runtime, "*", &Capability::ALL);
    let viewer = mint(&gw.key, TokenKind::Viewer, "*", &[]);
    let addr = gw.gateway.addr;

    // A runtime whose token travels in the query string, as a browser's
    // would, reads the secret over the wire.
    let url = format!("ws://{addr}/v1/runtime?token={runtime}");
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");
    let mut rt = Client::from_stream(ws);
    let sid = rt
        .attach("logged", "inst", &["secrets.read", "kv.write"])
        .await["sessionId"]
        .clone();
    let secrets = rt
        .ok(
            "secrets.get",
            json!({ "sessionId": sid, "runId": "logged" }),
        )
        .await;
    assert_eq!(
        secrets["secrets"]["API_KEY"], SECRET,
        "the secret went over the wire"
    );
    rt.err(
        "secrets.get",
        json!({ "sessionId": sid, "runId": "logged", "names": ["MISSING"] }),
    )
    .await;
    // Error paths that carry the request: a frame over a limit, a bad frame.
    rt.err(
        "kv.set",
        json!({ "sessionId": sid, "runId": "logged", "kv": { "k".repeat(600): SECRET } }),
    )
    .await;
    rt.send_text(&format!("{{\"not json {runtime} {SECRET}"))
        .await;
    rt.wait_for(|v| v["error"]["code"] == "BAD_FRAME").await;

    // Viewer requests with the token in the query: the runs list, SSE,
    // refusals (a bad token, a foreign origin, the wrong kind).
    let r = http::get(addr, &format!("/v1/runs?token={viewer}"), &[]).await;
    assert_eq!(r.status, 200);
    let sse = http::get(addr, &format!("/v1/runs/logged/events?token={viewer}"), &[]).await;
    assert_eq!(sse.status, 200);
    drop(sse);
    let forged = format!("{viewer}x");
    let r = http::get(addr, &format!("/v1/runs?token={forged}"), &[]).await;
    assert_eq!(r.status, 401);
    let r = http::get(
        addr,
        &format!("/v1/runs?token={viewer}"),
        &[("origin", EVIL)],
    )
    .await;
    assert_eq!(r.status, 403);
    let r = http::get(addr, &format!("/v1/stream?token={runtime}"), &[]).await;
    assert_eq!(r.status, 403);
    rt.close().await;

    // Drain, so everything is written.
    assert_eq!(gw.gateway.terminate().await, Some(0), "drains and exits 0");
    let log = std::fs::read_to_string(&gw.log).unwrap();
    // The log is there and verbose, so its silence below means something.
    assert!(
        log.contains("session attached"),
        "debug lines missing:\n{log}"
    );
    assert!(log.contains("drained"), "{log}");
    // A JWT's signature part is what makes it a credential.
    let signature = |t: &str| t.rsplit('.').next().unwrap().to_owned();
    for (what, needle) in [
        ("runtime token", signature(&runtime)),
        ("viewer token", signature(&viewer)),
        ("forged token", signature(&forged)),
        ("secret", SECRET.to_owned()),
        ("secret, hex", hex(SECRET)),
    ] {
        assert!(!log.contains(&needle), "the {what} is in the log");
    }
}

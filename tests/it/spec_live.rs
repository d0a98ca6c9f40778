//! The wire contract, live: real gateways, real sockets, and every frame
//! checked against `spec/v1`.
//!
//! One scenario drives every command of `/v1/runtime` and `/v1/stream` (with
//! a successful reply), provokes every error code a frame can carry, and
//! triggers the pushes `stream.events`, `session.superseded`,
//! `session.expired`, `gateway.draining`, `run.cancelRequested` and
//! `stream.ended` (a viewer's stop, then the run's end). Every request sent is kept and checked with
//! [`Spec::check_request`]; every frame received (the harness records them in
//! `Client::seen`) is checked by its kind: replies against the response
//! definition of the command they answer, errors against the error envelope,
//! pushes against their push definition. All failures are collected and
//! reported together.
//!
//! Coverage is asserted too, against the spec itself: the command types that
//! got a valid reply must be every command in `spec/v1/commands.json` except
//! those in [`NOT_DRIVEN`], and likewise for push types ([`PUSHES_NOT_SEEN`])
//! and error codes ([`CODES_NOT_PROVOKED`]). So coverage cannot drop silently,
//! and a new command in the spec fails this test until it is driven here.
//!
//! To drive one more command type: add a [`Step`] to [`session_steps`] (or
//! to [`refusals`] for an error), and delete its line from [`NOT_DRIVEN`].

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::harness::*;
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use rungate_test_support::schema::Spec;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Command types of `spec/v1/commands.json` this test does not drive yet.
const NOT_DRIVEN: [(&str, &str); 0] = [];

/// Push types of the index no socket here receives, and why.
const PUSHES_NOT_SEEN: [(&str, &str); 2] = [
    (
        "stream.gap",
        "needs a reader stalled behind full socket buffers; tests/streams.rs provokes it and checks it against the schema",
    ),
    (
        "stream.closed",
        "needs a stream's retention to pass; tests/streams.rs waits for it and checks it against the schema",
    ),
];

/// Codes of `envelope.json#/$defs/ErrorCode` no frame here carries.
const CODES_NOT_PROVOKED: [(&str, &str); 2] = [
    (
        "UNAUTHENTICATED",
        "a bad token is refused with HTTP 401 before the upgrade, never in a frame",
    ),
    (
        "INTERNAL",
        "only a failing store or stream engine answers it",
    ),
];

/// The run config and secrets the main gateway serves (`--config`).
const RUNS_TOML: &str = r#"
[[runs]]
pattern = "*"
[runs.config]
model = "base"
temperature = 0.5
[runs.secrets]
API_KEY = "s-api"
OTHER = "s-other"
"#;

const RUN: &str = "spec-run";
/// The main gateway's KV quota per tenant: small enough for one refusal.
const KV_QUOTA_BYTES: u64 = 4096;
/// Where the details of a `QUOTA_EXCEEDED` are defined.
const QUOTA_DETAILS: &str = "frames/envelope.json#/$defs/QuotaExceededDetails";
const SUB_RUN: &str = "spec-run.sub";
const INSTANCE: &str = "inst-1";
/// A sessionId bound nowhere.
const UNKNOWN_SID: &str = "0123456789abcdef0123456789abcdef";

// ------------------------------------------------------------ recording

/// One socket, with everything sent on it remembered for the final audit.
struct Socket {
    name: &'static str,
    client: Client,
    next: u64,
    /// Request id → command type, for every id sent on this socket; `None`
    /// for the ids of deliberately malformed frames.
    kinds: HashMap<String, Option<String>>,
    /// Well-formed requests: each must satisfy the `Request` schema.
    sent: Vec<Value>,
    /// Deliberately malformed JSON requests: the schema must refuse each,
    /// as the gateway does.
    malformed: Vec<Value>,
    /// Ids whose answer cannot carry them (the gateway never read the
    /// frame, so it answers under `"id": null`).
    unreadable: Vec<String>,
}

impl Socket {
    async fn open(name: &'static str, gw: &TestGateway, token: &str) -> Socket {
        Self::open_at(name, gw, "/v1/runtime", token).await
    }

    async fn open_at(name: &'static str, gw: &TestGateway, path: &str, token: &str) -> Socket {
        Socket {
            name,
            client: Client::connect(&gw.url(path), token).await,
            next: 0,
            kinds: HashMap::new(),
            sent: Vec::new(),
            malformed: Vec::new(),
            unreadable: Vec::new(),
        }
    }

    /// A socket whose token covers every run with every capability.
    async fn all_caps(name: &'static str, gw: &TestGateway) -> Socket {
        let token = gw.token(TokenKind::Runtime, "*", &Capability::ALL);
        Self::open(name, gw, &token).await
    }

    /// Builds, records and sends a well-formed request; returns its id.
    async fn send(&mut self, kind: &str, payload: Value) -> String {
        self.next += 1;
        let id = format!("{}-{}", self.name, self.next);
        let frame = json!({ "id": id, "type": kind, "payload": payload });
        self.client.send_text(&frame.to_string()).await;
        self.kinds.insert(id.clone(), Some(kind.to_owned()));
        self.sent.push(frame);
        id
    }

    /// Sends a well-formed request the gateway cannot read (over the size
    /// limit): its answer comes under `"id": null`, not under its id.
    async fn send_unreadable(&mut self, kind: &str, payload: Value) {
        let id = self.send(kind, payload).await;
        self.unreadable.push(id);
    }

    /// Sends a request and waits for its answer frame (reply or error).
    async fn call(&mut self, kind: &str, payload: Value) -> Value {
        let id = self.send(kind, payload).await;
        self.client.answer(&id).await
    }

    /// Sends a request that must succeed; returns the reply payload.
    async fn ok(&mut self, kind: &str, payload: Value) -> Value {
        let frame = self.call(kind, payload).await;
        assert_eq!(
            frame["type"], "reply",
            "[{}] {kind} should succeed: {frame}",
            self.name
        );
        frame["payload"].clone()
    }

    /// Sends a request that must fail with `code`; returns the error body.
    async fn fails(&mut self, kind: &str, payload: Value, code: &str) -> Value {
        let frame = self.call(kind, payload).await;
        assert_eq!(
            frame["error"]["code"], code,
            "[{}] {kind} should fail with {code}: {frame}",
            self.name
        );
        frame["error"].clone()
    }

    /// Sends `text` as is and waits for the error frame under `answer_id`
    /// (`None`: `"id": null`) with `code`; returns the error body. Text that
    /// parses as JSON is kept for the audit, which expects the schema to
    /// refuse it too.
    async fn malformed(&mut self, text: &str, answer_id: Option<&str>, code: &str) -> Value {
        if let Ok(v) = serde_json::from_str::<Value>(text) {
            self.malformed.push(v);
        }
        if let Some(id) = answer_id {
            self.kinds.insert(id.to_owned(), None);
        }
        self.client.send_text(text).await;
        self.error_under(answer_id, code, text).await
    }

    async fn error_under(&mut self, answer_id: Option<&str>, code: &str, sent: &str) -> Value {
        let id = answer_id.map_or(Value::Null, |i| json!(i));
        let frame = self
            .client
            .wait_for(|v| v["type"] == "error" && v["id"] == id)
            .await;
        assert_eq!(
            frame["error"]["code"], code,
            "[{}] for {sent}: {frame}",
            self.name
        );
        frame["error"].clone()
    }

    /// Waits for the next push of type `kind`; returns its payload.
    async fn push(&mut self, kind: &str) -> Value {
        self.client.push(kind).await
    }

    /// Reads everything left until the gateway closes the socket, so the
    /// audit sees every frame it was sent.
    async fn finish(&mut self) {
        self.client.until_closed().await;
    }
}

// ---------------------------------------------------------------- steps

/// What a [`Step`] must get back.
enum Expect {
    /// A reply, whose payload the function checks (beyond the schema).
    Reply(fn(&Value)),
    /// An error frame with this code.
    Error(&'static str),
}

/// One request on an attached session, and what it must get back.
struct Step {
    kind: &'static str,
    payload: Value,
    expect: Expect,
}

fn reply(kind: &'static str, payload: Value, check: fn(&Value)) -> Step {
    Step {
        kind,
        payload,
        expect: Expect::Reply(check),
    }
}

fn error(kind: &'static str, payload: Value, code: &'static str) -> Step {
    Step {
        kind,
        payload,
        expect: Expect::Error(code),
    }
}

fn no_check(_: &Value) {}

/// Every command a session uses, once or more, in an order that makes each
/// answer predictable. `sid` is the session of [`RUN`].
fn session_steps(sid: &str) -> Vec<Step> {
    let at = |extra: Value| {
        let mut p = json!({ "sessionId": sid, "runId": RUN });
        if let (Some(p), Value::Object(extra)) = (p.as_object_mut(), extra) {
            p.extend(extra);
        }
        p
    };
    vec![
        reply("runtime.heartbeat", at(json!({})), |p| {
            assert_eq!(p["accepted"], true)
        }),
        reply(
            "runtime.heartbeat",
            at(
                json!({ "runtimeInstanceId": INSTANCE, "metadata": { "step": "warmup", "load": 0.25 } }),
            ),
            |p| assert_eq!(p["accepted"], true),
        ),
        reply("config.get", at(json!({})), |p| {
            assert_eq!(p["config"], json!({ "model": "base", "temperature": 0.5 }))
        }),
        reply("secrets.get", at(json!({})), |p| {
            assert_eq!(
                p["secrets"],
                json!({ "API_KEY": "s-api", "OTHER": "s-other" })
            )
        }),
        reply("secrets.get", at(json!({ "names": ["API_KEY"] })), |p| {
            assert_eq!(p["secrets"], json!({ "API_KEY": "s-api" }))
        }),
        error("secrets.get", at(json!({ "names": ["NOPE"] })), "NOT_FOUND"),
        reply("kv.set", at(json!({ "kv": { "a": "1", "b": "2" } })), |p| {
            assert_eq!(p, &json!({ "accepted": true }))
        }),
        reply("kv.set", at(json!({ "kv": {} })), no_check),
        reply(
            "kv.get",
            at(json!({ "keys": ["a", "b", "missing"] })),
            |p| assert_eq!(p["kv"], json!({ "a": "1", "b": "2" })),
        ),
        reply("kv.get", at(json!({ "keys": [] })), |p| {
            assert_eq!(p["kv"], json!({}))
        }),
        reply(
            "kv.delete",
            at(json!({ "keys": ["b", "missing", "b"] })),
            |p| assert_eq!(p, &json!({ "deleted": 1 })),
        ),
        reply("kv.delete", at(json!({ "keys": [] })), |p| {
            assert_eq!(p, &json!({ "deleted": 0 }))
        }),
        reply("kv.get", at(json!({ "keys": ["a", "b"] })), |p| {
            assert_eq!(p["kv"], json!({ "a": "1" }))
        }),
        error("checkpoint.load", at(json!({})), "NOT_FOUND"),
        reply(
            "checkpoint.save",
            at(json!({ "checkpointId": "cp-1", "data": { "step": 1, "notes": ["a", null] } })),
            |p| assert_eq!(p["checkpointId"], "cp-1"),
        ),
        // No checkpointId: the gateway picks one.
        reply("checkpoint.save", at(json!({ "data": [1, 2, 3] })), |p| {
            assert!(p["checkpointId"].is_string())
        }),
        // Latest.
        reply("checkpoint.load", at(json!({})), |p| {
            assert_eq!(p["data"], json!([1, 2, 3]))
        }),
        // By id.
        reply(
            "checkpoint.load",
            at(json!({ "checkpointId": "cp-1" })),
            |p| {
                assert_eq!(p["checkpointId"], "cp-1");
                assert_eq!(p["data"], json!({ "step": 1, "notes": ["a", null] }));
            },
        ),
        error(
            "checkpoint.load",
            at(json!({ "checkpointId": "cp-none" })),
            "NOT_FOUND",
        ),
        // `data` may be any JSON, null included.
        reply(
            "checkpoint.save",
            at(json!({ "checkpointId": "cp-null", "data": null })),
            no_check,
        ),
        reply(
            "checkpoint.load",
            at(json!({ "checkpointId": "cp-null" })),
            |p| assert_eq!(p["data"], Value::Null),
        ),
        reply(
            "events.publish",
            at(json!({ "events": [
                { "type": "log", "data": { "line": "hello" } },
                { "type": "progress", "seq": 1, "timestamp": "2026-11-28T10:00:00+01:00", "data": 0.5 },
                { "type": "done" },
            ] })),
            |p| assert_eq!(p, &json!({ "accepted": true })),
        ),
        reply("events.publish", at(json!({ "events": [] })), no_check),
        reply("stream.resume", at(json!({ "fromOffset": 1 })), |p| {
            assert_eq!(
                (&p["startOffset"], &p["nextOffset"]),
                (&json!(1), &json!(3))
            )
        }),
        reply("stream.cancel", at(json!({})), |p| {
            assert_eq!(p, &json!({ "accepted": true }))
        }),
    ]
}

/// Well-formed requests the gateway refuses on a socket holding session
/// `sid` of [`RUN`].
fn refusals(sid: &str) -> Vec<Step> {
    vec![
        error(
            "runtime.heartbeat",
            json!({ "sessionId": UNKNOWN_SID, "runId": RUN }),
            "NOT_ATTACHED",
        ),
        // Right session, wrong run.
        error(
            "kv.get",
            json!({ "sessionId": sid, "runId": "spec-other", "keys": ["a"] }),
            "NOT_ATTACHED",
        ),
        // Offered on /v1/stream only.
        error("runs.list", json!({}), "FORBIDDEN"),
        // On /v1/runtime the session is required.
        error("stream.resume", json!({ "runId": RUN }), "INVALID_PAYLOAD"),
        error(
            "runtime.attach",
            json!({ "runId": "spec-v2", "runtimeInstanceId": INSTANCE, "protocolVersion": "2" }),
            "UNSUPPORTED_PROTOCOL",
        ),
        // Nothing to reconnect to.
        error(
            "runtime.attach",
            json!({ "runId": "spec-never", "runtimeInstanceId": INSTANCE, "protocolVersion": "1",
                    "reconnect": true, "connectionEpoch": 3 }),
            "SESSION_EXPIRED",
        ),
        // More KV than the tenant may hold (KV_QUOTA_BYTES).
        error(
            "kv.set",
            json!({ "sessionId": sid, "runId": RUN, "kv": { "big": "x".repeat(KV_QUOTA_BYTES as usize) } }),
            "QUOTA_EXCEEDED",
        ),
    ]
}

async fn run_steps(socket: &mut Socket, steps: Vec<Step>) {
    for step in steps {
        let frame = socket.call(step.kind, step.payload.clone()).await;
        match step.expect {
            Expect::Reply(check) => {
                assert_eq!(
                    frame["type"], "reply",
                    "[{}] {} {} should succeed: {frame}",
                    socket.name, step.kind, step.payload
                );
                check(&frame["payload"]);
            }
            Expect::Error(code) => assert_eq!(
                frame["error"]["code"], code,
                "[{}] {} {} should fail with {code}: {frame}",
                socket.name, step.kind, step.payload
            ),
        }
    }
}

// ---------------------------------------------------------------- audit

/// What the frames of all sockets added up to.
#[derive(Default)]
struct Audit {
    failures: Vec<String>,
    replies: BTreeSet<String>,
    pushes: BTreeSet<String>,
    codes: BTreeSet<String>,
    requests: usize,
    received: usize,
}

impl Audit {
    fn fail(&mut self, socket: &str, what: &str, frame: &Value, why: String) {
        self.failures
            .push(format!("[{socket}] {what}: {frame}\n      {why}"));
    }

    fn socket(&mut self, spec: &Spec, s: &Socket) {
        for frame in &s.sent {
            self.requests += 1;
            if let Err(e) = spec.check_request(frame) {
                self.fail(s.name, "request sent", frame, e);
            }
        }
        for frame in &s.malformed {
            self.requests += 1;
            if spec.check_request(frame).is_ok() {
                self.fail(
                    s.name,
                    "malformed request",
                    frame,
                    "the gateway refused it, but the Request schema accepts it".into(),
                );
            }
        }
        // Answers (replies and errors) per request id.
        let mut answers: HashMap<&str, usize> = HashMap::new();
        for (i, frame) in s.client.seen.iter().enumerate() {
            self.received += 1;
            let what = format!("received #{i}");
            let id = frame.get("id").and_then(Value::as_str);
            let known = id.map(|id| s.kinds.get(id));
            if let (Some(id), Some("reply" | "error")) = (id, frame["type"].as_str()) {
                *answers.entry(id).or_default() += 1;
            }
            match frame["type"].as_str() {
                Some("reply") => match known {
                    Some(Some(Some(kind))) => match spec.check_reply(kind, frame) {
                        Ok(()) => {
                            self.replies.insert(kind.clone());
                        }
                        Err(e) => self.fail(s.name, &format!("{what}, {kind} reply"), frame, e),
                    },
                    Some(Some(None)) => {
                        self.fail(s.name, &what, frame, "a reply to a malformed frame".into())
                    }
                    _ => self.fail(s.name, &what, frame, "a reply to no request".into()),
                },
                Some("error") => {
                    if let Err(e) = spec.check_error(frame) {
                        self.fail(s.name, &format!("{what}, error"), frame, e);
                    } else if let Some(code) = frame["error"]["code"].as_str() {
                        self.codes.insert(code.to_owned());
                    }
                    if frame["error"]["code"] == "QUOTA_EXCEEDED"
                        && let Err(e) = spec.check_def(QUOTA_DETAILS, &frame["error"]["details"])
                    {
                        self.fail(s.name, &format!("{what}, quota details"), frame, e);
                    }
                    if let Some(None) = known {
                        self.fail(
                            s.name,
                            &what,
                            frame,
                            "an error under an id never sent".into(),
                        );
                    }
                }
                _ => match spec.check_push(frame) {
                    Ok(()) => {
                        self.pushes
                            .insert(frame["type"].as_str().unwrap_or_default().to_owned());
                    }
                    Err(e) => self.fail(s.name, &format!("{what}, push"), frame, e),
                },
            }
        }
        // Every request is answered exactly once, under its id.
        for id in s.kinds.keys() {
            let want = usize::from(!s.unreadable.contains(id));
            let got = answers.get(id.as_str()).copied().unwrap_or(0);
            if got != want {
                self.failures.push(format!(
                    "[{}] request {id:?}: {got} answers under its id, expected {want}",
                    s.name
                ));
            }
        }
    }
}

/// `all` minus the names in `except`, which must all be in `all`.
fn expected(all: impl IntoIterator<Item = String>, except: &[(&str, &str)]) -> BTreeSet<String> {
    let mut set: BTreeSet<String> = all.into_iter().collect();
    for (name, _) in except {
        assert!(
            set.remove(*name),
            "{name} is listed as not covered but is not in the spec"
        );
    }
    set
}

fn missing_and_extra(what: &str, got: &BTreeSet<String>, want: &BTreeSet<String>) -> String {
    let missing: Vec<_> = want.difference(got).collect();
    let extra: Vec<_> = got.difference(want).collect();
    format!(
        "{what}: not covered {missing:?}; covered but listed as not covered {extra:?} (update the list)"
    )
}

// ------------------------------------------------------------- scenario

#[tokio::test]
async fn every_frame_of_a_live_session_matches_the_spec() {
    let spec = Spec::load();
    let files = tempfile::tempdir().unwrap();
    let config_file = files.path().join("rungate.toml");
    std::fs::write(&config_file, RUNS_TOML).unwrap();
    let mut gw = TestGateway::start_with(|c| {
        c.config_file = Some(config_file.clone());
        c.limits.max_frame_bytes = 64 * 1024;
        c.limits.max_subscriptions_per_socket = 2;
        c.limits.max_kv_bytes_per_tenant = KV_QUOTA_BYTES;
        // Long enough to be refused DRAINING before the socket closes.
        c.reconnect_after = Duration::from_millis(1500);
    })
    .await;
    let mut done: Vec<Socket> = Vec::new();

    // --- the main session: a fresh attach, then every command.
    let mut main = Socket::all_caps("main", &gw).await;
    let attached = main
        .ok(
            "runtime.attach",
            json!({ "runId": RUN, "runtimeInstanceId": INSTANCE, "attemptId": "attempt-1",
                    "protocolVersion": "1", "connectionEpoch": 1, "capabilities": all_caps() }),
        )
        .await;
    let sid = attached["sessionId"]
        .as_str()
        .expect("sessionId")
        .to_owned();
    assert_eq!(attached["runId"], RUN);
    run_steps(&mut main, session_steps(&sid)).await;
    run_steps(&mut main, refusals(&sid)).await;

    // A sub-run on the same socket and instance (main holds subtasks.run).
    let sub = main
        .ok(
            "runtime.attach",
            json!({ "runId": SUB_RUN, "runtimeInstanceId": INSTANCE, "protocolVersion": "1.0",
                    "connectionEpoch": 1, "capabilities": ["kv.read"] }),
        )
        .await;
    let sub_sid = sub["sessionId"].as_str().expect("sessionId").to_owned();

    // --- malformed frames: each gets its error and the socket lives on.
    let long_id = "x".repeat(129);
    let hb = json!({ "sessionId": sid, "runId": RUN });
    let bad: Vec<(String, Option<&str>, &str)> = vec![
        ("not json".into(), None, "BAD_FRAME"),
        ("[1,2,3]".into(), None, "BAD_FRAME"),
        (
            json!({ "type": "runtime.heartbeat", "payload": hb }).to_string(),
            None,
            "BAD_FRAME",
        ),
        (
            json!({ "id": "", "type": "runtime.heartbeat", "payload": hb }).to_string(),
            None,
            "BAD_FRAME",
        ),
        (
            json!({ "id": long_id, "type": "runtime.heartbeat", "payload": hb }).to_string(),
            None,
            "BAD_FRAME",
        ),
        (
            json!({ "id": 7, "type": "runtime.heartbeat", "payload": hb }).to_string(),
            None,
            "BAD_FRAME",
        ),
        (
            json!({ "id": "m-notype", "payload": hb }).to_string(),
            Some("m-notype"),
            "BAD_FRAME",
        ),
        (
            json!({ "id": "m-member", "type": "runtime.heartbeat", "payload": hb, "extra": 1 })
                .to_string(),
            Some("m-member"),
            "INVALID_PAYLOAD",
        ),
        (
            json!({ "id": "m-nopayload", "type": "runtime.heartbeat" }).to_string(),
            Some("m-nopayload"),
            "INVALID_PAYLOAD",
        ),
        (
            json!({ "id": "m-unknown", "type": "runtime.fly", "payload": {} }).to_string(),
            Some("m-unknown"),
            "UNKNOWN_TYPE",
        ),
        (
            json!({ "id": "m-missing", "type": "runtime.heartbeat", "payload": { "runId": RUN } })
                .to_string(),
            Some("m-missing"),
            "INVALID_PAYLOAD",
        ),
        (
            json!({ "id": "m-type", "type": "kv.get",
                    "payload": { "sessionId": sid, "runId": RUN, "keys": [1] } })
            .to_string(),
            Some("m-type"),
            "INVALID_PAYLOAD",
        ),
        (
            json!({ "id": "m-evtype", "type": "events.publish",
                    "payload": { "sessionId": sid, "runId": RUN, "events": [{ "type": "" }] } })
            .to_string(),
            Some("m-evtype"),
            "INVALID_PAYLOAD",
        ),
    ];
    for (text, id, code) in &bad {
        main.malformed(text, *id, code).await;
    }
    let extra = main
        .malformed(
            &json!({ "id": "m-extra", "type": "runtime.heartbeat",
                     "payload": { "sessionId": sid, "runId": RUN, "extra": 1 } })
            .to_string(),
            Some("m-extra"),
            "INVALID_PAYLOAD",
        )
        .await;
    assert_eq!(extra["details"]["path"], "/payload/extra");
    main.client.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    main.error_under(None, "BAD_FRAME", "a binary frame").await;
    // Still attached after all that.
    main.ok("runtime.heartbeat", hb.clone()).await;

    // --- a token that covers less than the session asks for.
    let narrow = gw.token(TokenKind::Runtime, "spec-*", &[Capability::KvRead]);
    let mut limited = Socket::open("limited", &gw, &narrow).await;
    let refused = limited
        .fails(
            "runtime.attach",
            json!({ "runId": "spec-limited", "runtimeInstanceId": "inst-l", "protocolVersion": "1",
                    "capabilities": ["kv.read", "kv.write"] }),
            "FORBIDDEN",
        )
        .await;
    assert_eq!(refused["details"]["refused"], json!(["kv.write"]));
    limited
        .fails(
            "runtime.attach",
            json!({ "runId": "other-run", "runtimeInstanceId": "inst-l", "protocolVersion": "1" }),
            "FORBIDDEN",
        )
        .await;
    let lim_sid = limited
        .ok(
            "runtime.attach",
            json!({ "runId": "spec-limited", "runtimeInstanceId": "inst-l", "protocolVersion": "1" }),
        )
        .await["sessionId"]
        .clone();
    // kv.read was not asked for at attach.
    limited
        .fails(
            "kv.get",
            json!({ "sessionId": lim_sid, "runId": "spec-limited", "keys": ["a"] }),
            "FORBIDDEN",
        )
        .await;
    // A sub-run needs subtasks.run on the main session.
    limited
        .fails(
            "runtime.attach",
            json!({ "runId": "spec-limited.sub", "runtimeInstanceId": "inst-l", "protocolVersion": "1" }),
            "FORBIDDEN",
        )
        .await;

    // --- another socket contending for the run.
    let mut rival = Socket::all_caps("rival", &gw).await;
    rival
        .fails(
            "runtime.attach",
            json!({ "runId": RUN, "runtimeInstanceId": INSTANCE, "protocolVersion": "1" }),
            "CONFLICT",
        )
        .await;
    rival
        .fails(
            "runtime.attach",
            json!({ "runId": RUN, "runtimeInstanceId": "inst-other", "protocolVersion": "1",
                    "reconnect": true, "connectionEpoch": 9 }),
            "CONFLICT",
        )
        .await;
    let stale = rival
        .fails(
            "runtime.attach",
            json!({ "runId": RUN, "runtimeInstanceId": INSTANCE, "protocolVersion": "1",
                    "reconnect": true, "connectionEpoch": 1 }),
            "STALE_EPOCH",
        )
        .await;
    assert_eq!(stale["details"]["currentEpoch"], 1);
    rival
        .fails("runtime.heartbeat", hb.clone(), "NOT_ATTACHED")
        .await;

    // --- reconnect on a new socket at epoch 2, then recover the sub-run.
    let mut moved = Socket::all_caps("moved", &gw).await;
    let again = moved
        .ok(
            "runtime.attach",
            json!({ "runId": RUN, "runtimeInstanceId": INSTANCE, "attemptId": "attempt-1",
                    "protocolVersion": "1", "reconnect": true, "connectionEpoch": 2,
                    "capabilities": all_caps() }),
        )
        .await;
    assert_eq!(again["sessionId"], sid, "a reconnect keeps the session id");
    let superseded = main.push("session.superseded").await;
    assert_eq!(
        superseded,
        json!({ "sessionId": sid, "runId": RUN, "connectionEpoch": 2 })
    );
    main.fails("runtime.heartbeat", hb.clone(), "STALE_EPOCH")
        .await;
    // All or nothing: one sub-run that cannot move, and nothing moves.
    let partial = moved
        .fails(
            "runtime.recoverConnections",
            json!({ "sessionId": sid, "mainRunId": RUN, "subRunIds": [SUB_RUN, "spec-gone"] }),
            "SESSION_EXPIRED",
        )
        .await;
    assert_eq!(partial["details"]["runId"], "spec-gone");
    let sub_hb = json!({ "sessionId": sub_sid, "runId": SUB_RUN });
    main.ok("runtime.heartbeat", sub_hb.clone()).await;
    moved
        .ok(
            "runtime.recoverConnections",
            json!({ "sessionId": sid, "mainRunId": RUN, "subRunIds": [SUB_RUN], "connectionEpoch": 2 }),
        )
        .await;
    let superseded = main.push("session.superseded").await;
    assert_eq!(
        superseded,
        json!({ "sessionId": sub_sid, "runId": SUB_RUN, "connectionEpoch": 2 })
    );
    main.fails("runtime.heartbeat", sub_hb.clone(), "STALE_EPOCH")
        .await;
    moved.ok("runtime.heartbeat", sub_hb).await;
    // The session's state came along.
    let kv = moved
        .ok(
            "kv.get",
            json!({ "sessionId": sid, "runId": RUN, "keys": ["a"] }),
        )
        .await;
    assert_eq!(kv["kv"], json!({ "a": "1" }));

    // --- a dashboard on /v1/stream: resume, runs.list, cancel, its limits.
    let viewer_token = gw.token(TokenKind::Viewer, "spec-*", &[]);
    let mut dash = Socket::open_at("dash", &gw, "/v1/stream", &viewer_token).await;
    let resumed = dash
        .ok("stream.resume", json!({ "runId": RUN, "fromOffset": 0 }))
        .await;
    assert_eq!(resumed["truncated"], false);
    let events = dash.push("stream.events").await;
    assert_eq!(events["runId"], RUN);
    let listed = dash.ok("runs.list", json!({})).await;
    assert!(
        listed["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .any(|r| r["runId"] == RUN && r["state"] == "attached"),
        "{listed}"
    );
    dash.ok(
        "stream.resume",
        json!({ "runId": SUB_RUN, "streamEpoch": resumed["streamEpoch"] }),
    )
    .await;
    let limited_out = dash
        .fails(
            "stream.resume",
            json!({ "runId": "spec-third" }),
            "RATE_LIMITED",
        )
        .await;
    assert_eq!(limited_out["details"]["maxSubscriptionsPerSocket"], 2);
    dash.fails(
        "stream.resume",
        json!({ "runId": "elsewhere" }),
        "FORBIDDEN",
    )
    .await;
    dash.fails(
        "stream.resume",
        json!({ "runId": RUN, "sessionId": sid }),
        "INVALID_PAYLOAD",
    )
    .await;
    dash.ok("stream.cancel", json!({ "runId": SUB_RUN })).await;
    dash.fails(
        "events.publish",
        json!({ "sessionId": sid, "runId": RUN, "events": [] }),
        "FORBIDDEN",
    )
    .await;

    // --- a viewer's stop and the run's end (issue #15).
    let cancel_token = gw.token(TokenKind::Viewer, "spec-*", &[Capability::RunCancel]);
    let mut stopper = Socket::open_at("stopper", &gw, "/v1/stream", &cancel_token).await;
    dash.fails("run.cancel", json!({ "runId": RUN }), "FORBIDDEN")
        .await;
    moved
        .fails("run.cancel", json!({ "runId": RUN }), "FORBIDDEN")
        .await;
    let asked = stopper
        .ok(
            "run.cancel",
            json!({ "runId": RUN, "reason": "spec says stop" }),
        )
        .await;
    assert_eq!(asked, json!({ "delivered": true, "ended": false }));
    let request = moved.push("run.cancelRequested").await;
    assert_eq!(request["reason"], "spec says stop");
    let finished = moved
        .ok(
            "runtime.finish",
            json!({ "sessionId": sid, "runId": RUN, "outcome": "cancelled", "message": "stopped" }),
        )
        .await;
    assert_eq!(finished["accepted"], true);
    let ended = dash.push("stream.ended").await;
    assert_eq!(ended["outcome"], "cancelled");
    assert_eq!(ended["nextOffset"], finished["nextOffset"]);
    let refused = moved
        .fails(
            "events.publish",
            json!({ "sessionId": sid, "runId": RUN, "events": [{ "type": "late" }] }),
            "RUN_ENDED",
        )
        .await;
    assert_eq!(refused["details"]["outcome"], "cancelled");
    let after = stopper.ok("run.cancel", json!({ "runId": RUN })).await;
    assert_eq!(after, json!({ "delivered": false, "ended": true }));
    let resumed = stopper
        .ok("stream.resume", json!({ "runId": RUN, "fromOffset": 0 }))
        .await;
    assert_eq!(resumed["ended"], true);
    stopper.push("stream.ended").await;

    // --- a frame over the size limit: an error, then the socket closes.
    let mut oversize = Socket::all_caps("oversize", &gw).await;
    oversize
        .send_unreadable(
            "kv.set",
            json!({ "sessionId": UNKNOWN_SID, "runId": RUN, "kv": { "big": "x".repeat(70 * 1024) } }),
        )
        .await;
    oversize.finish().await;
    assert!(
        oversize
            .client
            .seen
            .iter()
            .any(|f| f["error"]["code"] == "PAYLOAD_TOO_LARGE" && f["id"].is_null()),
        "expected PAYLOAD_TOO_LARGE before the close: {:?}",
        oversize.client.seen
    );
    done.push(oversize);

    // --- drain: every socket is told; a new session is refused meanwhile.
    let mut late = Socket::all_caps("late", &gw).await;
    let ((), draining) = tokio::join!(gw.drain(), async {
        let draining = late.push("gateway.draining").await;
        let refused = late
            .fails(
                "runtime.attach",
                json!({ "runId": "spec-late", "runtimeInstanceId": "inst-late", "protocolVersion": "1" }),
                "DRAINING",
            )
            .await;
        assert_eq!(refused["retryable"], true);
        draining
    });
    assert_eq!(draining, json!({ "reconnectAfterMs": 1500 }));
    for mut s in [main, limited, rival, moved, late, dash, stopper] {
        s.finish().await;
        assert!(
            s.client
                .seen
                .iter()
                .any(|f| f["type"] == "gateway.draining"),
            "[{}] was not told about the drain",
            s.name
        );
        done.push(s);
    }

    // --- a lease that runs out: session.expired, then SESSION_EXPIRED.
    let mut short = TestGateway::start_with(|c| {
        c.lease_ttl = Duration::from_millis(300);
        c.reconnect_after = Duration::from_millis(100);
    })
    .await;
    let mut lapsed = Socket::all_caps("lapsed", &short).await;
    let gone = lapsed
        .ok(
            "runtime.attach",
            json!({ "runId": "spec-lapse", "runtimeInstanceId": "inst-x", "protocolVersion": "1" }),
        )
        .await["sessionId"]
        .clone();
    let expired = lapsed.push("session.expired").await;
    assert_eq!(expired, json!({ "sessionId": gone, "runId": "spec-lapse" }));
    lapsed
        .fails(
            "runtime.heartbeat",
            json!({ "sessionId": gone, "runId": "spec-lapse" }),
            "SESSION_EXPIRED",
        )
        .await;
    lapsed
        .fails(
            "runtime.attach",
            json!({ "runId": "spec-lapse", "runtimeInstanceId": "inst-x", "protocolVersion": "1",
                    "reconnect": true, "connectionEpoch": 1 }),
            "SESSION_EXPIRED",
        )
        .await;
    short.drain().await;
    lapsed.finish().await;
    done.push(lapsed);

    // --- the audit.
    let mut audit = Audit::default();
    for s in &done {
        audit.socket(&spec, s);
    }
    assert!(
        audit.failures.is_empty(),
        "{} of {} frames (sent and received) do not match spec/v1:\n  {}",
        audit.failures.len(),
        audit.requests + audit.received,
        audit.failures.join("\n  ")
    );

    let want_replies = expected(spec.commands().keys().cloned(), &NOT_DRIVEN);
    let want_pushes = expected(spec.pushes().keys().cloned(), &PUSHES_NOT_SEEN);
    let all_codes = spec
        .def_schema("frames/envelope.json#/$defs/ErrorCode")
        .and_then(|s| s["enum"].as_array())
        .expect("ErrorCode enum")
        .iter()
        .map(|c| c.as_str().expect("a code").to_owned());
    let want_codes = expected(all_codes, &CODES_NOT_PROVOKED);
    assert!(
        audit.replies == want_replies,
        "{}",
        missing_and_extra("command types replied to", &audit.replies, &want_replies)
    );
    assert!(
        audit.pushes == want_pushes,
        "{}",
        missing_and_extra("push types received", &audit.pushes, &want_pushes)
    );
    assert!(
        audit.codes == want_codes,
        "{}",
        missing_and_extra("error codes received", &audit.codes, &want_codes)
    );
}

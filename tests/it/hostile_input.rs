//! Hostile input on a live socket (issue #5): arbitrary and malformed JSON,
//! numbers out of range, deep nesting, invalid UTF-8, binary frames,
//! fragmented messages, protocol violations, ping floods.
//!
//! The rule every test holds the gateway to: no input ends the process or
//! disturbs anyone else. Each bad input gets a typed error frame and the
//! socket stays usable (a heartbeat on a session attached to it still
//! succeeds), or — where RFC 6455 says the connection must fail — a close
//! with the right code, and a session on another socket still works.
//! PROTOCOL.md §2 fixes the error codes; RFC 6455 §7.4.1 the close codes
//! (1002 protocol error, 1007 invalid UTF-8, 1009 too big).
//!
//! Case counts are modest: the suite shares two busy cores.

use crate::harness::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use rungate::protocol::ErrorCode;
use rungate_test_support::raw_ws::*;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

/// Every command type, for payload fuzzing.
const COMMANDS: [&str; 13] = [
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
    "stream.resume",
    "stream.cancel",
    "runs.list",
];

/// A runtime socket with a session of `run` attached.
async fn attached(gw: &TestGateway, run: &str) -> (Client, String) {
    let mut rt = gw.runtime("host-*").await;
    let reply = rt.attach(run, &format!("inst-{run}"), &all_caps()).await;
    let sid = reply["sessionId"].as_str().unwrap().to_owned();
    (rt, sid)
}

async fn heartbeat_ok(rt: &mut Client, sid: &str, run: &str) {
    rt.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sid, "runId": run }),
    )
    .await;
}

async fn raw_attached(gw: &TestGateway, run: &str) -> (RawWs, String) {
    let token = gw.token(TokenKind::Runtime, "host-*", &Capability::ALL);
    let mut ws = RawWs::connect(gw.addr, "/v1/runtime", &token).await;
    let reply = ws
        .call(
            "runtime.attach",
            json!({ "runId": run, "runtimeInstanceId": format!("inst-{run}"), "protocolVersion": "1" }),
        )
        .await;
    assert_eq!(reply["type"], "reply", "{reply}");
    let sid = reply["payload"]["sessionId"].as_str().unwrap().to_owned();
    (ws, sid)
}

async fn raw_heartbeat_ok(ws: &mut RawWs, sid: &str, run: &str) {
    let hb = ws
        .call(
            "runtime.heartbeat",
            json!({ "sessionId": sid, "runId": run }),
        )
        .await;
    assert_eq!(hb["type"], "reply", "{hb}");
}

/// An error frame that follows PROTOCOL.md §2 and spec/README.md: a code
/// from the closed list (never `INTERNAL` for bad input), a message,
/// `retryable`, object `details`, and `details.path` on `INVALID_PAYLOAD`.
fn well_formed_error(frame: &Value) -> ErrorCode {
    assert_eq!(frame["type"], "error", "{frame}");
    let e = &frame["error"];
    let code = e["code"]
        .as_str()
        .and_then(ErrorCode::parse)
        .unwrap_or_else(|| panic!("not a protocol error code: {frame}"));
    assert_ne!(
        code,
        ErrorCode::Internal,
        "bad input is not INTERNAL: {frame}"
    );
    assert!(
        e["message"].is_string() && e["retryable"].is_boolean(),
        "{frame}"
    );
    if let Some(d) = e.get("details") {
        assert!(d.is_object(), "{frame}");
    }
    if code == ErrorCode::InvalidPayload {
        let path = e["details"]["path"].as_str().unwrap_or("");
        assert!(
            path.starts_with('/'),
            "INVALID_PAYLOAD needs details.path: {frame}"
        );
    }
    code
}

fn code_of(frame: &Value) -> String {
    well_formed_error(frame);
    frame["error"]["code"].as_str().unwrap().to_owned()
}

// ------------------------------------------------------------ strategies

/// Members a request may have, and some it may not: generated objects hit
/// the envelope and payload checks instead of stopping at "no id".
const KEYS: [&str; 22] = [
    "id",
    "type",
    "payload",
    "runId",
    "sessionId",
    "runtimeInstanceId",
    "protocolVersion",
    "reconnect",
    "connectionEpoch",
    "capabilities",
    "mainRunId",
    "subRunIds",
    "names",
    "keys",
    "kv",
    "events",
    "seq",
    "data",
    "checkpointId",
    "fromOffset",
    "streamEpoch",
    "extra",
];

/// Leaves chosen to hurt: numbers outside u64 and f64, odd strings.
fn hostile_leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_owned()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        prop_oneof![
            Just("1e400"),
            Just("-1e400"),
            Just("18446744073709551616"),
            Just("1180591620717411303424"), // 2^70
            Just("-1"),
            Just("-0"),
            Just("0.5"),
            Just("1.0"),
            Just("1e2"),
            Just("\"\\ud800\""),
            Just("\"\\u0000\""),
            Just("\"*\""),
            Just("\"fuzz-1\""),
            Just("\"0123456789abcdef0123456789abcdef\""),
        ]
        .prop_map(str::to_owned),
        "[ -~]{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
    ]
}

/// Arbitrary JSON text, objects keyed mostly by protocol words.
fn hostile_json() -> impl Strategy<Value = String> {
    hostile_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned),
                        "[a-z]{1,6}"
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|members| {
                let body: Vec<String> = members
                    .into_iter()
                    .map(|(k, v)| format!("{}:{v}", serde_json::to_string(&k).unwrap()))
                    .collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
}

/// Runs `cases` cases of `strategy` through proptest's runner (without its
/// macro, so that one gateway and one socket serve every case; each case
/// enters the runtime with `block_on`). A failure is shrunk and reported
/// as usual; no regressions file is written.
fn run_cases<S: Strategy>(cases: u32, strategy: S, case: impl Fn(S::Value)) {
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&strategy, |v| {
            case(v);
            Ok(())
        })
        .unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ------------------------------------------------------------- proptests

/// Any JSON text as a whole frame: a well-formed error (or, by chance, a
/// reply) under the right id, and the socket's session keeps working.
#[test]
fn arbitrary_json_frames_get_typed_errors_and_the_socket_keeps_working() {
    let rt = runtime();
    let (gw, client, sid) = rt.block_on(async {
        let gw = TestGateway::start().await;
        let (client, sid) = attached(&gw, "host-1").await;
        (gw, client, sid)
    });
    let client = Mutex::new(client);
    run_cases(160, hostile_json(), |text| {
        rt.block_on(async {
            let mut c = client.lock().await;
            c.send_text(&text).await;
            // Nothing else is in flight and nothing is followed: the next
            // frame is this one's answer.
            let answer = c.wait_for(|_| true).await;
            if answer["type"] != "reply" {
                well_formed_error(&answer);
            }
            match serde_json::from_str::<Value>(&text) {
                Ok(sent) => {
                    let sent_id = sent
                        .get("id")
                        .and_then(Value::as_str)
                        .filter(|id| (1..=128).contains(&id.chars().count()));
                    match sent_id {
                        Some(id) => assert_eq!(answer["id"], id, "{text} -> {answer}"),
                        None => assert!(answer["id"].is_null(), "{text} -> {answer}"),
                    }
                }
                // Text serde_json cannot read whole (1e400, a lone
                // surrogate somewhere) may still have a readable id.
                Err(_) => assert!(answer["id"].is_null() || answer["id"].is_string()),
            }
            heartbeat_ok(&mut c, &sid, "host-1").await;
        })
    });
    drop(gw);
}

/// Every command type with an arbitrary payload (sometimes carrying the
/// socket's real session id): an answer under the request's id, a
/// well-formed error unless it happened to be valid, and the session on the
/// socket still heartbeats.
#[test]
fn every_command_with_hostile_payloads_answers_under_its_id() {
    let rt = runtime();
    let (gw, client, sid) = rt.block_on(async {
        let gw = TestGateway::start().await;
        let (client, sid) = attached(&gw, "host-1").await;
        (gw, client, sid)
    });
    let client = Mutex::new(client);
    let strategy = (
        prop::sample::select(COMMANDS.to_vec()),
        hostile_json(),
        any::<bool>(),
    );
    run_cases(192, strategy, |(kind, payload, with_session)| {
        rt.block_on(async {
            let mut c = client.lock().await;
            let mut payload: Value = match serde_json::from_str(&payload) {
                Ok(v) => v,
                // serde_json refuses some texts the gateway must also
                // refuse (1e400, lone surrogates); send them raw.
                Err(_) => {
                    let id = "raw-payload";
                    c.send_text(&format!(
                        r#"{{"id":"{id}","type":"{kind}","payload":{payload}}}"#
                    ))
                    .await;
                    let answer = c.answer(id).await;
                    well_formed_error(&answer);
                    heartbeat_ok(&mut c, &sid, "host-1").await;
                    return;
                }
            };
            if with_session && let Some(obj) = payload.as_object_mut() {
                obj.insert("sessionId".into(), json!(sid));
                obj.insert("runId".into(), json!("host-1"));
            }
            let answer = c.call(kind, payload.clone()).await;
            if answer["type"] != "reply" {
                let code = well_formed_error(&answer);
                // runs.list is refused on this endpoint before its payload
                // is looked at (spec/README.md, order of checks).
                if !payload.is_object() && kind != "runs.list" {
                    assert_eq!(code, ErrorCode::InvalidPayload, "{answer}");
                    assert_eq!(answer["error"]["details"]["path"], "/payload");
                }
            }
            heartbeat_ok(&mut c, &sid, "host-1").await;
        })
    });
    drop(gw);
}

/// Arbitrary bytes in one text frame, on a raw socket: valid UTF-8 gets a
/// typed error and the socket lives; anything else is closed with 1007
/// after a `BAD_FRAME`, and a session on another socket still works.
#[test]
fn arbitrary_bytes_in_a_text_frame() {
    let rt = runtime();
    let (gw, bystander, bystander_sid) = rt.block_on(async {
        let gw = TestGateway::start().await;
        let (c, sid) = attached(&gw, "host-bystander").await;
        (gw, c, sid)
    });
    let bystander = Mutex::new(bystander);
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        // Valid JSON around a broken sequence, the likeliest real mistake.
        (prop::collection::vec(0x80u8..=0xFF, 1..4)).prop_map(|bad| {
            let mut v = br#"{"id":"x","type":"runtime.heartbeat","payload":{"runId":""#.to_vec();
            v.extend(bad);
            v.extend_from_slice(br#""}}"#);
            v
        }),
    ];
    let next_run = std::sync::atomic::AtomicU64::new(0);
    run_cases(64, strategy, |bytes| {
        rt.block_on(async {
            // A run per case: the last case's session outlives its socket.
            let n = next_run.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let run = format!("host-raw-{n}");
            let (mut ws, sid) = raw_attached(&gw, &run).await;
            ws.send_frame(true, 0, OP_TEXT, &bytes, true).await;
            if std::str::from_utf8(&bytes).is_ok() {
                let answer = ws.next_json().await.expect("an answer, socket open");
                well_formed_error(&answer);
                raw_heartbeat_ok(&mut ws, &sid, &run).await;
            } else {
                let (texts, ending) = ws.until_end().await;
                assert_eq!(ending, Ending::Close(Some(1007)), "{bytes:?}");
                assert_eq!(texts.len(), 1, "{texts:?}");
                assert_eq!(code_of(&texts[0]), "BAD_FRAME");
                assert!(texts[0]["id"].is_null());
            }
            let mut b = bystander.lock().await;
            heartbeat_ok(&mut b, &bystander_sid, "host-bystander").await;
        })
    });
}

// -------------------------------------------------------- numbers, depth

/// Sends `text` as one frame and returns the answer under `id`.
async fn answer_to(c: &mut Client, id: &str, text: &str) -> Value {
    c.send_text(text).await;
    c.answer(id).await
}

/// Numbers no u64 member accepts — beyond f64 (1e400), 2^64, 2^70,
/// negative, fractional, or not numbers at all — are `INVALID_PAYLOAD` at
/// exactly that member, in every command that has one; the edges that are
/// integers (2^64 - 1, 1e2, 1.0) are accepted.
#[tokio::test]
async fn numbers_out_of_range_are_invalid_payload_at_their_member() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "host-1").await;
    let bad = [
        "1e400",
        "-1e400",
        "18446744073709551616",
        "1180591620717411303424",
        "-1",
        "-9223372036854775809",
        "0.5",
        "1e-3",
        "\"1\"",
        "null",
        "true",
        "[]",
        "{}",
    ];
    for n in bad {
        let cases = [
            (
                format!(
                    r#"{{"id":"a","type":"runtime.attach","payload":{{"runId":"host-2","runtimeInstanceId":"inst-host-1","protocolVersion":"1","connectionEpoch":{n}}}}}"#
                ),
                "/payload/connectionEpoch",
            ),
            (
                format!(
                    r#"{{"id":"a","type":"runtime.recoverConnections","payload":{{"sessionId":"{sid}","mainRunId":"host-1","connectionEpoch":{n}}}}}"#
                ),
                "/payload/connectionEpoch",
            ),
            (
                format!(
                    r#"{{"id":"a","type":"stream.resume","payload":{{"sessionId":"{sid}","runId":"host-1","fromOffset":{n}}}}}"#
                ),
                "/payload/fromOffset",
            ),
            (
                format!(
                    r#"{{"id":"a","type":"events.publish","payload":{{"sessionId":"{sid}","runId":"host-1","events":[{{"type":"x","seq":{n}}}]}}}}"#
                ),
                // Event members are named by the event (envelope.json's
                // ErrorBody says so; spec/README.md's example goes deeper).
                "/payload/events/0",
            ),
        ];
        for (text, path) in cases {
            let answer = answer_to(&mut rt, "a", &text).await;
            assert_eq!(code_of(&answer), "INVALID_PAYLOAD", "{n}: {answer}");
            assert_eq!(answer["error"]["details"]["path"], path, "{n}: {answer}");
        }
    }
    for n in ["18446744073709551615", "1e2", "1.0", "0"] {
        let text = format!(
            r#"{{"id":"b","type":"stream.resume","payload":{{"sessionId":"{sid}","runId":"host-1","fromOffset":{n}}}}}"#
        );
        let answer = answer_to(&mut rt, "b", &text).await;
        assert_eq!(answer["type"], "reply", "{n}: {answer}");
    }
    heartbeat_ok(&mut rt, &sid, "host-1").await;
}

fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// 10,000 nested arrays — the frame, its id, its payload, or a `data`
/// member — cost no stack (the envelope parser skims nesting without
/// recursion) and get the error of the place they are in; the socket lives.
#[tokio::test]
async fn ten_thousand_nested_arrays_get_typed_errors_and_the_socket_lives() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "host-1").await;
    let deep = nested_arrays(10_000);
    let cases = [
        (deep.clone(), None, "BAD_FRAME", None),
        (
            format!(r#"{{"id":{deep},"type":"runtime.heartbeat","payload":{{}}}}"#),
            None,
            "BAD_FRAME",
            None,
        ),
        (
            format!(r#"{{"id":"d","type":"runtime.heartbeat","payload":{deep}}}"#),
            Some("d"),
            "INVALID_PAYLOAD",
            Some("/payload"),
        ),
        (
            format!(
                r#"{{"id":"d","type":"checkpoint.save","payload":{{"sessionId":"{sid}","runId":"host-1","data":{deep}}}}}"#
            ),
            Some("d"),
            "INVALID_PAYLOAD",
            Some("/payload/data"),
        ),
        (
            format!(
                r#"{{"id":"d","type":"events.publish","payload":{{"sessionId":"{sid}","runId":"host-1","events":[{{"type":"x","data":{deep}}}]}}}}"#
            ),
            Some("d"),
            "INVALID_PAYLOAD",
            Some("/payload/events/0"),
        ),
    ];
    for (text, id, code, path) in cases {
        rt.send_text(&text).await;
        let answer = rt.wait_for(|_| true).await;
        assert_eq!(code_of(&answer), code, "{answer}");
        match id {
            Some(id) => assert_eq!(answer["id"], id),
            None => assert!(answer["id"].is_null(), "{answer}"),
        }
        if let Some(path) = path {
            assert_eq!(answer["error"]["details"]["path"], path, "{answer}");
        }
        heartbeat_ok(&mut rt, &sid, "host-1").await;
    }
}

/// `data` may be any JSON, but what the gateway hands back out must parse
/// with a strict parser (serde_json here, as in the Rust client): a lone
/// surrogate escape, a number beyond a double, or nesting past 64 levels
/// in an event or checkpoint is `INVALID_PAYLOAD` and stores nothing.
/// Before the fix these were stored, and every viewer's serde_json refused
/// the `stream.events` frame carrying them — losing the whole batch, on
/// every resume (found with the fuzz target, issue #5).
#[tokio::test]
async fn data_that_strict_parsers_refuse_is_not_stored() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "host-1").await;
    let viewer_token = gw.token(TokenKind::Viewer, "host-*", &[]);
    let mut viewer = Client::connect(&gw.url("/v1/stream"), &viewer_token).await;
    viewer
        .ok(
            "stream.resume",
            json!({ "runId": "host-1", "fromOffset": 0 }),
        )
        .await;
    let refused = [
        r#""\ud800""#.to_owned(),
        r#"{"\udfff":1}"#.to_owned(),
        r#"["ok","\ud83d"]"#.to_owned(),
        "1e400".to_owned(),
        "-1e400".to_owned(),
        nested_arrays(65),
        format!("{}1{}", r#"{"a":"#.repeat(65), "}".repeat(65)),
    ];
    for data in &refused {
        let publish = format!(
            r#"{{"id":"p","type":"events.publish","payload":{{"sessionId":"{sid}","runId":"host-1","events":[{{"type":"ok"}},{{"type":"x","data":{data}}}]}}}}"#
        );
        let answer = answer_to(&mut rt, "p", &publish).await;
        assert_eq!(code_of(&answer), "INVALID_PAYLOAD", "{data}: {answer}");
        assert_eq!(answer["error"]["details"]["path"], "/payload/events/1");
        let save = format!(
            r#"{{"id":"c","type":"checkpoint.save","payload":{{"sessionId":"{sid}","runId":"host-1","data":{data}}}}}"#
        );
        let answer = answer_to(&mut rt, "c", &save).await;
        assert_eq!(code_of(&answer), "INVALID_PAYLOAD", "{data}: {answer}");
        assert_eq!(answer["error"]["details"]["path"], "/payload/data");
    }
    // The same shapes within bounds are stored, and come back readable.
    let fine = [
        r#""\ud83d\ude00 \u0000""#.to_owned(),
        "1e308".to_owned(),
        "1180591620717411303424".to_owned(),
        nested_arrays(64),
    ];
    for data in &fine {
        let publish = format!(
            r#"{{"id":"p","type":"events.publish","payload":{{"sessionId":"{sid}","runId":"host-1","events":[{{"type":"x","data":{data}}}]}}}}"#
        );
        let answer = answer_to(&mut rt, "p", &publish).await;
        assert_eq!(answer["type"], "reply", "{data}: {answer}");
        let save = format!(
            r#"{{"id":"c","type":"checkpoint.save","payload":{{"sessionId":"{sid}","runId":"host-1","data":{data}}}}}"#
        );
        assert_eq!(answer_to(&mut rt, "c", &save).await["type"], "reply");
        let loaded = rt
            .ok(
                "checkpoint.load",
                json!({ "sessionId": sid, "runId": "host-1" }),
            )
            .await;
        let want: Value = serde_json::from_str(data).unwrap();
        assert_eq!(loaded["data"], want);
    }
    // The viewer parsed every frame (the harness's client panics on one it
    // cannot) and saw exactly the accepted events, from offset 0.
    let mut offsets = Vec::new();
    while offsets.len() < fine.len() {
        let push = viewer.push("stream.events").await;
        for e in push["events"].as_array().unwrap() {
            offsets.push(e["offset"].as_u64().unwrap());
        }
    }
    assert_eq!(offsets, (0..fine.len() as u64).collect::<Vec<_>>());
    heartbeat_ok(&mut rt, &sid, "host-1").await;
}

// ---------------------------------------------------------------- frames

/// A binary frame is `BAD_FRAME` with `"id": null` (PROTOCOL.md §2); the
/// socket stays open.
#[tokio::test]
async fn binary_frames_are_bad_frame_and_the_socket_lives() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "host-1").await;
    for payload in [
        Vec::new(),
        b"{\"id\":\"1\",\"type\":\"runtime.heartbeat\",\"payload\":{}}".to_vec(),
        vec![0xFF; 70_000],
    ] {
        rt.send_raw(Message::Binary(payload.into())).await;
        let answer = rt.wait_for(|_| true).await;
        assert_eq!(code_of(&answer), "BAD_FRAME", "{answer}");
        assert!(answer["id"].is_null());
        heartbeat_ok(&mut rt, &sid, "host-1").await;
    }
}

/// A text message split into many fragments (one byte each, with pings in
/// between, as RFC 6455 allows) is one request like any other.
#[tokio::test]
async fn a_message_in_many_fragments_is_one_request() {
    let gw = TestGateway::start().await;
    let (mut ws, sid) = raw_attached(&gw, "host-1").await;
    let text = json!({ "id": "frag", "type": "runtime.heartbeat",
                       "payload": { "sessionId": sid, "runId": "host-1" } })
    .to_string();
    let bytes = text.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        let opcode = if i == 0 { OP_TEXT } else { OP_CONTINUE };
        ws.send_frame(i == bytes.len() - 1, 0, opcode, &[*b], true)
            .await;
        if i % 16 == 0 {
            ws.send_frame(true, 0, OP_PING, b"mid", true).await;
        }
    }
    let answer = ws.answer("frag").await;
    assert_eq!(answer["type"], "reply", "{answer}");
    // A multi-byte character split across fragments is still UTF-8.
    let text = r#"{"id":"é","type":"nope","payload":{}}"#.as_bytes();
    let cut = text.iter().position(|&b| b == 0xC3).unwrap() + 1;
    ws.send_frame(false, 0, OP_TEXT, &text[..cut], true).await;
    ws.send_frame(true, 0, OP_CONTINUE, &text[cut..], true)
        .await;
    let answer = ws.answer("é").await;
    assert_eq!(code_of(&answer), "UNKNOWN_TYPE");
    raw_heartbeat_ok(&mut ws, &sid, "host-1").await;
}

/// Invalid UTF-8 in a text message — whole, split over fragments, an
/// overlong encoding, an encoded surrogate, or cut short at the end — is a
/// `BAD_FRAME` then a close with 1007; a session on another socket is
/// untouched.
#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let gw = TestGateway::start().await;
    let (mut bystander, bsid) = attached(&gw, "host-b").await;
    let cases: [&[&[u8]]; 5] = [
        &[b"{\"id\":\"\xFF\"}"],
        &[b"\xC0\xAF"],                       // overlong '/'
        &[b"\"\xED\xA0\x80\""],               // U+D800 encoded
        &[b"{\"id\":\"", b"ok", b"\xE2\x82"], // cut short in the last fragment
        &[b"{\"id\":\"\xE2", b"\x28\xA1\"}"], // broken across fragments
    ];
    for (n, fragments) in cases.iter().enumerate() {
        let run = format!("host-u{n}");
        let (mut ws, _) = raw_attached(&gw, &run).await;
        for (i, f) in fragments.iter().enumerate() {
            let opcode = if i == 0 { OP_TEXT } else { OP_CONTINUE };
            ws.send_frame(i == fragments.len() - 1, 0, opcode, f, true)
                .await;
        }
        let (texts, ending) = ws.until_end().await;
        assert_eq!(ending, Ending::Close(Some(1007)), "case {n}");
        assert_eq!(texts.len(), 1, "case {n}: {texts:?}");
        assert_eq!(code_of(&texts[0]), "BAD_FRAME");
        heartbeat_ok(&mut bystander, &bsid, "host-b").await;
    }
}

/// Messages over the limit (1 MiB by default), in one frame or assembled
/// from fragments, are `PAYLOAD_TOO_LARGE` then a close with 1009; the
/// gateway does not buffer them first, and another socket's session works.
#[tokio::test]
async fn oversized_messages_close_with_1009() {
    let gw = TestGateway::start_with(|c| c.limits.max_frame_bytes = 64 * 1024).await;
    let (mut bystander, bsid) = attached(&gw, "host-b").await;
    // One frame, announced bigger than the limit.
    let (mut ws, _) = raw_attached(&gw, "host-1").await;
    let big = vec![b' '; 64 * 1024 + 1];
    ws.send_frame(true, 0, OP_TEXT, &big, true).await;
    let (texts, ending) = ws.until_end().await;
    assert_eq!(ending, Ending::Close(Some(1009)));
    assert_eq!(code_of(&texts[0]), "PAYLOAD_TOO_LARGE");
    heartbeat_ok(&mut bystander, &bsid, "host-b").await;
    // Fragments that are each small but add up to too much.
    let (mut ws, _) = raw_attached(&gw, "host-2").await;
    let piece = vec![b' '; 8 * 1024];
    ws.send_frame(false, 0, OP_TEXT, &piece, true).await;
    for _ in 0..8 {
        ws.send_frame(false, 0, OP_CONTINUE, &piece, true).await;
    }
    let (texts, ending) = ws.until_end().await;
    assert_eq!(ending, Ending::Close(Some(1009)));
    assert_eq!(code_of(&texts[0]), "PAYLOAD_TOO_LARGE");
    // A frame header announcing 2^62 bytes: refused on the header alone.
    let (mut ws, _) = raw_attached(&gw, "host-3").await;
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 62).to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]);
    ws.send_bytes(&header).await;
    let (_, ending) = ws.until_end().await;
    assert_eq!(ending, Ending::Close(Some(1009)));
    heartbeat_ok(&mut bystander, &bsid, "host-b").await;
}

/// Breaches of RFC 6455 framing fail the connection with 1002: a stray
/// continuation frame, a new message inside a fragmented one, reserved
/// bits, reserved opcodes, an unmasked client frame, a fragmented or
/// oversized control frame. Another socket's session is untouched.
#[tokio::test]
async fn framing_violations_close_with_1002() {
    let gw = TestGateway::start().await;
    let (mut bystander, bsid) = attached(&gw, "host-b").await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "stray continuation",
            encode_frame(true, 0, OP_CONTINUE, b"{}", true),
        ),
        (
            "text inside a fragmented message",
            [
                encode_frame(false, 0, OP_TEXT, b"{", true),
                encode_frame(true, 0, OP_TEXT, b"{}", true),
            ]
            .concat(),
        ),
        (
            "reserved bit",
            encode_frame(true, 0b100, OP_TEXT, b"{}", true),
        ),
        (
            "reserved data opcode",
            encode_frame(true, 0, 0x3, b"{}", true),
        ),
        (
            "reserved control opcode",
            encode_frame(true, 0, 0xB, b"", true),
        ),
        ("unmasked", encode_frame(true, 0, OP_TEXT, b"{}", false)),
        (
            "fragmented ping",
            encode_frame(false, 0, OP_PING, b"x", true),
        ),
        (
            "ping over 125 bytes",
            encode_frame(true, 0, OP_PING, &[b'p'; 126], true),
        ),
    ];
    for (what, bytes) in cases {
        let run = format!("host-{}", what.replace(' ', "-"));
        let (mut ws, _) = raw_attached(&gw, &run).await;
        ws.send_bytes(&bytes).await;
        let (texts, ending) = ws.until_end().await;
        assert_eq!(ending, Ending::Close(Some(1002)), "{what}");
        // One error frame says why, before the close.
        assert_eq!(texts.len(), 1, "{what}: {texts:?}");
        assert_eq!(code_of(&texts[0]), "BAD_FRAME", "{what}");
        assert!(texts[0]["id"].is_null());
        heartbeat_ok(&mut bystander, &bsid, "host-b").await;
    }
}

/// A flood of pings the client never reads the pongs of: the gateway keeps
/// at most one pong owed (tungstenite replaces an unsent pong), so it holds
/// nothing per ping, and requests on the socket are still answered.
#[tokio::test]
async fn a_ping_flood_costs_nothing_and_requests_still_get_answers() {
    let gw = TestGateway::start().await;
    let (mut ws, sid) = raw_attached(&gw, "host-1").await;
    let ping = encode_frame(true, 0, OP_PING, &[b'p'; 125], true);
    let burst: Vec<u8> = ping.repeat(1000);
    for _ in 0..20 {
        ws.send_bytes(&burst).await;
    }
    raw_heartbeat_ok(&mut ws, &sid, "host-1").await;
    // Pongs carry the ping's payload; there are no more pongs than pings.
    let mut pongs = 0;
    for f in ws.frames_for(std::time::Duration::from_millis(300)).await {
        if f.opcode == OP_PONG {
            assert_eq!(f.payload, vec![b'p'; 125]);
            pongs += 1;
        }
    }
    assert!(pongs <= 20_000);
    raw_heartbeat_ok(&mut ws, &sid, "host-1").await;
}

/// Close frames: a valid one is echoed (RFC 6455 §5.5.1); one with a code
/// that may not be sent (999, 1005) or a one-byte body is a protocol error
/// (1002); a reason that is not UTF-8 is 1007. Only that socket ends.
#[tokio::test]
async fn close_frames_get_the_right_close_back() {
    let gw = TestGateway::start().await;
    let (mut bystander, bsid) = attached(&gw, "host-b").await;
    let cases: Vec<(&str, Vec<u8>, Ending)> = vec![
        ("empty", Vec::new(), Ending::Close(None)),
        (
            "1000",
            1000u16.to_be_bytes().to_vec(),
            Ending::Close(Some(1000)),
        ),
        ("one byte", vec![0x03], Ending::Close(Some(1002))),
        (
            "code 999",
            999u16.to_be_bytes().to_vec(),
            Ending::Close(Some(1002)),
        ),
        (
            "code 1005",
            1005u16.to_be_bytes().to_vec(),
            Ending::Close(Some(1002)),
        ),
        (
            "reason not UTF-8",
            [&1000u16.to_be_bytes()[..], b"\xFF"].concat(),
            Ending::Close(Some(1007)),
        ),
    ];
    for (what, payload, want) in cases {
        let run = format!("host-{}", what.replace(' ', "-"));
        let (mut ws, _) = raw_attached(&gw, &run).await;
        ws.send_frame(true, 0, OP_CLOSE, &payload, true).await;
        let (_, ending) = ws.until_end().await;
        assert_eq!(ending, want, "{what}");
        heartbeat_ok(&mut bystander, &bsid, "host-b").await;
    }
}

//! Bytes → frame decoder → dispatcher, against a real in-process gateway
//! state (sessions, memory store, stream hub): no input may panic, and
//! everything the gateway answers or pushes must be a well-formed frame.
//!
//! Input format (so that one input can be a whole conversation): messages
//! separated by the byte 0xFF, which never occurs in UTF-8, so it splits
//! nothing a real text frame could hold. A message starting with `V` goes to
//! the viewer socket (`/v1/stream`), any other to the runtime socket
//! (`/v1/runtime`). Bytes that are not UTF-8 are replaced (tungstenite
//! never hands the gateway such text; the replaced text still exercises the
//! decoder). `$SID` in a message becomes the `sessionId` of the last attach
//! that succeeded: session ids are random, and a fuzzer could never guess
//! one, so without it every command past attach would stop at
//! `NOT_ATTACHED`.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use rungate::gateway::fuzzing::{Harness, Side};
use rungate::protocol::{ErrorCode, decode};
use serde_json::Value;

/// Messages one input may send: an attach, commands, resumes and publishes
/// fit; more would only slow each execution down.
const MAX_MESSAGES: usize = 24;

/// One runtime for every input: building one per input would cost more than
/// the input itself. Each input still gets a fresh [`Harness`].
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime")
});

fuzz_target!(|data: &[u8]| {
    RUNTIME.block_on(conversation(data));
});

async fn conversation(data: &[u8]) {
    let mut gateway = Harness::new();
    let mut session: Option<String> = None;
    for message in data.split(|&b| b == 0xFF).take(MAX_MESSAGES) {
        let (side, body) = match message.split_first() {
            Some((b'V', rest)) => (Side::Viewer, rest),
            _ => (Side::Runtime, message),
        };
        let mut text = String::from_utf8_lossy(body).into_owned();
        if let Some(sid) = &session {
            text = text.replace("$SID", sid);
        }
        // The id the answer must carry: the request's, or null when the
        // envelope had no usable one.
        let expected_id = match decode(&text) {
            Ok(request) => Some(request.id),
            Err(rejected) => rejected.id,
        };
        let answer = gateway.send(side, &text).await;
        let answer = check_answer(&answer, expected_id.as_deref());
        if let Some(sid) = answer["payload"]["sessionId"].as_str() {
            session = Some(sid.to_owned());
        }
        for side in [Side::Runtime, Side::Viewer] {
            for push in gateway.drain(side) {
                check_push(&push);
            }
        }
    }
}

fn parse_object(text: &str) -> serde_json::Map<String, Value> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        other => panic!("the gateway sent a frame that is not a JSON object: {other:?}\n{text}"),
    }
}

/// A reply under the request's id, or an error frame with a code from the
/// closed list (never `INTERNAL`: the memory store cannot fail).
fn check_answer(text: &str, expected_id: Option<&str>) -> Value {
    let frame = parse_object(text);
    let id = frame.get("id").expect("an answer always has an id member");
    match frame.get("type").and_then(Value::as_str) {
        Some("reply") => {
            assert_eq!(id.as_str(), expected_id, "reply id: {text}");
            assert!(
                expected_id.is_some(),
                "a reply to a request without id: {text}"
            );
            assert!(frame["payload"].is_object(), "reply payload: {text}");
            assert_eq!(frame.len(), 3, "reply members: {text}");
        }
        Some("error") => {
            match expected_id {
                Some(want) => assert_eq!(id.as_str(), Some(want), "error id: {text}"),
                None => assert!(id.is_null(), "error id should be null: {text}"),
            }
            let error = frame["error"].as_object().expect("an error object");
            let code = error["code"].as_str().and_then(ErrorCode::parse);
            let code = code.unwrap_or_else(|| panic!("unknown error code: {text}"));
            assert_ne!(
                code,
                ErrorCode::Internal,
                "INTERNAL from the memory store: {text}"
            );
            assert!(error["message"].is_string(), "error message: {text}");
            assert!(error["retryable"].is_boolean(), "error retryable: {text}");
            if let Some(details) = error.get("details") {
                assert!(details.is_object(), "error details: {text}");
            }
            if code == ErrorCode::InvalidPayload {
                let path = error["details"]["path"].as_str();
                assert!(
                    path.is_some_and(|p| p.starts_with('/')),
                    "details.path: {text}"
                );
            }
            assert_eq!(frame.len(), 3, "error members: {text}");
        }
        _ => panic!("an answer must be a reply or an error: {text}"),
    }
    Value::Object(frame)
}

/// A push: a type that is not reply/error, no id, an object payload; the
/// stream's own frames (built by splicing raw event JSON) must parse and
/// carry contiguous offsets.
fn check_push(text: &str) {
    let frame = parse_object(text);
    assert!(!frame.contains_key("id"), "a push has no id: {text}");
    let kind = frame
        .get("type")
        .and_then(Value::as_str)
        .expect("a push type");
    assert!(kind != "reply" && kind != "error", "push type: {text}");
    let payload = frame.get("payload").and_then(Value::as_object);
    let payload = payload.unwrap_or_else(|| panic!("push payload: {text}"));
    if kind == "stream.events" {
        let events = payload["events"].as_array().expect("events");
        assert!(!events.is_empty(), "an empty stream.events: {text}");
        let first = events[0]["offset"].as_u64().expect("an offset");
        for (i, e) in events.iter().enumerate() {
            assert_eq!(
                e["offset"].as_u64(),
                Some(first + i as u64),
                "offsets: {text}"
            );
            assert!(e.get("event").is_some(), "event member: {text}");
        }
    }
}

//! The frame envelope: turning one text message into a request, and replies,
//! errors and pushes into the bytes that go on the wire.
//!
//! Owns the rules of PROTOCOL.md §2 about the *outside* of a frame: the `id`
//! (1 to 128 characters), the `type`, the presence of `payload`. Payloads are
//! left raw here and typed by [`super::commands`]. Encoding produces
//! [`Frame`], cheap-to-clone shared bytes, so one frame can go to many sockets.
//! Must not do I/O or know which commands exist beyond their names.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::commands::{Command, CommandKind, CommandPayload};
use super::cursor::Cursor;
use super::error::{CommandError, ErrorBody, ErrorCode};

/// Longest request id, in characters.
pub const MAX_REQUEST_ID_CHARS: usize = 128;

/// An encoded frame: valid UTF-8 JSON, shared by reference count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame(Bytes);

impl Frame {
    /// Wraps bytes that the caller guarantees are UTF-8 JSON.
    fn from_json_vec(v: Vec<u8>) -> Frame {
        Frame(Bytes::from(v))
    }

    /// The frame's bytes, shared.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// The frame's bytes, by value.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// The frame as text (one WebSocket text message).
    pub fn as_str(&self) -> &str {
        // Every constructor serializes with serde_json, which emits UTF-8.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

/// A request whose envelope is valid; its payload is still raw JSON.
#[derive(Debug)]
pub struct Request<'a> {
    /// The request's `id`, echoed in its reply or error: 1 to 128 characters.
    pub id: String,
    /// Borrowed unless the sender used JSON escapes in it.
    pub kind: std::borrow::Cow<'a, str>,
    /// The request's `payload`, undecoded (see [`crate::commands::Command::parse`]).
    pub payload: &'a RawValue,
}

/// A frame that could not become a [`Request`], with the id to answer under
/// (`None` when the id itself was unusable: the error frame then says `null`).
#[derive(Debug)]
pub struct Rejected {
    /// The request `id` to answer under, if it was usable.
    pub id: Option<String>,
    /// What was wrong (`BAD_FRAME`, `UNKNOWN_TYPE`, …).
    pub error: CommandError,
}

/// The envelope as it may arrive, every member optional so that each missing
/// piece gets its own precise error. Deserialized by hand (not with
/// `#[serde(flatten)]`, which cannot borrow `RawValue`s) so that unknown
/// members are noticed without losing the id to answer under.
#[derive(Default)]
struct WireRequest<'a> {
    id: Option<&'a RawValue>,
    kind: Option<&'a RawValue>,
    payload: Option<&'a RawValue>,
    /// The first member that is none of the three: the envelope is strict
    /// like the payloads.
    unknown: Option<String>,
}

impl<'de: 'a, 'a> Deserialize<'de> for WireRequest<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = WireRequest<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut wire = WireRequest::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let slot = match key.as_ref() {
                        "id" => &mut wire.id,
                        "type" => &mut wire.kind,
                        "payload" => &mut wire.payload,
                        other => {
                            if wire.unknown.is_none() {
                                wire.unknown = Some(other.to_owned());
                            }
                            map.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    if slot.is_some() {
                        return Err(serde::de::Error::custom(format!(
                            "duplicate member \"{key}\""
                        )));
                    }
                    *slot = Some(map.next_value()?);
                }
                Ok(wire)
            }
        }
        d.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

/// Parses one text frame's envelope.
pub fn decode(text: &str) -> Result<Request<'_>, Rejected> {
    let reject = |id: Option<String>, error| Err(Rejected { id, error });
    if !text.trim_start().starts_with('{') {
        return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Err(e) => reject(None, CommandError::bad_frame(format!("not JSON: {e}"))),
            Ok(_) => reject(
                None,
                CommandError::bad_frame("a frame must be a JSON object"),
            ),
        };
    }
    let wire: WireRequest<'_> = match serde_json::from_str(text) {
        Ok(w) => w,
        Err(e) => return reject(None, CommandError::bad_frame(format!("not JSON: {e}"))),
    };
    let id = match wire.id.map(|raw| serde_json::from_str::<String>(raw.get())) {
        Some(Ok(id)) if !id.is_empty() && id.chars().count() <= MAX_REQUEST_ID_CHARS => id,
        _ => {
            return reject(
                None,
                CommandError::bad_frame(format!(
                    "\"id\" must be a string of 1 to {MAX_REQUEST_ID_CHARS} characters"
                )),
            );
        }
    };
    let kind = match wire
        .kind
        .map(|raw| serde_json::from_str::<std::borrow::Cow<'_, str>>(raw.get()))
    {
        Some(Ok(kind)) if !kind.is_empty() => kind,
        _ => {
            return reject(
                Some(id),
                CommandError::bad_frame("\"type\" must be a non-empty string"),
            );
        }
    };
    if let Some(name) = wire.unknown {
        return reject(
            Some(id),
            CommandError::invalid_payload(
                &format!("/{name}"),
                format!("unknown envelope member \"{name}\""),
            ),
        );
    }
    let Some(payload) = wire.payload else {
        return reject(
            Some(id),
            CommandError::invalid_payload("/payload", "\"payload\" is required"),
        );
    };
    Ok(Request { id, kind, payload })
}

/// A request read whole: its id, its command and the typed payload.
#[derive(Debug)]
pub struct TypedRequest<'a> {
    /// The request's `id`: 1 to 128 characters.
    pub id: String,
    /// The request's `type`.
    pub kind: CommandKind,
    /// The payload, typed; a publish's events borrow the frame's text.
    pub command: Command<'a>,
}

/// [`decode`] and [`Command::parse`] in one read, for a valid request
/// whose `type` comes before its `payload` (as every client writes it):
/// a publish's events are then read once, where `decode` skimmed the
/// payload to cut it out and `parse` read it again (issue #18). `None`
/// for anything else, valid or not, and the caller decodes the frame the
/// ordinary way, which answers it: so this never refuses, and takes only
/// what `decode` and `parse` take, typed alike.
pub fn decode_typed(text: &str) -> Option<TypedRequest<'_>> {
    let mut cursor = Cursor::new(text);
    let (mut id, mut kind, mut command) = (None, None, None);
    cursor.object(|name, c| {
        match name {
            "id" if id.is_none() => id = Some(c.value::<String>()?.0),
            "type" if kind.is_none() => {
                kind = Some(CommandKind::parse(
                    &c.value::<std::borrow::Cow<'_, str>>()?.0,
                )?);
            }
            "payload" if command.is_none() => command = Some(Command::read_at(kind?, c)?),
            _ => return None,
        }
        Some(())
    })?;
    if !cursor.at_end() {
        return None;
    }
    let id = id.filter(|id| !id.is_empty() && id.chars().count() <= MAX_REQUEST_ID_CHARS)?;
    Some(TypedRequest {
        id,
        kind: kind?,
        command: command?,
    })
}

#[derive(Serialize)]
struct ReplyFrame<'a, T: Serialize> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    payload: &'a T,
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    id: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct PushFrame<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    payload: &'a T,
}

/// `{"id", "type": "reply", "payload"}`.
pub fn encode_reply<T: Serialize>(id: &str, payload: &T) -> Frame {
    encode(&ReplyFrame {
        id,
        kind: "reply",
        payload,
    })
}

/// `{"id" | null, "type": "error", "error": {...}}`.
pub fn encode_error(id: Option<&str>, error: &CommandError) -> Frame {
    encode(&ErrorFrame {
        id,
        kind: "error",
        error: error.into(),
    })
}

/// `{"error": {...}}`: the body of an HTTP refusal, the error member of an
/// error frame on its own (spec/README.md, *HTTP*), so an error reads the
/// same over HTTP as on a socket.
pub fn encode_error_body(error: &CommandError) -> Frame {
    #[derive(Serialize)]
    struct ErrorDocument<'a> {
        error: ErrorBody<'a>,
    }
    encode(&ErrorDocument {
        error: error.into(),
    })
}

/// `{"type": <push type>, "payload"}`: no id, nobody asked for it.
pub fn encode_push<T: Serialize>(kind: &str, payload: &T) -> Frame {
    encode(&PushFrame { kind, payload })
}

fn encode<T: Serialize>(value: &T) -> Frame {
    // Serializing our own derive(Serialize) types to a Vec cannot fail: no
    // maps with non-string keys, no I/O. Should it ever, say so on the wire.
    match serde_json::to_vec(value) {
        Ok(v) => Frame::from_json_vec(v),
        Err(e) => Frame::from_json_vec(
            format!(
                r#"{{"id":null,"type":"error","error":{{"code":"INTERNAL","message":"encode failed: {}","retryable":false}}}}"#,
                e.to_string().replace(['"', '\\'], "'")
            )
            .into_bytes(),
        ),
    }
}

/// `{"id", "type", "payload"}`: a request, as a client sends it.
pub fn encode_request<T: Serialize + ?Sized>(id: &str, kind: &str, payload: &T) -> Frame {
    #[derive(Serialize)]
    struct RequestFrame<'a, T: ?Sized> {
        id: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        payload: &'a T,
    }
    encode(&RequestFrame { id, kind, payload })
}

/// `{"id", "type", "payload"}` for a typed payload: the `type` is the one
/// its [`CommandPayload`] names, so a client never spells it.
pub fn encode_command<C: CommandPayload>(id: &str, payload: &C) -> Frame {
    encode_request(id, C::KIND.as_str(), payload)
}

/// A typed payload serialized once, for a sender that sends the same
/// payload many times under fresh request ids (a load generator's
/// heartbeats): [`encode_command`] copies its JSON instead of serializing
/// the payload again. It is the command `C` is, with `C`'s reply.
pub struct Encoded<C> {
    json: Box<RawValue>,
    command: std::marker::PhantomData<fn() -> C>,
}

impl<C: CommandPayload> Encoded<C> {
    /// Serializes `payload` once.
    pub fn new(payload: &C) -> Result<Encoded<C>, serde_json::Error> {
        Ok(Encoded {
            json: serde_json::value::to_raw_value(payload)?,
            command: std::marker::PhantomData,
        })
    }

    /// The payload's JSON text.
    pub fn json(&self) -> &str {
        self.json.get()
    }
}

impl<C> Clone for Encoded<C> {
    fn clone(&self) -> Self {
        Encoded {
            json: self.json.clone(),
            command: std::marker::PhantomData,
        }
    }
}

impl<C> std::fmt::Debug for Encoded<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Encoded").field(&self.json.get()).finish()
    }
}

impl<C> Serialize for Encoded<C> {
    /// The JSON written at construction, unchanged.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(s)
    }
}

impl<C: CommandPayload> CommandPayload for Encoded<C> {
    const KIND: super::commands::CommandKind = C::KIND;
    type Reply = C::Reply;
}

/// One frame from the gateway, as a client sorts it: the other direction
/// of [`encode_reply`], [`encode_error`] and [`encode_push`].
#[derive(Debug)]
pub enum Incoming<'a> {
    /// The answer to request `id`; its payload is typed by whoever sent it.
    Reply {
        /// The request's id, as it was sent.
        id: std::borrow::Cow<'a, str>,
        /// The reply payload, unparsed.
        payload: &'a RawValue,
    },
    /// A refusal: of request `id`, or of a frame whose id the gateway could
    /// not read (`None`).
    Error {
        /// The request's id, or `None` for `"id": null`.
        id: Option<std::borrow::Cow<'a, str>>,
        /// The error body. A code this crate does not know reads as
        /// `INTERNAL` (with the message kept), so a newer gateway's codes
        /// still fail a call.
        error: CommandError,
    },
    /// A push: no id, a type of its own.
    Push {
        /// The push type (`stream.events`, `session.expired`, …).
        kind: std::borrow::Cow<'a, str>,
        /// The push payload, unparsed.
        payload: &'a RawValue,
    },
}

/// Sorts one text frame from the gateway. `None` for anything that is not
/// a frame of the protocol, which a client ignores as it ignores what it
/// does not know.
pub fn decode_incoming(text: &str) -> Option<Incoming<'_>> {
    #[derive(Deserialize)]
    struct Wire<'a> {
        #[serde(default, borrow)]
        id: Option<std::borrow::Cow<'a, str>>,
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        #[serde(default, borrow)]
        payload: Option<&'a RawValue>,
        #[serde(default, borrow)]
        error: Option<WireErrorBody<'a>>,
    }
    #[derive(Deserialize)]
    struct WireErrorBody<'a> {
        #[serde(borrow)]
        code: std::borrow::Cow<'a, str>,
        #[serde(default)]
        message: String,
        #[serde(default)]
        retryable: bool,
        #[serde(default)]
        details: Option<serde_json::Value>,
    }
    let wire: Wire<'_> = serde_json::from_str(text).ok()?;
    match wire.kind.as_ref() {
        "reply" => Some(Incoming::Reply {
            id: wire.id?,
            payload: wire.payload?,
        }),
        "error" => {
            let body = wire.error?;
            let error = CommandError {
                code: ErrorCode::parse(&body.code).unwrap_or(ErrorCode::Internal),
                message: body.message,
                retryable: body.retryable,
                details: body.details,
            };
            Some(Incoming::Error { id: wire.id, error })
        }
        _ => Some(Incoming::Push {
            kind: wire.kind,
            payload: wire.payload?,
        }),
    }
}

/// Builds a frame from JSON text the caller assembled itself (the stream
/// module splices raw event JSON into `stream.events` frames).
pub fn frame_from_json_bytes(bytes: Bytes) -> Frame {
    Frame(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> (Option<String>, ErrorCode) {
        let r = decode(text).expect_err("should be rejected");
        (r.id, r.error.code)
    }

    #[test]
    fn accepts_a_well_formed_request() {
        let r = decode(r#" {"id":"1","type":"runtime.heartbeat","payload":{"a":1}}"#).unwrap();
        assert_eq!(r.id, "1");
        assert_eq!(r.kind, "runtime.heartbeat");
        assert_eq!(r.payload.get(), r#"{"a":1}"#);
    }

    #[test]
    fn rejects_bad_envelopes_with_the_right_code_and_id() {
        assert_eq!(code("nope"), (None, ErrorCode::BadFrame));
        assert_eq!(code("[1,2]"), (None, ErrorCode::BadFrame));
        assert_eq!(code("{\"id\":"), (None, ErrorCode::BadFrame));
        assert_eq!(
            code(r#"{"type":"x","payload":{}}"#),
            (None, ErrorCode::BadFrame)
        );
        assert_eq!(
            code(r#"{"id":"","type":"x","payload":{}}"#),
            (None, ErrorCode::BadFrame)
        );
        assert_eq!(
            code(r#"{"id":7,"type":"x","payload":{}}"#),
            (None, ErrorCode::BadFrame)
        );
        let long = "x".repeat(129);
        assert_eq!(
            code(&format!(r#"{{"id":"{long}","type":"x","payload":{{}}}}"#)),
            (None, ErrorCode::BadFrame)
        );
        let max = "é".repeat(128);
        assert!(decode(&format!(r#"{{"id":"{max}","type":"x","payload":{{}}}}"#)).is_ok());
        assert_eq!(
            code(r#"{"id":"a","payload":{}}"#),
            (Some("a".into()), ErrorCode::BadFrame)
        );
        assert_eq!(
            code(r#"{"id":"a","type":3,"payload":{}}"#),
            (Some("a".into()), ErrorCode::BadFrame)
        );
        assert_eq!(
            code(r#"{"id":"a","type":"x"}"#),
            (Some("a".into()), ErrorCode::InvalidPayload)
        );
        assert_eq!(
            code(r#"{"id":"a","type":"x","payload":{},"extra":1}"#),
            (Some("a".into()), ErrorCode::InvalidPayload)
        );
    }

    #[test]
    fn encodes_the_three_outgoing_shapes() {
        let reply = encode_reply("7", &serde_json::json!({"accepted": true}));
        assert_eq!(
            reply.as_str(),
            r#"{"id":"7","type":"reply","payload":{"accepted":true}}"#
        );
        let err = encode_error(None, &CommandError::bad_frame("x"));
        assert_eq!(
            err.as_str(),
            r#"{"id":null,"type":"error","error":{"code":"BAD_FRAME","message":"x","retryable":false}}"#
        );
        let limited = CommandError::new(ErrorCode::RateLimited, "later")
            .with_details(serde_json::json!({"maxConnections": 2}));
        assert_eq!(
            encode_error_body(&limited).as_str(),
            r#"{"error":{"code":"RATE_LIMITED","message":"later","retryable":true,"details":{"maxConnections":2}}}"#,
            "an HTTP body is the error frame's error member"
        );
        let push = encode_push(
            "gateway.draining",
            &serde_json::json!({"reconnectAfterMs": 5}),
        );
        assert_eq!(
            push.as_str(),
            r#"{"type":"gateway.draining","payload":{"reconnectAfterMs":5}}"#
        );
    }

    #[test]
    fn what_the_gateway_encodes_a_client_decodes() {
        let reply = encode_reply("r1", &serde_json::json!({"accepted": true}));
        match decode_incoming(reply.as_str()) {
            Some(Incoming::Reply { id, payload }) => {
                assert_eq!(id, "r1");
                assert_eq!(payload.get(), r#"{"accepted":true}"#);
            }
            other => panic!("{other:?}"),
        }
        let err = CommandError::new(ErrorCode::StaleEpoch, "moved")
            .with_details(serde_json::json!({"connectionEpoch": 3}));
        match decode_incoming(encode_error(None, &err).as_str()) {
            Some(Incoming::Error { id: None, error }) => assert_eq!(error, err),
            other => panic!("{other:?}"),
        }
        let push = encode_push(
            "gateway.draining",
            &serde_json::json!({"reconnectAfterMs": 5}),
        );
        match decode_incoming(push.as_str()) {
            Some(Incoming::Push { kind, payload }) => {
                assert_eq!(kind, "gateway.draining");
                assert_eq!(payload.get(), r#"{"reconnectAfterMs":5}"#);
            }
            other => panic!("{other:?}"),
        }
        let request = encode_request("7", "runs.list", &serde_json::json!({}));
        assert_eq!(
            request.as_str(),
            r#"{"id":"7","type":"runs.list","payload":{}}"#
        );
        assert!(
            decode(request.as_str()).is_ok(),
            "the gateway reads what a client encodes"
        );
        let typed = encode_command("8", &crate::commands::RunsListCommand::default());
        assert_eq!(
            typed.as_str(),
            r#"{"id":"8","type":"runs.list","payload":{}}"#,
            "a typed payload names its own type"
        );
        let list = crate::commands::RunsListCommand {
            cursor: None,
            limit: Some(5),
        };
        let once = Encoded::new(&list).unwrap();
        assert_eq!(
            encode_command("9", &once),
            encode_command("9", &list),
            "a payload encoded once is sent as if encoded each time"
        );
    }

    #[test]
    fn an_unknown_error_code_reads_as_internal_and_non_frames_are_none() {
        let text = r#"{"id":"1","type":"error","error":{"code":"FROM_THE_FUTURE","message":"m","retryable":true}}"#;
        match decode_incoming(text) {
            Some(Incoming::Error { error, .. }) => {
                assert_eq!(error.code, ErrorCode::Internal);
                assert_eq!(error.message, "m");
                assert!(error.retryable);
            }
            other => panic!("{other:?}"),
        }
        for junk in [
            "",
            "[]",
            "{}",
            r#"{"type":"reply","id":"1"}"#,
            r#"{"type":"error"}"#,
        ] {
            assert!(decode_incoming(junk).is_none(), "{junk}");
        }
    }

    /// `decode` then `Command::parse`, as the gateway reads a frame
    /// `decode_typed` declines: the id, the kind and the command's `Debug`.
    fn step_by_step(text: &str) -> Option<(String, CommandKind, String)> {
        let request = decode(text).ok()?;
        let kind = CommandKind::parse(&request.kind)?;
        let command = Command::parse(kind, request.payload).ok()?;
        Some((request.id, kind, format!("{command:?}")))
    }

    /// The one-pass read takes only frames the step-by-step read takes,
    /// typed alike, and it takes every seed of the fuzz target (one frame
    /// of every command, as clients lay them out). Tried on each seed and
    /// on every copy of it with one character removed, with its `payload`
    /// moved first, and with whitespace around every member.
    #[test]
    fn reading_in_one_pass_takes_what_step_by_step_takes_alike() {
        let sid = crate::ids::SessionId::generate().to_string();
        let seeds: Vec<String> = include_str!("../../../fuzz/seeds.txt")
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.trim_start_matches('V').replace("$SID", &sid))
            .collect();
        assert!(seeds.len() > 40, "{} seeds", seeds.len());
        let (mut valid, mut taken) = (0, 0);
        let mut check = |text: &str| {
            let slow = step_by_step(text);
            if let Some(fast) = decode_typed(text) {
                taken += 1;
                let fast = (fast.id, fast.kind, format!("{:?}", fast.command));
                assert_eq!(Some(fast), slow, "{text}");
            }
        };
        for seed in &seeds {
            if step_by_step(seed).is_some() {
                valid += 1;
                assert!(decode_typed(seed).is_some(), "declined: {seed}");
            }
            check(seed);
            for (i, _) in seed.char_indices() {
                let mut cut = seed.clone();
                cut.remove(i);
                check(&cut);
            }
            if let Some(at) = seed.find(",\"payload\":") {
                let (head, payload) = (&seed[1..at], &seed[at + 1..seed.len() - 1]);
                check(&format!("{{{payload},{head}}}"));
            }
            check(
                &seed
                    .replace(',', " ,\n ")
                    .replace(':', "\t: ")
                    .replace('{', "{ "),
            );
        }
        assert!(valid > 30, "{valid} valid seeds");
        assert!(taken > valid, "only {taken} taken");
    }
}

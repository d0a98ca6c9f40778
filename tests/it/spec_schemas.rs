//! The schemas under `spec/` are the contract; these tests hold the schemas
//! and the Rust protocol types to the same verdicts.
//!
//! - Every schema file parses and compiles, and so does each of its `$defs`;
//!   the index `spec/v1/commands.json` covers every command and push type and
//!   points at existing definitions.
//! - The given `runtime-session.json` is byte-for-byte the shared copy.
//! - Agreement: for many payloads per command type (valid ones and ones that
//!   break each rule), the schema's verdict equals whether
//!   `Command::parse` accepts it; the same for identifiers, timestamps and
//!   request envelopes (`decode`); and what the Rust encoders emit validates.

use rungate::ids::{Capability, OpaqueId, RunId, SessionId};
use rungate::protocol::commands::{
    Accepted, CheckpointLoadResponse, CheckpointSaveResponse, DeleteKVResponse, HeartbeatResponse,
    RuntimeAttachResponse, push,
};
use rungate::protocol::{
    Command, CommandError, CommandKind, ErrorCode, decode, encode_error, encode_push, encode_reply,
};
use rungate::time::Timestamp;
use rungate_test_support::schema::{Spec, absolute_ref, crate_root};
use serde_json::value::RawValue;
use serde_json::{Value, json};

const SID: &str = "0123456789abcdef0123456789abcdef";
const EPOCH: &str = "00112233445566778899aabbccddeeff";
const IDENTITY: &str = "common/identity.json#/$defs/";

fn spec() -> Spec {
    Spec::load()
}

// ------------------------------------------------------------ structure

#[test]
fn every_schema_file_parses_and_compiles_with_all_its_defs() {
    let spec = Spec::try_load().unwrap_or_else(|e| panic!("{e}"));
    let expected = [
        "spec/v1/schemas/commands/checkpoint.json",
        "spec/v1/schemas/commands/kv.json",
        "spec/v1/schemas/commands/runtime-session.json",
        "spec/v1/schemas/commands/stream.json",
        "spec/v1/schemas/common/identity.json",
        "spec/v1/schemas/events/output-event.json",
        "spec/v1/schemas/frames/envelope.json",
        "spec/v1/schemas/frames/pushes.json",
    ];
    let paths: Vec<&str> = spec.files().iter().map(|f| f.path.as_str()).collect();
    for want in expected {
        assert!(paths.contains(&want), "{want} is missing; found {paths:?}");
    }
    for file in spec.files() {
        assert_eq!(
            file.contents["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{}: must declare JSON Schema 2020-12",
            file.path
        );
        let defs = file.contents["$defs"].as_object().expect("$defs");
        assert!(!defs.is_empty(), "{}: no $defs", file.path);
        for name in defs.keys() {
            let r = format!("{}#/$defs/{name}", file.id);
            assert!(spec.has_def(&r), "{r} did not compile");
        }
    }
    // Every object definition is strict, except the free-form maps the
    // given schema declares on purpose (heartbeat metadata, config).
    for file in spec.files() {
        let mut problems = Vec::new();
        strictness(&file.contents, "", &mut problems);
        let allowed = [
            "/$defs/HeartbeatCommand/properties/metadata",
            "/$defs/GetConfigResponse/properties/config",
        ];
        problems.retain(|p| !allowed.contains(&p.as_str()));
        // Envelope payloads, error details and push payloads are objects
        // checked by the definition the index names, not here.
        problems
            .retain(|p| !p.ends_with("/properties/payload") && !p.ends_with("/properties/details"));
        assert!(
            problems.is_empty(),
            "{}: object schemas without additionalProperties false: {problems:?}",
            file.path
        );
    }
}

/// Pointers of `"type": "object"` schemas that declare `properties` (or
/// nothing) without `additionalProperties`.
fn strictness(v: &Value, at: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            if map.get("type") == Some(&json!("object"))
                && !map.contains_key("additionalProperties")
            {
                out.push(at.to_owned());
            }
            for (k, child) in map {
                strictness(child, &format!("{at}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                strictness(child, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_index_covers_every_command_and_push_and_points_at_existing_defs() {
    let spec = spec();
    let index_kinds: Vec<&str> = spec.commands().keys().map(String::as_str).collect();
    let mut rust_kinds: Vec<&str> = CommandKind::ALL.iter().map(|k| k.as_str()).collect();
    rust_kinds.sort_unstable();
    assert_eq!(
        index_kinds, rust_kinds,
        "index commands vs CommandKind::ALL"
    );

    for (name, entry) in spec.commands() {
        assert!(
            spec.has_def(&entry.request),
            "{name}: request {} does not exist",
            entry.request
        );
        assert!(
            spec.has_def(&entry.response),
            "{name}: response {} does not exist",
            entry.response
        );
        let kind = CommandKind::parse(name).expect("known kind");
        assert_eq!(
            entry.capability.as_deref(),
            kind.required_capability().map(Capability::as_str),
            "{name}: capability in the index vs CommandKind::required_capability"
        );
        assert!(!entry.endpoints.is_empty(), "{name}: no endpoints");
        for e in &entry.endpoints {
            assert!(
                ["/v1/runtime", "/v1/stream"].contains(&e.as_str()),
                "{name}: endpoint {e}"
            );
        }
    }
    let stream_only: Vec<&str> = spec
        .commands()
        .iter()
        .filter(|(_, e)| e.endpoints.iter().any(|p| p == "/v1/stream"))
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        stream_only,
        ["run.cancel", "runs.list", "stream.cancel", "stream.resume"]
    );

    let pushes: Vec<&str> = spec.pushes().keys().map(String::as_str).collect();
    assert_eq!(
        pushes,
        [
            "gateway.draining",
            "run.cancelRequested",
            "session.expired",
            "session.superseded",
            "stream.closed",
            "stream.ended",
            "stream.events",
            "stream.gap"
        ]
    );
    for (name, def) in spec.pushes() {
        assert!(spec.has_def(def), "{name}: payload {def} does not exist");
    }
    for push_type in [
        push::SESSION_SUPERSEDED,
        push::SESSION_EXPIRED,
        push::GATEWAY_DRAINING,
        push::STREAM_CLOSED,
        push::STREAM_ENDED,
        push::RUN_CANCEL_REQUESTED,
    ] {
        assert!(
            spec.push_def(push_type).is_some(),
            "{push_type} is not in the index"
        );
    }
    for kind in ["request", "reply", "error", "push"] {
        let def = spec.index()["envelope"][kind]
            .as_str()
            .expect("envelope entry");
        assert!(spec.has_def(def), "envelope.{kind}: {def} does not exist");
    }
}

/// The given command schema is never edited. Its length and CRC-32 were
/// taken from the copy the project was given (2026-12-02), so the check
/// needs nothing outside the repository.
#[test]
fn the_given_runtime_session_schema_is_unchanged() {
    const GIVEN_LEN: usize = 7603;
    const GIVEN_CRC32: u32 = 0xca5e_dcf8;
    let ours = crate_root().join("spec/v1/schemas/commands/runtime-session.json");
    let ours = std::fs::read(&ours).expect("runtime-session.json is present");
    assert_eq!(ours.len(), GIVEN_LEN, "runtime-session.json was edited");
    assert_eq!(
        crc32fast::hash(&ours),
        GIVEN_CRC32,
        "runtime-session.json was edited"
    );
}

#[test]
fn closed_lists_match_the_rust_enums() {
    let spec = spec();
    let codes = spec
        .def_schema("frames/envelope.json#/$defs/ErrorCode")
        .expect("ErrorCode")["enum"]
        .clone();
    let rust: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(codes, json!(rust), "ErrorCode enum vs ErrorCode::ALL");
    for code in ErrorCode::ALL {
        assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
    }

    let caps = spec
        .def_schema("commands/runtime-session.json#/$defs/RuntimeCapability")
        .expect("RuntimeCapability")["enum"]
        .clone();
    let rust: Vec<&str> = Capability::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        caps,
        json!(rust),
        "RuntimeCapability enum vs Capability::ALL"
    );
}

#[test]
fn spec_errors_name_the_definition_and_the_place() {
    let spec = spec();
    let frame = json!({"id": "1", "type": "runtime.heartbeat", "payload": {"sessionId": SID, "runId": "a/b"}});
    let e = spec.check_request(&frame).unwrap_err();
    assert!(
        e.contains("HeartbeatCommand") && e.contains("/payload/runId"),
        "{e}"
    );
    let e = spec
        .check_request(&json!({"id": "", "type": "x", "payload": {}}))
        .unwrap_err();
    assert!(
        e.contains("envelope.json#/$defs/Request") && e.contains("/id"),
        "{e}"
    );
    let e = spec
        .check_request(&json!({"id": "1", "type": "nope", "payload": {}}))
        .unwrap_err();
    assert!(e.contains("\"nope\""), "{e}");
    let e = spec
        .check_push(&json!({"type": "stream.gap", "payload": {"runId": "r", "streamEpoch": EPOCH, "fromOffset": 3}}))
        .unwrap_err();
    assert!(e.contains("StreamGap") && e.contains("toOffset"), "{e}");
    assert!(
        spec.check_def("frames/pushes.json#/$defs/NoSuchThing", &json!({}))
            .is_err()
    );
    // All three spellings of a reference work.
    let gap = json!({"runId": "r", "streamEpoch": EPOCH, "fromOffset": 3, "toOffset": 5});
    for r in [
        "frames/pushes.json#/$defs/StreamGap",
        "schemas/frames/pushes.json#/$defs/StreamGap",
        "https://agent-service.spec/v1/schemas/frames/pushes.json#/$defs/StreamGap",
    ] {
        spec.check_def(r, &gap).unwrap();
    }
    // A deeper pointer compiles on demand.
    spec.check_def(
        "frames/pushes.json#/$defs/StreamGap/properties/toOffset",
        &json!(5),
    )
    .unwrap();
    assert!(spec.is_valid(
        &absolute_ref("common/identity.json#/$defs/offset"),
        &json!(0)
    ));
}

// ------------------------------------------------------------ agreement

/// One payload (or frame) to judge, as exact JSON text.
struct Case {
    label: String,
    text: String,
}

fn case(label: impl Into<String>, v: Value) -> Case {
    Case {
        label: label.into(),
        text: v.to_string(),
    }
}

fn raw_case(label: impl Into<String>, text: impl Into<String>) -> Case {
    Case {
        label: label.into(),
        text: text.into(),
    }
}

/// `base` with member `key` set to `value`.
fn with(base: &Value, key: &str, value: Value) -> Value {
    let mut v = base.clone();
    v[key] = value;
    v
}

/// `base` without member `key`.
fn without(base: &Value, key: &str) -> Value {
    let mut v = base.clone();
    v.as_object_mut().expect("object").remove(key);
    v
}

/// The schema's verdict on JSON text (text that is not JSON is invalid).
fn schema_verdict(spec: &Spec, def: &str, text: &str) -> Result<(), String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    spec.check_def(def, &value)
}

fn rust_verdict(kind: CommandKind, text: &str) -> Result<(), String> {
    let raw: Box<RawValue> = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    Command::parse(kind, &raw)
        .map(|_| ())
        .map_err(|e: CommandError| {
            format!(
                "{e} {}",
                e.details.as_ref().map(Value::to_string).unwrap_or_default()
            )
        })
}

fn describe(schema: &Result<(), String>, rust: &Result<(), String>) -> String {
    let s = match schema {
        Ok(()) => "schema ACCEPTS".to_owned(),
        Err(e) => format!("schema REFUSES ({e})"),
    };
    let r = match rust {
        Ok(()) => "Rust ACCEPTS".to_owned(),
        Err(e) => format!("Rust REFUSES ({e})"),
    };
    format!("{s}; {r}")
}

fn assert_no_disagreements(what: &str, checked: usize, disagreements: &[String]) {
    if !disagreements.is_empty() {
        panic!(
            "{} of {checked} {what} judged differently by the schema and the Rust types:\n  {}",
            disagreements.len(),
            disagreements.join("\n  ")
        );
    }
    assert!(checked > 0);
}

/// Valid and invalid payloads for every command type.
fn command_cases() -> Vec<(CommandKind, Vec<Case>)> {
    use CommandKind as K;
    let long_run = "r".repeat(128);
    let too_long_run = "r".repeat(129);
    let u64_max = u64::MAX;

    // Member values that are wrong for the member's type, common to many commands.
    let bad_run_ids = [
        ("empty runId", json!("")),
        ("runId with '/'", json!("run/1")),
        ("runId with '*'", json!("run*")),
        ("runId with a space", json!("run 1")),
        ("runId with non-ASCII", json!("rün")),
        ("runId with a newline", json!("run\n")),
        ("runId of 129 chars", json!(too_long_run)),
        ("numeric runId", json!(7)),
        ("null runId", Value::Null),
    ];
    let bad_session_ids = [
        ("uppercase sessionId", json!(SID.to_uppercase())),
        ("31-char sessionId", json!(&SID[1..])),
        ("33-char sessionId", json!(format!("{SID}0"))),
        ("sessionId with 'g'", json!(format!("g{}", &SID[1..]))),
        ("empty sessionId", json!("")),
        ("numeric sessionId", json!(1)),
    ];
    let bad_opaque_ids = [
        ("opaque id with a space", json!("inst 1")),
        ("opaque id with a tab", json!("inst\t1")),
        ("opaque id with DEL", json!("inst\u{7f}")),
        ("opaque id with non-ASCII", json!("insté")),
        ("empty opaque id", json!("")),
        ("opaque id of 129 chars", json!("i".repeat(129))),
        ("numeric opaque id", json!(1)),
    ];
    // Unsigned integers (connectionEpoch, offsets, seq).
    let good_uints = [("0", "0"), ("u64::MAX", "18446744073709551615")];
    let bad_uints = [
        ("negative", "-1"),
        ("fractional", "1.5"),
        ("string", "\"1\""),
        ("boolean", "true"),
        ("null", "null"),
        ("an object", "{}"),
    ];
    // Integer-valued numbers that serde_json reads as floats (`-0` included):
    // JSON Schema calls them integers.
    let float_integers = [
        ("1.0", "1.0"),
        ("1e2", "1e2"),
        ("-0.0", "-0.0"),
        ("-0", "-0"),
    ];

    let mut all = Vec::new();

    // runtime.attach
    let base = json!({"runId": "run-1", "runtimeInstanceId": "inst-1", "protocolVersion": "1"});
    let full = json!({
        "runId": "run-1", "attemptId": "att#1", "runtimeInstanceId": "inst-1",
        "protocolVersion": "1.2", "reconnect": true, "connectionEpoch": 3,
        "capabilities": Capability::ALL.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
    });
    let mut c = vec![
        case("minimal", base.clone()),
        case("every member", full.clone()),
        case("runId of 128 chars", with(&base, "runId", json!(long_run))),
        case(
            "runId with every allowed punctuation",
            with(&base, "runId", json!("a.b_c:d-E9")),
        ),
        case(
            "runtimeInstanceId of every visible ASCII",
            with(
                &base,
                "runtimeInstanceId",
                json!("!\"#$%&'()*+,-./09:;<=>?@AZ[\\]^_`az{|}~"),
            ),
        ),
        case(
            "runtimeInstanceId of 128 chars",
            with(&base, "runtimeInstanceId", json!("~".repeat(128))),
        ),
        case(
            "protocolVersion 2 (checked later, not by the schema)",
            with(&base, "protocolVersion", json!("2")),
        ),
        case("no capabilities", with(&base, "capabilities", json!([]))),
        case(
            "repeated capability",
            with(&base, "capabilities", json!(["kv.read", "kv.read"])),
        ),
        case("reconnect false", with(&base, "reconnect", json!(false))),
        case("unknown member", with(&base, "bogus", json!(1))),
        case("unknown member null", with(&base, "bogus", Value::Null)),
        case(
            "sessionId is not an attach member",
            with(&base, "sessionId", json!(SID)),
        ),
        case("missing runId", without(&base, "runId")),
        case(
            "missing runtimeInstanceId",
            without(&base, "runtimeInstanceId"),
        ),
        case("missing protocolVersion", without(&base, "protocolVersion")),
        case(
            "numeric protocolVersion",
            with(&base, "protocolVersion", json!(1)),
        ),
        case(
            "reconnect as string",
            with(&base, "reconnect", json!("true")),
        ),
        case("reconnect null", with(&base, "reconnect", Value::Null)),
        case(
            "unknown capability",
            with(&base, "capabilities", json!(["kv.read", "fly"])),
        ),
        case(
            "capability in another case",
            with(&base, "capabilities", json!(["KV.READ"])),
        ),
        case(
            "capabilities as a string",
            with(&base, "capabilities", json!("kv.read")),
        ),
        case(
            "capabilities null",
            with(&base, "capabilities", Value::Null),
        ),
        case(
            "capability as a one-member object",
            with(&base, "capabilities", json!([{"kv.read": null}])),
        ),
        case("attemptId null", with(&base, "attemptId", Value::Null)),
        case(
            "payload is an array",
            json!(["run-1", null, "inst-1", "1", false, null, []]),
        ),
        case("payload is a string", json!("run-1")),
        case("payload is null", Value::Null),
    ];
    for (label, v) in &bad_run_ids {
        c.push(case(label.to_string(), with(&base, "runId", v.clone())));
    }
    for (label, v) in &bad_opaque_ids {
        c.push(case(
            format!("runtimeInstanceId: {label}"),
            with(&base, "runtimeInstanceId", v.clone()),
        ));
        c.push(case(
            format!("attemptId: {label}"),
            with(&base, "attemptId", v.clone()),
        ));
    }
    for (label, n) in good_uints.iter().chain(&bad_uints).chain(&float_integers) {
        let text = format!(
            r#"{{"runId":"run-1","runtimeInstanceId":"inst-1","protocolVersion":"1","connectionEpoch":{n}}}"#
        );
        c.push(raw_case(format!("connectionEpoch {label}"), text));
    }
    all.push((K::RuntimeAttach, c));

    // runtime.heartbeat
    let base = json!({"sessionId": SID, "runId": "run-1"});
    let mut c = vec![
        case("minimal", base.clone()),
        case(
            "every member",
            json!({"sessionId": SID, "runId": "run-1", "runtimeInstanceId": "inst-1", "metadata": {"load": 0.5, "n": [1, {"x": null}]}}),
        ),
        case("empty metadata", with(&base, "metadata", json!({}))),
        case("unknown member", with(&base, "extra", json!(true))),
        case("missing sessionId", without(&base, "sessionId")),
        case("missing runId", without(&base, "runId")),
        case("metadata as an array", with(&base, "metadata", json!([1]))),
        case("metadata as a string", with(&base, "metadata", json!("x"))),
        case("metadata null", with(&base, "metadata", Value::Null)),
        case(
            "runtimeInstanceId null",
            with(&base, "runtimeInstanceId", Value::Null),
        ),
        case("payload is an array", json!([SID, "run-1"])),
        case(
            "payload is an array with nulls",
            json!([SID, "run-1", null, null]),
        ),
    ];
    for (label, v) in &bad_session_ids {
        c.push(case(label.to_string(), with(&base, "sessionId", v.clone())));
    }
    for (label, v) in &bad_run_ids {
        c.push(case(label.to_string(), with(&base, "runId", v.clone())));
    }
    for (label, v) in &bad_opaque_ids {
        c.push(case(
            format!("runtimeInstanceId: {label}"),
            with(&base, "runtimeInstanceId", v.clone()),
        ));
    }
    all.push((K::RuntimeHeartbeat, c));

    // runtime.recoverConnections
    let base = json!({"sessionId": SID, "mainRunId": "main"});
    let mut c = vec![
        case("minimal", base.clone()),
        case(
            "every member",
            json!({"sessionId": SID, "mainRunId": "main", "subRunIds": ["a", "b.c"], "connectionEpoch": 2}),
        ),
        case("no sub-runs", with(&base, "subRunIds", json!([]))),
        case(
            "runId instead of mainRunId",
            json!({"sessionId": SID, "runId": "main"}),
        ),
        case("unknown member", with(&base, "runId", json!("main"))),
        case("missing sessionId", without(&base, "sessionId")),
        case(
            "a bad sub-run id",
            with(&base, "subRunIds", json!(["a", "b/c"])),
        ),
        case(
            "subRunIds as a string",
            with(&base, "subRunIds", json!("a")),
        ),
        case("subRunIds null", with(&base, "subRunIds", Value::Null)),
        case(
            "a null sub-run id",
            with(&base, "subRunIds", json!(["a", null])),
        ),
    ];
    for (label, v) in &bad_run_ids {
        c.push(case(
            format!("mainRunId: {label}"),
            with(&base, "mainRunId", v.clone()),
        ));
    }
    for (label, n) in good_uints.iter().chain(&bad_uints).chain(&float_integers) {
        let text = format!(r#"{{"sessionId":"{SID}","mainRunId":"main","connectionEpoch":{n}}}"#);
        c.push(raw_case(format!("connectionEpoch {label}"), text));
    }
    all.push((K::RuntimeRecoverConnections, c));

    // secrets.get
    let base = json!({"sessionId": SID, "runId": "run-1"});
    all.push((
        K::SecretsGet,
        vec![
            case("minimal", base.clone()),
            case(
                "with names",
                with(&base, "names", json!(["API_KEY", "", "ü"])),
            ),
            case("no names", with(&base, "names", json!([]))),
            case("a numeric name", with(&base, "names", json!(["a", 1]))),
            case("names as a string", with(&base, "names", json!("API_KEY"))),
            case("names null", with(&base, "names", Value::Null)),
            case("unknown member", with(&base, "name", json!("API_KEY"))),
            case("missing runId", without(&base, "runId")),
            case("bad sessionId", with(&base, "sessionId", json!("abc"))),
        ],
    ));

    // config.get
    let base = json!({"sessionId": SID, "runId": "run-1"});
    let mut c = vec![
        case("minimal", base.clone()),
        case("unknown member", with(&base, "keys", json!([]))),
        case("missing sessionId", without(&base, "sessionId")),
        case("missing both", json!({})),
        case("payload is an array", json!([SID, "run-1"])),
        case("payload is a string", json!("x")),
        case("payload is a number", json!(1)),
        case("payload is null", Value::Null),
    ];
    for (label, v) in &bad_session_ids {
        c.push(case(label.to_string(), with(&base, "sessionId", v.clone())));
    }
    all.push((K::ConfigGet, c));

    // kv.get
    let base = json!({"sessionId": SID, "runId": "run-1", "keys": ["a", "b"]});
    all.push((
        K::KvGet,
        vec![
            case("two keys", base.clone()),
            case("no keys", with(&base, "keys", json!([]))),
            case("missing keys", without(&base, "keys")),
            case("keys null", with(&base, "keys", Value::Null)),
            case("a numeric key", with(&base, "keys", json!(["a", 2]))),
            case("keys as an object", with(&base, "keys", json!({"a": 1}))),
            case("unknown member", with(&base, "kv", json!({}))),
        ],
    ));

    // kv.set
    let base = json!({"sessionId": SID, "runId": "run-1", "kv": {"a": "1", "": "empty key"}});
    all.push((
        K::KvSet,
        vec![
            case("two pairs", base.clone()),
            case("no pairs", with(&base, "kv", json!({}))),
            case("missing kv", without(&base, "kv")),
            case("kv null", with(&base, "kv", Value::Null)),
            case("a numeric value", with(&base, "kv", json!({"a": 1}))),
            case("a null value", with(&base, "kv", json!({"a": null}))),
            case(
                "an object value",
                with(&base, "kv", json!({"a": {"b": "c"}})),
            ),
            case("kv as an array", with(&base, "kv", json!([["a", "1"]]))),
            case("unknown member", with(&base, "ttl", json!(5))),
        ],
    ));

    // kv.delete
    let base = json!({"sessionId": SID, "runId": "run-1", "keys": ["a", ""]});
    all.push((
        K::KvDelete,
        vec![
            case("two keys", base.clone()),
            case("no keys", with(&base, "keys", json!([]))),
            case("a key twice", with(&base, "keys", json!(["a", "a"]))),
            case("missing keys", without(&base, "keys")),
            case("missing sessionId", without(&base, "sessionId")),
            case("bad runId", with(&base, "runId", json!("a/b"))),
            case("keys null", with(&base, "keys", Value::Null)),
            case("a numeric key", with(&base, "keys", json!(["a", 2]))),
            case("keys as a string", with(&base, "keys", json!("a"))),
            case("keys as an object", with(&base, "keys", json!({"a": 1}))),
            case("unknown member", with(&base, "kv", json!({}))),
        ],
    ));

    // events.publish
    let base = json!({"sessionId": SID, "runId": "run-1", "events": [{"type": "log"}]});
    let ev = |e: Value| json!({"sessionId": SID, "runId": "run-1", "events": [{"type": "log"}, e]});
    let mut c = vec![
        case("one minimal event", base.clone()),
        case("no events", with(&base, "events", json!([]))),
        case(
            "an event with every member",
            ev(
                json!({"type": "tool.call", "seq": 7, "timestamp": "2026-11-25T10:00:00.123Z", "data": {"a": [1, 2]}}),
            ),
        ),
        case("event data null", ev(json!({"type": "log", "data": null}))),
        case(
            "event data a string",
            ev(json!({"type": "log", "data": "hello"})),
        ),
        case(
            "event type of 128 non-ASCII chars",
            ev(json!({"type": "é".repeat(128)})),
        ),
        case("event seq 0", ev(json!({"type": "log", "seq": 0}))),
        case(
            "event seq u64::MAX",
            ev(json!({"type": "log", "seq": u64_max})),
        ),
        case("missing events", without(&base, "events")),
        case("events null", with(&base, "events", Value::Null)),
        case(
            "events as an object",
            with(&base, "events", json!({"type": "log"})),
        ),
        case("unknown member", with(&base, "seq", json!(1))),
        case(
            "event with an unknown member",
            ev(json!({"type": "log", "x": 1})),
        ),
        case(
            "event with offset (gateway-assigned)",
            ev(json!({"type": "log", "offset": 1})),
        ),
        case("event without type", ev(json!({"data": 1}))),
        case("event with empty type", ev(json!({"type": ""}))),
        case(
            "event type of 129 chars",
            ev(json!({"type": "t".repeat(129)})),
        ),
        case("event type a number", ev(json!({"type": 1}))),
        case("event type null", ev(json!({"type": null}))),
        case("event seq negative", ev(json!({"type": "log", "seq": -1}))),
        case(
            "event seq fractional",
            ev(json!({"type": "log", "seq": 1.5})),
        ),
        case("event seq a string", ev(json!({"type": "log", "seq": "1"}))),
        case("event seq null", ev(json!({"type": "log", "seq": null}))),
        case(
            "event timestamp null",
            ev(json!({"type": "log", "timestamp": null})),
        ),
        case(
            "event timestamp a number",
            ev(json!({"type": "log", "timestamp": 1764064800123u64})),
        ),
        case("event is a string", ev(json!("log"))),
        case("event is null", ev(Value::Null)),
        case("event is an array", ev(json!(["log"]))),
        case(
            "event is an array with nulls",
            ev(json!(["log", null, null, null])),
        ),
    ];
    for (label, ts) in timestamp_cases() {
        c.push(case(
            format!("event timestamp {label}"),
            ev(json!({"type": "log", "timestamp": ts})),
        ));
    }
    for (label, n) in float_integers
        .iter()
        .chain([("2^64", "18446744073709551616")].iter())
    {
        let text = format!(
            r#"{{"sessionId":"{SID}","runId":"run-1","events":[{{"type":"log","seq":{n}}}]}}"#
        );
        c.push(raw_case(format!("event seq {label}"), text));
    }
    all.push((K::EventsPublish, c));

    // checkpoint.save
    let base = json!({"sessionId": SID, "runId": "run-1", "data": {"step": 3}});
    let mut c = vec![
        case("object data", base.clone()),
        case("null data", with(&base, "data", Value::Null)),
        case("array data", with(&base, "data", json!([1, "two"]))),
        case(
            "with checkpointId",
            with(&base, "checkpointId", json!("cp-1")),
        ),
        case("missing data", without(&base, "data")),
        case("missing runId", without(&base, "runId")),
        case(
            "checkpointId null",
            with(&base, "checkpointId", Value::Null),
        ),
        case(
            "unknown member",
            with(&base, "savedAt", json!("2026-11-25T10:00:00.000Z")),
        ),
    ];
    for (label, v) in &bad_opaque_ids {
        c.push(case(
            format!("checkpointId: {label}"),
            with(&base, "checkpointId", v.clone()),
        ));
    }
    all.push((K::CheckpointSave, c));

    // checkpoint.load
    let base = json!({"sessionId": SID, "runId": "run-1"});
    all.push((
        K::CheckpointLoad,
        vec![
            case("latest", base.clone()),
            case("by id", with(&base, "checkpointId", json!("cp-1"))),
            case(
                "checkpointId null",
                with(&base, "checkpointId", Value::Null),
            ),
            case(
                "checkpointId with a space",
                with(&base, "checkpointId", json!("cp 1")),
            ),
            case("missing sessionId", without(&base, "sessionId")),
            case("unknown member", with(&base, "data", json!({}))),
        ],
    ));

    // stream.resume
    let base = json!({"runId": "run-1"});
    let mut c = vec![
        case("live", base.clone()),
        case(
            "every member",
            json!({"runId": "run-1", "fromOffset": 10, "streamEpoch": EPOCH, "sessionId": SID}),
        ),
        case(
            "16-hex epoch",
            with(&base, "streamEpoch", json!("0123456789abcdef")),
        ),
        case(
            "64-hex epoch",
            with(&base, "streamEpoch", json!("a".repeat(64))),
        ),
        case("missing runId", json!({"fromOffset": 0})),
        case("unknown member", with(&base, "offset", json!(0))),
        case(
            "streamEpoch too short",
            with(&base, "streamEpoch", json!("abc")),
        ),
        case(
            "streamEpoch of 65 hex",
            with(&base, "streamEpoch", json!("a".repeat(65))),
        ),
        case(
            "streamEpoch uppercase",
            with(&base, "streamEpoch", json!(EPOCH.to_uppercase())),
        ),
        case("streamEpoch empty", with(&base, "streamEpoch", json!(""))),
        case(
            "streamEpoch a number",
            with(&base, "streamEpoch", json!(12)),
        ),
        case("streamEpoch null", with(&base, "streamEpoch", Value::Null)),
        case("sessionId null", with(&base, "sessionId", Value::Null)),
        case("bad sessionId", with(&base, "sessionId", json!("xyz"))),
    ];
    for (label, v) in &bad_run_ids {
        c.push(case(label.to_string(), with(&base, "runId", v.clone())));
    }
    for (label, n) in good_uints.iter().chain(&bad_uints).chain(&float_integers) {
        c.push(raw_case(
            format!("fromOffset {label}"),
            format!(r#"{{"runId":"run-1","fromOffset":{n}}}"#),
        ));
    }
    c.push(raw_case(
        "fromOffset 2^64",
        r#"{"runId":"run-1","fromOffset":18446744073709551616}"#,
    ));
    all.push((K::StreamResume, c));

    // stream.cancel
    let base = json!({"runId": "run-1"});
    all.push((
        K::StreamCancel,
        vec![
            case("viewer form", base.clone()),
            case("runtime form", with(&base, "sessionId", json!(SID))),
            case("missing runId", json!({"sessionId": SID})),
            case("unknown member", with(&base, "fromOffset", json!(0))),
            case("sessionId null", with(&base, "sessionId", Value::Null)),
            case("bad runId", with(&base, "runId", json!("a b"))),
            case("payload is an array", json!(["run-1"])),
        ],
    ));

    // runtime.finish
    let base = json!({"sessionId": SID, "runId": "run-1", "outcome": "completed"});
    let mut c = vec![
        case("minimal", base.clone()),
        case("failed", with(&base, "outcome", json!("failed"))),
        case("cancelled", with(&base, "outcome", json!("cancelled"))),
        case("with a message", with(&base, "message", json!("done"))),
        case("empty message", with(&base, "message", json!(""))),
        case(
            "message of 1024 ASCII",
            with(&base, "message", json!("m".repeat(1024))),
        ),
        case(
            "message of 1025 ASCII",
            with(&base, "message", json!("m".repeat(1025))),
        ),
        case("message null", with(&base, "message", Value::Null)),
        case("numeric message", with(&base, "message", json!(1))),
        case("unknown outcome", with(&base, "outcome", json!("done"))),
        case(
            "outcome in another case",
            with(&base, "outcome", json!("Completed")),
        ),
        case(
            "outcome as a one-member object",
            with(&base, "outcome", json!({"completed": null})),
        ),
        case("outcome null", with(&base, "outcome", Value::Null)),
        case("missing outcome", without(&base, "outcome")),
        case("missing sessionId", without(&base, "sessionId")),
        case("missing runId", without(&base, "runId")),
        case("unknown member", with(&base, "nextOffset", json!(0))),
        case("payload is an array", json!([SID, "run-1", "completed"])),
    ];
    for (label, v) in bad_run_ids.iter().cloned() {
        c.push(case(label, with(&base, "runId", v)));
    }
    for (label, v) in bad_session_ids.iter().cloned() {
        c.push(case(label, with(&base, "sessionId", v)));
    }
    all.push((K::RuntimeFinish, c));

    // run.cancel
    let base = json!({"runId": "run-1"});
    let mut c = vec![
        case("minimal", base.clone()),
        case(
            "with a reason",
            with(&base, "reason", json!("user pressed stop")),
        ),
        case(
            "reason of 1024 ASCII",
            with(&base, "reason", json!("x".repeat(1024))),
        ),
        case(
            "reason of 1025 ASCII",
            with(&base, "reason", json!("x".repeat(1025))),
        ),
        case("reason null", with(&base, "reason", Value::Null)),
        case("numeric reason", with(&base, "reason", json!(3))),
        case("missing runId", json!({"reason": "x"})),
        case(
            "sessionId is not a member",
            with(&base, "sessionId", json!(SID)),
        ),
        case("unknown member", with(&base, "force", json!(true))),
        case("payload is an array", json!(["run-1"])),
    ];
    for (label, v) in bad_run_ids.iter().cloned() {
        c.push(case(label, with(&base, "runId", v)));
    }
    all.push((K::RunCancel, c));

    // runs.list
    all.push((
        K::RunsList,
        vec![
            case("empty object", json!({})),
            case("a member", json!({"runId": "run-1"})),
            case("a null member", json!({"x": null})),
            case("payload is an empty array", json!([])),
            case("payload is a non-empty array", json!([1])),
            case("payload is null", Value::Null),
            case("payload is a string", json!("")),
        ],
    ));

    all
}

/// RFC 3339 timestamps, good and bad.
fn timestamp_cases() -> Vec<(&'static str, Value)> {
    vec![
        (
            "as the gateway writes it",
            json!("2026-11-25T10:00:00.123Z"),
        ),
        ("without fraction", json!("2026-11-25T10:00:00Z")),
        ("lowercase t and z", json!("2026-11-25t10:00:00z")),
        (
            "with nanoseconds and an offset",
            json!("2026-11-25T10:00:00.123456789+01:00"),
        ),
        (
            "with 13 fraction digits",
            json!("2026-11-25T10:00:00.1234567890123Z"),
        ),
        ("offset -23:59", json!("2026-11-25T10:00:00-23:59")),
        ("on a leap day", json!("2024-02-29T00:00:00Z")),
        ("in year 0000", json!("0000-01-01T00:00:00Z")),
        ("in year 9999", json!("9999-12-31T23:59:59.999Z")),
        ("with a space separator", json!("2026-11-25 10:00:00Z")),
        ("with an 'x' separator", json!("2026-11-25x10:00:00Z")),
        (
            "with a leap second at the end of a month",
            json!("2016-12-31T23:59:60Z"),
        ),
        (
            "with a leap second mid-month",
            json!("2026-11-25T23:59:60Z"),
        ),
        ("on Feb 29 of a common year", json!("2025-02-29T00:00:00Z")),
        ("on Nov 31", json!("2026-11-31T00:00:00Z")),
        ("in month 13", json!("2026-13-01T00:00:00Z")),
        ("in month 00", json!("2026-00-10T00:00:00Z")),
        ("on day 00", json!("2026-11-00T00:00:00Z")),
        ("at hour 24", json!("2026-11-25T24:00:00Z")),
        ("at minute 60", json!("2026-11-25T10:60:00Z")),
        ("offset +24:00", json!("2026-11-25T10:00:00+24:00")),
        ("offset +01:60", json!("2026-11-25T10:00:00+01:60")),
        ("offset without colon", json!("2026-11-25T10:00:00+0100")),
        ("without offset", json!("2026-11-25T10:00:00")),
        ("with an empty fraction", json!("2026-11-25T10:00:00.Z")),
        ("without seconds", json!("2026-11-25T10:00Z")),
        ("with a two-digit year", json!("26-11-25T10:00:00Z")),
        ("with a five-digit year", json!("+02026-11-25T10:00:00Z")),
        ("with full-width digits", json!("２０２６-11-25T10:00:00Z")),
        ("with a leading space", json!(" 2026-11-25T10:00:00Z")),
        ("with a trailing space", json!("2026-11-25T10:00:00Z ")),
        ("with a trailing newline", json!("2026-11-25T10:00:00Z\n")),
        ("date only", json!("2026-11-25")),
        ("a word", json!("yesterday")),
        ("empty", json!("")),
    ]
}

/// When this fails, each line names the command, the case, both verdicts
/// (with the schema's and the parser's reasons) and the payload. Fix the side
/// that breaks the contract written in spec/README.md; the given
/// runtime-session.json never changes.
#[test]
fn command_payloads_agree_with_command_parse() {
    let spec = spec();
    let mut disagreements = Vec::new();
    let mut checked = 0;
    let mut valid = 0;
    for (kind, cases) in command_cases() {
        let def = spec
            .request_def(kind.as_str())
            .expect("in the index")
            .to_owned();
        for c in cases {
            let schema = schema_verdict(&spec, &def, &c.text);
            let rust = rust_verdict(kind, &c.text);
            checked += 1;
            valid += usize::from(schema.is_ok());
            if schema.is_ok() != rust.is_ok() {
                disagreements.push(format!(
                    "{} / {}: {}\n      payload: {}",
                    kind.as_str(),
                    c.label,
                    describe(&schema, &rust),
                    c.text
                ));
            }
        }
    }
    assert!(
        valid >= 30,
        "too few valid cases ({valid}): the table is broken"
    );
    assert_no_disagreements("payloads", checked, &disagreements);
}

/// Whether the `src/ids.rs` type behind identity definition `def` accepts `v`.
fn id_accepted_by_rust(def: &str, v: &Value) -> bool {
    match def {
        "runId" => serde_json::from_value::<RunId>(v.clone()).is_ok(),
        "opaqueId" | "attemptId" => serde_json::from_value::<OpaqueId>(v.clone()).is_ok(),
        "sessionId" => serde_json::from_value::<SessionId>(v.clone()).is_ok(),
        other => panic!("no Rust type for identity {other}"),
    }
}

#[test]
fn identifiers_agree_with_ids_rs() {
    let spec = spec();
    let strings: Vec<Value> = vec![
        json!("r"),
        json!("run-1.a_b:c"),
        json!("A".repeat(128)),
        json!("A".repeat(129)),
        json!(""),
        json!("run/1"),
        json!("run*"),
        json!("rün"),
        json!("run 1"),
        json!("run\n"),
        json!("run\u{0}"),
        json!("~!#"),
        json!("!".repeat(128)),
        json!("!".repeat(129)),
        json!("a\u{7f}"),
        json!("\t"),
        json!(SID),
        json!(SID.to_uppercase()),
        json!(&SID[1..]),
        json!(format!("{SID}0")),
        json!("g".repeat(32)),
        json!("é".repeat(16)),
        json!(5),
        Value::Null,
        json!(["r"]),
    ];
    let mut disagreements = Vec::new();
    let mut checked = 0;
    for s in &strings {
        for def in ["runId", "opaqueId", "attemptId", "sessionId"] {
            let schema = spec.check_def(&format!("{IDENTITY}{def}"), s);
            let rust = id_accepted_by_rust(def, s);
            checked += 1;
            if schema.is_ok() != rust {
                disagreements.push(format!(
                    "{def} {s}: schema {schema:?}, Rust accepts: {rust}"
                ));
            }
        }
    }
    assert_no_disagreements("identifiers", checked, &disagreements);
    for _ in 0..20 {
        spec.check_def(
            &format!("{IDENTITY}sessionId"),
            &json!(SessionId::generate()),
        )
        .expect("generated session ids follow the schema");
    }
}

#[test]
fn timestamps_agree_with_time_rs() {
    let spec = spec();
    let mut disagreements = Vec::new();
    let mut checked = 0;
    let mut cases = timestamp_cases();
    cases.push(("a number", json!(1_764_064_800_123u64)));
    cases.push(("null", Value::Null));
    for (label, v) in cases {
        let schema = spec.check_def(&format!("{IDENTITY}timestamp"), &v);
        let rust = serde_json::from_value::<Timestamp>(v.clone())
            .map(|_| ())
            .map_err(|e| e.to_string());
        checked += 1;
        if schema.is_ok() != rust.is_ok() {
            disagreements.push(format!(
                "timestamp {label} {v}: {}",
                describe(&schema, &rust)
            ));
        }
    }
    assert_no_disagreements("timestamps", checked, &disagreements);
}

/// Request frames, as text. Payload object-ness is not the envelope's
/// business in Rust (`decode` leaves the payload raw and `Command::parse`
/// types it), so every payload here is an object or absent; non-object
/// payloads are in the command table above.
fn envelope_cases() -> Vec<Case> {
    let max_id = "é".repeat(128);
    let long_id = "x".repeat(129);
    vec![
        raw_case(
            "well formed",
            r#"{"id":"1","type":"runtime.heartbeat","payload":{}}"#,
        ),
        raw_case(
            "members in another order",
            r#"{"payload":{"a":1},"type":"kv.get","id":"req-7"}"#,
        ),
        raw_case(
            "surrounding whitespace",
            " \n{\"id\":\"1\",\"type\":\"x\",\"payload\":{}}\n ",
        ),
        raw_case(
            "unknown type (UNKNOWN_TYPE later)",
            r#"{"id":"1","type":"no.such","payload":{}}"#,
        ),
        raw_case(
            "id of 128 non-ASCII chars",
            format!(r#"{{"id":"{max_id}","type":"x","payload":{{}}}}"#),
        ),
        raw_case(
            "id with escapes",
            r#"{"id":"a\"b\\c\u0041","type":"x","payload":{}}"#,
        ),
        raw_case("id of spaces", r#"{"id":"   ","type":"x","payload":{}}"#),
        raw_case(
            "type with an escape",
            r#"{"id":"1","type":"runtime\u002eheartbeat","payload":{}}"#,
        ),
        raw_case(
            "id of 129 chars",
            format!(r#"{{"id":"{long_id}","type":"x","payload":{{}}}}"#),
        ),
        raw_case("empty id", r#"{"id":"","type":"x","payload":{}}"#),
        raw_case("numeric id", r#"{"id":7,"type":"x","payload":{}}"#),
        raw_case("null id", r#"{"id":null,"type":"x","payload":{}}"#),
        raw_case("missing id", r#"{"type":"x","payload":{}}"#),
        raw_case("missing type", r#"{"id":"1","payload":{}}"#),
        raw_case("empty type", r#"{"id":"1","type":"","payload":{}}"#),
        raw_case("numeric type", r#"{"id":"1","type":3,"payload":{}}"#),
        raw_case("null type", r#"{"id":"1","type":null,"payload":{}}"#),
        raw_case("missing payload", r#"{"id":"1","type":"x"}"#),
        raw_case(
            "unknown member",
            r#"{"id":"1","type":"x","payload":{},"extra":1}"#,
        ),
        raw_case(
            "error member on a request",
            r#"{"id":"1","type":"x","payload":{},"error":{}}"#,
        ),
        raw_case("empty object", "{}"),
        raw_case("array", r#"[{"id":"1","type":"x","payload":{}}]"#),
        raw_case("string", r#""hello""#),
        raw_case("number", "1"),
        raw_case("null", "null"),
        raw_case("not JSON", "nope"),
        raw_case("truncated JSON", r#"{"id":"1","type":"x","payload":{"#),
        raw_case(
            "trailing garbage",
            r#"{"id":"1","type":"x","payload":{}} x"#,
        ),
        raw_case("empty text", ""),
    ]
}

#[test]
fn request_envelopes_agree_with_decode() {
    let spec = spec();
    let def = spec.index()["envelope"]["request"]
        .as_str()
        .expect("envelope.request")
        .to_owned();
    let mut disagreements = Vec::new();
    let mut checked = 0;
    for c in envelope_cases() {
        let schema = schema_verdict(&spec, &def, &c.text);
        let rust = decode(&c.text).map(|_| ()).map_err(|r| r.error.to_string());
        checked += 1;
        if schema.is_ok() != rust.is_ok() {
            disagreements.push(format!(
                "{}: {}\n      frame: {}",
                c.label,
                describe(&schema, &rust),
                c.text
            ));
        }
    }
    assert_no_disagreements("request frames", checked, &disagreements);
}

/// Where the schemas and the Rust types must differ, and why. Each entry is
/// checked to still differ in the documented direction, so the list cannot
/// go stale silently.
#[test]
fn documented_limits_of_the_schemas() {
    let spec = spec();
    // JSON Schema judges the parsed value, where a duplicate member has
    // already been collapsed (last one wins); the gateway refuses duplicate
    // members with BAD_FRAME (spec/README.md).
    let dup = r#"{"id":"1","type":"x","type":"y","payload":{}}"#;
    let request = spec.index()["envelope"]["request"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(schema_verdict(&spec, &request, dup).is_ok());
    assert!(decode(dup).is_err());
    let dup_payload = format!(r#"{{"sessionId":"{SID}","runId":"a","runId":"b"}}"#);
    assert!(schema_verdict(&spec, spec.request_def("config.get").unwrap(), &dup_payload).is_ok());
    assert!(rust_verdict(CommandKind::ConfigGet, &dup_payload).is_err());

    // runtime-session.json (given, unchangeable) puts no upper bound on
    // connectionEpoch; the gateway's integers are unsigned 64-bit, so
    // 2^64 and above are INVALID_PAYLOAD (spec/README.md).
    let huge = r#"{"runId":"r","runtimeInstanceId":"i","protocolVersion":"1","connectionEpoch":18446744073709551616}"#;
    assert!(schema_verdict(&spec, spec.request_def("runtime.attach").unwrap(), huge).is_ok());
    assert!(rust_verdict(CommandKind::RuntimeAttach, huge).is_err());
}

// --------------------------------------------- what the gateway emits

fn parsed(frame: rungate::protocol::Frame) -> Value {
    serde_json::from_str(frame.as_str()).expect("frames are JSON")
}

#[test]
fn encoded_frames_validate() {
    let spec = spec();
    let sid = SessionId::generate();
    let run = RunId::new("run-1").unwrap();
    let now = Timestamp::now();

    // Timestamps as written: RFC 3339, UTC, exactly milliseconds.
    for t in [
        now,
        Timestamp::from_unix_millis(0),
        Timestamp::from_unix_millis(253_402_300_799_999),
    ] {
        let s = t.to_string();
        spec.check_def(&format!("{IDENTITY}timestamp"), &json!(s))
            .unwrap();
        assert_eq!(s.len(), 24, "{s}");
        assert!(s.ends_with('Z') && s.as_bytes()[19] == b'.', "{s}");
    }

    let replies: Vec<(&str, Value)> = vec![
        (
            "runtime.attach",
            parsed(encode_reply(
                "1",
                &RuntimeAttachResponse {
                    session_id: sid.clone(),
                    run_id: run.clone(),
                    heartbeat_interval_ms: 10_000,
                    lease_expires_at: now,
                    config_version: None,
                },
            )),
        ),
        (
            "runtime.attach",
            parsed(encode_reply(
                "2",
                &RuntimeAttachResponse {
                    session_id: sid.clone(),
                    run_id: run.clone(),
                    heartbeat_interval_ms: 1000,
                    lease_expires_at: now,
                    config_version: Some("v3".into()),
                },
            )),
        ),
        (
            "runtime.heartbeat",
            parsed(encode_reply(
                "3",
                &HeartbeatResponse {
                    accepted: true,
                    next_heartbeat_due_at: now,
                },
            )),
        ),
        (
            "runtime.recoverConnections",
            parsed(encode_reply("4", &Accepted::YES)),
        ),
        ("kv.set", parsed(encode_reply("5", &Accepted::YES))),
        (
            "kv.delete",
            parsed(encode_reply("5b", &DeleteKVResponse { deleted: 0 })),
        ),
        (
            "kv.delete",
            parsed(encode_reply("5c", &DeleteKVResponse { deleted: u64::MAX })),
        ),
        ("events.publish", parsed(encode_reply("6", &Accepted::YES))),
        ("stream.cancel", parsed(encode_reply("7", &Accepted::YES))),
        (
            "checkpoint.save",
            parsed(encode_reply(
                "8",
                &CheckpointSaveResponse {
                    checkpoint_id: "cp-1".into(),
                    saved_at: now,
                },
            )),
        ),
        (
            "checkpoint.load",
            parsed(encode_reply(
                "9",
                &CheckpointLoadResponse {
                    checkpoint_id: "cp-1".into(),
                    saved_at: now,
                    data: RawValue::from_string(r#"{"step": 3}"#.into()).unwrap(),
                },
            )),
        ),
    ];
    for (kind, frame) in &replies {
        spec.check_reply(kind, frame)
            .unwrap_or_else(|e| panic!("{kind} reply {frame}: {e}"));
    }
    // A reply that breaks its response definition is caught.
    assert!(
        spec.check_reply(
            "stream.cancel",
            &json!({"id": "1", "type": "reply", "payload": {"accepted": false}})
        )
        .is_err()
    );

    for code in ErrorCode::ALL {
        let err = CommandError::new(code, "something");
        for id in [None, Some("req-1")] {
            let frame = parsed(encode_error(id, &err));
            spec.check_error(&frame)
                .unwrap_or_else(|e| panic!("{frame}: {e}"));
        }
    }
    let invalid = CommandError::invalid_payload("/payload/runId", "bad");
    spec.check_error(&parsed(encode_error(Some("1"), &invalid)))
        .unwrap();
    // QUOTA_EXCEEDED's details have a definition of their own.
    let details = "frames/envelope.json#/$defs/QuotaExceededDetails";
    for ok in [
        json!({"quota": "runs", "used": 3, "requested": 1, "limit": 3}),
        json!({"quota": "kvBytes", "used": 0, "requested": u64::MAX, "limit": 0}),
        json!({"quota": "checkpointBytes", "used": 10, "requested": 5, "limit": 12}),
    ] {
        spec.check_def(details, &ok)
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in [
        json!({"quota": "events", "used": 3, "requested": 1, "limit": 3}),
        json!({"quota": "runs", "used": 3, "requested": 0, "limit": 3}),
        json!({"quota": "runs", "used": -1, "requested": 1, "limit": 3}),
        json!({"quota": "runs", "used": 3, "requested": 1}),
        json!({"quota": "runs", "used": 3, "requested": 1, "limit": 3, "tenant": "x"}),
    ] {
        assert!(spec.check_def(details, &bad).is_err(), "{bad}");
    }
    assert!(spec.check_error(&json!({"id": null, "type": "error", "error": {"code": "NOPE", "message": "", "retryable": false}})).is_err());

    let pushes = [
        parsed(encode_push(
            push::SESSION_SUPERSEDED,
            &push::SessionSuperseded {
                session_id: &sid,
                run_id: &run,
                connection_epoch: 4,
            },
        )),
        parsed(encode_push(
            push::SESSION_EXPIRED,
            &push::SessionExpired {
                session_id: &sid,
                run_id: &run,
            },
        )),
        parsed(encode_push(
            push::GATEWAY_DRAINING,
            &push::GatewayDraining {
                reconnect_after_ms: 2500,
            },
        )),
    ];
    for frame in &pushes {
        spec.check_push(frame)
            .unwrap_or_else(|e| panic!("{frame}: {e}"));
    }
}

/// The typed requests a Rust client sends (`encode_command`, which names
/// the `type` from the payload's type) validate against the request
/// definitions, and the typed replies a client reads validate against the
/// response definitions: one definition per frame for both sides.
#[test]
fn typed_requests_and_replies_validate() {
    use rungate::protocol::CommandPayload;
    use rungate::protocol::commands::{
        CheckpointLoadCommand, CheckpointSaveCommand, DeleteKVCommand, GetConfigCommand,
        GetConfigResponse, GetKVCommand, GetKVResponse, GetSecretsCommand, GetSecretsResponse,
        HeartbeatCommand, OutputEvent, PublishOutputEventsRequest, RecoverConnectionsCommand,
        RunCancelCommand, RunCancelResponse, RunState, RunSummary, RunsListCommand,
        RunsListResponse, RuntimeAttachRequest, RuntimeFinishCommand, RuntimeFinishResponse,
        SetKVCommand, ShortText, StreamCancelCommand, StreamResumeCommand, StreamResumeResponse,
    };
    use rungate::protocol::encode_command;
    use std::borrow::Cow;

    let spec = spec();
    let sid = SessionId::generate();
    let run = RunId::new("run-1").unwrap();
    let epoch = rungate::ids::StreamEpoch::new(EPOCH).unwrap();
    let mut checked = Vec::new();
    let mut check = |frame: rungate::protocol::Frame| {
        let frame = parsed(frame);
        spec.check_request(&frame)
            .unwrap_or_else(|e| panic!("{frame}: {e}"));
        let kind = CommandKind::parse(frame["type"].as_str().unwrap()).unwrap();
        let payload = RawValue::from_string(frame["payload"].to_string()).unwrap();
        Command::parse(kind, &payload).unwrap_or_else(|e| panic!("{frame}: {e:?}"));
        checked.push(kind);
    };
    let s = || sid.clone();
    let r = || run.clone();
    for reconnect in [false, true] {
        check(encode_command(
            "1",
            &RuntimeAttachRequest {
                run_id: r(),
                attempt_id: reconnect.then(|| OpaqueId::new("a-1").unwrap()),
                runtime_instance_id: OpaqueId::new("inst-1").unwrap(),
                protocol_version: "1".into(),
                reconnect,
                connection_epoch: Some(1_764_064_800_000),
                capabilities: Capability::ALL.to_vec(),
            },
        ));
    }
    check(encode_command(
        "2",
        &HeartbeatCommand {
            session_id: s(),
            run_id: r(),
            runtime_instance_id: None,
            metadata: None,
        },
    ));
    check(encode_command(
        "3",
        &RecoverConnectionsCommand {
            session_id: s(),
            main_run_id: r(),
            sub_run_ids: Some(vec![RunId::new("run-1.sub").unwrap()]),
            connection_epoch: Some(2),
        },
    ));
    for names in [None, Some(vec!["API_KEY".to_owned()])] {
        check(encode_command(
            "4",
            &GetSecretsCommand {
                session_id: s(),
                run_id: r(),
                names,
            },
        ));
    }
    check(encode_command(
        "5",
        &GetConfigCommand {
            session_id: s(),
            run_id: r(),
        },
    ));
    check(encode_command(
        "6",
        &GetKVCommand {
            session_id: s(),
            run_id: r(),
            keys: vec!["a".into()],
        },
    ));
    check(encode_command(
        "7",
        &SetKVCommand {
            session_id: s(),
            run_id: r(),
            kv: [("a".to_owned(), "1".to_owned())].into(),
        },
    ));
    check(encode_command(
        "7b",
        &DeleteKVCommand {
            session_id: s(),
            run_id: r(),
            keys: vec!["a".into(), "b".into()],
        },
    ));
    let events = vec![
        OutputEvent::new("log", Some(1), None, Some(&json!({"line": "hi"}))).unwrap(),
        OutputEvent::new("done", Some(2), Some("2026-11-25T10:00:00.000Z"), None).unwrap(),
    ];
    check(encode_command(
        "8",
        &PublishOutputEventsRequest {
            session_id: s(),
            run_id: r(),
            events,
        },
    ));
    for checkpoint_id in [None, Some(OpaqueId::new("cp-1").unwrap())] {
        check(encode_command(
            "9",
            &CheckpointSaveCommand {
                session_id: s(),
                run_id: r(),
                data: RawValue::from_string(r#"{"step":3}"#.into()).unwrap(),
                checkpoint_id: checkpoint_id.clone(),
            },
        ));
        check(encode_command(
            "10",
            &CheckpointLoadCommand {
                session_id: s(),
                run_id: r(),
                checkpoint_id,
            },
        ));
    }
    for (session_id, from_offset, stream_epoch) in [
        (Some(s()), Some(4), Some(epoch.clone())),
        (None, None, None),
    ] {
        check(encode_command(
            "11",
            &StreamResumeCommand {
                run_id: r(),
                from_offset,
                stream_epoch,
                session_id: session_id.clone(),
            },
        ));
        check(encode_command(
            "12",
            &StreamCancelCommand {
                run_id: r(),
                session_id,
            },
        ));
    }
    check(encode_command("13", &RunsListCommand::default()));
    check(encode_command(
        "14",
        &RunsListCommand {
            cursor: Some(r()),
            limit: Some(10),
        },
    ));
    check(encode_command(
        "15",
        &RuntimeFinishCommand {
            session_id: s(),
            run_id: r(),
            outcome: rungate::ids::RunOutcome::Completed,
            message: Some(ShortText("done".into())),
        },
    ));
    check(encode_command(
        "16",
        &RunCancelCommand {
            run_id: r(),
            reason: None,
        },
    ));
    for kind in CommandKind::ALL {
        assert!(
            checked.contains(&kind),
            "no typed {} checked",
            kind.as_str()
        );
    }

    // Replies not covered by encoded_frames_validate, as the protocol types them.
    fn reply<C: CommandPayload>(spec: &Spec, payload: &C::Reply)
    where
        C::Reply: serde::Serialize,
    {
        let frame = parsed(encode_reply("1", payload));
        spec.check_reply(C::KIND.as_str(), &frame)
            .unwrap_or_else(|e| panic!("{frame}: {e}"));
        let back: C::Reply = serde_json::from_value(frame["payload"].clone())
            .unwrap_or_else(|e| panic!("{frame}: {e}"));
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            frame["payload"],
            "read back as written"
        );
    }
    let secret = "a\"b\n".to_owned();
    reply::<GetSecretsCommand>(
        &spec,
        &GetSecretsResponse {
            secrets: [(Cow::Borrowed("API_KEY"), Cow::Owned(secret))].into(),
        },
    );
    let config = serde_json::from_value(json!({"model": "m"})).unwrap();
    reply::<GetConfigCommand>(
        &spec,
        &GetConfigResponse {
            config: Cow::Owned(config),
        },
    );
    reply::<GetKVCommand>(
        &spec,
        &GetKVResponse {
            kv: [("a".to_owned(), "1".to_owned())].into(),
        },
    );
    reply::<DeleteKVCommand>(&spec, &DeleteKVResponse { deleted: 1 });
    for ended in [false, true] {
        reply::<StreamResumeCommand>(
            &spec,
            &StreamResumeResponse {
                run_id: r(),
                stream_epoch: epoch.clone(),
                first_offset: 0,
                next_offset: 9,
                start_offset: 4,
                truncated: false,
                ended,
            },
        );
    }
    reply::<RuntimeFinishCommand>(
        &spec,
        &RuntimeFinishResponse {
            accepted: true,
            next_offset: 9,
        },
    );
    reply::<RunCancelCommand>(
        &spec,
        &RunCancelResponse {
            delivered: true,
            ended: false,
        },
    );
    let now = Timestamp::from_unix_millis(1_764_064_800_123);
    reply::<RunsListCommand>(
        &spec,
        &RunsListResponse {
            runs: RunState::ALL
                .into_iter()
                .map(|state| {
                    let ended = state == RunState::Ended;
                    RunSummary {
                        run_id: r(),
                        state,
                        stream_epoch: epoch.clone(),
                        first_offset: 0,
                        next_offset: 2,
                        outcome: ended.then_some(rungate::ids::RunOutcome::Failed),
                        ended_at: ended.then_some(now),
                        message: ended.then(|| "oom".to_owned()),
                    }
                })
                .collect(),
            next_cursor: Some(r()),
        },
    );
    let states = spec
        .def_schema("commands/stream.json#/$defs/RunSummary")
        .expect("RunSummary")["properties"]["state"]["enum"]
        .clone();
    assert_eq!(
        states,
        serde_json::to_value(RunState::ALL).unwrap(),
        "RunSummary state enum vs RunState::ALL"
    );
}

#[test]
fn push_payloads() {
    let spec = spec();
    let ok = [
        json!({"type": "stream.events", "payload": {"runId": "r", "streamEpoch": EPOCH, "events": [
            {"offset": 0, "event": {"type": "log"}},
            {"offset": 1, "event": {"type": "log", "seq": 9, "timestamp": "2026-11-25T10:00:00.000Z", "data": null}}
        ]}}),
        json!({"type": "stream.gap", "payload": {"runId": "r", "streamEpoch": EPOCH, "fromOffset": 3, "toOffset": 3}}),
        json!({"type": "session.expired", "payload": {"sessionId": SID, "runId": "r"}}),
        json!({"type": "gateway.draining", "payload": {"reconnectAfterMs": 0}}),
        json!({"type": "stream.ended", "payload": {"runId": "r", "streamEpoch": EPOCH, "nextOffset": 0,
            "outcome": "completed", "endedAt": "2026-11-25T10:00:00.000Z"}}),
        json!({"type": "stream.ended", "payload": {"runId": "r", "streamEpoch": EPOCH, "nextOffset": 7,
            "outcome": "cancelled", "message": "main run finished", "endedAt": "2026-11-25T10:00:00.000Z"}}),
        json!({"type": "run.cancelRequested", "payload": {"sessionId": SID, "runId": "r",
            "requestedAt": "2026-11-25T10:00:00.000Z"}}),
        json!({"type": "run.cancelRequested", "payload": {"sessionId": SID, "runId": "r",
            "reason": "stop", "requestedAt": "2026-11-25T10:00:00.000Z"}}),
    ];
    for f in &ok {
        spec.check_push(f).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    let bad = [
        (
            "no events",
            json!({"type": "stream.events", "payload": {"runId": "r", "streamEpoch": EPOCH, "events": []}}),
        ),
        (
            "event with an unknown member",
            json!({"type": "stream.events", "payload": {"runId": "r", "streamEpoch": EPOCH, "events": [{"offset": 0, "event": {"type": "log", "x": 1}}]}}),
        ),
        (
            "entry without offset",
            json!({"type": "stream.events", "payload": {"runId": "r", "streamEpoch": EPOCH, "events": [{"event": {"type": "log"}}]}}),
        ),
        (
            "short epoch",
            json!({"type": "stream.gap", "payload": {"runId": "r", "streamEpoch": "abc", "fromOffset": 3, "toOffset": 4}}),
        ),
        (
            "a push with an id",
            json!({"id": "1", "type": "session.expired", "payload": {"sessionId": SID, "runId": "r"}}),
        ),
        (
            "a push typed reply",
            json!({"type": "reply", "payload": {}}),
        ),
        (
            "unknown push type",
            json!({"type": "stream.other", "payload": {}}),
        ),
        (
            "negative delay",
            json!({"type": "gateway.draining", "payload": {"reconnectAfterMs": -1}}),
        ),
        (
            "ended with an unknown outcome",
            json!({"type": "stream.ended", "payload": {"runId": "r", "streamEpoch": EPOCH, "nextOffset": 0,
                "outcome": "done", "endedAt": "2026-11-25T10:00:00.000Z"}}),
        ),
        (
            "ended without endedAt",
            json!({"type": "stream.ended", "payload": {"runId": "r", "streamEpoch": EPOCH, "nextOffset": 0,
                "outcome": "failed"}}),
        ),
        (
            "cancel requested without a session",
            json!({"type": "run.cancelRequested", "payload": {"runId": "r",
                "requestedAt": "2026-11-25T10:00:00.000Z"}}),
        ),
        (
            "superseded without epoch",
            json!({"type": "session.superseded", "payload": {"sessionId": SID, "runId": "r"}}),
        ),
    ];
    for (label, f) in &bad {
        assert!(
            spec.check_push(f).is_err(),
            "{label}: {f} should be refused"
        );
    }
}

#[test]
fn stream_and_checkpoint_replies() {
    let spec = spec();
    let reply = |payload: Value| json!({"id": "1", "type": "reply", "payload": payload});
    let resume = json!({"runId": "r", "streamEpoch": EPOCH, "firstOffset": 0, "nextOffset": 10, "startOffset": 4, "truncated": false, "ended": false});
    spec.check_reply("stream.resume", &reply(resume.clone()))
        .unwrap();
    assert!(
        spec.check_reply("stream.resume", &reply(without(&resume, "truncated")))
            .is_err()
    );
    let runs = json!({"runs": [
        {"runId": "a", "state": "attached", "streamEpoch": EPOCH, "firstOffset": 0, "nextOffset": 0},
        {"runId": "b", "state": "detached", "streamEpoch": EPOCH, "firstOffset": 5, "nextOffset": 9},
        {"runId": "c", "state": "expired", "streamEpoch": EPOCH, "firstOffset": 1, "nextOffset": 2},
        {"runId": "d", "state": "ended", "streamEpoch": EPOCH, "firstOffset": 0, "nextOffset": 2,
         "outcome": "failed", "endedAt": "2026-11-25T10:00:00.000Z", "message": "oom"}
    ]});
    spec.check_reply("runs.list", &reply(runs)).unwrap();
    spec.check_reply("runs.list", &reply(json!({"runs": []})))
        .unwrap();
    let bad_state = json!({"runs": [{"runId": "a", "state": "gone", "streamEpoch": EPOCH, "firstOffset": 0, "nextOffset": 0}]});
    assert!(spec.check_reply("runs.list", &reply(bad_state)).is_err());
    assert!(
        spec.check_reply(
            "checkpoint.load",
            &reply(json!({"checkpointId": "c", "savedAt": "2026-11-25T10:00:00.000Z"}))
        )
        .is_err()
    );
    spec.check_reply(
        "checkpoint.load",
        &reply(json!({"checkpointId": "c", "savedAt": "2026-11-25T10:00:00.000Z", "data": null})),
    )
    .unwrap();
}

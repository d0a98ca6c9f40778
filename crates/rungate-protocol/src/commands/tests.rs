//! Unit tests of `commands`: each command's payload read as the schemas
//! say, the one-pass publish read held to the owned one, and what a
//! client writes read back alike.

use super::*;

fn parse<'a>(kind: &str, payload: &'a str) -> Result<Command<'a>, CommandError> {
    let raw: &RawValue = serde_json::from_str(payload).unwrap();
    Command::parse(CommandKind::parse(kind).unwrap(), raw)
}

fn path(r: Result<Command, CommandError>) -> String {
    let e = r.expect_err("should be refused");
    assert_eq!(e.code, ErrorCode::InvalidPayload);
    e.details.unwrap()["path"].as_str().unwrap().to_owned()
}

#[test]
fn attach_is_strict() {
    let ok = r#"{"runId":"r1","runtimeInstanceId":"i1","protocolVersion":"1"}"#;
    assert!(matches!(
        parse("runtime.attach", ok),
        Ok(Command::RuntimeAttach(_))
    ));
    assert_eq!(
        path(parse(
            "runtime.attach",
            r#"{"runId":"r1","protocolVersion":"1"}"#
        )),
        "/payload"
    );
    assert_eq!(
        path(parse(
            "runtime.attach",
            r#"{"runId":"r1","runtimeInstanceId":"i1","protocolVersion":"1","bogus":1}"#
        )),
        "/payload/bogus"
    );
    assert_eq!(
        path(parse(
            "runtime.attach",
            r#"{"runId":"r1","runtimeInstanceId":"i1","protocolVersion":"1","connectionEpoch":-1}"#
        )),
        "/payload/connectionEpoch"
    );
    assert_eq!(
        path(parse(
            "runtime.attach",
            r#"{"runId":"r1","runtimeInstanceId":"i1","protocolVersion":"1","capabilities":["kv.read","fly"]}"#
        )),
        "/payload/capabilities/1"
    );
    assert_eq!(
        path(parse(
            "runtime.attach",
            r#"{"runId":"bad/id","runtimeInstanceId":"i1","protocolVersion":"1"}"#
        )),
        "/payload/runId"
    );
}

/// The one-pass read of a publish takes exactly the payloads the
/// owned read takes, with the same events and `seq`s: the gateway
/// answers whatever the one-pass read declines from the owned read.
#[test]
fn a_publish_read_in_one_pass_takes_what_the_owned_read_takes() {
    let sid = SessionId::generate();
    let ev = r#"{"type":"log","seq":3,"data":{"b":1, "a":[2,"x\"y"]}}"#;
    let payloads = [
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[{ev}]}}"#),
        format!(
            r#"{{ "events" : [ {ev} , {{"type":"done"}} ] , "runId":"r" ,"sessionId":"{sid}" }}"#
        ),
        format!("{{\n\"sessionId\":\"{sid}\",\r\n\t\"runId\":\"r\",\"events\":[]}}"),
        format!(r#"{{"session\u0049d":"{sid}","runId":"r","events":[]}}"#),
        format!(
            r#"{{"sessionId":"{sid}","runId":"r\u0031","events":[{{"type":"a","timestamp":"2026-11-25T10:00:00Z"}}]}}"#
        ),
        // Refused: each differs from a valid payload in one way.
        r#"{"runId":"r","events":[]}"#.to_owned(),
        format!(r#"{{"sessionId":"{sid}","events":[]}}"#),
        format!(r#"{{"sessionId":"{sid}","runId":"r"}}"#),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[],"x":1}}"#),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[],"events":[]}}"#),
        format!(r#"{{"sessionId":"{sid}","sessionId":"{sid}","runId":"r","events":[]}}"#),
        r#"{"sessionId":"nope","runId":"r","events":[]}"#.to_owned(),
        format!(r#"{{"sessionId":"{sid}","runId":"","events":[]}}"#),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":{{}}}}"#),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":null}}"#),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[["log"]]}}"#),
        // A derived struct reads an array with an element per field.
        format!(
            r#"{{"sessionId":"{sid}","runId":"r","events":[["log",1,"2026-11-25T10:00:00Z",null]]}}"#
        ),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[1]}}"#),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[{ev},null]}}"#),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[{{"seq":1}}]}}"#),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[{{"type":""}}]}}"#),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[{{"type":"a","seq":-1}}]}}"#),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[{{"type":"a","seq":1.5}}]}}"#),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[{{"type":"a","seq":null}}]}}"#),
        format!(
            r#"{{"sessionId":"{sid}","runId":"r","events":[{{"type":"a","timestamp":"yesterday"}}]}}"#
        ),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[{{"type":"a","type":"b"}}]}}"#),
        format!(
            r#"{{"sessionId":"{sid}","runId":"r","events":[{{"type":"a","data":{{"k":1,"k":2}}}}]}}"#
        ),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[{{"type":"a","data":"\ud800"}}]}}"#),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[{{"type":"a","data":1e400}}]}}"#),
        format!(r#"{{"sessionId":"{sid}","runId":"r","events":[{{"type":"a","other":1}}]}}"#),
    ];
    let mut taken = 0;
    for text in &payloads {
        let owned = typed::<PublishOutputEventsRequest>(text);
        let once = read_publish_at_once(text);
        match (&owned, &once) {
            (Ok(owned), Some(once)) => {
                taken += 1;
                assert_eq!(owned.session_id, once.session_id, "{text}");
                assert_eq!(owned.run_id, once.run_id, "{text}");
                let owned: Vec<_> = owned.events.iter().map(|e| (e.raw.get(), e.seq)).collect();
                let once: Vec<_> = once.events.iter().map(|e| (e.json, e.seq)).collect();
                assert_eq!(owned, once, "{text}");
            }
            (Err(_), None) => {}
            _ => panic!("{text}: owned read {owned:?}, one pass {once:?}"),
        }
        // And what the gateway answers is the owned read's.
        match (owned, read_publish(text)) {
            (Ok(_), Ok(_)) => {}
            (Err(a), Err(b)) => assert_eq!(
                (a.code, a.message, a.details),
                (b.code, b.message, b.details)
            ),
            (a, b) => panic!("{text}: {a:?} / {b:?}"),
        }
    }
    assert_eq!(taken, 5, "the first five are valid");
}

#[test]
fn publish_keeps_events_raw_and_checks_their_shape() {
    let sid = SessionId::generate();
    let text = format!(
        r#"{{"sessionId":"{sid}","runId":"r","events":[{{"type":"log","seq":3,"data":{{"b":1, "a":2}}}}]}}"#
    );
    let Ok(Command::EventsPublish(p)) = parse("events.publish", &text) else {
        panic!("publish should parse")
    };
    assert_eq!(p.events[0].seq, Some(3));
    assert_eq!(
        p.events[0].json,
        r#"{"type":"log","seq":3,"data":{"b":1, "a":2}}"#
    );
    let bad = format!(r#"{{"sessionId":"{sid}","runId":"r","events":[{{"type":"log","x":1}}]}}"#);
    assert_eq!(path(parse("events.publish", &bad)), "/payload/events/0");
    let no_type = format!(r#"{{"sessionId":"{sid}","runId":"r","events":[{{"data":1}}]}}"#);
    assert_eq!(path(parse("events.publish", &no_type)), "/payload/events/0");
}

/// Found with the fuzz target: data that strict parsers refuse was
/// stored, and the frames carrying it back out could not be read
/// (any_json.rs).
#[test]
fn data_members_must_read_back_with_a_strict_parser() {
    let sid = SessionId::generate();
    let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
    for data in [r#""\ud800""#, "1e400", &deep] {
        let publish = format!(
            r#"{{"sessionId":"{sid}","runId":"r","events":[{{"type":"x","data":{data}}}]}}"#
        );
        assert_eq!(path(parse("events.publish", &publish)), "/payload/events/0");
        let save = format!(r#"{{"sessionId":"{sid}","runId":"r","data":{data}}}"#);
        assert_eq!(path(parse("checkpoint.save", &save)), "/payload/data");
    }
    let save = format!(r#"{{"sessionId":"{sid}","runId":"r","data":[1e308,"\u00e9"]}}"#);
    let Ok(Command::CheckpointSave(c)) = parse("checkpoint.save", &save) else {
        panic!("checkpoint.save should parse")
    };
    assert_eq!(c.data.get(), r#"[1e308,"\u00e9"]"#);
}

/// Each object of `text` in turn with its first member written twice
/// (the copy first), for every object that has a member.
fn with_each_object_repeating(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            '{' if !in_string => {
                let rest = &text[i + 1..];
                if rest.starts_with('}') {
                    continue;
                }
                // The member's name, then its value as serde_json skims it.
                let mut names = serde_json::Deserializer::from_str(rest).into_iter::<String>();
                names.next().unwrap().unwrap();
                let after_name = names.byte_offset();
                let value_at = after_name + rest[after_name..].find(':').unwrap() + 1;
                let mut values =
                    serde_json::Deserializer::from_str(&rest[value_at..]).into_iter::<&RawValue>();
                values.next().unwrap().unwrap();
                let member = &rest[..value_at + values.byte_offset()];
                out.push(format!("{}{member},{rest}", &text[..=i]));
            }
            _ => {}
        }
    }
    out
}

/// Issue #18: a payload is typed in one read, with no walk for repeats
/// before it, so every type a payload holds must refuse a repeated
/// member itself; and the answer is the one the walk gives, the first
/// repeat's path. Every object of a payload of each command, nested
/// ones included, is tried.
#[test]
fn a_repeated_member_anywhere_is_refused_with_its_path() {
    let sid = SessionId::generate();
    let payloads = [
        ("runtime.attach", r#"{"runId":"r1","attemptId":"a1","runtimeInstanceId":"i1","protocolVersion":"1","reconnect":true,"connectionEpoch":2,"capabilities":["kv.read"]}"#.to_owned()),
        ("runtime.heartbeat", format!(r#"{{"sessionId":"{sid}","runId":"r1","runtimeInstanceId":"i1","metadata":{{"load":0.5,"n":[1,{{"x":null,"y":{{"z":"\u0061"}}}}]}}}}"#)),
        ("runtime.recoverConnections", format!(r#"{{"sessionId":"{sid}","mainRunId":"r1","subRunIds":["r2"],"connectionEpoch":1}}"#)),
        ("secrets.get", format!(r#"{{"sessionId":"{sid}","runId":"r1","names":["a"]}}"#)),
        ("config.get", format!(r#"{{"sessionId":"{sid}","runId":"r1"}}"#)),
        ("kv.get", format!(r#"{{"sessionId":"{sid}","runId":"r1","keys":["a"]}}"#)),
        ("kv.set", format!(r#"{{"sessionId":"{sid}","runId":"r1","kv":{{"a":"1","b":"2"}}}}"#)),
        ("kv.delete", format!(r#"{{"sessionId":"{sid}","runId":"r1","keys":["a"]}}"#)),
        ("events.publish", format!(r#"{{"sessionId":"{sid}","runId":"r1","events":[{{"type":"t","seq":1,"timestamp":"2026-12-02T00:00:00Z","data":{{"a":[{{"b":1,"c":2}}],"d":{{}}}}}},{{"type":"u"}}]}}"#)),
        ("checkpoint.save", format!(r#"{{"sessionId":"{sid}","runId":"r1","data":{{"a":{{"b":[{{"c":1}}]}}}},"checkpointId":"c1"}}"#)),
        ("checkpoint.load", format!(r#"{{"sessionId":"{sid}","runId":"r1","checkpointId":"c1"}}"#)),
        ("stream.resume", format!(r#"{{"runId":"r1","fromOffset":0,"sessionId":"{sid}"}}"#)),
        ("stream.cancel", format!(r#"{{"runId":"r1","sessionId":"{sid}"}}"#)),
        ("runs.list", r#"{"cursor":"r0","limit":10}"#.to_owned()),
        ("runtime.finish", format!(r#"{{"sessionId":"{sid}","runId":"r1","outcome":"completed","message":"m"}}"#)),
        ("run.cancel", r#"{"runId":"r1","reason":"why"}"#.to_owned()),
    ];
    let kinds: std::collections::BTreeSet<&str> = payloads.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        kinds.len(),
        CommandKind::ALL.len(),
        "one payload per command"
    );
    for (kind, payload) in &payloads {
        assert!(
            parse(kind, payload).is_ok(),
            "{kind}: the sample itself must be valid: {payload} {:?}",
            parse(kind, payload).err()
        );
        let variants = with_each_object_repeating(payload);
        assert!(!variants.is_empty());
        for variant in variants {
            let walked = crate::duplicates::first_duplicate(&variant)
                .unwrap_or_else(|| panic!("the walk misses the repeat in {variant}"));
            let e = parse(kind, &variant).expect_err(&variant);
            assert_eq!(e.code, ErrorCode::InvalidPayload, "{variant}");
            assert_eq!(e.message, crate::duplicates::REPEATED, "{variant}");
            assert_eq!(
                e.details.unwrap()["path"].as_str().unwrap(),
                walked,
                "{variant}"
            );
        }
    }
}

#[test]
fn protocol_versions() {
    assert!(protocol_version_supported("1"));
    assert!(protocol_version_supported("1.4"));
    assert!(!protocol_version_supported("1."));
    assert!(!protocol_version_supported("2"));
    assert!(!protocol_version_supported("10"));
}

/// What a client writes, the gateway reads back as the same command.
fn round_trip<C: CommandPayload>(request: &C) -> (Command<'static>, serde_json::Value) {
    // Leaked: the command borrows the text, and a test is short.
    let text: &'static str = String::leak(serde_json::to_string(request).unwrap());
    let raw: &RawValue = serde_json::from_str(text).unwrap();
    let command = Command::parse(C::KIND, raw)
        .unwrap_or_else(|e| panic!("{}: {text} refused: {e:?}", C::KIND.as_str()));
    (command, serde_json::from_str(text).unwrap())
}

#[test]
fn every_request_a_client_writes_is_read_back_by_the_gateway() {
    let sid = SessionId::generate();
    let run = RunId::new("r-1").unwrap();
    let attach = RuntimeAttachRequest {
        run_id: run.clone(),
        attempt_id: None,
        runtime_instance_id: OpaqueId::new("inst").unwrap(),
        protocol_version: "1".into(),
        reconnect: false,
        connection_epoch: Some(7),
        capabilities: vec![Capability::KvRead, Capability::StreamResume],
    };
    let (parsed, json) = round_trip(&attach);
    // Absent stays absent: the schemas refuse null, and `reconnect`
    // false is the default.
    assert_eq!(
        json,
        serde_json::json!({"runId": "r-1", "runtimeInstanceId": "inst", "protocolVersion": "1",
            "connectionEpoch": 7, "capabilities": ["kv.read", "stream.resume"]})
    );
    let Command::RuntimeAttach(parsed) = parsed else {
        panic!("{parsed:?}")
    };
    assert_eq!(
        (parsed.run_id, parsed.connection_epoch, parsed.capabilities),
        (run.clone(), Some(7), attach.capabilities.clone())
    );
    let takeover = RuntimeAttachRequest {
        reconnect: true,
        attempt_id: Some(OpaqueId::new("a-2").unwrap()),
        ..attach
    };
    let (_, json) = round_trip(&takeover);
    assert_eq!(
        (json["reconnect"].clone(), json["attemptId"].clone()),
        (true.into(), "a-2".into())
    );

    let event = OutputEvent::new(
        "log",
        Some(5),
        None,
        Some(&serde_json::json!({"b": 1, "a": "x"})),
    )
    .unwrap();
    assert_eq!(
        event.raw.get(),
        r#"{"type":"log","seq":5,"data":{"a":"x","b":1}}"#
    );
    let bare = OutputEvent::new("done", None, Some("2026-11-25T10:00:00Z"), None).unwrap();
    let publish = PublishOutputEventsRequest {
        session_id: sid.clone(),
        run_id: run.clone(),
        events: vec![event, bare],
    };
    let Command::EventsPublish(read) = round_trip(&publish).0 else {
        panic!("publish")
    };
    assert_eq!(read.events[0].json, publish.events[0].raw.get());
    assert_eq!((read.events[0].seq, read.events[1].seq), (Some(5), None));
    assert_eq!(
        read.events[1].json,
        r#"{"type":"done","timestamp":"2026-11-25T10:00:00Z"}"#
    );
    // Borrowed events with typed data write the same JSON, and read
    // back as the same publish.
    #[derive(Serialize)]
    struct Data<'a> {
        b: u64,
        a: &'a str,
    }
    let data = Data { b: 1, a: "x" };
    let borrowed = PublishOutputEventsRequest {
        session_id: sid.clone(),
        run_id: run.clone(),
        events: vec![
            EventRef {
                kind: "log",
                seq: Some(5),
                timestamp: None,
                data: Some(&data),
            },
            EventRef {
                kind: "done",
                seq: None,
                timestamp: Some("2026-11-25T10:00:00Z"),
                data: None,
            },
        ],
    };
    let Command::EventsPublish(read) = round_trip(&borrowed).0 else {
        panic!("publish")
    };
    assert_eq!(
        read.events[0].json,
        r#"{"type":"log","seq":5,"data":{"b":1,"a":"x"}}"#
    );
    assert_eq!(read.events[1].json, publish.events[1].raw.get());
    assert_eq!(read.events[0].seq, Some(5));

    let r = || run.clone();
    let s = || sid.clone();
    assert!(matches!(
        round_trip(&HeartbeatCommand {
            session_id: s(),
            run_id: r(),
            runtime_instance_id: None,
            metadata: None
        })
        .0,
        Command::RuntimeHeartbeat(_)
    ));
    let recover = RecoverConnectionsCommand {
        session_id: s(),
        main_run_id: r(),
        sub_run_ids: Some(vec![RunId::new("r-1.sub").unwrap()]),
        connection_epoch: Some(8),
    };
    assert!(matches!(
        round_trip(&recover).0,
        Command::RuntimeRecoverConnections(_)
    ));
    let secrets = GetSecretsCommand {
        session_id: s(),
        run_id: r(),
        names: None,
    };
    assert_eq!(
        round_trip(&secrets).1,
        serde_json::json!({"sessionId": sid.as_str(), "runId": "r-1"})
    );
    assert!(matches!(
        round_trip(&GetConfigCommand {
            session_id: s(),
            run_id: r()
        })
        .0,
        Command::ConfigGet(_)
    ));
    let get = GetKVCommand {
        session_id: s(),
        run_id: r(),
        keys: vec!["k".into()],
    };
    assert!(matches!(round_trip(&get).0, Command::KvGet(_)));
    let set = SetKVCommand {
        session_id: s(),
        run_id: r(),
        kv: [("k".into(), "v\n\"".into())].into(),
    };
    let Command::KvSet(read) = round_trip(&set).0 else {
        panic!("kv.set")
    };
    assert_eq!(read.kv, set.kv);
    let delete = DeleteKVCommand {
        session_id: s(),
        run_id: r(),
        keys: vec!["k".into(), "k".into()],
    };
    let Command::KvDelete(read) = round_trip(&delete).0 else {
        panic!("kv.delete")
    };
    assert_eq!(read.keys, delete.keys);
    let save = CheckpointSaveCommand {
        session_id: s(),
        run_id: r(),
        data: serde_json::value::to_raw_value(&serde_json::json!([1, {"x": null}])).unwrap(),
        checkpoint_id: None,
    };
    let Command::CheckpointSave(read) = round_trip(&save).0 else {
        panic!("checkpoint.save")
    };
    assert_eq!(read.data.get(), save.data.get());
    let load = CheckpointLoadCommand {
        session_id: s(),
        run_id: r(),
        checkpoint_id: Some(OpaqueId::new("c").unwrap()),
    };
    assert!(matches!(round_trip(&load).0, Command::CheckpointLoad(_)));
    let resume = StreamResumeCommand {
        run_id: r(),
        from_offset: Some(3),
        stream_epoch: Some(StreamEpoch::generate()),
        session_id: None,
    };
    let Command::StreamResume(read) = round_trip(&resume).0 else {
        panic!("stream.resume")
    };
    assert_eq!(
        (read.from_offset, read.stream_epoch),
        (Some(3), resume.stream_epoch.clone())
    );
    assert!(matches!(
        round_trip(&StreamCancelCommand {
            run_id: r(),
            session_id: Some(s())
        })
        .0,
        Command::StreamCancel(_)
    ));
    assert_eq!(
        round_trip(&RunsListCommand::default()).1,
        serde_json::json!({})
    );
    let finish = RuntimeFinishCommand {
        session_id: s(),
        run_id: r(),
        outcome: RunOutcome::Failed,
        message: Some(ShortText("oom".into())),
    };
    let Command::RuntimeFinish(read) = round_trip(&finish).0 else {
        panic!("runtime.finish")
    };
    assert_eq!(
        (read.outcome, read.message),
        (RunOutcome::Failed, finish.message.clone())
    );
    let cancel = RunCancelCommand {
        run_id: r(),
        reason: None,
    };
    assert_eq!(round_trip(&cancel).1, serde_json::json!({"runId": "r-1"}));
}

#[test]
fn a_too_long_text_is_written_as_given_and_refused_by_the_reader() {
    let long = ShortText("x".repeat(MAX_LIFECYCLE_TEXT_BYTES + 1));
    let cancel = RunCancelCommand {
        run_id: RunId::new("r").unwrap(),
        reason: Some(long),
    };
    let raw = serde_json::value::to_raw_value(&cancel).unwrap();
    assert_eq!(
        path(Command::parse(CommandKind::RunCancel, &raw)),
        "/payload/reason"
    );
}

/// What the gateway writes, a client reads back into the same type.
fn read_back<T: Serialize + DeserializeOwned>(reply: &T) -> T {
    serde_json::from_str(&serde_json::to_string(reply).unwrap()).unwrap()
}

#[test]
fn every_reply_the_gateway_writes_is_read_back_by_a_client() {
    let now = crate::time::Timestamp::from_unix_millis(1_764_064_800_123);
    let attach = RuntimeAttachResponse {
        session_id: SessionId::generate(),
        run_id: RunId::new("r").unwrap(),
        heartbeat_interval_ms: 10_000,
        lease_expires_at: now,
        config_version: None,
    };
    assert_eq!(read_back(&attach), attach);
    let beat = HeartbeatResponse {
        accepted: true,
        next_heartbeat_due_at: now,
    };
    assert_eq!(read_back(&beat), beat);
    assert_eq!(read_back(&Accepted::YES), Accepted::YES);
    // Escapes in secrets survive: a client owns what it reads.
    let (k, v) = ("API_KEY".to_owned(), "a\"b\n\u{e9}".to_owned());
    let secrets = GetSecretsResponse {
        secrets: [(Cow::Borrowed(k.as_str()), Cow::Borrowed(v.as_str()))].into(),
    };
    assert_eq!(read_back(&secrets), secrets);
    let config: serde_json::Map<String, Value> =
        serde_json::from_str(r#"{"model":"m","n":[1]}"#).unwrap();
    let config = GetConfigResponse {
        config: Cow::Borrowed(&config),
    };
    assert_eq!(read_back(&config), config);
    let kv = GetKVResponse {
        kv: [("a".into(), "1".into())].into(),
    };
    assert_eq!(read_back(&kv), kv);
    let deleted = DeleteKVResponse { deleted: 2 };
    assert_eq!(read_back(&deleted), deleted);
    let saved = CheckpointSaveResponse {
        checkpoint_id: "c".into(),
        saved_at: now,
    };
    assert_eq!(read_back(&saved), saved);
    let loaded = CheckpointLoadResponse {
        checkpoint_id: "c".into(),
        saved_at: now,
        data: serde_json::value::to_raw_value(&serde_json::json!({"step": 3})).unwrap(),
    };
    let back = read_back(&loaded);
    assert_eq!(
        (back.checkpoint_id, back.saved_at, back.data.get()),
        ("c".into(), now, loaded.data.get())
    );
    let resume = StreamResumeResponse {
        run_id: RunId::new("r").unwrap(),
        stream_epoch: StreamEpoch::generate(),
        first_offset: 0,
        next_offset: 9,
        start_offset: 4,
        truncated: false,
        ended: true,
    };
    assert_eq!(read_back(&resume), resume);
    let finished = RuntimeFinishResponse {
        accepted: true,
        next_offset: 12,
    };
    assert_eq!(read_back(&finished), finished);
    let cancel = RunCancelResponse {
        delivered: false,
        ended: true,
    };
    assert_eq!(read_back(&cancel), cancel);
    let runs = RunsListResponse {
        runs: RunState::ALL
            .into_iter()
            .map(|state| RunSummary {
                run_id: RunId::new("r").unwrap(),
                state,
                stream_epoch: StreamEpoch::generate(),
                first_offset: 0,
                next_offset: 1,
                outcome: (state == RunState::Ended).then_some(RunOutcome::Completed),
                ended_at: (state == RunState::Ended).then_some(now),
                message: None,
            })
            .collect(),
        next_cursor: Some(RunId::new("r").unwrap()),
    };
    assert_eq!(read_back(&runs), runs);
    let states: Vec<Value> = RunState::ALL
        .iter()
        .map(|s| serde_json::to_value(s).unwrap())
        .collect();
    assert_eq!(
        states,
        ["attached", "detached", "expired", "ended"].map(Value::from)
    );
}

#[test]
fn a_reply_with_members_a_client_does_not_know_yet_still_reads() {
    let text = r#"{"accepted":true,"nextOffset":3,"fromTheFuture":1}"#;
    let read: RuntimeFinishResponse = serde_json::from_str(text).unwrap();
    assert_eq!(read.next_offset, 3);
}

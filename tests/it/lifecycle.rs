//! A run's end and a viewer's stop on one gateway, over real sockets
//! (issue #15): `runtime.finish`, `stream.ended` to followers and resumers,
//! SSE `event: end` and the 204 that stops a browser, `RUN_ENDED` after the
//! end, `runs.list` / `GET /v1/runs`, `run.cancel` on `/v1/stream` and
//! `POST /v1/runs/{runId}/cancel`, the pending cancel pushed on reattach,
//! bad input, and the Rust client's side of all of it.

use std::net::SocketAddr;
use std::time::Duration;

use crate::harness::{Client, TestGateway, WAIT, all_caps, raw_http};
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use rungate_client::{
    ClientEvent, RunOutcome, RuntimeClient, RuntimeOptions, StreamItem, ViewerClient, ViewerOptions,
};
use rungate_test_support::http::{self, SseEvent, SseReader};
use rungate_test_support::schema::Spec;
use serde_json::{Value, json};

fn event(i: u64) -> Value {
    json!({ "type": "log", "seq": i, "data": i })
}

fn viewer(gw: &TestGateway, runs: &str) -> String {
    gw.token(TokenKind::Viewer, runs, &[])
}

fn canceller(gw: &TestGateway, runs: &str) -> String {
    gw.token(TokenKind::Viewer, runs, &[Capability::RunCancel])
}

/// A runtime socket with `run` attached (every capability); its session id.
async fn attached(gw: &TestGateway, run: &str) -> (Client, String) {
    let mut rt = gw.runtime("*").await;
    let a = rt.attach(run, "inst-1", &all_caps()).await;
    let sid = a["sessionId"].as_str().unwrap().to_owned();
    (rt, sid)
}

async fn publish(rt: &mut Client, sid: &str, run: &str, seqs: std::ops::Range<u64>) {
    let events: Vec<Value> = seqs.map(event).collect();
    rt.ok(
        "events.publish",
        json!({ "sessionId": sid, "runId": run, "events": events }),
    )
    .await;
}

async fn finish(rt: &mut Client, sid: &str, run: &str, outcome: &str) -> Value {
    rt.call(
        "runtime.finish",
        json!({ "sessionId": sid, "runId": run, "outcome": outcome, "message": "all done" }),
    )
    .await
}

/// Offsets of `stream.events` pushes for `run` until `stream.ended`; the
/// ended payload. Fails on anything else for the run.
async fn until_ended(client: &mut Client, run: &str) -> (Vec<u64>, Value) {
    let mut offsets = Vec::new();
    loop {
        let frame = client
            .wait_for(|v| v.get("id").is_none() && v["payload"]["runId"] == run)
            .await;
        match frame["type"].as_str() {
            Some("stream.events") => {
                for e in frame["payload"]["events"].as_array().unwrap() {
                    offsets.push(e["offset"].as_u64().unwrap());
                }
            }
            Some("stream.ended") => return (offsets, frame["payload"].clone()),
            other => panic!("unexpected push {other:?}: {frame}"),
        }
    }
}

fn assert_valid(frames: &[Value]) {
    let spec = Spec::load();
    for f in frames {
        let checked = if f.get("id").is_none() {
            spec.check_push(f)
        } else if f["type"] == "error" {
            spec.check_error(f)
        } else {
            continue;
        };
        if let Err(e) = checked {
            panic!("{f} breaks the spec: {e}");
        }
    }
}

// ---------------------------------------------------------------- finish

#[tokio::test]
async fn finish_ends_the_run_for_a_follower_and_a_resumer_in_order_and_once() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "r1").await;
    let mut live = Client::connect(&gw.url("/v1/stream"), &viewer(&gw, "r1")).await;
    let info = live
        .ok("stream.resume", json!({ "runId": "r1", "fromOffset": 0 }))
        .await;
    assert_eq!(info["ended"], false, "a live run says so: {info}");
    publish(&mut rt, &sid, "r1", 0..3).await;
    publish(&mut rt, &sid, "r1", 3..5).await;
    let reply = finish(&mut rt, &sid, "r1", "completed").await;
    assert_eq!(
        reply["payload"],
        json!({ "accepted": true, "nextOffset": 5 })
    );

    let (offsets, ended) = until_ended(&mut live, "r1").await;
    assert_eq!(
        offsets,
        [0, 1, 2, 3, 4],
        "every event, in order, before the end"
    );
    assert_eq!(ended["outcome"], "completed");
    assert_eq!(ended["message"], "all done");
    assert_eq!(ended["nextOffset"], 5);
    assert_eq!(ended["streamEpoch"], info["streamEpoch"]);
    // Once: the subscription is over, nothing more for the run comes.
    let later = live.frames_within(Duration::from_millis(300)).await;
    assert!(later.is_empty(), "after stream.ended: {later:?}");

    // A resumer after the end: ended in the reply, replay, then the end at once.
    let mut late = Client::connect(&gw.url("/v1/stream"), &viewer(&gw, "r1")).await;
    let info = late
        .ok("stream.resume", json!({ "runId": "r1", "fromOffset": 2 }))
        .await;
    assert_eq!(info["ended"], true);
    assert_eq!(info["startOffset"], 2);
    let (offsets, again) = until_ended(&mut late, "r1").await;
    assert_eq!(offsets, [2, 3, 4]);
    assert_eq!(again, ended, "the same end for everyone");
    // Live-only on an ended run: no events, the end at once.
    let info = late.ok("stream.resume", json!({ "runId": "r1" })).await;
    assert_eq!(info["ended"], true);
    let (offsets, _) = until_ended(&mut late, "r1").await;
    assert!(offsets.is_empty());
    assert_valid(&live.seen);
    assert_valid(&late.seen);
}

#[tokio::test]
async fn after_the_end_the_run_is_closed_and_finish_is_idempotent_by_outcome() {
    let gw = TestGateway::start_with(|c| {
        // A short lease: had the session only been left, it would expire
        // (and be pushed session.expired) well within the wait below.
        c.lease_ttl = Duration::from_millis(1500);
        c.heartbeat_interval = Duration::from_millis(1000);
    })
    .await;
    let (mut rt, sid) = attached(&gw, "r2").await;
    publish(&mut rt, &sid, "r2", 0..2).await;
    let first = finish(&mut rt, &sid, "r2", "failed").await;
    assert_eq!(first["payload"]["nextOffset"], 2);

    for (kind, payload) in [
        (
            "events.publish",
            json!({ "sessionId": sid, "runId": "r2", "events": [event(9)] }),
        ),
        (
            "kv.set",
            json!({ "sessionId": sid, "runId": "r2", "kv": { "a": "b" } }),
        ),
        (
            "checkpoint.save",
            json!({ "sessionId": sid, "runId": "r2", "data": { "x": 1 } }),
        ),
        (
            "kv.get",
            json!({ "sessionId": sid, "runId": "r2", "keys": ["a"] }),
        ),
        (
            "runtime.heartbeat",
            json!({ "sessionId": sid, "runId": "r2" }),
        ),
    ] {
        let frame = rt.call(kind, payload).await;
        assert_eq!(frame["error"]["code"], "RUN_ENDED", "{kind}: {frame}");
        assert_eq!(frame["error"]["retryable"], false);
        assert_eq!(frame["error"]["details"]["runId"], "r2");
        assert_eq!(frame["error"]["details"]["outcome"], "failed");
    }
    // The same outcome again: the same reply, also from the ended session.
    let again = finish(&mut rt, &sid, "r2", "failed").await;
    assert_eq!(again["payload"], first["payload"]);
    // Another outcome: CONFLICT, and the end is unchanged.
    let other = finish(&mut rt, &sid, "r2", "completed").await;
    assert_eq!(other["error"]["code"], "CONFLICT", "{other}");
    assert_eq!(other["error"]["details"]["outcome"], "failed");

    // Re-attaching the run id, fresh or as a reconnect: closed for good.
    let mut other_rt = gw.runtime("*").await;
    let fresh = other_rt
        .call(
            "runtime.attach",
            json!({ "runId": "r2", "runtimeInstanceId": "inst-2", "protocolVersion": "1" }),
        )
        .await;
    assert_eq!(fresh["error"]["code"], "RUN_ENDED", "{fresh}");
    let reconnect = other_rt.reattach("r2", "inst-1", 5, &[]).await;
    assert_eq!(reconnect["error"]["code"], "RUN_ENDED", "{reconnect}");

    // No session.expired ever follows a finish (the lease stopped).
    let frames = rt.frames_within(Duration::from_millis(2500)).await;
    assert!(
        frames.iter().all(|f| f["type"] != "session.expired"),
        "{frames:?}"
    );
    let events = crate::harness::read_stream(&gw.url("/v1/stream"), &viewer(&gw, "r2"), "r2").await;
    assert_eq!(events.1.len(), 2, "nothing was stored after the end");
    assert_valid(&rt.seen);
}

#[tokio::test]
async fn finishing_a_main_run_cancels_its_open_sub_runs_and_not_the_other_way() {
    let gw = TestGateway::start().await;
    let mut rt = gw.runtime("*").await;
    let main = rt.attach("main", "inst", &["subtasks.run"]).await;
    let main_sid = main["sessionId"].as_str().unwrap().to_owned();
    let a = rt.attach("sub-a", "inst", &[]).await;
    let b = rt.attach("sub-b", "inst", &[]).await;
    let (a_sid, b_sid) = (
        a["sessionId"].as_str().unwrap().to_owned(),
        b["sessionId"].as_str().unwrap().to_owned(),
    );
    publish(&mut rt, &a_sid, "sub-a", 0..1).await;
    // A sub-run ends on its own; the main run goes on.
    let done = finish(&mut rt, &b_sid, "sub-b", "completed").await;
    assert_eq!(done["type"], "reply", "{done}");
    rt.ok(
        "runtime.heartbeat",
        json!({ "sessionId": main_sid, "runId": "main" }),
    )
    .await;
    rt.ok(
        "runtime.heartbeat",
        json!({ "sessionId": a_sid, "runId": "sub-a" }),
    )
    .await;

    let mut watcher = Client::connect(&gw.url("/v1/stream"), &viewer(&gw, "*")).await;
    watcher
        .ok(
            "stream.resume",
            json!({ "runId": "sub-a", "fromOffset": 0 }),
        )
        .await;
    let ended = finish(&mut rt, &main_sid, "main", "completed").await;
    assert_eq!(ended["type"], "reply", "{ended}");
    let (offsets, end) = until_ended(&mut watcher, "sub-a").await;
    assert_eq!(offsets, [0]);
    assert_eq!(end["outcome"], "cancelled");
    assert_eq!(end["message"], "main run finished");

    let list = watcher.ok("runs.list", json!({})).await;
    let state = |run: &str| {
        list["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["runId"] == run)
            .cloned()
            .unwrap_or_else(|| panic!("{run} listed: {list}"))
    };
    assert_eq!(state("main")["outcome"], "completed");
    assert_eq!(state("sub-a")["outcome"], "cancelled");
    // The sub-run that ended first keeps its own outcome.
    assert_eq!(state("sub-b")["outcome"], "completed");
    for run in ["main", "sub-a", "sub-b"] {
        assert_eq!(state(run)["state"], "ended");
        assert!(state(run)["endedAt"].is_string());
    }
    let spec = Spec::load();
    let reply = json!({ "id": "x", "type": "reply", "payload": list });
    spec.check_reply("runs.list", &reply)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn runs_list_over_http_shows_ended_runs_with_outcome_and_time() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "h1").await;
    publish(&mut rt, &sid, "h1", 0..1).await;
    let (_rt2, _) = attached(&gw, "h2").await;
    let before = http::get_with_token(gw.addr, "/v1/runs", &viewer(&gw, "h*"))
        .await
        .json()
        .await;
    let h1 = before["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["runId"] == "h1")
        .cloned()
        .unwrap();
    assert_eq!(h1["state"], "attached");
    assert!(h1.get("outcome").is_none());
    finish(&mut rt, &sid, "h1", "cancelled").await;
    let after = http::get_with_token(gw.addr, "/v1/runs", &viewer(&gw, "h*"))
        .await
        .json()
        .await;
    let h1 = after["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["runId"] == "h1")
        .cloned()
        .unwrap();
    assert_eq!(h1["state"], "ended", "{after}");
    assert_eq!(h1["outcome"], "cancelled");
    assert_eq!(h1["message"], "all done");
    assert_eq!(h1["nextOffset"], 1);
    rungate::time::Timestamp::parse(h1["endedAt"].as_str().unwrap()).expect("an RFC 3339 time");
    let h2 = after["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["runId"] == "h2")
        .cloned()
        .unwrap();
    assert_eq!(h2["state"], "attached", "another run is untouched");
}

// ------------------------------------------------------------------- SSE

fn events_path(run: &str, query: &str) -> String {
    format!("/v1/runs/{run}/events{query}")
}

async fn sse(gw: &TestGateway, run: &str, query: &str, headers: &[(&str, &str)]) -> http::Response {
    let auth = format!("Bearer {}", viewer(gw, "*"));
    let mut all = vec![("authorization", auth.as_str())];
    all.extend_from_slice(headers);
    http::get(gw.addr, &events_path(run, query), &all).await
}

/// The opening `event: stream` data, then each event until the body ends.
async fn read_all(mut body: SseReader) -> (Value, Vec<SseEvent>) {
    let opening = body.next_event().await.expect("the stream event");
    assert_eq!(opening.name(), "stream");
    let mut events = Vec::new();
    while let Some(e) = body.next_event().await {
        events.push(e);
    }
    (opening.json(), events)
}

#[tokio::test]
async fn sse_ends_with_an_end_event_and_answers_204_to_a_reader_past_the_end() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "s1").await;
    publish(&mut rt, &sid, "s1", 0..3).await;
    // A reader following live sees the end arrive and the response end.
    let following = sse(&gw, "s1", "", &[]).await;
    assert_eq!(following.status, 200);
    let mut body = following.sse();
    let opening = body.next_event().await.unwrap();
    assert_eq!(opening.json()["ended"], false);
    for i in 0..3 {
        assert_eq!(body.next_event().await.unwrap().offset(), i);
    }
    finish(&mut rt, &sid, "s1", "completed").await;
    let end = body.next_event().await.expect("event: end");
    assert_eq!(end.name(), "end");
    assert_eq!(end.id.as_deref(), Some("end"));
    let payload = end.json();
    assert_eq!(payload["outcome"], "completed");
    assert_eq!(payload["nextOffset"], 3);
    Spec::load()
        .check_def("frames/pushes.json#/$defs/StreamEnded", &payload)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        body.next_event().await.is_none(),
        "the response ends after end"
    );

    // Past the end: 204 No Content, whichever way the reader says so.
    for (query, headers) in [
        ("", vec![("last-event-id", "end")]),
        ("", vec![("last-event-id", "2")]),
        ("", vec![("last-event-id", "7")]),
        ("?from=3", vec![]),
        ("?from=0", vec![("last-event-id", "end")]),
    ] {
        let r = sse(&gw, "s1", query, &headers).await;
        assert_eq!(r.status, 204, "{query} {headers:?}");
        assert_eq!(r.text().await, "");
    }
    // From earlier: replay, then end again.
    let (opening, events) =
        read_all(sse(&gw, "s1", "", &[("last-event-id", "0")]).await.sse()).await;
    assert_eq!(opening["ended"], true);
    let names: Vec<&str> = events.iter().map(|e| e.name()).collect();
    assert_eq!(names, ["output", "output", "end"]);
    assert_eq!(events[0].offset(), 1);
    let (_, events) = read_all(sse(&gw, "s1", "?from=2", &[]).await.sse()).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].json(), payload);
}

#[tokio::test]
async fn sse_of_a_run_with_no_events_ends_and_last_event_id_end_on_a_live_run_starts_over() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "s2").await;
    let (mut rt3, sid3) = attached(&gw, "s3").await;
    publish(&mut rt3, &sid3, "s3", 0..2).await;
    finish(&mut rt, &sid, "s2", "failed").await;
    let (_, events) = read_all(sse(&gw, "s2", "", &[]).await.sse()).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].name(), "end");
    assert_eq!(events[0].json()["nextOffset"], 0);
    assert_eq!(
        sse(&gw, "s2", "", &[("last-event-id", "end")]).await.status,
        204
    );
    // A run that has not ended: `end` means from the beginning.
    let r = sse(&gw, "s3", "", &[("last-event-id", "end")]).await;
    assert_eq!(r.status, 200);
    let mut body = r.sse();
    assert_eq!(body.next_event().await.unwrap().json()["startOffset"], 0);
    assert_eq!(body.next_event().await.unwrap().offset(), 0);
    assert_eq!(body.next_event().await.unwrap().offset(), 1);
}

// ---------------------------------------------------------------- cancel

/// `POST path` with `body` and `Authorization: Bearer token`; status and
/// body text. One request per connection, read to the end.
async fn post(addr: SocketAddr, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw_http(addr, &request).await
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

#[tokio::test]
async fn run_cancel_needs_the_capability_and_reaches_the_runtime_at_once() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "c1").await;
    let mut plain = Client::connect(&gw.url("/v1/stream"), &viewer(&gw, "c1")).await;
    let refused = plain.call("run.cancel", json!({ "runId": "c1" })).await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    let mut narrow = Client::connect(&gw.url("/v1/stream"), &canceller(&gw, "other")).await;
    assert_eq!(
        narrow.err("run.cancel", json!({ "runId": "c1" })).await,
        "FORBIDDEN"
    );
    // Not offered on the runtime endpoint, whatever the token.
    let on_runtime = rt.call("run.cancel", json!({ "runId": "c1" })).await;
    assert_eq!(on_runtime["error"]["code"], "FORBIDDEN", "{on_runtime}");
    let pushed = rt.frames_within(Duration::from_millis(200)).await;
    assert!(
        pushed.is_empty(),
        "refused cancels push nothing: {pushed:?}"
    );

    let mut ops = Client::connect(&gw.url("/v1/stream"), &canceller(&gw, "c*")).await;
    assert_eq!(
        ops.err("run.cancel", json!({ "runId": "c-unknown" })).await,
        "NOT_FOUND"
    );
    let reply = ops
        .ok(
            "run.cancel",
            json!({ "runId": "c1", "reason": "user pressed stop" }),
        )
        .await;
    assert_eq!(reply, json!({ "delivered": true, "ended": false }));
    let push = rt.push("run.cancelRequested").await;
    assert_eq!(push["sessionId"], sid);
    assert_eq!(push["runId"], "c1");
    assert_eq!(push["reason"], "user pressed stop");
    rungate::time::Timestamp::parse(push["requestedAt"].as_str().unwrap()).unwrap();

    // The runtime stops; a cancel after the end is only reported.
    finish(&mut rt, &sid, "c1", "cancelled").await;
    let after = ops.ok("run.cancel", json!({ "runId": "c1" })).await;
    assert_eq!(after, json!({ "delivered": false, "ended": true }));
    let later = rt.frames_within(Duration::from_millis(300)).await;
    assert!(
        later.iter().all(|f| f["type"] != "run.cancelRequested"),
        "{later:?}"
    );
    assert_valid(&rt.seen);
    assert_valid(&ops.seen);
    assert_valid(&plain.seen);
}

#[tokio::test]
async fn a_cancel_for_a_detached_runtime_waits_durably_and_comes_on_every_reattach() {
    let gw = TestGateway::start().await;
    let (rt, _sid) = attached(&gw, "c2").await;
    rt.close().await;
    let mut ops = Client::connect(&gw.url("/v1/stream"), &canceller(&gw, "c2")).await;
    // Wait until the gateway saw the socket go.
    for _ in 0..100 {
        let list = ops.ok("runs.list", json!({})).await;
        if list["runs"][0]["state"] == "detached" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = ops
        .ok("run.cancel", json!({ "runId": "c2", "reason": "first" }))
        .await;
    assert_eq!(reply, json!({ "delivered": false, "ended": false }));
    let reply = ops
        .ok("run.cancel", json!({ "runId": "c2", "reason": "newer" }))
        .await;
    assert_eq!(reply["delivered"], false);

    let mut back = gw.runtime("*").await;
    let moved = back.reattach("c2", "inst-1", 1, &[]).await;
    assert_eq!(moved["type"], "reply", "{moved}");
    let push = back.push("run.cancelRequested").await;
    assert_eq!(
        push["reason"], "newer",
        "a newer cancel replaces the reason"
    );
    let sid = moved["payload"]["sessionId"].as_str().unwrap().to_owned();
    assert_eq!(push["sessionId"], sid);
    // A runtime that crashed right after it still learns on the next reattach.
    back.close().await;
    let mut again = gw.runtime("*").await;
    let moved = again.reattach("c2", "inst-1", 2, &[]).await;
    assert_eq!(moved["type"], "reply", "{moved}");
    assert_eq!(again.push("run.cancelRequested").await["reason"], "newer");
    finish(&mut again, &sid, "c2", "cancelled").await;
    assert_valid(&again.seen);
}

#[tokio::test]
async fn a_pending_cancel_of_a_sub_run_comes_with_recover_connections() {
    let gw = TestGateway::start().await;
    let mut rt = gw.runtime("*").await;
    let main = rt.attach("m3", "inst", &["subtasks.run"]).await;
    let main_sid = main["sessionId"].as_str().unwrap().to_owned();
    rt.attach("m3-sub", "inst", &[]).await;
    rt.close().await;
    let mut ops = Client::connect(&gw.url("/v1/stream"), &canceller(&gw, "m3*")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply = ops.ok("run.cancel", json!({ "runId": "m3-sub" })).await;
    assert_eq!(reply["ended"], false);
    let mut back = gw.runtime("*").await;
    let moved = back.reattach("m3", "inst", 1, &["subtasks.run"]).await;
    assert_eq!(moved["type"], "reply", "{moved}");
    back.ok(
        "runtime.recoverConnections",
        json!({ "sessionId": main_sid, "mainRunId": "m3", "connectionEpoch": 1 }),
    )
    .await;
    let push = back.push("run.cancelRequested").await;
    assert_eq!(push["runId"], "m3-sub");
    assert!(push.get("reason").is_none());
}

#[tokio::test]
async fn post_cancel_follows_the_same_rules_over_http() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "p1").await;
    let path = "/v1/runs/p1/cancel";
    let (status, body) = post(
        gw.addr,
        path,
        Some(&canceller(&gw, "p1")),
        r#"{"reason":"stop"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body), json!({ "delivered": true, "ended": false }));
    assert_eq!(rt.push("run.cancelRequested").await["reason"], "stop");
    // An empty body is {}.
    let (status, _) = post(gw.addr, path, Some(&canceller(&gw, "p1")), "").await;
    assert_eq!(status, 200);
    assert!(rt.push("run.cancelRequested").await.get("reason").is_none());

    let (status, body) = post(gw.addr, path, Some(&viewer(&gw, "p1")), "{}").await;
    assert_eq!(
        (status, json_of(&body)["error"]["code"].clone()),
        (403, json!("FORBIDDEN"))
    );
    let (status, _) = post(gw.addr, path, None, "{}").await;
    assert_eq!(status, 401);
    let (status, body) = post(
        gw.addr,
        "/v1/runs/nobody/cancel",
        Some(&canceller(&gw, "*")),
        "{}",
    )
    .await;
    assert_eq!(
        (status, json_of(&body)["error"]["code"].clone()),
        (404, json!("NOT_FOUND"))
    );
    for bad in [r#"{"why":"x"}"#, "[1]", "not json", r#"{"reason":5}"#] {
        let (status, body) = post(gw.addr, path, Some(&canceller(&gw, "p1")), bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(json_of(&body)["error"]["code"], "INVALID_PAYLOAD");
    }
    let long = format!(r#"{{"reason":"{}"}}"#, "x".repeat(1025));
    let (status, body) = post(gw.addr, path, Some(&canceller(&gw, "p1")), &long).await;
    assert_eq!(status, 400);
    assert_eq!(json_of(&body)["error"]["details"]["path"], "/body/reason");
    let refused = rt.frames_within(Duration::from_millis(300)).await;
    assert!(
        refused.is_empty(),
        "refused cancels push nothing: {refused:?}"
    );

    finish(&mut rt, &sid, "p1", "cancelled").await;
    let (status, body) = post(gw.addr, path, Some(&canceller(&gw, "p1")), "{}").await;
    assert_eq!(status, 200);
    assert_eq!(json_of(&body), json!({ "delivered": false, "ended": true }));
}

// ------------------------------------------------------------- bad input

#[tokio::test]
async fn bad_input_is_refused_with_a_path_and_changes_nothing() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "b1").await;
    publish(&mut rt, &sid, "b1", 0..1).await;
    let long_ascii = "x".repeat(1025);
    // 1024 characters but 2048 bytes: over the byte limit.
    let long_utf8 = "é".repeat(1024);
    for (payload, path) in [
        (
            json!({ "sessionId": sid, "runId": "b1", "outcome": "done" }),
            "/payload/outcome",
        ),
        (
            json!({ "sessionId": sid, "runId": "b1", "outcome": { "completed": null } }),
            "/payload/outcome",
        ),
        (json!({ "sessionId": sid, "runId": "b1" }), "/payload"),
        (
            json!({ "sessionId": sid, "runId": "b1", "outcome": "completed", "message": long_ascii }),
            "/payload/message",
        ),
        (
            json!({ "sessionId": sid, "runId": "b1", "outcome": "completed", "message": long_utf8 }),
            "/payload/message",
        ),
        (
            json!({ "sessionId": sid, "runId": "b1", "outcome": "completed", "message": null }),
            "/payload/message",
        ),
        (
            json!({ "sessionId": sid, "runId": "b1", "outcome": "completed", "extra": 1 }),
            "/payload/extra",
        ),
    ] {
        let frame = rt.call("runtime.finish", payload.clone()).await;
        assert_eq!(
            frame["error"]["code"], "INVALID_PAYLOAD",
            "{payload}: {frame}"
        );
        assert_eq!(frame["error"]["details"]["path"], path, "{payload}");
    }
    let mut ops = Client::connect(&gw.url("/v1/stream"), &canceller(&gw, "b1")).await;
    for payload in [
        json!({ "runId": "b1", "reason": "y".repeat(1025) }),
        json!({ "runId": "b1", "reason": 3 }),
        json!({ "runId": "b1", "sessionId": sid }),
    ] {
        let frame = ops.call("run.cancel", payload.clone()).await;
        assert_eq!(
            frame["error"]["code"], "INVALID_PAYLOAD",
            "{payload}: {frame}"
        );
    }
    // A runtime cannot ask for the viewer's capability.
    let mut other = gw.runtime("*").await;
    let frame = other
        .call(
            "runtime.attach",
            json!({ "runId": "b2", "runtimeInstanceId": "i", "protocolVersion": "1", "capabilities": ["run.cancel"] }),
        )
        .await;
    assert_eq!(frame["error"]["code"], "INVALID_PAYLOAD", "{frame}");
    assert_eq!(frame["error"]["details"]["path"], "/payload/capabilities/0");
    // Nothing changed: the run is live, takes events, and nothing was pushed.
    let pushed = rt.frames_within(Duration::from_millis(200)).await;
    assert!(pushed.is_empty(), "{pushed:?}");
    publish(&mut rt, &sid, "b1", 1..2).await;
    let list = ops.ok("runs.list", json!({})).await;
    assert_eq!(list["runs"][0]["state"], "attached", "{list}");
    assert_eq!(list["runs"][0]["nextOffset"], 2);
    // Exactly 1024 bytes is fine.
    let ok = rt
        .call(
            "runtime.finish",
            json!({ "sessionId": sid, "runId": "b1", "outcome": "completed", "message": "é".repeat(512) }),
        )
        .await;
    assert_eq!(ok["type"], "reply", "{ok}");
    assert_valid(&rt.seen);
}

// ---------------------------------------------------------- Rust client

#[tokio::test]
async fn the_rust_client_finishes_hears_cancels_and_follows_to_the_end() {
    let gw = TestGateway::start().await;
    let token = gw.token(TokenKind::Runtime, "*", &Capability::ALL);
    let rt = RuntimeClient::connect(RuntimeOptions::new(
        gw.url("/v1/runtime"),
        token,
        "inst-rust",
    ))
    .await
    .unwrap();
    let mut cancels = rt.cancel_requests();
    let mut events = rt.events();
    rt.attach("rc1", &[]).await.unwrap();
    rt.publish("rc1", vec![rungate_client::Event::new("log")])
        .await
        .unwrap();

    let viewers = ViewerClient::new(ViewerOptions::new(
        gw.url("/v1/stream"),
        canceller(&gw, "rc1"),
    ));
    let mut follower = viewers.follow("rc1", Some(0));
    let answer = viewers.cancel("rc1", Some("enough")).await.unwrap();
    assert!(answer.delivered && !answer.ended, "{answer:?}");
    let request = tokio::time::timeout(WAIT, cancels.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(request.run_id, "rc1");
    assert_eq!(request.reason.as_deref(), Some("enough"));

    rt.publish("rc1", vec![rungate_client::Event::new("log")])
        .await
        .unwrap();
    let head = rt
        .finish("rc1", RunOutcome::Cancelled, Some("stopped by a viewer"))
        .await
        .unwrap();
    assert_eq!(head, 2);
    let mut offsets = Vec::new();
    let ended = loop {
        match tokio::time::timeout(WAIT, follower.next())
            .await
            .expect("in time")
        {
            Some(Ok(StreamItem::Event { offset, .. })) => offsets.push(offset),
            Some(Ok(StreamItem::Resumed { .. })) => {}
            Some(Ok(end @ StreamItem::Ended { .. })) => break end,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(offsets, [0, 1]);
    let StreamItem::Ended {
        outcome,
        message,
        next_offset,
        ..
    } = ended
    else {
        unreachable!()
    };
    assert_eq!(outcome, RunOutcome::Cancelled);
    assert_eq!(message.as_deref(), Some("stopped by a viewer"));
    assert_eq!(next_offset, 2);
    assert!(
        follower.next().await.is_none(),
        "the follower ends at the end"
    );
    loop {
        match tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            ClientEvent::RunEnded { run_id } => {
                assert_eq!(run_id, "rc1");
                break;
            }
            _ => continue,
        }
    }
    // The client forgot the run: nothing more goes to it.
    assert!(
        rt.publish("rc1", vec![rungate_client::Event::new("log")])
            .await
            .is_err()
    );
    // Idempotent through the client too? The run is forgotten: NoSession.
    assert!(rt.finish("rc1", RunOutcome::Cancelled, None).await.is_err());
    rt.close().await;
}

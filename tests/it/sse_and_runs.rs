//! The HTTP read side of PROTOCOL.md §1 and §4 over real sockets:
//! `GET /v1/runs` and the Server-Sent Events stream
//! `GET /v1/runs/{runId}/events` (where a reader starts, replay then live
//! tail, keepalives, pretty-printed events, gaps, draining, a dropped
//! stream). Bodies that have a schema are checked against `spec/v1`.

use std::time::Duration;

use crate::harness::*;
use rungate::auth::{AuthKey, TokenKind};
use rungate_test_support::http::{self, SseEvent, SseItem, SseParser, SseReader};
use rungate_test_support::schema::Spec;
use serde_json::{Value, json};
use tokio::time::Instant;

/// `$defs` of `spec/v1/schemas/commands/stream.json`.
const STREAM: &str = "commands/stream.json#/$defs/";
/// `$defs` of `spec/v1/schemas/frames/pushes.json`.
const PUSHES: &str = "frames/pushes.json#/$defs/";

fn event(i: u64) -> Value {
    json!({ "type": "log", "data": { "i": i } })
}

fn viewer_token(gw: &TestGateway, runs: &str) -> String {
    gw.token(TokenKind::Viewer, runs, &[])
}

/// A runtime socket attached to `run`, and its session id.
async fn attached(gw: &TestGateway, run: &str) -> (Client, String) {
    let mut rt = gw.runtime(run).await;
    let reply = rt.attach(run, "inst", &[]).await;
    let sid = reply["sessionId"].as_str().expect("sessionId").to_owned();
    (rt, sid)
}

async fn publish(rt: &mut Client, sid: &str, run: &str, events: &[Value]) {
    let reply = rt
        .ok(
            "events.publish",
            json!({ "sessionId": sid, "runId": run, "events": events }),
        )
        .await;
    assert_eq!(reply, json!({ "accepted": true }));
}

/// `GET /v1/runs` with `token`: must be 200 JSON valid against
/// `RunsListResponse`. Returns the body.
async fn runs_list(gw: &TestGateway, token: &str) -> Value {
    let response = http::get_with_token(gw.addr, "/v1/runs", token).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    let body = response.json().await;
    Spec::load()
        .check_def(&format!("{STREAM}RunsListResponse"), &body)
        .unwrap_or_else(|e| panic!("GET /v1/runs body {body}: {e}"));
    body
}

/// The entry for `run` in a runs list, if listed.
fn entry<'a>(list: &'a Value, run: &str) -> Option<&'a Value> {
    list["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .find(|r| r["runId"] == run)
}

/// Polls `GET /v1/runs` until `run` is listed in `state`; returns its entry.
async fn wait_for_state(gw: &TestGateway, token: &str, run: &str, state: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let list = runs_list(gw, token).await;
        if let Some(r) = entry(&list, run)
            && r["state"] == state
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{run} not {state} within {WAIT:?}: {list}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The error code of a refused HTTP request's JSON body, which is
/// `{"error": <ErrorBody>}` (the `error` member of an error frame).
async fn error_code(response: http::Response) -> String {
    assert_eq!(response.header("content-type"), Some("application/json"));
    let body = response.json().await;
    Spec::load()
        .check_def("frames/envelope.json#/$defs/ErrorBody", &body["error"])
        .unwrap_or_else(|e| panic!("HTTP error body {body}: {e}"));
    assert_eq!(body["error"]["retryable"], false, "{body}");
    body["error"]["code"].as_str().expect("a code").to_owned()
}

fn events_path(run: &str, query: &str) -> String {
    format!("/v1/runs/{run}/events{query}")
}

/// Checks an accepted SSE response and reads its opening `event: stream`;
/// returns the reader and the opening's data (a `StreamResumeResponse`).
async fn opened(response: http::Response) -> (SseReader, Value) {
    assert_eq!(response.status, 200);
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/event-stream"),
        "content-type {content_type:?}"
    );
    assert_eq!(response.header("cache-control"), Some("no-store"));
    let mut sse = response.sse();
    let opening = sse.next().await.expect("an opening event").event();
    assert_eq!(opening.name(), "stream", "{opening:?}");
    // An id here would become the browser's Last-Event-ID.
    assert_eq!(opening.id, None, "the opening carries no id");
    let info = opening.json();
    Spec::load()
        .check_def(&format!("{STREAM}StreamResumeResponse"), &info)
        .unwrap_or_else(|e| panic!("opening {info}: {e}"));
    (sse, info)
}

/// `GET` the run's events with a viewer `token` in the header.
async fn open(gw: &TestGateway, run: &str, query: &str, token: &str) -> (SseReader, Value) {
    opened(http::get_with_token(gw.addr, &events_path(run, query), token).await).await
}

/// The next item, which must be `event: output`.
async fn output(sse: &mut SseReader) -> SseEvent {
    let e = sse.next().await.expect("an output event").event();
    assert_eq!(e.name(), "output", "{e:?}");
    e
}

/// Reads `event: output` for each of `offsets`, checking the id and that
/// the data is the published JSON text, byte for byte.
async fn expect_outputs(sse: &mut SseReader, offsets: std::ops::Range<u64>) {
    for i in offsets {
        let e = output(sse).await;
        assert_eq!(e.offset(), i, "{e:?}");
        assert_eq!(e.data, event(i).to_string(), "event {i} as published");
        assert_eq!(e.data_lines, 1);
    }
}

// ------------------------------------------------------------ the reader

/// The test client's own SSE parser, so the tests below can trust it: the
/// same items whichever way the stream is cut into chunks.
#[test]
fn the_sse_parser_reads_any_chunking_alike() {
    let text: &[u8] = b"retry: 1000\r\nevent: stream\rdata: {\"a\":1}\n\n\
        : keepalive\n\n\
        id: 7\nevent: output\ndata: {\ndata:   \"x\": 1\ndata: }\nunknown: z\n\r\n\
        data\n\n\
        :\r\r\
        id: 8\ndata: unfinished";
    let want = vec![
        SseItem::Event(SseEvent {
            retry: Some(1000),
            event: Some("stream".into()),
            data: r#"{"a":1}"#.into(),
            data_lines: 1,
            id: None,
        }),
        SseItem::Comment("keepalive".into()),
        SseItem::Event(SseEvent {
            id: Some("7".into()),
            event: Some("output".into()),
            data: "{\n  \"x\": 1\n}".into(),
            data_lines: 3,
            retry: None,
        }),
        SseItem::Event(SseEvent {
            data_lines: 1,
            ..SseEvent::default()
        }),
        SseItem::Comment(String::new()),
    ];
    assert_eq!(SseParser::parse_all(text), want);
    for cut in 0..=text.len() {
        let mut parser = SseParser::default();
        parser.feed(&text[..cut]);
        parser.feed(&text[cut..]);
        parser.finish();
        let got: Vec<SseItem> = std::iter::from_fn(|| parser.pop()).collect();
        assert_eq!(got, want, "cut at {cut}");
    }
    let mut parser = SseParser::default();
    for b in text {
        parser.feed(std::slice::from_ref(b));
    }
    parser.finish();
    let got: Vec<SseItem> = std::iter::from_fn(|| parser.pop()).collect();
    assert_eq!(got, want, "one byte at a time");
}

// ------------------------------------------------------------ GET /v1/runs

#[tokio::test]
async fn runs_list_needs_a_valid_viewer_token() {
    let gw = TestGateway::start().await;

    let response = http::get(gw.addr, "/v1/runs", &[]).await;
    assert_eq!(response.status, 401, "no token");
    assert_eq!(error_code(response).await, "UNAUTHENTICATED");

    let response = http::get_with_token(gw.addr, "/v1/runs", "not.a.token").await;
    assert_eq!(response.status, 401, "garbage token");
    assert_eq!(error_code(response).await, "UNAUTHENTICATED");

    let other_key = AuthKey::load_or_create(&gw.dir.path().join("other.key")).expect("another key");
    let forged = mint(&other_key, TokenKind::Viewer, "job-*", &[]);
    let response = http::get_with_token(gw.addr, "/v1/runs", &forged).await;
    assert_eq!(response.status, 401, "token signed with another key");
    assert_eq!(error_code(response).await, "UNAUTHENTICATED");

    let runtime = gw.token(TokenKind::Runtime, "job-*", &[]);
    let response = http::get_with_token(gw.addr, "/v1/runs", &runtime).await;
    assert_eq!(response.status, 403, "runtime token");
    assert_eq!(error_code(response).await, "FORBIDDEN");

    // The browser form of the token works too.
    let viewer = viewer_token(&gw, "job-*");
    let response = http::get(gw.addr, &format!("/v1/runs?token={viewer}"), &[]).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.json().await, json!({ "runs": [] }));
}

#[tokio::test]
async fn runs_list_shows_only_covered_runs_with_state_and_offsets() {
    let gw = TestGateway::start().await;
    let (mut job1, sid1) = attached(&gw, "job-1").await;
    let (_job2, _) = attached(&gw, "job-2").await;
    let (_other, _) = attached(&gw, "other-1").await;
    publish(&mut job1, &sid1, "job-1", &[event(0), event(1), event(2)]).await;

    let viewer = viewer_token(&gw, "job-*");
    let list = runs_list(&gw, &viewer).await;
    let mut ids: Vec<&str> = list["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["runId"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["job-1", "job-2"], "only covered runs: {list}");

    let job1_entry = entry(&list, "job-1").unwrap().clone();
    assert_eq!(job1_entry["state"], "attached");
    assert_eq!(job1_entry["firstOffset"], 0);
    assert_eq!(job1_entry["nextOffset"], 3);
    let epoch1 = job1_entry["streamEpoch"].as_str().unwrap().to_owned();
    assert_eq!(epoch1.len(), 32, "the gateway generates 32 hex digits");

    let job2_entry = entry(&list, "job-2").unwrap();
    assert_eq!(job2_entry["state"], "attached");
    assert_eq!(job2_entry["firstOffset"], 0);
    assert_eq!(job2_entry["nextOffset"], 0);
    assert_ne!(job2_entry["streamEpoch"], job1_entry["streamEpoch"]);

    // A token for one exact run sees that run only.
    let list = runs_list(&gw, &viewer_token(&gw, "other-1")).await;
    assert_eq!(list["runs"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["runs"][0]["runId"], "other-1");

    // The socket goes away; the session lives on in its lease.
    job1.close().await;
    let detached = wait_for_state(&gw, &viewer, "job-1", "detached").await;
    assert_eq!(detached["firstOffset"], 0);
    assert_eq!(detached["nextOffset"], 3);
    assert_eq!(detached["streamEpoch"], epoch1.as_str(), "history kept");
    let list = runs_list(&gw, &viewer).await;
    assert_eq!(entry(&list, "job-2").unwrap()["state"], "attached");
}

// ------------------------------------------------------------ SSE

#[tokio::test]
async fn sse_replays_everything_kept_then_tails_live() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "run-1").await;
    let first: Vec<Value> = (0..5).map(event).collect();
    publish(&mut rt, &sid, "run-1", &first).await;

    let viewer = viewer_token(&gw, "run-*");
    let listed = entry(&runs_list(&gw, &viewer).await, "run-1")
        .unwrap()
        .clone();
    let (mut sse, info) = open(&gw, "run-1", "", &viewer).await;
    assert_eq!(
        info,
        json!({
            "runId": "run-1",
            "streamEpoch": listed["streamEpoch"],
            "firstOffset": 0,
            "nextOffset": 5,
            "startOffset": 0,
            "truncated": false,
            "ended": false,
        })
    );
    expect_outputs(&mut sse, 0..5).await;

    let more: Vec<Value> = (5..7).map(event).collect();
    publish(&mut rt, &sid, "run-1", &more).await;
    expect_outputs(&mut sse, 5..7).await;
}

#[tokio::test]
async fn sse_starts_at_from_or_after_last_event_id() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "run-1").await;
    let first: Vec<Value> = (0..5).map(event).collect();
    publish(&mut rt, &sid, "run-1", &first).await;
    let viewer = viewer_token(&gw, "run-1");

    // `?from=3` (with the token in the query too).
    let response = http::get(
        gw.addr,
        &events_path("run-1", &format!("?from=3&token={viewer}")),
        &[],
    )
    .await;
    let (mut from3, info) = opened(response).await;
    assert_eq!(info["startOffset"], 3);
    assert_eq!(info["firstOffset"], 0);
    assert_eq!(info["nextOffset"], 5);
    assert_eq!(info["truncated"], false);
    expect_outputs(&mut from3, 3..5).await;

    // `Last-Event-ID: 4` means "after 4", and wins over `?from=0`.
    let auth = format!("Bearer {viewer}");
    let response = http::get(
        gw.addr,
        &events_path("run-1", "?from=0"),
        &[("authorization", &auth), ("last-event-id", "4")],
    )
    .await;
    let (mut after4, info) = opened(response).await;
    assert_eq!(info["startOffset"], 5);
    assert_eq!(info["truncated"], false);

    publish(&mut rt, &sid, "run-1", &[event(5)]).await;
    expect_outputs(&mut after4, 5..6).await;
    expect_outputs(&mut from3, 5..6).await;
}

#[tokio::test]
async fn sse_refusals() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "job-1").await;
    publish(&mut rt, &sid, "job-1", &[event(0)]).await;
    let (_other, _) = attached(&gw, "other-1").await;
    let viewer = viewer_token(&gw, "job-*");
    let path = events_path("job-1", "");

    let response = http::get(gw.addr, &path, &[]).await;
    assert_eq!(response.status, 401, "no token");
    assert_eq!(error_code(response).await, "UNAUTHENTICATED");

    let response = http::get_with_token(gw.addr, &path, "not.a.token").await;
    assert_eq!(response.status, 401, "garbage token");
    assert_eq!(error_code(response).await, "UNAUTHENTICATED");

    let runtime = gw.token(TokenKind::Runtime, "job-*", &[]);
    let response = http::get_with_token(gw.addr, &path, &runtime).await;
    assert_eq!(response.status, 403, "runtime token");
    assert_eq!(error_code(response).await, "FORBIDDEN");

    let response = http::get_with_token(gw.addr, &events_path("other-1", ""), &viewer).await;
    assert_eq!(response.status, 403, "run not covered");
    assert_eq!(error_code(response).await, "FORBIDDEN");

    let auth = format!("Bearer {viewer}");
    let response = http::get(
        gw.addr,
        &path,
        &[("authorization", &auth), ("last-event-id", "abc")],
    )
    .await;
    assert_eq!(response.status, 400, "Last-Event-ID not an offset");
    assert_eq!(error_code(response).await, "INVALID_PAYLOAD");

    let response = http::get_with_token(gw.addr, &events_path("job-1", "?from=-1"), &viewer).await;
    assert_eq!(response.status, 400, "from not an offset");
    assert_eq!(error_code(response).await, "INVALID_PAYLOAD");

    // And the same viewer token, in the query, is let in.
    let response = http::get(gw.addr, &format!("{path}?token={viewer}"), &[]).await;
    let (mut sse, info) = opened(response).await;
    assert_eq!(info["nextOffset"], 1);
    expect_outputs(&mut sse, 0..1).await;
}

#[tokio::test]
async fn an_idle_sse_stream_gets_keepalive_comments() {
    let gw = TestGateway::start_with(|c| c.limits.sse_keepalive = Duration::from_millis(300)).await;
    let (mut rt, sid) = attached(&gw, "run-1").await;
    publish(&mut rt, &sid, "run-1", &[event(0)]).await;
    let requested = Instant::now();
    let (mut sse, _) = open(&gw, "run-1", "", &viewer_token(&gw, "run-1")).await;
    expect_outputs(&mut sse, 0..1).await;

    for k in 1..=2 {
        let item = sse.next().await.expect("the stream stays open");
        assert!(
            matches!(&item, SseItem::Comment(_)),
            "expected a keepalive comment, got {item:?}"
        );
        // Only a lower bound is safe to assert on a busy machine: the k-th
        // keepalive cannot be sent before k intervals after the request.
        assert!(
            requested.elapsed() >= Duration::from_millis(300 * k),
            "keepalive {k} after only {:?}",
            requested.elapsed()
        );
    }

    // Still live after keepalives.
    publish(&mut rt, &sid, "run-1", &[event(1)]).await;
    let e = sse.next_event().await.expect("an output event");
    assert_eq!((e.name(), e.offset()), ("output", 1));
}

#[tokio::test]
async fn pretty_printed_events_arrive_as_data_lines_that_join_back() {
    let gw = TestGateway::start().await;
    let (mut rt, sid) = attached(&gw, "run-1").await;

    // LF only: joining the lines with LF gives back the exact text.
    let lf = "{\n  \"type\": \"log\",\n  \"data\": {\n    \"text\": \"a\\nb\",\n    \"list\": [\n      1,\n      2\n    ]\n  }\n}";
    // CRLF, a lone CR, a blank line, a whitespace-only line and tabs: the
    // same JSON value must come back, in one event.
    let mixed = "{\r\n\t\"type\": \"log\",\r\n\r\n  \"data\":\r    \n  [null, \"x\\r\\ny\"]\n\n}";
    let compact = r#"{"type":"log","data":3}"#;
    let frame = format!(
        "{{\"id\":\"pretty\",\"type\":\"events.publish\",\"payload\":{{\"sessionId\":\"{sid}\",\"runId\":\"run-1\",\"events\":[{lf},\n{mixed},\n{compact}]}}}}"
    );
    rt.send_text(&frame).await;
    let answer = rt.answer("pretty").await;
    assert_eq!(answer["type"], "reply", "{answer}");
    assert_eq!(answer["payload"]["accepted"], true);

    let (mut sse, info) = open(&gw, "run-1", "?from=0", &viewer_token(&gw, "run-1")).await;
    assert_eq!(info["nextOffset"], 3);

    let e = output(&mut sse).await;
    assert_eq!(e.offset(), 0);
    assert_eq!(e.data_lines, lf.lines().count(), "{e:?}");
    assert_eq!(e.data, lf, "joined with LF, the exact text as published");

    let e = output(&mut sse).await;
    assert_eq!(e.offset(), 1);
    assert!(e.data_lines > 1, "{e:?}");
    let want: Value = serde_json::from_str(mixed).unwrap();
    assert_eq!(e.json(), want, "the same JSON value: {:?}", e.data);

    let e = output(&mut sse).await;
    assert_eq!(e.offset(), 2);
    assert_eq!(e.data_lines, 1);
    assert_eq!(e.data, compact);

    // Nothing stray after them: the next thing is the next event.
    publish(&mut rt, &sid, "run-1", &[event(3)]).await;
    expect_outputs(&mut sse, 3..4).await;
}

/// Bytes that can be in flight between the gateway's SSE writer and a
/// reader that stops reading before the writer stalls: the gateway's socket
/// send buffer at most (the `tcp_wmem` maximum; the gateway does not set
/// `SO_SNDBUF`), plus `chunk` (the largest body chunk: one delivery) twice
/// and 2 MiB for the small receive window and the HTTP libraries' buffers
/// at both ends. `None` where the limit cannot be read (not Linux).
fn stall_bound(chunk: u64) -> Option<u64> {
    let tcp_wmem_max: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()?;
    Some(tcp_wmem_max + 2 * chunk + (2 << 20))
}

#[tokio::test]
async fn an_sse_reader_that_falls_behind_gets_exact_gaps() {
    const KEEP: usize = 20;
    const PAD: usize = 100_000;
    const BATCH: u64 = 5;
    let gw = TestGateway::start_with(|c| {
        c.streams.max_events_per_run = KEEP;
        c.limits.max_event_bytes = 128 * 1024;
    })
    .await;
    let (mut rt, sid) = attached(&gw, "run-1").await;
    let small: Vec<Value> = (0..10).map(event).collect();
    publish(&mut rt, &sid, "run-1", &small).await;

    // A fixed, small receive window, so the gateway's side fills after a
    // bounded number of bytes instead of the kernel's autotuned maximum.
    let viewer = viewer_token(&gw, "run-1");
    let auth = format!("Bearer {viewer}");
    let tcp = http::connect_with_small_window(gw.addr, 64 * 1024).await;
    let response = http::get_over(
        tcp,
        gw.addr,
        &events_path("run-1", "?from=0"),
        &[("authorization", &auth)],
    )
    .await;
    let (mut sse, info) = opened(response).await;
    assert_eq!(info["startOffset"], 0);
    expect_outputs(&mut sse, 0..10).await;

    // 200 big events, not read meanwhile.
    let big = |i: u64| json!({ "type": "log", "data": { "i": i, "pad": "x".repeat(PAD) } });
    let mut published_bytes = 0;
    for start in (10..210).step_by(BATCH as usize) {
        let batch: Vec<Value> = (start..start + BATCH).map(big).collect();
        published_bytes += batch
            .iter()
            .map(|e| e.to_string().len() as u64)
            .sum::<u64>();
        publish(&mut rt, &sid, "run-1", &batch).await;
    }

    // The ring holds the last KEEP events.
    let listed = entry(&runs_list(&gw, &viewer).await, "run-1")
        .unwrap()
        .clone();
    assert_eq!(
        (&listed["firstOffset"], &listed["nextOffset"]),
        (&json!(190), &json!(210))
    );

    // Every offset is either delivered (as published) or inside a gap,
    // exactly once and in order.
    let spec = Spec::load();
    let mut next = 10;
    let mut gaps = Vec::new();
    while next < 210 {
        let e = sse.next_event().await.expect("the stream stays open");
        match e.name() {
            "output" => {
                assert_eq!(e.offset(), next, "offset {next} missing or repeated");
                let v = e.json();
                assert_eq!(v["data"]["i"], next, "event {next} as published");
                next += 1;
            }
            "gap" => {
                assert_eq!(e.id, None, "a gap carries no id");
                let gap = e.json();
                spec.check_def(&format!("{PUSHES}StreamGap"), &gap)
                    .unwrap_or_else(|err| panic!("gap {gap}: {err}"));
                assert_eq!(gap["runId"], "run-1");
                assert_eq!(gap["streamEpoch"], info["streamEpoch"]);
                let (from, to) = (
                    gap["fromOffset"].as_u64().unwrap(),
                    gap["toOffset"].as_u64().unwrap(),
                );
                assert_eq!(from, next, "gap {gap} does not start at {next}");
                // Something was missed, and not beyond the head.
                assert!(from <= to && to < 210, "{gap}");
                gaps.push((from, to));
                next = to + 1;
            }
            other => panic!("unexpected event {other:?}: {e:?}"),
        }
    }
    assert_eq!(next, 210);

    // Whether a gap was certain: the stalled writer holds at most `bound`
    // bytes, and once it has stalled, KEEP more events overtake it.
    let event_bytes = published_bytes / 200;
    let bound = stall_bound(KEEP as u64 * event_bytes);
    eprintln!("{published_bytes} bytes published, in-flight bound {bound:?}, gaps {gaps:?}");
    if let Some(bound) = bound
        && published_bytes > bound + (KEEP as u64 + 1) * event_bytes
    {
        assert!(
            !gaps.is_empty(),
            "{published_bytes} bytes published past a reader that read nothing \
             (at most {bound} can be in flight), yet no gap"
        );
    }
}

#[tokio::test]
async fn draining_ends_sse_responses_with_a_draining_event() {
    let mut gw = TestGateway::start_with(|c| c.reconnect_after = Duration::from_millis(250)).await;
    let (mut rt, sid) = attached(&gw, "run-1").await;
    publish(&mut rt, &sid, "run-1", &[event(0), event(1)]).await;
    rt.close().await;

    let (mut sse, _) = open(&gw, "run-1", "", &viewer_token(&gw, "run-1")).await;
    expect_outputs(&mut sse, 0..2).await;

    // The drain waits for open responses to end, so read concurrently.
    let (_, items) =
        tokio::time::timeout(WAIT, async { tokio::join!(gw.drain(), sse.until_end()) })
            .await
            .expect("the drain and the response end in time");
    assert_eq!(items.len(), 1, "one final event, then the end: {items:?}");
    let last = items[0].clone().event();
    assert_eq!(last.name(), "draining", "{last:?}");
    assert_eq!(last.id, None);
    let data = last.json();
    Spec::load()
        .check_def(&format!("{PUSHES}GatewayDraining"), &data)
        .unwrap_or_else(|e| panic!("draining {data}: {e}"));
    assert_eq!(data, json!({ "reconnectAfterMs": 250 }));
}

#[tokio::test]
async fn a_dropped_stream_ends_sse_with_closed_and_leaves_the_runs_list() {
    // Short lease and retention; the gateway sweeps streams every 2 s. The
    // lease is a little longer than the minimal 300 ms so that attach and
    // publish surely happen within it on a loaded machine.
    let gw = TestGateway::start_with(|c| {
        c.heartbeat_interval = Duration::from_millis(1000);
        c.lease_ttl = Duration::from_millis(1000);
        c.streams.retention = Duration::from_millis(200);
    })
    .await;
    let (mut rt, sid) = attached(&gw, "run-1").await;
    publish(&mut rt, &sid, "run-1", &[event(0), event(1), event(2)]).await;

    let viewer = viewer_token(&gw, "run-*");
    let (mut sse, info) = open(&gw, "run-1", "", &viewer).await;
    expect_outputs(&mut sse, 0..3).await;
    let closed_at = Instant::now();
    rt.close().await;

    let closed = sse.next_event().await.expect("a final event");
    assert_eq!(closed.name(), "closed", "{closed:?}");
    assert_eq!(closed.id, None);
    let data = closed.json();
    Spec::load()
        .check_def(&format!("{PUSHES}StreamClosed"), &data)
        .unwrap_or_else(|e| panic!("closed {data}: {e}"));
    assert_eq!(
        data,
        json!({ "runId": "run-1", "streamEpoch": info["streamEpoch"] })
    );
    assert_eq!(sse.next().await, None, "the response ends after closed");
    assert!(
        closed_at.elapsed() < WAIT,
        "closed only after {:?}",
        closed_at.elapsed()
    );

    let list = runs_list(&gw, &viewer).await;
    assert_eq!(
        entry(&list, "run-1"),
        None,
        "a dropped stream is not listed: {list}"
    );
}

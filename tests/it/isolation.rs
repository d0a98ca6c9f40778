//! Isolation under abuse (issue #5): on one gateway, while some sockets
//! flood bad and oversized frames and others stop reading in the middle of
//! a busy stream, a well-behaved runtime gets every reply and its viewer
//! every event — no gap, no duplicate, in order.
//!
//! No timing is asserted: the abusers run for as long as the good clients
//! need, and every wait is bounded only by the harness's generous `WAIT`.

use std::collections::HashSet;

use crate::harness::*;
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use rungate_test_support::http::connect_with_small_window;
use rungate_test_support::raw_ws::*;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// Events the good runtime publishes, about 2 KiB each: 6 MiB in all, more
/// than a socket's send buffer grows to (4 MiB by default), so the
/// gateway's writes to a reader that stopped reading really block.
const EVENTS: u64 = 3000;
const PER_BATCH: u64 = 20;
/// Requests the good runtime keeps in flight at once.
const WINDOW: usize = 30;

fn event(i: u64) -> Value {
    json!({ "type": "log", "seq": i + 1, "data": { "i": i, "pad": "x".repeat(2000) } })
}

/// Sends bad frames without ever reading an answer, then a message over
/// the size limit. Its own queue fills and its reader stops: that must
/// cost only this socket.
fn flooder(gw: &TestGateway, token: String) -> JoinHandle<()> {
    let addr = gw.addr;
    tokio::spawn(async move {
        let mut ws = RawWs::connect(addr, "/v1/runtime", &token).await;
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        let bad: [Vec<u8>; 6] = [
            encode_frame(true, 0, OP_TEXT, b"not json", true),
            encode_frame(true, 0, OP_BINARY, b"\x00\x01", true),
            encode_frame(
                true,
                0,
                OP_TEXT,
                br#"{"id":"x","type":"nope","payload":{}}"#,
                true,
            ),
            encode_frame(
                true,
                0,
                OP_TEXT,
                br#"{"id":"y","type":"kv.get","payload":[]}"#,
                true,
            ),
            encode_frame(true, 0, OP_TEXT, deep.as_bytes(), true),
            encode_frame(true, 0, OP_PING, b"flood", true),
        ];
        for i in 0..20_000 {
            ws.send_bytes(&bad[i % bad.len()]).await;
        }
        // Over the 64 KiB limit set below.
        ws.send_frame(true, 0, OP_TEXT, &vec![b' '; 70_000], true)
            .await;
        let _ = ws.until_end().await;
    })
}

/// Connects again and again, each time sending one message over the
/// limit; each must end with a 1009 close.
fn oversizer(gw: &TestGateway, token: String) -> JoinHandle<usize> {
    let addr = gw.addr;
    tokio::spawn(async move {
        let mut closed_right = 0;
        for _ in 0..25 {
            let mut ws = RawWs::connect(addr, "/v1/runtime", &token).await;
            ws.send_frame(true, 0, OP_TEXT, &vec![b'{'; 100_000], true)
                .await;
            let (_, ending) = ws.until_end().await;
            if ending == Ending::Close(Some(1009)) {
                closed_right += 1;
            }
        }
        closed_right
    })
}

/// A viewer that follows the busy run from offset 0 and then never reads:
/// its receive window is tiny, so the gateway's writes to it block.
async fn stalled_viewer(gw: &TestGateway, token: &str, run: &str) -> RawWs {
    let tcp = connect_with_small_window(gw.addr, 4096).await;
    let mut ws = RawWs::connect_over(tcp, gw.addr, "/v1/stream", token).await;
    let reply = ws
        .call("stream.resume", json!({ "runId": run, "fromOffset": 0 }))
        .await;
    assert_eq!(reply["type"], "reply", "{reply}");
    ws
}

/// A runtime that sends requests and reads none of the replies.
async fn stalled_runtime(gw: &TestGateway, token: &str) -> JoinHandle<()> {
    let tcp = connect_with_small_window(gw.addr, 4096).await;
    let mut ws = RawWs::connect_over(tcp, gw.addr, "/v1/runtime", token).await;
    let reply = ws
        .call(
            "runtime.attach",
            json!({ "runId": "iso-stall", "runtimeInstanceId": "stall", "protocolVersion": "1",
                    "capabilities": ["kv.write"] }),
        )
        .await;
    let sid = reply["payload"]["sessionId"].as_str().unwrap().to_owned();
    tokio::spawn(async move {
        for i in 0..50_000u64 {
            ws.send(
                "kv.set",
                json!({ "sessionId": sid, "runId": "iso-stall", "kv": { "k": i.to_string() } }),
            )
            .await;
        }
        // Hold the socket open, unread, until the test ends.
        std::future::pending::<()>().await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_runtime_and_viewer_are_untouched_by_floods_and_stalls() {
    let gw = TestGateway::start_with(|c| c.limits.max_frame_bytes = 64 * 1024).await;
    let run = "iso-good";
    let runtime_token = gw.token(TokenKind::Runtime, "iso-*", &Capability::ALL);
    let viewer_token = gw.token(TokenKind::Viewer, "iso-*", &[]);

    // The good pair: the viewer follows from offset 0 before anything is
    // published, so it must see every event.
    let mut good = Client::connect(&gw.url("/v1/runtime"), &runtime_token).await;
    let reply = good
        .attach(run, "good", &["kv.read", "kv.write", "stream.resume"])
        .await;
    let sid = reply["sessionId"].as_str().unwrap().to_owned();
    let mut viewer = Client::connect(&gw.url("/v1/stream"), &viewer_token).await;
    viewer
        .ok("stream.resume", json!({ "runId": run, "fromOffset": 0 }))
        .await;

    // The abusers, all at once.
    let stalled_viewers = [
        stalled_viewer(&gw, &viewer_token, run).await,
        stalled_viewer(&gw, &viewer_token, run).await,
    ];
    let stalled_rt = stalled_runtime(&gw, &runtime_token).await;
    let floods: Vec<_> = (0..2)
        .map(|_| flooder(&gw, runtime_token.clone()))
        .collect();
    let oversized = oversizer(&gw, runtime_token.clone());

    let reader = tokio::spawn(async move {
        let mut offsets = Vec::with_capacity(EVENTS as usize);
        while (offsets.len() as u64) < EVENTS {
            let push = viewer.push("stream.events").await;
            assert_eq!(push["runId"], "iso-good");
            for e in push["events"].as_array().unwrap() {
                assert_eq!(e["event"]["data"]["i"], e["offset"], "{e}");
                offsets.push(e["offset"].as_u64().unwrap());
            }
        }
        let gaps = viewer
            .seen
            .iter()
            .filter(|f| f["type"] == "stream.gap")
            .count();
        (offsets, gaps)
    });

    // The good runtime: publishes, heartbeats and KV writes, WINDOW in
    // flight at a time; every request must get its reply.
    let mut sent = 0usize;
    let mut replies = 0usize;
    let mut in_flight: Vec<String> = Vec::new();
    let mut next_event = 0;
    while next_event < EVENTS {
        let events: Vec<Value> = (next_event..next_event + PER_BATCH).map(event).collect();
        next_event += PER_BATCH;
        in_flight.push(
            good.send(
                "events.publish",
                json!({ "sessionId": sid, "runId": run, "events": events }),
            )
            .await,
        );
        in_flight.push(
            good.send(
                "runtime.heartbeat",
                json!({ "sessionId": sid, "runId": run }),
            )
            .await,
        );
        in_flight.push(
            good.send(
                "kv.set",
                json!({ "sessionId": sid, "runId": run, "kv": { "n": next_event.to_string() } }),
            )
            .await,
        );
        sent += 3;
        if in_flight.len() >= WINDOW || next_event >= EVENTS {
            for id in in_flight.drain(..) {
                let answer = good.answer(&id).await;
                assert_eq!(answer["type"], "reply", "{answer}");
                replies += 1;
            }
        }
    }
    assert_eq!(replies, sent, "every request got its reply");
    let kv = good
        .ok(
            "kv.get",
            json!({ "sessionId": sid, "runId": run, "keys": ["n"] }),
        )
        .await;
    assert_eq!(kv["kv"]["n"], EVENTS.to_string());

    let (offsets, gaps) = reader.await.unwrap();
    assert_eq!(gaps, 0, "the viewer fell behind no one but itself");
    let expected: Vec<u64> = (0..EVENTS).collect();
    assert_eq!(offsets, expected, "every event, in order, once");
    assert_eq!(
        offsets.iter().collect::<HashSet<_>>().len(),
        EVENTS as usize
    );

    // Each oversized message was refused with 1009.
    assert_eq!(oversized.await.unwrap(), 25);
    // The abusers are still there or were closed; either way the gateway
    // serves a newcomer at once.
    let mut late = Client::connect(&gw.url("/v1/runtime"), &runtime_token).await;
    late.attach("iso-late", "late", &[]).await;
    for f in floods {
        f.abort();
    }
    stalled_rt.abort();

    // The stalled viewers cost nothing while they did not read; reading
    // now, each gets the events in order from offset 0 without a duplicate:
    // all of them, or a prefix and then the close the write timeout gives a
    // peer that took nothing for that long (a very slow machine).
    for mut ws in stalled_viewers {
        let mut next = 0u64;
        while next < EVENTS {
            let Some(frame) = ws.next_json().await else {
                break;
            };
            if frame["type"] != "stream.events" {
                continue;
            }
            for e in frame["payload"]["events"].as_array().unwrap() {
                assert_eq!(e["offset"], next, "in order, once");
                next += 1;
            }
        }
        assert!(next > 0, "a stalled viewer was sent nothing at all");
    }
}

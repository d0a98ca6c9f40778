//! A run's end in a real browser (headless Chromium over DevTools):
//! Chromium's own `EventSource` following a run that ends gets every event,
//! `event: end` once, and then stops reconnecting (its reconnect is
//! answered 204); and one opened on an already ended run from the middle
//! replays, ends, and stops too.

// Not every helper of the browser module is used here (screenshots).
use rungate_test_support::browser;

use std::time::Duration;

use crate::harness::*;
use browser::Headless;
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use serde_json::{Value, json};

async fn publish(rt: &mut Client, sid: &Value, run: &str, seqs: std::ops::Range<u64>) {
    let events: Vec<Value> = seqs
        .map(|i| json!({ "type": "log", "seq": i, "data": i }))
        .collect();
    rt.ok(
        "events.publish",
        json!({ "sessionId": sid, "runId": run, "events": events }),
    )
    .await;
}

/// Starts an `EventSource` in the page that records what it sees in
/// `window.seen`: every `open`, `error`, `output` (its id) and `end`.
fn follow_js(url: &str) -> String {
    format!(
        r#"(() => {{
            window.seen = {{ opens: 0, errors: 0, outputs: [], ends: [] }};
            const es = new EventSource({url:?});
            window.es = es;
            es.onopen = () => window.seen.opens++;
            es.onerror = () => window.seen.errors++;
            es.addEventListener('output', (e) => window.seen.outputs.push(e.lastEventId));
            es.addEventListener('end', (e) => window.seen.ends.push(JSON.parse(e.data)));
            return true;
        }})()"#
    )
}

const STATE: &str = "({ seen: window.seen, readyState: window.es.readyState })";

#[tokio::test]
async fn an_event_source_following_a_run_that_ends_stops_reconnecting() {
    let Some(chromium) = browser::chromium("the EventSource end test") else {
        return;
    };
    let gw = TestGateway::start().await;
    let runtime = gw.token(TokenKind::Runtime, "*", &Capability::ALL);
    let viewer = gw.token(TokenKind::Viewer, "*", &[]);
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &runtime).await;
    let sid = rt.attach("es-1", "w", &[]).await["sessionId"].clone();
    publish(&mut rt, &sid, "es-1", 0..3).await;

    let chrome = Headless::launch(&chromium).await;
    // A page of the gateway's own origin (no script of its own runs there).
    let tab = chrome.open(&format!("http://{}/healthz", gw.addr)).await;
    let url = format!("/v1/runs/es-1/events?token={viewer}");
    assert!(tab.eval::<bool>(&follow_js(&url)).await);
    tab.wait_until(
        "the first three events",
        "window.seen.outputs.length === 3",
        STATE,
        Duration::from_secs(30),
    )
    .await;
    publish(&mut rt, &sid, "es-1", 3..5).await;
    rt.ok(
        "runtime.finish",
        json!({ "sessionId": sid, "runId": "es-1", "outcome": "completed", "message": "bye" }),
    )
    .await;
    // EventSource reconnects by itself after the response ends (retry:
    // 1000 ms); the 204 it gets then closes it for good.
    tab.wait_until(
        "the end, then a closed EventSource",
        "window.seen.ends.length === 1 && window.es.readyState === 2",
        STATE,
        Duration::from_secs(30),
    )
    .await;
    // Long enough for several more reconnects, were it still trying.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let state: Value = tab.eval(STATE).await;
    assert_eq!(state["readyState"], 2, "{state}");
    assert_eq!(state["seen"]["opens"], 1, "one response only: {state}");
    // One `error` when the response ended (EventSource then reconnects),
    // one for the 204 that answered the reconnect: no more after it.
    assert_eq!(state["seen"]["errors"], 2, "{state}");
    assert_eq!(
        state["seen"]["outputs"],
        json!(["0", "1", "2", "3", "4"]),
        "every event once, in order"
    );
    assert_eq!(state["seen"]["ends"].as_array().unwrap().len(), 1);
    assert_eq!(state["seen"]["ends"][0]["outcome"], "completed");
    assert_eq!(state["seen"]["ends"][0]["message"], "bye");
    assert_eq!(state["seen"]["ends"][0]["nextOffset"], 5);

    // A page opened on an ended run from the middle: replay, end, stop.
    let tab2 = chrome.open(&format!("http://{}/healthz", gw.addr)).await;
    let url = format!("/v1/runs/es-1/events?token={viewer}&from=3");
    assert!(tab2.eval::<bool>(&follow_js(&url)).await);
    tab2.wait_until(
        "the replay, the end and a closed EventSource",
        "window.seen.ends.length === 1 && window.es.readyState === 2",
        STATE,
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let state: Value = tab2.eval(STATE).await;
    assert_eq!(state["seen"]["outputs"], json!(["3", "4"]), "{state}");
    assert_eq!(state["seen"]["opens"], 1, "{state}");
    assert_eq!(state["readyState"], 2, "{state}");
    assert!(tab.exceptions().is_empty(), "{:?}", tab.exceptions());
    chrome.close().await;
}

const SHOWN: &str = "({ status: document.getElementById('run-status').textContent, \
    stop: !document.getElementById('stop').hidden, \
    rows: document.querySelectorAll('#log > .row.ev').length, \
    log: document.getElementById('log').innerText.slice(-600), \
    runs: document.querySelector('#runs-table').innerText })";

#[tokio::test]
async fn the_dashboard_shows_the_end_and_stops_a_run_when_its_token_may() {
    let Some(chromium) = browser::chromium("the dashboard end and stop test") else {
        return;
    };
    let gw = TestGateway::start().await;
    let runtime = gw.token(TokenKind::Runtime, "*", &Capability::ALL);
    let stopper = gw.token(TokenKind::Viewer, "dash-*", &[Capability::RunCancel]);
    let plain = gw.token(TokenKind::Viewer, "dash-*", &[]);
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &runtime).await;
    let sid = rt.attach("dash-end", "w", &[]).await["sessionId"].clone();
    publish(&mut rt, &sid, "dash-end", 0..3).await;

    let chrome = Headless::launch(&chromium).await;
    // A token without run.cancel: no Stop button.
    let viewer_tab = chrome
        .open(&format!("http://{}/?token={plain}&run=dash-end", gw.addr))
        .await;
    viewer_tab
        .wait_until(
            "the rows",
            "document.querySelectorAll('#log > .row.ev').length === 3",
            SHOWN,
            Duration::from_secs(30),
        )
        .await;
    assert!(
        viewer_tab
            .eval::<bool>("document.getElementById('stop').hidden")
            .await,
        "no Stop for a token that may not cancel"
    );

    let tab = chrome
        .open(&format!("http://{}/?token={stopper}&run=dash-end", gw.addr))
        .await;
    tab.wait_until(
        "the rows and the Stop button",
        "document.querySelectorAll('#log > .row.ev').length === 3 && !document.getElementById('stop').hidden",
        SHOWN,
        Duration::from_secs(30),
    )
    .await;
    tab.eval::<bool>("(document.getElementById('stop').click(), true)")
        .await;
    let push = rt.push("run.cancelRequested").await;
    assert_eq!(push["reason"], "stopped from the dashboard");
    tab.wait_until(
        "the stop acknowledged",
        "document.getElementById('log').innerText.includes('Stop requested')",
        SHOWN,
        Duration::from_secs(30),
    )
    .await;

    // The runtime stops: both pages show the end, the badge and no Stop.
    publish(&mut rt, &sid, "dash-end", 3..4).await;
    rt.ok(
        "runtime.finish",
        json!({ "sessionId": sid, "runId": "dash-end", "outcome": "cancelled", "message": "stopped by a viewer" }),
    )
    .await;
    for t in [&tab, &viewer_tab] {
        // A background tab renders rows lazily (animation frames).
        t.page
            .bring_to_front()
            .await
            .expect("bring the tab to the front");
        t.wait_until(
            "the ended status",
            "document.getElementById('run-status').dataset.state === 'ended' && \
             document.getElementById('run-status').textContent === 'ended · cancelled' && \
             document.querySelectorAll('#log > .row.ev').length === 4",
            SHOWN,
            Duration::from_secs(30),
        )
        .await;
        t.wait_until(
            "the ended badge in the runs list",
            "[...document.querySelectorAll('#runs-table tbody tr')].some(tr => \
                tr.dataset.run === 'dash-end' && tr.cells[1].textContent === 'ended · cancelled')",
            SHOWN,
            Duration::from_secs(30),
        )
        .await;
        let shown: Value = t.eval(SHOWN).await;
        assert_eq!(shown["stop"], false, "{shown}");
        assert!(
            shown["log"]
                .as_str()
                .unwrap()
                .contains("stopped by a viewer"),
            "{shown}"
        );
        assert!(t.exceptions().is_empty(), "{:?}", t.exceptions());
    }
    chrome.close().await;
}

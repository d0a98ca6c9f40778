//! The dashboard at `GET /`: its files are served as a browser needs them,
//! and in a real browser (headless Chromium over the DevTools protocol) it
//! tails a run live, filters, pauses and resumes, caps its rows, and
//! carries on across gateway restarts on the same address with every
//! offset shown once, in order, per stream epoch, and each lost history
//! marked where it happened. On failure it leaves a screenshot at
//! `target/dashboard-failure.png`; `DASHBOARD_SCREENSHOT=path` saves one of
//! a passing run.

// Kept out of `common/mod.rs`, which every test binary compiles: the
// DevTools client would add seconds of build and tens of MB to each.
use rungate_test_support::browser;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::Duration;

use crate::harness::*;
use browser::{Headless, Tab};
use futures_util::FutureExt;
use rungate::auth::{AuthKey, TokenKind};
use rungate_test_support::http;
use serde_json::{Value, json};

#[tokio::test]
async fn the_page_and_its_assets_are_served_without_a_token() {
    let gw = TestGateway::start().await;
    let page = http::get(gw.addr, "/", &[]).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(page.header("cache-control"), Some("no-store"));
    assert!(page.header("content-security-policy").is_some());
    let html = page.text().await;
    assert!(html.starts_with("<!doctype html>"), "{html}");

    // Everything the page refers to is served by the gateway itself (or is
    // a data: URL): no CDN, no build step.
    let mut refs = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for (i, _) in html.match_indices(attr) {
            let rest = &html[i + attr.len()..];
            refs.push(rest[..rest.find('"').unwrap()].to_owned());
        }
    }
    let mut types = Vec::new();
    for url in refs.iter().filter(|u| !u.starts_with("data:")) {
        assert!(!url.contains(':'), "{url} is not on this gateway");
        // Relative to the page at `/`.
        let path = format!("/{}", url.trim_start_matches('/'));
        let asset = http::get(gw.addr, &path, &[]).await;
        assert_eq!(asset.status, 200, "{url}");
        assert_eq!(asset.header("cache-control"), Some("no-store"), "{url}");
        types.push(asset.header("content-type").unwrap_or_default().to_owned());
        assert!(!asset.text().await.is_empty(), "{url}");
    }
    types.sort();
    assert_eq!(
        types,
        ["text/css; charset=utf-8", "text/javascript; charset=utf-8"]
    );

    let missing = http::get(gw.addr, "/assets/missing.js", &[]).await;
    assert_eq!(missing.status, 404);
}

/// The event a runtime publishes as offset `n` of its stream: three types
/// in turn, with a timestamp and some data.
fn event(n: u64) -> Value {
    let kind = ["log", "token", "tool.call"][(n % 3) as usize];
    json!({
        "type": kind,
        "timestamp": format!("2026-11-25T10:{:02}:{:02}.{:03}Z", (n / 60) % 60, n % 60, n % 1000),
        "data": { "n": n, "text": format!("event number {n}") },
    })
}

/// Publishes the events for offsets `from..to`, ten per batch.
async fn publish(rt: &mut Client, session: &Value, run: &str, from: u64, to: u64) {
    publish_in(rt, session, run, from, to, 10).await;
}

async fn publish_in(rt: &mut Client, session: &Value, run: &str, from: u64, to: u64, batch: u64) {
    let mut n = from;
    while n < to {
        let end = (n + batch).min(to);
        let events: Vec<Value> = (n..end).map(event).collect();
        rt.ok(
            "events.publish",
            json!({ "sessionId": session, "runId": run, "events": events }),
        )
        .await;
        n = end;
    }
}

/// `[epoch, offset]` of every event row in the log, top to bottom.
const ROWS: &str = "[...document.querySelectorAll('#log > .row.ev')]\
    .map(r => [r.dataset.epoch, Number(r.dataset.offset)])";

/// What the page shows, for failure messages: status, counters, the last
/// lines of the log.
const SHOWN: &str = "({ conn: document.getElementById('conn').innerText, \
    run: document.getElementById('run-status').innerText, \
    facts: document.querySelector('.facts').innerText.replace(/\\n/g, ' '), \
    tail: [...document.querySelectorAll('#log > *')].slice(-12).map(e => \
        e.classList.contains('row') ? `${e.dataset.epoch.slice(0, 8)} #${e.dataset.offset} ${e.querySelector('.type').textContent}` \
        : `[${e.className}] ${e.textContent}`) })";

fn rows_at_least(n: usize) -> String {
    format!("document.querySelectorAll('#log > .row.ev').length >= {n}")
}

/// Where a failing run leaves its screenshot.
fn failure_screenshot() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("dashboard-failure.png")
}

/// Runs `body`; if it panics, saves a screenshot of `tab` and what the page
/// shows before passing the panic on.
async fn screenshot_on_failure<F: Future<Output = ()>>(tab: &Tab, body: F) {
    if let Err(panic) = AssertUnwindSafe(body).catch_unwind().await {
        let path = failure_screenshot();
        match tab.screenshot(&path).await {
            Ok(()) => eprintln!("dashboard test failed; screenshot: {}", path.display()),
            Err(e) => eprintln!("dashboard test failed; no screenshot ({e})"),
        }
        let shown: Result<Value, _> = AssertUnwindSafe(tab.eval::<Value>(SHOWN))
            .catch_unwind()
            .await;
        if let Ok(shown) = shown {
            eprintln!("the page shows: {shown:#}");
        }
        eprintln!("uncaught exceptions: {:?}", tab.exceptions());
        std::panic::resume_unwind(panic);
    }
}

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_tails_a_run_in_a_browser_across_a_gateway_restart() {
    let Some(chromium) = browser::chromium("the dashboard browser test") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    // The runtime here is a raw socket that sends no heartbeats, and a
    // loaded machine may take longer than the default 30 s lease to start
    // Chromium and load the page: the test is about the page.
    let gw = GatewayProcess::spawn(
        &data,
        &["--reconnect-after-ms", "200", "--lease-ttl-ms", "600000"],
    )
    .await;
    let addr = gw.addr;
    let key = AuthKey::load_or_create(&data.join("auth.key")).expect("the gateway made its key");
    let runtime_token = mint(&key, TokenKind::Runtime, "dash-*", &[]);
    let viewer_token = mint(&key, TokenKind::Viewer, "dash-*", &[]);

    let mut rt = Client::connect(&gw.url("/v1/runtime"), &runtime_token).await;
    let session = rt.attach("dash-1", "inst", &[]).await["sessionId"].clone();
    publish(&mut rt, &session, "dash-1", 0, 40).await;

    let chrome = Headless::launch(&chromium).await;
    let tab = chrome
        .open(&format!("http://{addr}/?token={viewer_token}&run=dash-1"))
        .await;

    screenshot_on_failure(&tab, async {
        // History first, then live events.
        tab.wait_until("the kept history", &rows_at_least(40), SHOWN, LIMIT)
            .await;
        publish(&mut rt, &session, "dash-1", 40, 80).await;
        tab.wait_until("live events", &rows_at_least(80), SHOWN, LIMIT)
            .await;

        // The token is out of the address bar; the run stays in it.
        let href: String = tab.eval("location.href").await;
        assert!(
            !href.contains(&viewer_token) && !href.contains("token="),
            "{href}"
        );
        assert!(href.ends_with("/?run=dash-1"), "{href}");

        // The run is listed with its stream's head.
        tab.wait_until(
            "the runs list",
            "[...document.querySelectorAll('#runs-table tbody tr')].some(tr => \
                tr.dataset.run === 'dash-1' && tr.cells[3].textContent === '80')",
            "document.querySelector('#runs-table').innerText",
            LIMIT,
        )
        .await;

        // Filter by type, then show everything again.
        tab.eval::<bool>(
            "(() => { const f = document.getElementById('type-filter'); f.value = 'tool.call'; \
             f.dispatchEvent(new Event('input')); return true; })()",
        )
        .await;
        tab.wait_until(
            "only tool.call rows",
            "(() => { const t = [...document.querySelectorAll('#log > .row.ev .type')].map(s => s.textContent); \
              return t.length === 26 && t.every(x => x === 'tool.call'); })()",
            SHOWN,
            LIMIT,
        )
        .await;
        tab.eval::<bool>(
            "(() => { const f = document.getElementById('type-filter'); f.value = ''; \
             f.dispatchEvent(new Event('input')); return true; })()",
        )
        .await;
        tab.wait_until("every row again", &rows_at_least(80), SHOWN, LIMIT)
            .await;

        // Pause: nothing new appears; resume: what was published meanwhile
        // follows on from the last row shown.
        tab.eval::<bool>("(document.getElementById('pause').click(), true)")
            .await;
        tab.wait_until(
            "the pause",
            "document.getElementById('run-status').dataset.state === 'paused'",
            SHOWN,
            LIMIT,
        )
        .await;
        publish(&mut rt, &session, "dash-1", 80, 90).await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        let rows: Vec<(String, u64)> = tab.eval(ROWS).await;
        assert_eq!(rows.len(), 80, "nothing is added while paused");
        tab.eval::<bool>("(document.getElementById('pause').click(), true)")
            .await;
        tab.wait_until("the tail after resume", &rows_at_least(90), SHOWN, LIMIT)
            .await;

        // What the page must end up showing: every offset once, in order,
        // per epoch, and a truncation marker (with the new epoch) wherever
        // the history changed, after that many rows.
        let first: String = tab.eval("document.querySelector('#log > .row.ev').dataset.epoch").await;
        let mut want = want_tail(&first, 0, 90);
        let mut breaks: Vec<(usize, String)> = Vec::new();

        // Restart 1: the same data directory, on the same address. Whether
        // the run's history survives is the stream engine's business (in
        // memory: a new epoch from offset 0; a durable log: the same epoch
        // and offsets); the gateway's runs list says which, and the page
        // must show the same.
        let listen = addr.to_string();
        rt.close().await;
        assert_eq!(gw.terminate().await, Some(0), "SIGTERM drains and exits 0");
        wait_for_disconnect(&tab).await;
        let gw =
            GatewayProcess::spawn(&data, &["--listen", &listen, "--lease-ttl-ms", "600000"]).await;
        assert_eq!(gw.addr, addr);
        let mut rt = Client::connect(&gw.url("/v1/runtime"), &runtime_token).await;
        let session = attach_again(&mut rt, "dash-1", 1).await;
        let (epoch, from) = head(addr, &viewer_token, "dash-1").await;
        if epoch == first {
            assert_eq!(from, 90, "a kept history keeps its offsets");
        } else {
            breaks.push((want.len(), epoch.clone()));
        }
        publish(&mut rt, &session, "dash-1", from, from + 10).await;
        want.extend(want_tail(&epoch, from, from + 10));
        wait_for_rows(&tab, &want, "the run's events after a restart").await;

        // Restart 2: a gateway with an empty data directory (the same key,
        // so tokens still work). The run's history is gone whatever the
        // engine: a new epoch, offsets from 0, marked on the page.
        rt.close().await;
        assert_eq!(gw.terminate().await, Some(0));
        wait_for_disconnect(&tab).await;
        let key_file = data.join("auth.key");
        let key_file = key_file.to_str().unwrap();
        let fresh = dir.path().join("fresh");
        let gw = GatewayProcess::spawn(
            &fresh,
            &["--listen", &listen, "--auth-key-file", key_file, "--lease-ttl-ms", "600000"],
        )
        .await;
        let mut rt = Client::connect(&gw.url("/v1/runtime"), &runtime_token).await;
        let session = attach_again(&mut rt, "dash-1", 2).await;
        let (last, from) = head(addr, &viewer_token, "dash-1").await;
        assert_ne!(last, epoch, "an empty data directory starts a new history");
        assert_eq!(from, 0);
        breaks.push((want.len(), last.clone()));
        publish(&mut rt, &session, "dash-1", 0, 30).await;
        want.extend(want_tail(&last, 0, 30));
        wait_for_rows(&tab, &want, "the new history after a lost one").await;

        // Each lost history is marked, visibly, exactly where it happened.
        let markers: Vec<Value> = tab
            .eval(
                "(() => { let rows = 0; const out = []; \
                  for (const e of document.querySelectorAll('#log > *')) { \
                    if (e.classList.contains('row')) rows++; \
                    else if (e.classList.contains('truncated')) out.push({ rows, epoch: e.dataset.epoch, \
                      visible: e.checkVisibility() && e.getBoundingClientRect().height > 0, text: e.textContent }); \
                  } return out; })()",
            )
            .await;
        let found: Vec<(usize, String)> = markers
            .iter()
            .map(|m| (m["rows"].as_u64().unwrap() as usize, m["epoch"].as_str().unwrap().to_owned()))
            .collect();
        assert_eq!(found, breaks, "truncation markers: {markers:#?}");
        for m in &markers {
            assert_eq!(m["visible"], true, "{m}");
            assert!(m["text"].as_str().unwrap().contains("Stream history replaced"), "{m}");
        }
        let counters: Value = tab
            .eval(
                "({ gaps: document.querySelectorAll('#log > .marker.gap').length, \
                    duplicates: document.getElementById('log').dataset.duplicates, \
                    truncations: document.getElementById('fact-trunc').textContent })",
            )
            .await;
        assert_eq!(
            counters,
            json!({ "gaps": 0, "duplicates": "0", "truncations": breaks.len().to_string() })
        );

        if let Some(path) = std::env::var_os("DASHBOARD_SCREENSHOT") {
            // For a person to look at: the restart, as the log shows it.
            tab.eval::<bool>(
                "(document.querySelector('#log > .marker.truncated').scrollIntoView({ block: 'center' }), true)",
            )
            .await;
            tab.screenshot(std::path::Path::new(&path))
                .await
                .expect("screenshot");
            tab.eval::<bool>("(document.getElementById('jump').click(), true)")
                .await;
        }

        // The figures come from /metrics of the new process.
        tab.wait_until(
            "the connection figure",
            "/^[0-9]+$/.test(document.querySelector('#fig-connections .value').textContent)",
            "document.querySelector('.figures').innerText",
            LIMIT,
        )
        .await;

        // Thousands of events: the log keeps the newest 2000 rows, still
        // contiguous and ending at the head.
        publish_in(&mut rt, &session, "dash-1", 30, 3030, 500).await;
        tab.wait_until(
            "the head of a burst",
            "(() => { const r = document.querySelector('#log > .row.ev:last-child'); \
              return !!r && r.dataset.offset === '3029'; })()",
            SHOWN,
            LIMIT,
        )
        .await;
        let (children, rows): (u64, Vec<(String, u64)>) = tab
            .eval(&format!("[document.getElementById('log').childElementCount, {ROWS}]"))
            .await;
        assert_eq!(children, 2000, "the DOM is capped");
        assert_eq!(rows, want_tail(&last, 1030, 3030));

        assert_eq!(tab.exceptions(), Vec::<String>::new(), "uncaught exceptions");
        rt.close().await;
        assert_eq!(gw.terminate().await, Some(0));
    })
    .await;
    chrome.close().await;
}

fn want_tail(epoch: &str, from: u64, to: u64) -> Vec<(String, u64)> {
    (from..to).map(|o| (epoch.to_owned(), o)).collect()
}

/// The run's current stream epoch and next offset, from `GET /v1/runs`.
async fn head(addr: std::net::SocketAddr, token: &str, run: &str) -> (String, u64) {
    let list = http::get_with_token(addr, "/v1/runs", token)
        .await
        .json()
        .await;
    let entry = list["runs"]
        .as_array()
        .and_then(|runs| runs.iter().find(|r| r["runId"] == run))
        .unwrap_or_else(|| panic!("{run} is listed: {list}"))
        .clone();
    (
        entry["streamEpoch"].as_str().unwrap().to_owned(),
        entry["nextOffset"].as_u64().unwrap(),
    )
}

/// Attaches `run` on a new socket after a restart: afresh, or, should the
/// gateway have kept the session across the restart, by reconnecting at
/// connection epoch `epoch`. Returns the session id.
async fn attach_again(rt: &mut Client, run: &str, epoch: u64) -> Value {
    let frame = rt
        .call(
            "runtime.attach",
            json!({ "runId": run, "runtimeInstanceId": "inst", "protocolVersion": "1", "capabilities": [] }),
        )
        .await;
    let frame = if frame["error"]["code"] == "CONFLICT" {
        rt.reattach(run, "inst", epoch, &[]).await
    } else {
        frame
    };
    assert_eq!(frame["type"], "reply", "attach {run}: {frame}");
    frame["payload"]["sessionId"].clone()
}

/// Waits until the page's socket is down (the gateway went away).
async fn wait_for_disconnect(tab: &Tab) {
    tab.wait_until(
        "the page to notice the gateway going away",
        "document.getElementById('conn').dataset.state !== 'open'",
        SHOWN,
        LIMIT,
    )
    .await;
}

/// Waits until the page shows as many event rows as `want`, then checks
/// they are exactly `want`.
async fn wait_for_rows(tab: &Tab, want: &[(String, u64)], what: &str) {
    // Reconnecting waits up to 15 s between tries, plus a cold process.
    tab.wait_until(
        what,
        &rows_at_least(want.len()),
        SHOWN,
        Duration::from_secs(60),
    )
    .await;
    let rows: Vec<(String, u64)> = tab.eval(ROWS).await;
    assert_eq!(rows, want, "{what}: every offset once, in order, per epoch");
}

//! `rungate demo` as a user runs it: it prints the dashboard URL on a line
//! of its own, its simulated runtimes publish, the URL's token reads them,
//! and SIGTERM ends it cleanly.

use std::process::Stdio;
use std::time::Duration;

use crate::harness::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn the_demo_prints_a_working_dashboard_url_and_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rungate"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--runs",
            "3",
            "--pace-ms",
            "50",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("demo"))
        .env("RUNGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn rungate demo");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("http://") {
                return line;
            }
        }
        panic!("the demo ended without printing a URL");
    })
    .await
    .expect("the URL in time");
    // `http://ADDR/?token=TOKEN`, nothing else on the line.
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, query) = rest.split_once("/?token=").expect("http://ADDR/?token=…");
    assert!(!query.is_empty() && !query.contains(' '), "{url}");
    let token = query;

    // The page's own token reads the simulated runs as they publish.
    let mut viewer = Client::connect(&format!("ws://{addr}/v1/stream"), token).await;
    let mut published = Value::Null;
    for _ in 0..100 {
        published = viewer.ok("runs.list", json!({})).await;
        let runs = published["runs"].as_array().unwrap();
        if runs.len() == 3 && runs.iter().all(|r| r["nextOffset"].as_u64() > Some(3)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let runs = published["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "{published}");
    assert_eq!(runs[0]["runId"], "demo-1");
    assert_eq!(runs[0]["state"], "attached");
    viewer
        .ok(
            "stream.resume",
            json!({ "runId": "demo-2", "fromOffset": 0 }),
        )
        .await;
    let events = viewer.push("stream.events").await;
    let first = &events["events"][0]["event"];
    assert_eq!(first["type"], "run.started", "{events}");

    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the demo stops in time")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

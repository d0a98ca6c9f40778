//! `rungate loadgen` flags for several gateway nodes: `--viewer-url` sends
//! the viewers (and only them) to another node, and `--watch-pid NAME=PID`
//! reports another process's CPU over the gateway's interval (what
//! benches/scenarios.sh uses for node B and Redis with NODES=2).

use std::time::Duration;

use rungate::config::{Config, StoreKind};
use rungate::loadgen::{LoadgenArgs, Report};

/// An in-process gateway on the memory store with a key of its own.
async fn gateway() -> (rungate::gateway::RunningGateway, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().join("data"));
    config.store = StoreKind::Memory;
    let key_file = config.auth_key_file.to_str().unwrap().to_owned();
    let gateway = rungate::gateway::start(config)
        .await
        .expect("gateway starts");
    (gateway, key_file, dir)
}

async fn run(flags: &[&str]) -> Report {
    let mut all = vec!["--quiet", "--drain-timeout", "10"];
    all.extend_from_slice(flags);
    let args = LoadgenArgs::from_flags(all).expect("flags parse");
    tokio::time::timeout(Duration::from_secs(120), rungate::loadgen::run(args))
        .await
        .expect("loadgen finishes in time")
        .expect("loadgen runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_go_to_the_viewer_url_and_watched_pids_are_reported() {
    let (a, key_a, _dir_a) = gateway().await;
    let (b, _key_b, _dir_b) = gateway().await;
    let url_a = format!("ws://{}", a.local_addr());
    let url_b = format!("ws://{}", b.local_addr());
    let me = format!("me={}", std::process::id());
    let common = [
        "--auth-key-file",
        key_a.as_str(),
        "--sessions",
        "2",
        "--viewers",
        "3",
        "--follow",
        "0",
        "--rate",
        "5",
        "--batch",
        "10",
        "--duration",
        "1",
        "--watch-pid",
        me.as_str(),
    ];

    // Viewers on A itself through --viewer-url: everything delivered.
    let flags = [&["--url", &url_a, "--viewer-url", &url_a], &common[..]].concat();
    let r = run(&flags).await;
    assert!(r.errors.is_empty(), "{r}");
    assert_eq!(r.connections.viewers_ready, 3, "{r}");
    assert!(r.events.events_accepted > 0, "{r}");
    assert_eq!(
        r.events.events_delivered,
        r.events.events_accepted * 3,
        "{r}"
    );
    let w = &r.watched["me"];
    assert_eq!(w.pid, std::process::id());
    assert!(w.cpu_secs.is_some_and(|s| s >= 0.0), "{r}");
    assert!(w.cpu_percent.is_some() && w.rss_end_kib.is_some(), "{r}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["setup"]["viewer_url"], url_a);
    assert!(json["watched"]["me"]["cpu_secs"].is_number(), "{json}");

    // Viewers on B, which does not know A's key: only they are refused,
    // so only they went there.
    let flags = [&["--url", &url_a, "--viewer-url", &url_b], &common[..]].concat();
    let r = run(&flags).await;
    assert_eq!(r.connections.sessions_attached, 2, "runtimes on A: {r}");
    assert_eq!(r.errors.get("http:401"), Some(&3), "viewers on B: {r}");
    assert_eq!(r.errors.len(), 1, "{r}");

    a.drain().await.unwrap();
    b.drain().await.unwrap();
}

#[test]
fn watch_pid_wants_name_equals_pid() {
    assert!(LoadgenArgs::from_flags(["--watch-pid", "redis=12"]).is_ok());
    for bad in ["redis", "=12", "redis=x", "redis=-1"] {
        assert!(
            LoadgenArgs::from_flags(["--watch-pid", bad]).is_err(),
            "{bad}"
        );
    }
}

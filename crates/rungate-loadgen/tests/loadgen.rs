//! `rungate loadgen` in miniature: a few sessions and viewers against an
//! in-process gateway and against the baseline server, with the report's
//! numbers checked for sense (everything attached, every accepted event
//! delivered once per viewer, no errors). The scale runs are in
//! benches/scenarios.sh; these only prove the tool counts right.

use std::time::Duration;

use rungate::config::{Config, StoreKind};
use rungate_loadgen::{Baseline, BaselineArgs, LoadgenArgs, Report};

struct Gateway {
    gateway: rungate::gateway::RunningGateway,
    key_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn gateway() -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().join("data"));
    config.store = StoreKind::Memory;
    config.heartbeat_interval = Duration::from_secs(1);
    config.lease_ttl = Duration::from_secs(30);
    let key_file = config.auth_key_file.clone();
    let gateway = rungate::gateway::start(config)
        .await
        .expect("gateway starts");
    Gateway {
        gateway,
        key_file,
        _dir: dir,
    }
}

async fn run(flags: &[&str]) -> Report {
    let mut all = vec!["--quiet", "--drain-timeout", "20"];
    all.extend_from_slice(flags);
    let args = LoadgenArgs::from_flags(all).expect("flags parse");
    tokio::time::timeout(Duration::from_secs(120), rungate_loadgen::run(args))
        .await
        .expect("loadgen finishes in time")
        .expect("loadgen runs")
}

/// What every healthy fan-out run must show.
fn assert_sane(r: &Report, sessions: u64, viewers: u64) {
    assert_eq!(r.errors.len(), 0, "no errors: {:?}\n{r}", r.errors);
    assert_eq!(r.connections.sessions_attached, sessions, "{r}");
    assert_eq!(r.connections.viewers_ready, viewers, "{r}");
    assert_eq!(r.unanswered, 0, "{r}");
    let e = &r.events;
    assert!(e.events_accepted > 0, "something was published:\n{r}");
    assert_eq!(e.events_accepted % 10, 0, "whole batches of 10:\n{r}");
    assert_eq!(e.batches_refused, 0, "{r}");
    assert_eq!(e.gaps, 0, "{r}");
    assert_eq!(e.sequence_errors, 0, "{r}");
    // Each viewer follows every run, so sees every accepted event.
    assert_eq!(e.events_delivered, e.events_accepted * viewers, "{r}");
    assert_eq!(e.deliveries_expected, e.events_delivered, "{r}");
    assert_eq!(e.publish_to_viewer.count, e.events_delivered, "{r}");
    assert!(e.publish_to_viewer.p50_us > 0, "{r}");
    let publish = &r.commands["events.publish"];
    assert_eq!(publish.count, e.batches_accepted, "{r}");
    assert!(publish.p50_us <= publish.p99_us && publish.p99_us <= publish.max_us);
    assert_eq!(r.commands["runtime.attach"].count, sessions, "{r}");
    assert_eq!(r.commands["stream.resume"].count, viewers * sessions, "{r}");
    assert!(r.connections.sessions_per_sec > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sessions_two_viewers_against_the_gateway() {
    let gw = gateway().await;
    let url = format!("ws://{}", gw.gateway.local_addr());
    let pid = std::process::id().to_string();
    let key = gw.key_file.to_str().unwrap();
    let r = run(&[
        "--url",
        &url,
        "--auth-key-file",
        key,
        "--sessions",
        "20",
        "--viewers",
        "2",
        "--follow",
        "0",
        "--rate",
        "5",
        "--batch",
        "10",
        "--event-bytes",
        "120",
        "--duration",
        "2",
        "--gateway-pid",
        &pid,
        "--label",
        "gateway",
    ])
    .await;
    assert_sane(&r, 20, 2);
    // Heartbeats every second for two seconds, each answered.
    assert!(r.commands["runtime.heartbeat"].count >= 20, "{r}");
    let g = r
        .gateway
        .as_ref()
        .expect("process figures with --gateway-pid");
    assert!(
        g.rss_end_kib.unwrap_or(0) > 0 && g.cpu_percent.is_some(),
        "{r}"
    );
    // The JSON report carries the same figures.
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["connections"]["sessions_attached"], 20);
    assert_eq!(
        json["events"]["events_delivered"],
        json["events"]["deliveries_expected"]
    );
    gw.gateway.drain().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_zero_and_sub_runs_against_the_gateway() {
    let gw = gateway().await;
    let url = format!("ws://{}", gw.gateway.local_addr());
    let key = gw.key_file.to_str().unwrap();
    // Two publishers prefill 1,000 events each; three viewers replay one
    // run each from offset 0; nothing is published after.
    let r = run(&[
        "--url",
        &url,
        "--auth-key-file",
        key,
        "--sessions",
        "2",
        "--prefill",
        "1000",
        "--viewers",
        "3",
        "--from",
        "0",
        "--duration",
        "20",
    ])
    .await;
    assert!(r.errors.is_empty(), "{r}");
    let replay = r.replay.as_ref().expect("a replay section");
    assert_eq!(replay.follows, 3, "{r}");
    assert_eq!(replay.follows_caught_up, 3, "{r}");
    assert_eq!(replay.per_viewer.count, 3, "{r}");
    assert_eq!(r.events.events_accepted, 0, "prefill is not traffic: {r}");
    assert_eq!(r.events.events_delivered, 3000, "{r}");
    assert_eq!(r.events.deliveries_expected, 3000, "{r}");
    assert_eq!(r.events.sequence_errors, 0, "{r}");
    assert!(r.events.traffic_secs < 20.0, "ends once caught up: {r}");

    // Sub-runs: 12 sessions on 3 sockets, 4 each.
    let r = run(&[
        "--url",
        &url,
        "--auth-key-file",
        key,
        "--sessions",
        "12",
        "--sessions-per-socket",
        "4",
        "--duration",
        "2.5",
    ])
    .await;
    assert!(r.errors.is_empty(), "{r}");
    assert_eq!(r.connections.runtime_sockets, 3, "{r}");
    assert_eq!(r.connections.sessions_attached, 12, "{r}");
    assert!(r.commands["runtime.heartbeat"].count >= 12, "{r}");
    gw.gateway.drain().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_load_against_the_baseline() {
    let server = Baseline::start(BaselineArgs::on("127.0.0.1:0".parse().unwrap()))
        .await
        .expect("baseline starts");
    let url = format!("ws://{}", server.local_addr());
    let r = run(&[
        "--url",
        &url,
        "--token",
        "unchecked",
        "--viewer-token",
        "unchecked",
        "--sessions",
        "20",
        "--viewers",
        "2",
        "--follow",
        "0",
        "--rate",
        "5",
        "--batch",
        "10",
        "--duration",
        "2",
        "--heartbeat-ms",
        "1000",
        "--label",
        "baseline",
    ])
    .await;
    assert_sane(&r, 20, 2);
    assert!(r.commands["runtime.heartbeat"].count >= 20, "{r}");

    // Replay from 0 on the baseline too, as fast as acknowledged.
    let r = run(&[
        "--url",
        &url,
        "--token",
        "unchecked",
        "--viewer-token",
        "unchecked",
        "--sessions",
        "1",
        "--prefill",
        "2000",
        "--viewers",
        "4",
        "--from",
        "0",
        "--duration",
        "20",
    ])
    .await;
    assert!(r.errors.is_empty(), "{r}");
    assert_eq!(r.events.events_delivered, 8000, "{r}");
    assert_eq!(r.replay.as_ref().unwrap().follows_caught_up, 4, "{r}");
    server.stop().await;
}

#[tokio::test]
async fn refuses_more_sockets_than_descriptors() {
    let args =
        LoadgenArgs::from_flags(["--token", "t", "--sessions", "100000000", "--quiet"]).unwrap();
    let err = rungate_loadgen::run(args).await.unwrap_err();
    assert!(err.to_string().contains("descriptors"), "{err}");
}

// ---------------------------------------------- several gateway nodes

/// `--viewer-url` sends the viewers (and only them) to another node, and
/// `--watch-pid NAME=PID` reports another process's CPU over the gateway's
/// interval (what benches/scenarios.sh uses for node B and Redis with
/// NODES=2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_go_to_the_viewer_url_and_watched_pids_are_reported() {
    let (a, b) = (gateway().await, gateway().await);
    let key_a = a.key_file.to_str().unwrap().to_owned();
    let url_a = format!("ws://{}", a.gateway.local_addr());
    let url_b = format!("ws://{}", b.gateway.local_addr());
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

    a.gateway.drain().await.unwrap();
    b.gateway.drain().await.unwrap();
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

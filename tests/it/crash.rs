//! `kill -9` at random moments while runtimes publish through the client
//! library, twenty times over one data directory: after every restart the
//! stream holds every acknowledged event exactly once, in order, under the
//! same `streamEpoch`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;
use parking_lot::Mutex;
use rungate::auth::{AuthKey, TokenKind};
use rungate::ids::Capability;
use rungate_client::{Event, RuntimeClient, RuntimeOptions};
use serde_json::json;

const RUNTIMES: u64 = 3;
const CRASHES: usize = 20;
/// Batches (of 5 events) a publisher sends at most per round, and the ring
/// size that keeps all of them: a fast machine must not publish past what
/// the stream keeps, or the check below would read an evicted history.
const BATCHES_PER_ROUND: u64 = 400;
const RING_EVENTS: &str = "50000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_twenty_kill_9s() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("CRASH_SEED={seed}");
    let mut rng = seed;
    let mut next_rand = move |bound: u64| {
        // xorshift: reproducible from the seed printed above.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % bound
    };

    // Acknowledged counters per runtime, and the next counter to publish.
    let acked: Arc<Mutex<BTreeMap<u64, Vec<u64>>>> = Arc::default();
    let mut next_n: BTreeMap<u64, u64> = (0..RUNTIMES).map(|k| (k, 0)).collect();
    let mut epochs: BTreeMap<u64, String> = BTreeMap::new();

    for crash in 0..CRASHES {
        let gateway = GatewayProcess::spawn(&data, &["--stream-max-events", RING_EVENTS]).await;
        let key = AuthKey::load_or_create(&data.join("auth.key")).unwrap();
        let token = mint(&key, TokenKind::Runtime, "crash-*", &Capability::ALL);
        let viewer_token = mint(&key, TokenKind::Viewer, "crash-*", &[]);

        // Everything acknowledged so far is there, once, in order.
        if crash > 0 {
            for k in 0..RUNTIMES {
                let run = format!("crash-{k}");
                let (epoch, events) =
                    read_stream(&gateway.url("/v1/stream"), &viewer_token, &run).await;
                // A run learns its epoch in the first round that had a
                // publish of it acknowledged; before that it may not exist.
                if let Some(learned) = epochs.get(&k) {
                    assert_eq!(
                        &epoch, learned,
                        "run {run}: the same history after restart {crash}"
                    );
                }
                let ns: Vec<u64> = events.iter().map(|d| d["n"].as_u64().unwrap()).collect();
                assert!(
                    ns.windows(2).all(|w| w[0] < w[1]),
                    "run {run}: in order, no duplicate: {ns:?}"
                );
                let held: std::collections::BTreeSet<u64> = ns.iter().copied().collect();
                for n in acked.lock().get(&k).into_iter().flatten() {
                    assert!(
                        held.contains(n),
                        "run {run}: acknowledged event {n} lost at crash {crash}"
                    );
                }
                // Continue after whatever was stored (acknowledged or not).
                next_n.insert(k, ns.last().map_or(0, |n| n + 1));
            }
        }

        let mut publishers = Vec::new();
        for k in 0..RUNTIMES {
            let mut options = RuntimeOptions::new(
                gateway.url("/v1/runtime"),
                &token,
                format!("crash-worker-{k}"),
            );
            // After the kill, fail fast instead of waiting for a gateway
            // that is not coming back at this address.
            options.request_timeout = Duration::from_secs(1);
            options.backoff.initial = Duration::from_millis(20);
            options.backoff.max = Duration::from_millis(200);
            let acked = acked.clone();
            let start = next_n[&k];
            publishers.push(tokio::spawn(async move {
                let client = RuntimeClient::connect(options).await.expect("connect");
                let run = format!("crash-{k}");
                // A restarted gateway on a loaded machine may answer the
                // first attach later than the 1 s request timeout: then
                // this publisher sits the round out (the wait below only
                // waits for publishers still running).
                if client.attach(&run, &["stream.resume"]).await.is_err() {
                    return;
                }
                let mut n = start;
                for _ in 0..BATCHES_PER_ROUND {
                    let batch: Vec<Event> = (n..n + 5)
                        .map(|i| Event::new("tick").data(json!({ "k": k, "n": i })))
                        .collect();
                    if client.publish(&run, batch).await.is_err() {
                        // The gateway is gone: this publisher's part is over.
                        return;
                    }
                    acked.lock().entry(k).or_default().extend(n..n + 5);
                    n += 5;
                }
            }));
        }
        // Every runtime still publishing has had a publish acknowledged in
        // this round before the kill, however slow the machine: so rounds
        // check something and the total below does not depend on speed.
        let before: Vec<usize> = (0..RUNTIMES)
            .map(|k| acked.lock().get(&k).map_or(0, Vec::len))
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while (0..RUNTIMES).any(|k| {
            !publishers[k as usize].is_finished()
                && acked.lock().get(&k).map_or(0, Vec::len) <= before[k as usize]
        }) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a runtime had nothing acknowledged for 60 s in round {crash}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Learn the epoch of each run that now has an acknowledged event
        // (not after a fixed sleep: on a loaded machine the first attach
        // may come later, and a resume before it sees no stream yet).
        for k in 0..RUNTIMES {
            if epochs.contains_key(&k) || acked.lock().get(&k).is_none_or(Vec::is_empty) {
                continue;
            }
            let run = format!("crash-{k}");
            let (epoch, _) = read_stream(&gateway.url("/v1/stream"), &viewer_token, &run).await;
            epochs.insert(k, epoch);
        }
        tokio::time::sleep(Duration::from_millis(50 + next_rand(300))).await;
        gateway.kill().await;
        for p in publishers {
            // Each ends on its first failed publish after the kill (the
            // client's request timeout bounds the wait), or had ended
            // after its last batch of the round.
            let _ = tokio::time::timeout(Duration::from_secs(60), p).await;
        }
    }
    let total: usize = acked.lock().values().map(Vec::len).sum();
    assert!(
        total > 100,
        "enough was published to mean something: {total}"
    );
}

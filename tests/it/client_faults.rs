// `rungate_client` through a fault-injecting proxy (tests/common/proxy.rs)
// that cuts, stalls and half-closes connections while a runtime publishes
// and a viewer tails: nothing published may be lost or stored twice, and
// the viewer must account for every offset. Also: the proxy itself, a
// viewer falling out of a small ring, sub-runs moving with their main run,
// an outage longer than the lease, timeouts and dropped futures under
// stalls, a refusing network, a lost attach reply, and draining.
//
// The random faults come from a seeded generator; the seed is printed, and
// `RUNGATE_FAULT_SEED=N` replays the same sequence of faults and batch
// sizes (their timing against the client still varies from run to run).
//
// The tests after "client bugs found here" reproduce bugs these tests
// found in the client; all are fixed, and they stay as regression tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::*;
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use rungate_client::{
    Backoff, ClientError, ClientEvent, ConnectionState, Event, Follower, RuntimeClient,
    RuntimeOptions, StreamItem, ViewerClient, ViewerOptions,
};
use rungate_test_support::proxy::Proxy;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

/// Events the main fault test publishes.
const EVENTS: u64 = 3000;

/// A small seeded generator (SplitMix64): the same seed, the same faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// `RUNGATE_FAULT_SEED` if set, otherwise the clock; printed either way.
fn seed(test: &str) -> u64 {
    let seed = match std::env::var("RUNGATE_FAULT_SEED") {
        Ok(s) => s.parse().expect("RUNGATE_FAULT_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!("{test}: RUNGATE_FAULT_SEED={seed}");
    seed
}

/// Awaits `fut`, failing the test if it takes longer than `limit`.
async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {limit:?}"))
}

/// A runtime client on `url` that retries quickly.
async fn runtime_at(url: String, gw: &TestGateway, runs: &str, instance: &str) -> RuntimeClient {
    let token = gw.token(TokenKind::Runtime, runs, &Capability::ALL);
    let mut options = RuntimeOptions::new(url, token, instance);
    options.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(300),
    };
    options.request_timeout = Duration::from_secs(30);
    options.connect_timeout = Duration::from_secs(5);
    within(WAIT, "runtime connects", RuntimeClient::connect(options))
        .await
        .expect("runtime connects")
}

fn viewer_at(url: String, gw: &TestGateway, runs: &str) -> ViewerClient {
    let mut options = ViewerOptions::new(url, gw.token(TokenKind::Viewer, runs, &[]));
    options.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(300),
    };
    options.connect_timeout = Duration::from_secs(5);
    ViewerClient::new(options)
}

/// Every [`ClientEvent`] of `rt` from now on, collected in the background
/// (a lagging receiver skips, which only undercounts).
fn record_events(rt: &RuntimeClient) -> (Arc<Mutex<Vec<ClientEvent>>>, JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut rx = rt.events();
    let task = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => seen.lock().unwrap().push(e),
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    };
    (seen, task)
}

/// Waits for an event matching `pred` on `rx`.
async fn wait_event(
    rx: &mut broadcast::Receiver<ClientEvent>,
    what: &str,
    pred: impl Fn(&ClientEvent) -> bool,
) -> ClientEvent {
    within(WAIT, what, async {
        loop {
            match rx.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("{what}: client gone"),
            }
        }
    })
    .await
}

/// Waits until the client says it is connected; returns the epoch.
async fn connected(rt: &RuntimeClient) -> u64 {
    let mut state = rt.state();
    let s = *within(
        WAIT,
        "client connected",
        state.wait_for(|s| matches!(s, ConnectionState::Connected { .. })),
    )
    .await
    .expect("state channel open");
    match s {
        ConnectionState::Connected { epoch } => epoch,
        other => unreachable!("{other:?}"),
    }
}

/// What a follower delivered, checked as it arrived: every offset once, in
/// order, or inside a reported gap or truncation.
#[derive(Default)]
struct Tail {
    /// The next offset owed.
    next: u64,
    /// `(offset, data.n)` of each event delivered, in delivery order.
    values: Vec<(u64, u64)>,
    /// Offsets reported missing (gaps and truncated resumes).
    missing: u64,
    resumes: u64,
    gaps: u64,
    truncations: u64,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "next {}, {} events, {} missing ({} gaps, {} truncated resumes), {} resumes",
            self.next,
            self.values.len(),
            self.missing,
            self.gaps,
            self.truncations,
            self.resumes
        )
    }
}

impl Tail {
    fn take(&mut self, item: StreamItem) {
        match item {
            StreamItem::Resumed {
                start_offset,
                truncated,
                ..
            } => {
                self.resumes += 1;
                if truncated {
                    self.truncations += 1;
                    assert!(start_offset >= self.next, "truncated backwards: {item:?}");
                    self.missing += start_offset - self.next;
                } else {
                    assert_eq!(
                        start_offset, self.next,
                        "a resume must start where delivery stopped"
                    );
                }
                self.next = start_offset;
            }
            StreamItem::Event { offset, event } => {
                assert_eq!(offset, self.next, "offset out of order or repeated");
                let n = event["data"]["n"].as_u64().expect("data.n");
                self.values.push((offset, n));
                self.next += 1;
            }
            StreamItem::Gap { from, to } => {
                assert_eq!(from, self.next, "a gap must start at the next offset owed");
                assert!(to >= from, "{item:?}");
                self.gaps += 1;
                self.missing += to - from + 1;
                self.next = to + 1;
            }
            StreamItem::Closed { .. } => panic!("the stream must not be dropped: {item:?}"),
            StreamItem::Ended { .. } => panic!("these runs never end: {item:?}"),
        }
    }
}

/// Reads `follower` until `count` offsets are accounted for.
fn tail(mut follower: Follower, count: u64) -> JoinHandle<Tail> {
    tokio::spawn(async move {
        let mut tail = Tail::default();
        while tail.next < count {
            match follower.next().await {
                Some(Ok(item)) => tail.take(item),
                Some(Err(e)) => panic!("follower failed: {e}"),
                None => panic!("follower ended at offset {}", tail.next),
            }
        }
        tail
    })
}

// ------------------------------------------------------------------ proxy

/// The proxy itself: forwards, and each fault does what it says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_forwards_cuts_stalls_half_closes_and_refuses() {
    // An echo server that also reports what it read before EOF.
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = echo.local_addr().unwrap();
    let (eof_tx, mut eof_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = echo.accept().await.unwrap();
            let eof_tx = eof_tx.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            all.extend_from_slice(&buf[..n]);
                            // Writes may fail once the proxy half-closed.
                            let _ = s.write_all(&buf[..n]).await;
                        }
                    }
                }
                let _ = eof_tx.send(all);
            });
        }
    });
    let proxy = Proxy::start(target).await;
    let echo_once = async |s: &mut TcpStream, msg: &[u8]| {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        within(WAIT, "echo", s.read_exact(&mut got)).await.unwrap();
        assert_eq!(got, msg);
    };

    // Forwarding, and a cut: the client sees a reset or EOF at once, the
    // server sees the end, and the connection's task is gone.
    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    echo_once(&mut a, b"hello").await;
    assert_eq!((proxy.accepted(), proxy.open()), (1, 1));
    proxy.cut_all().await;
    assert_eq!(proxy.open(), 0);
    let mut buf = [0u8; 16];
    let read = within(WAIT, "read after cut", a.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(
        within(WAIT, "server sees the cut", eof_rx.recv()).await,
        Some(b"hello".to_vec())
    );

    // A stall holds bytes for its duration, then lets them through.
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    echo_once(&mut b, b"warm").await;
    let started = Instant::now();
    proxy.stall(Duration::from_millis(300));
    b.write_all(b"held").await.unwrap();
    let mut got = [0u8; 4];
    within(WAIT, "echo after stall", b.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"held");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Towards the client only: the request arrives, the answer waits.
    proxy.stall_towards_client(Duration::from_secs(30));
    b.write_all(b"late").await.unwrap();
    let early = timeout(Duration::from_millis(200), b.read_exact(&mut got)).await;
    assert!(early.is_err(), "nothing comes back during the stall");
    proxy.unstall();
    within(WAIT, "echo after unstall", b.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"late");

    // A half-close: the client gets EOF, and may still send to the server.
    proxy.half_close();
    let n = within(WAIT, "EOF after half-close", b.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(n, 0);
    b.write_all(b"!").await.unwrap();
    b.shutdown().await.unwrap();
    assert_eq!(
        within(WAIT, "server reads to the end", eof_rx.recv()).await,
        Some(b"warmheldlate!".to_vec())
    );
    within(WAIT, "half-closed connection ends", async {
        while proxy.open() > 0 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // Refusing: accepted and closed, never forwarded.
    proxy.refuse(true);
    // The reset may already fail the connect.
    if let Ok(mut c) = TcpStream::connect(proxy.addr()).await {
        let read = within(WAIT, "refused connection closes", c.read(&mut buf)).await;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    assert_eq!((proxy.refused(), proxy.accepted()), (1, 2));
    proxy.refuse(false);
    let mut d = TcpStream::connect(proxy.addr()).await.unwrap();
    echo_once(&mut d, b"again").await;
    assert_eq!(proxy.accepted(), 3);
}

// --------------------------------------------------------------- the test

/// A runtime publishes thousands of events and a viewer tails them, both
/// through a proxy that cuts, stalls and half-closes at random: the stream
/// holds every event once, in order, and the viewer accounts for every
/// offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_faults_lose_nothing_and_duplicate_nothing() {
    const KEYS_IN_TURN: u64 = 100;
    let seed = seed("random_faults_lose_nothing_and_duplicate_nothing");
    let mut rng = Rng(seed);
    let gw = TestGateway::start_with(|c| {
        // Heartbeats during the faults too; a lease long enough that it
        // never runs out while the client reconnects.
        c.heartbeat_interval = Duration::from_secs(1);
        c.lease_ttl = Duration::from_secs(20);
        c.streams.max_events_per_run = 4 * EVENTS as usize;
    })
    .await;
    let proxy = Arc::new(Proxy::start(gw.addr).await);
    let run = "faults-1";

    let rt = runtime_at(proxy.url("/v1/runtime"), &gw, "faults-*", "inst-f").await;
    let initial_epoch = connected(&rt).await;
    let (events, recorder) = record_events(&rt);
    rt.attach(run, &all_caps()).await.expect("attach");

    let viewer = viewer_at(proxy.url("/v1/stream"), &gw, "faults-*");
    let tailing = tail(viewer.follow(run, Some(0)), EVENTS);
    // The runtime follows its own output too, on its own socket.
    let own = tail(rt.follow(run, Some(0)).await.expect("follow"), EVENTS);

    // Batch sizes decided up front, so the seed alone fixes them.
    let mut batches = Vec::new();
    let mut n = 0;
    while n < EVENTS {
        let size = rng.range(1, 20).min(EVENTS - n);
        batches.push(n..n + size);
        n += size;
    }
    // Pauses between publishes spread them over several seconds, so that
    // dozens of faults land while they go on.
    let pauses: Vec<u64> = batches.iter().map(|_| rng.range(0, 30)).collect();
    let publisher = {
        let rt = rt.clone();
        tokio::spawn(async move {
            for (batch, pause) in batches.into_iter().zip(pauses) {
                sleep(Duration::from_millis(pause)).await;
                let events: Vec<Event> = batch
                    .clone()
                    .map(|i| Event::new("tick").data(json!({ "n": i })))
                    .collect();
                // Each publish returns once stored, however many times the
                // socket was cut under it.
                within(
                    Duration::from_secs(60),
                    "one publish",
                    rt.publish(run, events),
                )
                .await
                .unwrap_or_else(|e| panic!("publish of {batch:?}: {e}"));
            }
        })
    };

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    // Meanwhile another task makes calls: each answer is its own, and a
    // call fails only in the ways that say "try again".
    let caller = {
        let rt = rt.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let (mut ok, mut lost) = (0u64, 0u64);
            for i in 0u64.. {
                if *stop.borrow_and_update() {
                    break;
                }
                // A hundred keys in turn, each write with a value of its
                // own: an answer from another call still shows, and the run
                // never nears max_kv_keys_per_run however fast the machine
                // loops before it is told to stop.
                let key = format!("c{}", i % KEYS_IN_TURN);
                let kv: BTreeMap<String, String> = [(key.clone(), format!("v{i}"))].into();
                loop {
                    match rt.kv_set(run, &kv).await {
                        Ok(()) => break,
                        Err(ClientError::ConnectionLost) => lost += 1,
                        Err(e) => panic!("kv.set {key}: {e}"),
                    }
                }
                loop {
                    match rt.kv_get(run, &[&key]).await {
                        Ok(got) => {
                            assert_eq!(got, kv, "kv.get {key} got another's answer");
                            ok += 1;
                            break;
                        }
                        Err(ClientError::ConnectionLost) => lost += 1,
                        Err(e) => panic!("kv.get {key}: {e}"),
                    }
                }
            }
            (ok, lost)
        })
    };
    let faults = {
        let proxy = proxy.clone();
        let mut rng = Rng(seed ^ 0x5EED);
        tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let pause = Duration::from_millis(rng.range(50, 300));
                tokio::select! {
                    _ = sleep(pause) => {}
                    _ = stop_rx.changed() => return done,
                }
                match rng.range(0, 2) {
                    0 => {
                        proxy.cut_all().await;
                        done.push("cut".to_owned());
                    }
                    1 => {
                        let ms = rng.range(50, 500);
                        proxy.stall(Duration::from_millis(ms));
                        done.push(format!("stall {ms}ms"));
                    }
                    _ => {
                        proxy.half_close();
                        done.push("half-close".to_owned());
                    }
                }
            }
        })
    };

    let started = Instant::now();
    within(Duration::from_secs(240), "every publish", publisher)
        .await
        .expect("the publisher did not panic");
    stop_tx.send(true).unwrap();
    let faults = faults.await.unwrap();
    proxy.unstall();
    let (calls, calls_lost) = within(WAIT, "the caller", caller)
        .await
        .expect("the caller's checks held");
    eprintln!(
        "published {EVENTS} events in {:?} under {} faults: {faults:?}; \
         meanwhile {calls} kv round trips, {calls_lost} calls lost with the socket",
        started.elapsed(),
        faults.len()
    );
    assert!(calls > 0);

    // The proxied viewer: every offset once, in order, or reported missing.
    let tail = within(Duration::from_secs(60), "the proxied viewer", tailing)
        .await
        .expect("the viewer's checks held");
    let own = within(Duration::from_secs(60), "the runtime's own follower", own)
        .await
        .expect("the runtime follower's checks held");
    for (who, tail) in [("viewer", &tail), ("runtime follower", &own)] {
        assert_eq!(tail.values.len() as u64 + tail.missing, EVENTS, "{who}");
        for (offset, n) in &tail.values {
            assert_eq!(offset, n, "the {who} got event {n} at offset {offset}");
        }
        eprintln!("{who}: {tail:?}");
    }

    // The stream, read straight from the gateway: each event once, in the
    // runtime's order, with rising seq.
    let direct = viewer_at(gw.url("/v1/stream"), &gw, "faults-*");
    let mut follower = direct.follow(run, Some(0));
    let first = within(WAIT, "direct resume", follower.next()).await;
    let Some(Ok(StreamItem::Resumed {
        first_offset,
        next_offset,
        truncated,
        ..
    })) = first
    else {
        panic!("resumed first: {first:?}");
    };
    assert_eq!(
        (first_offset, next_offset, truncated),
        (0, EVENTS, false),
        "the stream holds exactly the events published"
    );
    let mut last_seq = 0;
    for i in 0..EVENTS {
        let item = within(WAIT, "direct event", follower.next()).await;
        let Some(Ok(StreamItem::Event { offset, event })) = item else {
            panic!("event {i}: {item:?}");
        };
        assert_eq!(offset, i);
        assert_eq!(event["data"]["n"], i, "offset {i} holds {event}");
        let seq = event["seq"].as_u64().expect("seq");
        assert!(seq > last_seq, "seq rises: {seq} after {last_seq}");
        last_seq = seq;
    }

    // The client noticed: several reconnects, each at a higher epoch.
    let epoch = connected(&rt).await;
    rt.heartbeat(run).await.expect("still attached");
    rt.close().await;
    drop(rt);
    within(WAIT, "event recorder", recorder).await.unwrap();
    let events = events.lock().unwrap().clone();
    let epochs: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Reconnected { epoch } => Some(*epoch),
            _ => None,
        })
        .collect();
    let cuts = faults.iter().filter(|f| !f.starts_with("stall")).count();
    eprintln!(
        "{} reconnects, epoch {initial_epoch} -> {epoch}, {cuts} cuts and half-closes",
        epochs.len()
    );
    assert!(
        epochs.len() >= 3,
        "the client reconnected only {} times",
        epochs.len()
    );
    assert!(
        epochs.windows(2).all(|w| w[1] > w[0]) && epochs[0] > initial_epoch,
        "each reconnect at a higher epoch than {initial_epoch}: {epochs:?}"
    );
    assert!(
        epoch - initial_epoch >= epochs.len() as u64 && epoch >= *epochs.last().unwrap(),
        "final epoch {epoch} after reconnects at {epochs:?} from {initial_epoch}"
    );
    assert!(
        !events.iter().any(|e| matches!(
            e,
            ClientEvent::SessionExpired { .. }
                | ClientEvent::SessionSuperseded { .. }
                | ClientEvent::SessionRenewed { .. }
        )),
        "the session lived on: {events:?}"
    );
}

/// A viewer behind a stalled link falls out of a small ring: it gets a
/// `Gap`, and after a cut a truncated resume, that account exactly for
/// what it missed; what it is handed stays in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_that_falls_behind_is_told_exactly_what_it_missed() {
    const TOTAL: u64 = 3000;
    let gw = TestGateway::start_with(|c| {
        c.streams.max_events_per_run = 100;
        // Little queued per socket, so that the backlog stays in the ring.
        c.limits.outbound_queue = 1;
        c.streams.max_events_per_delivery = 10;
    })
    .await;
    let proxy = Proxy::start(gw.addr).await;
    let rt = runtime_at(gw.url("/v1/runtime"), &gw, "behind-*", "inst-v").await;
    let run = "behind-1";
    rt.attach(run, &all_caps()).await.unwrap();
    let viewer = viewer_at(proxy.url("/v1/stream"), &gw, "behind-*");
    let mut follower = viewer.follow(run, Some(0));
    let mut tail = Tail::default();
    let first = within(WAIT, "resumed", follower.next()).await;
    tail.take(first.expect("an item").expect("not refused"));

    // Padding makes the backlog outgrow the socket buffers (megabytes on
    // loopback), so the gateway's cursor stays behind while the ring moves
    // on.
    let pad = "x".repeat(8000);
    let mut n = 0;
    let mut publish = async |count: u64| {
        for _ in 0..count / 10 {
            let events = (n..n + 10)
                .map(|i| Event::new("tick").data(json!({ "n": i, "pad": pad })))
                .collect();
            rt.publish(run, events).await.expect("publish");
            n += 10;
        }
    };
    // Stalled: the gateway's cursor falls behind, then a gap.
    proxy.stall(Duration::from_secs(60));
    publish(TOTAL / 2).await;
    proxy.unstall();
    within(WAIT, "the viewer catches up", async {
        while tail.next < TOTAL / 2 {
            match follower.next().await {
                Some(Ok(item)) => tail.take(item),
                other => panic!("{other:?}"),
            }
        }
    })
    .await;
    let after_stall = tail.missing;
    eprintln!("after the stall: {tail:?}");
    assert!(
        after_stall > 0 && tail.gaps > 0,
        "the stall cost some events: {tail:?}"
    );

    // Stalled and then cut: the resume from where the viewer stopped is
    // truncated.
    proxy.stall(Duration::from_secs(60));
    publish(TOTAL / 2).await;
    proxy.cut_all().await;
    proxy.unstall();
    within(WAIT, "the viewer catches up again", async {
        while tail.next < TOTAL {
            match follower.next().await {
                Some(Ok(item)) => tail.take(item),
                other => panic!("{other:?}"),
            }
        }
    })
    .await;
    eprintln!("after the cut: {tail:?}");
    assert!(
        tail.missing > after_stall && tail.truncations > 0,
        "the cut cost some: {tail:?}"
    );
    assert_eq!(tail.values.len() as u64 + tail.missing, TOTAL);
    for (offset, n) in &tail.values {
        assert_eq!(offset, n);
    }
    assert!(tail.resumes >= 2);
    rt.close().await;
}

// --------------------------------------------------------------- sub-runs

/// A main run and two sub-runs move to each new socket together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_runs_move_with_the_main_run() {
    let gw = TestGateway::start().await;
    let proxy = Proxy::start(gw.addr).await;
    let rt = runtime_at(proxy.url("/v1/runtime"), &gw, "sub-*", "inst-s").await;
    let runs = ["sub-main", "sub-main.a", "sub-main.b"];
    let main = rt.attach(runs[0], &all_caps()).await.expect("main");
    let a = rt.attach(runs[1], &["kv.read", "kv.write"]).await.unwrap();
    let b = rt.attach(runs[2], &["kv.read", "kv.write"]).await.unwrap();
    let (events, recorder) = record_events(&rt);
    let mut rx = rt.events();

    for round in 1..=3u64 {
        proxy.cut_all().await;
        let ClientEvent::Reconnected { epoch } = wait_event(&mut rx, "reconnected", |e| {
            matches!(e, ClientEvent::Reconnected { .. })
        })
        .await
        else {
            unreachable!()
        };
        assert!(epoch > round, "epoch {epoch} in round {round}");
        for run in runs {
            within(WAIT, "heartbeat", rt.heartbeat(run))
                .await
                .unwrap_or_else(|e| panic!("round {round}: heartbeat on {run}: {e}"));
            let kv: BTreeMap<String, String> = [("round".to_owned(), round.to_string())].into();
            within(WAIT, "kv.set", rt.kv_set(run, &kv))
                .await
                .unwrap_or_else(|e| panic!("round {round}: kv.set on {run}: {e}"));
            let got = within(WAIT, "kv.get", rt.kv_get(run, &["round"]))
                .await
                .unwrap_or_else(|e| panic!("round {round}: kv.get on {run}: {e}"));
            assert_eq!(got, kv, "{run}");
        }
    }
    // The same sessions throughout, moved rather than renewed.
    let listed = rungate_test_support::http::get_with_token(
        gw.addr,
        "/v1/runs",
        &gw.token(TokenKind::Viewer, "sub-*", &[]),
    )
    .await
    .json()
    .await;
    for run in runs {
        let entry = listed["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["runId"] == run)
            .unwrap_or_else(|| panic!("{run} listed: {listed}"));
        assert_eq!(entry["state"], "attached", "{listed}");
    }
    assert!(proxy.accepted() >= 4);
    rt.close().await;
    drop((rt, rx));
    within(WAIT, "event recorder", recorder).await.unwrap();
    let events = events.lock().unwrap().clone();
    assert!(
        events.iter().all(|e| matches!(
            e,
            ClientEvent::Disconnected | ClientEvent::Reconnected { .. }
        )),
        "no session was lost or renewed: {events:?}"
    );
    // Distinct sessions for distinct runs, as attached.
    assert_ne!(main.session_id, a.session_id);
    assert_ne!(a.session_id, b.session_id);
}

/// An outage longer than the lease: the gateway expires the sessions, the
/// client attaches every run afresh when it gets through (saying so), and
/// what was published meanwhile is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_lease_renews_every_session() {
    let gw = TestGateway::start_with(|c| {
        c.heartbeat_interval = Duration::from_secs(1);
        c.lease_ttl = Duration::from_millis(2500);
    })
    .await;
    let proxy = Proxy::start(gw.addr).await;
    let rt = runtime_at(proxy.url("/v1/runtime"), &gw, "out-*", "inst-o").await;
    let runs = ["out-main", "out-main.a", "out-main.b"];
    let mut sessions = Vec::new();
    for run in runs {
        sessions.push(rt.attach(run, &all_caps()).await.unwrap().session_id);
    }
    rt.publish(runs[0], vec![Event::new("before")])
        .await
        .unwrap();
    let mut rx = rt.events();

    proxy.refuse(true);
    proxy.cut_all().await;
    let queued = {
        let rt = rt.clone();
        tokio::spawn(async move {
            for run in runs {
                rt.publish(run, vec![Event::new("during")]).await?;
            }
            Ok::<_, ClientError>(())
        })
    };
    // Well past the lease.
    sleep(Duration::from_secs(5)).await;
    proxy.refuse(false);

    let mut renewed = BTreeMap::new();
    within(WAIT, "every run renewed", async {
        while renewed.len() < runs.len() {
            match rx.recv().await {
                Ok(ClientEvent::SessionRenewed { run_id, session_id }) => {
                    renewed.insert(run_id, session_id);
                }
                Ok(
                    e
                    @ (ClientEvent::SessionExpired { .. } | ClientEvent::SessionSuperseded { .. }),
                ) => panic!("{e:?}"),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    for (run, old) in runs.iter().zip(&sessions) {
        assert_ne!(&renewed[*run], old, "{run} has a new session");
    }
    within(WAIT, "queued publishes", queued)
        .await
        .unwrap()
        .expect("stored on the new sessions");
    for run in runs {
        let kv: BTreeMap<String, String> = [("k".to_owned(), run.to_owned())].into();
        rt.kv_set(run, &kv).await.unwrap();
        assert_eq!(rt.kv_get(run, &["k"]).await.unwrap(), kv);
    }
    let mut own = rt.follow(runs[0], Some(0)).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match within(WAIT, "own stream", own.next()).await {
            Some(Ok(StreamItem::Event { event, .. })) => {
                kinds.push(event["type"].as_str().unwrap().to_owned())
            }
            Some(Ok(StreamItem::Resumed { next_offset, .. })) => assert_eq!(next_offset, 2),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(kinds, ["before", "during"]);
    rt.close().await;
}

// ------------------------------------------------- timeouts under stalls

/// Retries `call` while it times out: the timeout here is short and the
/// machine may be busy, and a timeout is an answer that says "try again".
async fn patiently<T>(
    mut call: impl AsyncFnMut() -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    let deadline = Instant::now() + WAIT;
    loop {
        match call().await {
            Err(ClientError::Timeout(_)) if Instant::now() < deadline => {}
            other => return other,
        }
    }
}

/// [`patiently`] for `kv.get` of one key, as a plain future (spawned tasks
/// need `Send`, which async closures do not always prove).
async fn kv_get_patiently(
    rt: &RuntimeClient,
    run: &str,
    key: &str,
) -> Result<BTreeMap<String, String>, ClientError> {
    let deadline = Instant::now() + WAIT;
    loop {
        match rt.kv_get(run, &[key]).await {
            Err(ClientError::Timeout(_)) if Instant::now() < deadline => {}
            other => return other,
        }
    }
}

/// A stalled link: calls time out, futures dropped meanwhile confuse
/// nothing, a publish that timed out is still stored once, and afterwards
/// the client works as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalls_time_calls_out_and_dropped_futures_mix_nothing_up() {
    let gw = TestGateway::start().await;
    let proxy = Proxy::start(gw.addr).await;
    let token = gw.token(TokenKind::Runtime, "stall-*", &Capability::ALL);
    let mut options = RuntimeOptions::new(proxy.url("/v1/runtime"), token, "inst-t");
    let short = Duration::from_millis(500);
    options.request_timeout = short;
    let rt = within(WAIT, "connect", RuntimeClient::connect(options))
        .await
        .unwrap();
    let run = "stall-1";
    rt.attach(run, &all_caps()).await.unwrap();
    let kv: BTreeMap<String, String> = (0..20)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    patiently(async || rt.kv_set(run, &kv).await).await.unwrap();

    // Stalled for (at least) a second: ended by hand once the steps below
    // are done, so a slow machine cannot end it under them.
    proxy.stall(Duration::from_secs(60));
    let started = Instant::now();
    // A publish that times out is not cancelled: it is stored once.
    let publish = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.publish(run, vec![Event::new("during-stall")]).await })
    };
    let err = rt.kv_get(run, &["k0"]).await.unwrap_err();
    assert_eq!(err, ClientError::Timeout(short));
    assert!(err.is_retryable());
    assert!(started.elapsed() >= short);
    let err = publish.await.unwrap().unwrap_err();
    assert_eq!(err, ClientError::Timeout(short));
    // Futures dropped mid-stall, at different points of their life.
    for i in 0..20u64 {
        let rt = rt.clone();
        let key = format!("k{i}");
        let _ = timeout(Duration::from_millis(i * 2), async move {
            rt.kv_get(run, &[&key]).await
        })
        .await;
    }
    sleep(Duration::from_secs(1).saturating_sub(started.elapsed())).await;
    proxy.unstall();

    // After the stall: many callers at once, each gets its own answer
    // (the late answers to the dropped calls arrive among them).
    let mut tasks = Vec::new();
    for i in 0..20usize {
        let rt = rt.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..5 {
                let key = format!("k{}", (i + round) % 20);
                let got = kv_get_patiently(&rt, run, &key)
                    .await
                    .unwrap_or_else(|e| panic!("kv.get {key}: {e}"));
                let want: BTreeMap<String, String> =
                    [(key.clone(), format!("v{}", (i + round) % 20))].into();
                assert_eq!(got, want);
            }
        }));
    }
    for t in tasks {
        within(WAIT, "callers after the stall", t).await.unwrap();
    }
    // (A timeout would not cancel it either.)
    match rt.publish(run, vec![Event::new("after-stall")]).await {
        Ok(()) | Err(ClientError::Timeout(_)) => {}
        Err(e) => panic!("publish after the stall: {e}"),
    }
    let mut follower = patiently(async || rt.follow(run, Some(0)).await)
        .await
        .unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match within(WAIT, "own stream", follower.next()).await {
            Some(Ok(StreamItem::Event { event, .. })) => {
                kinds.push(event["type"].as_str().unwrap().to_owned())
            }
            Some(Ok(StreamItem::Resumed { .. })) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(kinds, ["during-stall", "after-stall"]);
    // Nothing more: each publish was stored once.
    let more = timeout(Duration::from_millis(300), follower.next()).await;
    assert!(more.is_err(), "nothing after them: {more:?}");
    rt.close().await;
}

/// While the proxy refuses connections after a cut, the client keeps
/// trying with backoff; once it accepts again, everything queued meanwhile
/// goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_network_is_retried_until_it_recovers() {
    let gw = TestGateway::start().await;
    let proxy = Proxy::start(gw.addr).await;
    let rt = runtime_at(proxy.url("/v1/runtime"), &gw, "refuse-*", "inst-r").await;
    let run = "refuse-1";
    rt.attach(run, &all_caps()).await.unwrap();
    let mut rx = rt.events();
    proxy.refuse(true);
    proxy.cut_all().await;
    wait_event(&mut rx, "disconnected", |e| *e == ClientEvent::Disconnected).await;
    // Queued while disconnected.
    let publish = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.publish(run, vec![Event::new("queued")]).await })
    };
    within(WAIT, "several refused attempts", async {
        while proxy.refused() < 3 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(matches!(
        *rt.state().borrow(),
        ConnectionState::Reconnecting { .. }
    ));
    proxy.refuse(false);
    wait_event(&mut rx, "reconnected", |e| {
        matches!(e, ClientEvent::Reconnected { .. })
    })
    .await;
    within(WAIT, "queued publish", publish)
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(rt.kv_get(run, &["x"]).await.unwrap(), BTreeMap::new());
    rt.close().await;
}

// --------------------------------------------------------------- draining

/// A gateway drain reaches the client as `Draining`, with the delay the
/// gateway asks for; then the socket closes and the client tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_is_announced_to_the_client() {
    let mut gw = TestGateway::start_with(|c| c.reconnect_after = Duration::from_millis(300)).await;
    let rt = runtime_at(gw.url("/v1/runtime"), &gw, "drain-*", "inst-d").await;
    rt.attach("drain-1", &all_caps()).await.unwrap();
    let mut rx = rt.events();
    let drained = tokio::spawn(async move {
        gw.drain().await;
        gw
    });
    let e = wait_event(&mut rx, "draining", |e| {
        matches!(e, ClientEvent::Draining { .. })
    })
    .await;
    assert_eq!(
        e,
        ClientEvent::Draining {
            reconnect_after: Duration::from_millis(300)
        }
    );
    wait_event(&mut rx, "disconnected", |e| *e == ClientEvent::Disconnected).await;
    let _gw = within(WAIT, "drain completes", drained).await.unwrap();
    // The gateway is gone; the client keeps trying and says so.
    let mut state = rt.state();
    within(
        WAIT,
        "reconnecting",
        state.wait_for(|s| matches!(s, ConnectionState::Reconnecting { attempt } if *attempt >= 1)),
    )
    .await
    .unwrap();
    rt.close().await;
    // (`close` may return a moment before the state says so: see
    // close_returns_once_the_client_is_closed.)
    let mut state = rt.state();
    within(
        WAIT,
        "closed",
        state.wait_for(|s| *s == ConnectionState::Closed),
    )
    .await
    .unwrap();
}

// ------------------------------------------------ client bugs found here

/// The reply to a fresh attach is lost with the socket after the gateway
/// applied it. The client resends the attach on the next socket; it must
/// come back attached (the session it created is its own), not `CONFLICT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_attach_reply_does_not_make_the_run_conflict() {
    let gw = TestGateway::start().await;
    let proxy = Proxy::start(gw.addr).await;
    let rt = runtime_at(proxy.url("/v1/runtime"), &gw, "lost-*", "inst-l").await;
    proxy.stall_towards_client(Duration::from_secs(60));
    let attach = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.attach("lost-1", &all_caps()).await })
    };
    // The gateway holds the session; the reply waits in the proxy.
    let viewer = gw.token(TokenKind::Viewer, "lost-*", &[]);
    within(WAIT, "the gateway applied the attach", async {
        loop {
            let runs = rungate_test_support::http::get_with_token(gw.addr, "/v1/runs", &viewer)
                .await
                .json()
                .await;
            if runs["runs"][0]["state"] == "attached" {
                return;
            }
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    proxy.cut_all().await;
    proxy.unstall();
    let result = within(WAIT, "attach answered", attach).await.unwrap();
    let attached = result.expect("the resent attach finds the run its own");
    assert_eq!(attached.run_id, "lost-1");
    rt.kv_get("lost-1", &["x"]).await.expect("usable");
}

/// A reconnect lands on a socket the gateway upgraded just before it began
/// to drain, so the re-attach is refused with `DRAINING` (retryable). The
/// client must try again later, not forget its sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reattach_refused_while_draining_keeps_the_sessions() {
    let mut gw = TestGateway::start_with(|c| c.reconnect_after = Duration::from_secs(3)).await;
    let proxy = Proxy::start(gw.addr).await;
    let rt = runtime_at(proxy.url("/v1/runtime"), &gw, "dr-*", "inst-x").await;
    let run = "dr-1";
    rt.attach(run, &all_caps()).await.unwrap();
    let (events, recorder) = record_events(&rt);
    let mut rx = rt.events();
    // Hold the next socket's handshake answer in the proxy; the gateway
    // has upgraded it by the time the drain starts.
    proxy.stall_towards_client(Duration::from_secs(60));
    proxy.cut_all().await;
    within(WAIT, "the client reconnects", async {
        while proxy.accepted() < 2 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    sleep(Duration::from_millis(300)).await;
    let drained = tokio::spawn(async move {
        gw.drain().await;
    });
    sleep(Duration::from_millis(300)).await;
    proxy.unstall();
    wait_event(&mut rx, "draining", |e| {
        matches!(e, ClientEvent::Draining { .. })
    })
    .await;
    sleep(Duration::from_millis(300)).await;
    // A client that kept the session waits for a socket (and times out
    // here); one that forgot it answers at once.
    let result = timeout(Duration::from_secs(2), rt.heartbeat(run)).await;
    assert!(
        !matches!(result, Ok(Err(ClientError::NoSession(_)))),
        "the session was forgotten: {result:?}"
    );
    rt.close().await;
    drop((rt, rx));
    within(WAIT, "event recorder", recorder).await.unwrap();
    let events = events.lock().unwrap().clone();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ClientEvent::SessionExpired { .. })),
        "a retryable refusal is not an expiry: {events:?}"
    );
    within(Duration::from_secs(40), "drain", drained)
        .await
        .unwrap();
}

/// A link that silently stops carrying anything (a NAT that forgot the
/// flow, a pulled cable: no FIN, no RST) must be noticed: heartbeats go
/// unanswered, so the client should give the socket up and reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_socket_is_given_up() {
    let gw = TestGateway::start_with(|c| c.heartbeat_interval = Duration::from_secs(1)).await;
    let proxy = Proxy::start(gw.addr).await;
    let token = gw.token(TokenKind::Runtime, "bh-*", &Capability::ALL);
    let mut options = RuntimeOptions::new(proxy.url("/v1/runtime"), token, "inst-b");
    options.request_timeout = Duration::from_millis(500);
    let rt = RuntimeClient::connect(options).await.unwrap();
    rt.attach("bh-1", &all_caps()).await.unwrap();
    let mut rx = rt.events();
    // Nothing passes any more, on this socket or on new ones.
    proxy.stall(Duration::from_secs(120));
    let err = rt.kv_get("bh-1", &["x"]).await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout(_)));
    // Several heartbeat intervals and request timeouts later, the client
    // should have dropped the socket.
    let gave_up = timeout(Duration::from_secs(10), async {
        while !matches!(rx.recv().await, Ok(ClientEvent::Disconnected)) {}
    })
    .await;
    assert!(
        gave_up.is_ok(),
        "still {:?} on a socket that has carried nothing for 10 s",
        *rt.state().borrow()
    );
}

/// `close` promises a closed client when it returns: the state `Closed`,
/// unacknowledged publishes failed. (The driver once answered the close
/// first and only then shut down, so a caller on another thread could look
/// in between; seen in the drain test under load, tried many times here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_returns_once_the_client_is_closed() {
    let gw = TestGateway::start().await;
    let proxy = Proxy::start(gw.addr).await;
    let mut early = 0;
    for i in 0..200 {
        let rt = runtime_at(
            proxy.url("/v1/runtime"),
            &gw,
            "close-*",
            &format!("inst-{i}"),
        )
        .await;
        if i % 2 == 1 {
            // Half of them close from the reconnect loop.
            proxy.refuse(true);
            proxy.cut_all().await;
            let mut state = rt.state();
            within(
                WAIT,
                "reconnecting",
                state.wait_for(
                    |s| matches!(s, ConnectionState::Reconnecting { attempt } if *attempt >= 1),
                ),
            )
            .await
            .unwrap();
            proxy.refuse(false);
        }
        rt.close().await;
        if *rt.state().borrow() != ConnectionState::Closed {
            early += 1;
        }
    }
    assert_eq!(
        early, 0,
        "close() returned before the client was closed, {early} times in 200"
    );
}

/// An attach that timed out may have been applied: the client then holds
/// the run. Trying the attach again, as `ClientError::Timeout` invites,
/// should not fail for a run this client holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_retried_after_a_timeout_succeeds() {
    let gw = TestGateway::start().await;
    let proxy = Proxy::start(gw.addr).await;
    let token = gw.token(TokenKind::Runtime, "again-*", &Capability::ALL);
    let mut options = RuntimeOptions::new(proxy.url("/v1/runtime"), token, "inst-a");
    options.request_timeout = Duration::from_millis(300);
    let rt = RuntimeClient::connect(options).await.unwrap();
    proxy.stall_towards_client(Duration::from_secs(1));
    let err = rt.attach("again-1", &all_caps()).await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout(_)), "{err}");
    sleep(Duration::from_millis(1200)).await;
    // The late answer attached the run on this client after all.
    rt.kv_get("again-1", &["x"])
        .await
        .expect("the run is attached here");
    let again = rt.attach("again-1", &all_caps()).await;
    assert!(again.is_ok(), "attach again: {again:?}");
}

/// A client that has been idle for a while (connected, nothing attached,
/// so no heartbeats) makes a call: the socket is fine and answers at once,
/// so nothing should be given up. The silence check must count from when
/// an answer became owed, not from the last frame ever heard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_keeps_its_healthy_socket() {
    let gw = TestGateway::start().await;
    let token = gw.token(TokenKind::Runtime, "idle-*", &Capability::ALL);
    let mut options = RuntimeOptions::new(gw.url("/v1/runtime"), token, "inst-i");
    // Short next to the 21 s of silence, long enough for a durable attach
    // on a loaded machine.
    options.request_timeout = Duration::from_secs(5);
    let rt = RuntimeClient::connect(options).await.unwrap();
    let (events, recorder) = record_events(&rt);
    // Longer than any patience the client may have with a silent socket
    // (twice the default heartbeat interval of 10 s).
    sleep(Duration::from_secs(21)).await;
    rt.attach("idle-1", &all_caps()).await.expect("attach");
    rt.kv_get("idle-1", &["x"]).await.expect("kv.get");
    sleep(Duration::from_millis(300)).await;
    rt.close().await;
    drop(rt);
    within(WAIT, "event recorder", recorder).await.unwrap();
    let events = events.lock().unwrap().clone();
    assert!(
        events.is_empty(),
        "a healthy socket was given up: {events:?}"
    );
}

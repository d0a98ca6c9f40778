//! What every load task adds to while it runs: counters, latency
//! histograms and errors by code, shared by all tasks.
//!
//! Counters are atomics; histograms are HdrHistograms in microseconds,
//! one per worker thread (a thread-local shard index), merged when the
//! report is built, so recording a latency takes an uncontended lock.
//! Must not know about phases or sockets.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::time::Instant;

const SHARDS: usize = 16;
/// Largest latency recorded, µs (longer ones are clamped): 10 minutes.
const MAX_US: u64 = 600_000_000;

/// A latency histogram (µs) that many threads record into.
pub(crate) struct Latency {
    shards: Vec<Mutex<Histogram<u64>>>,
}

fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            shards: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
        }
    }
}

impl Latency {
    /// Records `count` samples of `us` microseconds.
    pub(crate) fn record_n(&self, us: u64, count: u64) {
        if count == 0 {
            return;
        }
        let us = us.clamp(1, MAX_US);
        let _ = self.shards[shard()].lock().record_n(us, count);
    }

    pub(crate) fn record(&self, us: u64) {
        self.record_n(us, 1);
    }

    /// Records the time since `since`.
    pub(crate) fn since(&self, since: Instant) {
        self.record(since.elapsed().as_micros() as u64);
    }

    /// All shards merged.
    pub(crate) fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for s in &self.shards {
            let _ = all.add(&*s.lock());
        }
        all
    }
}

/// The commands whose round trips are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Attach,
    Heartbeat,
    Publish,
    Resume,
}

impl Kind {
    pub(crate) const ALL: [Kind; 4] = [Kind::Attach, Kind::Heartbeat, Kind::Publish, Kind::Resume];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Attach => "runtime.attach",
            Kind::Heartbeat => "runtime.heartbeat",
            Kind::Publish => "events.publish",
            Kind::Resume => "stream.resume",
        }
    }
}

/// Everything the load tasks count.
#[derive(Default)]
pub(crate) struct Stats {
    /// Sockets that completed the WebSocket handshake.
    pub runtime_sockets: AtomicU64,
    pub viewer_sockets: AtomicU64,
    /// Runtime sockets that finished trying (attached all, or failed).
    pub runtime_sockets_settled: AtomicU64,
    pub viewer_sockets_settled: AtomicU64,
    pub sessions_attached: AtomicU64,
    /// Viewers whose every `stream.resume` was answered.
    pub viewers_ready: AtomicU64,
    /// Viewer sockets that ended early.
    pub viewers_failed: AtomicU64,
    /// Publishers that stopped and have no publish in flight.
    pub publishers_done: AtomicU64,
    /// Publishers done with their prefill.
    pub prefill_done: AtomicU64,
    pub batches_accepted: AtomicU64,
    pub events_accepted: AtomicU64,
    /// Publishes sent but refused (error reply).
    pub batches_refused: AtomicU64,
    /// Rate mode: ticks when the window was full, so no publish was sent.
    pub publishes_skipped: AtomicU64,
    pub frames_delivered: AtomicU64,
    pub events_delivered: AtomicU64,
    pub gaps: AtomicU64,
    pub events_missed: AtomicU64,
    /// Frames whose first offset was not the one expected next.
    pub sequence_errors: AtomicU64,
    /// (Viewer, run) pairs that reached the head seen at resume time.
    pub follows_caught_up: AtomicU64,
    /// Subscriptions answered, and the sum of their start offsets (for the
    /// number of deliveries to expect).
    pub follows_started: AtomicU64,
    pub start_offsets: AtomicU64,
    /// When the last event was delivered, µs on the loadgen clock.
    pub last_delivery_us: AtomicU64,
    /// Requests still unanswered when their socket closed.
    pub unanswered: AtomicU64,
    /// Requests sent in the traffic phase and not yet answered (or given
    /// up on): the close waits for none, so no measured round trip waits
    /// behind thousands of other sockets closing.
    pub counted_in_flight: AtomicU64,
    pub connect: Latency,
    pub rtt: [Latency; 4],
    pub publish_to_viewer: Latency,
    /// Time from a viewer's `stream.resume` to the head it named.
    pub caught_up: Latency,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub(crate) fn rtt(&self, kind: Kind) -> &Latency {
        &self.rtt[kind as usize]
    }

    /// Counts one error under `code` (a protocol error code, or a name for
    /// a transport failure such as `connect:refused`).
    pub(crate) fn error(&self, code: &str) {
        *self.errors.lock().entry(code.to_owned()).or_insert(0) += 1;
    }

    pub(crate) fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().clone()
    }

    pub(crate) fn error_count(&self) -> u64 {
        self.errors.lock().values().sum()
    }
}

/// Shorthand for relaxed atomics, which is all the counters need.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

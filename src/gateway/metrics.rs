//! Prometheus figures for `/metrics`.
//!
//! Owns the registry and the handful of instruments the rest of the gateway
//! updates: open connections by endpoint, commands by type and outcome,
//! command latency, published events, gaps, subscriptions, and refusals by
//! the limit that refused. Session
//! counts and stream totals are read from their owners at scrape time rather
//! than kept in step by hand. Must never label anything with a run
//! id, session id, token or secret: labels are closed sets.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels<const N: usize> = [(&'static str, &'static str); N];

pub struct Metrics {
    registry: Registry,
    connections: Family<Labels<1>, Gauge>,
    sessions: Family<Labels<1>, Gauge>,
    commands: Family<Labels<2>, Counter>,
    latency: Family<Labels<1>, Histogram, fn() -> Histogram>,
    events: Family<Labels<1>, Counter>,
    gaps: Counter,
    subscriptions: Family<Labels<1>, Gauge>,
    streams: Gauge,
    stream_bytes: Gauge,
    log_bytes: Gauge,
    evicted: Counter,
    refusals: Family<Labels<1>, Counter>,
    handovers: Family<Labels<1>, Counter>,
}

/// The `type` label for frames that never became a known command.
pub const UNDECODED: &str = "_undecoded";

fn latency_histogram() -> Histogram {
    // 50 µs to ~3.3 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rungate");
        let connections = Family::<Labels<1>, Gauge>::default();
        let sessions = Family::<Labels<1>, Gauge>::default();
        let commands = Family::<Labels<2>, Counter>::default();
        let latency = Family::<Labels<1>, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        registry.register("sessions", "Sessions by state", sessions.clone());
        // The crate appends `_total` to counters itself.
        registry.register(
            "commands",
            "Commands answered, by type and outcome",
            commands.clone(),
        );
        registry.register(
            "command_duration_seconds",
            "Time from a request's arrival to its answer being queued",
            latency.clone(),
        );
        let events = Family::<Labels<1>, Counter>::default();
        registry.register(
            "stream_events",
            "Published events, by outcome (stored or duplicate)",
            events.clone(),
        );
        let gaps = Counter::default();
        registry.register(
            "stream_gaps",
            "stream.gap notices sent to subscribers that fell behind",
            gaps.clone(),
        );
        let subscriptions = Family::<Labels<1>, Gauge>::default();
        registry.register(
            "stream_subscriptions",
            "Open stream subscriptions, by transport",
            subscriptions.clone(),
        );
        let streams = Gauge::default();
        registry.register("streams", "Runs with an output stream", streams.clone());
        let stream_bytes = Gauge::default();
        registry.register(
            "stream_bytes",
            "Bytes held by all output streams",
            stream_bytes.clone(),
        );
        let log_bytes = Gauge::default();
        registry.register(
            "stream_log_bytes",
            "Bytes of the output-event log on disk",
            log_bytes.clone(),
        );
        let evicted = Counter::default();
        registry.register(
            "stream_evicted_events",
            "Events evicted by per-run bounds or the global budget",
            evicted.clone(),
        );
        let refusals = Family::<Labels<1>, Counter>::default();
        registry.register(
            "limit_refusals",
            "Connections refused, sockets closed and commands refused by a limit, by limit",
            refusals.clone(),
        );
        let handovers = Family::<Labels<1>, Counter>::default();
        registry.register(
            "session_handovers",
            "Sessions moved between gateways sharing a store: lost (a socket here was superseded by another gateway) or taken_over (from a gateway that stopped)",
            handovers.clone(),
        );
        Metrics {
            registry,
            connections,
            sessions,
            commands,
            latency,
            events,
            gaps,
            subscriptions,
            streams,
            stream_bytes,
            log_bytes,
            evicted,
            refusals,
            handovers,
        }
    }
}

impl Metrics {
    pub fn connection_opened(&self, endpoint: &'static str) {
        self.connections
            .get_or_create(&[("endpoint", endpoint)])
            .inc();
    }

    pub fn connection_closed(&self, endpoint: &'static str) {
        self.connections
            .get_or_create(&[("endpoint", endpoint)])
            .dec();
    }

    /// One answered command: `outcome` is `"ok"` or an error code.
    pub fn command(&self, kind: &'static str, outcome: &'static str, seconds: f64) {
        self.commands
            .get_or_create(&[("type", kind), ("outcome", outcome)])
            .inc();
        self.latency
            .get_or_create(&[("type", kind)])
            .observe(seconds);
    }

    pub fn events_published(&self, stored: usize, duplicates: usize) {
        self.events
            .get_or_create(&[("outcome", "stored")])
            .inc_by(stored as u64);
        self.events
            .get_or_create(&[("outcome", "duplicate")])
            .inc_by(duplicates as u64);
    }

    /// Something refused or closed by the limit named `limit` (the
    /// setting's name, e.g. `max_connections`, or `origin`).
    /// `way`: `lost` or `taken_over` (see the metric's help).
    pub fn handovers(&self, way: &'static str, count: u64) {
        self.handovers.get_or_create(&[("way", way)]).inc_by(count);
    }

    pub fn refused(&self, limit: &'static str) {
        self.refusals.get_or_create(&[("limit", limit)]).inc();
    }

    pub fn gap_sent(&self) {
        self.gaps.inc();
    }

    /// A subscription opened (+1) or ended (-1) on `transport` (`websocket`
    /// or `sse`).
    pub fn subscriptions(&self, transport: &'static str, delta: i64) {
        self.subscriptions
            .get_or_create(&[("transport", transport)])
            .inc_by(delta);
    }

    /// The text exposition, with gauges read from their owners first.
    pub fn render(
        &self,
        sessions: &crate::session::Counts,
        streams: &crate::stream::StreamStats,
    ) -> String {
        self.streams.set(streams.streams as i64);
        self.stream_bytes.set(streams.bytes as i64);
        self.log_bytes.set(streams.log_bytes as i64);
        // A counter owned elsewhere: move ours up to it.
        let seen = self.evicted.get();
        if streams.evicted_events > seen {
            self.evicted.inc_by(streams.evicted_events - seen);
        }
        self.sessions
            .get_or_create(&[("state", "attached")])
            .set(sessions.attached as i64);
        self.sessions
            .get_or_create(&[("state", "detached")])
            .set(sessions.detached as i64);
        self.sessions
            .get_or_create(&[("state", "expired")])
            .set(sessions.expired as i64);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

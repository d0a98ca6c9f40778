//! Prometheus figures for `/metrics`.
//!
//! Owns the registry and the handful of instruments the rest of the gateway
//! updates: open connections by endpoint, commands by type and outcome, and
//! command latency. Session counts are read from the registry at scrape time
//! rather than kept in step by hand. Must never label anything with a run
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
        Metrics {
            registry,
            connections,
            sessions,
            commands,
            latency,
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

    /// The text exposition, with session gauges set to `sessions` first.
    pub fn render(&self, sessions: &crate::session::Counts) -> String {
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

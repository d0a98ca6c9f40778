//! The end of a run: every figure in one [`Report`], printed for people
//! ([`std::fmt::Display`]) or as JSON (`serde`), for scripts that compare
//! runs.

use std::collections::BTreeMap;
use std::fmt;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::procfs::{self, Sample};
use super::stats::{Kind, Latency, get};
use super::{Rate, Shared, Timings};

/// Latency percentiles, µs.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
        }
    }

    fn from(l: &Latency) -> Percentiles {
        Percentiles::of(&l.merged())
    }
}

/// What the run was asked to do.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub label: String,
    pub url: String,
    /// `--viewer-url`, when viewers went to another node.
    pub viewer_url: Option<String>,
    pub sessions: usize,
    pub sessions_per_socket: usize,
    pub runtime_sockets: usize,
    pub viewers: usize,
    pub follow: usize,
    pub from: Option<u64>,
    pub publishers: usize,
    /// Batches per second per publisher; `null` for as fast as acknowledged.
    pub rate: Option<f64>,
    pub window: usize,
    pub batch: usize,
    pub event_bytes: usize,
    pub prefill: u64,
    pub duration_secs: f64,
    pub sources: usize,
    pub fd_limit: u64,
    /// When the report was made, RFC 3339 UTC.
    pub finished_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Connections {
    pub runtime_sockets: u64,
    pub viewer_sockets: u64,
    pub sessions_attached: u64,
    pub viewers_ready: u64,
    /// Time to connect and attach every session.
    pub attach_secs: f64,
    /// Sessions attached per second over that time.
    pub sessions_per_sec: f64,
    /// Time to connect every viewer socket.
    pub viewers_connect_secs: f64,
    /// TCP connect + WebSocket handshake.
    pub handshake: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct Events {
    pub batches_accepted: u64,
    pub events_accepted: u64,
    pub accepted_per_sec: f64,
    pub batches_refused: u64,
    pub publishes_skipped: u64,
    pub frames_delivered: u64,
    pub events_delivered: u64,
    /// Deliveries expected: every accepted event (prefill included) once
    /// per viewer following its run, from where that viewer started.
    pub deliveries_expected: u64,
    pub delivered_per_sec: f64,
    pub gaps: u64,
    pub events_missed: u64,
    pub sequence_errors: u64,
    /// Seconds of publishing the rates are over.
    pub traffic_secs: f64,
    /// Seconds from the traffic start (or the resume storm, for a replay)
    /// to the last delivery.
    pub delivery_secs: f64,
    pub publish_to_viewer: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct Replay {
    /// (Viewer, run) pairs that reached the head named at resume.
    pub follows_caught_up: u64,
    pub follows: u64,
    /// From the resume storm to the last follow caught up.
    pub all_caught_up_secs: f64,
    /// Per follow, from its `stream.resume` to caught up.
    pub per_viewer: Percentiles,
}

/// A process's memory and CPU.
#[derive(Debug, Clone, Serialize)]
pub struct Process {
    pub pid: Option<u32>,
    pub rss_before_kib: Option<u64>,
    pub rss_attached_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    pub rss_peak_kib: Option<u64>,
    /// (RSS after attaching − RSS before) / sessions attached.
    pub rss_per_session_bytes: Option<f64>,
    /// Over the traffic phase (for a replay: from the resume storm), in
    /// percent of one core.
    pub cpu_percent: Option<f64>,
    pub threads: Option<u64>,
}

/// A process watched with `--watch-pid NAME=PID` (another gateway node,
/// the Redis server), over the gateway's interval.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Watched {
    pub pid: u32,
    /// User + system CPU seconds over the traffic phase (for a replay:
    /// from the resume storm), all threads.
    pub cpu_secs: Option<f64>,
    /// The same in percent of one core.
    pub cpu_percent: Option<f64>,
    pub rss_end_kib: Option<u64>,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was asked for: the flags that shape the run.
    pub setup: Setup,
    /// Sockets and sessions made, and how long it took.
    pub connections: Connections,
    /// Round trips by command type; for heartbeats and publishes, those
    /// sent in the traffic phase.
    pub commands: BTreeMap<&'static str, Percentiles>,
    /// Events published, delivered, missed.
    pub events: Events,
    /// How long viewers took to read a replay, when they started behind.
    pub replay: Option<Replay>,
    /// Error frames received, by code.
    pub errors: BTreeMap<String, u64>,
    /// Requests unanswered when their socket closed.
    pub unanswered: u64,
    /// The gateway's RSS and CPU, with `--gateway-pid`.
    pub gateway: Option<Process>,
    /// By the name given to `--watch-pid`.
    pub watched: BTreeMap<String, Watched>,
    /// The load generator's own RSS and CPU.
    pub loadgen: Process,
}

/// Process samples the driver took.
pub(crate) struct Samples {
    pub gateway_pid: Option<u32>,
    pub gw_before: Option<Sample>,
    pub gw_attached: Option<Sample>,
    pub gw_t0: Option<Sample>,
    pub gw_t1: Option<Sample>,
    pub self_t0: Option<Sample>,
    pub self_t1: Option<Sample>,
    /// `--watch-pid`: name, pid, samples at the gateway's t0 and t1.
    pub watched: Vec<(String, u32, Option<Sample>, Option<Sample>)>,
    pub fd_limit: u64,
}

fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        (n as f64 / secs).round()
    } else {
        0.0
    }
}

fn now_rfc3339() -> String {
    rungate_protocol::time::Timestamp::now().to_string()
}

impl Report {
    pub(crate) fn build(sh: &Shared, t: &Timings, s: &Samples) -> Report {
        let st = &sh.stats;
        let a = &sh.args;
        let setup = Setup {
            label: a.label.clone(),
            url: a.url.clone(),
            viewer_url: a.viewer_url.clone(),
            sessions: a.sessions,
            sessions_per_socket: a.sessions_per_socket,
            runtime_sockets: a.runtime_sockets(),
            viewers: a.viewers,
            follow: super::viewer::follows_per_viewer(sh),
            from: a.from.offset(),
            publishers: sh.publishers,
            rate: match a.rate {
                Rate::Off => Some(0.0),
                Rate::PerSec(r) => Some(r),
                Rate::Max => None,
            },
            window: a.window,
            batch: a.batch,
            event_bytes: a.event_bytes,
            prefill: a.prefill,
            duration_secs: a.duration,
            sources: sh.sources.len(),
            fd_limit: s.fd_limit,
            finished_at: now_rfc3339(),
        };
        let attached = get(&st.sessions_attached);
        let attach_secs = t.connect.as_secs_f64();
        let connections = Connections {
            runtime_sockets: get(&st.runtime_sockets),
            viewer_sockets: get(&st.viewer_sockets),
            sessions_attached: attached,
            viewers_ready: get(&st.viewers_ready),
            attach_secs: (attach_secs * 1000.0).round() / 1000.0,
            sessions_per_sec: per_sec(attached, attach_secs),
            viewers_connect_secs: (t.viewers_connect.as_secs_f64() * 1000.0).round() / 1000.0,
            handshake: Percentiles::from(&st.connect),
        };
        let commands = Kind::ALL
            .iter()
            .map(|k| (k.name(), Percentiles::from(st.rtt(*k))))
            .filter(|(_, p)| p.count > 0)
            .collect();
        let traffic_secs = t.traffic.as_secs_f64();
        let delivery_start = if a.from.offset().is_some() {
            t.resume_storm_start_us
        } else {
            t.traffic_start_us
        };
        let last = get(&st.last_delivery_us);
        let delivery_secs = last.saturating_sub(delivery_start) as f64 / 1e6;
        let accepted = get(&st.events_accepted);
        let delivered = get(&st.events_delivered);
        let events = Events {
            batches_accepted: get(&st.batches_accepted),
            events_accepted: accepted,
            accepted_per_sec: per_sec(accepted, traffic_secs),
            batches_refused: get(&st.batches_refused),
            publishes_skipped: get(&st.publishes_skipped),
            frames_delivered: get(&st.frames_delivered),
            events_delivered: delivered,
            deliveries_expected: sh.expected_deliveries(),
            delivered_per_sec: per_sec(delivered, delivery_secs),
            gaps: get(&st.gaps),
            events_missed: get(&st.events_missed),
            sequence_errors: get(&st.sequence_errors),
            traffic_secs: (traffic_secs * 1000.0).round() / 1000.0,
            delivery_secs: (delivery_secs * 1000.0).round() / 1000.0,
            publish_to_viewer: Percentiles::from(&st.publish_to_viewer),
        };
        let replay = a.from.offset().is_some().then(|| {
            let last = sh
                .last_caught_up_us
                .load(std::sync::atomic::Ordering::Relaxed);
            Replay {
                follows_caught_up: get(&st.follows_caught_up),
                follows: get(&st.follows_started),
                all_caught_up_secs: last.saturating_sub(t.resume_storm_start_us) as f64 / 1e6,
                per_viewer: Percentiles::from(&st.caught_up),
            }
        });
        let gateway = s.gateway_pid.map(|pid| {
            let per_session = match (s.gw_before, s.gw_attached) {
                (Some(b), Some(at)) if attached > 0 => Some(
                    ((at.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / attached as f64).round(),
                ),
                _ => None,
            };
            Process {
                pid: Some(pid),
                rss_before_kib: s.gw_before.map(|x| x.rss_kib),
                rss_attached_kib: s.gw_attached.map(|x| x.rss_kib),
                rss_end_kib: s.gw_t1.map(|x| x.rss_kib),
                rss_peak_kib: s.gw_t1.map(|x| x.peak_kib),
                rss_per_session_bytes: per_session,
                cpu_percent: match (s.gw_t0, s.gw_t1) {
                    (Some(a), Some(b)) => Some((procfs::cpu_percent(&a, &b) * 10.0).round() / 10.0),
                    _ => None,
                },
                threads: s.gw_t1.map(|x| x.threads),
            }
        });
        let me = procfs::sample("self").ok();
        let loadgen = Process {
            pid: Some(std::process::id()),
            rss_before_kib: None,
            rss_attached_kib: None,
            rss_end_kib: me.map(|x| x.rss_kib),
            rss_peak_kib: me.map(|x| x.peak_kib),
            rss_per_session_bytes: None,
            cpu_percent: match (s.self_t0, s.self_t1) {
                (Some(a), Some(b)) => Some((procfs::cpu_percent(&a, &b) * 10.0).round() / 10.0),
                _ => None,
            },
            threads: me.map(|x| x.threads),
        };
        let watched = s
            .watched
            .iter()
            .map(|(name, pid, t0, t1)| {
                let (cpu_secs, cpu_percent) = match (t0, t1) {
                    (Some(a), Some(b)) => (
                        Some(((b.cpu_secs - a.cpu_secs) * 1000.0).round() / 1000.0),
                        Some((procfs::cpu_percent(a, b) * 10.0).round() / 10.0),
                    ),
                    _ => (None, None),
                };
                let w = Watched {
                    pid: *pid,
                    cpu_secs,
                    cpu_percent,
                    rss_end_kib: t1.map(|x| x.rss_kib),
                };
                (name.clone(), w)
            })
            .collect();
        Report {
            setup,
            connections,
            commands,
            events,
            replay,
            errors: st.errors(),
            unanswered: get(&st.unanswered),
            gateway,
            watched,
            loadgen,
        }
    }

    /// Errors of every kind, in total.
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1} ms", v as f64 / 1000.0)
    } else {
        format!("{v} µs")
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.setup;
        let c = &self.connections;
        let label = if s.label.is_empty() { "" } else { " " };
        let viewers_at = match &s.viewer_url {
            Some(v) => format!(", viewers on {v}"),
            None => String::new(),
        };
        writeln!(
            f,
            "rungate loadgen{label}{} against {}{viewers_at} ({})",
            s.label, s.url, s.finished_at
        )?;
        writeln!(
            f,
            "  sessions   {} attached of {} on {} sockets ({} per socket), {} source addresses",
            c.sessions_attached, s.sessions, c.runtime_sockets, s.sessions_per_socket, s.sources
        )?;
        writeln!(
            f,
            "  connect    {:.2} s = {} sessions/s; handshake p50 {} p99 {}",
            c.attach_secs,
            c.sessions_per_sec,
            us(c.handshake.p50_us),
            us(c.handshake.p99_us)
        )?;
        if s.viewers > 0 {
            writeln!(
                f,
                "  viewers    {} ready of {} ({} runs each, from {})",
                c.viewers_ready,
                s.viewers,
                s.follow,
                s.from.map_or("live".into(), |o| o.to_string())
            )?;
        }
        writeln!(
            f,
            "  round trip {:<18} {:>9} {:>10} {:>10} {:>10} {:>10}",
            "", "count", "p50", "p99", "p99.9", "max"
        )?;
        for (name, p) in &self.commands {
            writeln!(
                f,
                "             {:<18} {:>9} {:>10} {:>10} {:>10} {:>10}",
                name,
                p.count,
                us(p.p50_us),
                us(p.p99_us),
                us(p.p999_us),
                us(p.max_us)
            )?;
        }
        let e = &self.events;
        if e.events_accepted > 0 || e.events_delivered > 0 {
            writeln!(
                f,
                "  events     accepted {} in {:.2} s = {}/s ({} batches of {} × {} B; {} refused, {} ticks skipped)",
                e.events_accepted,
                e.traffic_secs,
                e.accepted_per_sec,
                e.batches_accepted,
                s.batch,
                s.event_bytes,
                e.batches_refused,
                e.publishes_skipped
            )?;
            writeln!(
                f,
                "             delivered {} of {} expected in {:.2} s = {}/s ({} frames); gaps {} ({} events missed), sequence errors {}",
                e.events_delivered,
                e.deliveries_expected,
                e.delivery_secs,
                e.delivered_per_sec,
                e.frames_delivered,
                e.gaps,
                e.events_missed,
                e.sequence_errors
            )?;
            let l = &e.publish_to_viewer;
            if l.count > 0 {
                writeln!(
                    f,
                    "  publish→viewer p50 {} p99 {} p99.9 {} max {} ({} events)",
                    us(l.p50_us),
                    us(l.p99_us),
                    us(l.p999_us),
                    us(l.max_us),
                    l.count
                )?;
            }
        }
        if let Some(r) = &self.replay {
            writeln!(
                f,
                "  replay     {} of {} follows caught up; all in {:.3} s; per viewer p50 {} p99 {} max {}",
                r.follows_caught_up,
                r.follows,
                r.all_caught_up_secs,
                us(r.per_viewer.p50_us),
                us(r.per_viewer.p99_us),
                us(r.per_viewer.max_us)
            )?;
        }
        if self.errors.is_empty() {
            writeln!(f, "  errors     none")?;
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k} × {v}"))
                .collect();
            writeln!(f, "  errors     {}", list.join(", "))?;
        }
        if self.unanswered > 0 {
            writeln!(f, "  unanswered {} requests", self.unanswered)?;
        }
        for (name, p) in [
            ("gateway", self.gateway.as_ref()),
            ("loadgen", Some(&self.loadgen)),
        ] {
            let Some(p) = p else { continue };
            let mut parts = Vec::new();
            if let Some(pid) = p.pid {
                parts.push(format!("pid {pid}"));
            }
            if let (Some(b), Some(a)) = (p.rss_before_kib, p.rss_attached_kib) {
                parts.push(format!("RSS {} before, {} attached", mib(b), mib(a)));
            }
            if let Some(per) = p.rss_per_session_bytes {
                parts.push(format!("{:.1} KiB per session", per / 1024.0));
            }
            if let Some(end) = p.rss_end_kib {
                parts.push(format!("RSS {} at the end", mib(end)));
            }
            if let Some(peak) = p.rss_peak_kib {
                parts.push(format!("peak {}", mib(peak)));
            }
            if let Some(cpu) = p.cpu_percent {
                parts.push(format!("CPU {cpu:.0}% of a core in traffic"));
            }
            writeln!(f, "  {name:<10} {}", parts.join("; "))?;
        }
        for (name, w) in &self.watched {
            let mut parts = vec![format!("pid {}", w.pid)];
            if let Some(end) = w.rss_end_kib {
                parts.push(format!("RSS {} at the end", mib(end)));
            }
            if let (Some(secs), Some(cpu)) = (w.cpu_secs, w.cpu_percent) {
                parts.push(format!("CPU {secs:.2} s = {cpu:.0}% of a core in traffic"));
            }
            writeln!(f, "  {name:<10} {}", parts.join("; "))?;
        }
        Ok(())
    }
}

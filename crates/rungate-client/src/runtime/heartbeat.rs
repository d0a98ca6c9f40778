//! When the driver heartbeats its runs, and when it gives up a socket that
//! stays silent while answers are owed (a black-holed link sends no FIN,
//! so only silence tells).
//!
//! Owns the two clocks. Must not send or decide what a heartbeat carries:
//! the driver does.

use std::time::Duration;

use tokio::time::Instant;

/// The interval until the gateway gives one (at the first attach).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// The heartbeat schedule: none before the first attach.
#[derive(Default)]
pub(super) struct Heartbeats {
    /// When the next round is due.
    due: Option<Instant>,
    /// The interval the gateway asked for.
    every: Option<Duration>,
}

impl Heartbeats {
    pub(super) fn due(&self) -> Option<Instant> {
        self.due
    }

    pub(super) fn interval(&self) -> Duration {
        self.every.unwrap_or(DEFAULT_INTERVAL)
    }

    /// A run was attached with `interval`: the first one starts the clock.
    pub(super) fn attached(&mut self, interval: Duration) {
        if self.every.is_none() {
            self.every = Some(interval);
            self.due = Some(Instant::now() + interval);
        }
    }

    /// A round was sent: the next is one interval away.
    pub(super) fn sent(&mut self) {
        let interval = self.interval();
        self.due = self.due.map(|_| Instant::now() + interval);
    }

    /// No run is left: no more rounds, and the next attach sets the interval.
    pub(super) fn stop(&mut self) {
        self.due = None;
        self.every = None;
    }

    /// A new socket carries the sessions: a round one interval from now if
    /// any run is left.
    pub(super) fn restart(&mut self, any_runs: bool) {
        self.due = any_runs.then(|| Instant::now() + self.interval());
    }
}

/// How long the socket has said nothing.
pub(super) struct Silence {
    /// When the socket last delivered a frame.
    last_heard: Instant,
    /// When answers became owed after none were.
    owed_since: Instant,
}

impl Silence {
    pub(super) fn new() -> Silence {
        let now = Instant::now();
        Silence {
            last_heard: now,
            owed_since: now,
        }
    }

    /// The socket delivered a frame.
    pub(super) fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// The first answer owed after a quiet spell: an idle socket has said
    /// nothing because nothing was asked, so the window starts now.
    pub(super) fn owed(&mut self) {
        self.owed_since = Instant::now();
    }

    /// When to give the socket up if it stays silent: `patience` after it
    /// last spoke or answers became owed. `None` while nothing is owed.
    pub(super) fn deadline(&self, owed: bool, patience: Duration) -> Option<Instant> {
        owed.then(|| self.last_heard.max(self.owed_since) + patience)
    }
}

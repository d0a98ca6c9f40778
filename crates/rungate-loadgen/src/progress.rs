//! The live view on stderr: an indicatif spinner line refreshed four
//! times a second while a person watches; one line per phase when stderr
//! is not a terminal (logs of scripted runs); nothing with `--quiet`.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;

use super::stats::get;
use super::{Phase, Shared};

pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    ticker: Option<JoinHandle<()>>,
    /// Phase lines without a bar.
    lines: bool,
}

impl Progress {
    pub(crate) fn start(sh: Arc<Shared>, quiet: bool) -> Progress {
        if quiet {
            return Progress {
                bar: None,
                ticker: None,
                lines: false,
            };
        }
        if !std::io::stderr().is_terminal() {
            return Progress {
                bar: None,
                ticker: None,
                lines: true,
            };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4));
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>4} {prefix:8} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        let b = bar.clone();
        let ticker = tokio::spawn(async move {
            let mut last = (0u64, 0u64);
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let s = &sh.stats;
                let (acc, dlv) = (get(&s.events_accepted), get(&s.events_delivered));
                b.set_message(format!(
                    "sockets {}+{} sessions {} viewers {} | accepted {} ({}/s) delivered {} ({}/s) gaps {} | errors {}",
                    get(&s.runtime_sockets),
                    get(&s.viewer_sockets),
                    get(&s.sessions_attached),
                    get(&s.viewers_ready),
                    acc,
                    (acc - last.0) * 4,
                    dlv,
                    (dlv - last.1) * 4,
                    get(&s.gaps),
                    s.error_count(),
                ));
                b.tick();
                last = (acc, dlv);
            }
        });
        Progress {
            bar: Some(bar),
            ticker: Some(ticker),
            lines: false,
        }
    }

    /// A new phase begins.
    pub(crate) fn phase(&self, phase: Phase, what: &str) {
        let name = format!("{phase:?}").to_lowercase();
        if let Some(bar) = &self.bar {
            bar.set_prefix(name);
        } else if self.lines {
            eprintln!("loadgen: {name}: {what}");
        }
    }

    /// A line worth keeping above the bar.
    pub(crate) fn note(&self, line: &str) {
        if let Some(bar) = &self.bar {
            bar.println(line);
        } else if self.lines {
            eprintln!("loadgen: {line}");
        }
    }

    pub(crate) fn finish(self) {
        if let Some(t) = &self.ticker {
            t.abort();
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

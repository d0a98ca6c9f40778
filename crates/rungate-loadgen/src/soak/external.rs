//! Soak runtimes written with the other client libraries: one child process
//! per runtime, running `clients/typescript/soak/runtime.mjs` (under
//! `node`) or `clients/python/tools/soak_runtime.py` (under Python), each
//! holding one run of its own through the runtimes' fault proxy.
//!
//! The program publishes `{"p", "n", "f": false}` events like the Rust
//! runtimes and prints one line per outcome on stdout: `ack FIRST LAST
//! MICROS` (the gateway stored counters `FIRST..=LAST`), `error KIND`,
//! `reattach`. Each `ack` goes into the [`Ledger`](super::Ledger); a line
//! that is none of these, an exit before the soak asked, or a stop that
//! takes longer than [`STOP_LIMIT`] is a failure of the soak. Stderr goes
//! to `runtime-<label>.log` in the work directory.
//!
//! Owns starting, reading and stopping those processes. Must not judge the
//! events (the checker does) or retry for the program (its client's own
//! reconnects and resends are what is under test). These runtimes are
//! never taken over.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

use super::gateway::sigterm;
use super::load::{Ctx, bump};

/// How long a runtime program gets, after `SIGTERM`, to finish its last
/// publish and exit (it waits up to 15 s for the publish, 5 s for close).
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// Which client library a runtime program is written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lang {
    TypeScript,
    Python,
}

impl Lang {
    /// The short name runs and labels carry: `ts`, `py`.
    pub(crate) fn short(self) -> &'static str {
        match self {
            Lang::TypeScript => "ts",
            Lang::Python => "py",
        }
    }
}

/// How to start one language's runtime program.
#[derive(Debug, Clone)]
pub(crate) struct Program {
    pub(crate) lang: Lang,
    /// `node`, or a Python interpreter.
    pub(crate) interpreter: PathBuf,
    /// The program file.
    pub(crate) script: PathBuf,
    /// Extra environment (`PYTHONPATH` for the Python client's sources).
    pub(crate) env: Vec<(String, String)>,
    /// Where stderr logs go.
    pub(crate) log_dir: PathBuf,
}

impl Program {
    /// The TypeScript program of the client in `dir`, which must be built.
    pub(crate) fn typescript(node: PathBuf, dir: &Path, log_dir: &Path) -> anyhow::Result<Program> {
        let script = dir.join("soak/runtime.mjs");
        anyhow::ensure!(script.is_file(), "no {}", script.display());
        anyhow::ensure!(
            dir.join("dist/index.js").is_file(),
            "the TypeScript client in {} is not built (npm ci && npm run build there)",
            dir.display()
        );
        Ok(Program {
            lang: Lang::TypeScript,
            interpreter: node,
            script,
            env: Vec::new(),
            log_dir: log_dir.to_owned(),
        })
    }

    /// The Python program of the client in `dir`, under `python` (default:
    /// the client's `.venv`, made by its test.sh, else `python3`). The
    /// package's sources go on `PYTHONPATH`, so any interpreter with
    /// `websockets` installed will do.
    pub(crate) fn python(
        python: Option<PathBuf>,
        dir: &Path,
        log_dir: &Path,
    ) -> anyhow::Result<Program> {
        let script = dir.join("tools/soak_runtime.py");
        anyhow::ensure!(script.is_file(), "no {}", script.display());
        let venv = dir.join(".venv/bin/python");
        let interpreter = python.unwrap_or_else(|| {
            if venv.is_file() {
                venv
            } else {
                PathBuf::from("python3")
            }
        });
        let mut path = dir.join("src").display().to_string();
        if let Ok(old) = std::env::var("PYTHONPATH")
            && !old.is_empty()
        {
            path = format!("{path}:{old}");
        }
        Ok(Program {
            lang: Lang::Python,
            interpreter,
            script,
            env: vec![("PYTHONPATH".to_owned(), path)],
            log_dir: log_dir.to_owned(),
        })
    }
}

/// One line of a runtime program's stdout.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Ack { first: u64, last: u64, micros: u64 },
    Error(String),
    Reattach,
}

fn parse_line(line: &str) -> Option<Line> {
    let mut words = line.split_whitespace();
    match words.next()? {
        "ack" => {
            let mut num = || words.next()?.parse::<u64>().ok();
            let (first, last, micros) = (num()?, num()?, num()?);
            (first >= 1 && first <= last).then_some(Line::Ack {
                first,
                last,
                micros,
            })
        }
        "error" => Some(Line::Error(
            line.trim_start()["error".len()..].trim().to_owned(),
        )),
        "reattach" => Some(Line::Reattach),
        _ => None,
    }
}

/// One runtime program holding `slot`'s run until the load stops; `label`
/// names it in the report (`ts-0`).
pub(crate) async fn runtime_process(ctx: Arc<Ctx>, slot: usize, program: Arc<Program>) {
    let label = format!("{}-{}", program.lang.short(), slot);
    if let Err(e) = drive(&ctx, slot, &program, &label).await {
        ctx.stats
            .lock()
            .runtime_failures
            .push(format!("{label}: {e:#}"));
    }
}

async fn drive(ctx: &Ctx, slot: usize, program: &Program, label: &str) -> anyhow::Result<()> {
    let p = ctx
        .next_publisher
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    ctx.stats.lock().client_acked.insert(label.to_owned(), 0);
    let log = program.log_dir.join(format!("runtime-{label}.log"));
    let mut child = Command::new(&program.interpreter)
        .arg(&program.script)
        .args(["--url", &ctx.url_base])
        .args(["--run", &ctx.runs[slot]])
        .args(["--p", &p.to_string()])
        .args(["--rate", &ctx.rate.to_string()])
        .args(["--batch", &ctx.batch.to_string()])
        .args(["--pad-bytes", &ctx.pad.len().to_string()])
        .args(["--instance", &format!("soak-{label}")])
        .env("RUNGATE_TOKEN", &ctx.runtime_token)
        .envs(program.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(File::create(&log)?))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {}: {e}", program.interpreter.display()))?;
    // Held open until the stop: its closing is the program's second way of
    // learning that the soak is over (or gone).
    let mut stdin = child.stdin.take();
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout pipe"))?;
    let mut lines = BufReader::new(stdout).lines();
    let mut stop_by: Option<Instant> = None;
    loop {
        let line = if let Some(deadline) = stop_by {
            match tokio::time::timeout_at(deadline, lines.next_line()).await {
                Ok(l) => l?,
                Err(_) => {
                    child.kill().await?;
                    anyhow::bail!(
                        "did not stop within {} s of SIGTERM; see {}",
                        STOP_LIMIT.as_secs(),
                        log.display()
                    );
                }
            }
        } else {
            tokio::select! {
                l = lines.next_line() => l?,
                _ = ctx.stop_load.cancelled() => {
                    sigterm(&child);
                    drop(stdin.take());
                    stop_by = Some(Instant::now() + STOP_LIMIT);
                    continue;
                }
            }
        };
        let Some(line) = line else { break };
        record(ctx, slot, p, program.lang, label, &line)?;
    }
    let status = tokio::time::timeout(STOP_LIMIT, child.wait()).await;
    let status = match status {
        Ok(s) => s?,
        Err(_) => {
            child.kill().await?;
            anyhow::bail!("closed its stdout but did not exit; see {}", log.display());
        }
    };
    anyhow::ensure!(
        stop_by.is_some(),
        "exited before the soak asked ({status}); see {}",
        log.display()
    );
    anyhow::ensure!(
        status.success(),
        "exited with {status} when stopped; see {}",
        log.display()
    );
    Ok(())
}

/// Books one line of the program's record.
fn record(
    ctx: &Ctx,
    slot: usize,
    p: u64,
    lang: Lang,
    label: &str,
    line: &str,
) -> anyhow::Result<()> {
    let Some(parsed) = parse_line(line) else {
        anyhow::bail!("a line that is not the soak's: {line:?}");
    };
    match parsed {
        Line::Ack {
            first,
            last,
            micros,
        } => {
            ctx.ledger.acked(slot, p, first, last);
            let mut s = ctx.stats.lock();
            s.round_trip(Duration::from_micros(micros));
            s.events_sent += last - first + 1;
            s.publishes_ok += 1;
            *s.client_acked.entry(label.to_owned()).or_insert(0) += last - first + 1;
        }
        Line::Error(kind) => bump(
            &mut ctx.stats.lock().publish_errors,
            format!("{} {kind}", lang.short()),
        ),
        Line::Reattach => ctx.stats.lock().reattaches += 1,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_the_record_parse_and_others_do_not() {
        assert_eq!(
            parse_line("ack 3 5 1200"),
            Some(Line::Ack {
                first: 3,
                last: 5,
                micros: 1200
            })
        );
        assert_eq!(
            parse_line("error publish: STALE_EPOCH"),
            Some(Line::Error("publish: STALE_EPOCH".to_owned()))
        );
        assert_eq!(parse_line("reattach"), Some(Line::Reattach));
        for bad in ["", "ack", "ack 5 3 1", "ack 0 2 1", "ack 1 x 1", "hello"] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
    }
}

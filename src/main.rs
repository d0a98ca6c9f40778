//! The `rungate` command: a thin shell over the library.
//!
//! `serve` runs the gateway until SIGTERM or Ctrl-C, then drains; `token`
//! mints a token. Everything else lives in the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rungate::auth::{AuthKey, RunScope, TokenKind, parse_ttl};
use rungate::config::ServeArgs;
use rungate::ids::{Capabilities, Capability};

#[derive(Parser)]
#[command(
    name = "rungate",
    version,
    about = "WebSocket session gateway for long-lived agent runtimes"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway (embedded store under --data-dir by default).
    Serve(Box<ServeArgs>),
    /// Print a token, alone on one line.
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The HMAC key file the gateway uses (created if missing).
    #[arg(
        long,
        env = "RUNGATE_AUTH_KEY_FILE",
        default_value = "rungate-data/auth.key"
    )]
    auth_key_file: PathBuf,
    /// Who the token is for.
    #[arg(long, value_parser = parse_kind)]
    kind: TokenKind,
    /// Runs it covers: exact ids or prefixes ending in `*`, comma-separated.
    #[arg(long)]
    runs: String,
    /// Capabilities it allows, comma-separated (runtime tokens).
    #[arg(long, default_value = "")]
    caps: String,
    /// Lifetime: 90s, 30m, 1h, 7d.
    #[arg(long, default_value = "1h")]
    ttl: String,
}

fn parse_kind(s: &str) -> Result<TokenKind, String> {
    match s {
        "runtime" => Ok(TokenKind::Runtime),
        "viewer" => Ok(TokenKind::Viewer),
        _ => Err("expected runtime or viewer".into()),
    }
}

fn parse_caps(s: &str) -> anyhow::Result<Capabilities> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            Capability::parse(c).with_context(|| {
                let known: Vec<&str> = Capability::ALL.iter().map(|c| c.as_str()).collect();
                format!("unknown capability {c:?}; known: {}", known.join(", "))
            })
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Token(args) => {
            let key = AuthKey::load_or_create(&args.auth_key_file)?;
            let runs = RunScope::parse_list(&args.runs)?;
            let caps = parse_caps(&args.caps)?;
            let ttl = parse_ttl(&args.ttl)?;
            println!("{}", key.mint(args.kind, &runs, caps, ttl)?);
            Ok(())
        }
        Cmd::Serve(args) => {
            init_tracing();
            let config = args.into_config()?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(serve(config))
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RUNGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, not for log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

async fn serve(config: rungate::config::Config) -> anyhow::Result<()> {
    let gateway = rungate::gateway::start(config).await?;
    // The address on stdout, so scripts (and tests) using port 0 find it.
    println!("listening on {}", gateway.local_addr());
    shutdown_signal().await?;
    gateway
        .drain()
        .await
        .context("flushing the store while draining")?;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => {}
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}

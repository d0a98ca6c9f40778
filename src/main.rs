//! The `rungate` command: a thin shell over the library.
//!
//! `serve` runs the gateway until SIGTERM or Ctrl-C, then drains; `token`
//! mints a token; `demo` runs the gateway with simulated runtimes and
//! prints the dashboard's address. The load generator and its baseline
//! server are their own binary, `rungate-loadgen` (crates/rungate-loadgen).
//! Everything else lives in the library.

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
    /// Run the gateway with simulated runtimes and print the dashboard URL.
    Demo(Box<DemoArgs>),
}

#[derive(clap::Args)]
struct DemoArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Simulated runtimes, each publishing to its own run (demo-1, demo-2, …).
    #[arg(long, default_value_t = 4)]
    runs: u32,
    /// Time between a runtime's steps, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pace_ms: u64,
    /// Steps in one simulated run before it starts over.
    #[arg(long, default_value_t = 200)]
    steps: u64,
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
    /// Tenant whose quotas it spends (its `sub` claim); without it, tokens
    /// with the same runs share one quota.
    #[arg(long)]
    tenant: Option<String>,
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
            Capability::parse_any(c).with_context(|| {
                let known: Vec<&str> = Capability::ALL
                    .iter()
                    .chain(&Capability::VIEWER)
                    .map(|c| c.as_str())
                    .collect();
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
            let token = key.mint_for_tenant(args.kind, &runs, caps, ttl, args.tenant.as_deref())?;
            println!("{token}");
            Ok(())
        }
        Cmd::Serve(args) => {
            init_tracing();
            let config = args.into_config()?;
            runtime()?.block_on(serve(config))
        }
        Cmd::Demo(args) => {
            init_tracing();
            runtime()?.block_on(demo(*args))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let mut serve = args.serve;
    // The demo keeps its state apart from a real gateway's.
    serve.data_dir = serve
        .data_dir
        .or_else(|| Some(PathBuf::from("rungate-demo-data")));
    let config = serve.into_config()?;
    let gateway = rungate::gateway::start(config).await?;
    let addr = gateway.local_addr();
    let day = std::time::Duration::from_secs(86_400);
    let runs = RunScope::parse_list("demo-*")?;
    let caps: Capabilities = [
        Capability::KvRead,
        Capability::KvWrite,
        Capability::CheckpointSave,
        Capability::CheckpointLoad,
    ]
    .into_iter()
    .collect();
    let runtime_token = gateway
        .auth_key()
        .mint(TokenKind::Runtime, &runs, caps, day)?;
    let viewer_token =
        gateway
            .auth_key()
            .mint(TokenKind::Viewer, &runs, Capabilities::default(), day)?;

    let stop = tokio_util::sync::CancellationToken::new();
    let mut simulations = tokio::task::JoinSet::new();
    for n in 1..=args.runs {
        let (url, token, stop) = (
            format!("ws://{addr}/v1/runtime"),
            runtime_token.clone(),
            stop.clone(),
        );
        let pace = std::time::Duration::from_millis(args.pace_ms.max(10));
        let steps = args.steps.max(1);
        simulations.spawn(async move {
            let run = format!("demo-{n}");
            // A simulated runtime that fails (the gateway draining, say)
            // starts again, as a supervisor would restart a worker.
            while !stop.is_cancelled() {
                let outcome = rungate::demo::simulate_run(
                    url.clone(),
                    token.clone(),
                    run.clone(),
                    pace,
                    steps,
                    stop.clone(),
                )
                .await;
                if let Err(e) = outcome {
                    tracing::warn!(run = %run, error = %e, "simulated runtime stopped; restarting");
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
            }
        });
    }
    println!(
        "rungate demo: {} simulated runtimes publishing to demo-1..demo-{}",
        args.runs, args.runs
    );
    println!("open the dashboard:");
    println!("http://{addr}/?token={viewer_token}");
    println!("or tail a run: curl -N 'http://{addr}/v1/runs/demo-1/events?token={viewer_token}'");
    shutdown_signal().await?;
    stop.cancel();
    while simulations.join_next().await.is_some() {}
    gateway
        .drain()
        .await
        .context("flushing the store while draining")?;
    Ok(())
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RUNGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Whatever RUNGATE_LOG says, never the WebSocket library's own debug
    // and trace lines (they reach tracing through its `log` bridge): they
    // print every frame, secrets.get replies included, and client
    // handshake requests, tokens included.
    let filter = ["tungstenite=info", "tokio_tungstenite=info"]
        .into_iter()
        .filter_map(|d| d.parse().ok())
        .fold(filter, |f, d| f.add_directive(d));
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

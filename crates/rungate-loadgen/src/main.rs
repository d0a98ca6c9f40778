//! The `rungate-loadgen` command: `run` drives sessions and viewers against
//! a gateway and prints a report; `baseline` serves the bare WebSocket
//! echo/broadcast server the gateway is measured against; `soak` runs the
//! gateway under load and faults and checks what it delivered. A thin shell over
//! the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use rungate_loadgen::{Baseline, BaselineArgs, LoadgenArgs};

#[derive(Parser)]
#[command(
    name = "rungate-loadgen",
    version,
    about = "Load generator for rungate and the bare baseline server"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Drive sessions and viewers against a gateway and report on it.
    Run(Box<LoadgenArgs>),
    /// Serve the bare WebSocket echo/broadcast baseline.
    Baseline(BaselineArgs),
    /// Start a gateway, load it through a fault proxy while killing and
    /// draining it, and check nothing acknowledged was lost or duplicated.
    Soak(Box<rungate_loadgen::soak::SoakArgs>),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Cmd::Run(args) => {
            let json = args.json;
            let report = runtime.block_on(rungate_loadgen::run(*args))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(())
        }
        Cmd::Soak(args) => {
            let json = args.json;
            let report = runtime.block_on(rungate_loadgen::soak::soak(*args))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            if !report.passed() {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Baseline(args) => runtime.block_on(async {
            let server = Baseline::start(args).await?;
            println!("listening on {}", server.local_addr());
            shutdown_signal().await?;
            server.stop().await;
            Ok(())
        }),
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
    }
    Ok(())
}

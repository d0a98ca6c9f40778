//! A worker built on `rungate_client::RuntimeClient`: it attaches its run,
//! reads its config and secrets, keeps its progress in KV, checkpoints, and
//! publishes events steadily. Cut its network or restart the gateway: it
//! reconnects, keeps its session, and nothing it published is lost or
//! doubled.
//!
//! ```text
//! cargo run --release -- serve &
//! TOKEN=$(cargo run --release -q -- token --kind runtime --runs 'demo-*' \
//!   --caps secrets.read,kv.read,kv.write,checkpoint.save,checkpoint.load)
//! cargo run --example runtime -- --token "$TOKEN" --run demo-1
//! ```
//!
//! Options: `--url` (default `ws://127.0.0.1:7700/v1/runtime`), `--token`,
//! `--run`, `--every-ms` (default 500), `--count` (events; default: until
//! Ctrl-C), `--finish` (end the run when done: `completed` after `--count`
//! events, `cancelled` when a viewer asks it to stop with `run.cancel`;
//! without it the run stays open, so another worker can carry it on).

use std::collections::BTreeMap;
use std::error::Error;
use std::time::Duration;

use rungate_client::{ClientEvent, Event, RunOutcome, RuntimeClient, RuntimeOptions};
use serde_json::json;

struct Args {
    url: String,
    token: String,
    run: String,
    every: Duration,
    count: Option<u64>,
    finish: bool,
}

fn args() -> Result<Args, Box<dyn Error>> {
    let mut a = Args {
        url: "ws://127.0.0.1:7700/v1/runtime".into(),
        token: String::new(),
        run: String::new(),
        every: Duration::from_millis(500),
        count: None,
        finish: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--finish" {
            a.finish = true;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => a.url = value,
            "--token" => a.token = value,
            "--run" => a.run = value,
            "--every-ms" => a.every = Duration::from_millis(value.parse()?),
            "--count" => a.count = Some(value.parse()?),
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    if a.token.is_empty() || a.run.is_empty() {
        return Err(
            "usage: runtime --token TOKEN --run RUN [--url URL] [--every-ms N] [--count N] [--finish]"
                .into(),
        );
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = args()?;
    // Stable across restarts of this worker, so a restarted worker takes
    // its run's session over (the client's epochs only grow).
    let instance = format!("example-worker-{}", args.run);
    let client =
        RuntimeClient::connect(RuntimeOptions::new(&args.url, &args.token, instance)).await?;

    // Tell the operator what the connection is doing.
    let mut events = client.events();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            match event {
                ClientEvent::Disconnected => eprintln!("[connection lost; reconnecting]"),
                ClientEvent::Reconnected { epoch } => eprintln!("[reconnected at epoch {epoch}]"),
                other => eprintln!("[{other:?}]"),
            }
        }
    });

    let run = args.run.as_str();
    let attached = client
        .attach(
            run,
            &[
                "secrets.read",
                "kv.read",
                "kv.write",
                "checkpoint.save",
                "checkpoint.load",
            ],
        )
        .await?;
    println!("attached {run}: session {}", attached.session_id);
    println!(
        "config: {}",
        serde_json::Value::Object(client.config(run).await?)
    );
    let secrets = client.secrets(run, None).await?;
    // Never print secret values; their names are fine.
    println!(
        "secrets available: {:?}",
        secrets.keys().collect::<Vec<_>>()
    );

    // Progress survives restarts of this worker: it lives in KV.
    let mut done: u64 = client
        .kv_get(run, &["done"])
        .await?
        .get("done")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if done > 0 {
        let cp = client.checkpoint_load(run, None).await?;
        println!(
            "resuming after {done} events; last checkpoint {} = {}",
            cp.checkpoint_id, cp.data
        );
    }

    let mut tick = tokio::time::interval(args.every);
    let mut stops = client.cancel_requests();
    let mut outcome = RunOutcome::Completed;
    while args.count.is_none_or(|c| done < c) {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            Ok(stop) = stops.recv() => {
                println!("a viewer asked to stop: {}", stop.reason.as_deref().unwrap_or("no reason given"));
                outcome = RunOutcome::Cancelled;
                break;
            }
            _ = tick.tick() => {}
        }
        done += 1;
        client
            .publish(
                run,
                vec![
                    Event::new("log").data(json!({ "message": format!("working on item {done}") })),
                    Event::new("progress").data(json!({ "done": done })),
                ],
            )
            .await?;
        let kv: BTreeMap<String, String> = [("done".to_owned(), done.to_string())].into();
        client.kv_set(run, &kv).await?;
        if done.is_multiple_of(20) {
            let id = client
                .checkpoint_save(run, None, &json!({ "done": done }))
                .await?;
            println!("checkpoint {id} at {done}");
        }
    }
    println!("published {done} steps");
    if args.finish {
        let head = client
            .finish(run, outcome, Some(&format!("{done} steps")))
            .await?;
        println!("finished {run}: {outcome} after {head} events");
    }
    client.close().await;
    Ok(())
}

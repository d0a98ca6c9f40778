//! Tails a run's output to the terminal with `rungate_client::ViewerClient`,
//! surviving disconnects and gateway restarts: it resumes from the last
//! offset it printed and says so when history was lost.
//!
//! ```text
//! VIEW=$(cargo run --release -q -- token --kind viewer --runs 'demo-*')
//! cargo run --example tail -- --token "$VIEW" --run demo-1 --from 0
//! ```
//!
//! Options: `--url` (default `ws://127.0.0.1:7700/v1/stream`), `--token`,
//! `--run`, `--from` (an offset; default: live from now), `--count` (stop
//! after this many events).

use std::error::Error;

use rungate_client::{StreamItem, ViewerClient, ViewerOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut url = "ws://127.0.0.1:7700/v1/stream".to_owned();
    let (mut token, mut run, mut from, mut count) = (String::new(), String::new(), None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => url = value,
            "--token" => token = value,
            "--run" => run = value,
            "--from" => from = Some(value.parse::<u64>()?),
            "--count" => count = Some(value.parse::<u64>()?),
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    if token.is_empty() || run.is_empty() {
        return Err(
            "usage: tail --token TOKEN --run RUN [--url URL] [--from N] [--count N]".into(),
        );
    }

    let viewer = ViewerClient::new(ViewerOptions::new(url, token));
    let mut follower = viewer.follow(&run, from);
    let mut shown = 0u64;
    while count.is_none_or(|c| shown < c) {
        let item = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            item = follower.next() => item,
        };
        match item {
            None => break,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(StreamItem::Ended {
                outcome, message, ..
            })) => {
                eprintln!(
                    "-- the run ended: {outcome}{}",
                    message.map(|m| format!(" ({m})")).unwrap_or_default()
                );
                break;
            }
            Some(Ok(StreamItem::Event { offset, event })) => {
                shown += 1;
                let kind = event["type"].as_str().unwrap_or("?");
                println!(
                    "{offset:>8}  {kind:<12} {}",
                    event.get("data").unwrap_or(&serde_json::Value::Null)
                );
            }
            Some(Ok(StreamItem::Resumed {
                stream_epoch,
                start_offset,
                truncated,
                ..
            })) => {
                let note = if truncated {
                    " (history before it is gone)"
                } else {
                    ""
                };
                eprintln!(
                    "-- following {run} from offset {start_offset}, epoch {stream_epoch}{note}"
                );
            }
            Some(Ok(StreamItem::Gap { from, to })) => {
                eprintln!("-- missed offsets {from}..={to} (this terminal fell behind)");
            }
            Some(Ok(StreamItem::Closed { .. })) => {
                eprintln!("-- the run's stream was dropped by the gateway; following its next one");
            }
        }
    }
    Ok(())
}

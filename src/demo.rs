//! `rungate demo`: a gateway with simulated runtimes publishing the kind of
//! output agent runs produce, for trying the dashboard and the clients.
//!
//! Owns the simulation only: each simulated runtime is an ordinary
//! [`RuntimeClient`] talking to the gateway over a real socket, exactly as
//! an outside runtime would. Must not reach into the gateway's state.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::RngExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use rungate_client::{ClientError, Event, RuntimeClient, RuntimeOptions};

/// What a simulated run does in one step.
const TOOLS: [&str; 5] = ["search", "read_file", "run_tests", "http_get", "summarize"];
const THOUGHTS: [&str; 6] = [
    "planning the next step",
    "the test output points at the parser",
    "retrying with a smaller batch",
    "comparing the two candidate fixes",
    "checking the edge case with an empty input",
    "writing the summary",
];

/// Runs one simulated runtime for `run` until `stop` fires: attaches,
/// resumes its step counter from KV, and publishes a few events every
/// `pace`, checkpointing every 50 steps. Each run ends after `steps`
/// steps with a `run.finished` event, then starts over as a new attempt.
pub async fn simulate_run(
    url: String,
    token: String,
    run: String,
    pace: Duration,
    steps: u64,
    stop: CancellationToken,
) -> Result<(), ClientError> {
    let options = RuntimeOptions::new(url, token, format!("demo-{run}"));
    let client = RuntimeClient::connect(options).await?;
    client
        .attach(
            &run,
            &["kv.read", "kv.write", "checkpoint.save", "checkpoint.load"],
        )
        .await?;
    let mut step: u64 = client
        .kv_get(&run, &["step"])
        .await?
        .get("step")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut tick = tokio::time::interval(pace);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        step += 1;
        let events = step_events(&run, step, steps);
        client.publish(&run, events).await?;
        if step.is_multiple_of(10) {
            let kv: BTreeMap<String, String> = [("step".to_owned(), step.to_string())].into();
            client.kv_set(&run, &kv).await?;
        }
        if step.is_multiple_of(50) {
            client
                .checkpoint_save(&run, Some("latest"), &json!({ "step": step }))
                .await?;
        }
        if step.is_multiple_of(steps) {
            step = 0;
        }
    }
    client.close().await;
    Ok(())
}

/// The events of one step: a thought or a tool call, token usage, now and
/// then progress, and a finish at the end.
fn step_events(run: &str, step: u64, steps: u64) -> Vec<Event> {
    let mut rng = rand::rng();
    let mut out = Vec::new();
    let now = crate::time::Timestamp::now().to_string();
    if step == 1 {
        out.push(
            Event::new("run.started")
                .timestamp(now.clone())
                .data(json!({ "run": run, "plannedSteps": steps })),
        );
    }
    if rng.random_bool(0.6) {
        let thought = THOUGHTS[rng.random_range(0..THOUGHTS.len())];
        out.push(
            Event::new("log")
                .timestamp(now.clone())
                .data(json!({ "level": "info", "message": format!("step {step}: {thought}") })),
        );
    } else {
        let tool = TOOLS[rng.random_range(0..TOOLS.len())];
        let ms: u64 = rng.random_range(20..900);
        out.push(Event::new("tool.call").timestamp(now.clone()).data(
            json!({ "tool": tool, "step": step, "durationMs": ms, "ok": rng.random_bool(0.92) }),
        ));
    }
    out.push(Event::new("tokens").timestamp(now.clone()).data(json!({
        "input": rng.random_range(200..4000),
        "output": rng.random_range(20..600),
    })));
    if step.is_multiple_of(5) {
        out.push(
            Event::new("progress")
                .timestamp(now.clone())
                .data(json!({ "done": step, "of": steps })),
        );
    }
    if step == steps {
        out.push(
            Event::new("run.finished")
                .timestamp(now)
                .data(json!({ "status": "succeeded", "steps": steps })),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_has_events_and_the_last_step_finishes() {
        let first = step_events("r", 1, 20);
        assert_eq!(first[0].kind, "run.started");
        let last = step_events("r", 20, 20);
        assert!(last.iter().any(|e| e.kind == "run.finished"));
        assert!(last.iter().any(|e| e.kind == "progress"));
        assert!(step_events("r", 7, 20).iter().any(|e| e.kind == "tokens"));
    }
}

//! Issue #19, hole 5: one tenant's publishing must not evict another
//! tenant's history. The global stream budget makes room from idle streams
//! and from the publisher's own history only; a publish that finds the
//! budget held by other live runs is `RATE_LIMITED` (retryable), nothing
//! stored.

use crate::harness::*;
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use serde_json::json;

#[tokio::test]
async fn a_tenant_publishing_past_the_global_budget_never_evicts_another_tenants_attached_run() {
    let gw = TestGateway::start_with(|c| {
        c.streams.global_max_bytes = 256 * 1024;
        c.streams.max_bytes_per_run = 128 * 1024;
    })
    .await;
    // The victim: 20 events of ~1 KiB, then attached and idle.
    let victim_token = gw.token(TokenKind::Runtime, "v-*", &Capability::ALL);
    let mut victim = Client::connect(&gw.url("/v1/runtime"), &victim_token).await;
    let vsid = victim.attach("v-1", "v", &[]).await["sessionId"].clone();
    let events: Vec<_> = (0..20)
        .map(|i| json!({ "type": "log", "data": { "i": i, "pad": "v".repeat(1000) } }))
        .collect();
    victim
        .ok(
            "events.publish",
            json!({ "sessionId": vsid, "runId": "v-1", "events": events }),
        )
        .await;

    // The other tenant: four runs, ~1.6 MiB in 40 KiB batches.
    let attacker_token = gw.token(TokenKind::Runtime, "x-*", &Capability::ALL);
    let mut attacker = Client::connect(&gw.url("/v1/runtime"), &attacker_token).await;
    let mut sids = Vec::new();
    for (i, run) in ["x-1", "x-2", "x-3", "x-4"].iter().enumerate() {
        let caps: &[&str] = if i == 0 { &["subtasks.run"] } else { &[] };
        sids.push((
            run.to_string(),
            attacker.attach(run, "x", caps).await["sessionId"].clone(),
        ));
    }
    let batch: Vec<_> = (0..10)
        .map(|i| json!({ "type": "log", "data": { "i": i, "pad": "x".repeat(4000) } }))
        .collect();
    let (mut accepted, mut refused) = (0, 0);
    for round in 0..10 {
        for (run, sid) in &sids {
            let answer = attacker
                .call(
                    "events.publish",
                    json!({ "sessionId": sid, "runId": run, "events": batch }),
                )
                .await;
            if answer["type"] == "reply" {
                accepted += 1;
                continue;
            }
            let err = &answer["error"];
            assert_eq!(err["code"], "RATE_LIMITED", "round {round} {run}: {answer}");
            assert_eq!(err["retryable"], true, "{answer}");
            assert_eq!(
                err["details"]["streamGlobalMaxBytes"],
                256 * 1024,
                "{answer}"
            );
            refused += 1;
        }
    }
    assert!(accepted > 0, "the other tenant publishes within its room");
    eprintln!("attacker publishes: {accepted} accepted, {refused} refused");
    // A fifth run of that tenant, with no history of its own to give up
    // while the budget is held by live runs: refused, nothing stored.
    let x5 = attacker.attach("x-5", "x", &[]).await["sessionId"].clone();
    let answer = attacker
        .call(
            "events.publish",
            json!({ "sessionId": x5, "runId": "x-5", "events": batch }),
        )
        .await;
    assert_eq!(answer["error"]["code"], "RATE_LIMITED", "{answer}");
    assert_eq!(
        answer["error"]["details"]["streamGlobalMaxBytes"],
        256 * 1024,
        "{answer}"
    );

    // The victim's history is whole: every event from offset 0.
    let viewer = gw.token(TokenKind::Viewer, "v-*", &[] as &[Capability]);
    let (_, data) = read_stream(&gw.url("/v1/stream"), &viewer, "v-1").await;
    assert_eq!(data.len(), 20);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["i"], i);
    }
    // And the victim can still publish (its own history makes room).
    victim
        .ok(
            "events.publish",
            json!({ "sessionId": vsid, "runId": "v-1", "events": [{ "type": "log", "data": 1 }] }),
        )
        .await;
}

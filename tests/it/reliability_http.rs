//! Issue #19, hole 4: `GET /v1/runs` is held to the same command budget
//! as a socket, per token, and pages like `runs.list`; its listing is taken
//! from an index of the token's patterns, not from every stream.

use crate::harness::*;
use rungate::auth::TokenKind;
use rungate::ids::Capability;
use rungate_test_support::http;
use serde_json::json;

/// Attaches `runs` (the first as the main session, the rest as sub-runs).
async fn runs_with_streams(gw: &TestGateway, runs: &[&str]) -> Client {
    let mut rt = gw.runtime("*").await;
    for (i, run) in runs.iter().enumerate() {
        let caps: &[&str] = if i == 0 { &["subtasks.run"] } else { &[] };
        rt.attach(run, "i", caps).await;
    }
    rt
}

#[tokio::test]
async fn get_runs_has_the_sockets_command_budget_per_token() {
    let gw = TestGateway::start_with(|c| {
        c.limits.max_commands_per_sec = 1;
        c.limits.command_burst = 3;
    })
    .await;
    let _rt = runs_with_streams(&gw, &["a-1"]).await;
    let token = gw.token(TokenKind::Viewer, "a-*", &[] as &[Capability]);
    let mut statuses = Vec::new();
    let mut refusal = None;
    for _ in 0..10 {
        let r = http::get_with_token(gw.addr, "/v1/runs", &token).await;
        statuses.push(r.status);
        if r.status == 429 {
            assert_eq!(r.header("retry-after"), Some("1"));
            refusal = Some(r.json().await);
        }
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(ok >= 3, "the burst is served: {statuses:?}");
    assert!(
        ok < 10,
        "ten requests at once go past a burst of 3 at 1/s: {statuses:?}"
    );
    let refusal = refusal.expect("a refusal");
    assert_eq!(refusal["error"]["code"], "RATE_LIMITED", "{refusal}");
    assert_eq!(refusal["error"]["retryable"], true, "{refusal}");
    assert!(
        refusal["error"]["details"]["retryAfterMs"]
            .as_u64()
            .is_some(),
        "{refusal}"
    );
    // Another token has its own budget.
    let other = gw.token(TokenKind::Viewer, "a-*", &[] as &[Capability]);
    let r = http::get_with_token(gw.addr, "/v1/runs", &other).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json().await["runs"][0]["runId"], "a-1");
}

#[tokio::test]
async fn get_runs_pages_over_the_runs_a_token_covers() {
    let gw = TestGateway::start().await;
    let _rt = runs_with_streams(
        &gw,
        &["a-1", "a-2", "a-3", "ab-1", "b-1", "c-9", "a-4", "a-5"],
    )
    .await;
    // Prefix a-*, exact c-9: five a- runs and c-9, never ab-1 or b-1.
    let token = gw.token(TokenKind::Viewer, "a-*,c-9", &[] as &[Capability]);
    let mut listed = Vec::new();
    let mut path = "/v1/runs?limit=2".to_owned();
    for page in 0.. {
        assert!(page < 10);
        let r = http::get_with_token(gw.addr, &path, &token).await;
        assert_eq!(r.status, 200);
        let body = r.json().await;
        let runs = body["runs"].as_array().unwrap();
        assert!(runs.len() <= 2, "{body}");
        listed.extend(runs.iter().map(|r| r["runId"].as_str().unwrap().to_owned()));
        match body["nextCursor"].as_str() {
            Some(c) => path = format!("/v1/runs?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(listed, ["a-1", "a-2", "a-3", "a-4", "a-5", "c-9"]);
    // Without a limit: the same runs in one body.
    let all = http::get_with_token(gw.addr, "/v1/runs", &token)
        .await
        .json()
        .await;
    assert_eq!(all["runs"].as_array().unwrap().len(), 6, "{all}");
    assert!(all.get("nextCursor").is_none(), "{all}");
    // A token covering nothing that exists lists nothing.
    let none = gw.token(TokenKind::Viewer, "zz-*,nothing-1", &[] as &[Capability]);
    let body = http::get_with_token(gw.addr, "/v1/runs", &none)
        .await
        .json()
        .await;
    assert_eq!(body, json!({ "runs": [] }));
    // Bad paging parameters are INVALID_PAYLOAD at their query member.
    for (q, path) in [
        ("limit=0", "/query/limit"),
        ("limit=x", "/query/limit"),
        ("cursor=*", "/query/cursor"),
    ] {
        let r = http::get_with_token(gw.addr, &format!("/v1/runs?{q}"), &token).await;
        assert_eq!(r.status, 400, "{q}");
        assert_eq!(r.json().await["error"]["details"]["path"], path, "{q}");
    }
}

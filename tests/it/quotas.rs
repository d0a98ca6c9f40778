//! Quotas per tenant (issue #19, hole 6: "nothing bounds what one token can
//! make") over real sockets: KV bytes, checkpoint bytes and runs, each
//! refused with `QUOTA_EXCEEDED` past its limit and nothing stored;
//! `kv.delete` and a run's end giving bytes back; the tenant as the `sub`
//! claim or the run patterns; concurrent writes that cannot overshoot; the
//! counts across a `kill -9` of the binary and across two gateways on one
//! Redis. spec/README.md, *Quotas per tenant*, is the contract.

use std::path::Path;
use std::time::Duration;

use crate::harness::*;
use rungate::auth::{AuthKey, RunScope, TokenKind};
use rungate::ids::{Capabilities, Capability};
use rungate_test_support::schema::Spec;
use serde_json::{Value, json};

const INSTANCE: &str = "inst-q";

/// A runtime token with every capability over `runs`, of `tenant` (its
/// `sub`), or of the tenant its patterns make.
fn token(key: &AuthKey, runs: &str, tenant: Option<&str>) -> String {
    let caps: Capabilities = Capability::ALL.iter().copied().collect();
    key.mint_for_tenant(
        TokenKind::Runtime,
        &RunScope::parse_list(runs).unwrap(),
        caps,
        Duration::from_secs(3600),
        tenant,
    )
    .unwrap()
}

async fn socket(url: &str, token: &str) -> Client {
    Client::connect(url, token).await
}

/// A fresh attach of `run` asking for every capability; its session id.
async fn attach(c: &mut Client, run: &str) -> String {
    let reply = c.attach(run, INSTANCE, &all_caps()).await;
    reply["sessionId"].as_str().expect("sessionId").to_owned()
}

fn attach_payload(run: &str) -> Value {
    json!({ "runId": run, "runtimeInstanceId": INSTANCE, "protocolVersion": "1",
            "capabilities": all_caps() })
}

async fn kv_set(c: &mut Client, sid: &str, run: &str, kv: Value) -> Value {
    c.call(
        "kv.set",
        json!({ "sessionId": sid, "runId": run, "kv": kv }),
    )
    .await
}

async fn kv_get(c: &mut Client, sid: &str, run: &str, keys: &[&str]) -> Value {
    c.ok(
        "kv.get",
        json!({ "sessionId": sid, "runId": run, "keys": keys }),
    )
    .await["kv"]
        .clone()
}

async fn kv_delete(c: &mut Client, sid: &str, run: &str, keys: &[&str]) -> u64 {
    c.ok(
        "kv.delete",
        json!({ "sessionId": sid, "runId": run, "keys": keys }),
    )
    .await["deleted"]
        .as_u64()
        .expect("deleted")
}

/// `n` bytes of `c`.
fn text(c: char, n: usize) -> String {
    c.to_string().repeat(n)
}

/// Asserts `frame` is the `QUOTA_EXCEEDED` of `quota`, shaped as the spec
/// says; returns `(used, requested, limit)`.
fn refusal(frame: &Value, quota: &str) -> (u64, u64, u64) {
    assert_eq!(frame["type"], "error", "should be refused: {frame}");
    let error = &frame["error"];
    assert_eq!(error["code"], "QUOTA_EXCEEDED", "{frame}");
    assert_eq!(error["retryable"], quota == "runs", "{frame}");
    let details = &error["details"];
    Spec::load()
        .check_def("frames/envelope.json#/$defs/QuotaExceededDetails", details)
        .unwrap_or_else(|e| panic!("{frame}: {e}"));
    assert_eq!(details["quota"], quota, "{frame}");
    let n = |k: &str| details[k].as_u64().expect("a number");
    let (used, requested, limit) = (n("used"), n("requested"), n("limit"));
    assert!(used + requested > limit, "{frame}");
    (used, requested, limit)
}

fn accepted(frame: &Value) {
    assert_eq!(frame["type"], "reply", "should be accepted: {frame}");
}

#[tokio::test]
async fn kv_bytes_past_the_tenants_quota_are_refused_and_deleting_gives_them_back() {
    let gw = TestGateway::start_with(|c| c.limits.max_kv_bytes_per_tenant = 10_000).await;
    let url = gw.url("/v1/runtime");
    // Two sockets of tenant acme, with tokens over different runs.
    let mut a = socket(&url, &token(&gw.key, "q-*", Some("acme"))).await;
    let mut b = socket(&url, &token(&gw.key, "q-2", Some("acme"))).await;
    let sa = attach(&mut a, "q-1").await;
    let sb = attach(&mut b, "q-2").await;

    // 4,002 bytes each ("k1" + 4,000): 8,004 of 10,000.
    accepted(&kv_set(&mut a, &sa, "q-1", json!({ "k1": text('a', 4000) })).await);
    accepted(&kv_set(&mut b, &sb, "q-2", json!({ "k2": text('b', 4000) })).await);

    // 2,002 more would make 10,006: refused whole, nothing stored.
    let frame = kv_set(&mut a, &sa, "q-1", json!({ "k3": text('c', 2000) })).await;
    assert_eq!(refusal(&frame, "kvBytes"), (8004, 2002, 10_000));
    // A write that shrinks one key but adds too much is refused whole:
    // k1 keeps its value.
    let frame = kv_set(
        &mut a,
        &sa,
        "q-1",
        json!({ "k1": "short", "k3": text('c', 6000) }),
    )
    .await;
    assert_eq!(refusal(&frame, "kvBytes"), (8004, 2007, 10_000));
    assert_eq!(
        kv_get(&mut a, &sa, "q-1", &["k1", "k3"]).await,
        json!({ "k1": text('a', 4000) })
    );

    // An overwrite of the same size, then a smaller one, always work.
    accepted(&kv_set(&mut a, &sa, "q-1", json!({ "k1": text('d', 4000) })).await);
    accepted(&kv_set(&mut a, &sa, "q-1", json!({ "k1": text('e', 1000) })).await);
    // 5,004 used: now k3 fits, and then exactly the limit.
    accepted(&kv_set(&mut a, &sa, "q-1", json!({ "k3": text('c', 2000) })).await);
    accepted(&kv_set(&mut b, &sb, "q-2", json!({ "k4": text('f', 2992) })).await);
    let frame = kv_set(&mut b, &sb, "q-2", json!({ "k5": "" })).await;
    assert_eq!(refusal(&frame, "kvBytes"), (10_000, 2, 10_000));

    // kv.delete gives the bytes back: k1 (1,002) and k3 (2,002).
    assert_eq!(
        kv_delete(&mut a, &sa, "q-1", &["k1", "k3", "absent", "k1"]).await,
        2
    );
    assert_eq!(kv_get(&mut a, &sa, "q-1", &["k1", "k3"]).await, json!({}));
    accepted(&kv_set(&mut b, &sb, "q-2", json!({ "k5": text('g', 3002) })).await);
    let frame = kv_set(&mut a, &sa, "q-1", json!({ "k6": "" })).await;
    assert_eq!(refusal(&frame, "kvBytes"), (10_000, 2, 10_000));

    // Another tenant has its own quota, on the same runs' prefix.
    let mut c = socket(&url, &token(&gw.key, "q-*", Some("other"))).await;
    let sc = attach(&mut c, "q-3").await;
    accepted(&kv_set(&mut c, &sc, "q-3", json!({ "k": text('h', 9998) })).await);
    // Every refused socket still works.
    assert_eq!(
        kv_get(&mut b, &sb, "q-2", &["k2"]).await,
        json!({ "k2": text('b', 4000) })
    );
}

#[tokio::test]
async fn concurrent_writes_from_two_sockets_never_overshoot_the_quota() {
    let gw = TestGateway::start_with(|c| c.limits.max_kv_bytes_per_tenant = 20_000).await;
    let url = gw.url("/v1/runtime");
    // Tokens minted alike (no sub, the same runs): one tenant.
    let mut sockets = Vec::new();
    for run in ["race-1", "race-2"] {
        let mut c = socket(&url, &token(&gw.key, "race-*", None)).await;
        let sid = attach(&mut c, run).await;
        sockets.push((c, sid, run));
    }
    // 30 writes of 1,000 bytes from each socket, all in flight at once.
    let mut sent = Vec::new();
    for (c, sid, run) in &mut sockets {
        let mut ids = Vec::new();
        for i in 0..30 {
            let key = format!("k{i:02}");
            let payload = json!({ "sessionId": sid, "runId": run,
                                  "kv": { key.clone(): text('v', 1000 - key.len()) } });
            ids.push(c.send("kv.set", payload).await);
        }
        sent.push(ids);
    }
    let mut landed = 0;
    for ((c, _, _), ids) in sockets.iter_mut().zip(sent) {
        for id in ids {
            let frame = c.answer(&id).await;
            if frame["type"] == "reply" {
                landed += 1;
            } else {
                refusal(&frame, "kvBytes");
            }
        }
    }
    assert_eq!(landed, 20, "exactly the quota's worth landed");
    // And what is stored is what was accepted.
    let keys: Vec<String> = (0..30).map(|i| format!("k{i:02}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut stored = 0;
    for (c, sid, run) in &mut sockets {
        stored += kv_get(c, sid, run, &keys).await.as_object().unwrap().len();
    }
    assert_eq!(stored, 20);
}

#[tokio::test]
async fn checkpoint_bytes_are_bounded_and_a_runs_end_gives_its_bytes_back() {
    let gw = TestGateway::start_with(|c| {
        c.limits.max_checkpoint_bytes_per_tenant = 3000;
        c.limits.max_kv_bytes_per_tenant = 3000;
    })
    .await;
    let url = gw.url("/v1/runtime");
    let tok = token(&gw.key, "cp-*", Some("acme"));
    let mut a = socket(&url, &tok).await;
    let sid = attach(&mut a, "cp-1").await;
    let save = |id: &str, data: Value| json!({ "sessionId": sid, "runId": "cp-1", "checkpointId": id, "data": data });
    // A checkpoint counts its id and its data's JSON: "a" + 1,502 and
    // "b" + 1,492, then "c" + 3: exactly 3,000.
    a.ok("checkpoint.save", save("a", json!(text('x', 1500))))
        .await;
    a.ok("checkpoint.save", save("b", json!(text('x', 1490))))
        .await;
    a.ok("checkpoint.save", save("c", json!("x"))).await;
    let frame = a.call("checkpoint.save", save("d", json!("yy"))).await;
    assert_eq!(refusal(&frame, "checkpointBytes"), (3000, 5, 3000));
    // Nothing saved: the latest is still c, and d does not exist.
    let latest = a
        .ok(
            "checkpoint.load",
            json!({ "sessionId": sid, "runId": "cp-1" }),
        )
        .await;
    assert_eq!(latest["checkpointId"], "c");
    let missing = a
        .err(
            "checkpoint.load",
            json!({ "sessionId": sid, "runId": "cp-1", "checkpointId": "d" }),
        )
        .await;
    assert_eq!(missing, "NOT_FOUND");
    // Replacing a by a smaller one frees the difference.
    a.ok("checkpoint.save", save("a", json!(1))).await;
    a.ok("checkpoint.save", save("d", json!(text('y', 1400))))
        .await;
    // KV is a quota apart.
    accepted(&kv_set(&mut a, &sid, "cp-1", json!({ "k": text('k', 2990) })).await);

    // The run's end deletes its KV and checkpoints: another run of the
    // tenant can use all of both quotas again.
    a.ok(
        "runtime.finish",
        json!({ "sessionId": sid, "runId": "cp-1", "outcome": "completed" }),
    )
    .await;
    let mut b = socket(&url, &tok).await;
    let sid2 = attach(&mut b, "cp-2").await;
    b.ok(
        "checkpoint.save",
        json!({ "sessionId": sid2, "runId": "cp-2", "data": text('z', 2950) }),
    )
    .await;
    accepted(&kv_set(&mut b, &sid2, "cp-2", json!({ "k": text('k', 2999) })).await);
    let frame = kv_set(&mut b, &sid2, "cp-2", json!({ "k2": "" })).await;
    assert_eq!(refusal(&frame, "kvBytes"), (3000, 2, 3000));
    // The ended run's data is not reachable any more, from anywhere.
    let ended = a
        .call(
            "kv.delete",
            json!({ "sessionId": sid, "runId": "cp-1", "keys": ["k"] }),
        )
        .await;
    assert_eq!(ended["error"]["code"], "RUN_ENDED", "{ended}");
}

#[tokio::test]
async fn runs_past_the_tenants_quota_are_refused_until_a_tombstone_is_forgotten() {
    let gw = TestGateway::start_with(|c| {
        c.limits.max_runs_per_tenant = 3;
        c.session_tombstone_ttl = Duration::from_secs(2);
    })
    .await;
    let url = gw.url("/v1/runtime");
    let tok = || token(&gw.key, "r-*", Some("acme"));
    // Three runs: a main run and its sub-run on one socket, one on another.
    let mut a = socket(&url, &tok()).await;
    attach(&mut a, "r-1").await;
    attach(&mut a, "r-1.sub").await;
    let mut b = socket(&url, &tok()).await;
    let sid2 = attach(&mut b, "r-2").await;

    let mut c = socket(&url, &tok()).await;
    let frame = c.call("runtime.attach", attach_payload("r-3")).await;
    assert_eq!(refusal(&frame, "runs"), (3, 1, 3));
    // Nothing was created: the run is free, here for another tenant.
    let mut other = socket(&url, &token(&gw.key, "r-*", Some("other"))).await;
    attach(&mut other, "r-3").await;

    // A reconnect adds nothing.
    let mut a2 = socket(&url, &tok()).await;
    let moved = a2.reattach("r-1", INSTANCE, 1, &all_caps()).await;
    accepted(&moved);

    // A finished run's tombstone still counts...
    b.ok(
        "runtime.finish",
        json!({ "sessionId": sid2, "runId": "r-2", "outcome": "completed" }),
    )
    .await;
    let frame = c.call("runtime.attach", attach_payload("r-4")).await;
    assert_eq!(refusal(&frame, "runs"), (3, 1, 3));
    // ... until it is forgotten (2 s later): then the same attach works.
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = c.call("runtime.attach", attach_payload("r-4")).await;
        if frame["type"] == "reply" {
            break;
        }
        refusal(&frame, "runs");
        assert!(
            tokio::time::Instant::now() < until,
            "the tombstone was never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And the tenant is full again.
    let mut d = socket(&url, &tok()).await;
    let frame = d.call("runtime.attach", attach_payload("r-5")).await;
    assert_eq!(refusal(&frame, "runs"), (3, 1, 3));
}

#[tokio::test]
async fn the_tenant_is_the_sub_claim_or_else_the_run_patterns() {
    let gw = TestGateway::start_with(|c| c.limits.max_kv_bytes_per_tenant = 100).await;
    let url = gw.url("/v1/runtime");
    // 60 bytes each ("k" + 59): a second write of one tenant is refused.
    let write = |runs: &'static str, tenant: Option<&'static str>, run: &'static str| {
        let (url, key) = (url.clone(), gw.key.clone());
        async move {
            let mut c = socket(&url, &token(&key, runs, tenant)).await;
            let sid = attach(&mut c, run).await;
            kv_set(&mut c, &sid, run, json!({ "k": text('v', 59) })).await
        }
    };
    // The same sub over other runs: one tenant.
    accepted(&write("a-*", Some("n"), "a-1").await);
    refusal(&write("b-*", Some("n"), "b-1").await, "kvBytes");
    // No sub: the patterns, in any order and repeated, are the tenant...
    accepted(&write("a-*,b-*", None, "a-2").await);
    refusal(&write("b-*,a-*,b-*", None, "b-2").await, "kvBytes");
    // ... and other patterns are another.
    accepted(&write("a-*", None, "a-3").await);
    // A sub that reads like patterns is still a name of its own.
    accepted(&write("a-*", Some("runs:a-*"), "a-4").await);
}

/// `rungate serve` on `data` with the quotas given as flags.
async fn quota_gateway(data: &Path, extra: &[&str]) -> GatewayProcess {
    GatewayProcess::spawn(data, extra).await
}

#[tokio::test]
async fn the_counts_survive_a_kill_9_and_a_lowered_limit_still_lets_data_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    let flags = [
        "--max-kv-bytes-per-tenant",
        "5000",
        "--max-runs-per-tenant",
        "2",
    ];
    let gw = quota_gateway(&data, &flags).await;
    let key = AuthKey::load_or_create(&data.join("auth.key")).unwrap();
    let tok = token(&key, "p-*", Some("acme"));
    let url = gw.url("/v1/runtime");
    let mut a = socket(&url, &tok).await;
    let sid = attach(&mut a, "p-1").await;
    accepted(&kv_set(&mut a, &sid, "p-1", json!({ "k": text('a', 3999) })).await);
    let mut b = socket(&url, &tok).await;
    attach(&mut b, "p-2").await;
    let frame = kv_set(&mut a, &sid, "p-1", json!({ "k2": text('b', 999) })).await;
    assert_eq!(refusal(&frame, "kvBytes"), (4000, 1001, 5000));
    gw.kill().await;

    // The same refusals after the restart: nothing was forgotten.
    let gw = quota_gateway(&data, &flags).await;
    let url = gw.url("/v1/runtime");
    let mut c = socket(&url, &tok).await;
    let frame = c.call("runtime.attach", attach_payload("p-3")).await;
    assert_eq!(refusal(&frame, "runs"), (2, 1, 2));
    let mut a = socket(&url, &tok).await;
    accepted(&a.reattach("p-1", INSTANCE, 1, &all_caps()).await);
    let frame = kv_set(&mut a, &sid, "p-1", json!({ "k2": text('b', 999) })).await;
    assert_eq!(refusal(&frame, "kvBytes"), (4000, 1001, 5000));
    assert_eq!(kv_delete(&mut a, &sid, "p-1", &["k"]).await, 1);
    accepted(&kv_set(&mut a, &sid, "p-1", json!({ "k": text('a', 3999) })).await);
    gw.kill().await;

    // Restarted with a limit below what the tenant holds: shrinking works,
    // growing does not.
    let lowered = [
        "--max-kv-bytes-per-tenant",
        "3000",
        "--max-runs-per-tenant",
        "2",
    ];
    let gw = quota_gateway(&data, &lowered).await;
    let mut a = socket(&gw.url("/v1/runtime"), &tok).await;
    accepted(&a.reattach("p-1", INSTANCE, 2, &all_caps()).await);
    let frame = kv_set(&mut a, &sid, "p-1", json!({ "k2": "" })).await;
    assert_eq!(refusal(&frame, "kvBytes"), (4000, 2, 3000));
    accepted(&kv_set(&mut a, &sid, "p-1", json!({ "k": text('a', 3000) })).await);
    accepted(&kv_set(&mut a, &sid, "p-1", json!({ "k": text('a', 2000) })).await);
    accepted(&kv_set(&mut a, &sid, "p-1", json!({ "k2": text('b', 997) })).await);
    let frame = kv_set(&mut a, &sid, "p-1", json!({ "k3": "" })).await;
    assert_eq!(refusal(&frame, "kvBytes"), (3000, 2, 3000));
    gw.terminate().await;
}

#[tokio::test]
async fn two_gateways_on_one_redis_share_a_tenants_quotas() {
    let Some(redis) = rungate_test_support::redis::start() else {
        return;
    };
    let extra = [
        "--max-kv-bytes-per-tenant",
        "5000",
        "--max-checkpoint-bytes-per-tenant",
        "5000",
        "--max-runs-per-tenant",
        "2",
    ];
    // Held whole to the end: its data directories go with it.
    let cluster = GatewaysOnRedis::spawn(&redis.url, 2, &extra).await;
    // A tenant and runs of this test's own (REDIS_URL may be shared).
    let tenant = unique("tenant");
    let (x1, x2, x3) = (unique("x1"), unique("x2"), unique("x3"));
    let tok = token(&cluster.key, "*", Some(&tenant));
    let mut on_a = socket(&cluster.node(0).url("/v1/runtime"), &tok).await;
    let mut on_b = socket(&cluster.node(1).url("/v1/runtime"), &tok).await;
    let sa = attach(&mut on_a, &x1).await;
    let sb = attach(&mut on_b, &x2).await;

    // KV written on A counts on B.
    let big = text('a', 2999);
    accepted(&kv_set(&mut on_a, &sa, &x1, json!({ "k": big })).await);
    let frame = kv_set(&mut on_b, &sb, &x2, json!({ "k": text('b', 2999) })).await;
    assert_eq!(refusal(&frame, "kvBytes"), (3000, 3000, 5000));
    // Runs held on A and B count together.
    let mut third = socket(&cluster.node(1).url("/v1/runtime"), &tok).await;
    let frame = third.call("runtime.attach", attach_payload(&x3)).await;
    assert_eq!(refusal(&frame, "runs"), (2, 1, 2));
    // A delete on A makes room on B.
    assert_eq!(kv_delete(&mut on_a, &sa, &x1, &["k"]).await, 1);
    accepted(&kv_set(&mut on_b, &sb, &x2, json!({ "k": text('b', 2999) })).await);
    // Checkpoints too, and a run's end on B frees them for A.
    let save = |sid: &str, run: &str, n: usize| json!({ "sessionId": sid, "runId": run, "checkpointId": "c", "data": text('c', n) });
    on_b.ok("checkpoint.save", save(&sb, &x2, 4000)).await;
    let frame = on_a.call("checkpoint.save", save(&sa, &x1, 1000)).await;
    assert_eq!(refusal(&frame, "checkpointBytes"), (4003, 1003, 5000));
    on_b.ok(
        "runtime.finish",
        json!({ "sessionId": sb, "runId": x2, "outcome": "completed" }),
    )
    .await;
    on_a.ok("checkpoint.save", save(&sa, &x1, 4990)).await;
    accepted(&kv_set(&mut on_a, &sa, &x1, json!({ "k": text('a', 4999) })).await);
    cluster.terminate().await;
}

//! `rungate_client` against a real gateway: every typed call, many callers
//! at once, dropped futures, timeouts, and reconnects after the socket is
//! cut (here by draining one gateway process and starting another on the
//! same address; tests/client_faults.rs cuts it with a proxy).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;
use rungate::auth::{AuthKey, TokenKind};
use rungate::ids::Capability;
use rungate::protocol::ErrorCode;
use rungate_client::{
    ClientError, ClientEvent, ConnectionState, Event, RuntimeClient, RuntimeOptions, StreamItem,
    ViewerClient, ViewerOptions,
};
use serde_json::json;

async fn runtime(gw: &TestGateway, runs: &str) -> RuntimeClient {
    let token = gw.token(TokenKind::Runtime, runs, &Capability::ALL);
    RuntimeClient::connect(RuntimeOptions::new(gw.url("/v1/runtime"), token, "inst-1"))
        .await
        .expect("connects")
}

#[tokio::test]
async fn every_typed_call_works() {
    let gw = TestGateway::start().await;
    let rt = runtime(&gw, "c-*").await;
    let attached = rt.attach("c-1", &all_caps()).await.unwrap();
    assert_eq!(attached.run_id, "c-1");
    assert_eq!(attached.session_id.len(), 32);
    rt.heartbeat("c-1").await.unwrap();
    assert!(rt.config("c-1").await.unwrap().is_empty());
    assert!(rt.secrets("c-1", None).await.unwrap().is_empty());
    let err = rt.secrets("c-1", Some(&["NOPE"])).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));

    let kv: BTreeMap<String, String> = [("a".to_owned(), "1".to_owned())].into();
    rt.kv_set("c-1", &kv).await.unwrap();
    assert_eq!(rt.kv_get("c-1", &["a", "b"]).await.unwrap(), kv);
    let two: BTreeMap<String, String> = [("x".to_owned(), "9".to_owned())].into();
    rt.kv_set("c-1", &two).await.unwrap();
    assert_eq!(rt.kv_delete("c-1", &["x", "nope"]).await.unwrap(), 1);
    assert_eq!(rt.kv_get("c-1", &["a", "x"]).await.unwrap(), kv);

    let id = rt
        .checkpoint_save("c-1", None, &json!({ "step": 3 }))
        .await
        .unwrap();
    let loaded = rt.checkpoint_load("c-1", None).await.unwrap();
    assert_eq!(loaded.checkpoint_id, id);
    assert_eq!(loaded.data, json!({ "step": 3 }));
    let missing = rt.checkpoint_load("c-1", Some("nope")).await.unwrap_err();
    assert_eq!(missing.code(), Some(ErrorCode::NotFound));

    // A sub-run on the same client.
    rt.attach("c-1.sub", &["kv.read"]).await.unwrap();
    assert!(rt.kv_get("c-1.sub", &["a"]).await.unwrap().is_empty());

    // Publish, and read it back through the runtime's own follow.
    rt.publish(
        "c-1",
        vec![Event::new("log").data(json!("hello")), Event::new("done")],
    )
    .await
    .unwrap();
    let mut own = rt.follow("c-1", Some(0)).await.unwrap();
    let Some(Ok(StreamItem::Resumed { start_offset, .. })) = own.next().await else {
        panic!("resumed first");
    };
    assert_eq!(start_offset, 0);
    let Some(Ok(StreamItem::Event { offset, event })) = own.next().await else {
        panic!("an event");
    };
    assert_eq!(offset, 0);
    assert_eq!(event["type"], "log");
    assert_eq!(event["data"], "hello");
    assert!(event["seq"].is_u64(), "the client numbers events: {event}");

    // Not attached here.
    let err = rt.kv_get("other", &["a"]).await.unwrap_err();
    assert!(matches!(err, ClientError::NoSession(_)), "{err}");
    // The token does not cover it.
    let err = rt.attach("elsewhere", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    rt.close().await;
    assert_eq!(*rt.state().borrow(), ConnectionState::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_share_one_client_and_dropped_calls_harm_nothing() {
    let gw = TestGateway::start().await;
    let rt = runtime(&gw, "*").await;
    rt.attach("shared", &all_caps()).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..20 {
        let rt = rt.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                let key = format!("k{t}-{i}");
                let kv: BTreeMap<String, String> = [(key.clone(), format!("{t}/{i}"))].into();
                rt.kv_set("shared", &kv).await.unwrap();
                let got = rt.kv_get("shared", &[&key]).await.unwrap();
                assert_eq!(got[&key], format!("{t}/{i}"));
            }
        }));
    }
    // Futures dropped before their answers: the client must not mix
    // their answers up with anyone else's.
    for i in 0..50 {
        let rt = rt.clone();
        let fut = async move { rt.kv_get("shared", &["k0-0"]).await };
        let _ = tokio::time::timeout(Duration::from_micros(10 * i), fut).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = rt.kv_get("shared", &["k19-9"]).await.unwrap();
    assert_eq!(got["k19-9"], "19/9");
}

#[tokio::test]
async fn a_call_without_an_answer_times_out() {
    // A "gateway" that accepts the WebSocket and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(ws);
    });
    let mut options = RuntimeOptions::new(format!("ws://{addr}/v1/runtime"), "t", "i");
    options.request_timeout = Duration::from_millis(300);
    let rt = RuntimeClient::connect(options).await.unwrap();
    let err = rt.attach("r", &[]).await.unwrap_err();
    assert_eq!(err, ClientError::Timeout(Duration::from_millis(300)));
    assert!(err.is_retryable());
    silent.abort();
}

#[tokio::test]
async fn a_refused_token_is_a_clear_error() {
    let gw = TestGateway::start().await;
    let err = RuntimeClient::connect(RuntimeOptions::new(gw.url("/v1/runtime"), "garbage", "i"))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("401"), "{err}");
}

/// A gateway restart mid-run: the client reconnects at a higher epoch and
/// carries on, and every publish lands exactly once in the same stream
/// history (the embedded store keeps streams across restarts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restart_is_survived_and_nothing_is_published_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    let first = GatewayProcess::spawn(&data, &["--reconnect-after-ms", "200"]).await;
    let addr = first.addr;
    let key = AuthKey::load_or_create(&data.join("auth.key")).unwrap();
    let token = mint(&key, TokenKind::Runtime, "*", &Capability::ALL);
    let mut options = RuntimeOptions::new(first.url("/v1/runtime"), token, "inst-r");
    options.backoff.initial = Duration::from_millis(50);
    options.backoff.max = Duration::from_millis(500);
    let rt = Arc::new(RuntimeClient::connect(options).await.unwrap());
    let attached = rt.attach("restart", &all_caps()).await.unwrap();
    let mut events = rt.events();

    let publisher = {
        let rt = rt.clone();
        tokio::spawn(async move {
            for i in 0..200u64 {
                rt.publish("restart", vec![Event::new("n").data(json!(i))])
                    .await
                    .unwrap_or_else(|e| panic!("publish {i}: {e}"));
                // Spread over a second or two, so the restart lands mid-way.
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Stop the gateway; start another on the same address and data.
    assert_eq!(first.terminate().await, Some(0));
    let listen = addr.to_string();
    let second = GatewayProcess::spawn(&data, &["--listen", &listen]).await;
    assert_eq!(second.addr, addr);

    // The embedded store keeps sessions too: the client reconnects at a
    // higher epoch and keeps its session id; nothing is renewed.
    let reconnected = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.recv().await.unwrap() {
                ClientEvent::Reconnected { epoch } => return epoch,
                ClientEvent::SessionRenewed { .. } => panic!("the session was kept"),
                _ => {}
            }
        }
    })
    .await
    .expect("the client reconnected");
    assert!(reconnected > 0);
    let mut probe = Client::connect(
        &second.url("/v1/runtime"),
        &mint(&key, TokenKind::Runtime, "*", &Capability::ALL),
    )
    .await;
    // The session the client attached before the restart is the one it
    // holds now: a stale reconnect is told the client's current epoch.
    let stale = probe.reattach("restart", "inst-r", 1, &[]).await;
    assert_eq!(stale["error"]["code"], "STALE_EPOCH", "{stale}");
    assert_eq!(
        stale["error"]["details"]["currentEpoch"], reconnected,
        "{stale}"
    );
    let _ = attached;
    publisher.await.expect("every publish succeeded");
    // The stream: all 200, once each, in order, across both processes.
    let viewer_token = mint(&key, TokenKind::Viewer, "*", &[]);
    let viewer = ViewerClient::new(ViewerOptions::new(second.url("/v1/stream"), viewer_token));
    let mut follower = viewer.follow("restart", Some(0));
    let Some(Ok(StreamItem::Resumed {
        next_offset,
        first_offset,
        truncated,
        ..
    })) = follower.next().await
    else {
        panic!("resumed");
    };
    assert_eq!((first_offset, next_offset, truncated), (0, 200, false));
    let mut seen = Vec::new();
    while (seen.len() as u64) < next_offset {
        match follower.next().await {
            Some(Ok(StreamItem::Event { event, .. })) => seen.push(event["data"].as_u64().unwrap()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, (0..200).collect::<Vec<u64>>());
    assert!(
        seen.windows(2).all(|w| w[1] == w[0] + 1),
        "in order, once each: {seen:?}"
    );
    assert_eq!(second.terminate().await, Some(0));
}

/// A restarted worker (a new client, same runtime instance) takes its run's
/// session over and fences the old one; another instance cannot.
#[tokio::test]
async fn a_restarted_worker_takes_its_session_over_and_others_cannot() {
    let gw = TestGateway::start().await;
    let token = gw.token(TokenKind::Runtime, "*", &Capability::ALL);
    let url = gw.url("/v1/runtime");
    let old = RuntimeClient::connect(RuntimeOptions::new(&url, &token, "worker-7"))
        .await
        .unwrap();
    let first = old.attach("job", &["kv.read"]).await.unwrap();
    let mut old_events = old.events();
    // The clock-based epochs of two clients made in the same millisecond
    // would tie; real restarts take longer than that.
    tokio::time::sleep(Duration::from_millis(5)).await;

    let new = RuntimeClient::connect(RuntimeOptions::new(&url, &token, "worker-7"))
        .await
        .unwrap();
    let second = new.attach("job", &["kv.read"]).await.unwrap();
    assert_eq!(
        second.session_id, first.session_id,
        "the same session, moved"
    );
    let event = tokio::time::timeout(WAIT, old_events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        event,
        ClientEvent::SessionSuperseded {
            run_id: "job".into()
        }
    );
    assert!(matches!(
        old.kv_get("job", &["a"]).await,
        Err(ClientError::NoSession(_))
    ));
    new.kv_get("job", &["a"]).await.unwrap();

    let other = RuntimeClient::connect(RuntimeOptions::new(&url, &token, "worker-8"))
        .await
        .unwrap();
    let err = other.attach("job", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict));
}

/// Tokens that last 2 s, and a worker and a viewer that run for several of
/// them: each socket is closed when its token expires, and each client
/// reconnects with a fresh token from its source, so the worker's session
/// and the viewer's stream carry on (every event once, in order).
#[tokio::test]
async fn clients_outlive_their_tokens_with_a_token_source() {
    use rungate::auth::RunScope;
    use rungate_client::TokenSource;

    let gw = TestGateway::start().await;
    let source = |kind: TokenKind, caps: Vec<Capability>| {
        let key = gw.key.clone();
        TokenSource::new(move || {
            key.mint(
                kind,
                &RunScope::parse_list("*").unwrap(),
                caps.iter().copied().collect(),
                Duration::from_secs(2),
            )
            .unwrap()
        })
    };
    let options = RuntimeOptions::new(gw.url("/v1/runtime"), "unused", "inst-t")
        .with_token_source(source(TokenKind::Runtime, Capability::ALL.to_vec()));
    let rt = RuntimeClient::connect(options).await.unwrap();
    let mut events = rt.events();
    rt.attach("long-worker", &all_caps()).await.unwrap();
    let viewer = ViewerClient::new(
        ViewerOptions::new(gw.url("/v1/stream"), "unused")
            .with_token_source(source(TokenKind::Viewer, Vec::new())),
    );
    let mut follower = viewer.follow("long-worker", Some(0));

    // About 6 s of work: three tokens' worth.
    for i in 0..30u64 {
        rt.publish("long-worker", vec![Event::new("n").data(json!(i))])
            .await
            .expect("published across token expiries");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut reconnects = 0;
    while let Ok(event) = events.try_recv() {
        if matches!(event, ClientEvent::Reconnected { .. }) {
            reconnects += 1;
        }
    }
    assert!(
        reconnects >= 2,
        "reconnected as tokens expired: {reconnects}"
    );
    let mut seen = Vec::new();
    while seen.len() < 30 {
        match tokio::time::timeout(WAIT, follower.next())
            .await
            .expect("in time")
        {
            Some(Ok(StreamItem::Event { event, .. })) => seen.push(event["data"].as_u64().unwrap()),
            Some(Ok(_)) => continue,
            other => panic!("the viewer stopped: {other:?}"),
        }
    }
    assert_eq!(seen, (0..30).collect::<Vec<_>>());
}

//! Tests of the Redis store: the store conformance suite on a real
//! redis-server, Redis going away and coming back, foreign data under the
//! prefix, and sessions shared between two or three gateways.

use std::sync::Arc;

use super::*;
use crate::ids::SessionId;
use crate::redis::test_server::{self, TestRedis};

/// Each check gets a server of its own (or a prefix of its own on
/// `REDIS_URL`), so checks never see each other's keys.
async fn make() -> Option<(Arc<dyn Store>, TestRedis)> {
    let server = test_server::start()?;
    let prefix = format!("test-{}", SessionId::generate());
    let store = RedisStore::connect(&server.url, &prefix)
        .await
        .expect("connect to the test Redis");
    Some((Arc::new(store), server))
}

crate::store::conformance::conformance_tests!(make);

fn run(s: &str) -> RunId {
    RunId::new(s).unwrap()
}

fn one(k: &str, v: &str) -> BTreeMap<String, String> {
    [(k.to_owned(), v.to_owned())].into()
}

/// Redis gone: ops answer a retryable `Unavailable` promptly; Redis
/// back: the same store works again by itself. (This test server keeps
/// nothing across its restart, so only new writes are checked.)
#[tokio::test]
async fn redis_away_is_unavailable_and_the_store_recovers_by_itself() {
    if std::env::var("REDIS_URL").is_ok() {
        return; // Cannot stop a server that is not ours.
    }
    let Some(mut server) = test_server::start() else {
        return;
    };
    let store = RedisStore::connect(&server.url, "t").await.unwrap();
    let r = run("r");
    store.kv_set(&r, one("k", "1")).await.unwrap();
    server.stop();
    let err = tokio::time::timeout(Duration::from_secs(30), store.kv_set(&r, one("k", "2")))
        .await
        .expect("answered, not hung")
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    server.restart();
    let mut recovered = false;
    for _ in 0..100 {
        if store.kv_set(&r, one("k", "3")).await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the store reconnected by itself");
    assert_eq!(
        store.kv_get(&r, vec!["k".into()]).await.unwrap(),
        one("k", "3")
    );
}

#[tokio::test]
async fn nothing_listening_is_a_clear_error_at_connect() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // (The stream engine opens Redis through the same `open`.)
    let err = RedisStore::connect(&format!("redis://:secret@127.0.0.1:{port}/0"), "t")
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&port.to_string()), "{err}");
    assert!(
        !err.to_string().contains("secret"),
        "no password in errors: {err}"
    );
    let err = RedisStore::connect("http://nope", "t").await.unwrap_err();
    assert!(err.to_string().contains("bad Redis URL"), "{err}");
}

/// Someone else's data under our prefix is `Corrupt`, not a panic, and
/// touches only the op that met it.
#[tokio::test]
async fn foreign_keys_are_corrupt_not_a_panic() {
    let Some(server) = test_server::start() else {
        return;
    };
    let store = RedisStore::connect(&server.url, "f").await.unwrap();
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("SET")
        .arg("f:kv:r")
        .arg("a string, not a hash")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    redis::cmd("HSET")
        .arg("f:sessions")
        .arg("s")
        .arg("garbage")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    redis::cmd("SADD")
        .arg(format!("f:held:{}", store.node()))
        .arg("s")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let err = store.kv_get(&run("r"), vec!["k".into()]).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    let err = store.sessions_load().await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    store.kv_set(&run("other"), one("k", "v")).await.unwrap();
}

// ------------------------------------------- sessions shared by nodes

use crate::store::conformance::session;

/// Two gateways (nodes) on one Redis, under one prefix.
async fn two_nodes(silent_after: Duration) -> Option<(RedisStore, RedisStore, TestRedis)> {
    let server = test_server::start()?;
    let prefix = format!("nodes-{}", SessionId::generate());
    let a = RedisStore::connect_with(&server.url, &prefix, silent_after)
        .await
        .unwrap();
    let b = RedisStore::connect_with(&server.url, &prefix, silent_after)
        .await
        .unwrap();
    assert_ne!(a.node(), b.node());
    Some((a, b, server))
}

fn put(r: &SessionRecord) -> Vec<SessionChange> {
    vec![SessionChange::Put(r.clone())]
}

fn fenced(result: Result<(), StoreError>) -> Vec<(SessionId, Option<u64>)> {
    match result {
        Err(StoreError::Fenced { sessions }) => sessions,
        other => panic!("expected Fenced, got {other:?}"),
    }
}

/// A takeover at a newer epoch wins once, is announced to the old node,
/// and fences the old node's writes of that session from then on.
#[tokio::test]
async fn a_takeover_fences_the_old_node_and_is_announced() {
    let Some((a, b, _server)) = two_nodes(NODE_SILENT_AFTER).await else {
        return;
    };
    let mut moves = a.moves().expect("first call");
    assert!(a.moves().is_none(), "handed out once");
    let mut s = session("r", 1);
    a.sessions_save(put(&s)).await.unwrap();
    let (seen, held_here) = b.session_of_run(&s.run_id).await.unwrap().unwrap();
    assert_eq!((seen.clone(), held_here), (s.clone(), false));
    assert!(a.session_of_run(&s.run_id).await.unwrap().unwrap().1);

    // The same epoch from another node is refused and names the holder's.
    assert_eq!(
        fenced(b.sessions_save(put(&s)).await),
        vec![(s.session_id.clone(), Some(1))]
    );
    s.epoch = 2;
    b.sessions_save(put(&s)).await.unwrap();
    let moved = tokio::time::timeout(Duration::from_secs(30), moves.recv())
        .await
        .expect("announced in time")
        .expect("a move");
    assert_eq!(
        moved,
        SessionMoved {
            session_id: s.session_id.clone(),
            epoch: 2
        }
    );
    // The old node's renewal at its old epoch, and its delete, are fenced.
    let mut old = s.clone();
    old.epoch = 1;
    old.deadline_unix_ms += 10_000;
    assert_eq!(
        fenced(a.sessions_save(put(&old)).await),
        vec![(s.session_id.clone(), Some(2))]
    );
    assert_eq!(
        fenced(
            a.sessions_save(vec![SessionChange::Delete(s.session_id.clone())])
                .await
        ),
        vec![(s.session_id.clone(), Some(2))]
    );
    assert_eq!(
        b.session_of_run(&s.run_id).await.unwrap().unwrap(),
        (s.clone(), true)
    );
    // Each node loads what it holds, nothing else.
    assert_eq!(b.sessions_load().await.unwrap(), vec![s.clone()]);
    assert!(a.sessions_load().await.unwrap().is_empty());
    // An epoch beyond a double's precision still compares exactly.
    s.epoch = u64::MAX - 1;
    a.sessions_save(put(&s)).await.unwrap();
    let mut b_old = s.clone();
    b_old.epoch = u64::MAX - 2;
    assert_eq!(
        fenced(b.sessions_save(put(&b_old)).await),
        vec![(s.session_id.clone(), Some(u64::MAX - 1))]
    );
}

/// A fresh session of a run with a live session elsewhere is refused
/// (no epoch: it is another session); once that one is a tombstone it
/// gives way and the tombstone is gone.
#[tokio::test]
async fn a_run_has_one_live_session_across_nodes() {
    let Some((a, b, server)) = two_nodes(NODE_SILENT_AFTER).await else {
        return;
    };
    let mut first = session("r", 1);
    a.sessions_save(put(&first)).await.unwrap();
    let second = session("r", 1);
    assert_eq!(
        fenced(b.sessions_save(put(&second)).await),
        vec![(second.session_id.clone(), None)]
    );
    // Other changes in the same save still apply.
    let other = session("other", 1);
    assert_eq!(
        fenced(
            b.sessions_save(vec![
                SessionChange::Put(second.clone()),
                SessionChange::Put(other.clone())
            ])
            .await
        ),
        vec![(second.session_id.clone(), None)]
    );
    assert_eq!(
        b.session_of_run(&other.run_id).await.unwrap().unwrap().0,
        other
    );
    first.expired = true;
    a.sessions_save(put(&first)).await.unwrap();
    b.sessions_save(put(&second)).await.unwrap();
    assert_eq!(
        b.session_of_run(&second.run_id).await.unwrap().unwrap(),
        (second.clone(), true)
    );
    assert!(
        a.sessions_load().await.unwrap().is_empty(),
        "the tombstone went"
    );
    // A deleted session leaves no trace: not its record, not its run's
    // index entry.
    b.sessions_save(vec![SessionChange::Delete(second.session_id.clone())])
        .await
        .unwrap();
    assert!(b.session_of_run(&second.run_id).await.unwrap().is_none());
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let indexed: Vec<String> = redis::cmd("HKEYS")
        .arg(b.keys_prefix_for_tests() + ":session-of-run")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(indexed, vec![other.run_id.to_string()], "only the live run");
}

/// A node that stops saying it is alive has its sessions taken over by
/// exactly one live node, once it has been silent long enough.
#[tokio::test]
async fn a_silent_nodes_sessions_go_to_one_live_node() {
    let silent = Duration::from_millis(300);
    let Some((a, b, server)) = two_nodes(silent).await else {
        return;
    };
    let c = RedisStore::connect_with(&server.url, &b.keys_prefix_for_tests(), silent)
        .await
        .unwrap();
    let held = [session("r1", 1), session("r2", 4)];
    for s in &held {
        a.sessions_save(put(s)).await.unwrap();
    }
    assert!(a.keep_alive().await.unwrap().is_empty());
    // A keeps saying it is alive: nothing is taken.
    for _ in 0..3 {
        tokio::time::sleep(silent).await;
        assert!(a.keep_alive().await.unwrap().is_empty());
        assert!(b.keep_alive().await.unwrap().is_empty());
    }
    // A goes silent. B and C race; each session goes to one of them.
    drop(a);
    let mut taken: Vec<SessionRecord> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while taken.len() < held.len() {
        assert!(tokio::time::Instant::now() < deadline, "taken over in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
        taken.extend(b.keep_alive().await.unwrap());
        taken.extend(c.keep_alive().await.unwrap());
    }
    taken.sort_by(|x, y| x.run_id.cmp(&y.run_id));
    assert_eq!(taken, held.to_vec(), "each session once");
    for _ in 0..3 {
        tokio::time::sleep(silent).await;
        assert!(b.keep_alive().await.unwrap().is_empty());
        assert!(c.keep_alive().await.unwrap().is_empty());
    }
    // Whoever took them holds them now: their saves pass.
    let mut holders = 0;
    for node in [&b, &c] {
        let mine = node.sessions_load().await.unwrap();
        for s in &mine {
            node.sessions_save(put(s)).await.unwrap();
        }
        holders += mine.len();
    }
    assert_eq!(holders, held.len());
}

//! Issue #19, hole 7: small defects the outside probe found. Duplicate
//! members in a payload are `INVALID_PAYLOAD` (nothing applied);
//! `recoverConnections` with an epoch that is not the main session's says
//! so truthfully; a token whose `nbf` is in the future is not valid yet.

use crate::harness::*;
use rungate::ids::Capability;
use serde_json::{Value, json};

async fn error_of(rt: &mut Client, id: &str) -> Value {
    let answer = rt.answer(id).await;
    assert_eq!(answer["type"], "error", "{answer}");
    answer["error"].clone()
}

#[tokio::test]
async fn duplicate_members_in_payloads_are_invalid_payload() {
    let gw = TestGateway::start().await;
    let mut rt = gw.runtime("*").await;
    let sid = rt.attach("dup-1", "i", &["kv.read", "kv.write"]).await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();

    // kv.set {"a":"1","a":"2"}: refused, nothing stored.
    rt.send_text(&format!(
        r#"{{"id":"d1","type":"kv.set","payload":{{"sessionId":"{sid}","runId":"dup-1","kv":{{"a":"1","a":"2"}}}}}}"#
    ))
    .await;
    let err = error_of(&mut rt, "d1").await;
    assert_eq!(err["code"], "INVALID_PAYLOAD", "{err}");
    assert_eq!(err["details"]["path"], "/payload/kv/a", "{err}");
    let got = rt
        .ok(
            "kv.get",
            json!({ "sessionId": sid, "runId": "dup-1", "keys": ["a"] }),
        )
        .await;
    assert_eq!(
        got["kv"],
        json!({}),
        "nothing of the refused write is stored"
    );

    // Repeated keys in heartbeat metadata.
    rt.send_text(&format!(
        r#"{{"id":"d2","type":"runtime.heartbeat","payload":{{"sessionId":"{sid}","runId":"dup-1","metadata":{{"step":1,"step":2}}}}}}"#
    ))
    .await;
    let err = error_of(&mut rt, "d2").await;
    assert_eq!(err["code"], "INVALID_PAYLOAD", "{err}");
    assert_eq!(err["details"]["path"], "/payload/metadata/step", "{err}");

    // A duplicate member of the payload itself.
    rt.send_text(&format!(
        r#"{{"id":"d3","type":"runtime.heartbeat","payload":{{"sessionId":"{sid}","runId":"dup-1","runId":"dup-1"}}}}"#
    ))
    .await;
    let err = error_of(&mut rt, "d3").await;
    assert_eq!(err["code"], "INVALID_PAYLOAD", "{err}");
    assert_eq!(err["details"]["path"], "/payload/runId", "{err}");

    // The same members once each are fine, and the socket goes on.
    rt.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sid, "runId": "dup-1", "metadata": { "step": 1, "load": 2 } }),
    )
    .await;
}

#[tokio::test]
async fn recover_connections_with_another_epoch_than_the_mains_says_so() {
    let gw = TestGateway::start().await;
    let mut rt = gw.runtime("*").await;
    let sid = rt.attach("main-1", "i", &["subtasks.run"]).await["sessionId"].clone();
    // The main session is at epoch 0; 5 is above it.
    let answer = rt
        .call(
            "runtime.recoverConnections",
            json!({ "sessionId": sid, "mainRunId": "main-1", "connectionEpoch": 5 }),
        )
        .await;
    assert_eq!(answer["type"], "error", "{answer}");
    let err = &answer["error"];
    assert_eq!(err["code"], "STALE_EPOCH", "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(
        !message.contains("not greater than"),
        "5 is greater than 0; the message must not say otherwise: {message}"
    );
    assert!(message.contains('5') && message.contains('0'), "{message}");
    assert_eq!(err["details"]["offeredEpoch"], 5, "{err}");
    assert_eq!(err["details"]["currentEpoch"], 0, "{err}");
    // The main's own epoch is accepted.
    rt.ok(
        "runtime.recoverConnections",
        json!({ "sessionId": sid, "mainRunId": "main-1", "connectionEpoch": 0 }),
    )
    .await;
}

/// A token signed with the gateway's key whose `nbf` is `nbf_offset`
/// seconds from now.
fn token_with_nbf(gw: &TestGateway, nbf_offset: i64) -> String {
    let text = std::fs::read_to_string(gw.dir.path().join("data/auth.key")).unwrap();
    let text = text.trim();
    let secret: Vec<u8> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = json!({ "kind": "runtime", "runs": ["*"], "caps": [],
        "iat": now, "nbf": now + nbf_offset, "exp": now + 3600 });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&secret),
    )
    .unwrap()
}

#[tokio::test]
async fn a_token_not_valid_yet_is_refused() {
    let gw = TestGateway::start().await;
    let url = gw.url("/v1/runtime");
    // Sanity: the hand-made token is right when nbf has passed.
    assert_eq!(
        connect_status(&url, Some(&token_with_nbf(&gw, -60))).await,
        101
    );
    assert_eq!(
        connect_status(&url, Some(&token_with_nbf(&gw, 3600))).await,
        401,
        "a token whose nbf is an hour ahead is not valid yet"
    );
    // A token minted by the gateway's own tool still works.
    let ok = gw.token(rungate::auth::TokenKind::Runtime, "*", &Capability::ALL);
    assert_eq!(connect_status(&url, Some(&ok)).await, 101);
}

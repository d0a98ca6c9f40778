//! A runtime that publishes output events, written against the wire
//! protocol alone (plain `tokio-tungstenite` and `serde_json`, nothing from
//! the rungate crate).
//!
//! It attaches RUN, then publishes COUNT events in batches of BATCH, each
//! event `{"type":"tick","seq":N,"data":{"n":N}}` with `seq` counting from 1,
//! waiting for each `events.publish` reply before the next batch (the reply
//! comes after the batch is appended), heartbeating at the interval the
//! attach reply gave, and prints `published COUNT` at the end.
//!
//! ```text
//! cargo run --example raw_publisher -- --url ws://127.0.0.1:7700/v1/runtime \
//!     --token "$TOKEN" --run demo-1 --count 1000 --batch 20 --pause-ms 5
//! ```

use std::error::Error;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const USAGE: &str =
    "usage: raw_publisher --url URL --token TOKEN --run RUN [--count N] [--batch N] [--pause-ms N]";

struct Args {
    url: String,
    token: String,
    run: String,
    count: u64,
    batch: u64,
    pause: Duration,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        url: String::new(),
        token: String::new(),
        run: String::new(),
        count: 1000,
        batch: 20,
        pause: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--url" => args.url = value,
            "--token" => args.token = value,
            "--run" => args.run = value,
            "--count" => args.count = value.parse()?,
            "--batch" => args.batch = value.parse::<u64>()?.max(1),
            "--pause-ms" => args.pause = Duration::from_millis(value.parse()?),
            _ => return Err(format!("unknown option {flag}\n{USAGE}").into()),
        }
    }
    if args.url.is_empty() || args.token.is_empty() || args.run.is_empty() {
        return Err(USAGE.into());
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let mut request = args.url.as_str().into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", args.token))?,
    );
    let (ws, _) = tokio_tungstenite::connect_async(request).await?;
    let mut conn = Conn { ws, next_id: 0 };

    let attached = conn
        .call(
        "runtime.attach",
        json!({ "runId": args.run, "runtimeInstanceId": "raw-publisher", "protocolVersion": "1" }),
    )
    .await?;
    let session = attached["sessionId"].clone();
    let interval =
        Duration::from_millis(attached["heartbeatIntervalMs"].as_u64().unwrap_or(10_000));
    println!("attached: run {}, session {session}", args.run);

    let mut next_heartbeat = Instant::now() + interval;
    let mut seq = 1u64;
    while seq <= args.count {
        let last = (seq + args.batch - 1).min(args.count);
        let events: Vec<Value> = (seq..=last)
            .map(|n| json!({ "type": "tick", "seq": n, "data": { "n": n } }))
            .collect();
        conn.call(
            "events.publish",
            json!({ "sessionId": session, "runId": args.run, "events": events }),
        )
        .await?;
        seq = last + 1;
        if Instant::now() >= next_heartbeat {
            conn.call(
                "runtime.heartbeat",
                json!({ "sessionId": session, "runId": args.run }),
            )
            .await?;
            next_heartbeat = Instant::now() + interval;
        }
        if !args.pause.is_zero() {
            tokio::time::sleep(args.pause).await;
        }
    }
    println!("published {}", args.count);
    conn.ws.close(None).await?;
    Ok(())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The socket and the next request id.
struct Conn {
    ws: Socket,
    next_id: u64,
}

impl Conn {
    /// Sends one request and waits for its answer; pushes that arrive
    /// meanwhile (such as `gateway.draining`) are printed and skipped. An
    /// error frame becomes an `Err` naming its code.
    async fn call(&mut self, kind: &str, payload: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id.to_string();
        let frame = json!({ "id": id, "type": kind, "payload": payload });
        self.ws.send(Message::text(frame.to_string())).await?;
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .map_err(|_| "no answer from the gateway in 30 s")?
                .ok_or("the gateway closed the socket")??;
            let Message::Text(text) = message else {
                continue;
            };
            let answer: Value = serde_json::from_str(text.as_str())?;
            if answer["id"] != id.as_str() {
                println!("push: {}", answer["type"]);
                continue;
            }
            return match answer["type"].as_str() {
                Some("reply") => Ok(answer["payload"].clone()),
                _ => Err(format!(
                    "{}: {}",
                    answer["error"]["code"].as_str().unwrap_or("?"),
                    answer["error"]["message"].as_str().unwrap_or("")
                )
                .into()),
            };
        }
    }
}

//! How rungate talks to Redis: one way to open a connection, for the
//! session store and the stream engine alike.
//!
//! Owns the connection settings (bounded connect and response times, the
//! connection manager's own reconnects), the check that the address is a
//! Redis at all, subscribing to a pub/sub channel within a bounded time,
//! and keeping passwords out of messages. Must not retry commands or
//! decide what a failure means to a caller: each engine maps errors to its
//! own (a retryable `Unavailable`), and resubscribes on its own schedule.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub};

/// How long one command may wait for Redis before it fails (an op of the
/// store is then answered `Unavailable`).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one attempt to connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts the connection manager makes per connect, on top of the first.
const CONNECT_RETRIES: usize = 2;
/// How long opening a connection may take: every attempt of it (the first
/// and [`CONNECT_RETRIES`] more, each up to [`CONNECT_TIMEOUT`]).
const OPEN_TIMEOUT: Duration = Duration::from_secs(6);
/// How long connecting a pub/sub connection and subscribing may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(6);

/// Why opening a connection failed; the URL is shown without its password.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Not a URL the Redis client takes.
    #[error("bad Redis URL {url:?}: {why}")]
    Url {
        /// The URL, redacted.
        url: String,
        /// The client's reason.
        why: String,
    },
    /// Nothing answered, or something that is not Redis did.
    #[error("cannot reach Redis at {url}: {why}")]
    Connect {
        /// The URL, redacted.
        url: String,
        /// What went wrong.
        why: String,
    },
}

/// Opens `url` the way both Redis engines talk to Redis: a client (for
/// pub/sub connections, see [`subscribe`]), and a connection manager with
/// bounded connect and response times that reconnects by itself; checked
/// with a `PING`, so a wrong address is an error at start.
pub(crate) async fn open(url: &str) -> Result<(redis::Client, ConnectionManager), OpenError> {
    let shown = redacted(url);
    let client = redis::Client::open(url).map_err(|e| OpenError::Url {
        url: shown.clone(),
        why: e.to_string(),
    })?;
    let unreachable = |why: String| OpenError::Connect {
        url: shown.clone(),
        why,
    };
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(CONNECT_RETRIES);
    let mut conn = tokio::time::timeout(
        OPEN_TIMEOUT,
        ConnectionManager::new_with_config(client.clone(), config),
    )
    .await
    .map_err(|_| unreachable("no answer in time".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| unreachable(format!("PING refused: {e}")))?;
    if pong != "PONG" {
        return Err(unreachable(format!(
            "answered PING with {pong:?}; is it Redis?"
        )));
    }
    Ok((client, conn))
}

/// Why [`subscribe`] failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SubscribeError {
    /// Redis refused, or the connection failed.
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    /// No answer within the subscribe timeout.
    #[error("no answer in time")]
    Timeout,
}

/// A new pub/sub connection of `client`, subscribed to `channel`. A lost
/// subscription is not renewed here: its owner calls this again.
pub(crate) async fn subscribe(
    client: &redis::Client,
    channel: &str,
) -> Result<PubSub, SubscribeError> {
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(SUBSCRIBE_TIMEOUT, connect).await {
        Ok(subscribed) => Ok(subscribed?),
        Err(_) => Err(SubscribeError::Timeout),
    }
}

/// `url` without its password, for messages and logs.
pub(crate) fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn the_password_never_shows() {
        assert_eq!(
            redacted("redis://:secret@127.0.0.1:6379/0"),
            "redis://***@127.0.0.1:6379/0"
        );
        assert_eq!(redacted("redis://user:secret@host/1"), "redis://***@host/1");
        assert_eq!(redacted("redis://host:6379"), "redis://host:6379");
    }
}

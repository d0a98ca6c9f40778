//! How a [`super::RuntimeClient`] reaches the gateway and how patient it
//! is. Plain settings: must not connect or check anything (the client
//! checks the instance id when it connects).

use std::time::Duration;

use crate::{Backoff, TokenSource};

/// How to reach the gateway and how patient to be.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// `ws://HOST:PORT/v1/runtime`.
    pub url: String,
    /// A runtime token covering the runs this client attaches (unless
    /// `token_source` is set).
    pub token: String,
    /// Asked for a token at every connection, so a client outlives any one
    /// token ([`RuntimeOptions::with_token_source`]).
    pub token_source: Option<TokenSource>,
    /// This runtime's identity; a reconnect must present the same one.
    pub runtime_instance_id: String,
    /// Longest a call waits for its answer.
    pub request_timeout: Duration,
    /// Longest one connection attempt (TCP + handshake) may take.
    pub connect_timeout: Duration,
    /// Delays between reconnect attempts after the socket is lost.
    pub backoff: Backoff,
}

impl RuntimeOptions {
    /// Options for `url` with a fixed `token` and this runtime's `runtimeInstanceId`; 30 s request
    /// timeout, 10 s connect timeout, default backoff.
    pub fn new(
        url: impl Into<String>,
        token: impl Into<String>,
        runtime_instance_id: impl Into<String>,
    ) -> RuntimeOptions {
        RuntimeOptions {
            url: url.into(),
            token: token.into(),
            token_source: None,
            runtime_instance_id: runtime_instance_id.into(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            backoff: Backoff::default(),
        }
    }

    /// Takes each connection's token from `source` instead of `token`: the
    /// gateway closes a socket when its token expires, and the client's
    /// reconnect then presents a fresh one (its sessions carry on).
    pub fn with_token_source(mut self, source: TokenSource) -> RuntimeOptions {
        self.token_source = Some(source);
        self
    }
}

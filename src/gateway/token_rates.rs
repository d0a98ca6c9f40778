//! The command rate of HTTP requests that do work (`GET /v1/runs`), per
//! token: the same budget a socket has (`max_commands_per_sec`,
//! `command_burst`), so looping on HTTP is no cheaper than on a socket.
//!
//! Owns one [`TokenBucket`] per token seen recently. The table is bounded:
//! when it reaches its size, buckets that have refilled completely are
//! forgotten (a new bucket starts full, so forgetting a full one changes
//! nothing). Must not know what a request is or how a refusal is answered.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::rate_limit::TokenBucket;
use crate::auth::TokenId;

/// Tokens tracked before full buckets are forgotten.
const MAX_TRACKED: usize = 100_000;

pub(crate) struct TokenRates {
    buckets: Mutex<HashMap<TokenId, TokenBucket>>,
    per_sec: u32,
    burst: u32,
}

impl TokenRates {
    pub fn new(per_sec: u32, burst: u32) -> TokenRates {
        TokenRates {
            buckets: Mutex::new(HashMap::new()),
            per_sec,
            burst,
        }
    }

    /// Takes one request's token for `token`, or says how long to wait.
    pub fn take(&self, token: TokenId, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock();
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&token) {
            buckets.retain(|_, b| !b.is_full(now));
        }
        buckets
            .entry(token)
            .or_insert_with(|| TokenBucket::new(self.per_sec, self.burst, now))
            .take(now)
    }
}

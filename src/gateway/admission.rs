//! How many long-lived connections are open — WebSockets on both endpoints
//! and SSE responses — in all and per token, and the permits that keep
//! those counts honest.
//!
//! Owns the two connection caps (`max_connections`, `max_sockets_per_token`).
//! A [`Permit`] is taken after the token is checked and before the upgrade
//! (or the SSE response) and gives its place back when dropped, so every
//! way a connection ends — close, error, a task that panics — frees it.
//! Must not know HTTP: `http` turns a [`Refused`] into a status and body.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::auth::TokenId;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error("the gateway holds its maximum of {max} connections; retry later")]
    GatewayFull { max: usize },
    #[error("this token already holds its maximum of {max} open connections; close one first")]
    TokenFull { max: usize },
}

/// The counts; cheap to clone (one `Arc`).
#[derive(Clone)]
pub(crate) struct Admission {
    inner: Arc<Inner>,
}

struct Inner {
    max_total: usize,
    max_per_token: usize,
    open: AtomicUsize,
    /// Only tokens with at least one connection open have an entry.
    per_token: DashMap<TokenId, usize>,
}

/// One admitted connection's place; dropping it frees the place.
pub(crate) struct Permit {
    inner: Arc<Inner>,
    token: TokenId,
}

impl Admission {
    pub fn new(max_total: usize, max_per_token: usize) -> Admission {
        Admission {
            inner: Arc::new(Inner {
                max_total,
                max_per_token,
                open: AtomicUsize::new(0),
                per_token: DashMap::new(),
            }),
        }
    }

    /// A place for one more connection of `token`, if both caps allow.
    pub fn admit(&self, token: TokenId) -> Result<Permit, Refused> {
        let inner = &self.inner;
        let max = inner.max_total;
        inner
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| Refused::GatewayFull { max })?;
        let max = inner.max_per_token;
        let mut over = false;
        // The entry holds its shard's lock, so check and increment are one step.
        inner
            .per_token
            .entry(token)
            .and_modify(|n| {
                if *n >= max {
                    over = true;
                } else {
                    *n += 1;
                }
            })
            .or_insert(1);
        if over {
            inner.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::TokenFull { max });
        }
        Ok(Permit {
            inner: inner.clone(),
            token,
        })
    }

    /// Connections admitted and not yet ended.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let inner = &self.inner;
        inner.open.fetch_sub(1, Ordering::AcqRel);
        // Decrement, and drop the entry at zero so the table holds only
        // tokens in use; `remove_if` re-checks under the lock in case the
        // token was admitted again in between.
        let now_zero = match inner.per_token.get_mut(&self.token) {
            Some(mut n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if now_zero {
            inner.per_token.remove_if(&self.token, |_, n| *n == 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AuthKey, RunScope, TokenKind};
    use crate::ids::Capabilities;

    fn token_ids(n: usize) -> Vec<TokenId> {
        let key = AuthKey::from_secret(b"admission test key");
        let scope = RunScope::parse_list("*").unwrap();
        (0..n)
            .map(|_| {
                let t = key
                    .mint(
                        TokenKind::Viewer,
                        &scope,
                        Capabilities::default(),
                        std::time::Duration::from_secs(60),
                    )
                    .unwrap();
                key.verify(&t).unwrap().token
            })
            .collect()
    }

    #[test]
    fn per_token_cap_then_place_given_back() {
        let ids = token_ids(2);
        let a = Admission::new(10, 2);
        let p1 = a.admit(ids[0]).unwrap();
        let _p2 = a.admit(ids[0]).unwrap();
        assert_eq!(a.admit(ids[0]).err(), Some(Refused::TokenFull { max: 2 }));
        // Another token is not affected, and the refusal held no place.
        let _q = a.admit(ids[1]).unwrap();
        assert_eq!(a.open(), 3);
        drop(p1);
        assert_eq!(a.open(), 2);
        let _p3 = a.admit(ids[0]).unwrap();
    }

    #[test]
    fn global_cap_then_place_given_back() {
        let ids = token_ids(3);
        let a = Admission::new(2, 10);
        let p1 = a.admit(ids[0]).unwrap();
        let _p2 = a.admit(ids[1]).unwrap();
        assert_eq!(a.admit(ids[2]).err(), Some(Refused::GatewayFull { max: 2 }));
        drop(p1);
        let _p3 = a.admit(ids[2]).unwrap();
        assert_eq!(a.open(), 2);
    }

    #[test]
    fn the_table_forgets_tokens_with_nothing_open() {
        let ids = token_ids(1);
        let a = Admission::new(10, 10);
        let p = a.admit(ids[0]).unwrap();
        assert_eq!(a.inner.per_token.len(), 1);
        drop(p);
        assert_eq!(a.inner.per_token.len(), 0);
        assert_eq!(a.open(), 0);
    }
}

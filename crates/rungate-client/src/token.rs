//! Where a client gets the token for each connection it opens.
//!
//! The gateway closes a socket when its token expires (1008, `token
//! expired`), so a client that runs longer than one token needs a new one
//! at each reconnect: a [`TokenSource`] is asked every time. Must not
//! cache: the source decides when a token is still good.

use std::fmt;
use std::sync::Arc;

/// Hands out a token for the next connection (minted, read from a file a
/// credential helper refreshes, fetched from a secret store…).
#[derive(Clone)]
pub struct TokenSource(Arc<dyn Fn() -> String + Send + Sync>);

impl TokenSource {
    /// A source that calls `source` once per connection attempt.
    pub fn new(source: impl Fn() -> String + Send + Sync + 'static) -> TokenSource {
        TokenSource(Arc::new(source))
    }

    /// A token for the connection about to open.
    pub fn token(&self) -> String {
        (self.0)()
    }
}

/// The token for the connection about to open: from `source` if the
/// client has one, else the `fixed` token it was given.
pub(crate) fn for_connection(fixed: &str, source: Option<&TokenSource>) -> String {
    match source {
        Some(source) => source.token(),
        None => fixed.to_owned(),
    }
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token itself.
        f.write_str("TokenSource(..)")
    }
}

//! Helpers the test suites of the workspace share, so no test includes
//! another's files by path: [`redis`] (a throwaway `redis-server` per
//! test), [`proxy`] (a TCP proxy that cuts, stalls and slows connections),
//! [`raw_ws`] (a WebSocket spoken byte by byte, for malformed frames),
//! [`http`] (a small HTTP/1.1 and SSE client), [`schema`] (spec/ loaded and
//! compiled, to validate real frames) and [`browser`] (headless Chromium).
//!
//! Owns test plumbing only. Must not know the gateway's internals: it
//! speaks sockets, files and processes, so the gateway's own tests and the
//! clients' tests can use it alike.

#![allow(missing_docs, unreachable_pub, dead_code)]

use std::time::Duration;

pub mod browser;
pub mod http;
pub mod proxy;
pub mod raw_ws;
pub mod redis;
pub mod schema;

/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(10);

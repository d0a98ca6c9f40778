//! The gateway's integration tests, one module per area, linked into one
//! binary (one link instead of one per file). `harness` starts gateways
//! (in-process or as processes) and speaks to them; the plumbing that other
//! suites share (redis-servers, the fault proxy, raw sockets, HTTP/SSE, the
//! spec validator, Chromium) is in the `rungate-test-support` crate.
//!
//! Run one area with `cargo test --test it streams::`.

mod harness;

mod bad_disks;
mod browser_safety;
mod client;
mod client_faults;
mod crash;
mod cross_process;
mod dashboard;
mod demo;
mod examples;
mod hostile_input;
mod isolation;
mod lifecycle;
mod lifecycle_browser;
mod lifecycle_process;
mod lifecycle_redis;
mod limits;
mod multi_node;
mod process;
mod quotas;
mod redis_engine;
mod redis_streams;
mod reliability_fairness;
mod reliability_http;
mod reliability_memory;
mod reliability_replies;
mod reliability_small;
mod reliability_tenants;
mod runtime_commands;
mod runtime_sessions;
mod scopes;
mod spec_live;
mod spec_schemas;
mod sse_and_runs;
mod streams;

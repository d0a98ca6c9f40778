//! The fault proxy, re-exported: it lives in its own crate,
//! `rungate-fault-proxy`, so the soak in `rungate-loadgen` (a binary) and
//! these tests share one proxy without the binary depending on test plumbing.

pub use rungate_fault_proxy::*;

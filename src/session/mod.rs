//! Sessions, leases and connection epochs (PROTOCOL.md §3). (in progress)

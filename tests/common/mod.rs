#![allow(dead_code)]

pub mod harness;
pub mod http;
pub mod proxy;
pub mod raw_ws;
pub mod redis;
pub mod schema;

//! The wire protocol: envelope, typed commands, error codes. No I/O.
//!
//! Decoding goes [`envelope::decode`] (the outside of a frame) then
//! [`commands::Command::parse`] (the payload, by type). Encoding produces
//! shared [`envelope::Frame`] bytes. [`any_json`] checks the members
//! whose value may be any JSON; [`duplicates`] finds a repeated member
//! anywhere in a payload.

pub mod any_json;
pub mod commands;
pub mod duplicates;
pub mod envelope;
pub mod error;

pub use commands::{Command, CommandKind};
pub use envelope::{Frame, Rejected, Request, decode, encode_error, encode_push, encode_reply};
pub use error::{CommandError, ErrorCode};

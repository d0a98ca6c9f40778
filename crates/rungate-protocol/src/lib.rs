//! rungate wire protocol v1, shared by the gateway and every Rust client:
//! identifiers ([`ids`]), timestamps ([`time`]), the envelope and its codec
//! ([`envelope`]), typed command payloads ([`commands`]), error codes
//! ([`error`]), push payloads and their reader ([`push`]), the members
//! whose value may be any JSON ([`any_json`]), a
//! repeated member anywhere in a payload ([`duplicates`]), reading a
//! frame value by value while keeping each value's text (`cursor`) and
//! the `stream.events` / `stream.gap` frames a ring stores
//! ([`stream_frame`]).
//!
//! The gateway decodes with [`envelope::decode`] (the outside of a frame)
//! then [`commands::Command::parse`] (the payload, by type), or both in
//! one read with [`envelope::decode_typed`] for a frame laid out as
//! clients write it. A client
//! encodes a typed payload with [`envelope::encode_command`] (the payload's
//! [`CommandPayload`] names its `type` and its reply's type) and sorts what
//! comes back with [`envelope::decode_incoming`], typing a push's payload
//! with [`push::Push::parse`]. Encoding produces shared
//! [`envelope::Frame`] bytes.
//!
//! Owns what a frame looks like. Must not do I/O, keep time, or know what
//! a command does: applying commands is the gateway's, sending them the
//! clients'. Depends on serde, serde_json and bytes, never on tokio, so a
//! client that embeds it compiles nothing of the server.

pub mod any_json;
pub mod commands;
mod cursor;
pub mod duplicates;
pub mod envelope;
pub mod error;
pub mod ids;
pub mod push;
pub mod stream_frame;
pub mod time;

pub use commands::{Command, CommandKind, CommandPayload};
pub use envelope::{
    Encoded, Frame, Incoming, Rejected, Request, TypedRequest, decode, decode_incoming,
    decode_typed, encode_command, encode_error, encode_error_body, encode_push, encode_reply,
    encode_request,
};
pub use error::{CommandError, ErrorCode};

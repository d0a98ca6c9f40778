//! What a [`super::RuntimeClient`] handle asks its driver: one message per
//! call, each with the channel its answer comes back on.
//!
//! Must not hold JSON: a call on an attached run carries the code that
//! builds its typed request once the driver knows the run's session.

use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::client::{Attached, Event};
use super::follows::Items;
use super::runs::AttachSpec;
use crate::ClientError;
use rungate_protocol::Frame;
use rungate_protocol::ids::{RunId, SessionId};

type Answer<T> = oneshot::Sender<Result<T, ClientError>>;

/// Encodes a call's typed request under a request id, for the run's
/// current session.
pub(super) type EncodeCall = Box<dyn FnOnce(&str, SessionId, RunId) -> Frame + Send>;

pub(super) enum Op {
    Attach {
        spec: AttachSpec,
        reply: Answer<Attached>,
    },
    /// A command on an attached run; answered with the reply's payload,
    /// which the handle types.
    Call {
        run: String,
        encode: EncodeCall,
        reply: Answer<Box<RawValue>>,
    },
    Publish {
        run: String,
        events: Vec<Event>,
        reply: Answer<()>,
    },
    Follow {
        run: String,
        from_offset: Option<u64>,
        items: Items,
        reply: Answer<()>,
    },
    /// The run was finished: forget it.
    Ended {
        run: String,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

//! `events.publish`: a batch of a run's output events appended to its
//! stream.
//!
//! Owns the per-publish limits (events per batch, bytes per event, with
//! `details.path` naming the event), the publisher's fence (its session
//! and epoch, which an engine several gateways share checks in the same
//! step as the append) and the published-events metric. Must not assign
//! offsets, drop duplicates or build the `stream.events` frame: the stream
//! engine does, once per batch, before this returns, so batches keep the
//! order they arrived in even when their replies do not.

use futures_util::FutureExt;
use serde_json::json;
use tokio::time::Instant;

use super::access::session_for;
use super::{ConnCtx, Reply};
use crate::gateway::errors::stream_error_of;
use crate::protocol::commands::{Accepted, PublishOutputEventsRequest, PublishedEvent};
use crate::protocol::{CommandError, CommandKind, ErrorCode, encode_reply};
use crate::stream::Publisher;

/// `events.publish`.
pub(crate) fn publish(
    ctx: &ConnCtx,
    id: &str,
    req: PublishOutputEventsRequest<PublishedEvent<'_>>,
) -> Result<Reply, CommandError> {
    let session = session_for(
        ctx,
        CommandKind::EventsPublish,
        &req.session_id,
        &req.run_id,
    )?;
    let limits = &ctx.shared.config.limits;
    if req.events.len() > limits.max_events_per_publish {
        return Err(CommandError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "{} events in one publish; the limit is {}",
                req.events.len(),
                limits.max_events_per_publish
            ),
        )
        .with_details(json!({ "maxEventsPerPublish": limits.max_events_per_publish })));
    }
    if let Some(i) = req
        .events
        .iter()
        .position(|e| e.json.len() > limits.max_event_bytes)
    {
        return Err(CommandError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "event {i} is {} bytes; the limit is {}",
                req.events[i].json.len(),
                limits.max_event_bytes
            ),
        )
        .with_details(json!({ "path": format!("/payload/events/{i}"), "maxEventBytes": limits.max_event_bytes })));
    }
    // The engine fixes the batch's place in the stream before returning, so
    // publishes are ordered as they arrived even if their replies are not.
    let publisher = Publisher {
        session_id: session.session_id.as_str(),
        epoch: session.epoch,
    };
    let pending =
        ctx.shared
            .streams
            .publish_as(&req.run_id, &req.events, publisher, Instant::now());
    let shared = ctx.shared.clone();
    let id = id.to_owned();
    let run = req.run_id.clone();
    Ok(Reply::Later(
        async move {
            let outcome = pending.await.map_err(|e| stream_error_of(&run, e))?;
            shared
                .metrics
                .events_published(outcome.accepted, outcome.duplicates);
            Ok(encode_reply(&id, &Accepted::YES))
        }
        .boxed(),
    ))
}

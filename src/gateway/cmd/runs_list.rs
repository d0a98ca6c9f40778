//! `runs.list` (on `/v1/stream`) and the listing `GET /v1/runs` shares
//! with it: the runs a viewer token covers, a page at a time.
//!
//! Owns a page ([`RunsPage`]: after a cursor, at most `limit` runs and as
//! many as fit the reply), which streams are listed (one with a session in
//! any state, or with events), and each run's state as a viewer reads it,
//! including sessions another gateway holds (from the shared store). Must
//! not walk every stream of the gateway: the engine answers the covered
//! runs after the cursor, as many as the page can take plus one.

use super::{ConnCtx, Reply, after_store};
use crate::auth::Grant;
use crate::gateway::state::Shared;
use crate::ids::RunId;
use crate::protocol::commands::{
    RUNS_LIST_MAX_LIMIT, RunState, RunSummary, RunsListCommand, RunsListResponse,
};
use crate::protocol::{CommandError, encode_reply};
use crate::session::SessionState;
use crate::store::StoreFuture;

/// `runs.list`.
pub(crate) fn list(ctx: &ConnCtx, id: &str, req: RunsListCommand) -> Result<Reply, CommandError> {
    let limit = match req.limit {
        None => usize::MAX,
        Some(n @ 1..=RUNS_LIST_MAX_LIMIT) => n as usize,
        Some(_) => {
            return Err(CommandError::invalid_payload(
                "/payload/limit",
                format!("limit must be 1 to {RUNS_LIST_MAX_LIMIT}"),
            ));
        }
    };
    let page = RunsPage {
        cursor: req.cursor,
        limit,
        max_bytes: ctx.shared.config.limits.max_reply_bytes,
    };
    let pending = runs(&ctx.shared, &ctx.grant, page);
    Ok(after_store(id, pending, |id, runs| {
        Ok(encode_reply(id, &runs))
    }))
}

/// Where a `runs.list` page starts and how large it may be.
pub(crate) struct RunsPage {
    /// Only runs after this one.
    pub cursor: Option<RunId>,
    pub limit: usize,
    /// The reply's size limit.
    pub max_bytes: usize,
}

impl RunsPage {
    /// A page of an HTTP body, which has no frame limit.
    pub fn http(cursor: Option<RunId>, limit: usize) -> RunsPage {
        RunsPage {
            cursor,
            limit,
            max_bytes: usize::MAX,
        }
    }
}

/// Most bytes of one run's summary in a reply besides its run id and
/// stream epoch: member names, a state, two 20-digit offsets, punctuation.
const SUMMARY_BYTES: usize = 160;

/// The runs `grant` covers that have a stream, with their session state:
/// the `runs.list` reply and the `GET /v1/runs` body.
///
/// A stream that no session ever fed and that holds nothing (a viewer
/// resumed a run that has not started) is not listed: there is no run to
/// show yet. A stream whose session is forgotten is listed as `expired`.
pub(crate) fn runs(
    shared: &Shared,
    grant: &Grant,
    page: RunsPage,
) -> StoreFuture<RunsListResponse> {
    // The page: covered runs after the cursor, in run id order, as many as
    // `limit` and the reply's size allow. A run that turns out not to be
    // listed (below) leaves the page shorter, never the next one wrong.
    let room = page
        .max_bytes
        .saturating_sub(crate::config::REPLY_OVERHEAD_BYTES);
    let mut used = 0usize;
    let mut next_cursor = None;
    let mut streams = Vec::new();
    // No more candidates than could fit, plus one to know whether more
    // follow: the cost follows the page, not the gateway's stream count.
    let fit = room / (SUMMARY_BYTES + 17);
    let wanted = page.limit.min(fit).saturating_add(1);
    let selectors: Vec<crate::stream::RunSelector<'_>> = grant
        .runs
        .patterns()
        .iter()
        .map(|p| crate::stream::RunSelector {
            text: p.prefix(),
            prefix: !p.is_exact(),
        })
        .collect();
    let candidates = shared
        .streams
        .runs_matching(&selectors, page.cursor.as_ref(), wanted);
    for s in candidates {
        let bytes = SUMMARY_BYTES + s.run_id.as_str().len() + s.stream_epoch.as_str().len();
        if streams.len() >= page.limit || used + bytes > room {
            next_cursor = streams
                .last()
                .map(|last: &crate::stream::StreamSummary| last.run_id.clone());
            break;
        }
        used += bytes;
        streams.push(s);
    }
    let states: Vec<Option<SessionState>> = shared.sessions.with(|registry| {
        streams
            .iter()
            .map(|s| registry.run_state(&s.run_id))
            .collect()
    });
    // Runs with no session held here may have one on another gateway.
    let elsewhere: Vec<RunId> = streams
        .iter()
        .zip(&states)
        .filter(|(_, state)| state.is_none())
        .map(|(s, _)| s.run_id.clone())
        .collect();
    let from_store = match shared.store.shared_sessions() {
        Some(store) if !elsewhere.is_empty() => Some(store.sessions_of_runs(elsewhere)),
        _ => None,
    };
    Box::pin(async move {
        // One record per run without a state here, in the same order.
        let mut records = match from_store {
            Some(loaded) => loaded.await?,
            None => Vec::new(),
        }
        .into_iter();
        let mut runs = Vec::with_capacity(streams.len());
        for (s, state) in streams.into_iter().zip(states) {
            let state = state.or_else(|| {
                records.next().flatten().map(|r| {
                    if r.expired {
                        SessionState::Expired
                    } else if r.attached {
                        SessionState::Attached
                    } else {
                        SessionState::Detached
                    }
                })
            });
            let state = match state {
                _ if s.end.is_some() => RunState::Ended,
                Some(SessionState::Attached) => RunState::Attached,
                Some(SessionState::Detached) => RunState::Detached,
                Some(SessionState::Expired) => RunState::Expired,
                None if s.next_offset > 0 => RunState::Expired,
                None => continue,
            };
            let end = s.end.as_deref();
            runs.push(RunSummary {
                run_id: s.run_id,
                state,
                stream_epoch: s.stream_epoch,
                first_offset: s.first_offset,
                next_offset: s.next_offset,
                outcome: end.map(|e| e.outcome),
                ended_at: end.map(|e| e.ended_at),
                message: end.and_then(|e| e.message.clone()),
            });
        }
        Ok(RunsListResponse { runs, next_cursor })
    })
}

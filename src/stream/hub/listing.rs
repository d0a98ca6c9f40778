//! Listings: every stream's summary, one run's, and the streams of the runs
//! a token's patterns cover, by id and prefix.
//!
//! Owns reading the ordered index of run ids (kept in step with the map by
//! [`StreamHub`]) so that a listing costs what it returns, not every stream
//! the gateway holds. Must not change anything; the index lock is never
//! held while a stream is locked.

use std::collections::BTreeSet;
use std::ops::Bound;

use super::StreamHub;
use crate::ids::RunId;
use crate::stream::ring::Ring;
use crate::stream::{RunSelector, StreamSummary};

impl StreamHub {
    /// The kept range of every run's stream, ordered by run id.
    pub fn runs(&self) -> Vec<StreamSummary> {
        let mut all: Vec<StreamSummary> = self
            .streams
            .iter()
            .map(|entry| summarize(&entry.value().state.read().ring))
            .collect();
        all.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        all
    }

    /// Up to `limit` streams of runs that `selectors` match, after run
    /// `after`, ordered by run id: from the ordered index, at most `limit`
    /// ids per selector, so a listing for one token costs what the token
    /// covers, not every stream the gateway holds.
    pub fn runs_matching(
        &self,
        selectors: &[RunSelector<'_>],
        after: Option<&RunId>,
        limit: usize,
    ) -> Vec<StreamSummary> {
        let mut picked = BTreeSet::new();
        {
            let ids = self.ids.read();
            for sel in selectors {
                if !sel.prefix {
                    if let Ok(id) = RunId::new(sel.text)
                        && after.is_none_or(|a| id > *a)
                        && ids.contains(&id)
                    {
                        picked.insert(id);
                    }
                    continue;
                }
                // From the later of the cursor and the prefix: every id
                // with the prefix sorts at or after the prefix itself.
                let from_prefix = RunId::new(sel.text).ok();
                let start = match (after, from_prefix) {
                    (Some(a), Some(p)) if p > *a => Bound::Included(p),
                    (Some(a), _) => Bound::Excluded(a.clone()),
                    (None, Some(p)) => Bound::Included(p),
                    (None, None) => Bound::Unbounded,
                };
                let matching = ids
                    .range((start, Bound::Unbounded))
                    .take_while(|id| id.as_str().starts_with(sel.text))
                    .take(limit);
                picked.extend(matching.cloned());
            }
        }
        // The index lock is released before any stream is locked.
        picked
            .into_iter()
            .filter_map(|id| self.summary(&id))
            .take(limit)
            .collect()
    }

    /// The kept range of `run`'s stream, if it has one.
    pub fn summary(&self, run: &RunId) -> Option<StreamSummary> {
        let stream = self.streams.get(run)?.clone();
        let state = stream.state.read();
        Some(summarize(&state.ring))
    }
}

fn summarize(ring: &Ring) -> StreamSummary {
    StreamSummary {
        run_id: ring.run().clone(),
        stream_epoch: ring.epoch().clone(),
        first_offset: ring.first_offset(),
        next_offset: ring.next_offset(),
        end: ring.visible_end().cloned(),
    }
}

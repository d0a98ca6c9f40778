//! The soak's checker: what publishers had acknowledged, what each viewer
//! was handed, and the verdict.
//!
//! Publishers record every batch the gateway answered `accepted` in the
//! [`Ledger`]; every viewer's stream of one run goes through its own
//! [`Tail`], which checks what can be checked as items arrive (contiguous
//! offsets, per-publisher order, fenced publishers, gaps) and keeps a
//! compact record of which events arrived. [`Ledger::verdict`] then
//! compares the two: every acknowledged event must have reached every tail
//! of its run exactly once.
//!
//! Events are recognised by what the soak puts in their `data`:
//! `{"p": publisher, "n": counter, "f": fenced}`. `p` grows with every
//! takeover of a run (a new client with a higher epoch), so once a run's
//! stream has carried publisher `p`, no event of an older publisher may
//! follow; `f` marks a publish tried *after* the client was told it was
//! superseded, which must never land.
//!
//! Owns the bookkeeping and the rules only: it must not do I/O or know
//! how events travel (WebSocket and SSE viewers feed it alike).

use std::collections::HashMap;

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;

/// Which counters a [`Tail`] can find broken; each is a violation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TailCounts {
    /// Events handed to this viewer.
    pub events: u64,
    /// Events handed over a second time (the same offset again, or the
    /// same publisher's counter at a new offset): `redelivered` +
    /// `stored_twice`.
    pub duplicated: u64,
    /// An offset handed over again (a delivery repeat: the stream itself
    /// may be right).
    pub redelivered: u64,
    /// A publisher's counter already handed over, at a new offset (the
    /// stream holds the event twice).
    pub stored_twice: u64,
    /// The first duplicate this tail saw, told plainly (where it was and
    /// what the tail expected), to tell the two kinds apart in a report.
    pub first_duplicate: Option<String>,
    /// Events whose publisher counter went backwards without being a
    /// repeat, or whose publisher was older than one already seen.
    pub reordered: u64,
    /// Offsets skipped without a gap being reported.
    pub unreported_gap_events: u64,
    /// Gaps reported (`stream.gap`, SSE `event: gap`).
    pub gaps_reported: u64,
    /// Offsets covered by reported gaps.
    pub reported_gap_events: u64,
    /// Reported gaps whose events were still kept when checked.
    pub false_gaps: u64,
    /// Events published after their client was told it was superseded.
    pub fenced_landed: u64,
    /// Resumes that said history was lost (`truncated`, a new stream
    /// epoch) or a stream that was closed under the viewer.
    pub history_lost: u64,
    /// The first loss of history this tail saw, told plainly (which kind,
    /// the offsets and epochs involved), so a report says which one it was.
    pub first_history_loss: Option<String>,
    /// Events whose `data` was not the soak's.
    pub foreign: u64,
}

/// Sorted, disjoint, inclusive ranges of counters.
#[derive(Debug, Clone, Default)]
struct RangeSet(Vec<(u64, u64)>);

impl RangeSet {
    fn contains(&self, n: u64) -> bool {
        let i = self.0.partition_point(|&(_, hi)| hi < n);
        self.0.get(i).is_some_and(|&(lo, _)| lo <= n)
    }

    /// Adds `lo..=hi`; the common case (appending right after the last
    /// range) is O(1).
    fn insert(&mut self, lo: u64, hi: u64) {
        if let Some(last) = self.0.last_mut() {
            if lo == last.1 + 1 {
                last.1 = hi;
                return;
            }
            if lo > last.1 {
                self.0.push((lo, hi));
                return;
            }
        } else {
            self.0.push((lo, hi));
            return;
        }
        self.0.push((lo, hi));
        self.0.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.0.len());
        for &(l, h) in &self.0 {
            match merged.last_mut() {
                Some(m) if l <= m.1.saturating_add(1) => m.1 = m.1.max(h),
                _ => merged.push((l, h)),
            }
        }
        self.0 = merged;
    }

    fn len(&self) -> u64 {
        self.0.iter().map(|&(l, h)| h - l + 1).sum()
    }

    /// How many of `other`'s members are not in `self`.
    fn missing_from(&self, other: &RangeSet) -> u64 {
        let mut missing = 0;
        for &(lo, hi) in &other.0 {
            let mut covered = 0;
            for &(l, h) in &self.0 {
                if h < lo || l > hi {
                    continue;
                }
                covered += h.min(hi) - l.max(lo) + 1;
            }
            missing += (hi - lo + 1) - covered;
        }
        missing
    }
}

/// One viewer's view of one run's stream.
#[derive(Debug)]
pub struct Tail {
    /// Which run (index into the soak's runs).
    pub run: usize,
    /// Who reads it ("ws-3", "sse-1").
    pub viewer: String,
    next_offset: Option<u64>,
    epoch: Option<String>,
    newest_publisher: u64,
    delivered: HashMap<u64, RangeSet>,
    last_n: HashMap<u64, u64>,
    /// The counters so far.
    pub counts: TailCounts,
    /// Gaps are expected (the tiny-ring mode): reported ones are not
    /// violations by themselves.
    gaps_allowed: bool,
}

impl Tail {
    /// A tail that has seen nothing yet. With `gaps_allowed` false, any
    /// reported gap is a violation.
    pub fn new(run: usize, viewer: impl Into<String>, gaps_allowed: bool) -> Tail {
        Tail {
            run,
            viewer: viewer.into(),
            next_offset: None,
            epoch: None,
            newest_publisher: 0,
            delivered: HashMap::new(),
            last_n: HashMap::new(),
            counts: TailCounts::default(),
            gaps_allowed,
        }
    }

    /// The offset this tail expects next (where a reconnect resumes).
    pub fn next_offset(&self) -> Option<u64> {
        self.next_offset
    }

    /// A (re)subscription started: `epoch` is the stream's epoch,
    /// `truncated` whether events this viewer was owed are gone, `start`
    /// the offset delivery starts at, `first` the oldest offset kept.
    /// Offsets skipped by a truncated resume count as a reported gap; a
    /// truncation of the same history while the offset owed is still kept
    /// is a false gap.
    ///
    /// Another epoch is a replaced history unless the gateway says nothing
    /// was truncated and delivery starts at the offset owed: the epoch the
    /// viewer was told lost a race to create the stream and names the same
    /// history (spec/README.md, "A stream two gateways create at once"; the
    /// events that follow are checked as ever).
    pub fn on_resumed(&mut self, epoch: &str, truncated: bool, start: u64, first: u64) {
        let renamed = !truncated && self.next_offset.is_none_or(|n| n == start);
        let replaced = self.epoch.as_deref().is_some_and(|e| e != epoch) && !renamed;
        if truncated && !replaced && self.next_offset.is_some_and(|n| n >= first && n < start) {
            self.counts.false_gaps += 1;
        }
        if truncated || replaced {
            self.counts.history_lost += 1;
            let (owed, before) = (self.next_offset, self.epoch.as_deref());
            self.counts.first_history_loss.get_or_insert_with(|| {
                let kind = if replaced {
                    "epoch replaced"
                } else {
                    "truncated"
                };
                format!(
                    "resume {kind}: epoch {before:?} -> {epoch}, owed {owed:?}, \
                     start {start}, first kept {first}"
                )
            });
            if let Some(next) = self.next_offset
                && start > next
            {
                self.counts.reported_gap_events += start - next;
                self.next_offset = Some(start);
            }
        }
        self.epoch = Some(epoch.to_owned());
    }

    /// The gateway dropped the stream's history under the viewer.
    pub fn on_closed(&mut self) {
        self.counts.history_lost += 1;
        let (owed, epoch) = (self.next_offset, self.epoch.as_deref());
        self.counts.first_history_loss.get_or_insert_with(|| {
            format!("closed under the viewer: epoch {epoch:?}, owed {owed:?}")
        });
    }

    /// A reported gap: offsets `from..=to` will not come. `really_dropped`
    /// says whether a look at the stream afterwards confirmed they are no
    /// longer kept (`None`: not checked).
    pub fn on_gap(&mut self, from: u64, to: u64, really_dropped: Option<bool>) {
        self.counts.gaps_reported += 1;
        self.counts.reported_gap_events += to.saturating_sub(from) + 1;
        if really_dropped == Some(false) {
            self.counts.false_gaps += 1;
        }
        if self.next_offset.is_none_or(|n| to + 1 > n) {
            self.next_offset = Some(to + 1);
        }
    }

    /// One event at `offset`; `event` is the OutputEvent JSON as published
    /// (`{"type", "data", "seq", ...}`).
    pub fn on_event(&mut self, offset: u64, event: &Value) {
        self.counts.events += 1;
        if let Some(next) = self.next_offset {
            if offset < next {
                self.counts.duplicated += 1;
                self.counts.redelivered += 1;
                self.counts.first_duplicate.get_or_insert_with(|| {
                    format!("offset {offset} again, expected {next}: {event}")
                });
                return;
            }
            if offset > next {
                self.counts.unreported_gap_events += offset - next;
            }
        }
        self.next_offset = Some(offset + 1);
        let data = &event["data"];
        let (Some(p), Some(n)) = (data["p"].as_u64(), data["n"].as_u64()) else {
            self.counts.foreign += 1;
            return;
        };
        if data["f"].as_bool() == Some(true) {
            self.counts.fenced_landed += 1;
        }
        if p < self.newest_publisher {
            self.counts.reordered += 1;
        }
        self.newest_publisher = self.newest_publisher.max(p);
        let set = self.delivered.entry(p).or_default();
        let last = self.last_n.entry(p).or_insert(0);
        if *last != 0 && n <= *last {
            if set.contains(n) {
                self.counts.duplicated += 1;
                self.counts.stored_twice += 1;
                let newest = *last;
                self.counts.first_duplicate.get_or_insert_with(|| {
                    format!(
                        "publisher {p} counter {n} again at offset {offset} \
                         (its newest before: {newest}): {event}"
                    )
                });
                return;
            }
            self.counts.reordered += 1;
        }
        *last = (*last).max(n);
        set.insert(n, n);
    }

    /// How many events this tail holds, of all publishers.
    pub fn delivered(&self) -> u64 {
        self.delivered.values().map(RangeSet::len).sum()
    }

    /// The violations this tail found by itself (lost events are only
    /// known against the ledger).
    pub fn violations(&self) -> u64 {
        let c = &self.counts;
        let gaps = if self.gaps_allowed {
            c.false_gaps
        } else {
            c.gaps_reported
        };
        c.duplicated
            + c.reordered
            + c.unreported_gap_events
            + gaps
            + c.fenced_landed
            + if self.gaps_allowed { 0 } else { c.history_lost }
            + c.foreign
    }
}

/// What publishers had acknowledged, per run and publisher.
#[derive(Debug, Default)]
pub struct Ledger {
    runs: Mutex<HashMap<usize, HashMap<u64, RangeSet>>>,
}

/// The checker's verdict on the event streams.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    /// Events acknowledged to publishers.
    pub acked: u64,
    /// (acknowledged event, tail) pairs where the event never arrived and
    /// no reported gap accounts for it. Goal: 0.
    pub lost: u64,
    /// Acknowledged events missing from tails but covered by reported
    /// gaps (tiny-ring mode only).
    pub lost_in_reported_gaps: u64,
    /// Events delivered more than once, over all tails. Goal: 0.
    pub duplicated: u64,
    /// Counters summed over all tails.
    pub totals: TailCounts,
    /// Tails whose counters show a violation, and the first few of them.
    pub failing_tails: Vec<String>,
    /// Violations in all (lost, duplicated and every tail rule).
    pub violations: u64,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// The gateway accepted publisher `p`'s events `first..=last` on `run`.
    pub fn acked(&self, run: usize, p: u64, first: u64, last: u64) {
        self.runs
            .lock()
            .entry(run)
            .or_default()
            .entry(p)
            .or_default()
            .insert(first, last);
    }

    /// Events acknowledged on `run`.
    pub fn acked_on(&self, run: usize) -> u64 {
        self.runs
            .lock()
            .get(&run)
            .map(|m| m.values().map(RangeSet::len).sum())
            .unwrap_or(0)
    }

    /// Acknowledged events of `run` that `tail` has not been handed.
    pub fn missing(&self, tail: &Tail) -> u64 {
        let runs = self.runs.lock();
        let Some(pubs) = runs.get(&tail.run) else {
            return 0;
        };
        let empty = RangeSet::default();
        pubs.iter()
            .map(|(p, acked)| tail.delivered.get(p).unwrap_or(&empty).missing_from(acked))
            .sum()
    }

    /// Compares every tail with what was acknowledged.
    pub fn verdict<'a>(&self, tails: impl IntoIterator<Item = &'a Tail>) -> Verdict {
        let mut v = Verdict {
            acked: self
                .runs
                .lock()
                .values()
                .flat_map(|m| m.values())
                .map(RangeSet::len)
                .sum(),
            ..Verdict::default()
        };
        for tail in tails {
            let missing = self.missing(tail);
            let explained = if tail.gaps_allowed {
                missing.min(tail.counts.reported_gap_events)
            } else {
                0
            };
            let lost = missing - explained;
            v.lost += lost;
            v.lost_in_reported_gaps += explained;
            v.duplicated += tail.counts.duplicated;
            let c = &tail.counts;
            let t = &mut v.totals;
            t.events += c.events;
            t.duplicated += c.duplicated;
            t.redelivered += c.redelivered;
            t.stored_twice += c.stored_twice;
            if t.first_duplicate.is_none() {
                t.first_duplicate.clone_from(&c.first_duplicate);
            }
            t.reordered += c.reordered;
            t.unreported_gap_events += c.unreported_gap_events;
            t.gaps_reported += c.gaps_reported;
            t.reported_gap_events += c.reported_gap_events;
            t.false_gaps += c.false_gaps;
            t.fenced_landed += c.fenced_landed;
            t.history_lost += c.history_lost;
            if t.first_history_loss.is_none() {
                t.first_history_loss.clone_from(&c.first_history_loss);
            }
            t.foreign += c.foreign;
            let bad = lost + tail.violations();
            if bad > 0 {
                v.violations += bad;
                if v.failing_tails.len() < 10 {
                    v.failing_tails.push(format!(
                        "run {} at {}: lost {lost}, {:?}",
                        tail.run, tail.viewer, tail.counts
                    ));
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ev(p: u64, n: u64) -> Value {
        json!({"type": "soak", "data": {"p": p, "n": n, "f": false}, "seq": n})
    }

    /// Publisher 1 acknowledged 1..=20 on run 0; the tail gets them at
    /// offsets 0..20, with `skip` left out and `twice` handed over twice.
    fn feed(skip: Option<u64>, twice: Option<u64>) -> Verdict {
        let ledger = Ledger::new();
        ledger.acked(0, 1, 1, 20);
        let mut tail = Tail::new(0, "ws-0", false);
        tail.on_resumed("e1", false, 0, 0);
        for n in 1..=20u64 {
            if Some(n) == skip {
                continue;
            }
            tail.on_event(n - 1, &ev(1, n));
            if Some(n) == twice {
                tail.on_event(n - 1, &ev(1, n));
            }
        }
        ledger.verdict([&tail])
    }

    #[test]
    fn a_clean_stream_passes() {
        let v = feed(None, None);
        assert_eq!((v.acked, v.lost, v.duplicated, v.violations), (20, 0, 0, 0));
    }

    #[test]
    fn a_dropped_event_is_reported_lost() {
        let v = feed(Some(10), None);
        assert_eq!(v.lost, 1);
        // The offset it held was skipped without a gap report, too.
        assert_eq!(v.totals.unreported_gap_events, 1);
        assert!(v.violations >= 2, "{v:?}");
    }

    #[test]
    fn a_repeated_event_is_reported_duplicated() {
        let v = feed(None, Some(10));
        assert_eq!((v.lost, v.duplicated), (0, 1));
        assert_eq!((v.totals.redelivered, v.totals.stored_twice), (1, 0));
        let first = v.totals.first_duplicate.expect("told");
        assert!(first.starts_with("offset 9 again, expected 10"), "{first}");
        assert_eq!(v.violations, 1);
    }

    #[test]
    fn the_same_event_stored_twice_is_a_duplicate() {
        let ledger = Ledger::new();
        ledger.acked(0, 1, 1, 2);
        let mut tail = Tail::new(0, "sse-0", false);
        tail.on_event(0, &ev(1, 1));
        tail.on_event(1, &ev(1, 1));
        tail.on_event(2, &ev(1, 2));
        let v = ledger.verdict([&tail]);
        assert_eq!(v.duplicated, 1);
        assert_eq!((v.totals.redelivered, v.totals.stored_twice), (0, 1));
        let first = v.totals.first_duplicate.expect("told");
        assert!(
            first.starts_with("publisher 1 counter 1 again at offset 1"),
            "{first}"
        );
    }

    #[test]
    fn fenced_and_older_publishers_are_violations() {
        let mut tail = Tail::new(0, "ws-0", false);
        tail.on_event(0, &ev(2, 1));
        tail.on_event(1, &ev(1, 5));
        tail.on_event(
            2,
            &json!({"type": "soak", "data": {"p": 2, "n": 2, "f": true}}),
        );
        assert_eq!(tail.counts.reordered, 1);
        assert_eq!(tail.counts.fenced_landed, 1);
        assert_eq!(tail.violations(), 2);
    }

    #[test]
    fn gaps_fail_unless_allowed_and_real() {
        let ledger = Ledger::new();
        ledger.acked(0, 1, 1, 10);
        let mut strict = Tail::new(0, "ws-0", false);
        let mut tiny = Tail::new(0, "ws-1", true);
        for t in [&mut strict, &mut tiny] {
            t.on_event(0, &ev(1, 1));
            t.on_gap(1, 4, Some(true));
            for n in 6..=10 {
                t.on_event(n - 1, &ev(1, n));
            }
        }
        let v = ledger.verdict([&strict]);
        assert_eq!(v.lost, 4);
        assert!(v.violations >= 5);
        let v = ledger.verdict([&tiny]);
        assert_eq!((v.lost, v.lost_in_reported_gaps, v.violations), (0, 4, 0));
        tiny.on_gap(10, 10, Some(false));
        assert_eq!(tiny.violations(), 1);
    }

    #[test]
    fn a_truncated_resume_counts_as_a_gap_and_must_be_real() {
        let mut tail = Tail::new(0, "ws-0", true);
        tail.on_resumed("e1", false, 0, 0);
        tail.on_event(0, &ev(1, 1));
        // Owed offset 1, the oldest kept is 5: a real truncation.
        tail.on_resumed("e1", true, 5, 5);
        assert_eq!(
            (tail.counts.reported_gap_events, tail.counts.false_gaps),
            (4, 0)
        );
        assert_eq!(tail.next_offset(), Some(5));
        // Owed 5, still kept, yet skipped to 9: false.
        tail.on_resumed("e1", true, 9, 3);
        assert_eq!(tail.counts.false_gaps, 1);
    }

    #[test]
    fn a_replaced_history_is_a_violation() {
        let mut tail = Tail::new(0, "ws-0", false);
        tail.on_resumed("e1", false, 0, 0);
        tail.on_resumed("e1", false, 0, 0);
        assert_eq!(tail.violations(), 0);
        tail.on_resumed("e2", true, 0, 0);
        assert_eq!(tail.violations(), 1);
        let told = tail.counts.first_history_loss.clone().unwrap_or_default();
        assert!(told.starts_with("resume epoch replaced"), "{told}");
        assert!(told.contains("\"e1\"") && told.contains("e2"), "{told}");
        // Only the first loss is told.
        tail.on_closed();
        assert_eq!(
            tail.counts.first_history_loss.as_deref(),
            Some(told.as_str())
        );
    }

    /// The soak's two-node flake (2026-12-04): a viewer told a proposal
    /// that lost the race to create the stream resumes under it and is
    /// answered with the winning epoch, not truncated, where it was owed.
    #[test]
    fn an_epoch_renamed_without_a_loss_is_the_same_history() {
        let mut tail = Tail::new(0, "ws-0", false);
        tail.on_resumed("lost", false, 0, 0);
        for n in 0..3 {
            tail.on_event(n, &ev(1, n + 1));
        }
        tail.on_resumed("won", false, 3, 0);
        assert_eq!(tail.violations(), 0, "{:?}", tail.counts);
        // But not where it starts elsewhere than owed, nor when truncated.
        let mut skipped = Tail::new(0, "ws-1", false);
        skipped.on_resumed("lost", false, 0, 0);
        skipped.on_event(0, &ev(1, 1));
        skipped.on_resumed("won", false, 0, 0);
        assert_eq!(skipped.violations(), 1);
        let mut cut = Tail::new(0, "ws-2", false);
        cut.on_resumed("lost", false, 0, 0);
        cut.on_event(0, &ev(1, 1));
        cut.on_resumed("won", true, 1, 0);
        assert_eq!(cut.violations(), 1);
    }

    #[test]
    fn a_stream_closed_under_a_viewer_is_told_as_such() {
        let mut tail = Tail::new(0, "sse-1", false);
        tail.on_resumed("e1", false, 0, 0);
        tail.on_event(0, &ev(1, 1));
        tail.on_closed();
        assert_eq!(tail.violations(), 1);
        let told = tail.counts.first_history_loss.clone().unwrap_or_default();
        assert!(told.starts_with("closed under the viewer"), "{told}");
        assert!(told.contains("owed Some(1)"), "{told}");
    }

    #[test]
    fn range_sets_count_what_is_missing() {
        let mut have = RangeSet::default();
        for n in [1, 2, 3, 7, 8, 5] {
            have.insert(n, n);
        }
        assert!(have.contains(5) && !have.contains(4) && !have.contains(6));
        let mut want = RangeSet::default();
        want.insert(1, 10);
        assert_eq!(have.missing_from(&want), 4);
    }
}

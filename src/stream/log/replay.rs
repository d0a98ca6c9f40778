//! Recovery: rebuilding every ring from the segments at start.
//!
//! Owns replaying records in order into rings (epochs, offsets, `seq`
//! marks, ends, drops) and torn-tail repair: a bad record at the end of
//! the last segment is a write a crash cut short (never acknowledged) and
//! is cut off (and with it a reused segment's old records); anywhere else
//! it is corruption, reported. Must not write
//! records (only truncate a torn tail or restart an empty last segment).

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use super::record::{Record, RecordAt, decode, read_record};
use super::segment::{MAGIC, MAGIC_V1, Segment, crc_mask, segment_path, write_new_segment};
use super::{LogError, io_err};
use crate::ids::RunId;
use crate::stream::ring::{Ring, RingLimits};
use crate::stream::{EndRequest, PublishedEvent, RunEnd};
use crate::time::Timestamp;

/// Rings rebuilt from the log.
pub(super) struct Recovery {
    pub(super) limits: RingLimits,
    pub(super) rings: HashMap<RunId, Ring>,
}

impl Recovery {
    fn apply(&mut self, record: Record) {
        match record {
            Record::Snapshot {
                run,
                epoch,
                first_offset,
                last_seq,
            } => {
                let ring = Ring::restored(run.clone(), epoch, self.limits, first_offset, last_seq);
                self.rings.insert(run, ring);
            }
            Record::Batch {
                run,
                epoch,
                first_offset,
                last_seq,
                events,
            } => {
                let fresh =
                    || Ring::restored(run.clone(), epoch.clone(), self.limits, first_offset, None);
                let ring = self.rings.entry(run.clone()).or_insert_with(fresh);
                // Another epoch: the old history was replaced.
                if ring.epoch() != &epoch || ring.appended_head() > first_offset {
                    *ring = fresh();
                }
                if ring.appended_head() < first_offset {
                    // Offsets before it were evicted and reclaimed.
                    let last = ring.last_seq();
                    *ring =
                        Ring::restored(run.clone(), epoch.clone(), self.limits, first_offset, last);
                }
                let texts: Vec<&str> = events
                    .iter()
                    .map(|e| std::str::from_utf8(e).unwrap_or("null"))
                    .collect();
                let new: Vec<PublishedEvent<'_>> = texts
                    .iter()
                    .map(|json| PublishedEvent { json, seq: None })
                    .collect();
                if ring.append(&new).is_err() {
                    // Limits shrank since: keep what fits, as a fresh start.
                    *ring = Ring::restored(
                        run.clone(),
                        epoch.clone(),
                        self.limits,
                        first_offset + events.len() as u64,
                        last_seq,
                    );
                }
                ring.set_last_seq(last_seq);
            }
            Record::Drop { run, epoch } => {
                if self.rings.get(&run).is_some_and(|r| r.epoch() == &epoch) {
                    self.rings.remove(&run);
                }
            }
            Record::End {
                run,
                epoch,
                next_offset,
                outcome,
                ended_at_ms,
                message,
            } => {
                let fresh =
                    || Ring::restored(run.clone(), epoch.clone(), self.limits, next_offset, None);
                let ring = self.rings.entry(run.clone()).or_insert_with(fresh);
                if ring.epoch() != &epoch {
                    *ring = fresh();
                }
                let req = EndRequest {
                    outcome,
                    message,
                    ended_at: Timestamp::from_unix_millis(ended_at_ms),
                };
                let end = RunEnd::new(&run, &epoch, req, next_offset);
                ring.set_end(Arc::new(end), true);
            }
        }
    }
}

/// Reads every segment in order into `recovery`. A bad record at the end
/// of the last segment is a write the crash cut short (never
/// acknowledged): the segment is truncated there. Anywhere else it is
/// corruption, reported. Answers each segment with what it holds.
pub(super) fn replay(
    dir: &Path,
    numbers: &[u64],
    recovery: &mut Recovery,
) -> Result<VecDeque<Segment>, LogError> {
    let mut found = VecDeque::new();
    for (i, &n) in numbers.iter().enumerate() {
        let path = segment_path(dir, n);
        let last = i + 1 == numbers.len();
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io_err(&path))?;
        if bytes.len() < MAGIC.len() {
            if last {
                // Created, then the crash: start it over.
                write_new_segment(&path)?;
                found.push_back(Segment::new(n, MAGIC.len() as u64));
                continue;
            }
            return Err(LogError::Version { path });
        }
        let mask = match &bytes[..MAGIC.len()] {
            m if m == MAGIC => crc_mask(n),
            m if m == MAGIC_V1 => 0,
            _ => return Err(LogError::Version { path }),
        };
        let mut at = MAGIC.len();
        let mut seg = Segment::new(n, 0);
        seg.mask = mask;
        let bad = loop {
            let (body, next) = match read_record(&bytes, at, mask) {
                RecordAt::Whole { body, next } => (body, next),
                RecordAt::End => break None,
                RecordAt::Bad(why) => break Some(why),
            };
            let Some(record) = decode(body) else {
                break Some("a malformed record");
            };
            let (run, epoch, end) = record.pin();
            seg.note(run, epoch, end);
            recovery.apply(record);
            at = next;
        };
        if let Some(why) = bad {
            if !last {
                return Err(LogError::Corrupt {
                    path,
                    at: at as u64,
                    why: why.into(),
                });
            }
            // A reused segment's old records end up here too (their
            // checksums carry another segment's mask); a log closed cleanly
            // has none left, so this is about a crash either way.
            tracing::warn!(
                path = %path.display(),
                at,
                why,
                "stream log: dropping a torn tail (a write cut short by a crash)"
            );
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            file.set_len(at as u64).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
        }
        seg.bytes = at as u64;
        found.push_back(seg);
    }
    Ok(found)
}

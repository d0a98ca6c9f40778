//! The log's record format: what one record holds, and its bytes.
//!
//! Owns encoding and decoding records. A segment file opens with an 8-byte
//! magic that carries the format version ([`super::MAGIC`]), then records
//! `len: u32 LE | crc32: u32 LE | body[len]`. In version 2 the stored
//! checksum is the body's CRC-32 XOR the segment's mask (see
//! [`super::segment::crc_mask`]): records are encoded unmasked, and the
//! writer masks them ([`mask_records`]) once it knows the segment. Bodies:
//! - `1` batch: run, epoch, first offset, the ring's last `seq` after it,
//!   the event texts;
//! - `2` snapshot: run, epoch, first kept offset, last `seq` (a compaction
//!   writes one per stream, followed by its kept batches);
//! - `3` drop: run, epoch (retention or the budget dropped the stream);
//! - `4` end: run, epoch, the head at the end, outcome (`0` completed, `1`
//!   failed, `2` cancelled), `endedAt` as unix milliseconds, the message
//!   (a flag byte, then its text). Written after every batch of the run
//!   and made visible only once written; a compaction writes it again
//!   after the ring's batches.
//!
//! Version 1 logs (unmasked checksums, earlier builds) replay as they are.
//! Must not do I/O: bytes in, bytes out.

use crate::ids::{RunId, RunOutcome};
use crate::stream::ring::Ring;
use crate::stream::{RunEnd, StreamEpoch};

pub(super) enum Record {
    Batch {
        run: RunId,
        epoch: StreamEpoch,
        first_offset: u64,
        last_seq: Option<u64>,
        events: Vec<Vec<u8>>,
    },
    Snapshot {
        run: RunId,
        epoch: StreamEpoch,
        first_offset: u64,
        last_seq: Option<u64>,
    },
    Drop {
        run: RunId,
        epoch: StreamEpoch,
    },
    End {
        run: RunId,
        epoch: StreamEpoch,
        next_offset: u64,
        outcome: RunOutcome,
        ended_at_ms: u64,
        message: Option<String>,
    },
}

impl Record {
    /// The run a record is about, its epoch, and the end of the offsets
    /// it holds (see [`Segment::runs`]).
    pub(super) fn pin(&self) -> (RunId, StreamEpoch, u64) {
        match self {
            Record::Batch {
                run,
                epoch,
                first_offset,
                events,
                ..
            } => (
                run.clone(),
                epoch.clone(),
                first_offset + events.len() as u64,
            ),
            Record::Snapshot {
                run,
                epoch,
                first_offset,
                ..
            } => (run.clone(), epoch.clone(), *first_offset),
            Record::Drop { run, epoch } => (run.clone(), epoch.clone(), 0),
            Record::End {
                run,
                epoch,
                next_offset,
                ..
            } => (run.clone(), epoch.clone(), *next_offset),
        }
    }
}

fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
    buf.extend_from_slice(s);
}

fn put_seq(buf: &mut Vec<u8>, seq: Option<u64>) {
    match seq {
        Some(n) => {
            buf.push(1);
            buf.extend_from_slice(&n.to_le_bytes());
        }
        None => buf.push(0),
    }
}

/// `len | crc | body` around a body built by `body`, which is about
/// `capacity` bytes (so a batch is copied once, into one allocation).
fn framed(capacity: usize, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut buf = Vec::with_capacity(8 + capacity);
    buf.extend_from_slice(&[0; 8]);
    body(&mut buf);
    let len = (buf.len() - 8) as u32;
    let crc = crc32fast::hash(&buf[8..]);
    buf[0..4].copy_from_slice(&len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// A record's header: `len | crc`.
const HEADER: usize = 8;

/// The body length and stored checksum of the record at `at`, if its
/// header is all there.
fn header(bytes: &[u8], at: usize) -> Option<(usize, u32)> {
    let head = bytes.get(at..at.checked_add(HEADER)?)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    Some((len, crc))
}

/// What [`read_record`] found at an offset of a segment's bytes.
pub(super) enum RecordAt<'a> {
    /// A whole record whose checksum is its segment's: its body, and where
    /// the next record starts.
    Whole { body: &'a [u8], next: usize },
    /// The end of the bytes, exactly.
    End,
    /// Not a record of this segment: why (a crash cut it short, or old
    /// bytes of a reused file, or corruption).
    Bad(&'static str),
}

/// Reads the record at `at` of a segment whose checksums are masked with
/// `mask` (see [`super::segment::crc_mask`]). Recovery and the tests walk
/// segments with it.
pub(super) fn read_record(bytes: &[u8], at: usize, mask: u32) -> RecordAt<'_> {
    if at == bytes.len() {
        return RecordAt::End;
    }
    let Some((len, crc)) = header(bytes, at) else {
        return RecordAt::Bad("a record header cut short");
    };
    let start = at + HEADER;
    let Some(body) = start.checked_add(len).and_then(|end| bytes.get(start..end)) else {
        return RecordAt::Bad("a record cut short");
    };
    if crc32fast::hash(body) ^ mask != crc {
        return RecordAt::Bad("a checksum mismatch");
    }
    RecordAt::Whole {
        body,
        next: start + len,
    }
}

/// XORs the checksum of every record in `buf` (whole records, back to
/// back, as encoded here) with `mask`: done once before they are written,
/// so the stored checksums are the segment's.
pub(super) fn mask_records(buf: &mut [u8], mask: u32) {
    let mut at = 0;
    while let Some((len, crc)) = header(buf, at) {
        buf[at + 4..at + HEADER].copy_from_slice(&(crc ^ mask).to_le_bytes());
        at += HEADER + len;
    }
}

/// A batch record; `last_seq` is the ring's mark just after the batch.
pub(super) fn encode_batch(
    ring: &Ring,
    first_offset: u64,
    last_seq: Option<u64>,
    events: &[&[u8]],
) -> Vec<u8> {
    let (run, epoch) = (ring.run().as_str(), ring.epoch().as_str());
    let texts: usize = events.iter().map(|e| 4 + e.len()).sum();
    framed(1 + 8 + run.len() + epoch.len() + 8 + 9 + 4 + texts, |b| {
        b.push(1);
        put_str(b, run.as_bytes());
        put_str(b, epoch.as_bytes());
        b.extend_from_slice(&first_offset.to_le_bytes());
        put_seq(b, last_seq);
        b.extend_from_slice(&(events.len() as u32).to_le_bytes());
        for e in events {
            put_str(b, e);
        }
    })
}

/// A ring's kept range and `seq` mark as of its visible head (batches
/// appended but not yet written are written after the snapshot).
pub(super) fn encode_snapshot(ring: &Ring) -> Vec<u8> {
    framed(64 + ring.run().as_str().len(), |b| {
        b.push(2);
        put_str(b, ring.run().as_str().as_bytes());
        put_str(b, ring.epoch().as_str().as_bytes());
        b.extend_from_slice(&ring.first_offset().to_le_bytes());
        put_seq(b, ring.committed_last_seq());
    })
}

pub(super) fn encode_drop(run: &RunId, epoch: &StreamEpoch) -> Vec<u8> {
    framed(48 + run.as_str().len(), |b| {
        b.push(3);
        put_str(b, run.as_str().as_bytes());
        put_str(b, epoch.as_str().as_bytes());
    })
}

pub(super) fn encode_end(ring: &Ring, end: &RunEnd) -> Vec<u8> {
    let message = end.message.as_ref().map_or(0, String::len);
    framed(64 + ring.run().as_str().len() + message, |b| {
        b.push(4);
        put_str(b, ring.run().as_str().as_bytes());
        put_str(b, ring.epoch().as_str().as_bytes());
        b.extend_from_slice(&end.next_offset.to_le_bytes());
        b.push(match end.outcome {
            RunOutcome::Completed => 0,
            RunOutcome::Failed => 1,
            RunOutcome::Cancelled => 2,
        });
        b.extend_from_slice(&end.ended_at.unix_millis().to_le_bytes());
        match &end.message {
            Some(m) => {
                b.push(1);
                put_str(b, m.as_bytes());
            }
            None => b.push(0),
        }
    })
}

/// A reader over one record body.
struct Cursor<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.body.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn text(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    fn seq(&mut self) -> Option<Option<u64>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.u64()?)),
            _ => None,
        }
    }
}

/// Reads one body; `None` if it is malformed (treated like a bad checksum).
pub(super) fn decode(body: &[u8]) -> Option<Record> {
    let mut c = Cursor { body, at: 0 };
    let kind = c.u8()?;
    let run = RunId::new(c.text()?).ok()?;
    let epoch = StreamEpoch::new(c.text()?).ok()?;
    let record = match kind {
        1 => {
            let first_offset = c.u64()?;
            let last_seq = c.seq()?;
            let count = c.u32()? as usize;
            let mut events = Vec::with_capacity(count.min(1 << 16));
            for _ in 0..count {
                // Events are JSON texts the gateway accepted: UTF-8.
                events.push(c.text()?.as_bytes().to_vec());
            }
            Record::Batch {
                run,
                epoch,
                first_offset,
                last_seq,
                events,
            }
        }
        2 => Record::Snapshot {
            run,
            epoch,
            first_offset: c.u64()?,
            last_seq: c.seq()?,
        },
        3 => Record::Drop { run, epoch },
        4 => {
            let next_offset = c.u64()?;
            let outcome = match c.u8()? {
                0 => RunOutcome::Completed,
                1 => RunOutcome::Failed,
                2 => RunOutcome::Cancelled,
                _ => return None,
            };
            let ended_at_ms = c.u64()?;
            let message = match c.u8()? {
                0 => None,
                1 => Some(c.text()?.to_owned()),
                _ => return None,
            };
            Record::End {
                run,
                epoch,
                next_offset,
                outcome,
                ended_at_ms,
                message,
            }
        }
        _ => return None,
    };
    // Trailing bytes mean a record this build does not understand.
    (c.at == body.len()).then_some(record)
}

//! The output-event write-ahead log, and [`DurableStreams`], the stream
//! engine that puts it under the in-memory hub.
//!
//! Owns the on-disk format, group commit, the sync policy, recovery (with
//! torn-tail repair) and reclaiming space. A publish is appended to its
//! ring *invisibly*, its batch is queued for the log under the ring's lock
//! (so the log's order is the offsets' order), and a writer thread writes
//! whatever has queued up, syncs once for all of it, and only then commits
//! the batches (readers see them) and acknowledges the publishes. So a
//! viewer never sees an event that a crash could take back, and a runtime
//! is never told "accepted" for one.
//!
//! Format: segment files `stream-NNNNNNNN.log` under the directory, each
//! opening with an 8-byte magic that carries the format version, then
//! records `len: u32 LE | crc32: u32 LE | body[len]`. Bodies:
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
//! Space: a segment is closed at 64 MiB and the next one started; nothing
//! is rewritten then. The writer remembers, per segment, each run's epoch
//! and the end offset of its last record there, and deletes the oldest
//! segments once no ring still keeps an offset they hold (the rings evict
//! on their own bounds, retention and the budget drop streams). A ring
//! whose last record would go with them gets a snapshot record at the head
//! first; a quiet ring that keeps the oldest segment alive while the log
//! holds much more than the rings keep is rewritten at the head (snapshot
//! and kept batches). So a busy log writes each event about once (issue
//! #18: rewriting every ring at each rotation cost 28-34x the event bytes).
//! `compact_now` still writes every ring into a fresh segment on request.
//! The record format is unchanged by this (logs of earlier builds replay
//! as they are). Must not know about sockets or sessions.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::hub::{Hooks, StreamHub};
use super::ring::{Ring, RingLimits};
use super::{
    EndRequest, NewEvent, PublishOutcome, ResumeInfo, RunEnd, StreamEngine, StreamEpoch,
    StreamError, StreamFuture, StreamLimits, StreamStats, StreamSubscription, StreamSummary,
    SweepOutcome,
};
use crate::ids::{RunId, RunOutcome};
use crate::time::Timestamp;

/// The first bytes of every segment; the last byte is the format version.
const MAGIC: &[u8; 8] = b"RGSLOG\x00\x01";
/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Records written per group commit at most.
const GROUP_MAX: usize = 4096;
/// The writer's buffer: a group commit reaches the file in writes of this
/// size.
const WRITE_BUFFER: usize = 256 << 10;

/// When the log is synced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// `fsync` before any publish in the group is acknowledged: nothing
    /// acknowledged is lost even if the machine loses power.
    Always,
    /// Acknowledge once written to the OS; `fsync` at most this often.
    /// Survives a process crash (`kill -9`); a power loss may take the
    /// last interval.
    Interval(Duration),
    /// Acknowledge once written to the OS; never `fsync` explicitly.
    Os,
}

impl std::str::FromStr for SyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<SyncPolicy, String> {
        match s {
            "always" => Ok(SyncPolicy::Always),
            "os" => Ok(SyncPolicy::Os),
            other => match other.strip_prefix("interval:").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(SyncPolicy::Interval(Duration::from_millis(ms))),
                _ => Err(format!(
                    "--stream-sync {other:?}: use always, os or interval:MS (MS > 0)"
                )),
            },
        }
    }
}

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("stream log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("stream log {path}: not a rungate stream log of a version this build reads")]
    Version { path: PathBuf },
    #[error("stream log {path} is corrupt at byte {at}: {why}")]
    Corrupt { path: PathBuf, at: u64, why: String },
}

// ------------------------------------------------------------ records

enum Record {
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
    fn pin(&self) -> (RunId, StreamEpoch, u64) {
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

/// A batch record; `last_seq` is the ring's mark just after the batch.
fn encode_batch(
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
fn encode_snapshot(ring: &Ring) -> Vec<u8> {
    framed(64 + ring.run().as_str().len(), |b| {
        b.push(2);
        put_str(b, ring.run().as_str().as_bytes());
        put_str(b, ring.epoch().as_str().as_bytes());
        b.extend_from_slice(&ring.first_offset().to_le_bytes());
        put_seq(b, ring.committed_last_seq());
    })
}

fn encode_drop(run: &RunId, epoch: &StreamEpoch) -> Vec<u8> {
    framed(48 + run.as_str().len(), |b| {
        b.push(3);
        put_str(b, run.as_str().as_bytes());
        put_str(b, epoch.as_str().as_bytes());
    })
}

fn encode_end(ring: &Ring, end: &RunEnd) -> Vec<u8> {
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
fn decode(body: &[u8]) -> Option<Record> {
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

// ----------------------------------------------------------- recovery

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("stream-{n:08}.log"))
}

/// The segment numbers in `dir`, ascending.
fn segments(dir: &Path) -> Result<Vec<u64>, LogError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("stream-"))
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        found.push(n);
    }
    found.sort_unstable();
    Ok(found)
}

/// Rings rebuilt from the log.
struct Recovery {
    limits: RingLimits,
    rings: std::collections::HashMap<RunId, Ring>,
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
                let new: Vec<NewEvent<'_>> = texts
                    .iter()
                    .map(|json| NewEvent { json, seq: None })
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
fn replay(
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
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(LogError::Version { path });
        }
        let mut at = MAGIC.len();
        let mut seg = Segment::new(n, 0);
        let bad = loop {
            if at == bytes.len() {
                break None;
            }
            let Some(head) = bytes.get(at..at + 8) else {
                break Some("a record header cut short");
            };
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            let Some(body) = bytes.get(at + 8..at + 8 + len) else {
                break Some("a record cut short");
            };
            if crc32fast::hash(body) != crc {
                break Some("a checksum mismatch");
            }
            let Some(record) = decode(body) else {
                break Some("a malformed record");
            };
            let (run, epoch, end) = record.pin();
            seg.note(run, epoch, end);
            recovery.apply(record);
            at += 8 + len;
        };
        if let Some(why) = bad {
            if !last {
                return Err(LogError::Corrupt {
                    path,
                    at: at as u64,
                    why: why.into(),
                });
            }
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

fn write_new_segment(path: &Path) -> Result<File, LogError> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(MAGIC).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        // The new name must survive a crash too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(file)
}

// -------------------------------------------------------------- writer

type Ack = oneshot::Sender<Result<(), StreamError>>;

/// What becomes visible once a record is written.
enum Commit {
    /// The run's batches up to the record's `end`.
    Batch,
    /// The run's end.
    End,
}

enum Msg {
    Append {
        bytes: Vec<u8>,
        /// The run the record is about, its epoch, and the end of what it
        /// holds (a batch's next offset, a snapshot's first offset, the
        /// final head for an end, 0 for a drop): see [`Segment::runs`].
        run: RunId,
        epoch: StreamEpoch,
        end: u64,
        /// What to make visible once written.
        commit: Option<Commit>,
        ack: Option<Ack>,
    },
    Flush(oneshot::Sender<()>),
    /// Compact now, whatever the sizes (tests, operators).
    Compact(oneshot::Sender<()>),
    Stop,
}

/// Shared between the engine and the writer thread.
struct LogState {
    /// Set once a write failed: every later publish is refused (retryable)
    /// and nothing unlogged ever becomes visible. A restart recovers.
    failed: AtomicBool,
    /// Bytes in all segments.
    disk_bytes: AtomicU64,
    /// Bytes ever written to segments by this process (records, magics,
    /// snapshots, relocations): what the log costs the disk.
    written_bytes: AtomicU64,
}

/// One segment file as the writer tracks it, to know when it may go.
#[derive(Debug)]
struct Segment {
    number: u64,
    /// Bytes in the file.
    bytes: u64,
    /// Every run with a record here: the epoch and the end offset of its
    /// last record here. The segment holds nothing a ring still keeps once
    /// each of these rings is gone, has another epoch, or has evicted
    /// everything below the end.
    runs: HashMap<RunId, (StreamEpoch, u64)>,
}

impl Segment {
    fn new(number: u64, bytes: u64) -> Segment {
        Segment {
            number,
            bytes,
            runs: HashMap::new(),
        }
    }

    fn note(&mut self, run: RunId, epoch: StreamEpoch, end: u64) {
        match self.runs.entry(run) {
            Entry::Occupied(mut e) => {
                let seen = e.get_mut();
                if seen.0 == epoch {
                    seen.1 = seen.1.max(end);
                } else {
                    *seen = (epoch, end);
                }
            }
            Entry::Vacant(e) => {
                e.insert((epoch, end));
            }
        }
    }
}

struct Writer {
    dir: PathBuf,
    policy: SyncPolicy,
    hub: Arc<StreamHub>,
    state: Arc<LogState>,
    file: BufWriter<File>,
    /// The segments on disk, oldest first; the last is the one written.
    segments: VecDeque<Segment>,
    /// A segment is closed and the next one started past this size.
    segment_limit: u64,
    last_reclaim: std::time::Instant,
    last_sync: std::time::Instant,
    dirty: bool,
}

/// How often the writer looks for old segments to delete between
/// rotations (eviction and retention free them without any write).
const RECLAIM_EVERY: Duration = Duration::from_secs(1);

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            let first = match self.policy {
                SyncPolicy::Interval(every) if self.dirty => {
                    match rx.recv_timeout(every.saturating_sub(self.last_sync.elapsed())) {
                        Ok(m) => m,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            self.sync();
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            let mut group = vec![first];
            while group.len() < GROUP_MAX {
                match rx.try_recv() {
                    Ok(m) => group.push(m),
                    Err(_) => break,
                }
            }
            if !self.write_group(group) {
                break;
            }
            self.maintain();
        }
        self.sync();
    }

    fn current(&mut self) -> &mut Segment {
        self.segments
            .back_mut()
            .expect("the writer always has a current segment")
    }

    fn head_number(&self) -> u64 {
        self.segments.back().map_or(0, |s| s.number)
    }

    fn head_path(&self) -> PathBuf {
        segment_path(&self.dir, self.head_number())
    }

    /// Appends `bytes` to the current segment (buffered).
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        let n = bytes.len() as u64;
        self.current().bytes += n;
        self.state.disk_bytes.fetch_add(n, Ordering::Relaxed);
        self.state.written_bytes.fetch_add(n, Ordering::Relaxed);
        self.dirty = true;
        Ok(())
    }

    /// Writes, syncs per policy, then commits and acknowledges. False once
    /// asked to stop.
    fn write_group(&mut self, group: Vec<Msg>) -> bool {
        let mut acks = Vec::new();
        let mut written = Vec::new();
        let mut flushes = Vec::new();
        let mut compactions = Vec::new();
        let mut stop = false;
        let mut result = Ok(());
        for msg in group {
            match msg {
                Msg::Append {
                    bytes,
                    run,
                    epoch,
                    end,
                    commit,
                    ack,
                } => {
                    if result.is_ok() && !self.state.failed.load(Ordering::Acquire) {
                        result = self.write(&bytes);
                    }
                    written.push((run, epoch, end, commit));
                    acks.extend(ack);
                }
                Msg::Flush(done) => flushes.push(done),
                Msg::Compact(done) => compactions.push(done),
                Msg::Stop => stop = true,
            }
        }
        if result.is_ok() {
            result = self.file.flush();
        }
        let must_sync = matches!(self.policy, SyncPolicy::Always)
            || !flushes.is_empty()
            || stop
            || matches!(self.policy, SyncPolicy::Interval(every) if self.last_sync.elapsed() >= every);
        if result.is_ok() && must_sync && self.dirty {
            result = self.file.get_ref().sync_data();
            self.last_sync = std::time::Instant::now();
            self.dirty = false;
        }
        if self.state.failed.load(Ordering::Acquire) && result.is_ok() {
            result = Err(io::Error::other("an earlier write failed"));
        }
        match result {
            Ok(()) => {
                for (run, epoch, end, commit) in written {
                    match commit {
                        Some(Commit::Batch) => self.hub.commit(&run, &epoch, end),
                        Some(Commit::End) => self.hub.commit_end(&run, &epoch),
                        None => {}
                    }
                    self.current().note(run, epoch, end);
                }
                for ack in acks {
                    let _ = ack.send(Ok(()));
                }
            }
            Err(e) => {
                if !self.state.failed.swap(true, Ordering::AcqRel) {
                    tracing::error!(
                        error = %e,
                        dir = %self.dir.display(),
                        "stream log write failed; publishes are refused until the gateway restarts"
                    );
                }
                for ack in acks {
                    let _ = ack.send(Err(StreamError::Unavailable(format!(
                        "the stream log cannot be written: {e}"
                    ))));
                }
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
        if !compactions.is_empty() {
            if !self.state.failed.load(Ordering::Acquire)
                && let Err(e) = self.compact()
            {
                self.state.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "stream log compaction failed");
            }
            for done in compactions {
                let _ = done.send(());
            }
        }
        !stop
    }

    fn sync(&mut self) {
        let _ = self.sync_checked();
    }

    fn sync_checked(&mut self) -> io::Result<()> {
        if self.dirty {
            self.file.flush()?;
            self.file.get_ref().sync_data()?;
            self.dirty = false;
            self.last_sync = std::time::Instant::now();
        }
        Ok(())
    }

    /// Between groups: starts a new segment once the current one is full,
    /// and deletes old segments nothing live is read from any more. Runs
    /// between groups, so every ring's visible part is exactly what has
    /// been written.
    fn maintain(&mut self) {
        if self.state.failed.load(Ordering::Acquire) {
            return;
        }
        let mut rotated = false;
        if self.current().bytes >= self.segment_limit {
            if let Err(e) = self.rotate() {
                self.state.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "stream log rotation failed; publishes are refused until the gateway restarts");
                return;
            }
            rotated = true;
        }
        if self.segments.len() > 1 && (rotated || self.last_reclaim.elapsed() >= RECLAIM_EVERY) {
            self.last_reclaim = std::time::Instant::now();
            if let Err(e) = self.reclaim() {
                self.state.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "stream log reclaim failed; publishes are refused until the gateway restarts");
            }
        }
    }

    /// Closes the current segment (synced: a segment that is not the last
    /// must never have a torn tail) and starts the next.
    fn rotate(&mut self) -> Result<(), LogError> {
        let old = self.head_path();
        self.sync_checked().map_err(io_err(&old))?;
        let next = self.head_number() + 1;
        let path = segment_path(&self.dir, next);
        let file = write_new_segment(&path)?;
        self.file = BufWriter::with_capacity(WRITE_BUFFER, file);
        let magic = MAGIC.len() as u64;
        self.segments.push_back(Segment::new(next, magic));
        self.state.disk_bytes.fetch_add(magic, Ordering::Relaxed);
        self.state.written_bytes.fetch_add(magic, Ordering::Relaxed);
        Ok(())
    }

    /// Whether a ring still keeps something recorded in `seg`.
    fn pinned_by(&self, seg: &Segment) -> Vec<RunId> {
        seg.runs
            .iter()
            .filter(|(run, (epoch, end))| {
                self.hub
                    .with_ring(run, |r| r.epoch() == epoch && r.first_offset() < *end)
                    .unwrap_or(false)
            })
            .map(|(run, _)| run.clone())
            .collect()
    }

    /// The old segments at the front that hold nothing a ring keeps.
    fn dead_prefix(&self) -> usize {
        let old = self.segments.len() - 1;
        (0..old)
            .take_while(|&i| self.pinned_by(&self.segments[i]).is_empty())
            .count()
    }

    /// Deletes the oldest segments once no ring keeps anything they hold,
    /// oldest first, so a crash at any point leaves a suffix of the log
    /// (a drop record never goes before the records it cancels).
    ///
    /// A ring whose last record is in a segment that goes gets a snapshot
    /// at the head first (its epoch, head and `seq` mark; it keeps no
    /// events, or the segment would not be dead). When the segments hold
    /// much more than the rings keep because a quiet ring still keeps a
    /// batch in the oldest segment, that ring is rewritten at the head
    /// (snapshot and kept batches), which frees the segment. Nothing else
    /// is ever rewritten: a busy log costs the disk each byte about once.
    fn reclaim(&mut self) -> Result<(), LogError> {
        let mut dead = self.dead_prefix();
        if dead == 0 {
            let disk = self.state.disk_bytes.load(Ordering::Relaxed);
            let live = self.hub.total_bytes() as u64;
            if disk <= 2 * live + 2 * self.segment_limit {
                return Ok(());
            }
            let pinners = self.pinned_by(&self.segments[0]);
            for run in &pinners {
                self.relocate(run)?;
            }
            dead = self.dead_prefix();
            if dead == 0 {
                return Ok(());
            }
        }
        let mut last_here: HashMap<&RunId, &StreamEpoch> = HashMap::new();
        for seg in self.segments.range(..dead) {
            for (run, (epoch, _)) in &seg.runs {
                last_here.insert(run, epoch);
            }
        }
        let checkpoints: Vec<(RunId, StreamEpoch, u64, Vec<u8>)> = last_here
            .into_iter()
            .filter(|(run, _)| {
                !self
                    .segments
                    .range(dead..)
                    .any(|s| s.runs.contains_key(*run))
            })
            .filter_map(|(run, epoch)| {
                self.hub
                    .with_ring(run, |r| {
                        (r.epoch() == epoch).then(|| {
                            // A visible end is part of what the ring is: it
                            // moves to the head with the snapshot.
                            let mut bytes = encode_snapshot(r);
                            if let Some(end) = r.visible_end() {
                                bytes.extend_from_slice(&encode_end(r, end));
                            }
                            (run.clone(), epoch.clone(), r.first_offset(), bytes)
                        })
                    })
                    .flatten()
            })
            .collect();
        let head = self.head_path();
        for (run, epoch, end, bytes) in checkpoints {
            self.write(&bytes).map_err(io_err(&head))?;
            self.current().note(run, epoch, end);
        }
        // What replaces the old segments must be on disk before they go.
        self.sync_checked().map_err(io_err(&head))?;
        for seg in self.segments.drain(..dead) {
            let path = segment_path(&self.dir, seg.number);
            fs::remove_file(&path).map_err(io_err(&path))?;
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&self.dir))?;
            self.state
                .disk_bytes
                .fetch_sub(seg.bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Rewrites `run`'s ring at the head (snapshot, then its visible
    /// batches) and forgets its records in the older segments, which the
    /// rewrite supersedes.
    fn relocate(&mut self, run: &RunId) -> Result<(), LogError> {
        let Some((epoch, end, records)) = self.hub.with_ring(run, |ring| {
            let mut records = vec![encode_snapshot(ring)];
            for (first, events) in ring.visible_batches() {
                records.push(encode_batch(ring, first, None, &events));
            }
            if let Some(end) = ring.visible_end() {
                records.push(encode_end(ring, end));
            }
            (ring.epoch().clone(), ring.next_offset(), records)
        }) else {
            return Ok(());
        };
        let head = self.head_path();
        for bytes in &records {
            self.write(bytes).map_err(io_err(&head))?;
        }
        let old = self.segments.len() - 1;
        for seg in self.segments.range_mut(..old) {
            seg.runs.remove(run);
        }
        self.current().note(run.clone(), epoch, end);
        Ok(())
    }

    /// Writes a snapshot of every ring and its kept batches into a fresh
    /// segment and deletes all the older ones.
    fn compact(&mut self) -> Result<(), LogError> {
        let next = self.head_number() + 1;
        let path = segment_path(&self.dir, next);
        let file = write_new_segment(&path)?;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut seg = Segment::new(next, MAGIC.len() as u64);
        let mut failure = None;
        self.hub.for_each_ring(|ring| {
            if failure.is_some() {
                return;
            }
            let mut write = |bytes: Vec<u8>| {
                seg.bytes += bytes.len() as u64;
                if let Err(e) = out.write_all(&bytes) {
                    failure = Some(e);
                }
            };
            write(encode_snapshot(ring));
            // The snapshot record carries the mark; the batches need none.
            for (first, events) in ring.visible_batches() {
                write(encode_batch(ring, first, None, &events));
            }
            // An end not yet visible is still queued: it follows by itself.
            if let Some(end) = ring.visible_end() {
                write(encode_end(ring, end));
            }
            seg.note(ring.run().clone(), ring.epoch().clone(), ring.next_offset());
        });
        if let Some(e) = failure {
            return Err(io_err(&path)(e));
        }
        out.flush().map_err(io_err(&path))?;
        out.get_ref().sync_data().map_err(io_err(&path))?;
        // The snapshot holds everything: the old segments can go.
        self.sync();
        for old in std::mem::take(&mut self.segments) {
            let _ = fs::remove_file(segment_path(&self.dir, old.number));
        }
        let written = seg.bytes;
        self.segments.push_back(seg);
        self.file = out;
        self.state.disk_bytes.store(written, Ordering::Relaxed);
        self.state
            .written_bytes
            .fetch_add(written, Ordering::Relaxed);
        tracing::info!(bytes = written, "stream log compacted");
        Ok(())
    }
}

// -------------------------------------------------------------- engine

/// The durable stream engine: the in-memory [`StreamHub`] with every
/// accepted batch in the log before anyone sees it.
pub struct DurableStreams {
    hub: Arc<StreamHub>,
    /// To the writer thread. `mpsc::Sender` is `Sync`: publishers on any
    /// thread send through the same one, no lock, no clone.
    tx: mpsc::Sender<Msg>,
    state: Arc<LogState>,
    writer: Arc<parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl DurableStreams {
    /// Opens (or creates) the log in `dir`, rebuilds every ring from it
    /// with its epoch, offsets and `seq` high-water mark, and starts the
    /// writer thread.
    pub fn open(
        dir: &Path,
        limits: StreamLimits,
        policy: SyncPolicy,
    ) -> Result<DurableStreams, LogError> {
        DurableStreams::open_with(dir, limits, policy, SEGMENT_BYTES)
    }

    /// As [`DurableStreams::open`], closing segments past `segment_limit`
    /// bytes (tests use small ones to exercise rotation and reclaiming).
    fn open_with(
        dir: &Path,
        limits: StreamLimits,
        policy: SyncPolicy,
        segment_limit: u64,
    ) -> Result<DurableStreams, LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (tx, rx) = mpsc::channel::<Msg>();
        let (created_tx, dropped_tx) = (tx.clone(), tx.clone());
        let hooks = Hooks {
            created: Box::new(move |ring| {
                let _ = created_tx.send(Msg::Append {
                    bytes: encode_snapshot(ring),
                    run: ring.run().clone(),
                    epoch: ring.epoch().clone(),
                    end: ring.first_offset(),
                    commit: None,
                    ack: None,
                });
            }),
            dropped: Box::new(move |run, epoch| {
                let _ = dropped_tx.send(Msg::Append {
                    bytes: encode_drop(run, epoch),
                    run: run.clone(),
                    epoch: epoch.clone(),
                    end: 0,
                    commit: None,
                    ack: None,
                });
            }),
        };
        let hub = Arc::new(StreamHub::with_hooks(limits.clone(), hooks));
        let numbers = segments(dir)?;
        let mut recovery = Recovery {
            limits: RingLimits {
                max_events: limits.max_events_per_run,
                max_bytes: limits.max_bytes_per_run,
            },
            rings: Default::default(),
        };
        let mut segments = replay(dir, &numbers, &mut recovery)?;
        let now = Instant::now();
        let restored = recovery.rings.len();
        for (_, ring) in recovery.rings {
            hub.restore(ring, now);
        }
        let file = match segments.back() {
            Some(last) => {
                let path = segment_path(dir, last.number);
                let mut file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                // Replay cut any torn tail: the file ends where it stopped.
                file.seek(SeekFrom::End(0)).map_err(io_err(&path))?;
                file
            }
            None => {
                let file = write_new_segment(&segment_path(dir, 1))?;
                segments.push_back(Segment::new(1, MAGIC.len() as u64));
                file
            }
        };
        let state = Arc::new(LogState {
            failed: AtomicBool::new(false),
            disk_bytes: AtomicU64::new(segments.iter().map(|s| s.bytes).sum()),
            written_bytes: AtomicU64::new(0),
        });
        if restored > 0 {
            tracing::info!(streams = restored, "stream log replayed");
        }
        let writer = Writer {
            dir: dir.to_owned(),
            policy,
            hub: hub.clone(),
            state: state.clone(),
            file: BufWriter::with_capacity(WRITE_BUFFER, file),
            segments,
            segment_limit,
            last_reclaim: std::time::Instant::now(),
            last_sync: std::time::Instant::now(),
            dirty: false,
        };
        let handle = std::thread::Builder::new()
            .name("rungate-stream-log".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(dir))?;
        Ok(DurableStreams {
            hub,
            tx,
            state,
            writer: Arc::new(parking_lot::Mutex::new(Some(handle))),
        })
    }

    /// Whether the log can still be written.
    pub fn healthy(&self) -> bool {
        !self.state.failed.load(Ordering::Acquire)
    }

    /// Bytes the log occupies on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.state.disk_bytes.load(Ordering::Relaxed)
    }

    /// Bytes this process has written to the log so far, everything
    /// included (records, segment headers, snapshots, rewrites).
    pub fn written_bytes(&self) -> u64 {
        self.state.written_bytes.load(Ordering::Relaxed)
    }

    /// Waits until everything queued so far is written and synced.
    pub fn flush(&self) -> StreamFuture<()> {
        let (done, wait) = oneshot::channel();
        let sent = self.tx.send(Msg::Flush(done)).is_ok();
        Box::pin(async move {
            if sent {
                let _ = wait.await;
            }
        })
    }

    /// Writes a snapshot of every ring to a new segment and deletes the
    /// older ones, now.
    pub async fn compact_now(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Compact(done)).is_ok() {
            let _ = wait.await;
        }
    }

    /// Flushes, stops the writer thread and waits for it.
    pub fn close(&self) -> StreamFuture<()> {
        let flushed = self.flush();
        let tx = self.tx.clone();
        let writer = self.writer.clone();
        Box::pin(async move {
            flushed.await;
            let _ = tx.send(Msg::Stop);
            let handle = writer.lock().take();
            if let Some(h) = handle {
                let _ = tokio::task::spawn_blocking(move || h.join()).await;
            }
        })
    }
}

impl StreamEngine for DurableStreams {
    fn publish(
        &self,
        run: &RunId,
        events: &[NewEvent<'_>],
        now: Instant,
    ) -> StreamFuture<Result<PublishOutcome, StreamError>> {
        if !self.healthy() {
            return Box::pin(std::future::ready(Err(StreamError::Unavailable(
                "the stream log cannot be written; nothing was stored".into(),
            ))));
        }
        let (ack, acked) = oneshot::channel();
        let mut ack = Some(ack);
        let tx = &self.tx;
        let mut log = |ring: &Ring, outcome: &PublishOutcome| {
            let Some((first, texts)) = ring.last_batch() else {
                return;
            };
            let _ = tx.send(Msg::Append {
                bytes: encode_batch(ring, first, ring.last_seq(), &texts),
                run: ring.run().clone(),
                epoch: ring.epoch().clone(),
                end: outcome.next_offset,
                commit: Some(Commit::Batch),
                ack: ack.take(),
            });
        };
        let result = self.hub.publish_logged(run, events, now, &mut log);
        match result {
            Err(e) => Box::pin(std::future::ready(Err(e))),
            // Nothing new (all duplicates): nothing to wait for.
            Ok(outcome) if outcome.accepted == 0 => Box::pin(std::future::ready(Ok(outcome))),
            Ok(outcome) => Box::pin(async move {
                match acked.await {
                    Ok(Ok(())) => Ok(outcome),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(StreamError::Unavailable("the stream log stopped".into())),
                }
            }),
        }
    }

    fn resume(
        &self,
        run: &RunId,
        from_offset: Option<u64>,
        stream_epoch: Option<&str>,
        now: Instant,
    ) -> Result<(ResumeInfo, Box<dyn StreamSubscription>), StreamError> {
        StreamEngine::resume(&*self.hub, run, from_offset, stream_epoch, now)
    }

    fn finish(
        &self,
        run: &RunId,
        end: EndRequest,
        now: Instant,
    ) -> StreamFuture<Result<Arc<RunEnd>, StreamError>> {
        if !self.healthy() {
            return Box::pin(std::future::ready(Err(StreamError::Unavailable(
                "the stream log cannot be written; the run did not end".into(),
            ))));
        }
        let (ack, acked) = oneshot::channel();
        let mut ack = Some(ack);
        let tx = &self.tx;
        let mut log = |ring: &Ring, end: &Arc<RunEnd>| {
            let _ = tx.send(Msg::Append {
                bytes: encode_end(ring, end),
                run: ring.run().clone(),
                epoch: ring.epoch().clone(),
                end: ring.next_offset(),
                commit: Some(Commit::End),
                ack: ack.take(),
            });
        };
        match self.hub.finish_logged(run, end, now, &mut log) {
            Err(e) => Box::pin(std::future::ready(Err(e))),
            // Ended before: answer once that end is surely written.
            Ok((end, false)) => {
                let flushed = self.flush();
                Box::pin(async move {
                    flushed.await;
                    Ok(end)
                })
            }
            Ok((end, true)) => Box::pin(async move {
                match acked.await {
                    Ok(Ok(())) => Ok(end),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(StreamError::Unavailable("the stream log stopped".into())),
                }
            }),
        }
    }

    fn ended(&self, run: &RunId) -> Option<Arc<RunEnd>> {
        self.hub.ended(run)
    }

    fn runs(&self) -> Vec<StreamSummary> {
        self.hub.runs()
    }

    fn runs_matching(
        &self,
        selectors: &[super::RunSelector<'_>],
        after: Option<&RunId>,
        limit: usize,
    ) -> Vec<StreamSummary> {
        self.hub.runs_matching(selectors, after, limit)
    }

    fn summary(&self, run: &RunId) -> Option<StreamSummary> {
        self.hub.summary(run)
    }

    fn stats(&self) -> StreamStats {
        StreamStats {
            log_bytes: self.disk_bytes(),
            ..StreamEngine::stats(&*self.hub)
        }
    }

    fn session_started(&self, run: &RunId, now: Instant) {
        self.hub.session_started(run, now);
    }

    fn session_ended(&self, run: &RunId, now: Instant) {
        self.hub.session_ended(run, now);
    }

    fn sweep(&self, now: Instant) -> SweepOutcome {
        self.hub.sweep(now)
    }

    fn healthy(&self) -> bool {
        DurableStreams::healthy(self)
    }

    fn close(&self) -> StreamFuture<()> {
        DurableStreams::close(self)
    }
}

#[cfg(test)]
#[path = "log_tests.rs"]
mod tests;

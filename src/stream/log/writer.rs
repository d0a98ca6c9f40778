//! The log's writer thread: group commit, the sync policy, rotation and
//! reclaiming space.
//!
//! Owns the open segment and the order of everything written. Publishers
//! queue records (under their stream's lock, so the log's order is the
//! offsets' order); the thread writes whatever has queued up, syncs once
//! for all of it as the policy says, and only then shows the batches and
//! ends through the hub's [`Inbox`] and acknowledges them. So a reader
//! never sees what a crash could take back.
//!
//! Space: a segment is closed at its size limit and the next one started;
//! nothing is rewritten then. The writer remembers, per segment, each
//! run's epoch and the end offset of its last record there, and deletes the
//! oldest segments once no ring still keeps an offset they hold (the rings
//! evict on their own bounds, retention and the budget drop streams). A
//! ring whose last record would go with them gets a snapshot record at the
//! head first; a quiet ring that keeps the oldest segment alive while the
//! log holds much more than the rings keep is rewritten at the head
//! (snapshot and kept batches). So a busy log writes each event about once
//! (issue #18: rewriting every ring at each rotation cost 28-34x the event
//! bytes). Up to two segments that go are kept as spares instead, and the
//! next segments are written over their blocks (see [`super::segment`]).
//! A compaction on request writes every ring into a fresh segment.
//! Must not change a ring except through the inbox.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::head_file::HeadFile;
use super::record::{encode_batch, encode_end, encode_snapshot, mask_records};
use super::segment::{
    MAGIC, MAX_SPARES, Segment, delete_segment, keep_as_spare, reuse_spare, segment_path,
    write_new_segment,
};
use super::{LogError, SyncPolicy, io_err};
use crate::ids::RunId;
use crate::stream::hub::{Inbox, Visible, Wake};
use crate::stream::{StreamEpoch, StreamError};

/// Records written per group commit at most.
const GROUP_MAX: usize = 4096;
/// The writer's buffer: a group commit reaches the file in writes of this
/// size at most. A direct write waits for the disk, so a group should
/// take one: under (c) a group holds 0.2-0.7 MiB (at 256 KiB it took 2.7
/// writes on average).
pub(super) const WRITE_BUFFER: usize = 1 << 20;

pub(super) type Ack = oneshot::Sender<Result<(), StreamError>>;

/// What becomes visible once a record is written.
pub(super) enum Commit {
    /// The run's batches up to the record's `end`.
    Batch,
    /// The run's end.
    End,
}

pub(super) enum Msg {
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
pub(super) struct LogState {
    /// Set once a write failed: every later publish is refused (retryable)
    /// and nothing unlogged ever becomes visible. A restart recovers.
    pub(super) failed: AtomicBool,
    /// Bytes in all segments.
    pub(super) disk_bytes: AtomicU64,
    /// Bytes ever written to segments by this process (records, magics,
    /// snapshots, relocations): what the log costs the disk.
    pub(super) written_bytes: AtomicU64,
}

pub(super) struct Writer {
    pub(super) dir: PathBuf,
    pub(super) policy: SyncPolicy,
    /// Where written batches and ends are shown, and rings read.
    pub(super) hub: Inbox,
    pub(super) state: Arc<LogState>,
    /// The head segment's file. Its length may be past the segment's
    /// bytes: a reused spare's old records, a direct write's padding (cut
    /// off at rotation and at a clean stop).
    pub(super) file: HeadFile,
    /// The segments on disk, oldest first; the last is the one written.
    pub(super) segments: VecDeque<Segment>,
    /// Files of reclaimed segments kept for the next ones to reuse (see
    /// [`super::segment`]), at most [`MAX_SPARES`].
    pub(super) spares: Vec<PathBuf>,
    /// A segment is closed and the next one started past this size.
    pub(super) segment_limit: u64,
    pub(super) last_reclaim: std::time::Instant,
    pub(super) last_sync: std::time::Instant,
    pub(super) dirty: bool,
}

/// How often the writer looks for old segments to delete between
/// rotations (eviction and retention free them without any write).
const RECLAIM_EVERY: Duration = Duration::from_secs(1);

impl Writer {
    pub(super) fn run(mut self, rx: mpsc::Receiver<Msg>) {
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
        if !self.state.failed.load(Ordering::Acquire)
            && let Err(e) = self.seal_head()
        {
            tracing::warn!(error = %e, "stream log: could not cut the reused segment's old records");
        }
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

    /// Appends `bytes`, whole records, to the current segment (buffered),
    /// their checksums masked with the segment's.
    fn write(&mut self, bytes: &mut [u8]) -> io::Result<()> {
        mask_records(bytes, self.current().mask);
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
                    mut bytes,
                    run,
                    epoch,
                    end,
                    commit,
                    ack,
                } => {
                    if result.is_ok() && !self.state.failed.load(Ordering::Acquire) {
                        result = self.write(&mut bytes);
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
            result = self.file.sync_data();
            self.last_sync = std::time::Instant::now();
            self.dirty = false;
        }
        if self.state.failed.load(Ordering::Acquire) && result.is_ok() {
            result = Err(io::Error::other("an earlier write failed"));
        }
        match result {
            Ok(()) => {
                let now = Instant::now();
                let mut wakes = Vec::new();
                for (run, epoch, end, commit) in written {
                    let visible = match commit {
                        Some(Commit::Batch) => Some(Visible::Committed { up_to: end }),
                        Some(Commit::End) => Some(Visible::CommittedEnd),
                        None => None,
                    };
                    if let Some(visible) = visible {
                        let (_, wake) = self.hub.show_quietly(&run, &epoch, visible, now);
                        wakes.push(wake);
                    }
                    self.current().note(run, epoch, end);
                }
                // Shown before answered, so a publisher that resumes after
                // its answer finds its batch; answered before the readers
                // are woken, so its task is queued ahead of theirs.
                for ack in acks {
                    let _ = ack.send(Ok(()));
                }
                wakes.into_iter().for_each(Wake::now);
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
            self.file.sync_data()?;
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

    /// Cuts a reused file's old records off past what the current segment
    /// holds, synced: then the segment ends exactly at its last record.
    fn seal_head(&mut self) -> io::Result<()> {
        let bytes = self.current().bytes;
        if self.file.len() > bytes {
            self.file.truncate(bytes)?;
        }
        Ok(())
    }

    /// Closes the current segment (synced, and ending at its last record: a
    /// segment that is not the last must never have a torn tail) and starts
    /// the next, in a spare's file when there is one.
    fn rotate(&mut self) -> Result<(), LogError> {
        let old = self.head_path();
        self.sync_checked().map_err(io_err(&old))?;
        self.seal_head().map_err(io_err(&old))?;
        let next = self.head_number() + 1;
        let path = segment_path(&self.dir, next);
        let direct = self.file.is_direct();
        match self.spares.pop() {
            Some(spare) => reuse_spare(&spare, &path, !direct)?,
            None => write_new_segment(&path)?,
        }
        let magic = MAGIC.len() as u64;
        self.file = HeadFile::open(&path, magic, direct, WRITE_BUFFER).map_err(io_err(&path))?;
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
        for (run, epoch, end, mut bytes) in checkpoints {
            self.write(&mut bytes).map_err(io_err(&head))?;
            self.current().note(run, epoch, end);
        }
        // What replaces the old segments must be on disk before they go.
        self.sync_checked().map_err(io_err(&head))?;
        for seg in self.segments.drain(..dead) {
            if self.spares.len() < MAX_SPARES {
                self.spares.push(keep_as_spare(&self.dir, seg.number)?);
            } else {
                delete_segment(&self.dir, seg.number)?;
            }
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
        let Some((epoch, end, mut records)) = self.hub.with_ring(run, |ring| {
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
        for bytes in &mut records {
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
        write_new_segment(&path)?;
        let mut out = HeadFile::open(
            &path,
            MAGIC.len() as u64,
            self.file.is_direct(),
            WRITE_BUFFER,
        )
        .map_err(io_err(&path))?;
        let mut seg = Segment::new(next, MAGIC.len() as u64);
        let mut failure = None;
        self.hub.for_each_ring(|ring| {
            if failure.is_some() {
                return;
            }
            let mut write = |mut bytes: Vec<u8>| {
                mask_records(&mut bytes, seg.mask);
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
        out.sync_data().map_err(io_err(&path))?;
        // The snapshot holds everything: the old segments can go.
        self.sync();
        // Oldest first, stopping at a failure, so what is left (after a
        // crash or an error) is a suffix of the old log: replayed before
        // the new segment, whose snapshots supersede it, with every drop
        // record after the batches it cancels.
        let mut old = std::mem::take(&mut self.segments);
        while let Some(seg) = old.front() {
            if let Err(e) = delete_segment(&self.dir, seg.number) {
                tracing::warn!(error = %e, segment = seg.number, "stream log: could not delete a compacted segment; it is kept and reclaimed later");
                break;
            }
            old.pop_front();
        }
        let written = seg.bytes;
        let kept: u64 = old.iter().map(|s| s.bytes).sum();
        self.segments = old;
        self.segments.push_back(seg);
        self.file = out;
        self.state
            .disk_bytes
            .store(written + kept, Ordering::Relaxed);
        self.state
            .written_bytes
            .fetch_add(written, Ordering::Relaxed);
        tracing::info!(bytes = written, "stream log compacted");
        Ok(())
    }
}

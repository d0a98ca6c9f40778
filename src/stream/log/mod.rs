//! The durable log: [`StreamLog`], the [`Backend`] that puts every
//! accepted batch and end on disk before anyone sees it.
//!
//! Owns the log's side of a publish and an end, and opening the log. The
//! ring assigns a batch's offsets and keeps it *invisible*; its record is
//! queued for the writer thread under the ring's lock (so the log's order
//! is the offsets' order); the writer writes whatever has queued up, syncs
//! once for all of it, and only then shows the batches through the hub's
//! inbox and acknowledges the publishes. So a viewer never sees an event
//! that a crash could take back, and a runtime is never told "accepted"
//! for one. A stream created or dropped here is recorded too, so its epoch
//! is the same after a restart even if nothing was ever published to it.
//!
//! Split by idea: `record` (the format), `segment` (the files), `replay`
//! (recovery, with torn-tail repair), `writer` (group commit, the sync
//! policy, rotation and reclaiming space), `head_file` (the bytes on their
//! way into the head segment, in whole blocks, past the page cache under
//! `always`).
//! Must not know about sockets or sessions.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::backend::{Backend, News, Stored};
use super::hub::{Inbox, StreamHub};
use super::ring::{Ring, RingLimits};
use super::{
    EndRequest, PublishOutcome, PublishedEvent, Publisher, RunEnd, StreamError, StreamFuture,
    StreamLimits,
};

mod head_file;
mod record;
mod replay;
mod segment;
mod writer;

use head_file::HeadFile;
use record::{encode_batch, encode_drop, encode_end, encode_snapshot};
use replay::{Recovery, replay};
use segment::{
    MAGIC, MAX_SPARES, Segment, segment_path, segments, spare_path, spares, write_new_segment,
};
use writer::{Ack, Commit, LogState, Msg, WRITE_BUFFER, Writer};

/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 64 << 20;

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

impl SyncPolicy {
    /// Whether the head is written past the page cache (`O_DIRECT`, where
    /// the filesystem allows): when every group is synced before it is
    /// acknowledged, the cache is only work (see [`head_file`]).
    fn bypasses_cache(self) -> bool {
        matches!(self, SyncPolicy::Always)
    }
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

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Opens (or creates) the log in `dir`, rebuilds every ring from it with
/// its epoch, offsets and `seq` high-water mark, starts the writer thread,
/// and answers the hub that stores its streams there.
pub fn open(
    dir: &Path,
    limits: StreamLimits,
    policy: SyncPolicy,
) -> Result<Arc<StreamHub>, LogError> {
    StreamLog::open(dir, limits, policy).map(|(hub, _)| hub)
}

/// The durable log as a hub's backend. Cheap to clone: every clone talks
/// to the same writer thread (tests keep one to look at the log).
#[derive(Clone)]
pub struct StreamLog {
    /// To the writer thread. `mpsc::Sender` is `Sync`: publishers on any
    /// thread send through the same one, no lock, no clone.
    tx: mpsc::Sender<Msg>,
    state: Arc<LogState>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl StreamLog {
    /// As [`open`]; also answers the log itself, for what only it can say
    /// ([`StreamLog::written_bytes`]) or do ([`StreamLog::compact_now`]).
    pub fn open(
        dir: &Path,
        limits: StreamLimits,
        policy: SyncPolicy,
    ) -> Result<(Arc<StreamHub>, StreamLog), LogError> {
        StreamLog::open_with(dir, limits, policy, SEGMENT_BYTES)
    }

    /// As [`StreamLog::open`], closing segments past `segment_limit` bytes
    /// (tests use small ones to exercise rotation and reclaiming).
    fn open_with(
        dir: &Path,
        limits: StreamLimits,
        policy: SyncPolicy,
        segment_limit: u64,
    ) -> Result<(Arc<StreamHub>, StreamLog), LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let numbers = segments(dir)?;
        let mut recovery = Recovery {
            limits: RingLimits {
                max_events: limits.max_events_per_run,
                max_bytes: limits.max_bytes_per_run,
            },
            rings: Default::default(),
        };
        let mut segments = replay(dir, &numbers, &mut recovery)?;
        let spare_files = spare_files(dir)?;
        match segments.back() {
            // Replay cut any torn tail: the head goes on where it stopped.
            Some(last) if last.mask != 0 => {}
            // A version 1 segment is not written on: the next one starts.
            Some(last) => {
                let next = last.number + 1;
                write_new_segment(&segment_path(dir, next))?;
                segments.push_back(Segment::new(next, MAGIC.len() as u64));
            }
            None => {
                write_new_segment(&segment_path(dir, 1))?;
                segments.push_back(Segment::new(1, MAGIC.len() as u64));
            }
        }
        let head = segments.back().expect("a head segment was just ensured");
        let head_path = segment_path(dir, head.number);
        let file = HeadFile::open(
            &head_path,
            head.bytes,
            policy.bypasses_cache(),
            WRITE_BUFFER,
        )
        .map_err(io_err(&head_path))?;
        let (tx, rx) = mpsc::channel::<Msg>();
        let log = StreamLog {
            tx,
            state: Arc::new(LogState {
                failed: AtomicBool::new(false),
                disk_bytes: AtomicU64::new(segments.iter().map(|s| s.bytes).sum()),
                written_bytes: AtomicU64::new(0),
            }),
            writer: Arc::new(Mutex::new(None)),
        };
        if !recovery.rings.is_empty() {
            tracing::info!(streams = recovery.rings.len(), "stream log replayed");
        }
        let hub = StreamHub::with_backend(limits, Box::new(log.clone()))
            .with_rings(recovery.rings.into_values(), Instant::now());
        let hub = Arc::new(hub);
        let writer = Writer {
            dir: dir.to_owned(),
            policy,
            hub: Inbox::of(&hub),
            state: log.state.clone(),
            file,
            segments,
            spares: spare_files,
            segment_limit,
            last_reclaim: std::time::Instant::now(),
            last_sync: std::time::Instant::now(),
            dirty: false,
        };
        let handle = std::thread::Builder::new()
            .name("rungate-stream-log".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(dir))?;
        *log.writer.lock() = Some(handle);
        Ok((hub, log))
    }

    /// Bytes this process has written to the log so far, everything
    /// included (records, segment headers, snapshots, rewrites).
    pub fn written_bytes(&self) -> u64 {
        self.state.written_bytes.load(Ordering::Relaxed)
    }

    /// Writes a snapshot of every ring to a new segment and deletes the
    /// older ones, now.
    pub async fn compact_now(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Compact(done)).is_ok() {
            let _ = wait.await;
        }
    }

    /// Queues a record about `ring`'s run; `end` is what it holds up to
    /// (see [`Segment::runs`]).
    fn append(
        &self,
        bytes: Vec<u8>,
        ring: &Ring,
        end: u64,
        commit: Option<Commit>,
        ack: Option<Ack>,
    ) {
        let _ = self.tx.send(Msg::Append {
            bytes,
            run: ring.run().clone(),
            epoch: ring.epoch().clone(),
            end,
            commit,
            ack,
        });
    }
}

/// The spares a previous run left for reuse, at most [`MAX_SPARES`]; the
/// rest are deleted.
fn spare_files(dir: &Path) -> Result<Vec<PathBuf>, LogError> {
    let mut kept = Vec::new();
    for n in spares(dir)? {
        let path = spare_path(dir, n);
        if kept.len() < MAX_SPARES {
            kept.push(path);
        } else {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(kept)
}

/// The answer once the writer acknowledged the record: `value`, or why not.
fn once_written<T: Send + 'static>(
    acked: oneshot::Receiver<Result<(), StreamError>>,
    value: T,
) -> StreamFuture<Result<T, StreamError>> {
    StreamFuture::new(async move {
        match acked.await {
            Ok(Ok(())) => Ok(value),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StreamError::Unavailable("the stream log stopped".into())),
        }
    })
}

impl Backend for StreamLog {
    fn publish(
        &self,
        ring: &mut Ring,
        events: &[PublishedEvent<'_>],
        _: Option<Publisher<'_>>,
    ) -> Result<Stored<PublishOutcome>, StreamError> {
        if !self.healthy() {
            return Err(StreamError::Unavailable(
                "the stream log cannot be written; nothing was stored".into(),
            ));
        }
        let appended = ring.append_uncommitted(events)?;
        let outcome = appended.outcome();
        let Some((first, texts)) = ring.last_batch().filter(|_| appended.accepted > 0) else {
            // Nothing new (all duplicates): nothing to wait for.
            return Ok(Stored::Now(outcome));
        };
        let bytes = encode_batch(ring, first, ring.last_seq(), &texts);
        let (ack, acked) = oneshot::channel();
        self.append(
            bytes,
            ring,
            outcome.next_offset,
            Some(Commit::Batch),
            Some(ack),
        );
        Ok(Stored::Later(once_written(acked, outcome)))
    }

    fn end(&self, ring: &mut Ring, end: EndRequest) -> Result<Stored<Arc<RunEnd>>, StreamError> {
        if !self.healthy() {
            return Err(StreamError::Unavailable(
                "the stream log cannot be written; the run did not end".into(),
            ));
        }
        let end = ring.finish(end, false);
        let (ack, acked) = oneshot::channel();
        let bytes = encode_end(ring, &end);
        self.append(
            bytes,
            ring,
            ring.next_offset(),
            Some(Commit::End),
            Some(ack),
        );
        Ok(Stored::Later(once_written(acked, end)))
    }

    fn tell(&self, news: News<'_>) {
        match news {
            News::Created(ring) => {
                self.append(encode_snapshot(ring), ring, ring.first_offset(), None, None);
            }
            News::Dropped { run, epoch } => {
                let _ = self.tx.send(Msg::Append {
                    bytes: encode_drop(run, epoch),
                    run: run.clone(),
                    epoch: epoch.clone(),
                    end: 0,
                    commit: None,
                    ack: None,
                });
            }
            // Sessions are not the log's: a restored session re-announces
            // itself on reattach.
            News::SessionStarted(_) | News::SessionEnded { .. } => {}
        }
    }

    /// Waits until everything queued so far is written and synced.
    fn flush(&self) -> StreamFuture<()> {
        let (done, wait) = oneshot::channel();
        let sent = self.tx.send(Msg::Flush(done)).is_ok();
        StreamFuture::new(async move {
            if sent {
                let _ = wait.await;
            }
        })
    }

    fn disk_bytes(&self) -> u64 {
        self.state.disk_bytes.load(Ordering::Relaxed)
    }

    /// Whether the log can still be written.
    fn healthy(&self) -> bool {
        !self.state.failed.load(Ordering::Acquire)
    }

    /// Flushes, stops the writer thread and waits for it.
    fn close(&self) -> StreamFuture<()> {
        let flushed = self.flush();
        let tx = self.tx.clone();
        let writer = self.writer.clone();
        StreamFuture::new(async move {
            flushed.await;
            let _ = tx.send(Msg::Stop);
            let handle = writer.lock().take();
            if let Some(h) = handle {
                let _ = tokio::task::spawn_blocking(move || h.join()).await;
            }
        })
    }
}

#[cfg(test)]
#[path = "../log_tests.rs"]
mod tests;

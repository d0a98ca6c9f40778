//! The stream log: what is acknowledged comes back after a restart, a torn
//! tail is cut at any byte, corruption elsewhere and foreign files are
//! loud, dropped streams stay dropped, compaction keeps everything live.

use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::Instant;

use super::record::{RecordAt, read_record};
use super::*;
use crate::ids::RunId;
use crate::stream::hub::Visible;
use crate::stream::{Delivery, EventDelivery};

fn run(name: &str) -> RunId {
    RunId::new(name).unwrap()
}

fn limits() -> StreamLimits {
    StreamLimits {
        max_events_per_run: 1000,
        max_bytes_per_run: 1 << 20,
        global_max_bytes: 64 << 20,
        retention: Duration::from_secs(3600),
        max_events_per_delivery: 10_000,
    }
}

fn event(i: u64) -> String {
    format!(r#"{{"type":"t","seq":{i},"data":{i}}}"#)
}

async fn publish(engine: &StreamHub, r: &RunId, seqs: std::ops::Range<u64>) -> PublishOutcome {
    let texts: Vec<String> = seqs.clone().map(event).collect();
    let events: Vec<PublishedEvent<'_>> = texts
        .iter()
        .zip(seqs)
        .map(|(json, seq)| PublishedEvent {
            json,
            seq: Some(seq),
        })
        .collect();
    engine.publish(r, &events, Instant::now()).await.unwrap()
}

/// Every event the engine's stream for `r` holds, as (offset, JSON).
fn contents(engine: &StreamHub, r: &RunId) -> (String, Vec<(u64, String)>) {
    let (info, mut sub) = engine.resume(r, Some(0), None, Instant::now());
    let mut out = Vec::new();
    while let Some(EventDelivery::Events(events)) = sub.next_events().now_or_never() {
        if events.is_empty() {
            break;
        }
        for e in events {
            out.push((e.offset, String::from_utf8(e.json.to_vec()).unwrap()));
        }
    }
    (info.stream_epoch.as_str().to_owned(), out)
}

fn open(dir: &Path) -> Arc<StreamHub> {
    super::open(dir, limits(), SyncPolicy::Always).unwrap()
}

/// The hub and the log itself, to look at the log.
fn open_log(dir: &Path, limits: StreamLimits, segment_limit: u64) -> (Arc<StreamHub>, StreamLog) {
    StreamLog::open_with(dir, limits, SyncPolicy::Always, segment_limit).unwrap()
}

#[tokio::test]
async fn acknowledged_batches_epochs_offsets_and_dedupe_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("r");
    let before = {
        let engine = open(dir.path());
        publish(&engine, &r, 1..4).await;
        publish(&engine, &r, 4..6).await;
        let seen = contents(&engine, &r);
        engine.close().await;
        seen
    };
    assert_eq!(before.1.len(), 5);
    let engine = open(dir.path());
    assert_eq!(
        contents(&engine, &r),
        before,
        "same epoch, offsets and bytes"
    );
    // The seq high-water mark came back: a resend stores nothing.
    let again = publish(&engine, &r, 1..6).await;
    assert_eq!((again.accepted, again.duplicates), (0, 5));
    let more = publish(&engine, &r, 6..7).await;
    assert_eq!((more.first_offset, more.next_offset), (5, 6));
    engine.close().await;
}

#[tokio::test]
async fn a_torn_last_record_is_cut_at_every_byte_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("torn");
    {
        let engine = open(dir.path());
        publish(&engine, &r, 1..3).await;
        publish(&engine, &r, 3..5).await;
        engine.close().await;
    }
    let path = segment_path(dir.path(), 1);
    let whole = fs::read(&path).unwrap();
    // Where the last record starts: replay everything but it.
    let last_len = {
        let mut at = MAGIC.len();
        let mut starts = Vec::new();
        while at < whole.len() {
            starts.push(at);
            let len = u32::from_le_bytes(whole[at..at + 4].try_into().unwrap()) as usize;
            at += 8 + len;
        }
        whole.len() - starts.last().unwrap()
    };
    for cut in 1..last_len {
        let case = tempfile::tempdir().unwrap();
        let torn = segment_path(case.path(), 1);
        fs::write(&torn, &whole[..whole.len() - cut]).unwrap();
        let engine = open(case.path());
        let (_, events) = contents(&engine, &r);
        assert_eq!(
            events.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![0, 1],
            "cut {cut} bytes from the end"
        );
        // Usable again: the next batch continues the offsets.
        let next = publish(&engine, &r, 3..4).await;
        assert_eq!(next.first_offset, 2);
        engine.close().await;
        assert_eq!(contents(&open(case.path()), &r).1.len(), 3);
    }
    // A flipped byte in the last record's body is a bad checksum: cut too.
    let case = tempfile::tempdir().unwrap();
    let mut flipped = whole.clone();
    let n = flipped.len() - 3;
    flipped[n] ^= 0x55;
    fs::write(segment_path(case.path(), 1), &flipped).unwrap();
    assert_eq!(contents(&open(case.path()), &r).1.len(), 2);
}

#[tokio::test]
async fn corruption_before_the_tail_and_foreign_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("c");
    {
        let engine = open(dir.path());
        publish(&engine, &r, 1..3).await;
        engine.close().await;
    }
    // A second segment makes the first one's records not the tail.
    let first = segment_path(dir.path(), 1);
    let mut bytes = fs::read(&first).unwrap();
    bytes[MAGIC.len() + 10] ^= 0xff;
    fs::write(&first, &bytes).unwrap();
    fs::write(segment_path(dir.path(), 2), MAGIC).unwrap();
    match super::open(dir.path(), limits(), SyncPolicy::Always) {
        Err(LogError::Corrupt { .. }) => {}
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }

    let foreign = tempfile::tempdir().unwrap();
    fs::write(
        segment_path(foreign.path(), 1),
        b"PK\x03\x04not a log at all",
    )
    .unwrap();
    match super::open(foreign.path(), limits(), SyncPolicy::Always) {
        Err(LogError::Version { .. }) => {}
        other => panic!("expected Version, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn a_dropped_stream_stays_dropped_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (gone, kept) = (run("gone"), run("kept"));
    {
        let mut l = limits();
        l.retention = Duration::from_millis(1);
        let engine = super::open(dir.path(), l, SyncPolicy::Always).unwrap();
        publish(&engine, &gone, 1..3).await;
        publish(&engine, &kept, 1..3).await;
        engine.session_started(&kept, Instant::now());
        engine.session_ended(&gone, Instant::now());
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(engine.sweep(Instant::now()).expired_streams, 1);
        engine.close().await;
    }
    let engine = open(dir.path());
    let runs: Vec<String> = engine.runs().iter().map(|s| s.run_id.to_string()).collect();
    assert_eq!(runs, vec!["kept"]);
}

/// A stream that exists only because a session started or a viewer asked
/// for it keeps its epoch across a restart: a viewer that resumed it empty
/// resumes it again with `truncated: false`.
#[tokio::test]
async fn a_stream_never_published_to_keeps_its_epoch_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (attached, watched) = (run("attached"), run("watched"));
    let epochs = {
        let engine = open(dir.path());
        engine.session_started(&attached, Instant::now());
        let (info, _sub) = engine.resume(&watched, Some(0), None, Instant::now());
        let epochs = (
            contents(&engine, &attached).0,
            info.stream_epoch.as_str().to_owned(),
        );
        engine.close().await;
        epochs
    };
    let engine = open(dir.path());
    assert_eq!(contents(&engine, &attached).0, epochs.0);
    let (info, _sub) = engine.resume(&watched, Some(0), Some(&epochs.1), Instant::now());
    assert_eq!(info.stream_epoch.as_str().to_owned(), epochs.1);
    assert!(!info.truncated);
    assert_eq!(info.next_offset, 0);
}

#[tokio::test]
async fn compaction_keeps_every_live_event_and_frees_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("busy");
    let mut l = limits();
    // A small ring: most of what is published is evicted and reclaimable.
    l.max_events_per_run = 50;
    let before = {
        let (engine, log) = open_log(dir.path(), l.clone(), SEGMENT_BYTES);
        for b in 0..200u64 {
            publish(&engine, &r, b * 10 + 1..b * 10 + 11).await;
        }
        log.compact_now().await;
        let seen = contents(&engine, &r);
        assert_eq!(seen.1.len(), 50);
        assert!(
            log.disk_bytes() < 50 * 1024,
            "compacted to about the live size: {} bytes",
            log.disk_bytes()
        );
        engine.close().await;
        seen
    };
    assert_eq!(segments(dir.path()).unwrap().len(), 1);
    let engine = super::open(dir.path(), l, SyncPolicy::Always).unwrap();
    assert_eq!(contents(&engine, &r), before);
    let dup = publish(&engine, &r, 1991..2001).await;
    assert_eq!(dup.accepted, 0, "dedupe state survived compaction");
}

/// What a [`Held`] backend took: each batch's epoch and the head after it.
type Logged = Arc<parking_lot::Mutex<Vec<(crate::stream::StreamEpoch, u64)>>>;

/// A backend that appends as the log does and writes nothing: what it
/// took is shown only when the test says it is durable.
struct Held(Logged);

impl Backend for Held {
    fn publish(
        &self,
        ring: &mut Ring,
        events: &[PublishedEvent<'_>],
        _: Option<Publisher<'_>>,
    ) -> Result<Stored<PublishOutcome>, StreamError> {
        let outcome = ring.append_uncommitted(events)?.outcome();
        self.0
            .lock()
            .push((ring.epoch().clone(), outcome.next_offset));
        Ok(Stored::Later(StreamFuture::ready(Ok(outcome))))
    }

    fn end(&self, ring: &mut Ring, end: EndRequest) -> Result<Stored<Arc<RunEnd>>, StreamError> {
        Ok(Stored::Later(StreamFuture::ready(Ok(
            ring.finish(end, false)
        ))))
    }
}

#[tokio::test]
async fn readers_never_see_a_batch_before_it_is_committed() {
    let logged = Logged::default();
    let now = Instant::now();
    let hub = Arc::new(StreamHub::with_backend(
        limits(),
        Box::new(Held(logged.clone())),
    ));
    let r = run("v");
    let (_, mut sub) = hub.resume(&r, Some(0), None, now);
    let json = event(1);
    let outcome = hub
        .publish(
            &r,
            &[PublishedEvent {
                json: &json,
                seq: Some(1),
            }],
            now,
        )
        .await
        .unwrap();
    assert_eq!(outcome.next_offset, 1);
    assert!(sub.next().now_or_never().is_none(), "not visible yet");
    assert_eq!(hub.summary(&r).unwrap().next_offset, 0);
    let (epoch, up_to) = logged.lock().pop().unwrap();
    Inbox::of(&hub).show(&r, &epoch, Visible::Committed { up_to }, now);
    match sub.next().now_or_never() {
        Some(Delivery::Frames(f)) => assert_eq!(f.len(), 1),
        other => panic!("expected the batch, got {other:?}"),
    }
}

#[test]
fn sync_policies_parse() {
    assert_eq!("always".parse(), Ok(SyncPolicy::Always));
    assert_eq!("os".parse(), Ok(SyncPolicy::Os));
    assert_eq!(
        "interval:50".parse(),
        Ok(SyncPolicy::Interval(Duration::from_millis(50)))
    );
    assert!("interval:0".parse::<SyncPolicy>().is_err());
    assert!("sometimes".parse::<SyncPolicy>().is_err());
}

/// An event of about 200 bytes, as the ingest benchmark publishes.
fn big_event(i: u64) -> String {
    let head = format!(r#"{{"type":"t","seq":{i},"data":""#);
    format!("{head}{}\"}}", "x".repeat(200 - head.len() - 2))
}

async fn publish_big(engine: &StreamHub, r: &RunId, seqs: std::ops::Range<u64>) -> usize {
    let texts: Vec<String> = seqs.clone().map(big_event).collect();
    let events: Vec<PublishedEvent<'_>> = texts
        .iter()
        .zip(seqs)
        .map(|(json, seq)| PublishedEvent {
            json,
            seq: Some(seq),
        })
        .collect();
    let out = engine.publish(r, &events, Instant::now()).await.unwrap();
    assert_eq!(out.accepted, texts.len());
    texts.iter().map(String::len).sum()
}

/// Segments small enough that a test fills dozens of them.
const SMALL_SEGMENT: u64 = 8 << 10;

fn small_rings() -> StreamLimits {
    let mut l = limits();
    l.max_events_per_run = 50;
    l
}

fn open_small(dir: &Path) -> (Arc<StreamHub>, StreamLog) {
    open_log(dir, small_rings(), SMALL_SEGMENT)
}

/// The cause of issue #18: each rotation rewrote every ring. Now a busy
/// log writes each event about once, and old segments go as the rings
/// evict what they hold.
#[tokio::test]
async fn a_busy_log_writes_each_event_once_and_deletes_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let runs = [run("a"), run("b"), run("c")];
    let (engine, log) = open_small(dir.path());
    let mut published = 0;
    for b in 0..150u64 {
        for r in &runs {
            published += publish_big(&engine, r, b * 10 + 1..b * 10 + 11).await;
        }
    }
    let written = log.written_bytes() as f64;
    let amplification = written / published as f64;
    assert!(
        amplification < 1.15,
        "{written} bytes written for {published} bytes of events: {amplification:.2}x"
    );
    // Three rings of 50 events of 200 B: about 30 KiB live.
    let on_disk = segments(dir.path()).unwrap();
    assert!(
        log.disk_bytes() < 30 * 1024 + 4 * SMALL_SEGMENT,
        "{} bytes on disk in {} segments",
        log.disk_bytes(),
        on_disk.len()
    );
    assert!(on_disk[0] > 1, "the first segments were deleted");
    let before: Vec<_> = runs.iter().map(|r| contents(&engine, r)).collect();
    assert!(before.iter().all(|(_, events)| events.len() == 50));
    engine.close().await;

    let (engine, _) = open_small(dir.path());
    let after: Vec<_> = runs.iter().map(|r| contents(&engine, r)).collect();
    assert_eq!(after, before, "same epochs, offsets and events");
    let resent = engine
        .publish(
            &runs[0],
            &[PublishedEvent {
                json: &big_event(1500),
                seq: Some(1500),
            }],
            Instant::now(),
        )
        .await
        .unwrap();
    assert_eq!(resent.duplicates, 1, "the seq mark survived");
    engine.close().await;
}

/// A quiet ring keeps a batch in the oldest segment while a busy one
/// writes on: it is rewritten at the head, so the disk holds about what the
/// rings keep; a stream with no events (and one dropped) whose only records
/// were in deleted segments keeps its epoch (stays dropped).
#[tokio::test]
async fn old_segments_go_whatever_quiet_empty_and_dropped_streams_they_hold() {
    let dir = tempfile::tempdir().unwrap();
    let (quiet, empty, gone, busy) = (run("quiet"), run("empty"), run("gone"), run("busy"));
    let mut l = small_rings();
    l.retention = Duration::from_millis(1);
    let open = |l: StreamLimits| open_log(dir.path(), l, SMALL_SEGMENT);
    let (engine, log) = open(l.clone());
    publish_big(&engine, &quiet, 1..4).await;
    engine.session_started(&quiet, Instant::now());
    engine.session_started(&empty, Instant::now());
    publish_big(&engine, &gone, 1..4).await;
    engine.session_ended(&gone, Instant::now());
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(engine.sweep(Instant::now()).expired_streams, 1);
    let kept = (contents(&engine, &quiet), contents(&engine, &empty).0);
    for b in 0..300u64 {
        publish_big(&engine, &busy, b * 10 + 1..b * 10 + 11).await;
    }
    let on_disk = segments(dir.path()).unwrap();
    assert!(on_disk[0] > 1, "segment 1 (quiet's batch) was reclaimed");
    assert!(
        log.disk_bytes() < 4 * 10 * 1024 + 4 * SMALL_SEGMENT,
        "{} bytes on disk",
        log.disk_bytes()
    );
    engine.close().await;

    let (engine, _) = open(l);
    assert_eq!(contents(&engine, &quiet), kept.0);
    assert_eq!(contents(&engine, &empty).0, kept.1, "the same epoch");
    let runs: Vec<String> = engine.runs().iter().map(|s| s.run_id.to_string()).collect();
    assert_eq!(runs, vec!["busy", "empty", "quiet"]);
    let again = engine
        .publish(
            &quiet,
            &[PublishedEvent {
                json: &big_event(3),
                seq: Some(3),
            }],
            Instant::now(),
        )
        .await
        .unwrap();
    assert_eq!(again.duplicates, 1, "quiet's seq mark survived the rewrite");
    engine.close().await;
}

/// An ended run's end is part of its ring: when the old segments that
/// hold it go, the end is rewritten at the head with the ring, and a
/// restart still knows the run ended (where the rotation of issue #18 and
/// the run lifecycle of issue #15 meet).
#[tokio::test]
async fn an_end_outlives_the_segments_it_was_written_in() {
    let dir = tempfile::tempdir().unwrap();
    let ended = run("ended");
    let busy = [run("a"), run("b")];
    let (engine, _) = open_small(dir.path());
    publish_big(&engine, &ended, 1..6).await;
    let request = crate::stream::EndRequest {
        outcome: crate::ids::RunOutcome::Failed,
        message: Some("boom".into()),
        ended_at: crate::time::Timestamp::now(),
    };
    let end = engine
        .finish(&ended, request, Instant::now())
        .await
        .unwrap();
    assert_eq!(end.next_offset, 5);
    for b in 0..150u64 {
        for r in &busy {
            publish_big(&engine, r, b * 10 + 1..b * 10 + 11).await;
        }
    }
    let on_disk = segments(dir.path()).unwrap();
    assert!(
        on_disk[0] > 1,
        "the first segments were deleted: {on_disk:?}"
    );
    let before = contents(&engine, &ended);
    engine.close().await;

    let (engine, _) = open_small(dir.path());
    assert_eq!(contents(&engine, &ended), before, "same epoch and events");
    let end = engine.summary(&ended).unwrap().end.expect("still ended");
    assert_eq!(
        (end.outcome, end.message.as_deref(), end.next_offset),
        (crate::ids::RunOutcome::Failed, Some("boom"), 5)
    );
    engine.close().await;
}

/// A copy of the log's segment files as they are now: what a crash would
/// leave (everything acknowledged is synced; spares are not the log's).
fn crash_image(dir: &Path) -> tempfile::TempDir {
    let image = tempfile::tempdir().unwrap();
    for n in segments(dir).unwrap() {
        fs::copy(segment_path(dir, n), segment_path(image.path(), n)).unwrap();
    }
    image
}

/// Segments that go are kept as spares and written over (issue #18: see
/// `segment::zero`). A crash image taken while a reused segment is the
/// head replays exactly what was acknowledged, and the log goes on.
#[tokio::test]
async fn a_crash_while_a_reused_segment_is_the_head_loses_and_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("a");
    let (engine, _) = open_small(dir.path());
    let mut image = None;
    for b in 0..200u64 {
        publish_big(&engine, &r, b * 10 + 1..b * 10 + 11).await;
        // Segment 8 is written in a spare's file (segments 1 to 7 hold
        // more than the 50 events a ring keeps, so they went).
        if segments(dir.path()).unwrap().last() == Some(&8) {
            image = Some(crash_image(dir.path()));
            break;
        }
    }
    let image = image.expect("segment 8 was reached");
    // Past the head's records: under `always` (past the page cache) the
    // padding of the last block and then the spare's old records, as they
    // were; through the cache, zeros (or nothing, where the filesystem
    // cannot zero a range and the spare was emptied). The replay below
    // must end at the head's own records either way.
    let head = fs::read(segment_path(image.path(), 8)).unwrap();
    let end = records_end(&head, 8);
    let old_left = head[end..].iter().any(|&b| b != 0);
    assert!(spares(dir.path()).unwrap().len() <= MAX_SPARES);
    let live = contents(&engine, &r);
    assert_eq!(live.1.len(), 50);
    engine.close().await;

    let (crashed, _) = open_small(image.path());
    assert_eq!(
        contents(&crashed, &r),
        live,
        "the crash image replays what was acknowledged (old bytes past the head's records: {old_left})"
    );
    publish_big(&crashed, &r, 5000..5010).await;
    crashed.close().await;
    let (again, _) = open_small(image.path());
    let (epoch, events) = contents(&again, &r);
    assert_eq!(epoch, live.0);
    assert_eq!(
        events.last().map(|e| e.0),
        Some(live.1.last().unwrap().0 + 10)
    );
    again.close().await;

    let (restarted, _) = open_small(dir.path());
    assert_eq!(contents(&restarted, &r), live, "a clean restart too");
    restarted.close().await;
}

/// Where the records of segment `n`'s `bytes` end: the first byte that
/// does not start a whole record of its own.
fn records_end(bytes: &[u8], n: u64) -> usize {
    let mut at = MAGIC.len();
    while let RecordAt::Whole { next, .. } = read_record(bytes, at, segment::crc_mask(n)) {
        at = next;
    }
    at
}

/// Where the records of segment `n`'s `bytes` start, up to the first that
/// is not whole and its own.
fn record_starts(bytes: &[u8], n: u64) -> Vec<usize> {
    let mut at = MAGIC.len();
    let mut starts = Vec::new();
    while let RecordAt::Whole { next, .. } = read_record(bytes, at, segment::crc_mask(n)) {
        starts.push(at);
        at = next;
    }
    starts
}

/// Were a reused file's old records still there (a filesystem that cannot
/// zero it, a crash), they carry their segment's checksum mask, so replay
/// ends where the segment's own records do, even when an old record starts
/// exactly where the next one would have: one run publishing batches of
/// one size fills every segment alike, so the head followed by the rest of
/// the segment before it is that case (fails with the masks off).
#[tokio::test]
async fn old_records_left_in_a_reused_file_never_replay() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("a");
    let (engine, _) = open_small(dir.path());
    for b in 0..200u64 {
        publish_big(&engine, &r, b * 10 + 1..b * 10 + 11).await;
        let numbers = segments(dir.path()).unwrap();
        let head = *numbers.last().unwrap();
        let len = fs::metadata(segment_path(dir.path(), head)).unwrap().len();
        if head >= 4 && len > SMALL_SEGMENT / 4 && len < SMALL_SEGMENT / 2 {
            break;
        }
    }
    let live = contents(&engine, &r);
    engine.close().await;
    let numbers = segments(dir.path()).unwrap();
    let (head, before) = (numbers[numbers.len() - 1], numbers[numbers.len() - 2]);
    assert!(head >= 4, "the head is a few segments on");
    let head_bytes = fs::read(segment_path(dir.path(), head)).unwrap();
    let old_bytes = fs::read(segment_path(dir.path(), before)).unwrap();
    assert!(
        record_starts(&old_bytes, before).contains(&head_bytes.len()),
        "an old record starts where the head's records end"
    );

    let image = crash_image(dir.path());
    let mut reused = head_bytes.clone();
    reused.extend_from_slice(&old_bytes[head_bytes.len()..]);
    fs::write(segment_path(image.path(), head), &reused).unwrap();
    let (replayed, _) = open_small(image.path());
    assert_eq!(contents(&replayed, &r), live);
    replayed.close().await;
}

/// A log written by an earlier build (format version 1: checksums not
/// masked) replays as it is, and the log goes on in a new segment.
#[tokio::test]
async fn a_version_1_log_replays_and_goes_on_in_a_new_segment() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("v1");
    let epoch = {
        let engine = open(dir.path());
        publish(&engine, &r, 1..4).await;
        let epoch = contents(&engine, &r).0;
        engine.close().await;
        epoch
    };
    // Rewrite segment 1 as version 1 wrote it.
    let path = segment_path(dir.path(), 1);
    let mut bytes = fs::read(&path).unwrap();
    bytes[..MAGIC.len()].copy_from_slice(segment::MAGIC_V1);
    record::mask_records(&mut bytes[MAGIC.len()..], segment::crc_mask(1));
    fs::write(&path, &bytes).unwrap();

    let engine = open(dir.path());
    let (same_epoch, events) = contents(&engine, &r);
    assert_eq!((same_epoch.as_str(), events.len()), (epoch.as_str(), 3));
    let next = publish(&engine, &r, 4..6).await;
    assert_eq!(next.first_offset, 3);
    engine.close().await;
    assert_eq!(
        segments(dir.path()).unwrap(),
        vec![1, 2],
        "version 1 is not written on"
    );
    assert_eq!(fs::read(&path).unwrap(), bytes, "and left as it was");
    let engine = open(dir.path());
    assert_eq!(contents(&engine, &r).1.len(), 5);
    engine.close().await;
}

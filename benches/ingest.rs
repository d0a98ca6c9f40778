//! Ingest hot paths (issue #18): parsing one `events.publish` frame of
//! 100 × 200 B events the way the gateway does (envelope, then the typed
//! command with each event's shape checked), and appending batches to the
//! durable stream log with `--stream-sync always` (ring append, record
//! encoding, the writer thread's write and fdatasync, the ack).
//!
//! Each group carries a `baseline_*` measured in the same run, so the
//! figures in BENCHMARKS.md are ratios on one machine: for the parse, plain
//! serde_json over the same frame (into a `Value`, and a skim to
//! `RawValue`s); for the log, a plain file write of the same bytes followed
//! by fdatasync, one batch at a time and 100 batches per sync (the group
//! commit the log does under 100 concurrent publishers).

use std::hint::black_box;
use std::io::Write;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rungate::ids::RunId;
use rungate::protocol::{Command, CommandKind, decode};
use rungate::stream::log::{self, SyncPolicy};
use rungate::stream::{PublishedEvent, StreamLimits};
use serde_json::value::RawValue;
use tokio::time::Instant;

const EVENTS: usize = 100;
const EVENT_BYTES: usize = 200;

/// Event `i` of exactly 200 bytes, shaped as the loadgen's.
fn event(i: usize) -> String {
    let head = format!(r#"{{"type":"lg","seq":{i},"data":{{"t":1764000000000000,"p":""#);
    let pad = EVENT_BYTES - head.len() - 3;
    format!("{head}{}\"}}}}", "x".repeat(pad))
}

fn publish_frame() -> String {
    let events: Vec<String> = (0..EVENTS).map(event).collect();
    format!(
        r#"{{"id":"7","type":"events.publish","payload":{{"sessionId":"0123456789abcdef0123456789abcdef","runId":"run-0001","events":[{}]}}}}"#,
        events.join(",")
    )
}

fn parse(c: &mut Criterion) {
    let frame = publish_frame();
    assert!(frame.len() > EVENTS * EVENT_BYTES);
    let mut g = c.benchmark_group("publish_parse_100x200B");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("gateway_decode_and_typed", |b| {
        b.iter(|| {
            let req = decode(black_box(&frame)).expect("a valid envelope");
            let kind = CommandKind::parse(&req.kind).expect("a known command");
            match Command::parse(kind, req.payload) {
                Ok(Command::EventsPublish(p)) => black_box(p.events.len()),
                Ok(_) => panic!("not a publish"),
                Err(e) => panic!("the frame was refused: {e:?}"),
            }
        })
    });
    g.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| black_box(serde_json::from_str::<serde_json::Value>(black_box(&frame)).unwrap()))
    });
    g.bench_function("baseline_serde_json_raw_events", |b| {
        #[derive(serde::Deserialize)]
        struct Env<'a> {
            #[serde(borrow)]
            payload: Payload<'a>,
        }
        #[derive(serde::Deserialize)]
        struct Payload<'a> {
            #[serde(borrow)]
            events: Vec<&'a RawValue>,
        }
        b.iter(|| {
            let env: Env<'_> = serde_json::from_str(black_box(&frame)).unwrap();
            black_box(env.payload.events.len())
        })
    });
    g.finish();
}

fn log_append(c: &mut Criterion) {
    let texts: Vec<String> = (0..EVENTS).map(event).collect();
    let batch_bytes = (EVENTS * EVENT_BYTES) as u64;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir =
        tempfile::tempdir_in(std::env::var_os("BENCH_DIR").unwrap_or_else(|| ".".into())).unwrap();
    // Rings of 1,000 events: the log reclaims as it goes and stays small on
    // a shared disk (about 2 × 100 × 230 KB).
    let limits = StreamLimits {
        max_events_per_run: 1000,
        ..StreamLimits::default()
    };
    let engine = log::open(dir.path(), limits, SyncPolicy::Always).expect("open the log");
    let runs: Vec<RunId> = (0..100)
        .map(|i| RunId::new(format!("run-{i:04}")).unwrap())
        .collect();
    let mut seq = 0u64;
    let mut next_batch = |n: u64| -> Vec<(String, u64)> {
        let out = texts.iter().map(|t| (t.clone(), seq + n)).collect();
        seq += 1;
        out
    };

    let mut g = c.benchmark_group("log_append_100x200B_always");
    g.measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(batch_bytes));
    g.bench_function("durable_publish_one_batch", |b| {
        b.iter_batched(
            || next_batch(0),
            |batch| {
                let events: Vec<PublishedEvent<'_>> = batch
                    .iter()
                    .map(|(json, _)| PublishedEvent { json, seq: None })
                    .collect();
                rt.block_on(engine.publish(&runs[0], &events, Instant::now()))
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    let file_path = dir.path().join("baseline.bin");
    let mut file = std::fs::File::create(&file_path).unwrap();
    // Appends, as the log does, but started over past 64 MiB so the file
    // never grows without bound (criterion runs thousands of iterations).
    let mut append_synced = move |bytes: &[u8]| {
        if file.metadata().unwrap().len() > 64 << 20 {
            file.set_len(0).unwrap();
            std::io::Seek::rewind(&mut file).unwrap();
        }
        file.write_all(bytes).unwrap();
        file.sync_data().unwrap();
    };
    // The same bytes as the log's batch record holds: the event texts.
    let record: Vec<u8> = texts.iter().flat_map(|t| t.bytes()).collect();
    g.bench_function("baseline_write_fdatasync_one_batch", |b| {
        b.iter(|| append_synced(black_box(&record)))
    });
    g.finish();

    let mut g = c.benchmark_group("log_append_100_batches_100x200B_always");
    g.measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(batch_bytes * runs.len() as u64));
    g.bench_function("durable_publish_100_concurrent", |b| {
        b.iter(|| {
            let pending: Vec<_> = runs
                .iter()
                .map(|r| {
                    let events: Vec<PublishedEvent<'_>> = texts
                        .iter()
                        .map(|json| PublishedEvent { json, seq: None })
                        .collect();
                    engine.publish(r, &events, Instant::now())
                })
                .collect();
            rt.block_on(async {
                for p in pending {
                    p.await.unwrap();
                }
            })
        })
    });
    let group: Vec<u8> = record.repeat(runs.len());
    g.bench_function("baseline_write_fdatasync_100_batches", |b| {
        b.iter(|| append_synced(black_box(&group)))
    });
    g.finish();
    rt.block_on(engine.close());
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = parse, log_append
}
criterion_main!(benches);

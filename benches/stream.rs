//! Stream hot paths: appending a batch (which builds its shared frame),
//! replaying a full ring through a subscription, building one
//! `stream.events` frame on its own (the cost a mid-batch reader pays), and
//! fanning one batch out to 100 subscribers.
//!
//! Each group carries a `baseline_*` measured in the same run: the naive
//! way (serde_json per frame or per subscriber, a copy per event), so the
//! figures in BENCHMARKS.md are ratios on one machine, not absolute claims.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::FutureExt;
use rungate::ids::RunId;
use rungate::stream::frame::FrameBuilder;
use rungate::stream::ring::{Ring, RingLimits};
use rungate::stream::{Delivery, PublishedEvent, StreamHub, StreamLimits};
use serde_json::value::RawValue;
use std::collections::VecDeque;
use tokio::time::Instant;

/// `n` distinct events of exactly 200 bytes of JSON each.
fn events(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let head = format!(r#"{{"type":"token","seq":{i},"data":""#);
            let pad = 200 - head.len() - 2;
            format!("{head}{}\"}}", "x".repeat(pad))
        })
        .collect()
}

fn append(c: &mut Criterion) {
    let texts = events(100);
    debug_assert!(texts.iter().all(|t| t.len() == 200));
    let batch: Vec<PublishedEvent<'_>> = texts
        .iter()
        .map(|t| PublishedEvent { json: t, seq: None })
        .collect();
    let run = RunId::new("bench-run").expect("valid run id");
    let mut group = c.benchmark_group("stream_append");
    group.throughput(Throughput::Elements(100));
    // Steady state: the ring is full, so each append also evicts a batch.
    let limits = StreamLimits::default();
    let mut ring = Ring::new(
        run.clone(),
        RingLimits {
            max_events: limits.max_events_per_run,
            max_bytes: limits.max_bytes_per_run,
        },
    );
    group.bench_function("ring_append_100x200B", |b| {
        b.iter(|| black_box(ring.append(black_box(&batch)).expect("fits")))
    });
    let hub = StreamHub::new(limits.clone());
    let now = Instant::now();
    group.bench_function("hub_publish_100x200B", |b| {
        b.iter(|| {
            let answer = hub.publish(&run, black_box(&batch), now).now_or_never();
            black_box(answer.expect("answered at once").expect("fits"))
        })
    });
    // Naive: every event copied into its own buffer, kept in a bounded deque.
    let mut naive: VecDeque<(u64, bytes::Bytes)> = VecDeque::new();
    let mut offset = 0u64;
    group.bench_function("baseline_deque_copy_100x200B", |b| {
        b.iter(|| {
            for t in &texts {
                if naive.len() == limits.max_events_per_run {
                    naive.pop_front();
                }
                naive.push_back((offset, bytes::Bytes::copy_from_slice(t.as_bytes())));
                offset += 1;
            }
            black_box(naive.len())
        })
    });
    group.finish();
}

fn replay(c: &mut Criterion) {
    let hub = StreamHub::new(StreamLimits::default());
    let run = RunId::new("bench-run").expect("valid run id");
    let texts = events(100);
    let now = Instant::now();
    let batch: Vec<PublishedEvent<'_>> = texts
        .iter()
        .map(|t| PublishedEvent { json: t, seq: None })
        .collect();
    for _ in 0..100 {
        let answer = hub.publish(&run, &batch, now).now_or_never();
        answer.expect("answered at once").expect("fits");
    }
    let mut group = c.benchmark_group("stream_replay");
    group.throughput(Throughput::Elements(10_000));
    group.bench_function("subscription_10k_from_0", |b| {
        b.iter_batched(
            || hub.resume(&run, Some(0), None, now).1,
            |mut sub| {
                let mut frames = 0;
                while let Some(Delivery::Frames(f)) = sub.next().now_or_never() {
                    frames += f.len();
                }
                assert_eq!(sub.cursor(), 10_000);
                black_box(frames)
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("events_10k_from_0", |b| {
        b.iter_batched(
            || hub.resume(&run, Some(0), None, now).1,
            |mut sub| {
                let mut n = 0;
                while let Some(rungate::stream::EventDelivery::Events(e)) =
                    sub.next_events().now_or_never()
                {
                    n += e.len();
                }
                black_box(n)
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn build_frame(c: &mut Criterion) {
    let texts = events(100);
    let json_bytes = texts.iter().map(String::len).sum();
    let epoch = "0123456789abcdef0123456789abcdef";
    let mut group = c.benchmark_group("stream_frame");
    group.throughput(Throughput::Bytes(json_bytes as u64));
    group.bench_function("build_100x200B", |b| {
        b.iter(|| {
            let mut f = FrameBuilder::new("bench-run", epoch, 1_000_000, texts.len(), json_bytes);
            for t in &texts {
                black_box(f.push(t.as_bytes()));
            }
            black_box(f.finish())
        })
    });
    // serde_json with the events kept raw: the best serde can do.
    let raws: Vec<&RawValue> = texts
        .iter()
        .map(|t| serde_json::from_str(t).expect("valid JSON"))
        .collect();
    group.bench_function("baseline_serde_raw_100x200B", |b| {
        b.iter(|| black_box(serde_json::to_vec(&push_of(epoch, &raws)).expect("serializes")))
    });
    // serde_json with parsed events: parse once, serialize per frame.
    let values: Vec<serde_json::Value> = texts
        .iter()
        .map(|t| serde_json::from_str(t).expect("valid JSON"))
        .collect();
    group.bench_function("baseline_serde_value_100x200B", |b| {
        b.iter(|| black_box(serde_json::to_vec(&push_of(epoch, &values)).expect("serializes")))
    });
    group.finish();
}

/// A `stream.events` push as serde would write it from borrowed events:
/// derived `Serialize` structs, no intermediate `Value` tree, no clones.
#[derive(serde::Serialize)]
struct Push<'a, T: serde::Serialize> {
    #[serde(rename = "type")]
    kind: &'static str,
    payload: Payload<'a, T>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Payload<'a, T: serde::Serialize> {
    run_id: &'a str,
    stream_epoch: &'a str,
    events: Vec<Entry<'a, T>>,
}

#[derive(serde::Serialize)]
struct Entry<'a, T: serde::Serialize> {
    offset: u64,
    event: &'a T,
}

fn push_of<'a, T: serde::Serialize>(epoch: &'a str, events: &'a [T]) -> Push<'a, T> {
    Push {
        kind: "stream.events",
        payload: Payload {
            run_id: "bench-run",
            stream_epoch: epoch,
            events: events
                .iter()
                .enumerate()
                .map(|(i, event)| Entry {
                    offset: 1_000_000 + i as u64,
                    event,
                })
                .collect(),
        },
    }
}

/// One published batch reaching 100 subscribers: the shared frame against
/// serializing it once per subscriber.
fn fan_out(c: &mut Criterion) {
    const SUBSCRIBERS: usize = 100;
    let texts = events(100);
    let run = RunId::new("bench-run").expect("valid run id");
    let now = Instant::now();
    let mut group = c.benchmark_group("stream_fan_out");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    group.bench_function("shared_frame_100_subscribers", |b| {
        b.iter_batched(
            || {
                let hub = StreamHub::new(StreamLimits::default());
                let subs: Vec<_> = (0..SUBSCRIBERS)
                    .map(|_| hub.resume(&run, None, None, now).1)
                    .collect();
                (hub, subs)
            },
            |(hub, mut subs)| {
                let batch: Vec<PublishedEvent<'_>> = texts
                    .iter()
                    .map(|t| PublishedEvent { json: t, seq: None })
                    .collect();
                let answer = hub.publish(&run, &batch, now).now_or_never();
                answer.expect("answered at once").expect("fits");
                let mut bytes = 0;
                for sub in &mut subs {
                    if let Some(Delivery::Frames(frames)) = sub.next().now_or_never() {
                        bytes += frames.iter().map(|f| f.len()).sum::<usize>();
                    }
                }
                black_box(bytes)
            },
            BatchSize::SmallInput,
        )
    });
    // The best serde can do per subscriber: events kept raw, structs derived.
    let raws: Vec<&RawValue> = texts
        .iter()
        .map(|t| serde_json::from_str(t).expect("valid JSON"))
        .collect();
    let epoch = "0123456789abcdef0123456789abcdef";
    group.bench_function("baseline_serde_per_subscriber_100", |b| {
        b.iter(|| {
            let mut bytes = 0;
            for _ in 0..SUBSCRIBERS {
                bytes += serde_json::to_vec(&push_of(epoch, &raws))
                    .expect("serializes")
                    .len();
            }
            black_box(bytes)
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = append, replay, build_frame, fan_out, durable
}
criterion_main!(benches);

/// What durability costs: one publish of 100 × 200 B acknowledged by the
/// in-memory hub, and by the log under each sync policy, from 1 publisher
/// and from 16 at once (group commit shares one sync among them).
fn durable(c: &mut Criterion) {
    use rungate::stream::log::{self, SyncPolicy};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let texts = events(100);
    let mut group = c.benchmark_group("stream_durable");
    group.throughput(Throughput::Elements(100));
    let policies: [(&str, Option<SyncPolicy>); 4] = [
        ("memory", None),
        ("os", Some(SyncPolicy::Os)),
        (
            "interval_100ms",
            Some(SyncPolicy::Interval(Duration::from_millis(100))),
        ),
        ("always", Some(SyncPolicy::Always)),
    ];
    for (name, policy) in policies {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = StreamLimits {
            global_max_bytes: 1 << 30,
            ..StreamLimits::default()
        };
        let engine: std::sync::Arc<StreamHub> = match policy {
            None => std::sync::Arc::new(StreamHub::new(limits)),
            Some(p) => rt
                .block_on(async { log::open(dir.path(), limits, p) })
                .expect("log opens"),
        };
        for publishers in [1usize, 16] {
            let engine = engine.clone();
            let texts = texts.clone();
            group.bench_function(format!("{name}_{publishers}_publishers"), |b| {
                b.iter_custom(|iters| {
                    let engine = engine.clone();
                    let texts = texts.clone();
                    rt.block_on(async move {
                        let started = std::time::Instant::now();
                        let per = (iters as usize).div_ceil(publishers);
                        let mut tasks = Vec::new();
                        for p in 0..publishers {
                            let engine = engine.clone();
                            let texts = texts.clone();
                            tasks.push(tokio::spawn(async move {
                                let run = RunId::new(format!("bench-{p}")).expect("run id");
                                for _ in 0..per {
                                    let batch: Vec<PublishedEvent<'_>> = texts
                                        .iter()
                                        .map(|t| PublishedEvent { json: t, seq: None })
                                        .collect();
                                    let fut = engine.publish(&run, &batch, Instant::now());
                                    drop(batch);
                                    fut.await.expect("stored");
                                }
                            }));
                        }
                        for t in tasks {
                            t.await.expect("publisher");
                        }
                        // Wall time for `iters` publishes, however many
                        // publishers shared them: criterion divides.
                        started.elapsed()
                    })
                })
            });
        }
        rt.block_on(engine.close());
    }
    group.finish();
}

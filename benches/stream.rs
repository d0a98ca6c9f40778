//! Stream hot paths: appending a batch (which builds its shared frame),
//! replaying a full ring through a subscription, and building one
//! `stream.events` frame on its own (the cost a mid-batch reader pays).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::FutureExt;
use rungate::ids::RunId;
use rungate::stream::frame::FrameBuilder;
use rungate::stream::ring::{Ring, RingLimits};
use rungate::stream::{Delivery, NewEvent, StreamHub, StreamLimits};
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
    let batch: Vec<NewEvent<'_>> = texts
        .iter()
        .map(|t| NewEvent { json: t, seq: None })
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
    let hub = StreamHub::new(limits);
    let now = Instant::now();
    group.bench_function("hub_publish_100x200B", |b| {
        b.iter(|| black_box(hub.publish(&run, batch.iter().copied(), now).expect("fits")))
    });
    group.finish();
}

fn replay(c: &mut Criterion) {
    let hub = StreamHub::new(StreamLimits::default());
    let run = RunId::new("bench-run").expect("valid run id");
    let texts = events(100);
    let now = Instant::now();
    for _ in 0..100 {
        hub.publish(
            &run,
            texts.iter().map(|t| NewEvent { json: t, seq: None }),
            now,
        )
        .expect("fits");
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
    targets = append, replay, build_frame
}
criterion_main!(benches);

//! The command parse path on its own (issue #18: "parse a publish once"):
//! one frame through [`decode`] and [`Command::parse`] (step by step, as
//! the gateway reads a frame laid out unusually), and through
//! [`decode_typed`] (one read, as it reads what clients write), for an
//! `events.publish` of 100 × 200 B events and a `kv.set` of 200 keys. Builds only this crate, so it is quick to run:
//! `cargo bench -p rungate-protocol --bench parse`.
//!
//! Each group carries baselines measured in the same run: plain
//! serde_json over the same frame into a `Value` (a full parse), and into
//! `IgnoredAny` (the least any parser must do: read every byte once).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rungate_protocol::{Command, CommandKind, decode, decode_typed};
use serde::de::IgnoredAny;

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

fn kv_set_frame() -> String {
    let pairs: Vec<String> = (0..200)
        .map(|i| format!(r#""key-{i:04}":"value number {i} of the run""#))
        .collect();
    format!(
        r#"{{"id":"8","type":"kv.set","payload":{{"sessionId":"0123456789abcdef0123456789abcdef","runId":"run-0001","kv":{{{}}}}}}}"#,
        pairs.join(",")
    )
}

fn typed(frame: &str) -> Command<'_> {
    let req = decode(frame).expect("a valid envelope");
    let kind = CommandKind::parse(&req.kind).expect("a known command");
    Command::parse(kind, req.payload).expect("a valid payload")
}

fn group(c: &mut Criterion, name: &str, frame: &str) {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("decode_and_typed", |b| {
        b.iter(|| black_box(typed(black_box(frame))))
    });
    // The gateway's path: the whole frame in one read.
    g.bench_function("decode_typed_one_pass", |b| {
        b.iter(|| black_box(decode_typed(black_box(frame)).expect("a valid frame")))
    });
    g.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| black_box(serde_json::from_str::<serde_json::Value>(black_box(frame)).unwrap()))
    });
    g.bench_function("baseline_serde_json_ignored_any", |b| {
        b.iter(|| black_box(serde_json::from_str::<IgnoredAny>(black_box(frame)).unwrap()))
    });
    g.finish();
}

fn parse(c: &mut Criterion) {
    let publish = publish_frame();
    assert!(matches!(typed(&publish), Command::EventsPublish(p) if p.events.len() == EVENTS));
    group(c, "publish_100x200B", &publish);
    let kv = kv_set_frame();
    assert!(matches!(typed(&kv), Command::KvSet(_)));
    group(c, "kv_set_200_keys", &kv);
}

criterion_group!(benches, parse);
criterion_main!(benches);

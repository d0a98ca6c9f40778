//! Test helpers shared by the stream module's tests, and the property test
//! of the whole delivery contract: over random interleavings of publishes,
//! resumes, disconnects, slow reads and stream drops, every subscriber sees
//! each offset from its start exactly once and in order, with the JSON that
//! was published there, except for ranges a gap names exactly.

use std::time::Duration;

use futures_util::FutureExt;
use proptest::prelude::*;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::frame::FrameBuilder;
use super::*;

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(borrow)]
    payload: Payload<'a>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Payload<'a> {
    run_id: String,
    stream_epoch: String,
    #[serde(borrow)]
    events: Vec<Entry<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry<'a> {
    offset: u64,
    #[serde(borrow)]
    event: &'a RawValue,
}

/// (offset, raw event text) pairs of a `stream.events` frame, checking its
/// shape on the way.
pub(crate) fn decode(frame: &[u8]) -> Vec<(u64, String)> {
    decode_with_epoch(frame).1
}

/// The frame's epoch and its (offset, raw event text) pairs.
pub(crate) fn decode_with_epoch(frame: &[u8]) -> (String, Vec<(u64, String)>) {
    let f: Frame<'_> = serde_json::from_slice(frame).expect("frame is JSON");
    assert_eq!(f.kind, "stream.events");
    assert!(!f.payload.run_id.is_empty());
    assert_eq!(f.payload.stream_epoch.len(), 32);
    let events = f
        .payload
        .events
        .iter()
        .map(|e| (e.offset, e.event.get().to_owned()))
        .collect();
    (f.payload.stream_epoch, events)
}

// ---------------------------------------------------------------- proptest

const SLOTS: usize = 4;

#[derive(Debug, Clone)]
enum FromArg {
    Live,
    /// Where this slot's last subscription stopped.
    Last,
    /// An absolute offset (may be evicted, kept, or beyond the head).
    At(u8),
}

#[derive(Debug, Clone)]
enum EpochArg {
    Absent,
    Current,
    Wrong,
    /// The epoch this slot last saw.
    Last,
}

#[derive(Debug, Clone)]
enum Op {
    /// Events as (seq relative to the runtime's counter, padding length).
    Publish(Vec<(Option<i8>, usize)>),
    Resume {
        slot: usize,
        from: FromArg,
        epoch: EpochArg,
    },
    Poll {
        slot: usize,
        times: u8,
    },
    /// The viewer's socket closes; it keeps its cursor to resume from.
    Disconnect {
        slot: usize,
    },
    /// The session ends and retention passes, then a new session starts.
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    let slot =
        prop_oneof![3 => Just(0usize), 3 => Just(1usize), 1 => Just(2usize), 1 => Just(3usize)];
    let from = prop_oneof![
        Just(FromArg::Live),
        Just(FromArg::Last),
        (0u8..40).prop_map(FromArg::At)
    ];
    let epoch = prop_oneof![
        1 => Just(EpochArg::Absent),
        1 => Just(EpochArg::Current),
        1 => Just(EpochArg::Wrong),
        2 => Just(EpochArg::Last),
    ];
    prop_oneof![
        5 => prop::collection::vec((prop::option::of(-2i8..=2), 0usize..40), 0..6).prop_map(Op::Publish),
        2 => (0..SLOTS, from, epoch).prop_map(|(slot, from, epoch)| Op::Resume { slot, from, epoch }),
        5 => (slot, 1u8..4).prop_map(|(slot, times)| Op::Poll { slot, times }),
        1 => (0..SLOTS).prop_map(|slot| Op::Disconnect { slot }),
        1 => Just(Op::Expire),
    ]
}

#[derive(Default)]
struct Slot {
    sub: Option<Subscription>,
    /// The epoch of the stream `sub` reads (or last read).
    epoch: Option<StreamEpoch>,
    /// The next offset this slot expects.
    cursor: u64,
    /// Where its subscription started.
    start: u64,
}

struct Model {
    hub: StreamHub,
    run: RunId,
    /// What was published at each offset of the current epoch.
    published: Vec<String>,
    /// The highest accepted seq of the current stream.
    last_seq: Option<u64>,
    /// The runtime's own seq counter (survives stream drops, like a runtime).
    runtime_seq: u64,
    epoch: StreamEpoch,
    /// The oldest kept offset seen so far (never decreases within an epoch).
    first: u64,
    now: Instant,
    counter: u64,
    slots: Vec<Slot>,
}

impl Model {
    fn new(limits: StreamLimits) -> Model {
        let hub = StreamHub::new(limits);
        let run = RunId::new("prop-run").unwrap();
        let now = Instant::now();
        hub.session_started(&run, now);
        let epoch = hub.summary(&run).unwrap().stream_epoch;
        Model {
            hub,
            run,
            published: Vec::new(),
            last_seq: None,
            runtime_seq: 0,
            epoch,
            first: 0,
            now,
            counter: 0,
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
        }
    }

    fn summary(&self) -> StreamSummary {
        let s = self.hub.summary(&self.run).expect("stream exists");
        assert_eq!(s.stream_epoch, self.epoch);
        assert_eq!(s.next_offset, self.published.len() as u64);
        assert!(s.first_offset >= self.first, "first offset went back");
        let limits = self.hub.limits();
        assert!(s.next_offset - s.first_offset <= limits.max_events_per_run as u64);
        assert!(self.hub.total_bytes() <= limits.max_bytes_per_run);
        s
    }

    fn publish(&mut self, spec: &[(Option<i8>, usize)]) {
        self.now += Duration::from_millis(1);
        let mut texts = Vec::new();
        for (seq, pad) in spec {
            self.counter += 1;
            let seq = seq.map(|d| {
                let s = (self.runtime_seq as i64 + d as i64).max(0) as u64;
                self.runtime_seq = self.runtime_seq.max(s + 1);
                s
            });
            texts.push((
                format!(r#"{{"i":{},"p":"{}"}}"#, self.counter, "x".repeat(*pad)),
                seq,
            ));
        }
        // What the ring should accept.
        let mut last = self.last_seq;
        let accepted: Vec<&String> = texts
            .iter()
            .filter(|(_, seq)| match seq {
                Some(s) if last.is_some_and(|l| *s <= l) => false,
                Some(s) => {
                    last = Some(*s);
                    true
                }
                None => true,
            })
            .map(|(t, _)| t)
            .collect();
        let limits = self.hub.limits().clone();
        let mut b = FrameBuilder::new(
            self.run.as_str(),
            self.epoch.as_str(),
            self.published.len() as u64,
            0,
            0,
        );
        for t in &accepted {
            b.push(t.as_bytes());
        }
        let frame_len = b.finish().len();
        let fits =
            accepted.len() <= limits.max_events_per_run && frame_len <= limits.max_bytes_per_run;

        let events: Vec<PublishedEvent<'_>> = texts
            .iter()
            .map(|(t, seq)| PublishedEvent { json: t, seq: *seq })
            .collect();
        let before = self.published.len() as u64;
        let published = self.hub.publish(&self.run, &events, self.now);
        match published
            .now_or_never()
            .expect("the memory hub answers at once")
        {
            Ok(out) => {
                assert!(fits || accepted.is_empty());
                assert_eq!(out.first_offset, before);
                assert_eq!(out.accepted, accepted.len());
                assert_eq!(out.duplicates, texts.len() - accepted.len());
                self.published.extend(accepted.into_iter().cloned());
                self.last_seq = last;
                assert_eq!(out.next_offset, self.published.len() as u64);
            }
            Err(StreamError::TooLarge { .. }) => assert!(!fits && !accepted.is_empty()),
            Err(e) => panic!("unexpected {e}"),
        }
        self.first = self.summary().first_offset;
    }

    fn resume(&mut self, slot: usize, from: &FromArg, epoch: &EpochArg) {
        let s = self.summary();
        let last_epoch = self.slots[slot].epoch.clone();
        let from = match from {
            FromArg::Live => None,
            FromArg::Last => Some(self.slots[slot].cursor),
            FromArg::At(n) => Some(*n as u64),
        };
        let epoch = match epoch {
            EpochArg::Absent => None,
            EpochArg::Current => Some(self.epoch.to_string()),
            EpochArg::Wrong => Some("0".repeat(32)),
            EpochArg::Last => last_epoch.map(|e| e.to_string()),
        };
        let (info, sub) = self.hub.resume(&self.run, from, epoch.as_deref(), self.now);
        // The contract, restated.
        let differs = epoch.as_deref().is_some_and(|e| e != self.epoch.as_str());
        let (first, next) = (s.first_offset, s.next_offset);
        let (start, truncated) = match from {
            None => (next, differs),
            Some(_) if differs => (first, true),
            Some(f) if f < first => (first, true),
            // Beyond the head in the same epoch: waits there (another
            // gateway's copy may have shown those offsets already).
            Some(f) if f <= next || epoch.is_some() => (f, false),
            Some(_) => (first, true),
        };
        assert_eq!(
            (
                info.first_offset,
                info.next_offset,
                info.start_offset,
                info.truncated
            ),
            (first, next, start, truncated)
        );
        assert_eq!(info.stream_epoch, self.epoch);
        assert_eq!(sub.cursor(), start);
        let slot = &mut self.slots[slot];
        slot.sub = Some(sub);
        slot.epoch = Some(info.stream_epoch);
        slot.cursor = start;
        slot.start = start;
    }

    /// Polls once; returns whether anything was delivered.
    fn poll(&mut self, i: usize) -> bool {
        let s = self.summary();
        let use_events = i % 2 == 1;
        let slot = &mut self.slots[i];
        let Some(sub) = slot.sub.as_mut() else {
            return false;
        };
        let stale = slot.epoch.as_ref() != Some(&self.epoch);
        if use_events {
            match sub.next_events().now_or_never() {
                None => {
                    assert!(!stale, "a dropped stream must say Closed");
                    assert!(
                        slot.cursor >= s.next_offset,
                        "pending although behind the head"
                    );
                    false
                }
                Some(EventDelivery::Closed) => {
                    assert!(stale, "Closed on a live stream");
                    slot.sub = None;
                    true
                }
                Some(_) if stale => panic!("delivery from a dropped stream"),
                Some(EventDelivery::Ended(_)) => panic!("this model never ends a run"),
                Some(EventDelivery::Gap { from, to }) => {
                    check_gap(slot, from, to, &s);
                    true
                }
                Some(EventDelivery::Events(events)) => {
                    assert!(!events.is_empty());
                    for e in events {
                        assert_eq!(e.offset, slot.cursor, "out of order or duplicate");
                        assert_eq!(&e.json[..], self.published[e.offset as usize].as_bytes());
                        slot.cursor += 1;
                    }
                    true
                }
            }
        } else {
            match sub.next().now_or_never() {
                None => {
                    assert!(!stale, "a dropped stream must say Closed");
                    assert!(
                        slot.cursor >= s.next_offset,
                        "pending although behind the head"
                    );
                    false
                }
                Some(Delivery::Closed) => {
                    assert!(stale, "Closed on a live stream");
                    slot.sub = None;
                    true
                }
                Some(_) if stale => panic!("delivery from a dropped stream"),
                Some(Delivery::Ended(_)) => panic!("this model never ends a run"),
                Some(Delivery::Gap { frame, from, to }) => {
                    let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
                    assert_eq!(v["type"], "stream.gap");
                    assert_eq!(v["payload"]["streamEpoch"], self.epoch.as_str());
                    assert_eq!(v["payload"]["fromOffset"], from);
                    assert_eq!(v["payload"]["toOffset"], to);
                    check_gap(slot, from, to, &s);
                    true
                }
                Some(Delivery::Frames(frames)) => {
                    assert!(!frames.is_empty());
                    for f in frames {
                        let (epoch, events) = decode_with_epoch(&f);
                        assert_eq!(epoch, self.epoch.as_str());
                        assert!(!events.is_empty());
                        for (offset, json) in events {
                            assert_eq!(offset, slot.cursor, "out of order or duplicate");
                            assert_eq!(json, self.published[offset as usize]);
                            slot.cursor += 1;
                        }
                    }
                    true
                }
            }
        }
    }

    fn expire(&mut self) {
        self.now += Duration::from_secs(1);
        self.hub.session_ended(&self.run, self.now);
        self.now += self.hub.limits().retention;
        let watched = self
            .slots
            .iter()
            .any(|s| s.sub.is_some() && s.epoch.as_ref() == Some(&self.epoch));
        let was_empty = {
            let s = self.summary();
            s.first_offset == s.next_offset
        };
        let out = self.hub.sweep(self.now);
        let dropped = self.hub.summary(&self.run).is_none();
        assert_eq!(dropped, !(was_empty && watched), "retention rule");
        assert_eq!(out.expired_streams, dropped as usize);
        self.hub.session_started(&self.run, self.now);
        let s = self.hub.summary(&self.run).unwrap();
        if dropped {
            assert_ne!(s.stream_epoch, self.epoch);
            assert_eq!((s.first_offset, s.next_offset), (0, 0));
            assert_eq!(self.hub.total_bytes(), 0);
            self.epoch = s.stream_epoch;
            self.published.clear();
            self.last_seq = None;
            self.first = 0;
        } else {
            assert_eq!(s.stream_epoch, self.epoch);
        }
    }
}

fn check_gap(slot: &mut Slot, from: u64, to: u64, s: &StreamSummary) {
    assert_eq!(from, slot.cursor, "gap must start at the cursor");
    assert!(from <= to);
    assert_eq!(
        to + 1,
        s.first_offset,
        "gap must end just before the oldest kept"
    );
    slot.cursor = to + 1;
}

fn limits() -> impl Strategy<Value = StreamLimits> {
    (2usize..16, 300usize..3000, 1usize..6, any::<bool>()).prop_map(
        |(events, bytes, per_delivery, tight)| StreamLimits {
            max_events_per_run: events,
            max_bytes_per_run: bytes,
            // Sometimes the global budget, not the ring, is what evicts.
            global_max_bytes: if tight { bytes / 2 } else { bytes * 4 },
            retention: Duration::from_secs(60),
            max_events_per_delivery: per_delivery,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn every_subscriber_sees_every_offset_once_or_an_exact_gap(
        limits in limits(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut m = Model::new(limits);
        for op in &ops {
            match op {
                Op::Publish(spec) => m.publish(spec),
                Op::Resume { slot, from, epoch } => m.resume(*slot, from, epoch),
                Op::Poll { slot, times } => {
                    for _ in 0..*times {
                        m.poll(*slot);
                    }
                }
                Op::Disconnect { slot } => m.slots[*slot].sub = None,
                Op::Expire => m.expire(),
            }
        }
        // Drain: every live subscriber reaches the head.
        for i in 0..SLOTS {
            let mut rounds = 0;
            while m.poll(i) {
                rounds += 1;
                prop_assert!(rounds < 10_000);
            }
            if m.slots[i].sub.is_some() {
                // At the head, or still waiting where it resumed beyond it.
                let head = m.published.len() as u64;
                prop_assert_eq!(m.slots[i].cursor, head.max(m.slots[i].start));
            }
        }
    }
}

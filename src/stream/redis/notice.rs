//! The messages on the `{p}:events` channel: what one node tells the
//! others about a change it made in Redis.
//!
//! Owns their byte format and parsing it. The Lua scripts in
//! [`super::scripts`] write them; nothing else does. A message is one kind
//! letter followed by fields, each `LEN:BYTES` with `LEN` in decimal: event
//! texts go in as they are (no second layer of JSON escaping) and the
//! parser never has to look inside one.
//!
//! | kind | fields                                          |
//! |------|-------------------------------------------------|
//! | `B`  | run, epoch, first offset, seq mark, events… |
//! | `C`  | run, epoch, idle                                |
//! | `L`  | run, epoch, idle                                |
//! | `D`  | run, epoch                                      |
//! | `E`  | run, epoch (the run ended; its end is in the meta hash) |
//! | `A`  | run, epoch, alias (a losing proposal that names the same history) |
//!
//! `seq mark` is the stream's highest accepted `seq` after the batch as a
//! 20-digit decimal, or empty; `idle` is `active` or the wall-clock
//! milliseconds since the stream has been idle.
//! Must not touch the hub or Redis: parsing only.

use crate::ids::RunId;
use crate::stream::StreamEpoch;

/// Whether a stream's run has an active session, as Redis records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    Active,
    /// Idle since this many milliseconds after the Unix epoch.
    Since(u64),
}

impl Idle {
    pub fn parse(text: &str) -> Option<Idle> {
        match text {
            "active" => Some(Idle::Active),
            ms => ms.parse().ok().map(Idle::Since),
        }
    }

    pub fn to_arg(self) -> String {
        match self {
            Idle::Active => "active".into(),
            Idle::Since(ms) => ms.to_string(),
        }
    }
}

/// A batch some node stored, in the order Redis stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchNotice {
    pub run: RunId,
    pub epoch: StreamEpoch,
    pub first_offset: u64,
    pub last_seq: Option<u64>,
    pub events: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Batch(BatchNotice),
    Created {
        run: RunId,
        epoch: StreamEpoch,
        idle: Idle,
    },
    Lifecycle {
        run: RunId,
        epoch: StreamEpoch,
        idle: Idle,
    },
    Dropped {
        run: RunId,
        epoch: StreamEpoch,
    },
    Ended {
        run: RunId,
        epoch: StreamEpoch,
    },
    /// `alias` (another node's proposal, which lost) names `epoch`'s history.
    Aliased {
        run: RunId,
        epoch: StreamEpoch,
        alias: StreamEpoch,
    },
}

/// A `seq` as the scripts compare it: 20 digits, zero-padded, so string
/// order is number order (Lua numbers are doubles and would round a u64).
pub fn seq_arg(seq: Option<u64>) -> String {
    seq.map(|s| format!("{s:020}")).unwrap_or_default()
}

/// The inverse of [`seq_arg`]; `None` for an empty or malformed mark.
pub fn parse_seq(text: &str) -> Option<u64> {
    text.parse().ok()
}

struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn next_bytes(&mut self) -> Option<&'a [u8]> {
        let colon = self.rest.iter().position(|&b| b == b':')?;
        let len: usize = std::str::from_utf8(&self.rest[..colon])
            .ok()?
            .parse()
            .ok()?;
        let start = colon + 1;
        let field = self.rest.get(start..start.checked_add(len)?)?;
        self.rest = &self.rest[start + len..];
        Some(field)
    }

    fn text(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.next_bytes()?).ok()
    }

    fn run(&mut self) -> Option<RunId> {
        RunId::new(self.text()?).ok()
    }

    fn epoch(&mut self) -> Option<StreamEpoch> {
        StreamEpoch::new(self.text()?).ok()
    }

    fn done(&self) -> bool {
        self.rest.is_empty()
    }
}

/// Reads one channel message; `None` if it is not one this build writes
/// (a newer node's kind, or garbage someone published on our channel).
pub fn parse(message: &[u8]) -> Option<Notice> {
    let (&kind, rest) = message.split_first()?;
    let mut f = Fields { rest };
    let notice = match kind {
        b'B' => {
            let run = f.run()?;
            let epoch = f.epoch()?;
            let first_offset = f.text()?.parse().ok()?;
            let last_seq = parse_seq(f.text()?);
            let mut events = Vec::new();
            while !f.done() {
                events.push(f.text()?.to_owned());
            }
            Notice::Batch(BatchNotice {
                run,
                epoch,
                first_offset,
                last_seq,
                events,
            })
        }
        b'C' | b'L' => {
            let run = f.run()?;
            let epoch = f.epoch()?;
            let idle = Idle::parse(f.text()?)?;
            if kind == b'C' {
                Notice::Created { run, epoch, idle }
            } else {
                Notice::Lifecycle { run, epoch, idle }
            }
        }
        b'D' => Notice::Dropped {
            run: f.run()?,
            epoch: f.epoch()?,
        },
        b'E' => Notice::Ended {
            run: f.run()?,
            epoch: f.epoch()?,
        },
        b'A' => Notice::Aliased {
            run: f.run()?,
            epoch: f.epoch()?,
            alias: f.epoch()?,
        },
        _ => return None,
    };
    f.done().then_some(notice)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(s: &str) -> String {
        format!("{}:{s}", s.len())
    }

    #[test]
    fn a_batch_with_awkward_texts_round_trips() {
        let epoch = "ab".repeat(16);
        let events = [r#"{"a":"x:y","n":12}"#, "\"é:\\n\"", "7"];
        let mut msg = format!(
            "B{}{}{}{}",
            field("run:1"),
            field(&epoch),
            field("42"),
            field(&seq_arg(Some(u64::MAX)))
        );
        for e in events {
            msg.push_str(&field(e));
        }
        let Some(Notice::Batch(b)) = parse(msg.as_bytes()) else {
            panic!("not parsed: {msg}");
        };
        assert_eq!(b.run.as_str(), "run:1");
        assert_eq!(b.epoch.as_str(), epoch);
        assert_eq!(b.first_offset, 42);
        assert_eq!(b.last_seq, Some(u64::MAX));
        assert_eq!(b.events, events);
    }

    #[test]
    fn lifecycle_created_dropped_and_aliased() {
        let epoch = "0f".repeat(16);
        let msg = format!("L{}{}{}", field("r"), field(&epoch), field("1700000000000"));
        assert!(matches!(
            parse(msg.as_bytes()),
            Some(Notice::Lifecycle {
                idle: Idle::Since(1_700_000_000_000),
                ..
            })
        ));
        let msg = format!("C{}{}{}", field("r"), field(&epoch), field("active"));
        assert!(matches!(
            parse(msg.as_bytes()),
            Some(Notice::Created {
                idle: Idle::Active,
                ..
            })
        ));
        let msg = format!("D{}{}", field("r"), field(&epoch));
        assert!(matches!(
            parse(msg.as_bytes()),
            Some(Notice::Dropped { .. })
        ));
        let alias = "a1".repeat(16);
        let msg = format!("A{}{}{}", field("r"), field(&epoch), field(&alias));
        let Some(Notice::Aliased {
            epoch: e, alias: a, ..
        }) = parse(msg.as_bytes())
        else {
            panic!("not parsed: {msg}");
        };
        assert_eq!((e.as_str(), a.as_str()), (epoch.as_str(), alias.as_str()));
        let short = format!("A{}{}", field("r"), field(&epoch));
        assert_eq!(
            parse(short.as_bytes()),
            None,
            "an alias notice names the alias"
        );
    }

    #[test]
    fn garbage_is_refused_not_a_panic() {
        let epoch = "0f".repeat(16);
        for bad in [
            String::new(),
            "X".into(),
            "B".into(),
            format!("D{}", field("r")),
            format!("D{}{}trailing", field("r"), field(&epoch)),
            format!("D{}99:{epoch}", field("r")),
            format!("D{}{}", field("bad run"), field(&epoch)),
            format!("L{}{}{}", field("r"), field(&epoch), field("soon")),
            "B18446744073709551616:x".into(),
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn seq_args_sort_as_numbers() {
        let mut args: Vec<String> = [10u64, 9, u64::MAX, 0, 100]
            .iter()
            .map(|&s| seq_arg(Some(s)))
            .collect();
        args.sort();
        let back: Vec<u64> = args.iter().filter_map(|a| parse_seq(a)).collect();
        assert_eq!(back, vec![0, 9, 10, 100, u64::MAX]);
        assert_eq!(seq_arg(None), "");
        assert_eq!(parse_seq(""), None);
    }
}

//! The Lua scripts: every change to a stream in Redis is one of these
//! scripts, so it is atomic on the server and its notice on the channel
//! goes out in the same order as the change.
//!
//! Owns what each script promises (the keys it is given and what they
//! hold are [`crate::redis::keys`]'s). Must not talk to Redis itself (the
//! writer and the applier run the scripts).

use redis::Script;

/// Events per stream entry at most: Lua's `unpack` has to pass two
/// arguments per event to `XADD` (and stops at a few thousand), and a catch-up
/// read pages by entries.
pub const EVENTS_PER_ENTRY: usize = 1000;

/// Shared by the scripts: a notice field, and a stream's creation.
const PRELUDE: &str = include_str!("prelude.lua");

/// Publish. KEYS: meta, events, streams set, session holders. ARGV:
/// channel, run, proposed epoch, maxlen, publisher's session id (or empty),
/// how its holder entry must begin, events per entry, then (seq, json)
/// pairs (seq as 20 digits or empty).
///
/// First the fence: with a session id, the batch is refused (`'fenced'`,
/// nothing stored) unless the session's holder entry still names this
/// node at the publisher's epoch.
/// Creates the stream with the proposed epoch if it has none (a publisher
/// has a session: `active`). Drops every event whose seq is not above the
/// mark (counting earlier events of the batch), stores the others at
/// consecutive offsets (one stream entry per batch, or per
/// `EVENTS_PER_ENTRY` events of it: one `XADD` however many events), trims
/// the entries that start before the last `maxlen` offsets, and announces
/// the batch as one `B` notice. Returns
/// `{epoch, first offset, accepted, duplicates, next, seq mark, flags}`
/// with `flags` a `1` (accepted) or `0` (duplicate) per event.
const PUBLISH: &str = include_str!("publish.lua");

/// End. KEYS: meta, streams set. ARGV: channel, run, proposed epoch,
/// outcome, ended-at ms, message (empty, or `+` then the text).
/// Creates the stream if it has none (a run that ends with no events),
/// then records the end unless there is one (idle from the end on: its
/// retention starts) and announces it as an `E` notice. Returns
/// `{epoch, next, outcome, endedAt, endMsg, made}` of the run's end, with
/// `made` 1 if this call recorded it. Publishes refuse once it is there.
const END: &str = include_str!("end.lua");

/// Create. KEYS: meta, streams set. ARGV: channel, run, epoch, idle, most
/// aliases kept ([`crate::stream::ring::MAX_ALIASES`], so a ring and Redis
/// keep the same ones). Creates the stream with this epoch unless it has
/// one; returns the stream's epoch either way. A proposal that loses is
/// recorded in the meta's `aliases` (space-separated, at most that many)
/// and announced as an `A` notice: the proposer's viewers were told it,
/// and it names the same history.
const CREATE: &str = include_str!("create.lua");

/// Lifecycle. KEYS: meta. ARGV: channel, run, idle (`active` or ms).
/// Records whether the run's session is active, for whatever history the
/// run has now; going idle keeps an earlier idle time (as the hub does).
/// Returns 1 if it changed something, else 0.
const LIFECYCLE: &str = include_str!("lifecycle.lua");

/// Drop. KEYS: meta, events, streams set. ARGV: channel, run, epoch.
/// Deletes the stream if it still has this epoch and is idle here too
/// (a session that became active on another node keeps it). Returns 1 if
/// dropped, 0 if kept because active, -1 if Redis has no such history.
const DROP: &str = include_str!("drop.lua");

/// Fetch. KEYS: meta, events. ARGV: expected epoch (empty: any), from
/// offset, count, `at` or `after`. Returns nil if the run has no stream,
/// else `{epoch, next, seq, idle, entries, end, endedAt, endMsg, aliases}`
/// (end, endedAt and endMsg empty while the run has not ended; aliases as
/// [`CREATE`] records them) where entries are up to `count`
/// kept entries (XRANGE's shape), or none if the epoch is not the expected
/// one: with `at`, from the entry holding offset `from` (or the first kept
/// after it); with `after`, from the entry after the one starting at
/// `from` (the next page). Meta and entries are read at one instant.
const FETCH: &str = include_str!("fetch.lua");

/// The scripts, compiled once (their SHA1s are what `EVALSHA` sends).
pub struct Scripts {
    pub publish: Script,
    pub create: Script,
    pub lifecycle: Script,
    pub drop: Script,
    pub fetch: Script,
    pub end: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            publish: with_prelude(PUBLISH),
            create: with_prelude(CREATE),
            lifecycle: with_prelude(LIFECYCLE),
            drop: with_prelude(DROP),
            fetch: Script::new(FETCH),
            end: with_prelude(END),
        }
    }
}

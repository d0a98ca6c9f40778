//! The key layout and the Lua scripts: every change to a stream in Redis
//! is one of these scripts, so it is atomic on the server and its notice
//! on the channel goes out in the same order as the change.
//!
//! Owns what the keys hold and what each script promises. Must not talk to
//! Redis itself (the writer and the applier run the scripts).
//!
//! # Keys (prefix `p`, `rungate` by default, as the store's)
//!
//! | key           | type   | holds                                         |
//! |---------------|--------|-----------------------------------------------|
//! | `{p}:s:{run}` | hash   | `epoch`; `next` (the head); `seq` (the highest accepted `seq`, 20 digits, or empty); `idle` (`active`, or wall-clock ms since idle); once the run ended, `end` (the outcome), `endedAt` (wall-clock ms) and `endMsg` (empty, or `+` then the message) |
//! | `{p}:x:{run}` | stream | one entry per published batch (a batch over [`EVENTS_PER_ENTRY`] events takes several), id `{first offset}-1`, one field `e` per event, in order. Trimmed with `MINID` to the entries that start within the last `max_events_per_run` offsets |
//! | `{p}:streams` | set    | the run ids that have a stream                |
//! | `{p}:events`  | channel| one message per change ([`super::notice`])   |
//!
//! Ids use `-1` because Redis refuses the id `0-0`. A run id may contain
//! `:`; it is always the last part of a key.

use redis::Script;

use crate::ids::RunId;

/// Builds the keys of the layout in the module docs.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }
    pub fn meta(&self, run: &RunId) -> String {
        format!("{}:s:{run}", self.prefix)
    }
    pub fn events(&self, run: &RunId) -> String {
        format!("{}:x:{run}", self.prefix)
    }
    pub fn streams(&self) -> String {
        format!("{}:streams", self.prefix)
    }
    pub fn channel(&self) -> String {
        format!("{}:events", self.prefix)
    }
    /// The session store's hash of who holds each session (the publish
    /// fence reads it).
    pub fn session_holders(&self) -> String {
        crate::store::redis::session_holder_key(&self.prefix)
    }
}

/// Events per stream entry at most: Lua's `unpack` has to pass two
/// arguments per event to `XADD` (and stops at a few thousand), and a catch-up
/// read pages by entries.
pub const EVENTS_PER_ENTRY: usize = 1000;

/// Shared by the scripts: a notice field, and a stream's creation.
const PRELUDE: &str = r"
local function field(s) return #s .. ':' .. s end
local function create(meta, set, channel, run, epoch, idle)
  redis.call('HSET', meta, 'epoch', epoch, 'next', '0', 'seq', '', 'idle', idle)
  redis.call('SADD', set, run)
  redis.call('PUBLISH', channel, 'C' .. field(run) .. field(epoch) .. field(idle))
end
";

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
const PUBLISH: &str = r"
local meta, xs = KEYS[1], KEYS[2]
local channel, run = ARGV[1], ARGV[2]
if ARGV[5] ~= '' then
  local holder = redis.call('HGET', KEYS[4], ARGV[5]) or ''
  if string.sub(holder, 1, #ARGV[6]) ~= ARGV[6] then return 'fenced' end
end
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[3]
  create(meta, KEYS[3], channel, run, epoch, 'active')
end
local ended = redis.call('HGET', meta, 'end')
if ended then return 'ended:' .. ended end
local next = tonumber(redis.call('HGET', meta, 'next'))
local seq = redis.call('HGET', meta, 'seq') or ''
local first = next
local flags, kept = {}, {}
for i = 8, #ARGV, 2 do
  local s = ARGV[i]
  if s ~= '' and seq ~= '' and s <= seq then
    flags[#flags + 1] = '0'
  else
    if s ~= '' then seq = s end
    flags[#flags + 1] = '1'
    kept[#kept + 1] = ARGV[i + 1]
  end
end
local parts = {}
local floor = math.max(0, next + #kept - tonumber(ARGV[4]))
local per = tonumber(ARGV[7])
local j = 1
while j <= #kept do
  local fields = {}
  local last = math.min(#kept, j + per - 1)
  for k = j, last do
    fields[#fields + 1] = 'e'
    fields[#fields + 1] = kept[k]
    parts[k] = field(kept[k])
  end
  redis.call('XADD', xs, 'MINID', '=', string.format('%d-0', floor),
    string.format('%d-1', next), unpack(fields))
  next = next + (last - j + 1)
  j = last + 1
end
if #kept > 0 then
  redis.call('HSET', meta, 'next', string.format('%d', next), 'seq', seq)
  redis.call('PUBLISH', channel, 'B' .. field(run) .. field(epoch)
    .. field(string.format('%d', first)) .. field(seq) .. table.concat(parts))
end
return {epoch, first, #kept, #flags - #kept, next, seq, table.concat(flags)}
";

/// End. KEYS: meta, streams set. ARGV: channel, run, proposed epoch,
/// outcome, ended-at ms, message (empty, or `+` then the text).
/// Creates the stream if it has none (a run that ends with no events),
/// then records the end unless there is one (idle from the end on: its
/// retention starts) and announces it as an `E` notice. Returns
/// `{epoch, next, outcome, endedAt, endMsg, made}` of the run's end, with
/// `made` 1 if this call recorded it. Publishes refuse once it is there.
const END: &str = r"
local meta = KEYS[1]
local channel, run = ARGV[1], ARGV[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[3]
  create(meta, KEYS[2], channel, run, epoch, ARGV[5])
end
local m = redis.call('HMGET', meta, 'end', 'endedAt', 'endMsg', 'next')
if m[1] then return {epoch, m[4], m[1], m[2], m[3] or '', 0} end
redis.call('HSET', meta, 'end', ARGV[4], 'endedAt', ARGV[5], 'endMsg', ARGV[6], 'idle', ARGV[5])
redis.call('PUBLISH', channel, 'E' .. field(run) .. field(epoch))
return {epoch, m[4], ARGV[4], ARGV[5], ARGV[6], 1}
";

/// Create. KEYS: meta, streams set. ARGV: channel, run, epoch, idle.
/// Creates the stream with this epoch unless it has one; returns the
/// stream's epoch either way.
const CREATE: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch then return epoch end
create(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return ARGV[3]
";

/// Lifecycle. KEYS: meta. ARGV: channel, run, idle (`active` or ms).
/// Records whether the run's session is active, for whatever history the
/// run has now; going idle keeps an earlier idle time (as the hub does).
/// Returns 1 if it changed something, else 0.
const LIFECYCLE: &str = r"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'idle')
if not m[1] then return 0 end
local idle = ARGV[3]
if idle ~= 'active' and m[2] ~= 'active' then return 0 end
if idle == m[2] then return 0 end
redis.call('HSET', KEYS[1], 'idle', idle)
redis.call('PUBLISH', ARGV[1], 'L' .. field(ARGV[2]) .. field(m[1]) .. field(idle))
return 1
";

/// Drop. KEYS: meta, events, streams set. ARGV: channel, run, epoch.
/// Deletes the stream if it still has this epoch and is idle here too
/// (a session that became active on another node keeps it). Returns 1 if
/// dropped, 0 if kept because active, -1 if Redis has no such history.
const DROP: &str = r"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'idle')
if m[1] ~= ARGV[3] then return -1 end
if m[2] == 'active' then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('PUBLISH', ARGV[1], 'D' .. field(ARGV[2]) .. field(ARGV[3]))
return 1
";

/// Fetch. KEYS: meta, events. ARGV: expected epoch (empty: any), from
/// offset, count, `at` or `after`. Returns nil if the run has no stream,
/// else `{epoch, next, seq, idle, entries, end, endedAt, endMsg}` (the
/// last three empty while the run has not ended) where entries are up to `count`
/// kept entries (XRANGE's shape), or none if the epoch is not the expected
/// one: with `at`, from the entry holding offset `from` (or the first kept
/// after it); with `after`, from the entry after the one starting at
/// `from` (the next page). Meta and entries are read at one instant.
const FETCH: &str = r"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'next', 'seq', 'idle', 'end', 'endedAt', 'endMsg')
if not m[1] then return nil end
local entries = {}
if ARGV[1] == '' or ARGV[1] == m[1] then
  local start = ARGV[2] .. '-1'
  if ARGV[4] == 'after' then
    start = '(' .. start
  else
    local holding = redis.call('XREVRANGE', KEYS[2], start, '-', 'COUNT', 1)
    if holding[1] then
      -- The last entry starting at or before `from`: it holds `from`
      -- unless it ends before it (then the read starts after it).
      local first = tonumber(string.match(holding[1][1], '^(%d+)'))
      if first + #holding[1][2] / 2 > tonumber(ARGV[2]) then
        start = holding[1][1]
      else
        start = '(' .. holding[1][1]
      end
    end
  end
  entries = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', ARGV[3])
end
return {m[1], m[2], m[3] or '', m[4] or 'active', entries, m[5] or '', m[6] or '', m[7] or ''}
";

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

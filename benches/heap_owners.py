#!/usr/bin/env python3
"""Attributes heaptrack's heap at its peak to owners, per session.

usage: heap_owners.py STACKS SESSIONS [--unknown N]

STACKS is `heaptrack_print -F FILE --flamegraph-cost-type peak` output (one
stack and its bytes a line); each stack goes to the first owner whose
patterns all appear in its demangled frames (benches/heap.sh runs it).
--unknown N prints the N largest stacks no rule matched."""
import re, subprocess, sys
from collections import defaultdict
path, sessions = sys.argv[1], int(sys.argv[2])
show_unknown = int(sys.argv[4]) if len(sys.argv) > 4 else 0
stacks = []
for line in open(path):
    frames, _, n = line.rstrip("\n").rpartition(" ")
    stacks.append((int(n), [re.sub(r" \([^)]*\)$", "", f) for f in frames.split(";")]))
names = sorted({f for _, fs in stacks for f in fs})
out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
def clean(s):
    s = re.sub(r"\[[0-9a-f]{16}\]", "", s); s = re.sub(r"::h[0-9a-f]{16}$", "", s)
    for a, b in (("$LT$", "<"), ("$GT$", ">"), ("$u20$", " "), ("$u7b$", "{"), ("$u7d$", "}"), ("$C$", ","), ("..", "::"), ("$RF$", "&"), ("$u5b$", "["), ("$u5d$", "]")):
        s = s.replace(a, b)
    return s
dm = {a: clean(b) for a, b in zip(names, out)}
# (owner, patterns that must all appear somewhere in the stack); first match wins.
RULES = [
    ("tungstenite read buffer (FrameCodec in_buffer)", ["FrameCodec>::new"]),
    ("tungstenite read buffer (FrameCodec in_buffer)", ["FrameCodec::new"]),
    ("tungstenite read buffer (FrameCodec in_buffer)", ["FrameCodec>::read_frame"]),
    ("tungstenite read buffer (FrameCodec in_buffer)", ["FrameCodec::read_frame"]),
    ("tungstenite write buffer (FrameCodec out_buffer)", ["buffer_frame"]),
    ("read-ahead spill", ["ReadAhead"]),
    ("redb (store's page cache and tables)", ["redb::"]),
    ("session registry (maps, ids, records)", ["SessionRegistry"]),
    ("session registry (maps, ids, records)", ["rungate::session::"]),
    ("stream hub: per-run stream, ring, log index", ["rungate::stream::"]),
    ("outbound queue (bounded mpsc)", ["mpsc::bounded::channel"]),
    ("lost-runs channel (unbounded mpsc)", ["mpsc::unbounded::unbounded_channel"]),
    ("outbox (queue, budget, signals)", ["Outbox"]),
    ("split socket: BiLock holding the WebSocketStream", ["BiLock"]),
    ("tokio-tungstenite AllowStd (waker proxies)", ["AllowStd"]),
    ("tokio I/O registration (ScheduledIo)", ["Registration::new"]),
    ("kill token (CancellationToken)", ["CancellationToken::new"]),
    ("FuturesUnordered (in-flight replies, followed runs)", ["FuturesUnordered", "::new"]),
    ("socket byte budget", ["Budget::new"]),
    ("connections table (DashMap)", ["Connections::register"]),
    ("connections table (DashMap)", ["DashMap", "http::upgrade"]),
    ("writer task (tokio task cell)", ["task::spawn::spawn", "connection::serve"]),
    ("connection task (tokio task cell: serve future)", ["http::upgrade", "RawTask::new"]),
    ("hyper (HTTP connection, upgrade)", ["hyper::"]),
    ("tokio runtime (other)", ["tokio::runtime"]),
]
owners = defaultdict(int); unknown = defaultdict(int)
for n, fs in stacks:
    d = [dm[f] for f in fs]
    joined = "\n".join(d)
    for owner, pats in RULES:
        if all(p in joined for p in pats):
            owners[owner] += n; break
    else:
        owners["other"] += n; unknown[tuple(d)] += n
tot = sum(owners.values())
print(f"| owner | bytes per session |\n|---|---|")
for o, n in sorted(owners.items(), key=lambda x: -x[1]):
    print(f"| {o} | {n / sessions:,.0f} |")
print(f"| **total heap at peak** | **{tot / sessions:,.0f}** |  ({tot/1e6:.1f} MB)")
for fs, n in sorted(unknown.items(), key=lambda x: -x[1])[:show_unknown]:
    print(f"\n--- other {n/sessions:.0f} B/session")
    for f in fs[-18:]: print("    ", f[:200])

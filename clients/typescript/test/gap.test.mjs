// Gaps and truncation are surfaced as typed items, never silently.
// - truncation: a resume from an offset the ring no longer keeps (small
//   --stream-max-events), or with a stream epoch of a lost history;
// - gap: a live reader that fell behind (its socket stalled by the proxy
//   while the run published far more than the ring keeps) gets a gap item
//   with inclusive bounds, and every offset is either delivered once or
//   inside exactly one gap.
import { test } from "node:test";
import assert from "node:assert/strict";
import { RuntimeClient, ViewerClient } from "../dist/index.js";
import { startGateway, collect } from "./helpers/gateway.mjs";
import { startProxy } from "./helpers/proxy.mjs";
import { frameChecker } from "./helpers/spec.mjs";

test("a resume older than the ring, or of another epoch, yields a truncated item", async (t) => {
  const gw = await startGateway({ args: ["--stream-max-events", "10"] });
  t.after(() => gw.stop());
  const rt = new RuntimeClient({ url: gw.url(), token: await gw.token("runtime", "trunc-*") });
  t.after(() => rt.close());
  const frames = frameChecker();
  const viewer = new ViewerClient({ url: gw.url(), token: await gw.token("viewer", "trunc-*"), onFrame: frames.observe });
  t.after(() => viewer.close());
  const run = await rt.attach("trunc-1");
  for (let i = 0; i < 30; i++) await run.publish({ type: "n", data: i });

  const s = viewer.events("trunc-1", { from: 0 });
  const { items } = await collect(s, 10);
  const [first, ...rest] = items;
  assert.equal(first.kind, "truncated");
  assert.equal(first.requestedOffset, 0);
  assert.equal(first.firstOffset, 20);
  assert.equal(first.startOffset, 20);
  assert.equal(first.nextOffset, 30);
  assert.equal(first.epochChanged, false);
  assert.deepEqual(rest.map((x) => [x.offset, x.event.data]), [...Array(10).keys()].map((k) => [20 + k, 20 + k]));
  const epoch = s.position.streamEpoch;
  s.close();

  // An epoch that is not the stream's: the offsets belong to a lost history.
  const other = epoch.startsWith("0") ? "1".repeat(32) : "0".repeat(32);
  const s2 = viewer.events("trunc-1", { from: 25, streamEpoch: other });
  const { items: items2 } = await collect(s2, 10);
  assert.equal(items2[0].kind, "truncated");
  assert.equal(items2[0].epochChanged, true);
  assert.equal(items2[0].previousEpoch, other);
  assert.equal(items2[0].streamEpoch, epoch);
  assert.equal(items2[0].startOffset, 20);
  assert.deepEqual(items2.slice(1).map((x) => x.offset), [...Array(10).keys()].map((k) => 20 + k));
  s2.close();

  // The same epoch and a kept offset: no truncation.
  const s3 = viewer.events("trunc-1", { from: 25, streamEpoch: epoch });
  const { items: items3 } = await collect(s3, 5);
  assert.deepEqual(items3.map((x) => x.kind === "event" && x.offset), [25, 26, 27, 28, 29]);
  s3.close();
  assert.deepEqual(frames.problems, []);
});

test("a reader that falls behind gets a typed gap with inclusive bounds", async (t) => {
  const RING = 20;
  const gw = await startGateway({
    args: ["--stream-max-events", String(RING), "--outbound-queue", "4", "--write-timeout-secs", "600", "--stream-sync", "os"],
  });
  t.after(() => gw.stop());
  const proxy = await startProxy(gw.port);
  t.after(() => proxy.close());
  const rt = new RuntimeClient({ url: gw.url(), token: await gw.token("runtime", "gap-*") });
  t.after(() => rt.close());
  const frames = frameChecker();
  const viewer = new ViewerClient({ url: proxy.url(), token: await gw.token("viewer", "gap-*"), onFrame: frames.observe });
  t.after(() => viewer.close());
  const run = await rt.attach("gap-1");

  const s = viewer.events("gap-1", { from: 0 });
  await run.publish({ type: "n", data: { i: 0 } });
  const it = s[Symbol.asyncIterator]();
  const firstItem = await it.next();
  assert.equal(firstItem.value.offset, 0);

  // The reader's path stalls; the run publishes far more than the ring and
  // every buffer on the way hold (~40 MB in 60 kB events).
  proxy.stallTowardsClient();
  const pad = "x".repeat(60_000);
  let n = 1;
  for (let b = 0; b < 70; b++) {
    await run.publish([...Array(10).keys()].map(() => ({ type: "n", data: { i: n++, pad } })));
  }
  const total = n;
  proxy.unstall();

  const items = [firstItem.value];
  for (;;) {
    const r = await it.next();
    items.push(r.value);
    const last = r.value;
    if ((last.kind === "event" && last.offset === total - 1) || (last.kind === "gap" && last.toOffset === total - 1)) break;
  }
  const gaps = items.filter((x) => x.kind === "gap");
  assert.ok(gaps.length >= 1, "the reader was told it fell behind");
  assert.deepEqual(items.filter((x) => x.kind !== "event" && x.kind !== "gap"), []);
  // Every offset is accounted for exactly once, in order: delivered, or inside one gap.
  let expect = 0;
  for (const x of items) {
    if (x.kind === "event") {
      assert.equal(x.offset, expect, "events continue exactly where the gap said");
      assert.equal(x.event.data.i, x.offset);
      expect += 1;
    } else {
      assert.equal(x.fromOffset, expect, "a gap starts at the first missed offset");
      assert.ok(x.toOffset >= x.fromOffset);
      expect = x.toOffset + 1;
    }
  }
  assert.equal(expect, total);
  s.close();
  assert.deepEqual(frames.problems, []);
});

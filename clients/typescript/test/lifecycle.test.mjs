// The run lifecycle (issue #15): finish ends the run and every follower's
// stream (the iterator ends by itself, the outcome readable); a viewer's
// cancel reaches the runtime now or, if it is detached, when it reattaches;
// a finish whose answer was lost is resent and answered once.
// Needs a gateway with runtime.finish / run.cancel / stream.ended.
import { test } from "node:test";
import assert from "node:assert/strict";
import { RuntimeClient, ViewerClient, RungateError } from "../dist/index.js";
import { startGateway, ALL_CAPS, collect, until } from "./helpers/gateway.mjs";
import { startProxy } from "./helpers/proxy.mjs";
import { frameChecker } from "./helpers/spec.mjs";

test("finish ends the run: followers' iterators end with the outcome; later writes are RUN_ENDED", async (t) => {
  const gw = await startGateway();
  t.after(() => gw.stop());
  const rtFrames = frameChecker();
  const vFrames = frameChecker();
  const rt = new RuntimeClient({ url: gw.url(), token: await gw.token("runtime", "fin-*", ALL_CAPS), onFrame: rtFrames.observe });
  t.after(() => rt.close());
  const events = [];
  rt.on((e) => events.push(e));
  const viewer = new ViewerClient({ url: gw.url(), token: await gw.token("viewer", "fin-*"), onFrame: vFrames.observe });
  t.after(() => viewer.close());

  const run = await rt.attach("fin-1", { capabilities: ["kv.write", "subtasks.run"] });
  const sub = await run.subRun("fin-1.sub", { capabilities: ["kv.write"] });
  const live = viewer.events("fin-1", { from: 0 });
  for (let i = 0; i < 5; i++) await run.publish({ type: "n", data: i });
  const done = await run.finish("completed", "all good");
  assert.deepEqual(done, { accepted: true, nextOffset: 5 });
  // Repeating it with the same outcome is fine; another is CONFLICT.
  assert.deepEqual(await run.finish("completed", "all good"), done);
  await assert.rejects(run.finish("failed"), (e) => e.code === "CONFLICT");

  const items = [];
  for await (const item of live) items.push(item);
  assert.deepEqual(items.map((x) => x.offset), [0, 1, 2, 3, 4]);
  assert.equal(live.outcome, "completed");
  assert.equal(live.ended.message, "all good");
  assert.equal(live.ended.nextOffset, 5);
  assert.equal(await live.done, live.ended);

  // A viewer arriving after the end replays, then ends at once.
  const late = viewer.events("fin-1", { from: 2 });
  const lateItems = [];
  for await (const item of late) lateItems.push(item.offset);
  assert.deepEqual(lateItems, [2, 3, 4]);
  assert.equal(late.outcome, "completed");

  // follow() with callbacks.
  const seen = [];
  let ended = null;
  const f = viewer.follow("fin-1", { from: 0, onEvents: (es) => seen.push(...es.map((e) => e.offset)), onEnd: (e) => (ended = e) });
  assert.equal((await f.done).outcome, "completed");
  assert.deepEqual(seen, [0, 1, 2, 3, 4]);
  assert.equal(ended.outcome, "completed");

  // The session is gone: writes fail with RUN_ENDED, and so does the sub-run (ended with the main run).
  await assert.rejects(run.publish({ type: "late" }), (e) => e instanceof RungateError && e.code === "RUN_ENDED");
  await assert.rejects(sub.kv.set({ a: "b" }), (e) => e.code === "RUN_ENDED");
  assert.ok(events.some((e) => e.type === "ended" && e.runId === "fin-1" && e.outcome === "completed"));
  assert.ok(events.some((e) => e.type === "ended" && e.runId === "fin-1.sub" && e.outcome === "cancelled"));
  // A fresh attach of the ended run is refused.
  const again = new RuntimeClient({ url: gw.url(), token: await gw.token("runtime", "fin-*", ALL_CAPS) });
  t.after(() => again.close());
  await assert.rejects(again.attach("fin-1"), (e) => e.code === "RUN_ENDED" && e.details.outcome === "completed");

  const runs = await viewer.runs();
  const r = runs.find((x) => x.runId === "fin-1");
  assert.equal(r.state, "ended");
  assert.equal(r.outcome, "completed");
  assert.deepEqual(rtFrames.problems, []);
  assert.deepEqual(vFrames.problems, []);
  assert.ok(vFrames.counts.pushes["stream.ended"] >= 3);
});

test("cancel reaches the runtime now, or on reattach if it was detached; an ended run says so", async (t) => {
  const gw = await startGateway({ args: ["--lease-ttl-ms", "60000"] });
  t.after(() => gw.stop());
  const proxy = await startProxy(gw.port);
  t.after(() => proxy.close());
  const rtFrames = frameChecker();
  const rt = new RuntimeClient({ url: proxy.url(), token: await gw.token("runtime", "can-*"), backoff: { initialMs: 20, maxMs: 200 }, onFrame: rtFrames.observe });
  t.after(() => rt.close());
  const vFrames = frameChecker();
  const viewer = new ViewerClient({ url: gw.url(), token: await gw.token("viewer", "can-*", ["run.cancel"]), onFrame: vFrames.observe });
  t.after(() => viewer.close());

  const run = await rt.attach("can-1");
  const asked = [];
  run.onCancelRequested((c) => asked.push(c));
  const live = viewer.events("can-1", { from: 0 });
  await run.publish({ type: "working" });

  assert.deepEqual(await viewer.cancel("can-1", "user pressed stop"), { delivered: true, ended: false });
  await until(() => asked.length === 1, "the cancel request reached the runtime");
  assert.equal(asked[0].reason, "user pressed stop");
  assert.equal(asked[0].runId, "can-1");

  // Detached: the request is kept and pushed when the runtime reattaches.
  proxy.refuse(true);
  proxy.cutAll();
  await until(() => rt.state === "reconnecting", "detached");
  await until(async () => (await viewer.runs()).find((r) => r.runId === "can-1")?.state === "detached", "the gateway saw it detach");
  assert.deepEqual(await viewer.cancel("can-1", "really stop"), { delivered: false, ended: false });
  proxy.refuse(false);
  await until(() => asked.length === 2, "the kept cancel arrived after the reattach");
  assert.equal(asked[1].reason, "really stop");
  // A listener added later hears the latest request at once.
  const late = await new Promise((resolve) => run.onCancelRequested(resolve));
  assert.equal(late.reason, "really stop");

  await run.finish("cancelled", "stopped on request");
  for await (const _ of live) {
    // drain to the end
  }
  assert.equal(live.outcome, "cancelled");
  assert.deepEqual(await viewer.cancel("can-1"), { delivered: false, ended: true });

  // Without the capability: FORBIDDEN; an unknown run: NOT_FOUND.
  const plain = new ViewerClient({ url: gw.url(), token: await gw.token("viewer", "can-*") });
  t.after(() => plain.close());
  await assert.rejects(plain.cancel("can-1"), (e) => e.code === "FORBIDDEN");
  await assert.rejects(viewer.cancel("can-nobody"), (e) => e.code === "NOT_FOUND");
  assert.deepEqual(rtFrames.problems, []);
  assert.deepEqual(vFrames.problems, []);
});

test("a finish whose answer was lost is resent after the reconnect and answered", async (t) => {
  const gw = await startGateway({ args: ["--heartbeat-interval-ms", "1000", "--lease-ttl-ms", "60000"] });
  t.after(() => gw.stop());
  const proxy = await startProxy(gw.port);
  t.after(() => proxy.close());
  const rt = new RuntimeClient({ url: proxy.url(), token: await gw.token("runtime", "lost-*"), requestTimeoutMs: 2000, backoff: { initialMs: 20, maxMs: 200 } });
  t.after(() => rt.close());
  const events = [];
  rt.on((e) => events.push(e));
  const run = await rt.attach("lost-1");
  await run.publish([{ type: "a" }, { type: "b" }]);
  // The gateway's answers stop reaching the client: the finish is applied, its reply lost.
  proxy.stallTowardsClient();
  const done = await run.finish("failed", "boom");
  assert.deepEqual(done, { accepted: true, nextOffset: 2 });
  assert.ok(events.some((e) => e.type === "disconnected"), "the answer came on a later connection");
  assert.ok(events.some((e) => e.type === "ended" && e.outcome === "failed"));
  const viewer = new ViewerClient({ url: gw.url(), token: await gw.token("viewer", "lost-*") });
  t.after(() => viewer.close());
  const s = viewer.events("lost-1", { from: 0 });
  const { items } = await collect(s, 2);
  await s.done;
  assert.equal(items.length, 2);
  assert.equal(s.outcome, "failed");
  assert.equal(s.ended.message, "boom");
});

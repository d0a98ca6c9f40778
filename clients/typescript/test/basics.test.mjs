// Publish, resume and tail against a real gateway; every runtime command of
// a run session; errors carry the protocol code; every frame either client
// sends or receives validates against spec/.
import { test } from "node:test";
import assert from "node:assert/strict";
import { RuntimeClient, ViewerClient, RungateError } from "../dist/index.js";
import { startGateway, ALL_CAPS, collect } from "./helpers/gateway.mjs";
import { frameChecker } from "./helpers/spec.mjs";

const CONFIG = `
[[runs]]
pattern = "basic-*"
[runs.config]
model = "small"
depth = 3
[runs.secrets]
API_KEY = "s3cret"
OTHER = "x"
`;

test("publish, resume from an offset, and tail live", async (t) => {
  const gw = await startGateway({ config: CONFIG });
  t.after(() => gw.stop());
  const rtFrames = frameChecker();
  const vFrames = frameChecker();
  const rt = new RuntimeClient({ url: gw.url(), token: await gw.token("runtime", "basic-*", ALL_CAPS), onFrame: rtFrames.observe });
  const viewer = new ViewerClient({ url: gw.url(), token: await gw.token("viewer", "basic-*"), onFrame: vFrames.observe });
  t.after(() => rt.close());
  t.after(() => viewer.close());

  const run = await rt.attach("basic-1", { capabilities: ALL_CAPS, attemptId: "a1" });
  assert.match(run.sessionId, /^[0-9a-f]{32}$/);
  assert.ok(run.heartbeatIntervalMs >= 1000);

  // Published before anyone follows.
  await run.publish([
    { type: "log", data: { i: 0 } },
    { type: "log", data: { i: 1 } },
  ]);
  await run.publish({ type: "log", data: { i: 2 }, timestamp: "2026-11-25T10:00:00.123Z" });

  // A live tail from the head sees only what comes after.
  const live = viewer.events("basic-1");
  // A replay from offset 1 sees 1, 2 and then the live ones.
  const replay = viewer.events("basic-1", { from: 1 });
  // Wait until both subscriptions are in place: the replay has delivered offset 1.
  const replayIt = replay[Symbol.asyncIterator]();
  const first = await replayIt.next();
  assert.deepEqual(first.value, { kind: "event", offset: 1, event: { type: "log", data: { i: 1 }, seq: first.value.event.seq } });
  // The live one has resumed once its position is known.
  await new Promise((r) => setTimeout(r, 200));
  while (live.position.nextOffset === null) await new Promise((r) => setTimeout(r, 20));
  assert.equal(live.position.nextOffset, 3);

  for (let i = 3; i < 10; i++) await run.publish({ type: "token", data: { i } });

  const rest = [];
  while (rest.length < 8) {
    const n = await replayIt.next();
    rest.push(n.value);
  }
  assert.deepEqual(rest.map((x) => x.offset), [2, 3, 4, 5, 6, 7, 8, 9]);
  assert.deepEqual(rest.map((x) => x.event.data.i), [2, 3, 4, 5, 6, 7, 8, 9]);
  assert.equal(rest[0].event.timestamp, "2026-11-25T10:00:00.123Z");
  // seq is assigned by the client, increasing.
  const seqs = [first.value, ...rest].map((x) => x.event.seq);
  for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i] > seqs[i - 1], `seq increases: ${seqs}`);

  const { items } = await collect(live, 7);
  assert.deepEqual(items.map((x) => [x.kind, x.offset]), [3, 4, 5, 6, 7, 8, 9].map((o) => ["event", o]));

  // runs() lists it, attached.
  const runs = await viewer.runs();
  const mine = runs.find((r) => r.runId === "basic-1");
  assert.ok(mine, JSON.stringify(runs));
  assert.equal(mine.state, "attached");
  assert.equal(mine.nextOffset, 10);

  replay.close();
  live.close();
  assert.deepEqual(rtFrames.problems, []);
  assert.deepEqual(vFrames.problems, []);
  assert.ok(vFrames.counts.pushes["stream.events"] > 0);
});

test("kv, secrets, config, checkpoints, sub-runs and typed errors", async (t) => {
  const gw = await startGateway({ config: CONFIG });
  t.after(() => gw.stop());
  const frames = frameChecker();
  const rt = new RuntimeClient({ url: gw.url("/v1/runtime"), token: await gw.token("runtime", "basic-*", ALL_CAPS), onFrame: frames.observe });
  t.after(() => rt.close());
  const run = await rt.attach("basic-2", { capabilities: ALL_CAPS });

  await run.kv.set({ a: "1", b: "two" });
  assert.deepEqual(await run.kv.get(["a", "b", "missing"]), { a: "1", b: "two" });

  assert.deepEqual(await run.secrets(), { API_KEY: "s3cret", OTHER: "x" });
  assert.deepEqual(await run.secrets(["API_KEY"]), { API_KEY: "s3cret" });
  const cfg = await run.config();
  assert.equal(cfg.model, "small");
  assert.equal(cfg.depth, 3);

  const saved = await run.checkpoint.save({ step: 1, nested: [1, "x", null] });
  assert.ok(saved.checkpointId);
  await run.checkpoint.save({ step: 2 }, { checkpointId: "named" });
  assert.deepEqual((await run.checkpoint.load()).data, { step: 2 });
  assert.deepEqual((await run.checkpoint.load(saved.checkpointId)).data, { step: 1, nested: [1, "x", null] });
  await assert.rejects(run.checkpoint.load("nope"), (e) => e instanceof RungateError && e.code === "NOT_FOUND" && e.fromGateway);

  // A sub-run on the same socket; its KV is its own.
  const sub = await run.subRun("basic-2.sub");
  assert.notEqual(sub.sessionId, run.sessionId);
  await sub.kv.set({ a: "sub" });
  assert.deepEqual(await sub.kv.get(["a"]), { a: "sub" });
  assert.deepEqual(await run.kv.get(["a"]), { a: "1" });
  await sub.publish({ type: "sub.log", data: null });

  // Errors carry the protocol code.
  const narrow = new RuntimeClient({ url: gw.url(), token: await gw.token("runtime", "basic-*", ["kv.read"]) });
  t.after(() => narrow.close());
  await assert.rejects(narrow.attach("basic-3", { capabilities: ["kv.write"] }), (e) => e instanceof RungateError && e.code === "FORBIDDEN" && e.retryable === false);
  const r3 = await narrow.attach("basic-3", { capabilities: ["kv.read"] });
  await assert.rejects(r3.kv.set({ x: "y" }), (e) => e.code === "FORBIDDEN");
  // Sub-runs need subtasks.run.
  await assert.rejects(r3.subRun("basic-3.sub"), (e) => e.code === "FORBIDDEN");
  // A second, fresh client for a run another instance holds: CONFLICT.
  const other = new RuntimeClient({ url: gw.url(), token: await gw.token("runtime", "basic-*", ALL_CAPS), runtimeInstanceId: "someone-else" });
  t.after(() => other.close());
  await assert.rejects(other.attach("basic-2"), (e) => e.code === "CONFLICT");
  // A bad event is INVALID_PAYLOAD with the path.
  await assert.rejects(run.publish({ type: "" }), (e) => e.code === "INVALID_PAYLOAD" && e.details.path === "/payload/events/0");
  // A token the gateway does not accept: UNAUTHENTICATED, not retried forever.
  const bad = new RuntimeClient({ url: gw.url(), token: "not-a-token" });
  await assert.rejects(bad.attach("basic-9"), (e) => e.code === "UNAUTHENTICATED" && e.httpStatus === 401);
  await bad.close();
  // The one frame that broke the spec is the bad event this test sent on purpose.
  assert.equal(frames.problems.length, 1, frames.problems.join("\n"));
  assert.match(frames.problems[0], /^events\.publish request: data\/events\/0\/type/);
});

test("kv.delete gives bytes back, and a write past the tenant's quota is QUOTA_EXCEEDED", async (t) => {
  const gw = await startGateway({ args: ["--max-kv-bytes-per-tenant", "100"] });
  t.after(() => gw.stop());
  const frames = frameChecker();
  const rt = new RuntimeClient({ url: gw.url(), token: await gw.token("runtime", "quota-*", ALL_CAPS), onFrame: frames.observe });
  t.after(() => rt.close());
  const run = await rt.attach("quota-1", { capabilities: ALL_CAPS });

  // "a" + 59 and "b" + 29: 90 of the tenant's 100 bytes.
  await run.kv.set({ a: "x".repeat(59), b: "y".repeat(29) });
  await assert.rejects(
    run.kv.set({ c: "z".repeat(19) }),
    (e) =>
      e instanceof RungateError &&
      e.code === "QUOTA_EXCEEDED" &&
      e.fromGateway &&
      e.retryable === false &&
      e.details.quota === "kvBytes" &&
      e.details.used === 90 &&
      e.details.requested === 20 &&
      e.details.limit === 100,
  );
  assert.deepEqual(await run.kv.get(["c"]), {}, "nothing of the refused write is stored");

  assert.equal(await run.kv.delete(["a", "missing", "a"]), 1);
  assert.deepEqual(await run.kv.get(["a", "b"]), { b: "y".repeat(29) });
  await run.kv.set({ c: "z".repeat(19) });
  assert.deepEqual(await run.kv.get(["b", "c"]), { b: "y".repeat(29), c: "z".repeat(19) });
  assert.equal(await run.kv.delete([]), 0);
  assert.deepEqual(frames.problems, []);
});

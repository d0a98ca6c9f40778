// An epoch takeover: a second client of the same runtime instance (a
// restarted worker) attaches the run while the first still holds it. The
// second gets the same session at a higher connectionEpoch; the first is
// told (a "superseded" event), its later publishes fail with STALE_EPOCH and
// are stored nowhere, and it does not try to take the run back.
import { test } from "node:test";
import assert from "node:assert/strict";
import { RuntimeClient, ViewerClient, RungateError } from "../dist/index.js";
import { startGateway, ALL_CAPS, collect, until, sleep } from "./helpers/gateway.mjs";
import { frameChecker } from "./helpers/spec.mjs";

test("a second client of the same instance takes the run over; the first is fenced off", async (t) => {
  const gw = await startGateway();
  t.after(() => gw.stop());
  const token = await gw.token("runtime", "take-*", ALL_CAPS);
  const framesA = frameChecker();
  const a = new RuntimeClient({ url: gw.url(), token, runtimeInstanceId: "worker-1", onFrame: framesA.observe });
  t.after(() => a.close());
  const eventsA = [];
  a.on((e) => eventsA.push(e));
  const runA = await a.attach("take-1", { capabilities: ["kv.read", "kv.write"] });
  await runA.publish([{ type: "from", data: "a" }, { type: "from", data: "a" }]);
  await runA.kv.set({ owner: "a" });

  await sleep(5); // the wall-clock epoch of b is above a's
  const framesB = frameChecker();
  const b = new RuntimeClient({ url: gw.url(), token, runtimeInstanceId: "worker-1", onFrame: framesB.observe });
  t.after(() => b.close());
  const runB = await b.attach("take-1", { capabilities: ["kv.read", "kv.write"] });
  assert.equal(runB.sessionId, runA.sessionId, "the same session, moved");
  assert.ok(b.connectionEpoch > a.connectionEpoch);
  assert.deepEqual(await runB.kv.get(["owner"]), { owner: "a" });

  await until(() => eventsA.some((e) => e.type === "superseded"), "a told it was superseded");
  const sup = eventsA.find((e) => e.type === "superseded");
  assert.equal(sup.runId, "take-1");
  assert.equal(sup.connectionEpoch, b.connectionEpoch);
  assert.equal(runA.endedWith?.code, "STALE_EPOCH");
  await assert.rejects(runA.publish({ type: "from", data: "a-late" }), (e) => e instanceof RungateError && e.code === "STALE_EPOCH");
  await assert.rejects(runA.kv.set({ owner: "a-late" }), (e) => e.code === "STALE_EPOCH");

  await runB.publish({ type: "from", data: "b" });
  await sleep(300);
  await runB.publish({ type: "from", data: "b" });
  // a did not steal it back.
  assert.equal(eventsA.filter((e) => e.type === "reconnected").length, 0);
  assert.deepEqual(await runB.kv.get(["owner"]), { owner: "a" });

  const viewer = new ViewerClient({ url: gw.url(), token: await gw.token("viewer", "take-*") });
  t.after(() => viewer.close());
  const s = viewer.events("take-1", { from: 0 });
  const { items } = await collect(s, 4);
  assert.deepEqual(items.map((x) => x.event.data), ["a", "a", "b", "b"]);
  const runs = await viewer.runs();
  assert.equal(runs.find((r) => r.runId === "take-1").nextOffset, 4, "a's late publish was stored nowhere");
  s.close();
  assert.ok(framesA.counts.pushes["session.superseded"] === 1);
  assert.deepEqual(framesA.problems, []);
  assert.deepEqual(framesB.problems, []);
});

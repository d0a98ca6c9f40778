// Reconnects through a TCP proxy that cuts (RST) and stalls connections:
// every acknowledged publish is stored once, in order, and a viewer behind
// the same proxy sees every offset once, in order, with no gap and no
// truncation. The runtime reattaches at a higher connectionEpoch each time.
import { test } from "node:test";
import assert from "node:assert/strict";
import { RuntimeClient, ViewerClient } from "../dist/index.js";
import { startGateway, ALL_CAPS, collect, sleep, until } from "./helpers/gateway.mjs";
import { startProxy } from "./helpers/proxy.mjs";
import { frameChecker } from "./helpers/spec.mjs";

const N = 240;

test("cuts and stalls lose nothing and duplicate nothing", async (t) => {
  // A short heartbeat interval so a stalled socket is noticed within seconds;
  // a long lease so no session expires however slow the machine is.
  const gw = await startGateway({ args: ["--heartbeat-interval-ms", "1000", "--lease-ttl-ms", "60000"] });
  t.after(() => gw.stop());
  const proxy = await startProxy(gw.port);
  t.after(() => proxy.close());
  const rtFrames = frameChecker();
  const vFrames = frameChecker();
  const rt = new RuntimeClient({
    url: proxy.url(),
    token: await gw.token("runtime", "cut-*", ALL_CAPS),
    requestTimeoutMs: 2000,
    backoff: { initialMs: 20, maxMs: 300 },
    onFrame: rtFrames.observe,
  });
  t.after(() => rt.close());
  const events = [];
  rt.on((e) => events.push(e));
  const viewer = new ViewerClient({ url: proxy.url(), token: await gw.token("viewer", "cut-*"), backoff: { initialMs: 20, maxMs: 300 }, onFrame: vFrames.observe });
  t.after(() => viewer.close());

  const run = await rt.attach("cut-1", { capabilities: ["kv.write", "kv.read"] });
  const sessionId = run.sessionId;
  const epoch0 = rt.connectionEpoch;
  const stream = viewer.events("cut-1", { from: 0 });
  const reading = collect(stream, N, 120_000);

  // Faults at fixed points of the publishing, so they land however fast
  // the machine publishes: a cut while a publish is in flight at every 40
  // events (four in all), and after the second cut a stall longer than the
  // client's patience.
  let cuts = 0;
  let stalls = 0;
  for (let i = 0; i < N; i += 3) {
    const publishing = run.publish([0, 1, 2].map((k) => ({ type: "tick", data: { i: i + k } })));
    if (i >= 40 * (cuts + 1) && cuts < 4) {
      cuts += 1;
      proxy.cutAll();
    }
    await publishing;
    if (cuts === 2 && stalls === 0) {
      stalls += 1;
      await until(() => rt.state === "connected" && proxy.open >= 2, "reconnected before the stall");
      await sleep(50);
      // No FIN ever comes: the client must give this socket up by itself
      // and reconnect.
      proxy.stall();
      await until(() => events.some((e) => e.type === "disconnected" && e.code === 1006 && /no frame/.test(e.reason)), "the stalled socket given up");
      proxy.unstall();
    }
  }
  assert.deepEqual([cuts, stalls], [4, 1], "faults were injected");

  // A KV write after all that still works on the same session.
  await run.kv.set({ done: "yes" });
  assert.equal(run.sessionId, sessionId, "the same session throughout");
  assert.ok(rt.connectionEpoch >= epoch0 + 3, `epoch grew: ${epoch0} -> ${rt.connectionEpoch}`);
  assert.ok(events.filter((e) => e.type === "reconnected").length >= 3);
  assert.ok(!events.some((e) => e.type === "superseded" || e.type === "expired"), JSON.stringify(events));

  const { items } = await reading;
  assert.deepEqual(items.filter((x) => x.kind !== "event"), [], "no gap, truncation or close");
  assert.deepEqual(items.map((x) => x.offset), [...Array(N).keys()], "every offset once, in order");
  assert.deepEqual(items.map((x) => x.event.data.i), [...Array(N).keys()], "every event once, in publish order");

  // The gateway agrees: nothing stored twice.
  const runs = await viewer.runs();
  assert.equal(runs.find((r) => r.runId === "cut-1").nextOffset, N);
  assert.ok(proxy.accepted >= 6, `connections: ${proxy.accepted}`);
  assert.deepEqual(rtFrames.problems, []);
  assert.deepEqual(vFrames.problems, []);
});

test("a refusing network is retried with backoff; calls made meanwhile wait", async (t) => {
  const gw = await startGateway();
  t.after(() => gw.stop());
  const proxy = await startProxy(gw.port);
  t.after(() => proxy.close());
  const rt = new RuntimeClient({ url: proxy.url(), token: await gw.token("runtime", "ref-*", ALL_CAPS), backoff: { initialMs: 20, maxMs: 200 } });
  t.after(() => rt.close());
  const run = await rt.attach("ref-1", { capabilities: ["kv.read", "kv.write"] });
  proxy.refuse(true);
  proxy.cutAll();
  await until(() => rt.state === "reconnecting", "reconnecting");
  const write = run.kv.set({ k: "v" });
  const pub = run.publish({ type: "while-down" });
  await until(() => proxy.accepted >= 4, "several refused attempts");
  proxy.refuse(false);
  await write;
  await pub;
  assert.deepEqual(await run.kv.get(["k"]), { k: "v" });
  assert.equal(rt.state, "connected");
});

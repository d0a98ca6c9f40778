// Token refresh: with tokens that live 3 s, the gateway closes each socket
// (1008) when its token expires; both clients reconnect with a fresh token
// from their tokenSource, the runtime keeps its session, and nothing is lost
// or repeated.
import { test } from "node:test";
import assert from "node:assert/strict";
import { RuntimeClient, ViewerClient } from "../dist/index.js";
import { startGateway, collect, sleep } from "./helpers/gateway.mjs";

test("short-lived tokens are refreshed through tokenSource at each reconnect", async (t) => {
  const gw = await startGateway({ args: ["--lease-ttl-ms", "60000"] });
  t.after(() => gw.stop());
  let runtimeTokens = 0;
  let viewerTokens = 0;
  const rt = new RuntimeClient({
    url: gw.url(),
    tokenSource: async () => {
      runtimeTokens += 1;
      return gw.token("runtime", "tok-*", ["kv.read", "kv.write"], "3s");
    },
    backoff: { initialMs: 20, maxMs: 200 },
  });
  t.after(() => rt.close());
  const events = [];
  rt.on((e) => events.push(e));
  const viewer = new ViewerClient({
    url: gw.url(),
    tokenSource: async () => {
      viewerTokens += 1;
      return gw.token("viewer", "tok-*", [], "3s");
    },
    backoff: { initialMs: 20, maxMs: 200 },
  });
  t.after(() => viewer.close());

  const run = await rt.attach("tok-1", { capabilities: ["kv.read", "kv.write"] });
  const sessionId = run.sessionId;
  const stream = viewer.events("tok-1", { from: 0 });
  // Publish for a while: at least two token lifetimes of the first tokens.
  const started = Date.now();
  let n = 0;
  while (Date.now() - started < 8000 || events.filter((e) => e.type === "disconnected").length < 2) {
    await run.publish({ type: "tick", data: n });
    n += 1;
    await sleep(50);
    if (Date.now() - started > 60_000) break;
  }
  await run.kv.set({ last: String(n) });
  const expiredCloses = events.filter((e) => e.type === "disconnected" && e.code === 1008);
  assert.ok(expiredCloses.length >= 2, `closed for token expiry: ${JSON.stringify(events)}`);
  assert.ok(runtimeTokens >= 3, `tokens asked for: ${runtimeTokens}`);
  assert.equal(run.sessionId, sessionId, "the session survived every reconnect");

  const { items } = await collect(stream, n);
  assert.deepEqual(items.filter((x) => x.kind !== "event"), []);
  assert.deepEqual(items.map((x) => x.event.data), [...Array(n).keys()]);
  assert.ok(viewerTokens >= 3, `viewer tokens asked for: ${viewerTokens}`);
  stream.close();
});

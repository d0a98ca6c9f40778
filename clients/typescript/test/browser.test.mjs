// The ViewerClient in a page in headless Chromium (Debian's /usr/bin/chromium
// driven by playwright-core; no browser download). The page loads dist/ as
// built, with no bundler: it must never import `ws`. It tails a run through a
// proxy that cuts its connection once (the page resumes from the next offset),
// and ends by itself at stream.ended with the outcome readable.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { readFileSync, existsSync } from "node:fs";
import { join, resolve, dirname, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { RuntimeClient } from "../dist/index.js";
import { startGateway, tempDir, until, WAIT_MS } from "./helpers/gateway.mjs";
import { startProxy } from "./helpers/proxy.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const pkg = resolve(here, "..");
const CHROMIUM = process.env.RUNGATE_CHROMIUM ?? "/usr/bin/chromium";

/** Serves the test page and dist/, nothing else (no node_modules). */
async function servePage() {
  const requests = [];
  const server = createServer((req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    requests.push(path);
    let file = null;
    if (path === "/" || path === "/page.html") file = join(here, "browser", "page.html");
    else if (path.startsWith("/dist/")) {
      const p = normalize(join(pkg, path));
      if (p.startsWith(join(pkg, "dist"))) file = p;
    }
    if (path === "/favicon.ico") {
      res.writeHead(204).end();
      return;
    }
    if (!file || !existsSync(file)) {
      res.writeHead(404).end("not found");
      return;
    }
    const type = file.endsWith(".js") ? "text/javascript" : file.endsWith(".html") ? "text/html" : "application/octet-stream";
    res.writeHead(200, { "content-type": type, "cache-control": "no-store" }).end(readFileSync(file));
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return { origin: `http://127.0.0.1:${server.address().port}`, requests, close: () => new Promise((r) => server.close(r)) };
}

let web, gw, proxy, context, profile;

before(async () => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (apt-get install chromium)`);
  web = await servePage();
  gw = await startGateway({ args: ["--allowed-origins", web.origin, "--lease-ttl-ms", "60000"] });
  proxy = await startProxy(gw.port);
  profile = tempDir("rungate-chromium-");
  context = await chromium.launchPersistentContext(profile.dir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: WAIT_MS,
  });
});

after(async () => {
  await context?.close();
  profile?.remove();
  await proxy?.close();
  await gw?.stop();
  await web?.close();
});

async function openPage(runId, token) {
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
  page.on("console", (m) => m.type() === "error" && !/WebSocket/.test(m.text()) && problems.push(`console: ${m.text()}`));
  const q = new URLSearchParams({ run: runId, gw: proxy.url(), token });
  await page.goto(`${web.origin}/page.html?${q}`);
  return { page, problems };
}

test("a page tails a run, survives a cut connection, and reads the end", async () => {
  const rt = new RuntimeClient({ url: gw.url(), token: await gw.token("runtime", "web-*") });
  try {
    const run = await rt.attach("web-1");
    for (let i = 0; i < 5; i++) await run.publish({ type: "log", data: { i } });
    const { page, problems } = await openPage("web-1", await gw.token("viewer", "web-*"));
    await page.waitForFunction(() => window.items?.length >= 5, null, { timeout: WAIT_MS });

    // The page's socket is cut; it reconnects and resumes after offset 4.
    proxy.cutAll();
    for (let i = 5; i < 12; i++) await run.publish({ type: "log", data: { i } });
    await page.waitForFunction(() => window.items?.length >= 12, null, { timeout: WAIT_MS });
    const items = await page.evaluate(() => window.items);
    assert.deepEqual(items.map((x) => [x.kind, x.offset, x.event.data.i]), [...Array(12).keys()].map((i) => ["event", i, i]));
    assert.ok(proxy.accepted >= 2, "the page reconnected");

    // The run ends: the page's loop ends by itself, with the outcome.
    await run.finish("completed", "all done");
    await page.waitForFunction(() => window.state !== "running", null, { timeout: WAIT_MS });
    assert.equal(await page.evaluate(() => window.state), "ended: completed");
    const ended = await page.evaluate(() => window.ended);
    assert.equal(ended.outcome, "completed");
    assert.equal(ended.message, "all done");
    assert.equal(ended.nextOffset, 12);
    assert.equal(await page.textContent("#state"), "ended: completed");

    assert.deepEqual(problems, []);
    assert.ok(!web.requests.some((p) => /node_modules|\/ws(\/|$)/.test(p)), `the page never asked for ws: ${web.requests}`);
    await page.close();
  } finally {
    await rt.close();
  }
});

test("a page from an origin the gateway does not allow gets nothing", async () => {
  // The same page served from another origin (localhost instead of 127.0.0.1).
  const rt = new RuntimeClient({ url: gw.url(), token: await gw.token("runtime", "web-*") });
  try {
    const run = await rt.attach("web-2");
    await run.publish({ type: "log", data: { i: 0 } });
    const page = await context.newPage();
    const q = new URLSearchParams({ run: "web-2", gw: proxy.url(), token: await gw.token("viewer", "web-*") });
    const before = proxy.accepted;
    await page.goto(`${web.origin.replace("127.0.0.1", "localhost")}/page.html?${q}`);
    // A browser cannot see why a handshake failed, so the page keeps trying
    // (with backoff) and gets nothing.
    await until(() => proxy.accepted >= before + 3, "the page's refused attempts");
    assert.equal(await page.evaluate(() => window.items.length), 0);
    assert.equal(await page.evaluate(() => window.state), "running");
    await page.close();
  } finally {
    await rt.close();
  }
});

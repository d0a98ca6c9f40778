// Starts a REAL rungate gateway binary for the tests (never a mock):
// `rungate serve --listen 127.0.0.1:0 --data-dir <fresh temp dir>`, reading the
// address from the first stdout line ("listening on ADDR", as the Rust
// process tests do), and mints tokens with `rungate token`.
//
// The binary: $RUNGATE_BIN, else <repo root>/target/debug/rungate.

import { spawn, execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import { promisify } from "node:util";

const here = dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = resolve(here, "..", "..", "..", "..");
export const BIN = process.env.RUNGATE_BIN ?? join(REPO_ROOT, "target", "debug", "rungate");
const run = promisify(execFile);

/** Generous: the machine may be busy. */
export const WAIT_MS = 60_000;

export function tempDir(prefix = "rungate-ts-") {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  // A client still reconnecting may mint a token (re-creating the key file)
  // while the directory goes: retry, and never fail a test over cleanup.
  const remove = () => {
    try {
      rmSync(dir, { recursive: true, force: true, maxRetries: 10, retryDelay: 50 });
    } catch {
      // left in the system temp directory
    }
  };
  return { dir, remove };
}

/**
 * A running gateway. `args` are extra `serve` flags; `dataDir` reuses a
 * directory (a restart); `config` is TOML written to a file passed as --config.
 */
export async function startGateway({ args = [], dataDir, config } = {}) {
  if (!existsSync(BIN)) throw new Error(`no gateway binary at ${BIN} (set RUNGATE_BIN)`);
  const own = dataDir ? null : tempDir();
  const dir = dataDir ?? own.dir;
  const extra = [...args];
  if (config !== undefined) {
    const file = join(dir, "rungate.toml");
    writeFileSync(file, config);
    extra.push("--config", file);
  }
  const child = spawn(BIN, ["serve", "--listen", "127.0.0.1:0", "--data-dir", join(dir, "data"), ...extra], {
    env: { ...process.env, RUNGATE_LOG: process.env.RUNGATE_LOG ?? "warn" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const exited = new Promise((res) => child.once("exit", (code, signal) => res({ code, signal })));
  const lines = createInterface({ input: child.stdout });
  const addr = await new Promise((res, rej) => {
    const t = setTimeout(() => rej(new Error("the gateway did not print its address in time")), WAIT_MS);
    lines.once("line", (line) => {
      clearTimeout(t);
      const m = /^listening on (\S+)$/.exec(line.trim());
      if (m) res(m[1]);
      else rej(new Error(`unexpected first line from the gateway: ${line}`));
    });
    child.once("exit", (code) => rej(new Error(`the gateway exited (${code}) before listening`)));
  });
  lines.on("line", () => {}); // keep draining stdout
  const [host, port] = [addr.slice(0, addr.lastIndexOf(":")), Number(addr.slice(addr.lastIndexOf(":") + 1))];
  const keyFile = join(dir, "data", "auth.key");
  return {
    addr,
    host,
    port,
    dir,
    keyFile,
    url: (path = "") => `ws://${addr}${path}`,
    http: (path = "") => `http://${addr}${path}`,
    /** `rungate token`; kind runtime|viewer, caps a list, ttl like "1h" or "3s". */
    token: (kind, runs, caps = [], ttl = "1h") => mint(keyFile, kind, runs, caps, ttl),
    /** kill -9: no drain, no flush. */
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      return exited;
    },
    async terminate() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      return exited;
    },
    /** Stops it and removes its temp dir (unless the dir was given). */
    async stop() {
      await this.kill();
      own?.remove();
    },
  };
}

export async function mint(keyFile, kind, runs, caps = [], ttl = "1h") {
  const args = ["token", "--auth-key-file", keyFile, "--kind", kind, "--runs", runs, "--ttl", ttl];
  if (caps.length) args.push("--caps", caps.join(","));
  const { stdout } = await run(BIN, args);
  return stdout.trim();
}

export const ALL_CAPS = ["secrets.read", "kv.read", "kv.write", "checkpoint.save", "checkpoint.load", "subtasks.run", "stream.resume"];

/** Polls `pred` until true, or fails after `ms`. */
export async function until(pred, what, ms = WAIT_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await pred()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Reads `stream` until `n` event items arrived (other items are collected too), within `ms`. */
export async function collect(stream, n, ms = WAIT_MS) {
  const items = [];
  let events = 0;
  const it = stream[Symbol.asyncIterator]();
  const deadline = Date.now() + ms;
  while (events < n) {
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`timed out after ${events}/${n} events; items: ${JSON.stringify(items.slice(-3))}`);
    let timer;
    const r = await Promise.race([
      it.next(),
      new Promise((_, rej) => (timer = setTimeout(() => rej(new Error(`timed out after ${events}/${n} events`)), left))),
    ]).finally(() => clearTimeout(timer));
    if (r.done) break;
    items.push(r.value);
    if (r.value.kind === "event") events += 1;
  }
  return { items, it };
}

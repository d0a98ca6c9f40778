// The TypeScript frame types are generated from spec/ (scripts/gen-types.mjs
// → src/generated/spec.ts). This test fails when the committed file and
// spec/ disagree, and shows that it can: a copy of spec/ with one change
// makes the check fail.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { cpSync, readFileSync, writeFileSync } from "node:fs";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { REPO_ROOT, tempDir } from "./helpers/gateway.mjs";
import * as client from "../dist/index.js";

const here = dirname(fileURLToPath(import.meta.url));
const gen = resolve(here, "..", "scripts", "gen-types.mjs");
const run = promisify(execFile);

test("src/generated/spec.ts matches spec/", async () => {
  const { stdout } = await run(process.execPath, [gen, "--check"]);
  assert.match(stdout, /matches/);
});

test("a change to spec/ makes the check fail", async (t) => {
  const dir = tempDir();
  t.after(() => dir.remove());
  const spec = join(dir.dir, "spec");
  cpSync(join(REPO_ROOT, "spec"), spec, { recursive: true });
  const file = join(spec, "v1", "schemas", "commands", "stream.json");
  const s = JSON.parse(readFileSync(file, "utf8"));
  s.$defs.StreamCancelCommand.properties.reason = { type: "string" };
  writeFileSync(file, JSON.stringify(s, null, 2));
  await assert.rejects(run(process.execPath, [gen, "--check"], { env: { ...process.env, RUNGATE_SPEC_DIR: spec } }), (e) => e.code === 1 && /out of date/.test(e.stderr));
});

test("the run-time lists cover every command, push and error code of spec/", () => {
  const index = JSON.parse(readFileSync(join(REPO_ROOT, "spec", "v1", "commands.json"), "utf8"));
  for (const c of Object.keys(index.commands)) assert.ok(client.COMMAND_TYPES.includes(c), c);
  for (const p of Object.keys(index.pushes)) assert.ok(client.PUSH_TYPES.includes(p), p);
  const env = JSON.parse(readFileSync(join(REPO_ROOT, "spec", "v1", "schemas", "frames", "envelope.json"), "utf8"));
  for (const code of env.$defs.ErrorCode.enum) assert.ok(client.ERROR_CODES.includes(code), code);
  // The lifecycle additions the client relies on are there.
  for (const c of ["runtime.finish", "run.cancel"]) assert.ok(client.COMMAND_TYPES.includes(c), c);
  for (const p of ["stream.ended", "run.cancelRequested"]) assert.ok(client.PUSH_TYPES.includes(p), p);
  assert.ok(client.ERROR_CODES.includes("RUN_ENDED"));
  // An error frame's code becomes the error's code.
  const e = client.RungateError.fromBody({ code: "RUN_ENDED", message: "ended", retryable: false, details: { runId: "r", outcome: "completed" } });
  assert.equal(e.code, "RUN_ENDED");
  assert.equal(e.runId, "r");
  assert.equal(e.fromGateway, true);
  assert.equal(client.RungateError.fromBody({ code: "SOMETHING_NEW", message: "?", retryable: true }).code, "INTERNAL");
});

// Reads the protocol's JSON Schemas from the repository's spec/, for the
// type generator and the tests' frame checker alike (so both see the same
// contract).

import { readFileSync, readdirSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const PACKAGE_DIR = resolve(here, "..");
export const DEFAULT_SPEC_DIR = resolve(PACKAGE_DIR, "..", "..", "spec");

function walk(dir) {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    return statSync(p).isDirectory() ? walk(p) : p.endsWith(".json") ? [p] : [];
  });
}

/**
 * { files: Map<$id, {schema, pending: false}>, commands, pushes (refs made
 *   absolute), errorCodes, specCodes, envelope (absolute refs), specDir }
 */
export function loadSpec(specDir = process.env.RUNGATE_SPEC_DIR ?? DEFAULT_SPEC_DIR) {
  const files = new Map();
  for (const path of walk(join(specDir, "v1", "schemas")).sort()) {
    const schema = JSON.parse(readFileSync(path, "utf8"));
    files.set(schema.$id, { schema, pending: false });
  }
  const index = JSON.parse(readFileSync(join(specDir, "v1", "commands.json"), "utf8"));
  const abs = (ref, base) => new URL(ref, base).href;
  const commands = {};
  for (const [k, v] of Object.entries(index.commands)) commands[k] = { ...v, request: abs(v.request, index.$id), response: abs(v.response, index.$id) };
  const pushes = {};
  for (const [k, v] of Object.entries(index.pushes)) pushes[k] = { payload: abs(v.payload, index.$id) };
  const envelope = Object.fromEntries(Object.entries(index.envelope).map(([k, v]) => [k, abs(v, index.$id)]));
  const specCodes = [...files.values()].find((f) => f.schema.$defs?.ErrorCode)?.schema.$defs.ErrorCode.enum ?? [];
  const errorCodes = [...specCodes];
  return { files, commands, pushes, envelope, errorCodes, specCodes, specDir };
}

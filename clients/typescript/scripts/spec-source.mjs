// Reads the protocol's JSON Schemas from the repository's spec/ and lays
// spec-pending/lifecycle.json over them, for the type generator and the
// tests' frame checker alike (so both see the same contract).
//
// The pending file holds what the lifecycle work (issue #15) adds to the
// contract, until spec/ carries it:
// - `$defs`, `commands`, `pushes`, `errorCodes`: used only where spec/ has
//   none of that name;
// - `amend`: members added to an existing spec/ definition, applied only
//   while that definition has none of the members listed (once spec/ has
//   them, spec/ wins entirely).
// Once spec/ has all of it the pending file changes nothing.

import { readFileSync, readdirSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const PACKAGE_DIR = resolve(here, "..");
export const DEFAULT_SPEC_DIR = resolve(PACKAGE_DIR, "..", "..", "spec");
const PENDING = join(PACKAGE_DIR, "spec-pending", "lifecycle.json");

function walk(dir) {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    return statSync(p).isDirectory() ? walk(p) : p.endsWith(".json") ? [p] : [];
  });
}

/**
 * { files: Map<$id, {schema, pending}>, commands, pushes (refs made absolute),
 *   errorCodes, envelope (absolute refs), specDir }
 */
export function loadSpec(specDir = process.env.RUNGATE_SPEC_DIR ?? DEFAULT_SPEC_DIR) {
  const files = new Map();
  for (const path of walk(join(specDir, "v1", "schemas")).sort()) {
    const schema = JSON.parse(readFileSync(path, "utf8"));
    files.set(schema.$id, { schema, pending: false });
  }
  const index = JSON.parse(readFileSync(join(specDir, "v1", "commands.json"), "utf8"));
  const pending = JSON.parse(readFileSync(PENDING, "utf8"));

  const defined = new Set();
  for (const { schema } of files.values()) for (const d of Object.keys(schema.$defs ?? {})) defined.add(d);
  const pendingDefs = {};
  for (const [d, body] of Object.entries(pending.$defs ?? {})) if (!defined.has(d)) pendingDefs[d] = body;
  // Amendments: refs inside them are relative to the pending file, so they
  // are made absolute before being laid into another file.
  const absolutize = (node) => {
    if (Array.isArray(node)) return node.map(absolutize);
    if (!node || typeof node !== "object") return node;
    const out = {};
    for (const [k, v] of Object.entries(node)) out[k] = k === "$ref" ? new URL(v, pending.$id).href : absolutize(v);
    return out;
  };
  for (const [d, amend] of Object.entries(pending.amend ?? {})) {
    for (const { schema } of files.values()) {
      const def = schema.$defs?.[d];
      if (!def) continue;
      const adds = Object.keys(amend.properties ?? {}).filter((p) => !(def.properties ?? {})[p]);
      const replaces = Object.keys(amend.replace ?? {});
      const already = Object.keys(amend.properties ?? {}).some((p) => (def.properties ?? {})[p]);
      if (already) continue;
      def.properties = { ...def.properties, ...absolutize(amend.properties ?? {}) };
      for (const p of replaces) def.properties[p] = absolutize(amend.replace[p]);
      if (amend.required) def.required = [...(def.required ?? []), ...amend.required];
      if (amend.description) def.description = `${def.description ? `${def.description} ` : ""}${amend.description}`;
      void adds;
    }
  }
  files.set(pending.$id, { schema: { $id: pending.$id, $defs: pendingDefs }, pending: true });

  const abs = (ref, base) => new URL(ref, base).href;
  const pendingIndex = new URL("commands.json", pending.$id).href;
  const commands = {};
  for (const [k, v] of Object.entries(index.commands)) commands[k] = { ...v, request: abs(v.request, index.$id), response: abs(v.response, index.$id) };
  for (const [k, v] of Object.entries(pending.commands ?? {})) commands[k] ??= { ...v, request: abs(v.request, pendingIndex), response: abs(v.response, pendingIndex) };
  const pushes = {};
  for (const [k, v] of Object.entries(index.pushes)) pushes[k] = { payload: abs(v.payload, index.$id) };
  for (const [k, v] of Object.entries(pending.pushes ?? {})) pushes[k] ??= { payload: abs(v.payload, pendingIndex) };
  const envelope = Object.fromEntries(Object.entries(index.envelope).map(([k, v]) => [k, abs(v, index.$id)]));
  const specCodes = [...files.values()].find((f) => f.schema.$defs?.ErrorCode)?.schema.$defs.ErrorCode.enum ?? [];
  const errorCodes = [...specCodes];
  for (const c of pending.errorCodes ?? []) if (!errorCodes.includes(c)) errorCodes.push(c);
  return { files, commands, pushes, envelope, errorCodes, specCodes, specDir };
}

#!/usr/bin/env node
// Generates src/generated/spec.ts — a TypeScript type for every JSON Schema
// definition under the repository's spec/v1/schemas, plus maps from each
// command and push type (spec/v1/commands.json) to its payload types — so the
// client's frame types are derived from the contract and cannot drift from it.
//
// Definitions the lifecycle work (issue #15) adds and spec/ does not have yet
// come from spec-pending/lifecycle.json in this package; a definition, command,
// push or error code that spec/ itself defines always wins over the pending
// copy, so once spec/ carries them the pending file changes nothing.
//
//   node scripts/gen-types.mjs           write src/generated/spec.ts
//   node scripts/gen-types.mjs --check   exit 1 if the file differs from spec/
//
// RUNGATE_SPEC_DIR overrides where spec/ is (default: ../../spec).
// Handles the subset of JSON Schema 2020-12 the spec uses; anything else
// fails the generation loudly instead of becoming a silent `unknown`.

import { readFileSync, writeFileSync, readdirSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const pkg = resolve(here, "..");
const specDir = resolve(process.env.RUNGATE_SPEC_DIR ?? join(pkg, "..", "..", "spec"));
const out = join(pkg, "src", "generated", "spec.ts");
const pendingFile = join(pkg, "spec-pending", "lifecycle.json");

function walk(dir) {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    return statSync(p).isDirectory() ? walk(p) : p.endsWith(".json") ? [p] : [];
  });
}

/** Every schema file by $id. */
const files = new Map();
for (const path of walk(join(specDir, "v1", "schemas")).sort()) {
  const schema = JSON.parse(readFileSync(path, "utf8"));
  files.set(schema.$id, { schema, path, pending: false });
}
const index = JSON.parse(readFileSync(join(specDir, "v1", "commands.json"), "utf8"));
const pending = JSON.parse(readFileSync(pendingFile, "utf8"));

// TypeScript names for definitions whose own name would shadow a global or
// read badly as a type.
const RENAME = { Request: "RequestFrame", Reply: "ReplyFrame", Error: "ErrorFrame", Push: "PushFrame" };
const pascal = (s) => RENAME[s] ?? s.charAt(0).toUpperCase() + s.slice(1);

/** `$id#/$defs/Name` -> TS name; filled in one pass so refs resolve in any order. */
const names = new Map();
const taken = new Map();
function claim(key, name) {
  if (taken.has(name)) throw new Error(`two definitions would both be named ${name}: ${taken.get(name)} and ${key}`);
  taken.set(name, key);
  names.set(key, name);
}
for (const [id, { schema }] of files) {
  for (const def of Object.keys(schema.$defs ?? {})) claim(`${id}#/$defs/${def}`, pascal(def));
}
// Pending definitions that spec/ does not have under the same name.
const pendingDefs = {};
for (const [def, body] of Object.entries(pending.$defs ?? {})) {
  if (taken.has(pascal(def))) continue;
  pendingDefs[def] = body;
  claim(`${pending.$id}#/$defs/${def}`, pascal(def));
}
files.set(pending.$id, { schema: { ...pending, $defs: pendingDefs }, path: pendingFile, pending: true });

function refName(ref, base) {
  const url = new URL(ref, base);
  const key = `${url.origin}${url.pathname}${decodeURIComponent(url.hash)}`;
  const name = names.get(key);
  if (!name) throw new Error(`unresolved $ref ${ref} (from ${base})`);
  return name;
}

const HANDLED = new Set([
  "$ref", "type", "properties", "required", "additionalProperties", "items", "enum", "const",
  "oneOf", "anyOf", "description", "title", "$comment", "default", "minimum", "maximum",
  "minLength", "maxLength", "pattern", "format", "minItems", "maxItems", "not", "examples",
]);

function lit(v) {
  return JSON.stringify(v);
}

function doc(text, indent) {
  if (!text) return "";
  const lines = String(text).replace(/\*\//g, "*\\/").split("\n");
  return `${indent}/** ${lines.join(`\n${indent} * `)} */\n`;
}

function ts(schema, base, indent) {
  if (schema === true || schema === undefined) return "JsonValue";
  if (schema === false) return "never";
  for (const k of Object.keys(schema)) {
    if (!HANDLED.has(k)) throw new Error(`unsupported schema keyword ${k} in ${base}`);
  }
  if (schema.$ref) return refName(schema.$ref, base);
  if ("const" in schema) return lit(schema.const);
  if (schema.enum) return schema.enum.map(lit).join(" | ");
  const alts = schema.oneOf ?? schema.anyOf;
  if (alts) return alts.map((s) => ts(s, base, indent)).join(" | ");
  const type = schema.type;
  if (Array.isArray(type)) return type.map((t) => ts({ ...schema, type: t }, base, indent)).join(" | ");
  switch (type) {
    case undefined:
      return "JsonValue";
    case "string":
      return "string";
    case "integer":
    case "number":
      return "number";
    case "boolean":
      return "boolean";
    case "null":
      return "null";
    case "array":
      return `Array<${ts(schema.items, base, indent)}>`;
    case "object": {
      const props = schema.properties ?? {};
      const required = new Set(schema.required ?? []);
      const inner = `${indent}  `;
      const lines = Object.entries(props).map(([name, s]) => {
        const key = /^[A-Za-z_$][A-Za-z0-9_$]*$/.test(name) ? name : lit(name);
        return `${doc(s.description, inner)}${inner}${key}${required.has(name) ? "" : "?"}: ${ts(s, base, inner)};`;
      });
      const extra = schema.additionalProperties;
      if (extra !== false && (extra !== undefined || lines.length === 0)) {
        const value = extra === true || extra === undefined ? "JsonValue" : ts(extra, base, inner);
        // An index signature must admit every declared member's type too.
        lines.push(`${inner}[key: string]: ${lines.length ? "JsonValue" : value};`);
      }
      if (lines.length === 0) return "Record<string, never>";
      return `{\n${lines.join("\n")}\n${indent}}`;
    }
    default:
      throw new Error(`unsupported type ${type} in ${base}`);
  }
}

let text = `// Generated by scripts/gen-types.mjs from the repository's spec/ (and
// spec-pending/ for definitions spec/ does not have yet). Do not edit:
// change spec/ and run \`npm run gen\`. A test fails when this file and spec/
// disagree.

/** Any JSON value. */
export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };
`;

for (const [id, { schema, pending: isPending }] of files) {
  const defs = Object.entries(schema.$defs ?? {});
  if (!defs.length) continue;
  const rel = id.replace(/^https:\/\/agent-service\.spec\//, "");
  text += `\n// ---- ${isPending ? "spec-pending/lifecycle.json (not in spec/ yet)" : rel}\n`;
  for (const [def, body] of defs) {
    text += `\n${doc(body.description, "")}export type ${pascal(def)} = ${ts(body, id, "")};\n`;
  }
}

// The index: command and push types to their payload types.
const base = index.$id;
const commands = { ...index.commands };
for (const [k, v] of Object.entries(pending.commands ?? {})) if (!(k in commands)) commands[k] = v;
const pushes = { ...index.pushes };
for (const [k, v] of Object.entries(pending.pushes ?? {})) if (!(k in pushes)) pushes[k] = v;
const pendingBase = new URL("commands.json", pending.$id).href;
const baseOf = (k, own) => (k in own ? base : pendingBase);

text += `\n// ---- v1/commands.json (the index)\n\n/** Each command type: its request and reply payloads, the capability it needs on /v1/runtime, and the endpoints offering it. */\nexport interface Commands {\n`;
for (const [type, c] of Object.entries(commands)) {
  const b = baseOf(type, index.commands);
  text += `  ${lit(type)}: {\n    request: ${refName(c.request, b)};\n    response: ${refName(c.response, b)};\n    capability: ${c.capability === null ? "null" : lit(c.capability)};\n    endpoints: ${c.endpoints.map(lit).join(" | ")};\n  };\n`;
}
text += `}\n\n/** Each push type and its payload. */\nexport interface Pushes {\n`;
for (const [type, p] of Object.entries(pushes)) {
  text += `  ${lit(type)}: ${refName(p.payload, baseOf(type, index.pushes))};\n`;
}
text += `}\n\nexport type CommandType = keyof Commands;\nexport type PushType = keyof Pushes;\n`;
text += `\n/** The command types, for checks at run time. */\nexport const COMMAND_TYPES: readonly CommandType[] = ${JSON.stringify(Object.keys(commands))};\n`;
text += `\n/** The push types, for checks at run time. */\nexport const PUSH_TYPES: readonly PushType[] = ${JSON.stringify(Object.keys(pushes))};\n`;

const envelope = [...files.values()].find((f) => f.schema.$defs?.ErrorCode)?.schema;
const codes = [...envelope.$defs.ErrorCode.enum];
for (const c of pending.errorCodes ?? []) if (!codes.includes(c)) codes.push(c);
text += `\n/** Every protocol error code (ErrorCode${codes.length > envelope.$defs.ErrorCode.enum.length ? ", plus pending ones" : ""}). */\nexport type ProtocolErrorCode = ${codes.map(lit).join(" | ")};\n`;
text += `\n/** The error codes, for checks at run time. */\nexport const ERROR_CODES: readonly ProtocolErrorCode[] = ${JSON.stringify(codes)};\n`;

if (process.argv.includes("--check")) {
  let current = "";
  try {
    current = readFileSync(out, "utf8");
  } catch {}
  if (current !== text) {
    console.error(`${out} is out of date with ${specDir}: run \`npm run gen\``);
    process.exit(1);
  }
  console.log(`${out} matches ${specDir}`);
} else {
  writeFileSync(out, text);
  console.log(`wrote ${out}`);
}

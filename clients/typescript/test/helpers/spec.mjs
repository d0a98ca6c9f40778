// Validates real frames against the repository's spec/ (JSON Schema 2020-12,
// formats asserted), the way tests/common/schema.rs does for the Rust side:
// the envelope for the frame's direction, then the payload against the
// definition spec/v1/commands.json names for its type, read as the type
// generator reads it (scripts/spec-source.mjs).
import Ajv2020 from "ajv/dist/2020.js";
import addFormats from "ajv-formats";
import { loadSpec as loadSources } from "../../scripts/spec-source.mjs";

export function loadSpec() {
  const src = loadSources();
  const ajv = new Ajv2020({ strict: false, allErrors: false });
  addFormats(ajv);
  for (const { schema } of src.files.values()) ajv.addSchema(schema);
  const commands = {};
  for (const [k, v] of Object.entries(src.commands)) commands[k] = { req: v.request, res: v.response };
  const pushes = {};
  for (const [k, v] of Object.entries(src.pushes)) pushes[k] = v.payload;
  const codes = new Set(src.errorCodes);
  const check = (ref, value, what) => {
    const v = ajv.getSchema(ref);
    if (!v) return `${what}: no schema ${ref}`;
    return v(value) ? null : `${what}: ${ajv.errorsText(v.errors)} in ${JSON.stringify(value).slice(0, 300)}`;
  };
  return { ajv, commands, pushes, env: src.envelope, codes, check };
}

/**
 * A FrameObserver for the clients that checks every frame against spec/ and
 * keeps what failed. Replies are checked against the response of the request
 * they answer (matched by id per socket direction).
 */
export function frameChecker() {
  const spec = loadSpec();
  const sent = new Map();
  const problems = [];
  const counts = { out: 0, in: 0, pushes: {} };
  const observe = (direction, frame) => {
    if (direction === "out") {
      counts.out += 1;
      const p = spec.check(spec.env.request, frame, "request envelope");
      if (p) problems.push(p);
      const c = spec.commands[frame.type];
      if (!c) problems.push(`request of unknown type ${frame.type}`);
      else {
        const q = spec.check(c.req, frame.payload, `${frame.type} request`);
        if (q) problems.push(q);
        sent.set(frame.id, frame.type);
      }
      return;
    }
    counts.in += 1;
    if (frame.type === "reply") {
      const p = spec.check(spec.env.reply, frame, "reply envelope");
      if (p) problems.push(p);
      const type = sent.get(frame.id);
      if (type) {
        const q = spec.check(spec.commands[type].res, frame.payload, `${type} reply`);
        if (q) problems.push(q);
      }
    } else if (frame.type === "error") {
      const p = spec.check(spec.env.error, frame, "error envelope");
      if (p) problems.push(p);
    } else {
      const p = spec.check(spec.env.push, frame, "push envelope");
      if (p) problems.push(p);
      counts.pushes[frame.type] = (counts.pushes[frame.type] ?? 0) + 1;
      const ref = spec.pushes[frame.type];
      if (ref) {
        const q = spec.check(ref, frame.payload, `${frame.type} push`);
        if (q) problems.push(q);
      }
    }
  };
  return { observe, problems, counts };
}

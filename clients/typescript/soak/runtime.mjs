// A soak runtime on @rungate/client (../dist, built by `npm run build`), for
// `rungate-loadgen soak --ts-runtimes N`: one RuntimeClient holds one run and
// publishes `--batch` events at a time at `--rate` events per second, one
// publish after another, each event's data {p, n, f: false, pad}.
//
//   node soak/runtime.mjs --url ws://HOST:PORT --run RUN --p P \
//     [--rate 4] [--batch 1] [--pad-bytes 64] [--instance ID]     (token: env RUNGATE_TOKEN)
//
// Stdout is the soak's record, one line each:
//   ack FIRST LAST MICROS   the gateway stored counters FIRST..=LAST (round trip in µs)
//   error KIND              a publish or attach failed (KIND: the error code)
//   reattach                the session ended (lease ran out) and was attached afresh
// Diagnostics go to stderr. It survives cuts, stalls and gateway restarts by
// the client's own reconnects and resends, never by retrying a publish
// itself. SIGTERM or stdin closing stops it: the publish in flight gets up to
// 15 s to be answered, then it exits 0. Owns pacing and reporting only; it
// must not judge what it published (the soak's checker does).

import { RuntimeClient, isRungateError } from "../dist/index.js";

function parseArgs(argv) {
  const args = { rate: 4, batch: 1, padBytes: 64 };
  const names = { "--url": "url", "--run": "run", "--p": "p", "--rate": "rate", "--batch": "batch", "--pad-bytes": "padBytes", "--instance": "instance" };
  for (let i = 0; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (key === undefined || argv[i + 1] === undefined) throw new Error(`unknown or incomplete argument ${argv[i]}`);
    args[key] = argv[i + 1];
  }
  for (const k of ["url", "run", "p"]) if (args[k] === undefined) throw new Error(`--${k} is required`);
  return { ...args, p: Number(args.p), rate: Number(args.rate), batch: Math.max(1, Number(args.batch)), padBytes: Number(args.padBytes) };
}

const args = parseArgs(process.argv.slice(2));
const token = process.env.RUNGATE_TOKEN;
if (!token) throw new Error("RUNGATE_TOKEN is not set");

let stopping = false;
let stopped;
const onStop = new Promise((resolve) => (stopped = resolve));
const stop = () => {
  stopping = true;
  stopped();
};
process.on("SIGTERM", stop);
process.stdin.on("end", stop);
process.stdin.on("error", stop);
process.stdin.resume();

const say = (line) => process.stdout.write(`${line}\n`);
const kind = (e) => (isRungateError(e) ? e.code : String(e?.message ?? e).slice(0, 40));
const timer = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
/** Waits `ms`, or less if the runtime is told to stop. */
const sleep = (ms) => Promise.race([timer(ms), onStop]);

const client = new RuntimeClient({
  url: args.url,
  token,
  runtimeInstanceId: args.instance ?? `soak-ts-${args.run}`,
  requestTimeoutMs: 30_000,
  backoff: { initialMs: 100, maxMs: 2000 },
});

/** The run's session, attached again until it works or the runtime stops. */
async function attached() {
  while (!stopping) {
    try {
      // A stop does not wait for an attach (up to requestTimeoutMs).
      const session = await Promise.race([client.attach(args.run), onStop.then(() => null)]);
      if (session !== null) return session;
    } catch (e) {
      say(`error attach: ${kind(e)}`);
      await sleep(500);
    }
  }
  return null;
}

const pad = "x".repeat(args.padBytes);
const everyMs = (args.batch / Math.max(args.rate, 0.001)) * 1000;
let session = await attached();
let n = 0;
let next = Date.now();
while (session !== null && !stopping) {
  next = Math.max(next + everyMs, Date.now());
  await sleep(next - Date.now());
  if (stopping) break;
  const first = n + 1;
  const events = [];
  for (let k = first; k < first + args.batch; k++) {
    events.push({ type: "soak", data: { p: args.p, n: k, f: false, pad } });
  }
  n += args.batch;
  const t0 = process.hrtime.bigint();
  const outcome = session.publish(events).then(
    () => null,
    (e) => e,
  );
  // A stop waits at most 15 s more for the publish in flight.
  const error = await Promise.race([outcome, onStop.then(() => timer(15_000)).then(() => "abandoned")]);
  if (error === "abandoned") {
    process.stderr.write("runtime: stopped with a publish unanswered\n");
    break;
  }
  if (error === null) {
    say(`ack ${first} ${n} ${(process.hrtime.bigint() - t0) / 1000n}`);
  } else {
    say(`error publish: ${kind(error)}`);
    if (session.endedWith !== null) {
      // The session is over (its lease ran out in an outage): a new
      // session of the same run; the stream goes on.
      session = await attached();
      if (session !== null) say("reattach");
    }
  }
}
await Promise.race([client.close(), timer(5000)]);
process.exit(0);

//! `RuntimeClient`: one runtime's persistent socket on `/v1/runtime`, kept
//! alive across network failures, and the `RunSession`s attached through it.
//!
//! The client owns all mutable state — runs attached (the first is the main
//! run), requests in flight, publishes and finishes not yet acknowledged —
//! and one supervisor loop that (re)connects. It:
//!
//! - matches replies to requests by id (replies may come in any order);
//! - heartbeats every run at the interval the gateway gave in its attach reply;
//! - on a lost socket, reconnects with backoff, attaches the main run again
//!   with `reconnect: true` and a higher `connectionEpoch`, moves the sub-runs
//!   with `runtime.recoverConnections` (dropping, one by one, any the gateway
//!   refuses by name), then resends every unacknowledged publish and finish in
//!   its original order;
//! - numbers every published event with a per-run `seq`, so a resent batch is
//!   stored once: a network cut loses nothing and duplicates nothing;
//! - gives up a socket that delivers nothing while answers are owed (a stalled
//!   or black-holed link sends no FIN).
//!
//! Requests other than publish and finish that were sent but not answered
//! when the socket dropped fail with CONNECTION_LOST (they may have been
//! applied); those not yet sent wait for the next connection. Must not know
//! gateway internals: only frames.

import { Backoff, type BackoffOptions } from "./backoff.js";
import { RungateError } from "./errors.js";
import type {
  CheckpointLoadResponse,
  CheckpointSaveResponse,
  JsonValue,
  OutputEvent,
  RunOutcome,
  RuntimeCapability,
  RuntimeFinishResponse,
} from "./generated/spec.js";
import { endpointUrl, type FrameObserver, type Incoming, Link, type TokenSource, tokenFor } from "./link.js";

export interface RuntimeClientOptions {
  /** `ws://HOST:PORT` (the path defaults to `/v1/runtime`) or the full endpoint URL. */
  url: string;
  /** A runtime token covering the runs this client attaches (or `tokenSource`). */
  token?: string;
  /** Asked for a token at every connection, so the client outlives any one token. */
  tokenSource?: TokenSource;
  /** This runtime's identity; a reconnect presents the same one. Default: random. */
  runtimeInstanceId?: string;
  /** Longest a call waits for its answer, ms (default 30000). */
  requestTimeoutMs?: number;
  /** Longest one connection attempt may take, ms (default 10000). */
  connectTimeoutMs?: number;
  backoff?: BackoffOptions;
  /** Sees every frame sent and received. */
  onFrame?: FrameObserver;
}

export interface AttachOptions {
  /** Capabilities the session asks for; the token must allow them all. */
  capabilities?: RuntimeCapability[];
  attemptId?: string;
}

/** An event to publish: the client adds `seq`. */
export type PublishEvent = Omit<OutputEvent, "seq">;

/** Things that happened to the connection or a session. */
export type RuntimeEvent =
  | { type: "connected"; epoch: number }
  | { type: "disconnected"; code: number; reason: string }
  | { type: "reconnected"; epoch: number }
  | { type: "draining"; reconnectAfterMs: number }
  /** Another connection took the run over with a higher epoch; its unacknowledged publishes failed (STALE_EPOCH). */
  | { type: "superseded"; runId: string; connectionEpoch: number | null }
  /** The run's lease ran out; its unacknowledged publishes failed (SESSION_EXPIRED). */
  | { type: "expired"; runId: string }
  /** After a reconnect the gateway no longer knew the session, so the run was attached afresh. */
  | { type: "renewed"; runId: string; sessionId: string }
  /** The run ended (finished here, or reported RUN_ENDED by the gateway). */
  | { type: "ended"; runId: string; outcome: RunOutcome | null }
  | { type: "cancelRequested"; runId: string; reason: string | null; requestedAt: string }
  /** The gateway refused this client's token at a reconnect; every session was dropped. */
  | { type: "failed"; error: RungateError }
  | { type: "closed" };

export type ConnectionState = "idle" | "connecting" | "connected" | "reconnecting" | "closed";

export interface CancelRequest {
  runId: string;
  reason: string | null;
  requestedAt: string;
}

export interface Checkpoint {
  checkpointId: string;
  savedAt: string;
  data: JsonValue;
}

type Resolve<T> = (v: T) => void;
type Reject = (e: RungateError) => void;

interface RunState {
  runId: string;
  sessionId: string;
  capabilities: RuntimeCapability[];
  attemptId: string | undefined;
  /** The `seq` the next published event gets. */
  nextSeq: number;
  session: RunSession;
  cancel: CancelRequest | null;
  cancelListeners: Set<(c: CancelRequest) => void>;
}

/** A publish or finish not yet acknowledged: resent in order after a reconnect. */
interface Outgoing {
  type: "events.publish" | "runtime.finish";
  id: string | null;
  runId: string;
  payload: Record<string, JsonValue>;
  resolve: Resolve<Record<string, unknown>>;
  reject: Reject;
}

type Pending =
  | { kind: "call"; runId: string; resolve: Resolve<Record<string, unknown>>; reject: Reject; timer: ReturnType<typeof setTimeout> }
  | { kind: "outgoing"; out: Outgoing }
  | { kind: "heartbeat"; runId: string }
  | { kind: "attach"; op: AttachOp; takeOver: boolean; tries: number }
  | { kind: "internal"; resolve: Resolve<Incoming | null> };

interface AttachOp {
  runId: string;
  capabilities: RuntimeCapability[];
  attemptId: string | undefined;
  resolve: Resolve<RunSession>;
  reject: Reject;
  done: boolean;
}

let instanceCounter = 0;

function randomId(): string {
  const c = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
  if (c?.randomUUID) return c.randomUUID();
  instanceCounter += 1;
  return `rt-${Date.now().toString(36)}-${instanceCounter}-${Math.random().toString(36).slice(2)}`;
}

/**
 * A runtime's connection to the gateway. Connects on the first `attach`;
 * every run session attached through it shares its socket.
 */
export class RuntimeClient {
  readonly runtimeInstanceId: string;
  private readonly url: string;
  private readonly options: RuntimeClientOptions;
  private readonly requestTimeoutMs: number;
  private readonly connectTimeoutMs: number;
  private readonly backoff: Backoff;

  private link: Link | null = null;
  /** True once the current link has its sessions restored and its outbox resent. */
  private ready = false;
  private supervising = false;
  private closedForGood = false;
  private linkClosed: (() => void) | null = null;
  private epoch: number;
  private everConnected = false;
  private nextId = 0;
  private readonly runs = new Map<string, RunState>();
  /** Runs whose session ended, and the error later calls get. */
  private readonly gone = new Map<string, RungateError>();
  private readonly pending = new Map<string, Pending>();
  private readonly outbox: Outgoing[] = [];
  private waiting: Array<() => void> = [];
  private readonly attaching = new Map<string, Promise<RunSession>>();
  private readonly listeners = new Set<(e: RuntimeEvent) => void>();
  private heartbeatTimer: ReturnType<typeof setInterval> | null = null;
  private heartbeatEveryMs: number | null = null;
  private silenceTimer: ReturnType<typeof setInterval> | null = null;
  private lastHeard = 0;
  private owedSince = 0;
  private notBefore = 0;
  private state_: ConnectionState = "idle";
  private wake: (() => void) | null = null;

  constructor(options: RuntimeClientOptions) {
    if (options.token === undefined && options.tokenSource === undefined) {
      throw new TypeError("RuntimeClient needs token or tokenSource");
    }
    this.options = options;
    this.url = endpointUrl(options.url, "/v1/runtime");
    this.runtimeInstanceId = options.runtimeInstanceId ?? randomId();
    this.requestTimeoutMs = options.requestTimeoutMs ?? 30_000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    this.backoff = new Backoff(options.backoff);
    // The wall clock in ms: a restarted process of the same runtime instance
    // starts above every epoch its predecessor used (each reconnect adds one),
    // so it can take its sessions over and fence the predecessor off.
    this.epoch = Math.max(1, Date.now());
  }

  /** The connection as it stands. */
  get state(): ConnectionState {
    return this.state_;
  }

  /** The `connectionEpoch` of the current (or next) connection. */
  get connectionEpoch(): number {
    return this.epoch;
  }

  /** Listens to connection and session events; returns the unsubscribe function. */
  on(listener: (e: RuntimeEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private emit(e: RuntimeEvent): void {
    for (const l of [...this.listeners]) {
      try {
        l(e);
      } catch {
        // a listener's failure is its own
      }
    }
  }

  /**
   * Attaches `runId` and returns its session. The first run attached is the
   * main run; later ones are its sub-runs (see `RunSession.subRun`). A run the
   * same runtime instance already holds elsewhere (a predecessor process) is
   * taken over with a higher epoch.
   */
  attach(runId: string, options: AttachOptions = {}): Promise<RunSession> {
    if (this.closedForGood) return Promise.reject(closedError());
    const held = this.runs.get(runId);
    if (held) return Promise.resolve(held.session);
    const inFlight = this.attaching.get(runId);
    if (inFlight) return inFlight;
    const promise = new Promise<RunSession>((resolve, reject) => {
      const op: AttachOp = {
        runId,
        capabilities: [...(options.capabilities ?? [])],
        attemptId: options.attemptId,
        resolve: (s) => {
          op.done = true;
          clearTimeout(timer);
          resolve(s);
        },
        reject: (e) => {
          op.done = true;
          clearTimeout(timer);
          reject(e);
        },
        done: false,
      };
      const timer = setTimeout(
        () => op.reject(new RungateError("TIMEOUT", `no answer to attach ${runId} within ${this.requestTimeoutMs} ms`, { retryable: true })),
        this.requestTimeoutMs,
      );
      this.whenReady(() => this.sendAttach(op, false, 0));
    }).finally(() => this.attaching.delete(runId));
    this.attaching.set(runId, promise);
    return promise;
  }

  /** Closes the socket. Unacknowledged publishes and pending calls fail with CLOSED. */
  async close(): Promise<void> {
    if (this.closedForGood) return;
    this.closedForGood = true;
    this.setState("closed");
    this.stopTimers();
    const err = closedError();
    for (const [, p] of this.pending) this.failPending(p, err);
    this.pending.clear();
    for (const out of this.outbox.splice(0)) out.reject(err);
    const waiting = this.waiting;
    this.waiting = [];
    for (const w of waiting) w(); // each re-checks closedForGood and fails
    this.link?.close(1000, "client closed", true);
    this.link = null;
    this.ready = false;
    this.linkClosed?.();
    this.wake?.();
    this.emit({ type: "closed" });
  }

  // ------------------------------------------------------------ internals

  private setState(s: ConnectionState): void {
    this.state_ = s;
  }

  private id(): string {
    this.nextId += 1;
    return `c${this.nextId}`;
  }

  /** Runs `fn` now if the socket is ready, else once it is; starts connecting. */
  private whenReady(fn: () => void): void {
    if (this.closedForGood) {
      fn();
      return;
    }
    if (this.ready && this.link?.open) {
      fn();
      return;
    }
    this.waiting.push(fn);
    this.supervise();
  }

  private needsConnection(): boolean {
    return this.runs.size > 0 || this.waiting.length > 0 || this.outbox.length > 0;
  }

  /** The connect/reconnect loop; one at a time. */
  private supervise(): void {
    if (this.supervising || this.closedForGood) return;
    this.supervising = true;
    void this.superviseLoop().finally(() => {
      this.supervising = false;
    });
  }

  private async superviseLoop(): Promise<void> {
    let attempt = 0;
    while (!this.closedForGood) {
      if (!this.link) {
        if (!this.needsConnection()) {
          this.setState("idle");
          return;
        }
        const delay = attempt > 0 ? this.backoff.delay(attempt - 1) : 0;
        const wakeAt = Math.max(Date.now() + delay, this.notBefore);
        if (wakeAt > Date.now()) await this.pause(wakeAt - Date.now());
        if (this.closedForGood) return;
        this.setState(this.everConnected ? "reconnecting" : "connecting");
        let link: Link;
        try {
          const token = await tokenFor(this.options.token, this.options.tokenSource);
          link = await Link.connect(
            this.url,
            token,
            this.connectTimeoutMs,
            { onFrame: (f) => this.onFrame(link, f), onClose: (c, r) => this.onLinkClose(link, c, r) },
            this.options.onFrame,
          );
        } catch (e) {
          const err = asError(e);
          if (!err.retryable) {
            this.refused(err);
            return;
          }
          attempt += 1;
          continue;
        }
        if (this.closedForGood) {
          link.close(1000, "client closed", true);
          return;
        }
        this.link = link;
        this.lastHeard = Date.now();
        if (this.everConnected) this.epoch += 1;
        const restored = await this.restore(link);
        if (!restored || this.link !== link) {
          if (this.link === link) {
            link.abandon({ onFrame: () => {}, onClose: (c, r) => this.onLinkClose(link, c, r) });
          }
          attempt += 1;
          continue;
        }
        attempt = 0;
        this.ready = true;
        this.setState("connected");
        this.emit(this.everConnected ? { type: "reconnected", epoch: this.epoch } : { type: "connected", epoch: this.epoch });
        this.everConnected = true;
        this.startTimers();
        const waiting = this.waiting;
        this.waiting = [];
        for (const w of waiting) w();
      }
      // Wait for this link to close.
      await new Promise<void>((resolve) => {
        if (!this.link) resolve();
        else this.linkClosed = resolve;
      });
      this.linkClosed = null;
    }
  }

  private pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.wake = null;
        resolve();
      }, ms);
      this.wake = () => {
        clearTimeout(t);
        this.wake = null;
        resolve();
      };
    });
  }

  /** The gateway refused the token: nothing can be restored. */
  private refused(err: RungateError): void {
    for (const runId of [...this.runs.keys()]) this.sessionGone(runId, "refused", err);
    for (const out of this.outbox.splice(0)) out.reject(err);
    const waiting = this.waiting;
    this.waiting = [];
    this.failNextSends = err;
    for (const w of waiting) w();
    this.failNextSends = null;
    this.setState("idle");
    this.emit({ type: "failed", error: err });
  }

  /** While set, operations run from the waiting list fail with it instead of sending. */
  private failNextSends: RungateError | null = null;

  private onLinkClose(link: Link, code: number, reason: string): void {
    if (this.link !== link) return;
    this.lost(code, reason);
  }

  /** The socket is gone: answer what cannot be resent, keep the rest. */
  private lost(code: number, reason: string): void {
    if (!this.link) return;
    this.link = null;
    this.ready = false;
    this.stopTimers();
    this.emit({ type: "disconnected", code, reason });
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      switch (p.kind) {
        case "call":
          clearTimeout(p.timer);
          p.reject(new RungateError("CONNECTION_LOST", "the connection was lost before the answer came; the request may have been applied", { retryable: true }));
          break;
        case "attach":
          if (!p.op.done) this.waiting.push(() => this.sendAttach(p.op, false, 0));
          break;
        case "internal":
          p.resolve(null);
          break;
        case "outgoing":
        case "heartbeat":
          break; // outgoing stays in the outbox; heartbeats are sent again anyway
      }
    }
    for (const out of this.outbox) out.id = null;
    this.linkClosed?.();
    if (!this.supervising) this.supervise();
  }

  private send(link: Link, id: string, type: string, payload: object): void {
    if (this.pending.size === 1 && this.pending.has(id)) this.owedSince = Date.now();
    if (!link.send(id, type, payload)) {
      // The close handler reports the loss; make sure it does.
      this.onLinkClose(link, 1006, "send failed");
    }
  }

  private startTimers(): void {
    this.stopTimers();
    this.scheduleHeartbeats();
    // A socket that delivers nothing while answers are owed is given up after
    // twice the heartbeat interval, and never sooner than the request timeout.
    this.silenceTimer = setInterval(() => {
      const link = this.link;
      if (!link || this.pending.size === 0) return;
      const patience = Math.max(this.requestTimeoutMs, 2 * (this.heartbeatEveryMs ?? 10_000));
      if (Date.now() - Math.max(this.lastHeard, this.owedSince) > patience) {
        link.abandon({ onFrame: () => {}, onClose: (c, r) => this.onLinkClose(link, c, r) });
      }
    }, Math.min(1000, Math.max(100, this.requestTimeoutMs / 4)));
  }

  private scheduleHeartbeats(): void {
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
    if (this.heartbeatEveryMs === null || this.runs.size === 0) return;
    this.heartbeatTimer = setInterval(() => this.sendHeartbeats(), this.heartbeatEveryMs);
  }

  private stopTimers(): void {
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    if (this.silenceTimer) clearInterval(this.silenceTimer);
    this.heartbeatTimer = null;
    this.silenceTimer = null;
  }

  private sendHeartbeats(): void {
    const link = this.link;
    if (!link || !this.ready) return;
    for (const run of this.runs.values()) {
      const id = this.id();
      this.pending.set(id, { kind: "heartbeat", runId: run.runId });
      this.send(link, id, "runtime.heartbeat", { sessionId: run.sessionId, runId: run.runId });
    }
  }

  private attachPayload(runId: string, caps: RuntimeCapability[], attemptId: string | undefined, reconnect: boolean): Record<string, JsonValue> {
    const p: Record<string, JsonValue> = {
      runId,
      runtimeInstanceId: this.runtimeInstanceId,
      protocolVersion: "1",
      connectionEpoch: this.epoch,
      capabilities: caps,
    };
    if (attemptId !== undefined) p["attemptId"] = attemptId;
    if (reconnect) p["reconnect"] = true;
    return p;
  }

  private sendAttach(op: AttachOp, takeOver: boolean, tries: number): void {
    if (op.done) return;
    if (this.closedForGood) return op.reject(closedError());
    if (this.failNextSends) return op.reject(this.failNextSends);
    const held = this.runs.get(op.runId);
    if (held) return op.resolve(held.session);
    const link = this.link;
    if (!link || !this.ready) {
      this.waiting.push(() => this.sendAttach(op, takeOver, tries));
      this.supervise();
      return;
    }
    const id = this.id();
    this.pending.set(id, { kind: "attach", op, takeOver, tries });
    this.send(link, id, "runtime.attach", this.attachPayload(op.runId, op.capabilities, op.attemptId, takeOver));
  }

  /** Sends a command on an attached run; `sessionId` and `runId` are added. */
  call(runId: string, type: string, payload: Record<string, JsonValue>): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      let settled = false;
      const timer = setTimeout(() => {
        settled = true;
        reject(new RungateError("TIMEOUT", `no answer to ${type} within ${this.requestTimeoutMs} ms`, { retryable: true }));
      }, this.requestTimeoutMs);
      const res: Resolve<Record<string, unknown>> = (v) => {
        clearTimeout(timer);
        if (!settled) resolve(v);
        settled = true;
      };
      const rej: Reject = (e) => {
        clearTimeout(timer);
        if (!settled) reject(e);
        settled = true;
      };
      const go = (): void => {
        if (settled) return;
        if (this.closedForGood) return rej(closedError());
        if (this.failNextSends) return rej(this.failNextSends);
        const run = this.runs.get(runId);
        if (!run) return rej(this.noSession(runId));
        const link = this.link;
        if (!link || !this.ready) {
          this.waiting.push(go);
          this.supervise();
          return;
        }
        const id = this.id();
        this.pending.set(id, { kind: "call", runId, resolve: res, reject: rej, timer });
        this.send(link, id, type, { ...payload, sessionId: run.sessionId, runId });
      };
      this.whenReady(go);
    });
  }

  private noSession(runId: string): RungateError {
    return this.gone.get(runId) ?? new RungateError("NO_SESSION", `run ${runId} is not attached through this client`);
  }

  /** Queues a publish or finish (in order after every earlier one) and sends it if the socket is ready. */
  enqueue(runId: string, type: Outgoing["type"], body: Record<string, JsonValue>): Promise<Record<string, unknown>> {
    if (this.closedForGood) return Promise.reject(closedError());
    const run = this.runs.get(runId);
    if (!run) return Promise.reject(this.noSession(runId));
    return new Promise((resolve, reject) => {
      const out: Outgoing = {
        type,
        id: null,
        runId,
        payload: { sessionId: run.sessionId, runId, ...body },
        resolve,
        reject,
      };
      this.outbox.push(out);
      if (this.ready && this.link?.open) this.sendOutgoing(this.link, out);
      else this.supervise();
    });
  }

  /** Numbers `events` with the run's next `seq`s. */
  numbered(runId: string, events: PublishEvent[]): OutputEvent[] | null {
    const run = this.runs.get(runId);
    if (!run) return null;
    return events.map((e) => {
      const seq = run.nextSeq;
      run.nextSeq += 1;
      return { ...e, seq };
    });
  }

  private sendOutgoing(link: Link, out: Outgoing): void {
    const id = this.id();
    out.id = id;
    this.pending.set(id, { kind: "outgoing", out });
    this.send(link, id, out.type, out.payload);
  }

  /** Sends one request during restore and waits for its answer; null if the socket failed or went silent. */
  private exchange(link: Link, type: string, payload: object): Promise<Incoming | null> {
    return new Promise((resolve) => {
      const id = this.id();
      const timer = setTimeout(() => {
        if (this.pending.delete(id)) resolve(null);
      }, this.requestTimeoutMs);
      this.pending.set(id, {
        kind: "internal",
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v);
        },
      });
      this.send(link, id, type, payload);
    });
  }

  /** On a fresh socket: main run, sub-runs, then the outbox in order. False if the socket failed meanwhile. */
  private async restore(link: Link): Promise<boolean> {
    if (this.runs.size > 0 && !(await this.restoreSessions(link))) return false;
    if (this.link !== link) return false;
    for (const out of this.outbox) this.sendOutgoing(link, out);
    if (this.link !== link) return false;
    // Ready in the same turn as the outbox was sent, so a publish queued
    // right after it is sent at once, in order, not left behind.
    this.ready = true;
    return true;
  }

  private async restoreSessions(link: Link): Promise<boolean> {
    const main = [...this.runs.values()][0];
    if (!main) return true;
    const answer = await this.exchange(link, "runtime.attach", this.attachPayload(main.runId, main.capabilities, main.attemptId, true));
    if (!answer) return false;
    if (answer.kind === "error") {
      const e = answer.error;
      if (e.code === "SESSION_EXPIRED") {
        const renewed = await this.renew(link, main);
        if (renewed === null) return false;
        if (!renewed) {
          this.allSessionsGone("expired", e);
          return true;
        }
      } else if (e.retryable) {
        // Draining, rate limited, a storage hiccup: try again on another socket, keeping every session.
        return false;
      } else {
        // Without the main session its sub-runs cannot move either.
        const reason = e.code === "STALE_EPOCH" ? "superseded" : e.code === "RUN_ENDED" ? "ended" : "expired";
        this.allSessionsGone(reason, e);
        return true;
      }
    }
    for (;;) {
      const runs = [...this.runs.values()];
      const mainNow = runs[0];
      const subs = runs.slice(1).map((r) => r.runId);
      if (!mainNow || subs.length === 0) return true;
      const reply = await this.exchange(link, "runtime.recoverConnections", {
        sessionId: mainNow.sessionId,
        mainRunId: mainNow.runId,
        subRunIds: subs,
        connectionEpoch: this.epoch,
      });
      if (!reply) return false;
      if (reply.kind !== "error") return true;
      const e = reply.error;
      if (e.retryable) return false;
      // All or nothing: drop the sub-run the gateway named and try the rest;
      // without a name, none can move.
      const named = e.runId;
      if (named && subs.includes(named)) {
        const run = this.runs.get(named);
        let renewed = false;
        if (run && e.code === "SESSION_EXPIRED") {
          const r = await this.renew(link, run);
          if (r === null) return false;
          renewed = r;
        }
        if (!renewed) this.sessionGone(named, e.code === "RUN_ENDED" ? "ended" : e.code === "STALE_EPOCH" ? "superseded" : "expired", e);
      } else {
        for (const s of subs) this.sessionGone(s, "expired", e);
      }
    }
  }

  /** Attaches a run afresh after the gateway forgot its session; its outbox moves to the new session. */
  private async renew(link: Link, run: RunState): Promise<boolean | null> {
    const answer = await this.exchange(link, "runtime.attach", this.attachPayload(run.runId, run.capabilities, run.attemptId, false));
    if (!answer) return null;
    if (answer.kind !== "reply") return false;
    const sid = answer.payload["sessionId"];
    if (typeof sid !== "string") return false;
    run.sessionId = sid;
    for (const out of this.outbox) if (out.runId === run.runId) out.payload["sessionId"] = sid;
    this.emit({ type: "renewed", runId: run.runId, sessionId: sid });
    return true;
  }

  private allSessionsGone(reason: GoneReason, err: RungateError): void {
    for (const runId of [...this.runs.keys()]) this.sessionGone(runId, reason, err);
  }

  /** The run's session ended for good: forget it and fail what it still owed. */
  private sessionGone(runId: string, reason: GoneReason, cause: RungateError | null, extra?: { connectionEpoch?: number | null; outcome?: RunOutcome | null }): void {
    const run = this.runs.get(runId);
    if (!run) return;
    this.runs.delete(runId);
    const err =
      reason === "superseded"
        ? new RungateError("STALE_EPOCH", `run ${runId}: the session was taken over by another connection`, { details: { runId } })
        : reason === "ended"
          ? new RungateError("RUN_ENDED", `run ${runId} has ended`, { details: cause?.details ?? { runId } })
          : reason === "refused" && cause
            ? cause
            : new RungateError("SESSION_EXPIRED", `run ${runId}: the session's lease ran out`, { details: { runId } });
    this.gone.set(runId, err);
    run.session.markGone(err);
    for (let i = this.outbox.length - 1; i >= 0; i--) {
      const out = this.outbox[i];
      if (!out || out.runId !== runId) continue;
      // A finish of an ended run is idempotent: resending it gets the answer.
      // A publish already sent before the end gets its own answer.
      if (reason === "ended" && (out.type === "runtime.finish" || out.id !== null)) continue;
      this.outbox.splice(i, 1);
      if (out.id) this.pending.delete(out.id);
      out.reject(err);
    }
    if (this.runs.size === 0) this.scheduleHeartbeats();
    switch (reason) {
      case "superseded":
        this.emit({ type: "superseded", runId, connectionEpoch: extra?.connectionEpoch ?? null });
        break;
      case "ended":
        this.emit({ type: "ended", runId, outcome: extra?.outcome ?? outcomeOf(cause) });
        break;
      case "expired":
        this.emit({ type: "expired", runId });
        break;
      case "refused":
        break;
    }
  }

  private failPending(p: Pending, err: RungateError): void {
    switch (p.kind) {
      case "call":
        clearTimeout(p.timer);
        p.reject(err);
        break;
      case "attach":
        p.op.reject(err);
        break;
      case "internal":
        p.resolve(null);
        break;
      default:
        break;
    }
  }

  private onFrame(link: Link, frame: Incoming): void {
    if (this.link !== link) return;
    this.lastHeard = Date.now();
    switch (frame.kind) {
      case "reply":
      case "error": {
        if (frame.id === null) return; // a frame the gateway could not read: nothing to answer
        const p = this.pending.get(frame.id);
        if (!p) return;
        this.pending.delete(frame.id);
        this.answered(link, p, frame);
        return;
      }
      case "push":
        this.pushed(frame.type, frame.payload);
        return;
    }
  }

  private answered(link: Link, p: Pending, frame: Incoming & { kind: "reply" | "error" }): void {
    switch (p.kind) {
      case "internal":
        p.resolve(frame);
        return;
      case "heartbeat":
        if (frame.kind === "error") this.noteSessionError(frame.error, p.runId);
        return;
      case "call":
        clearTimeout(p.timer);
        if (frame.kind === "reply") p.resolve(frame.payload);
        else {
          this.noteSessionError(frame.error, p.runId);
          p.reject(frame.error);
        }
        return;
      case "outgoing": {
        const out = p.out;
        const at = this.outbox.indexOf(out);
        if (at >= 0) this.outbox.splice(at, 1);
        if (frame.kind === "reply") {
          if (out.type === "runtime.finish") {
            const outcome = out.payload["outcome"];
            const o = isOutcome(outcome) ? outcome : null;
            const wasMain = [...this.runs.keys()][0] === out.runId;
            this.sessionGone(out.runId, "ended", null, { outcome: o });
            // Finishing the main run ends its open sub-runs too (cancelled).
            if (wasMain) for (const sub of [...this.runs.keys()]) this.sessionGone(sub, "ended", null, { outcome: "cancelled" });
          }
          out.resolve(frame.payload);
        } else {
          this.noteSessionError(frame.error, out.runId);
          out.reject(frame.error);
        }
        return;
      }
      case "attach": {
        const { op, takeOver, tries } = p;
        if (frame.kind === "reply") {
          this.attached(op, frame.payload);
          return;
        }
        const e = frame.error;
        // Held by this instance already (a restarted process of the same
        // worker, or our own earlier send whose answer was lost): take it
        // over; this client's epoch is above any its predecessors used.
        if (!takeOver && tries < 2 && e.code === "CONFLICT") return this.sendAttach(op, true, tries + 1);
        // Nothing to take over after all: attach afresh.
        if (takeOver && tries < 2 && e.code === "SESSION_EXPIRED") return this.sendAttach(op, false, tries + 1);
        void link;
        op.reject(e);
        return;
      }
    }
  }

  private attached(op: AttachOp, payload: Record<string, unknown>): void {
    const sessionId = payload["sessionId"];
    const interval = payload["heartbeatIntervalMs"];
    if (typeof sessionId !== "string") {
      op.reject(new RungateError("BAD_REPLY", "runtime.attach answered without a sessionId"));
      return;
    }
    let run = this.runs.get(op.runId);
    if (run) {
      run.sessionId = sessionId;
    } else {
      const session = new RunSession(this, op.runId, {
        sessionId,
        heartbeatIntervalMs: typeof interval === "number" ? interval : 10_000,
        configVersion: typeof payload["configVersion"] === "string" ? payload["configVersion"] : null,
        leaseExpiresAt: typeof payload["leaseExpiresAt"] === "string" ? payload["leaseExpiresAt"] : null,
      });
      run = {
        runId: op.runId,
        sessionId,
        capabilities: op.capabilities,
        attemptId: op.attemptId,
        // The wall clock in µs: a restarted runtime continues above its
        // predecessor's seqs as long as it published fewer than a million
        // events a second on average since then.
        nextSeq: Date.now() * 1000,
        session,
        cancel: null,
        cancelListeners: new Set(),
      };
      this.runs.set(op.runId, run);
      this.gone.delete(op.runId);
    }
    if (this.heartbeatEveryMs === null && typeof interval === "number") {
      this.heartbeatEveryMs = interval;
    }
    if (!this.heartbeatTimer) this.scheduleHeartbeats();
    op.resolve(run.session);
  }

  /** A session-ending error on `runId` (or on the run the error names). */
  private noteSessionError(e: RungateError, runId: string): void {
    const run = e.runId ?? runId;
    if (e.code === "SESSION_EXPIRED") this.sessionGone(run, "expired", e);
    else if (e.code === "STALE_EPOCH") this.sessionGone(run, "superseded", e);
    else if (e.code === "RUN_ENDED") this.sessionGone(run, "ended", e);
  }

  private pushed(type: string, payload: Record<string, unknown>): void {
    const runId = typeof payload["runId"] === "string" ? payload["runId"] : null;
    const run = runId ? this.runs.get(runId) : undefined;
    const ours = run && payload["sessionId"] === run.sessionId;
    switch (type) {
      case "session.superseded":
        if (ours && runId) {
          const epoch = payload["connectionEpoch"];
          this.sessionGone(runId, "superseded", null, { connectionEpoch: typeof epoch === "number" ? epoch : null });
        }
        return;
      case "session.expired":
        if (ours && runId) this.sessionGone(runId, "expired", null);
        return;
      case "gateway.draining": {
        const after = payload["reconnectAfterMs"];
        const ms = typeof after === "number" ? after : 1000;
        this.notBefore = Date.now() + ms;
        this.emit({ type: "draining", reconnectAfterMs: ms });
        return;
      }
      case "run.cancelRequested": {
        if (!run || !runId) return;
        const requestedAt = typeof payload["requestedAt"] === "string" ? payload["requestedAt"] : "";
        // The gateway pushes a pending cancel again on every reattach: tell
        // the application once per request.
        if (run.cancel && run.cancel.requestedAt === requestedAt) return;
        const reason = typeof payload["reason"] === "string" ? payload["reason"] : null;
        const c: CancelRequest = { runId, reason, requestedAt };
        run.cancel = c;
        this.emit({ type: "cancelRequested", runId, reason, requestedAt });
        for (const l of [...run.cancelListeners]) {
          try {
            l(c);
          } catch {
            // a listener's failure is its own
          }
        }
        return;
      }
      default:
        return; // unknown pushes are ignored, as the protocol requires
    }
  }

  /** For RunSession: the cancel request seen so far and the listener set. */
  cancelState(runId: string): { cancel: CancelRequest | null; listeners: Set<(c: CancelRequest) => void> } | null {
    const run = this.runs.get(runId);
    return run ? { cancel: run.cancel, listeners: run.cancelListeners } : null;
  }

  /** For RunSession: the current session id and capabilities of a run. */
  runInfo(runId: string): { sessionId: string; capabilities: RuntimeCapability[]; main: boolean } | null {
    const run = this.runs.get(runId);
    if (!run) return null;
    return { sessionId: run.sessionId, capabilities: run.capabilities, main: [...this.runs.keys()][0] === runId };
  }
}

type GoneReason = "superseded" | "expired" | "ended" | "refused";

function closedError(): RungateError {
  return new RungateError("CLOSED", "the client is closed");
}

function asError(e: unknown): RungateError {
  return e instanceof RungateError ? e : new RungateError("CONNECT_FAILED", String(e), { retryable: true });
}

function isOutcome(v: unknown): v is RunOutcome {
  return v === "completed" || v === "failed" || v === "cancelled";
}

function outcomeOf(e: RungateError | null): RunOutcome | null {
  const o = e?.details?.["outcome"];
  return isOutcome(o) ? o : null;
}

function stringMap(v: unknown, what: string): Record<string, string> {
  if (!v || typeof v !== "object" || Array.isArray(v)) throw new RungateError("BAD_REPLY", `${what} is not an object`);
  const out: Record<string, string> = {};
  for (const [k, val] of Object.entries(v)) {
    if (typeof val !== "string") throw new RungateError("BAD_REPLY", `${what}.${k} is not a string`);
    out[k] = val;
  }
  return out;
}

/** One attached run: everything a runtime does for it goes through here. */
export class RunSession {
  readonly runId: string;
  /** The heartbeat interval the gateway asked for, ms. */
  readonly heartbeatIntervalMs: number;
  readonly configVersion: string | null;
  readonly leaseExpiresAt: string | null;
  private readonly client: RuntimeClient;
  private goneWith: RungateError | null = null;

  readonly kv: {
    /** The values of `keys` that exist. Needs `kv.read`. */
    get(keys: string[]): Promise<Record<string, string>>;
    /** Sets keys. Needs `kv.write`. Past the tenant's KV quota: QUOTA_EXCEEDED, nothing stored. */
    set(kv: Record<string, string>): Promise<void>;
    /** Deletes keys (absent ones are ignored), giving their bytes back to the tenant's quota; resolves to how many held a value. Needs `kv.write`. */
    delete(keys: string[]): Promise<number>;
  };

  readonly checkpoint: {
    /** Saves `data` (replacing `checkpointId` if given) as the run's latest checkpoint. Needs `checkpoint.save`. */
    save(data: JsonValue, options?: { checkpointId?: string }): Promise<CheckpointSaveResponse>;
    /** The latest checkpoint, or the one named. NOT_FOUND if there is none. Needs `checkpoint.load`. */
    load(checkpointId?: string): Promise<Checkpoint>;
  };

  /** @internal */
  constructor(client: RuntimeClient, runId: string, info: { sessionId: string; heartbeatIntervalMs: number; configVersion: string | null; leaseExpiresAt: string | null }) {
    this.client = client;
    this.lastSessionId = info.sessionId;
    this.runId = runId;
    this.heartbeatIntervalMs = info.heartbeatIntervalMs;
    this.configVersion = info.configVersion;
    this.leaseExpiresAt = info.leaseExpiresAt;
    this.kv = {
      get: async (keys) => stringMap((await this.client.call(runId, "kv.get", { keys }))["kv"], "kv"),
      set: async (kv) => {
        await this.client.call(runId, "kv.set", { kv });
      },
      delete: async (keys) => {
        const r = await this.client.call(runId, "kv.delete", { keys });
        if (typeof r["deleted"] !== "number") throw new RungateError("BAD_REPLY", "kv.delete answered without deleted");
        return r["deleted"];
      },
    };
    this.checkpoint = {
      save: async (data, options) => {
        const body: Record<string, JsonValue> = { data };
        if (options?.checkpointId !== undefined) body["checkpointId"] = options.checkpointId;
        const r = await this.client.call(runId, "checkpoint.save", body);
        if (typeof r["checkpointId"] !== "string" || typeof r["savedAt"] !== "string") {
          throw new RungateError("BAD_REPLY", "checkpoint.save answered without checkpointId/savedAt");
        }
        return { checkpointId: r["checkpointId"], savedAt: r["savedAt"] };
      },
      load: async (checkpointId) => {
        const r = (await this.client.call(runId, "checkpoint.load", checkpointId === undefined ? {} : { checkpointId })) as Partial<CheckpointLoadResponse>;
        if (typeof r.checkpointId !== "string" || typeof r.savedAt !== "string" || !("data" in r)) {
          throw new RungateError("BAD_REPLY", "checkpoint.load answered without checkpointId/savedAt/data");
        }
        return { checkpointId: r.checkpointId, savedAt: r.savedAt, data: r.data as JsonValue };
      },
    };
  }

  /** The session id (it changes if the gateway forgot the session and the run was attached afresh); after the session ended, its last one. */
  get sessionId(): string {
    const now = this.client.runInfo(this.runId)?.sessionId;
    if (now) this.lastSessionId = now;
    return this.lastSessionId;
  }

  private lastSessionId: string;

  /** Why the session ended (STALE_EPOCH, SESSION_EXPIRED, RUN_ENDED…), or null while it lives. */
  get endedWith(): RungateError | null {
    return this.goneWith;
  }

  /** @internal */
  markGone(e: RungateError): void {
    this.goneWith = e;
  }

  /**
   * Publishes `events` as one batch, in order after every earlier publish of
   * this client, and resolves once the gateway stored them. Each event gets
   * the run's next `seq`; if the socket drops first the batch is resent on the
   * next one and stored once. A publish is never failed by a lost connection,
   * only by the gateway (its error code) or the session ending.
   */
  async publish(events: PublishEvent | PublishEvent[]): Promise<void> {
    const list = Array.isArray(events) ? events : [events];
    const numbered = this.client.numbered(this.runId, list);
    if (!numbered) throw this.goneWith ?? new RungateError("NO_SESSION", `run ${this.runId} has no session`);
    await this.client.enqueue(this.runId, "events.publish", { events: numbered as unknown as JsonValue });
  }

  /** The run's secrets: all of them, or the named ones. Needs `secrets.read`. */
  async secrets(names?: string[]): Promise<Record<string, string>> {
    const r = await this.client.call(this.runId, "secrets.get", names ? { names } : {});
    return stringMap(r["secrets"], "secrets");
  }

  /** The run's effective config object. */
  async config(): Promise<Record<string, JsonValue>> {
    const r = await this.client.call(this.runId, "config.get", {});
    const c = r["config"];
    if (!c || typeof c !== "object" || Array.isArray(c)) throw new RungateError("BAD_REPLY", "config is not an object");
    return c as Record<string, JsonValue>;
  }

  /** Renews the lease now (the client also heartbeats on its own). */
  async heartbeat(): Promise<void> {
    await this.client.call(this.runId, "runtime.heartbeat", {});
  }

  /**
   * Attaches a sub-run on the same socket; the main session must hold
   * `subtasks.run` (else FORBIDDEN). Capabilities default to the main run's,
   * without `subtasks.run`.
   */
  subRun(runId: string, options: AttachOptions = {}): Promise<RunSession> {
    const info = this.client.runInfo(this.runId);
    if (!info) return Promise.reject(this.goneWith ?? new RungateError("NO_SESSION", `run ${this.runId} has no session`));
    const capabilities = options.capabilities ?? info.capabilities.filter((c) => c !== "subtasks.run");
    return this.client.attach(runId, { ...options, capabilities });
  }

  /**
   * Calls `listener` when a viewer asks the run to stop (`run.cancelRequested`),
   * once per request; at once if one already came. Returns the unsubscribe function.
   */
  onCancelRequested(listener: (c: CancelRequest) => void): () => void {
    const s = this.client.cancelState(this.runId);
    if (!s) return () => {};
    s.listeners.add(listener);
    if (s.cancel) {
      const c = s.cancel;
      queueMicrotask(() => {
        if (s.listeners.has(listener)) listener(c);
      });
    }
    return () => s.listeners.delete(listener);
  }

  /** The cancel request received, if any. */
  get cancelRequested(): CancelRequest | null {
    return this.client.cancelState(this.runId)?.cancel ?? null;
  }

  /**
   * Ends the run with `outcome`, after every publish made before it. The
   * session ends; viewers get `stream.ended`. Resent after a reconnect
   * like a publish (finish is idempotent for the same outcome).
   */
  async finish(outcome: RunOutcome, message?: string): Promise<RuntimeFinishResponse> {
    // Finish is idempotent on the wire; a repeat here gets the first answer
    // (the session is gone, so it could not be sent under it anyway).
    if (this.finished) {
      if (this.finished.outcome === outcome) return this.finished.reply;
      throw new RungateError("CONFLICT", `run ${this.runId} already finished as ${this.finished.outcome}`, { details: { runId: this.runId, outcome: this.finished.outcome } });
    }
    const body: Record<string, JsonValue> = { outcome };
    if (message !== undefined) body["message"] = message;
    const r = await this.client.enqueue(this.runId, "runtime.finish", body);
    const next = r["nextOffset"];
    if (typeof next !== "number") throw new RungateError("BAD_REPLY", "runtime.finish answered without nextOffset");
    const reply: RuntimeFinishResponse = { accepted: true, nextOffset: next };
    this.finished = { outcome, reply };
    return reply;
  }

  private finished: { outcome: RunOutcome; reply: RuntimeFinishResponse } | null = null;
}



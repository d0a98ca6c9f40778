//! `ViewerClient`: tails runs' output streams on `/v1/stream` and resumes
//! them after any disconnect, from the next offset owed with the stream epoch.
//!
//! Each `EventStream` (from `events()` or `follow()`) has its own socket and
//! remembers the next offset owed to its reader and the stream epoch. After a
//! lost socket, a gateway restart or `gateway.draining` it reconnects with
//! backoff and sends `stream.resume` from exactly there, so the reader sees
//! every event once, in order. What it cannot hide it hands over as typed
//! items, never silently: a resume that comes back `truncated` (history gone,
//! or a new epoch), a `stream.gap` (the reader fell behind the ring), a
//! `stream.closed` (the stream was dropped; it resumes the run's next stream
//! by itself). It ends by itself at `stream.ended`, whose payload it keeps.
//!
//! `runs()` and `cancel()` share one more socket, opened when first needed.
//! Must not know anything of runtimes or sessions.

import { Backoff, type BackoffOptions } from "./backoff.js";
import { RungateError } from "./errors.js";
import type { OutputEvent, RunCancelResponse, RunOutcome, RunSummary, StreamEnded, StreamResumeResponse } from "./generated/spec.js";
import { endpointUrl, type FrameObserver, type Incoming, Link, type TokenSource, tokenFor } from "./link.js";

export interface ViewerClientOptions {
  /** `ws://HOST:PORT` (the path defaults to `/v1/stream`) or the full endpoint URL. */
  url: string;
  /** A viewer token covering the runs to follow (or `tokenSource`). */
  token?: string;
  /** Asked for a token at every connection. */
  tokenSource?: TokenSource;
  /** Longest `runs()` / `cancel()` keep trying, ms (default 30000). */
  requestTimeoutMs?: number;
  /** Longest one connection attempt may take, ms (default 10000). */
  connectTimeoutMs?: number;
  backoff?: BackoffOptions;
  /** Sees every frame sent and received. */
  onFrame?: FrameObserver;
}

/** One output event and its offset, the event exactly as published. */
export interface EventItem {
  kind: "event";
  offset: number;
  event: OutputEvent;
}

/** Offsets `fromOffset..=toOffset` (both inclusive) were dropped before they reached this reader: it fell behind. */
export interface GapItem {
  kind: "gap";
  fromOffset: number;
  toOffset: number;
  streamEpoch: string;
}

/**
 * A resume found that events this reader was owed are gone: older than the
 * oldest kept (`requestedOffset < firstOffset`), or the stream's history was
 * replaced (`epochChanged`: a new `streamEpoch`, offsets start over). Delivery
 * continues at `startOffset`.
 */
export interface TruncatedItem {
  kind: "truncated";
  requestedOffset: number | null;
  firstOffset: number;
  startOffset: number;
  nextOffset: number;
  streamEpoch: string;
  previousEpoch: string | null;
  epochChanged: boolean;
}

/** The gateway dropped the stream's history (`stream.closed`); the reader resumes the run's next stream by itself. */
export interface ClosedItem {
  kind: "closed";
  streamEpoch: string;
}

export type StreamItem = EventItem | GapItem | TruncatedItem | ClosedItem;

export interface EventsOptions {
  /** The first offset wanted; absent: live from the head. */
  from?: number;
  /** The stream epoch `from` belongs to, if known (so a lost history is reported as truncated). */
  streamEpoch?: string;
}

export interface FollowOptions extends EventsOptions {
  onEvents?: (events: EventItem[]) => void;
  onGap?: (gap: GapItem) => void;
  onTruncated?: (t: TruncatedItem) => void;
  onClosed?: (c: ClosedItem) => void;
  onEnd?: (end: StreamEnded) => void;
  /** A final error: the gateway refused the token or the run (the follow has stopped). */
  onError?: (e: RungateError) => void;
}

export interface Follow {
  /** Resolves with the end (or null if stopped first); rejects with a final error. */
  readonly done: Promise<StreamEnded | null>;
  readonly stream: EventStream;
  stop(): void;
}

export class ViewerClient {
  private readonly options: ViewerClientOptions;
  readonly url: string;
  private readonly streams = new Set<EventStream>();
  private control: Control | null = null;
  private closed = false;

  constructor(options: ViewerClientOptions) {
    if (options.token === undefined && options.tokenSource === undefined) {
      throw new TypeError("ViewerClient needs token or tokenSource");
    }
    this.options = options;
    this.url = endpointUrl(options.url, "/v1/stream");
  }

  /**
   * The run's output from `from` (or live), as an async iterable of
   * `StreamItem`s. Iteration ends by itself at `stream.ended` (read
   * `stream.ended` for the outcome), or when `close()` is called; it throws a
   * `RungateError` if the gateway refuses the token or the run for good.
   */
  events(runId: string, options: EventsOptions = {}): EventStream {
    if (this.closed) throw new RungateError("CLOSED", "the client is closed");
    const s = new EventStream(this.options, this.url, runId, options, () => this.streams.delete(s));
    this.streams.add(s);
    return s;
  }

  /** The same stream, with callbacks instead of an iterator. */
  follow(runId: string, options: FollowOptions = {}): Follow {
    const stream = this.events(runId, options);
    const done = (async () => {
      try {
        for (;;) {
          const batch = await stream.nextBatch();
          if (batch === null) break;
          const events: EventItem[] = [];
          const flush = (): void => {
            if (events.length) options.onEvents?.(events.splice(0));
          };
          for (const item of batch) {
            if (item.kind === "event") {
              events.push(item);
              continue;
            }
            flush();
            if (item.kind === "gap") options.onGap?.(item);
            else if (item.kind === "truncated") options.onTruncated?.(item);
            else options.onClosed?.(item);
          }
          flush();
        }
      } catch (e) {
        const err = e instanceof RungateError ? e : new RungateError("INTERNAL", String(e));
        options.onError?.(err);
        throw err;
      }
      if (stream.ended) options.onEnd?.(stream.ended);
      return stream.ended;
    })();
    // A caller that only uses callbacks need not await `done`.
    done.catch(() => {});
    return { done, stream, stop: () => stream.close() };
  }

  /** The runs the token covers (`runs.list`). */
  /** Every run the token covers (`runs.list`, following its pages). */
  async runs(): Promise<RunSummary[]> {
    const all: RunSummary[] = [];
    let payload: Record<string, unknown> = {};
    for (;;) {
      const r = await this.controlLink().call("runs.list", payload);
      const runs = r["runs"];
      if (!Array.isArray(runs)) throw new RungateError("BAD_REPLY", "runs.list answered without runs");
      all.push(...(runs as RunSummary[]));
      const cursor = r["nextCursor"];
      if (typeof cursor !== "string") return all;
      payload = { cursor };
    }
  }

  /**
   * Asks the run's runtime to stop (`run.cancel`; the viewer token needs the
   * `run.cancel` capability). `delivered`: the runtime's socket got it now
   * (else the gateway keeps it and pushes it when the runtime reattaches);
   * `ended`: the run had ended already.
   */
  async cancel(runId: string, reason?: string): Promise<RunCancelResponse> {
    const payload: Record<string, string> = { runId };
    if (reason !== undefined) payload["reason"] = reason;
    const r = await this.controlLink().call("run.cancel", payload);
    if (typeof r["delivered"] !== "boolean" || typeof r["ended"] !== "boolean") {
      throw new RungateError("BAD_REPLY", "run.cancel answered without delivered/ended");
    }
    return { delivered: r["delivered"], ended: r["ended"] };
  }

  /** Stops every stream and closes every socket of this client. */
  close(): void {
    this.closed = true;
    for (const s of [...this.streams]) s.close();
    this.control?.close();
    this.control = null;
  }

  private controlLink(): Control {
    if (this.closed) throw new RungateError("CLOSED", "the client is closed");
    this.control ??= new Control(this.options, this.url);
    return this.control;
  }
}

/**
 * One followed run. Async-iterable once; also readable batch by batch.
 */
export class EventStream implements AsyncIterable<StreamItem> {
  readonly runId: string;
  private readonly options: ViewerClientOptions;
  private readonly url: string;
  private readonly backoff: Backoff;
  private readonly onDone: () => void;
  /** The next offset owed to the reader; null until the first resume answered (live from the head). */
  private next: number | null;
  private epoch: string | null;
  private queue: StreamItem[] = [];
  private wakeReader: (() => void) | null = null;
  private finished = false;
  private failure: RungateError | null = null;
  private end: StreamEnded | null = null;
  private link: Link | null = null;
  private stopped = false;
  private stopWait: (() => void) | null = null;
  private resolveDone!: (e: StreamEnded | null) => void;
  private rejectDone!: (e: RungateError) => void;
  /** Resolves with the end (or null if closed first); rejects with a final error. */
  readonly done: Promise<StreamEnded | null>;

  /** @internal */
  constructor(options: ViewerClientOptions, url: string, runId: string, position: EventsOptions, onDone: () => void) {
    this.options = options;
    this.url = url;
    this.runId = runId;
    this.backoff = new Backoff(options.backoff);
    this.onDone = onDone;
    this.next = position.from ?? null;
    this.epoch = position.streamEpoch ?? null;
    this.done = new Promise((resolve, reject) => {
      this.resolveDone = resolve;
      this.rejectDone = reject;
    });
    this.done.catch(() => {});
    void this.drive();
  }

  /** The run's end (`stream.ended`: outcome, message, nextOffset, endedAt), once reached. */
  get ended(): StreamEnded | null {
    return this.end;
  }

  /** The outcome, once the run ended. */
  get outcome(): RunOutcome | null {
    return this.end?.outcome ?? null;
  }

  /** Where the stream stands: the next offset owed and the epoch. */
  get position(): { nextOffset: number | null; streamEpoch: string | null } {
    return { nextOffset: this.next, streamEpoch: this.epoch };
  }

  /** Stops following and closes the socket; iteration ends. */
  close(): void {
    if (this.stopped) return;
    this.stopped = true;
    this.link?.close(1000, "stream closed", true);
    this.link = null;
    this.stopWait?.();
    this.finish(null);
  }

  async *[Symbol.asyncIterator](): AsyncIterator<StreamItem> {
    try {
      for (;;) {
        const batch = await this.nextBatch();
        if (batch === null) return;
        for (const item of batch) yield item;
      }
    } finally {
      // A reader that breaks out of the loop stops the stream.
      if (!this.finished) this.close();
    }
  }

  /** The items available now (waiting for at least one), or null at the end. @internal */
  async nextBatch(): Promise<StreamItem[] | null> {
    for (;;) {
      if (this.queue.length) return this.queue.splice(0);
      if (this.failure) throw this.failure;
      if (this.finished) return null;
      await new Promise<void>((resolve) => {
        this.wakeReader = resolve;
      });
      this.wakeReader = null;
    }
  }

  private deliver(items: StreamItem[]): void {
    if (!items.length) return;
    this.queue.push(...items);
    this.wakeReader?.();
  }

  private finish(failure: RungateError | null): void {
    if (this.finished) return;
    this.finished = true;
    this.failure = failure;
    this.link?.close(1000, "stream ended", true);
    this.link = null;
    this.stopWait?.();
    this.onDone();
    this.wakeReader?.();
    if (failure) this.rejectDone(failure);
    else this.resolveDone(this.end);
  }

  private wait(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      this.stopWait = () => {
        clearTimeout(t);
        resolve();
      };
    });
  }

  private async drive(): Promise<void> {
    let attempt = 0;
    let notBefore = 0;
    while (!this.finished) {
      const delay = attempt > 0 ? this.backoff.delay(attempt - 1) : 0;
      const wakeAt = Math.max(Date.now() + delay, notBefore);
      if (wakeAt > Date.now()) await this.wait(wakeAt - Date.now());
      if (this.finished) return;
      let closedAt: ((v: void) => void) | null = null;
      const closed = new Promise<void>((resolve) => {
        closedAt = resolve;
      });
      let link: Link;
      let resumeId = 0;
      let waitingFor: string | null = null;
      const sendResume = (l: Link): void => {
        resumeId += 1;
        waitingFor = `resume-${resumeId}`;
        const payload: Record<string, string | number> = { runId: this.runId };
        if (this.next !== null) payload["fromOffset"] = this.next;
        if (this.epoch !== null) payload["streamEpoch"] = this.epoch;
        l.send(waitingFor, "stream.resume", payload);
      };
      try {
        const token = await tokenFor(this.options.token, this.options.tokenSource);
        link = await Link.connect(
          this.url,
          token,
          this.options.connectTimeoutMs ?? 10_000,
          {
            onFrame: (f: Incoming) => {
              if (this.link !== link) return;
              if (f.kind === "reply" && f.id === waitingFor) {
                attempt = 0;
                this.resumed(f.payload);
              } else if (f.kind === "error" && f.id !== null && f.id === waitingFor) {
                if (f.error.retryable) link.close(1000, "retry", false);
                else this.finish(f.error); // the token does not cover the run, or the like: final
              } else if (f.kind === "push") {
                if (f.type === "gateway.draining") {
                  const after = f.payload["reconnectAfterMs"];
                  notBefore = Date.now() + (typeof after === "number" ? after : 1000);
                } else if (f.payload["runId"] === this.runId) {
                  if (this.pushed(f.type, f.payload)) sendResume(link);
                }
              }
            },
            onClose: () => {
              if (this.link === link) this.link = null;
              closedAt?.();
            },
          },
          this.options.onFrame,
        );
      } catch (e) {
        const err = e instanceof RungateError ? e : new RungateError("CONNECT_FAILED", String(e), { retryable: true });
        if (!err.retryable) {
          this.finish(err);
          return;
        }
        attempt += 1;
        continue;
      }
      if (this.finished) {
        link.close(1000, "stream ended", true);
        return;
      }
      this.link = link;
      this.stopWait = () => closedAt?.();
      sendResume(link);
      await closed;
      attempt += 1;
    }
  }

  /** The `stream.resume` reply. */
  private resumed(p: Record<string, unknown>): void {
    const info = p as Partial<StreamResumeResponse>;
    const epoch = typeof info.streamEpoch === "string" ? info.streamEpoch : "";
    const start = typeof info.startOffset === "number" ? info.startOffset : 0;
    if (info.truncated === true) {
      this.deliver([
        {
          kind: "truncated",
          requestedOffset: this.next,
          firstOffset: typeof info.firstOffset === "number" ? info.firstOffset : start,
          startOffset: start,
          nextOffset: typeof info.nextOffset === "number" ? info.nextOffset : start,
          streamEpoch: epoch,
          previousEpoch: this.epoch,
          epochChanged: this.epoch !== null && this.epoch !== epoch,
        },
      ]);
    }
    this.next = start;
    this.epoch = epoch;
  }

  /** A push for this run; true if the stream must be resumed (it was closed). */
  private pushed(type: string, p: Record<string, unknown>): boolean {
    switch (type) {
      case "stream.events": {
        // The epoch these offsets belong to is the one to resume with (a
        // stream two gateways created at once may take the other's epoch
        // while still empty, without a close: spec/README.md).
        if (typeof p["streamEpoch"] === "string") this.epoch = p["streamEpoch"];
        const events = Array.isArray(p["events"]) ? (p["events"] as Array<{ offset?: unknown; event?: unknown }>) : [];
        const items: StreamItem[] = [];
        for (const e of events) {
          if (typeof e.offset !== "number") continue;
          // Never hand the reader an offset twice.
          if (this.next !== null && e.offset < this.next) continue;
          this.next = e.offset + 1;
          items.push({ kind: "event", offset: e.offset, event: e.event as OutputEvent });
        }
        this.deliver(items);
        return false;
      }
      case "stream.gap": {
        const from = p["fromOffset"];
        const to = p["toOffset"];
        if (typeof from !== "number" || typeof to !== "number") return false;
        this.next = to + 1;
        this.deliver([{ kind: "gap", fromOffset: from, toOffset: to, streamEpoch: String(p["streamEpoch"] ?? this.epoch ?? "") }]);
        return false;
      }
      case "stream.closed":
        this.deliver([{ kind: "closed", streamEpoch: String(p["streamEpoch"] ?? "") }]);
        return true;
      case "stream.ended":
        this.end = p as unknown as StreamEnded;
        if (typeof this.end.nextOffset === "number") this.next = this.end.nextOffset;
        this.finish(null);
        return false;
      default:
        return false;
    }
  }
}

/** The socket `runs()` and `cancel()` share: opened on demand, calls retried over reconnects until the timeout. */
class Control {
  private readonly options: ViewerClientOptions;
  private readonly url: string;
  private readonly backoff: Backoff;
  private link: Promise<Link> | null = null;
  private nextId = 0;
  private readonly pending = new Map<string, { resolve: (f: Incoming | null) => void }>();
  private closed = false;

  constructor(options: ViewerClientOptions, url: string) {
    this.options = options;
    this.url = url;
    this.backoff = new Backoff(options.backoff);
  }

  close(): void {
    this.closed = true;
    const l = this.link;
    this.link = null;
    void l?.then((x) => x.close(1000, "client closed", true)).catch(() => {});
    for (const p of this.pending.values()) p.resolve(null);
    this.pending.clear();
  }

  private open(): Promise<Link> {
    if (this.link) return this.link;
    const p = (async () => {
      const token = await tokenFor(this.options.token, this.options.tokenSource);
      let link: Link;
      link = await Link.connect(
        this.url,
        token,
        this.options.connectTimeoutMs ?? 10_000,
        {
          onFrame: (f) => {
            if ((f.kind === "reply" || f.kind === "error") && f.id !== null) {
              const w = this.pending.get(f.id);
              if (w) {
                this.pending.delete(f.id);
                w.resolve(f);
              }
            }
          },
          onClose: () => {
            if (this.link === p) this.link = null;
            void link;
            for (const [id, w] of [...this.pending]) {
              this.pending.delete(id);
              w.resolve(null);
            }
          },
        },
        this.options.onFrame,
      );
      return link;
    })();
    this.link = p;
    p.catch(() => {
      if (this.link === p) this.link = null;
    });
    return p;
  }

  /**
   * Sends `type` and waits for its answer, reconnecting and sending it again
   * after a lost socket (both commands are safe to repeat) until the timeout.
   */
  async call(type: string, payload: object): Promise<Record<string, unknown>> {
    const deadline = Date.now() + (this.options.requestTimeoutMs ?? 30_000);
    let attempt = 0;
    let last: RungateError | null = null;
    while (!this.closed && Date.now() < deadline) {
      if (attempt > 0) await new Promise((r) => setTimeout(r, Math.min(this.backoff.delay(attempt - 1), Math.max(0, deadline - Date.now()))));
      attempt += 1;
      let link: Link;
      try {
        link = await this.open();
      } catch (e) {
        const err = e instanceof RungateError ? e : new RungateError("CONNECT_FAILED", String(e), { retryable: true });
        if (!err.retryable) throw err;
        last = err;
        continue;
      }
      this.nextId += 1;
      const id = `v${this.nextId}`;
      const answer = await new Promise<Incoming | null>((resolve) => {
        const timer = setTimeout(() => {
          this.pending.delete(id);
          resolve(null);
        }, Math.max(1, deadline - Date.now()));
        this.pending.set(id, {
          resolve: (f) => {
            clearTimeout(timer);
            resolve(f);
          },
        });
        if (!link.send(id, type, payload)) {
          this.pending.delete(id);
          clearTimeout(timer);
          resolve(null);
        }
      });
      if (answer === null) {
        last = new RungateError("CONNECTION_LOST", `no answer to ${type}`, { retryable: true });
        continue;
      }
      if (answer.kind === "error") {
        if (!answer.error.retryable) throw answer.error;
        last = answer.error;
        continue;
      }
      if (answer.kind === "reply") return answer.payload;
    }
    if (this.closed) throw new RungateError("CLOSED", "the client is closed");
    throw last ?? new RungateError("TIMEOUT", `no answer to ${type}`, { retryable: true });
  }
}

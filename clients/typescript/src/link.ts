//! One client socket: opening it with a token, writing request frames, and
//! sorting what arrives into replies, errors and pushes.
//!
//! Owns the choice of WebSocket implementation: the platform's
//! `globalThis.WebSocket` (browsers, Node ≥ 22, Deno, Bun) when there is one,
//! else the `ws` package, loaded by a dynamic import only then, so a browser
//! never fetches or bundles it. With the platform's WebSocket the token
//! travels as `?token=` (browsers cannot set headers on a WebSocket); with
//! `ws` as `Authorization: Bearer`. Must not know what any command means or
//! keep state between frames: the clients do.

import { RungateError } from "./errors.js";

/** A token, or where to get a fresh one for each connection. */
export type TokenSource = () => string | Promise<string>;

/** Sees every frame the client sends or receives (for logging and tests). */
export type FrameObserver = (direction: "in" | "out", frame: Record<string, unknown>) => void;

export type Incoming =
  | { kind: "reply"; id: string; payload: Record<string, unknown> }
  | { kind: "error"; id: string | null; error: RungateError }
  | { kind: "push"; type: string; payload: Record<string, unknown> };

/** The part of the WebSocket interface both the platform's and `ws` offer. */
interface Socket {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

type SocketCtor = new (url: string, protocols?: unknown, options?: unknown) => Socket;

let wsModule: Promise<SocketCtor> | undefined;

async function implementation(): Promise<{ ctor: SocketCtor; platform: boolean }> {
  const g = (globalThis as { WebSocket?: SocketCtor }).WebSocket;
  if (g) return { ctor: g, platform: true };
  // A non-literal specifier: bundlers leave it alone, and it runs only where
  // there is no platform WebSocket (Node 20 and 21).
  const name = "ws";
  wsModule ??= import(name).then((m: { WebSocket?: SocketCtor; default?: SocketCtor }) => {
    const ctor = m.WebSocket ?? m.default;
    if (!ctor) throw new Error("the ws package has no WebSocket export");
    return ctor;
  });
  return { ctor: await wsModule, platform: false };
}

/**
 * The endpoint URL: `http(s)` becomes `ws(s)`, and a URL with no path gets
 * `path` (so `ws://host:7700` works for both clients).
 */
export function endpointUrl(url: string, path: string): string {
  const u = new URL(url);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  if (u.pathname === "" || u.pathname === "/") u.pathname = path;
  return u.toString();
}

/** The URL without its query, for error messages (a ?token= must not reach logs). */
function withoutQuery(url: string): string {
  return url.split(/[?#]/)[0] ?? url;
}

export interface LinkHandlers {
  onFrame(frame: Incoming): void;
  onClose(code: number, reason: string): void;
}

export class Link {
  private socket: Socket;
  private closed = false;
  private readonly observe: FrameObserver | undefined;

  private constructor(socket: Socket, observe: FrameObserver | undefined) {
    this.socket = socket;
    this.observe = observe;
  }

  get open(): boolean {
    return !this.closed && this.socket.readyState === 1;
  }

  /**
   * Opens `url` with `token` within `timeoutMs`. A refusal of the handshake
   * that `ws` can see (HTTP 401/403) fails with UNAUTHENTICATED/FORBIDDEN
   * and `httpStatus`; anything else with CONNECT_FAILED (retryable).
   */
  static async connect(
    url: string,
    token: string,
    timeoutMs: number,
    handlers: LinkHandlers,
    observe?: FrameObserver,
  ): Promise<Link> {
    const { ctor, platform } = await implementation();
    let socket: Socket;
    try {
      if (platform) {
        const u = new URL(url);
        u.searchParams.set("token", token);
        socket = new ctor(u.toString());
      } else {
        socket = new ctor(url, undefined, {
          headers: { authorization: `Bearer ${token}` },
          handshakeTimeout: timeoutMs,
          perMessageDeflate: false,
        });
      }
    } catch (e) {
      throw new RungateError("CONNECT_FAILED", `bad URL ${withoutQuery(url)}: ${String(e)}`);
    }
    return await new Promise<Link>((resolve, reject) => {
      let settled = false;
      const fail = (err: RungateError): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        socket.onopen = socket.onclose = socket.onerror = socket.onmessage = null;
        try {
          socket.close();
        } catch {
          // already gone
        }
        reject(err);
      };
      const timer = setTimeout(
        () => fail(new RungateError("CONNECT_FAILED", `no handshake within ${timeoutMs} ms`, { retryable: true })),
        timeoutMs,
      );
      socket.onerror = (ev: unknown) => {
        const message = String((ev as { message?: unknown })?.message ?? "WebSocket error");
        const status = /Unexpected server response: (\d+)/.exec(message)?.[1];
        if (status === "401" || status === "403") {
          const code = status === "401" ? "UNAUTHENTICATED" : "FORBIDDEN";
          fail(new RungateError(code, `the gateway refused the connection: HTTP ${status}`, {
            httpStatus: Number(status),
            fromGateway: true,
          }));
        } else {
          fail(new RungateError("CONNECT_FAILED", `${withoutQuery(url)}: ${message}`, { retryable: true }));
        }
      };
      socket.onclose = (ev) =>
        fail(new RungateError("CONNECT_FAILED", `closed during the handshake (${ev.code})`, { retryable: true }));
      socket.onopen = () => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        const link = new Link(socket, observe);
        link.wire(handlers);
        resolve(link);
      };
    });
  }

  private wire(handlers: LinkHandlers): void {
    this.socket.onmessage = (ev) => {
      if (typeof ev.data !== "string") return; // the gateway sends text only
      const frame = sort(ev.data);
      if (!frame) return;
      if (this.observe) this.observe("in", frame.raw);
      handlers.onFrame(frame.frame);
    };
    this.socket.onerror = () => {
      // onclose follows and carries the news.
    };
    this.socket.onclose = (ev) => {
      if (this.closed) return;
      this.closed = true;
      handlers.onClose(ev.code, ev.reason);
    };
  }

  /** Sends one request; false if the socket is not open. */
  send(id: string, type: string, payload: object): boolean {
    if (!this.open) return false;
    const frame = { id, type, payload };
    if (this.observe) this.observe("out", frame as Record<string, unknown>);
    try {
      this.socket.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Closes the socket. The close handler still runs (once), unless `quiet`.
   */
  close(code = 1000, reason = "", quiet = false): void {
    if (quiet) this.closed = true;
    try {
      this.socket.close(code, reason);
    } catch {
      // already closing
    }
  }

  /** Gives up a socket that went silent: close and report it lost now, without waiting for a closing handshake. */
  abandon(handlers: LinkHandlers): void {
    const wasClosed = this.closed;
    this.closed = true;
    const s = this.socket as Socket & { terminate?: () => void };
    try {
      if (s.terminate) s.terminate();
      else s.close(4000, "no answer");
    } catch {
      // already gone
    }
    if (!wasClosed) handlers.onClose(1006, "no frame from the gateway while answers were owed");
  }
}

/** Sorts one text frame; null for anything that is not a protocol frame (ignored). */
function sort(text: string): { frame: Incoming; raw: Record<string, unknown> } | null {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return null;
  }
  if (!v || typeof v !== "object" || Array.isArray(v)) return null;
  const raw = v as Record<string, unknown>;
  const type = raw["type"];
  const payload = raw["payload"];
  const isObj = (p: unknown): p is Record<string, unknown> => !!p && typeof p === "object" && !Array.isArray(p);
  if (type === "reply") {
    if (typeof raw["id"] !== "string" || !isObj(payload)) return null;
    return { frame: { kind: "reply", id: raw["id"], payload }, raw };
  }
  if (type === "error") {
    const id = typeof raw["id"] === "string" ? raw["id"] : null;
    return { frame: { kind: "error", id, error: RungateError.fromBody(raw["error"]) }, raw };
  }
  if (typeof type !== "string" || !isObj(payload)) return null;
  return { frame: { kind: "push", type, payload }, raw };
}

/** The token for the connection about to open. */
export async function tokenFor(token: string | undefined, source: TokenSource | undefined): Promise<string> {
  if (source) return await source();
  if (token === undefined) throw new RungateError("UNAUTHENTICATED", "neither token nor tokenSource was given");
  return token;
}

//! Errors of the client: one class, `RungateError`, whose `code` is the
//! protocol's error code when the gateway sent one (or a condition the
//! gateway reported by push: STALE_EPOCH after `session.superseded`,
//! SESSION_EXPIRED after `session.expired`, RUN_ENDED after the run ended),
//! and one of the client's own codes for what happened on this side.
//! Must not decide what to do about an error: the clients do.

import type { JsonValue, ProtocolErrorCode } from "./generated/spec.js";
import { ERROR_CODES } from "./generated/spec.js";

/** Codes for failures that happen on the client's side of the wire. */
export type ClientErrorCode =
  /** No answer within the request timeout; the request may or may not have been applied. */
  | "TIMEOUT"
  /** The socket was lost after the request was sent, before its answer: it may have been applied. */
  | "CONNECTION_LOST"
  /** The client was closed. */
  | "CLOSED"
  /** The run was never attached through this client. */
  | "NO_SESSION"
  /** The gateway could not be reached (network) — retried by the clients themselves. */
  | "CONNECT_FAILED"
  /** A reply did not have the shape the protocol promises. */
  | "BAD_REPLY";

export type RungateErrorCode = ProtocolErrorCode | ClientErrorCode;

export interface RungateErrorInit {
  retryable?: boolean;
  details?: { [key: string]: JsonValue };
  /** True when the gateway itself sent this code (an error frame or an HTTP refusal). */
  fromGateway?: boolean;
  /** HTTP status of a refused WebSocket handshake. */
  httpStatus?: number;
}

export class RungateError extends Error {
  override readonly name = "RungateError";
  readonly code: RungateErrorCode;
  readonly retryable: boolean;
  readonly details: { [key: string]: JsonValue } | undefined;
  readonly fromGateway: boolean;
  readonly httpStatus: number | undefined;

  constructor(code: RungateErrorCode, message: string, init: RungateErrorInit = {}) {
    super(`${code}: ${message}`);
    this.code = code;
    this.retryable = init.retryable ?? false;
    this.details = init.details;
    this.fromGateway = init.fromGateway ?? false;
    this.httpStatus = init.httpStatus;
  }

  /** The run the gateway named in `details.runId`, if any. */
  get runId(): string | undefined {
    const r = this.details?.["runId"];
    return typeof r === "string" ? r : undefined;
  }

  /** An error frame's `error` object. An unknown code (a newer gateway) reads as INTERNAL. */
  static fromBody(body: unknown): RungateError {
    const b = (body && typeof body === "object" ? body : {}) as Record<string, unknown>;
    const raw = typeof b["code"] === "string" ? b["code"] : "INTERNAL";
    const code = (ERROR_CODES as readonly string[]).includes(raw) ? (raw as ProtocolErrorCode) : "INTERNAL";
    const details =
      b["details"] && typeof b["details"] === "object" && !Array.isArray(b["details"])
        ? (b["details"] as { [key: string]: JsonValue })
        : undefined;
    return new RungateError(code, typeof b["message"] === "string" ? b["message"] : raw, {
      retryable: b["retryable"] === true,
      ...(details ? { details } : {}),
      fromGateway: true,
    });
  }
}

export function isRungateError(e: unknown, code?: RungateErrorCode): e is RungateError {
  return e instanceof RungateError && (code === undefined || e.code === code);
}

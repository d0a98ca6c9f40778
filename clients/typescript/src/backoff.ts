//! Reconnect delays: exponential, capped, with full jitter (a uniform delay
//! between zero and the bound), so many clients that lost the same gateway
//! at once do not all come back in one wave.

export interface BackoffOptions {
  /** Bound of the first retry's delay, ms (default 100). */
  initialMs?: number;
  /** Largest bound, ms, however many attempts failed (default 10000). */
  maxMs?: number;
}

export class Backoff {
  readonly initialMs: number;
  readonly maxMs: number;

  constructor(options: BackoffOptions = {}) {
    this.initialMs = Math.max(0, options.initialMs ?? 100);
    this.maxMs = Math.max(this.initialMs, options.maxMs ?? 10_000);
  }

  /** The bound for attempt `n` (0-based): initial × 2ⁿ, at most max. */
  bound(attempt: number): number {
    return Math.min(this.maxMs, this.initialMs * 2 ** Math.min(attempt, 30));
  }

  /** A random delay in [0, bound(attempt)]. */
  delay(attempt: number): number {
    return Math.round(Math.random() * this.bound(attempt));
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));
}

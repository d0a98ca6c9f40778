//! `@rungate/client`: the TypeScript client of the rungate gateway, for
//! browsers and Node ≥ 20. `RuntimeClient` for runtimes, `ViewerClient` for
//! anything that tails a run's output; the frame types are generated from the
//! protocol's JSON Schemas (spec/).

export { RuntimeClient, RunSession } from "./runtime.js";
export type {
  AttachOptions,
  CancelRequest,
  Checkpoint,
  ConnectionState,
  PublishEvent,
  RuntimeClientOptions,
  RuntimeEvent,
} from "./runtime.js";
export { ViewerClient, EventStream } from "./viewer.js";
export type {
  ClosedItem,
  EventItem,
  EventsOptions,
  Follow,
  FollowOptions,
  GapItem,
  StreamItem,
  TruncatedItem,
  ViewerClientOptions,
} from "./viewer.js";
export { RungateError, isRungateError } from "./errors.js";
export type { ClientErrorCode, RungateErrorCode } from "./errors.js";
export { Backoff } from "./backoff.js";
export type { BackoffOptions } from "./backoff.js";
export type { FrameObserver, TokenSource } from "./link.js";
export { endpointUrl } from "./link.js";
export * from "./generated/spec.js";

//! HTTP routes on the one listener: WebSocket upgrades, the runs list, the
//! SSE stream, health, readiness, metrics, the dashboard's files.
//!
//! Owns the HTTP side of PROTOCOL.md §1: which path serves what, how a token
//! is found (`Authorization: Bearer` or `?token=`), and the refusals that
//! happen before any upgrade, in this order: 403 for a browser origin not
//! allowed (`origin`), 503 while draining, 401 for a missing, expired or
//! badly signed token, 403 for the wrong kind of token, 503 when the
//! gateway holds its maximum of connections and 429 when the token does
//! (`admission`). Which error and status each refusal is, is `errors`'
//! (an [`HttpRefusal`], or a domain error through [`errors::http_status`]),
//! as for command errors; the body is the protocol crate's
//! (`encode_error_body`). Must not log tokens or query strings (nor URIs,
//! which carry them), and must not know what happens inside a socket.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::create_response_with_body;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::admission::{Permit, Refused};
use super::cmd::{Endpoint, run_cancel, runs_list};
use super::errors::HttpRefusal;
use super::read_ahead::ReadAhead;
use super::state::Shared;
use super::{connection, dashboard, errors, sse};
use crate::auth::{Grant, TokenKind};
use crate::ids::RunId;
use crate::protocol::{CommandError, encode_error_body};

/// Every response body: a whole buffer, or a stream (SSE). Not `Sync`
/// because a stream body owns a subscription; hyper needs only `Send`.
pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// An error as an HTTP response: `status`, the body the protocol crate
/// encodes (the error frame's `error` member), and for a retryable error
/// when to come back (`Retry-After`, seconds).
fn error_response(status: StatusCode, e: &CommandError) -> Response<Body> {
    let mut r = respond(
        status,
        "application/json",
        encode_error_body(e).into_bytes(),
    );
    if e.retryable {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// A refusal HTTP makes on its own, as `errors` words it.
fn refuse(refusal: HttpRefusal) -> Response<Body> {
    error_response(refusal.status(), &refusal.error())
}

/// A route's refusal, with the status [`errors::http_status`] gives its
/// code: what a domain error (mapped by `errors`, as for a WebSocket) is
/// answered with.
fn refused(e: &CommandError) -> Response<Body> {
    error_response(errors::http_status(e.code), e)
}

/// `INVALID_PAYLOAD` for a bad header, query, path or body value; `path`
/// names it as `/headers/<name>`, `/query/<name>`, `/path/<name>` or
/// under `/body`.
fn invalid_input(path: &str, message: &str) -> Response<Body> {
    refused(&CommandError::invalid_payload(path, message))
}

/// Routes one request.
pub(crate) async fn route(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    let cancel = req.method() == Method::POST && run_cancel_path(path).is_some();
    if (req.method() == Method::GET || cancel)
        && browser_facing(path)
        && let Some(refused) = origin_refusal(&shared, &req)
    {
        return Ok(refused);
    }
    let response = match (req.method(), path) {
        (&Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            if shared.draining.is_cancelled() {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else if !shared.streams.healthy() {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "output streams cannot be stored (event log or Redis)\n",
                )
            } else {
                respond(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let counts = shared.sessions.with(|r| r.counts());
            let streams = shared.streams.stats();
            respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                shared.metrics.render(&counts, &streams),
            )
        }
        (&Method::GET, "/v1/runtime") => upgrade(shared, req, Endpoint::Runtime),
        (&Method::GET, "/v1/stream") => upgrade(shared, req, Endpoint::Stream),
        (&Method::GET, "/v1/runs") => runs_list(&shared, &req).await,
        (&Method::GET, _) if run_events_path(path).is_some() => run_events(shared, &req).await,
        (&Method::POST, _) if cancel => run_cancel(shared, req).await,
        (&Method::GET, _) if dashboard::serves(path) => dashboard::serve(path),
        (_, "/healthz" | "/readyz" | "/metrics" | "/v1/runtime" | "/v1/stream" | "/v1/runs") => {
            method_not_allowed()
        }
        (_, _) if run_events_path(path).is_some() || dashboard::serves(path) => {
            method_not_allowed()
        }
        (_, _) if run_cancel_path(path).is_some() => refuse(HttpRefusal::MethodNotAllowed {
            allow: Method::POST,
        }),
        _ => refuse(HttpRefusal::NoRoute),
    };
    Ok(response)
}

fn method_not_allowed() -> Response<Body> {
    refuse(HttpRefusal::MethodNotAllowed { allow: Method::GET })
}

/// The paths that give a page in a browser something: data behind a token,
/// or the dashboard. Health, readiness and metrics are for probes.
fn browser_facing(path: &str) -> bool {
    matches!(path, "/v1/runtime" | "/v1/stream" | "/v1/runs")
        || run_events_path(path).is_some()
        || run_cancel_path(path).is_some()
        || dashboard::serves(path)
}

/// 403 `FORBIDDEN` for a browser page from an origin not allowed
/// (`--allowed-origins`); `None` lets the request through (requests
/// without `Origin` always pass).
fn origin_refusal(shared: &Shared, req: &Request<Incoming>) -> Option<Response<Body>> {
    let header = |name| req.headers().get(name).map(|v| v.to_str().unwrap_or(""));
    let refused = shared
        .config
        .allowed_origins
        .check(header(header::ORIGIN), header(header::HOST))
        .err()?;
    shared.metrics.refused("origin");
    Some(refuse(HttpRefusal::Origin(refused)))
}

/// A place for one more long-lived connection of this grant's token.
fn admit(shared: &Shared, grant: &Grant) -> Result<Permit, Refused> {
    shared.admission.admit(grant.token).inspect_err(|refused| {
        shared.metrics.refused(match refused {
            Refused::GatewayFull { .. } => "max_connections",
            Refused::TokenFull { .. } => "max_sockets_per_token",
        });
    })
}

/// The `{runId}` of `/v1/runs/{runId}/events`, not yet validated.
fn run_events_path(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/runs/")?.strip_suffix("/events")
}

/// The `{runId}` of `/v1/runs/{runId}/cancel`, not yet validated.
fn run_cancel_path(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/runs/")?.strip_suffix("/cancel")
}

/// The largest `POST /v1/runs/{runId}/cancel` body read: a reason of
/// 1 KiB, escaped, fits with room to spare.
const MAX_CANCEL_BODY: usize = 8 * 1024;

/// `POST /v1/runs/{runId}/cancel` with `{"reason"?}`: `run.cancel` for
/// backends, under the same token rule.
async fn run_cancel(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let grant = match authenticate(&shared, &req, TokenKind::Viewer) {
        Ok(g) => g,
        Err(refusal) => return refuse(refusal),
    };
    let raw = run_cancel_path(req.uri().path()).unwrap_or_default();
    let Ok(run) = RunId::new(raw) else {
        return invalid_input("/path/runId", "the path does not name a valid run id");
    };
    if let Err(e) = run_cancel::check_canceller(&grant, &run) {
        return refused(&e);
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_CANCEL_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return invalid_input("/body", "the body could not be read or is over 8 KiB");
        }
    };
    let reason = match crate::protocol::commands::RunCancelBody::parse(&body) {
        Ok(b) => b.reason.map(|r| r.0),
        Err(e) => {
            let path = e
                .details
                .as_ref()
                .and_then(|d| d["path"].as_str())
                .unwrap_or("");
            return invalid_input(&format!("/body{path}"), &e.message);
        }
    };
    match run_cancel::cancel_run(shared, run, reason).await {
        Ok(answer) => respond(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(&answer).unwrap_or_default(),
        ),
        Err(e) => refused(&e),
    }
}

/// `GET /v1/runs`: the runs the viewer token covers.
async fn runs_list(shared: &Shared, req: &Request<Incoming>) -> Response<Body> {
    let grant = match authenticate(shared, req, TokenKind::Viewer) {
        Ok(g) => g,
        Err(refusal) => return refuse(refusal),
    };
    // The socket's command budget, per token: a listing is work.
    if let Err(wait) = shared
        .http_rates
        .take(grant.token, tokio::time::Instant::now())
    {
        shared.metrics.refused("max_commands_per_sec");
        let limits = &shared.config.limits;
        return refused(&errors::command_budget_spent(
            limits,
            "this token lists runs",
            wait,
        ));
    }
    let query = req.uri().query().unwrap_or("");
    let cursor = match query_param(query, "cursor").map(|c| crate::ids::RunId::new(&c)) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => return invalid_input("/query/cursor", "cursor must be a run id"),
    };
    let max = crate::protocol::commands::RUNS_LIST_MAX_LIMIT;
    let limit = match query_param(query, "limit").map(|l| l.parse::<u64>()) {
        None => max,
        Some(Ok(n)) if (1..=max).contains(&n) => n,
        Some(_) => return invalid_input("/query/limit", &format!("limit must be 1 to {max}")),
    };
    let page = runs_list::RunsPage::http(cursor, limit as usize);
    match runs_list::runs(shared, &grant, page).await {
        Ok(runs) => respond(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(&runs).unwrap_or_default(),
        ),
        Err(e) => refused(&errors::store_error(e)),
    }
}

/// `GET /v1/runs/{runId}/events`: the run's stream as Server-Sent Events.
async fn run_events(shared: Arc<Shared>, req: &Request<Incoming>) -> Response<Body> {
    let grant = match authenticate(&shared, req, TokenKind::Viewer) {
        Ok(g) => g,
        Err(refusal) => return refuse(refusal),
    };
    if shared.draining.is_cancelled() {
        return refuse(HttpRefusal::Draining);
    }
    let raw = run_events_path(req.uri().path()).unwrap_or_default();
    // Run ids use only URL-safe characters, so the path needs no decoding.
    let Ok(run) = RunId::new(raw) else {
        return invalid_input("/path/runId", "the path does not name a valid run id");
    };
    // Not `errors::forbidden_run`, which names the run: every refused run
    // gets the same body here, so none can be told from another (existing
    // or not) by its refusal.
    if !grant.runs.covers(&run) {
        return refused(&CommandError::forbidden(
            "the token does not cover this run",
        ));
    }
    let last_event_id = req
        .headers()
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("invalid"));
    let from = req.uri().query().and_then(|q| query_param(q, "from"));
    let start = match sse::Start::from_request(last_event_id, from.as_deref()) {
        Ok(s) => s,
        Err(sse::BadStart { path, message }) => return invalid_input(path, message),
    };
    // A reader that names an offset beyond this gateway's head may come
    // from another gateway over the same Redis whose copy was further on:
    // this copy catches up first, so that the offset (SSE says no epoch)
    // is not taken for another history and replayed from the start.
    let mut summary = shared.streams.summary(&run);
    if start.first_wanted() > summary.as_ref().map_or(0, |s| s.next_offset) {
        shared.streams.catch_up(&run).await;
        summary = shared.streams.summary(&run);
    }
    // A reader that has seen the whole of an ended run gets 204, the one
    // answer that makes a browser's EventSource stop reconnecting.
    if let Some(end) = summary.and_then(|s| s.end)
        && start.past_end(end.next_offset)
    {
        let mut r = respond(StatusCode::NO_CONTENT, "text/plain", Bytes::new());
        r.headers_mut().remove(header::CONTENT_TYPE);
        return r;
    }
    let permit = match admit(&shared, &grant) {
        Ok(p) => p,
        Err(refused) => return refuse(HttpRefusal::NotAdmitted(refused)),
    };
    let token_expires = shared.clock.instant(grant.expires_at);
    match sse::respond(shared, run, start, permit, token_expires) {
        Ok(response) => response,
        Err(e) => refused(&errors::stream_error(e)),
    }
}

/// The token a request carries, from the header or the query string.
fn token_of(req: &Request<Incoming>) -> Option<String> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    query_param(req.uri().query()?, "token")
}

/// One query parameter's value. Tokens and numbers need no percent-decoding
/// (JWTs are base64url with dots), so none is done.
pub(crate) fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Checks the token for `endpoint`: 401 without a valid one, 403 for the
/// wrong kind.
fn authenticate(
    shared: &Shared,
    req: &Request<Incoming>,
    want: TokenKind,
) -> Result<Grant, HttpRefusal> {
    let token = token_of(req).ok_or(HttpRefusal::NoToken)?;
    let grant = shared
        .auth
        .verify(&token)
        .map_err(|e| HttpRefusal::from(&e))?;
    if grant.kind != want {
        return Err(HttpRefusal::WrongTokenKind { want });
    }
    Ok(grant)
}

/// tungstenite's read buffer per socket: room for a small command (an
/// attach, a heartbeat) in one read; a larger message grows it, and the
/// grown buffer is kept (384 measured 270 B more per idle session than 512:
/// the loadgen's attach did not fit).
const TUNGSTENITE_READ_BUFFER: usize = 512;

/// Answers a WebSocket handshake and hands the upgraded socket to a
/// connection task.
fn upgrade(shared: Arc<Shared>, mut req: Request<Incoming>, endpoint: Endpoint) -> Response<Body> {
    if shared.draining.is_cancelled() {
        return refuse(HttpRefusal::Draining);
    }
    let want = match endpoint {
        Endpoint::Runtime => TokenKind::Runtime,
        Endpoint::Stream => TokenKind::Viewer,
    };
    let grant = match authenticate(&shared, &req, want) {
        Ok(g) => g,
        Err(refusal) => return refuse(refusal),
    };
    let response = match create_response_with_body(&req, || full(Bytes::new())) {
        Ok(r) => r,
        Err(e) => return refuse(HttpRefusal::NotAnUpgrade(e.to_string())),
    };
    // Counted from here: the 101 is about to go out.
    let permit = match admit(&shared, &grant) {
        Ok(p) => p,
        Err(refused) => return refuse(HttpRefusal::NotAdmitted(refused)),
    };
    let limits = &shared.config.limits;
    // A small read buffer and no write buffering keep an idle socket at a
    // few KiB instead of tungstenite's default ~135 KiB (ENGINEERING.md,
    // BENCHMARKS.md "Idle sessions"): tungstenite keeps its read buffer
    // for the socket's life, so it holds one small command (an attach, a
    // heartbeat); `ReadAhead` under it reads the socket in bursts, so a
    // large message still costs one system call, not one per few hundred
    // bytes.
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(TUNGSTENITE_READ_BUFFER)
        .write_buffer_size(0)
        // Room for the largest reply (one frame is buffered at a time): a
        // frame over it would fail the socket without a word.
        .max_write_buffer_size((limits.max_frame_bytes * 4).max(limits.max_reply_bytes + 64 * 1024))
        .max_message_size(Some(limits.max_frame_bytes))
        .max_frame_size(Some(limits.max_frame_bytes));
    let upgrading = hyper::upgrade::on(&mut req);
    let tasks = shared.tasks.clone();
    // The socket gets a task of its own once upgraded: this one holds what
    // only the upgrade needs (the handshake's state), the socket's task
    // holds only what the socket's life does, for hours on an idle one.
    tasks.spawn(async move {
        match upgrading.await {
            Ok(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(
                    ReadAhead::new(TokioIo::new(upgraded)),
                    Role::Server,
                    Some(ws_config),
                )
                .await;
                let tasks = shared.tasks.clone();
                tasks.spawn(connection::serve(shared, socket, endpoint, grant, permit));
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    response
}

//! The listener: accepts TCP connections and serves HTTP/1.1 on each (with
//! upgrades). It keeps accepting while the gateway drains, so `/readyz` can
//! say 503 and new upgrades are refused with a reason, and stops when told.
//!
//! Must not route or authenticate: `http` does.

use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::http;
use super::state::Shared;

/// Accepts until `stop` is cancelled.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, _peer)) => {
                let _ = tcp.set_nodelay(true);
                shared.tasks.spawn(serve_http(tcp, shared.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off briefly
                // instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_http(tcp: TcpStream, shared: Arc<Shared>) {
    let service_shared = shared.clone();
    let service = service_fn(move |req| http::route(service_shared.clone(), req));
    // A connection that arrives during a drain gets one answer, then closes.
    let draining = shared.draining.is_cancelled();
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.limits.handshake_timeout)
        .keep_alive(!draining)
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    if draining {
        let _ = conn.await;
        return;
    }
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        }
        _ = shared.draining.cancelled() => {
            // Let a request in progress finish; refuse further keep-alive ones.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

//! A fault-injecting TCP proxy for tests and the soak: it sits between a
//! client and a gateway and, on command, breaks the connections in the ways
//! real networks do.
//!
//! [`Proxy::start`] binds `127.0.0.1:0` and forwards every accepted
//! connection to a target address, copying both directions. At any time the
//! test may:
//!
//! - [`Proxy::cut_all`]: reset every current connection (`SO_LINGER` 0, so
//!   both peers get an RST, not a polite FIN). Returns once the forwarding
//!   tasks of those connections have ended and their sockets are closed;
//! - [`Proxy::stall`]: forward nothing, in either direction, for a while;
//!   the connections stay open and whatever was sent waits in the kernel
//!   buffers (or in the proxy's one-chunk buffer) until the stall ends.
//!   [`Proxy::stall_towards_client`] stalls only what the server sends,
//!   to lose an answer whose request was applied;
//! - [`Proxy::half_close`]: end every current connection's direction
//!   towards the client (a FIN to the client; what the server sends after
//!   that is dropped), leaving the client-to-server direction open;
//! - [`Proxy::refuse`]: while set, accept new connections and close them at
//!   once, without connecting to the target;
//! - [`Proxy::retarget`]: send new connections elsewhere (failover);
//! - [`Proxy::cut_matching`]: reset only the connections whose number the
//!   caller picks (a partial outage);
//! - [`Proxy::shape`]: add latency to every chunk forwarded and cap each
//!   direction's bandwidth, until shaped again. The latency is applied per
//!   chunk, in line (a chunk is held `latency`, then written, then the next
//!   one is read), so it also lowers throughput, as a long thin link does.
//!
//! Owns byte forwarding and faults only: it must not parse what it carries.
//!
//! Counters say how many connections were accepted, refused and are open.
//! Tokio only; one task per forwarded connection, and it ends when the
//! connection is cut or both directions have finished.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

/// What a connection is told to do, beyond forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Stop forwarding towards the client and send it a FIN.
    HalfClose,
    /// Reset both sockets and end.
    Cut,
}

struct Conn {
    fault: watch::Sender<Fault>,
    task: JoinHandle<()>,
}

struct Shared {
    /// Where new connections go ([`Proxy::retarget`] moves it).
    target: Mutex<SocketAddr>,
    conns: Mutex<HashMap<u64, Conn>>,
    /// Forwarding towards the server resumes at this instant (in the
    /// past: not stalled).
    stalled_to_server: watch::Sender<Instant>,
    /// The same towards the client.
    stalled_to_client: watch::Sender<Instant>,
    refusing: AtomicBool,
    shaping: watch::Sender<Shaping>,
    accepted: AtomicU64,
    refused: AtomicU64,
}

/// A proxy in front of `target`; dropping it resets every connection.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards to `target`; panics if it
    /// cannot bind (see [`Proxy::try_start`]).
    pub async fn start(target: SocketAddr) -> Proxy {
        Proxy::try_start(target).await.expect("proxy binds")
    }

    /// As [`Proxy::start`], returning the bind error.
    pub async fn try_start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            conns: Mutex::new(HashMap::new()),
            stalled_to_server: watch::Sender::new(Instant::now()),
            stalled_to_client: watch::Sender::new(Instant::now()),
            refusing: AtomicBool::new(false),
            shaping: watch::Sender::new(Shaping::default()),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let acceptor = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Proxy {
            addr,
            shared,
            acceptor,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://ADDR{path}` for this proxy.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Resets every current connection and waits until their tasks ended.
    /// Connections accepted afterwards are forwarded as usual.
    pub async fn cut_all(&self) {
        let conns: Vec<Conn> = {
            let mut map = self.shared.conns.lock().unwrap();
            map.drain().map(|(_, c)| c).collect()
        };
        for c in &conns {
            c.fault.send_replace(Fault::Cut);
        }
        for c in conns {
            // A forwarding task never panics on I/O errors; a join error
            // would be a bug in this proxy.
            c.task.await.expect("proxy connection task");
        }
    }

    /// Resets the current connections whose number (1, 2, … in accept
    /// order) `pick` selects, and waits until their tasks ended. Returns
    /// how many were cut.
    pub async fn cut_matching(&self, mut pick: impl FnMut(u64) -> bool) -> usize {
        let conns: Vec<Conn> = {
            let mut map = self.shared.conns.lock().unwrap();
            let ids: Vec<u64> = map.keys().copied().filter(|id| pick(*id)).collect();
            ids.into_iter().filter_map(|id| map.remove(&id)).collect()
        };
        let n = conns.len();
        for c in &conns {
            c.fault.send_replace(Fault::Cut);
        }
        for c in conns {
            c.task.await.expect("proxy connection task");
        }
        n
    }

    /// From now on, every chunk forwarded (either direction, every
    /// connection) waits `latency` first, and each direction of each
    /// connection forwards at most `bytes_per_sec` (`None`: no cap).
    /// `shape(Duration::ZERO, None)` ends the shaping.
    pub fn shape(&self, latency: Duration, bytes_per_sec: Option<u64>) {
        self.shared.shaping.send_replace(Shaping {
            latency,
            bytes_per_sec: bytes_per_sec.map(|b| b.max(1)),
        });
    }

    /// Sends connections accepted from now on to `target` (a failover to
    /// another node); current ones stay where they are.
    pub fn retarget(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap() = target;
    }

    /// Forwards nothing, in either direction and on every connection
    /// (including ones accepted meanwhile), until `duration` from now. A
    /// shorter stall never shortens one already in force.
    pub fn stall(&self, duration: Duration) {
        let until = Instant::now() + duration;
        extend(&self.shared.stalled_to_server, until);
        extend(&self.shared.stalled_to_client, until);
    }

    /// As [`Proxy::stall`], for the direction towards the client only:
    /// requests reach the server, its answers wait.
    pub fn stall_towards_client(&self, duration: Duration) {
        extend(&self.shared.stalled_to_client, Instant::now() + duration);
    }

    /// Ends every stall now.
    pub fn unstall(&self) {
        self.shared.stalled_to_server.send_replace(Instant::now());
        self.shared.stalled_to_client.send_replace(Instant::now());
    }

    /// Sends a FIN to the client of every current connection and drops
    /// what the server sends from then on; the client's direction stays
    /// open (so the server sees the close only once the client closes).
    pub fn half_close(&self) {
        let map = self.shared.conns.lock().unwrap();
        for c in map.values() {
            c.fault.send_if_modified(|f| {
                let change = *f == Fault::None;
                if change {
                    *f = Fault::HalfClose;
                }
                change
            });
        }
    }

    /// While `true`, new connections are accepted and closed at once.
    pub fn refuse(&self, on: bool) {
        self.shared.refusing.store(on, Ordering::SeqCst);
    }

    /// Connections accepted and forwarded so far (refused ones excluded).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections accepted and closed at once because of [`Proxy::refuse`].
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Connections currently forwarded.
    pub fn open(&self) -> usize {
        self.shared.conns.lock().unwrap().len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        for (_, c) in self.shared.conns.lock().unwrap().drain() {
            c.fault.send_replace(Fault::Cut);
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors or the like: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if shared.refusing.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        }
        let target = *shared.target.lock().unwrap();
        let server = match TcpStream::connect(target).await {
            Ok(s) => s,
            Err(_) => {
                // The target is down: the client sees its connection reset.
                let _ = client.set_zero_linger();
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        next_id += 1;
        let id = next_id;
        let (fault_tx, fault_rx) = watch::channel(Fault::None);
        // Inserted under the lock the task's own removal takes, so the
        // entry exists before the task can remove it.
        let mut map = shared.conns.lock().unwrap();
        let task = tokio::spawn(forward(id, client, server, fault_rx, shared.clone()));
        map.insert(
            id,
            Conn {
                fault: fault_tx,
                task,
            },
        );
    }
}

/// Latency and bandwidth applied to what is forwarded.
#[derive(Debug, Clone, Copy, Default)]
struct Shaping {
    latency: Duration,
    bytes_per_sec: Option<u64>,
}

/// Which way a pump copies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToServer,
    ToClient,
}

/// Forwards one connection until both directions end or it is cut.
async fn forward(
    id: u64,
    mut client: TcpStream,
    mut server: TcpStream,
    fault: watch::Receiver<Fault>,
    shared: Arc<Shared>,
) {
    {
        let (mut client_r, mut client_w) = client.split();
        let (mut server_r, mut server_w) = server.split();
        tokio::join!(
            pump(
                &mut client_r,
                &mut server_w,
                Direction::ToServer,
                fault.clone(),
                shared.stalled_to_server.subscribe(),
                shared.shaping.subscribe(),
            ),
            pump(
                &mut server_r,
                &mut client_w,
                Direction::ToClient,
                fault.clone(),
                shared.stalled_to_client.subscribe(),
                shared.shaping.subscribe(),
            ),
        );
    }
    if *fault.borrow() == Fault::Cut {
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
    drop((client, server));
    shared.conns.lock().unwrap().remove(&id);
}

/// Copies `from` to `to` until EOF, an error, or a fault that ends this
/// direction. On EOF the end is passed on (`shutdown` of the write side).
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    direction: Direction,
    mut fault: watch::Receiver<Fault>,
    mut stall: watch::Receiver<Instant>,
    shaping: watch::Receiver<Shaping>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Bytes are forwarded only outside stalls: wait before reading (so
        // the kernel buffers fill, as on a dead link) and again before
        // writing (a stall may have begun while this pump waited to read).
        let step = async {
            stall_over(&mut stall).await;
            let shape = *shaping.borrow();
            // Under a cap, read small chunks so the pace stays smooth.
            let limit = match shape.bytes_per_sec {
                Some(bps) => ((bps / 20) as usize).clamp(512, buf.len()),
                None => buf.len(),
            };
            let n = match from.read(&mut buf[..limit]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            let shape = *shaping.borrow();
            if !shape.latency.is_zero() {
                tokio::time::sleep(shape.latency).await;
            }
            stall_over(&mut stall).await;
            if to.write_all(&buf[..n]).await.is_err() {
                return false;
            }
            if let Some(bps) = shape.bytes_per_sec {
                tokio::time::sleep(Duration::from_secs_f64(n as f64 / bps as f64)).await;
            }
            true
        };
        tokio::select! {
            more = step => {
                if !more {
                    let _ = to.shutdown().await;
                    return;
                }
            }
            f = ended(&mut fault, direction) => {
                if f == Fault::HalfClose {
                    let _ = to.shutdown().await;
                }
                return;
            }
        }
    }
}

/// Resolves with the fault once one ends `direction`: a cut ends both, a
/// half-close only the direction towards the client.
async fn ended(fault: &mut watch::Receiver<Fault>, direction: Direction) -> Fault {
    loop {
        let f = *fault.borrow_and_update();
        match (f, direction) {
            (Fault::Cut, _) | (Fault::HalfClose, Direction::ToClient) => return f,
            _ => {}
        }
        if fault.changed().await.is_err() {
            // The proxy is gone: treat as a cut.
            return Fault::Cut;
        }
    }
}

/// Moves a stall's end to `until`, unless it already ends later.
fn extend(stall: &watch::Sender<Instant>, until: Instant) {
    stall.send_if_modified(|u| {
        let later = until > *u;
        if later {
            *u = until;
        }
        later
    });
}

/// Returns once no stall is in force.
async fn stall_over(stall: &mut watch::Receiver<Instant>) {
    loop {
        let until = *stall.borrow_and_update();
        if until <= Instant::now() {
            return;
        }
        tokio::select! {
            _ = sleep_until(until) => {}
            changed = stall.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Shaping, retargeting and partial cuts; the older faults are
    //! covered by the gateway's client_faults tests. Timing is only ever
    //! checked as a lower bound (a slow machine makes things slower, never
    //! faster).

    use super::*;

    /// A server that answers every chunk with `tag` followed by the chunk.
    async fn tagged_echo(tag: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(tag).await.is_err() {
                            return;
                        }
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8], tag_len: usize) -> Vec<u8> {
        s.write_all(msg).await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while got.len() < msg.len() + tag_len {
            let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
                .await
                .expect("an answer in time")
                .unwrap();
            assert!(n > 0, "the connection ended");
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn latency_delays_each_direction() {
        let proxy = Proxy::start(tagged_echo(b"").await).await;
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"hi", 0).await, b"hi");
        proxy.shape(Duration::from_millis(150), None);
        let t0 = std::time::Instant::now();
        assert_eq!(round_trip(&mut s, b"hi", 0).await, b"hi");
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
    }

    #[tokio::test]
    async fn a_bandwidth_cap_paces_the_bytes() {
        let proxy = Proxy::start(tagged_echo(b"").await).await;
        proxy.shape(Duration::ZERO, Some(20_000));
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let msg = vec![7u8; 20_000];
        let t0 = std::time::Instant::now();
        assert_eq!(round_trip(&mut s, &msg, 0).await, msg);
        // 20 kB at 20 kB/s takes a second in each direction; the two
        // overlap (the echo starts on the first chunk), and a chunk's wait
        // comes after it is written, so at least about 0.95 s in all.
        assert!(
            t0.elapsed() >= Duration::from_millis(800),
            "{:?}",
            t0.elapsed()
        );
    }

    #[tokio::test]
    async fn retarget_moves_new_connections_only() {
        let proxy = Proxy::start(tagged_echo(b"a").await).await;
        let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut old, b"1", 1).await, b"a1");
        proxy.retarget(tagged_echo(b"b").await);
        let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut new, b"2", 1).await, b"b2");
        assert_eq!(round_trip(&mut old, b"3", 1).await, b"a3");
    }

    #[tokio::test]
    async fn cut_matching_resets_only_the_picked_connections() {
        let proxy = Proxy::start(tagged_echo(b"").await).await;
        let mut conns = Vec::new();
        for _ in 0..3 {
            let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
            // A round trip, so the proxy has accepted it (numbers 1, 2, 3).
            round_trip(&mut s, b"x", 0).await;
            conns.push(s);
        }
        assert_eq!(proxy.cut_matching(|id| id == 2).await, 1);
        assert_eq!(proxy.open(), 2);
        let mut buf = [0u8; 8];
        let cut = tokio::time::timeout(Duration::from_secs(10), conns[1].read(&mut buf))
            .await
            .expect("the cut connection ends");
        assert!(matches!(cut, Ok(0) | Err(_)));
        assert_eq!(round_trip(&mut conns[0], b"y", 0).await, b"y");
        assert_eq!(round_trip(&mut conns[2], b"z", 0).await, b"z");
    }
}

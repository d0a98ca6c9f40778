//! Sockets for the load generator: the file-descriptor limit, spreading
//! connections over loopback source addresses, and the WebSocket
//! handshake with a small per-socket footprint.
//!
//! A TCP connection is named by (source address, source port, destination
//! address, destination port); with one source address there are only
//! about 28,000 ephemeral ports (`ip_local_port_range`) for one gateway
//! address. Binding each socket to 127.0.0.x before connecting multiplies
//! that by the number of source addresses: every 127.0.0.0/8 address
//! answers on Linux's loopback without configuration.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// Sockets per source address when `--sources` is not given. The
/// ephemeral range (32768–60999 by default) allows ~28,000 per address
/// pair; fewer per address also keeps the kernel's port search short.
pub(crate) const SOCKETS_PER_SOURCE: usize = 4_000;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; answers (before,
/// now). Only the hard limit bounds a process without `CAP_SYS_RESOURCE`,
/// and raising to it needs no privilege.
pub(crate) fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, lim.rlim_cur))
}

/// Source addresses handed out round-robin: 127.0.0.1 ..= 127.0.0.K when
/// the target is on loopback, else none (the kernel picks).
pub(crate) struct Sources {
    addrs: Vec<Ipv4Addr>,
    next: AtomicUsize,
}

impl Sources {
    /// `count` = 0 picks enough for `sockets`.
    pub(crate) fn new(target: SocketAddr, count: usize, sockets: usize) -> Sources {
        let loopback = matches!(target.ip(), IpAddr::V4(ip) if ip.is_loopback());
        let count = if count == 0 {
            sockets.div_ceil(SOCKETS_PER_SOURCE).max(1)
        } else {
            count
        };
        let addrs = if loopback {
            (1..=count.min(254) as u8)
                .map(|x| Ipv4Addr::new(127, 0, 0, x))
                .collect()
        } else {
            Vec::new()
        };
        Sources {
            addrs,
            next: AtomicUsize::new(0),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.addrs.len()
    }

    fn pick(&self) -> Option<Ipv4Addr> {
        if self.addrs.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.addrs[i % self.addrs.len()])
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`: `bind` then fixes only the source
/// address and `connect` picks the port, unique for the whole 4-tuple.
/// Without it, `bind(127.0.0.x:0)` searches the address's ports for a free
/// one at bind time: measured here, 6,000 connects from one address beside
/// 19,000 open sockets took 45 s of system time.
fn bind_address_no_port(socket: &TcpSocket) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: a valid descriptor, option and a c_int of the size given.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// WebSocket settings for a load socket: small read buffer, no write
/// buffering (ENGINEERING.md: ≈ 7–11 KiB per idle socket instead of
/// ≈ 135 KiB), and the gateway's 1 MiB message limit.
pub(crate) fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(Some(16 * 1024 * 1024))
        .max_frame_size(Some(16 * 1024 * 1024))
}

/// Why a connection failed, as an error-table key.
pub(crate) fn connect_error_code(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connect:refused".into(),
        io::ErrorKind::AddrNotAvailable => "connect:no_source_port".into(),
        io::ErrorKind::TimedOut => "connect:timeout".into(),
        _ if e.raw_os_error() == Some(libc::EMFILE) => "connect:too_many_open_files".into(),
        _ => format!("connect:{:?}", e.kind()).to_lowercase(),
    }
}

/// Opens `url` on `target` from the next source address with `token` as
/// a bearer token. The error is an error-table key.
pub(crate) async fn connect(
    target: SocketAddr,
    sources: &Sources,
    url: &str,
    token: &str,
    config: WebSocketConfig,
    timeout: Duration,
) -> Result<Ws, String> {
    let attempt = async {
        let socket = match target {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| connect_error_code(&e))?;
        if let Some(src) = sources.pick() {
            bind_address_no_port(&socket);
            socket
                .bind(SocketAddr::new(IpAddr::V4(src), 0))
                .map_err(|e| connect_error_code(&e))?;
        }
        let stream = socket
            .connect(target)
            .await
            .map_err(|e| connect_error_code(&e))?;
        let _ = stream.set_nodelay(true);
        let mut request = url
            .into_client_request()
            .map_err(|_| "connect:bad_url".to_owned())?;
        let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "connect:bad_token".to_owned())?;
        request.headers_mut().insert("authorization", bearer);
        match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(format!("http:{}", response.status().as_u16()))
            }
            Err(e) => Err(format!("handshake:{}", short(&e.to_string()))),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err("connect:timeout".into()),
    }
}

/// The first words of an error message, as a table key.
fn short(message: &str) -> String {
    message
        .split_whitespace()
        .take(4)
        .collect::<Vec<_>>()
        .join("_")
        .to_lowercase()
}

/// The target address of a `ws://HOST:PORT` URL.
pub(crate) async fn resolve(url: &str) -> io::Result<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the URL must be ws://"))?;
    let host_port = rest.split('/').next().unwrap_or(rest);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:80")
    };
    tokio::net::lookup_host(host_port)
        .await?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the host has no address"))
}

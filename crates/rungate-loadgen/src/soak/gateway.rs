//! The gateway process under soak: started from its binary on a fixed
//! loopback address and data directory, killed (`SIGKILL`) or drained
//! (`SIGTERM`), and started again on the same address and directory.
//!
//! Owns the child process, its log file, and the readings of its
//! `/proc/PID` (RSS, open descriptors). Must not speak the protocol:
//! readiness is a TCP connect.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// One gateway node: its binary, its address, its arguments, and the
/// process currently running (if any).
pub(crate) struct Gateway {
    bin: PathBuf,
    addr: SocketAddr,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// Times it was started.
    pub(crate) starts: u32,
}

impl Gateway {
    /// `bin serve --listen addr` plus `args`, logging stdout and stderr
    /// (appended, across restarts) to `log`.
    pub(crate) fn new(bin: &Path, addr: SocketAddr, args: Vec<String>, log: PathBuf) -> Gateway {
        Gateway {
            bin: bin.to_owned(),
            addr,
            args,
            log,
            child: None,
            starts: 0,
        }
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The running process's id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Starts it and waits (up to 60 s) until it accepts TCP connections.
    pub(crate) async fn start(&mut self) -> anyhow::Result<()> {
        let out = File::options().create(true).append(true).open(&self.log)?;
        let err = out.try_clone()?;
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--listen")
            .arg(self.addr.to_string())
            .args(&self.args)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        self.starts += 1;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                anyhow::bail!(
                    "the gateway exited at start ({status}); see {}",
                    self.log.display()
                );
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("the gateway did not listen on {} within 60 s", self.addr);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`, and waits for the process to be gone.
    pub(crate) async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// `SIGTERM`, then waits up to `limit` for the drain to finish.
    /// Returns whether it exited 0 in time (if not, it is killed).
    pub(crate) async fn drain(&mut self, limit: Duration) -> anyhow::Result<bool> {
        let Some(mut c) = self.child.take() else {
            return Ok(true);
        };
        sigterm(&c);
        match tokio::time::timeout(limit, c.wait()).await {
            Ok(status) => Ok(status?.success()),
            Err(_) => {
                c.kill().await?;
                Ok(false)
            }
        }
    }

    /// Lines of the log that show a panic.
    pub(crate) fn panics(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .map(|text| {
                text.lines()
                    .filter(|l| l.contains("panicked at") || l.contains("memory allocation"))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_addr() -> std::io::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.local_addr()
}

/// Open descriptors of `pid` (entries of `/proc/PID/fd`).
pub(crate) fn fd_count(pid: u32) -> std::io::Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// A `redis-server` of the soak's own: append-only file fsync'd on every
/// write, so a `kill -9` loses nothing it acknowledged, restarted on the
/// same port and directory.
pub(crate) struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Times it was started.
    pub(crate) starts: u32,
}

impl RedisServer {
    /// A server on a free port keeping its files in `dir` (not started).
    pub(crate) fn new(dir: PathBuf) -> std::io::Result<RedisServer> {
        std::fs::create_dir_all(&dir)?;
        Ok(RedisServer {
            port: free_addr()?.port(),
            dir,
            child: None,
            starts: 0,
        })
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it and waits until it accepts connections.
    pub(crate) async fn start(&mut self) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting redis-server: {e}"))?;
        self.child = Some(child);
        self.starts += 1;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("redis-server did not listen on port {}", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// `kill -9`.
    pub(crate) async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }
}

/// Sends `SIGTERM` to a child of ours that has not been reaped.
pub(crate) fn sigterm(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid, which has not been
        // reaped yet (we hold its handle), so it cannot be reused.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
}

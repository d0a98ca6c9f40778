//! A Redis for tests: `REDIS_URL` when set, else a `redis-server` of our own
//! on a free loopback port, stopped on drop. Without either the tests skip,
//! saying so, except under `CI=true`, where that is a failure (`.ci/run`
//! installs redis-server). Also compiled into the crate's own unit tests
//! (`redis::test_server`), so there is one copy.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestRedis {
    pub url: String,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
    /// Append-only file, fsync'd before every reply ([`start_durable`]).
    durable: bool,
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl TestRedis {
    /// Stops the server (ours only), as a crash would.
    pub fn stop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts our server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port();
        let dir = self._dir.as_ref().map(|d| d.path().to_owned());
        self.child = Some(
            spawn(port, &dir.unwrap_or_default(), self.durable).expect("restart redis-server"),
        );
        wait_listening(port);
    }

    fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(6379)
    }
}

fn spawn(port: u16, dir: &std::path::Path, durable: bool) -> std::io::Result<Child> {
    // Durable: every write is in the append-only file, fsync'd, before
    // Redis answers, so a kill -9 of the server loses nothing it acknowledged.
    let aof: &[&str] = if durable {
        &["--appendonly", "yes", "--appendfsync", "always"]
    } else {
        &["--appendonly", "no"]
    };
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(aof)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn start() -> Option<TestRedis> {
    start_with(false)
}

/// Like [`start`], but our server keeps an append-only file fsync'd on
/// every write, so [`TestRedis::stop`] then [`TestRedis::restart`] loses
/// nothing it acknowledged (for tests of a Redis crash). With `REDIS_URL`
/// the server is someone else's: durability and stopping are theirs.
#[allow(dead_code)] // The crate's unit tests include this file too.
pub fn start_durable() -> Option<TestRedis> {
    start_with(true)
}

/// Whether [`TestRedis::stop`] and [`TestRedis::restart`] act (only on a
/// server of our own, not on `REDIS_URL`).
#[allow(dead_code)]
pub fn can_stop(redis: &TestRedis) -> bool {
    redis.child.is_some()
}

fn start_with(durable: bool) -> Option<TestRedis> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Some(TestRedis {
            url,
            child: None,
            _dir: None,
            durable,
        });
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let dir = tempfile::tempdir().expect("temp dir");
    let child = match spawn(port, dir.path(), durable) {
        Ok(child) => child,
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but redis-server cannot start: {e}"
            );
            eprintln!("SKIPPED: no REDIS_URL and no redis-server ({e})");
            return None;
        }
    };
    wait_listening(port);
    Some(TestRedis {
        url: format!("redis://127.0.0.1:{port}/0"),
        child: Some(child),
        _dir: Some(dir),
        durable,
    })
}

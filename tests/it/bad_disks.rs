//! Bad disks are loud, never silent: a data directory on a full or
//! read-only filesystem is a clear error at start, and a disk that fills up
//! while runtimes publish refuses publishes with a retryable error, loses
//! nothing it acknowledged and corrupts nothing (a restart with space again
//! has every acknowledged event once, in order, under the same epoch).
//!
//! The filesystems are small tmpfs mounts made by the test (the gateway
//! runs as root here, so permission bits prove nothing about read-only).
//! Mounting needs CAP_SYS_ADMIN: without it these tests skip loudly, except
//! under `CI=true`, where they fail.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::*;
use rungate::auth::{AuthKey, TokenKind};
use rungate::ids::Capability;
use serde_json::{Value, json};

/// A tmpfs of `size` mounted on a fresh temporary directory, unmounted on
/// drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (after saying so) when this machine does not let the test
    /// mount; panics under `CI=true`, where skipping would hide a failure.
    fn mount(size: &str, options: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}{options}")])
            .arg("rungate-test")
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true but cannot mount a tmpfs: {why}"
                );
                eprintln!("SKIPPED: cannot mount a tmpfs here ({why}); bad-disk tests need root");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, options: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(self.path())
            .status()
            .expect("mount");
        assert!(status.success(), "remount {options}");
    }

    /// Fills the filesystem but for about `leave` bytes, with a file the
    /// test can delete to free the space again.
    fn fill_leaving(&self, leave: u64) -> PathBuf {
        let stat = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .expect("df");
        let text = String::from_utf8_lossy(&stat.stdout);
        let avail: u64 = text
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the available bytes");
        let filler = self.path().join("filler");
        let size = avail.saturating_sub(leave);
        std::fs::write(&filler, vec![0u8; size as usize]).expect("write filler");
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a gateway still closing must not make the unmount fail.
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// Runs `rungate serve` expecting it to fail at start; returns stderr.
fn start_error(data_dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rungate"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("RUNGATE_LOG", "warn")
        .output()
        .expect("run rungate");
    assert!(!out.status.success(), "rungate started on a bad disk");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("listening on"),
        "it must not listen: {stdout}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_read_only_data_directory_is_a_clear_error_at_start() {
    let Some(fs) = Tmpfs::mount("4m", "") else {
        return;
    };
    let data = fs.path().join("data");
    std::fs::create_dir(&data).unwrap();
    fs.remount("ro");
    let err = start_error(&data);
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(
        err.contains(&*data.to_string_lossy()),
        "names the path: {err}"
    );
}

#[test]
fn a_full_disk_is_a_clear_error_at_start() {
    let Some(fs) = Tmpfs::mount("4m", "") else {
        return;
    };
    let data = fs.path().join("data");
    std::fs::create_dir(&data).unwrap();
    fs.fill_leaving(0);
    let err = start_error(&data);
    assert!(err.contains("No space left on device"), "{err}");
}

/// Publishes batches of 50 events of ~1 KiB until the log refuses one;
/// returns the data of every acknowledged event and the refusal.
async fn publish_until_refused(rt: &mut Client, sid: &Value, run: &str) -> (Vec<Value>, Value) {
    let mut acked = Vec::new();
    for batch in 0..10_000u64 {
        let events: Vec<Value> = (0..50)
            .map(|i| {
                json!({ "type": "log", "seq": batch * 50 + i,
                        "data": { "n": batch * 50 + i, "pad": "x".repeat(1000) } })
            })
            .collect();
        let answer = rt
            .call(
                "events.publish",
                json!({ "sessionId": sid, "runId": run, "events": events }),
            )
            .await;
        if answer.get("error").is_some() {
            return (acked, answer);
        }
        assert_eq!(answer["payload"]["accepted"], true, "{answer}");
        acked.extend(events.iter().map(|e| e["data"].clone()));
    }
    panic!("the disk never filled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_up_refuses_publishes_and_loses_nothing_acknowledged() {
    let Some(fs) = Tmpfs::mount("16m", "") else {
        return;
    };
    let data = fs.path().join("data");
    let gw = GatewayProcess::spawn(&data, &[]).await;
    let key = AuthKey::load_or_create(&data.join("auth.key")).unwrap();
    let token = mint(&key, TokenKind::Runtime, "*", &Capability::ALL);
    let viewer_token = mint(&key, TokenKind::Viewer, "*", &[]);
    // Leave about 1 MiB: a few dozen batches fit, then the log's write fails.
    let filler = fs.fill_leaving(1 << 20);

    let mut rt = Client::connect(&gw.url("/v1/runtime"), &token).await;
    let sid = rt.attach("full", "w", &[]).await["sessionId"].clone();
    let (acked, refused) = publish_until_refused(&mut rt, &sid, "full").await;
    assert!(!acked.is_empty(), "some batches fit before the disk filled");
    println!("{} events acknowledged before: {refused}", acked.len());
    assert_eq!(refused["error"]["code"], "INTERNAL", "{refused}");
    assert_eq!(refused["error"]["retryable"], true, "{refused}");
    // Still refused (the log does not guess what is on disk), still serving
    // everything else, and the gateway says it is not ready.
    let again = rt
        .call(
            "events.publish",
            json!({ "sessionId": sid, "runId": "full", "events": [{ "type": "log", "data": {} }] }),
        )
        .await;
    assert_eq!(again["error"]["retryable"], true, "{again}");
    rt.ok(
        "runtime.heartbeat",
        json!({ "sessionId": sid, "runId": "full" }),
    )
    .await;
    let ready = rungate_test_support::http::get(gw.addr, "/readyz", &[]).await;
    assert_eq!(ready.status, 503);
    let (epoch, seen) = read_stream(&gw.url("/v1/stream"), &viewer_token, "full").await;
    assert_eq!(seen, acked, "exactly the acknowledged events, in order");
    gw.kill().await;

    // Space again, and a restart: everything acknowledged is there once,
    // under the same epoch, and publishing works again.
    std::fs::remove_file(filler).unwrap();
    let gw = GatewayProcess::spawn(&data, &[]).await;
    let (epoch_after, seen) = read_stream(&gw.url("/v1/stream"), &viewer_token, "full").await;
    assert_eq!(epoch_after, epoch);
    assert_eq!(seen, acked);
    let mut rt = Client::connect(&gw.url("/v1/runtime"), &token).await;
    let moved = rt.reattach("full", "w", 1, &[]).await;
    assert_eq!(moved["payload"]["sessionId"], sid, "{moved}");
    let next_seq = acked.len() as u64 + 1_000;
    rt.ok(
        "events.publish",
        json!({ "sessionId": sid, "runId": "full",
                "events": [{ "type": "log", "seq": next_seq, "data": { "after": true } }] }),
    )
    .await;
    let (_, seen) = read_stream(&gw.url("/v1/stream"), &viewer_token, "full").await;
    assert_eq!(seen.len(), acked.len() + 1);
    assert_eq!(seen.last(), Some(&json!({ "after": true })));
    gw.kill().await;
}

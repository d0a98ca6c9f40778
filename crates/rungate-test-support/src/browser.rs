//! Headless Chromium for tests that look at a page as a person would,
//! driven over the DevTools protocol with `chromiumoxide`.
//!
//! The browser is Debian's `chromium` package (`/usr/bin/chromium`, or
//! `RUNGATE_CHROMIUM`), started with a fresh profile in a temporary
//! directory and a DevTools port the browser picks itself
//! (`--remote-debugging-port=0`; the crate reads the address from its
//! stderr). [`chromium`] decides what a missing browser means: under CI
//! (`CI=true`) a failure, elsewhere a loudly announced skip.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chromiumoxide::Page;
use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::cdp::browser_protocol::page::CaptureScreenshotFormat;
use chromiumoxide::cdp::js_protocol::runtime::EventExceptionThrown;
use chromiumoxide::page::ScreenshotParams;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use tokio::task::JoinHandle;

/// Where Debian's `chromium` package puts the browser.
pub const DEFAULT_CHROMIUM: &str = "/usr/bin/chromium";

/// The command that installs it.
pub const INSTALL: &str = "sudo apt-get install -y chromium";

/// The browser to run, or `None` if it is missing and the test should
/// skip. Panics instead of skipping under CI.
pub fn chromium(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("RUNGATE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CHROMIUM));
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test}: no browser at {} and CI=true, so this is a failure, not a skip. \
             .ci/run installs it; by hand: {INSTALL}",
            path.display()
        );
    }
    let rule = "!".repeat(78);
    // Straight to the stream, not `eprintln!`, which the test harness
    // captures and hides for a test that passes.
    let _ = writeln!(
        std::io::stderr(),
        "\n{rule}\n!! SKIPPED {test}: no Chromium at {}\n!! Install it to run this browser test:  {INSTALL}\n!! (under CI=true a missing browser fails instead)\n{rule}\n",
        path.display()
    );
    None
}

/// One headless browser process and the task that pumps its DevTools
/// connection. Killed when dropped if [`Headless::close`] was not called.
pub struct Headless {
    pub browser: Browser,
    pump: JoinHandle<()>,
    _profile: tempfile::TempDir,
}

impl Headless {
    pub async fn launch(executable: &Path) -> Headless {
        let profile = tempfile::tempdir().expect("profile dir");
        let config = BrowserConfig::builder()
            .chrome_executable(executable)
            .user_data_dir(profile.path())
            .no_sandbox()
            .window_size(1400, 900)
            .viewport(None)
            // Two busy cores: a cold start can be slow.
            .launch_timeout(Duration::from_secs(60))
            .request_timeout(Duration::from_secs(30))
            .args([
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--password-store=basic",
            ])
            .build()
            .expect("browser config");
        let (browser, mut handler) = Browser::launch(config)
            .await
            .unwrap_or_else(|e| panic!("start {}: {e}", executable.display()));
        // The handler must be polled for any command to complete. A message
        // the crate cannot parse (a newer browser's event) is an error for
        // that message only, so keep going until the connection ends.
        let pump = tokio::spawn(async move { while handler.next().await.is_some() {} });
        Headless {
            browser,
            pump,
            _profile: profile,
        }
    }

    /// A new tab at `url`, once it has loaded.
    pub async fn open(&self, url: &str) -> Tab {
        let page = self.browser.new_page(url).await.expect("open a tab");
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut thrown = page
            .event_listener::<EventExceptionThrown>()
            .await
            .expect("listen for exceptions");
        let sink = errors.clone();
        tokio::spawn(async move {
            while let Some(e) = thrown.next().await {
                let d = &e.exception_details;
                let what = d
                    .exception
                    .as_ref()
                    .and_then(|x| x.description.clone())
                    .unwrap_or_else(|| d.text.clone());
                sink.lock()
                    .push(format!("{what} at {}:{}", d.line_number, d.column_number));
            }
        });
        Tab { page, errors }
    }

    pub async fn close(mut self) {
        let _ = self.browser.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.browser.wait()).await;
        self.pump.abort();
    }
}

/// One tab, and the uncaught JavaScript exceptions it has thrown since it
/// opened.
pub struct Tab {
    pub page: Page,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Tab {
    /// Evaluates `expr` in the page (awaiting it if it is a promise) and
    /// returns its value, which must survive `JSON.stringify`.
    pub async fn eval<T: DeserializeOwned>(&self, expr: &str) -> T {
        let wrapped = format!("(async () => JSON.stringify(await ({expr})))()");
        let result = tokio::time::timeout(Duration::from_secs(30), self.page.evaluate(wrapped))
            .await
            .unwrap_or_else(|_| panic!("no answer in time from: {expr}"))
            .unwrap_or_else(|e| panic!("evaluate {expr}: {e}"));
        let text: String = result
            .into_value()
            .unwrap_or_else(|e| panic!("{expr} gave no JSON text: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{expr} gave {text}: {e}"))
    }

    /// Polls `expr` every 100 ms until it is `true`; panics with `what`
    /// (and the last value of `show`) after `limit`.
    pub async fn wait_until(&self, what: &str, expr: &str, show: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.eval::<bool>(expr).await {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let seen: serde_json::Value = self.eval(show).await;
                panic!("gave up after {limit:?} waiting for {what}; the page shows {seen}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Uncaught exceptions so far.
    pub fn exceptions(&self) -> Vec<String> {
        self.errors.lock().clone()
    }

    /// A PNG of the whole page at `path`.
    pub async fn screenshot(&self, path: &Path) -> Result<(), String> {
        let params = ScreenshotParams::builder()
            .format(CaptureScreenshotFormat::Png)
            .full_page(true)
            .build();
        let png = tokio::time::timeout(Duration::from_secs(30), self.page.screenshot(params))
            .await
            .map_err(|_| "screenshot timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        std::fs::write(path, png).map_err(|e| e.to_string())
    }
}

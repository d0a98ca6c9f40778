//! Per-run config and secrets from the `[[runs]]` entries of the `--config`
//! TOML file, and reloading that file when it changes.
//!
//! Owns how entries combine for one run (precedence by pattern specificity)
//! and the config `version` a runtime uses to notice changes. Ignores every
//! other top-level table: those belong to whoever reads the rest of the file.
//! Must never let a secret value reach an error message, a log line or
//! `Debug` output, and must not decide who may read secrets (that is the
//! `secrets.read` capability, checked by the gateway).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::auth::RunPattern;
use crate::ids::RunId;

/// How often `current()` may look at the file. Between looks it answers from
/// memory, so calling it per request costs a lock and an `Arc` clone.
const RECHECK_INTERVAL: Duration = Duration::from_millis(250);

/// A secret value. Prints as `[redacted]` everywhere; only `expose` gives
/// the text, so every use of a secret is easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The effective config and secrets for one run.
#[derive(Debug, Clone)]
pub struct ResolvedRun {
    pub config: Map<String, Value>,
    /// 16 lowercase hex digits; changes exactly when `config` changes.
    pub version: String,
    pub secrets: BTreeMap<String, Secret>,
}

/// Why the config file was refused. Messages name places (file, line,
/// entry, key), never secret values.
#[derive(Debug, thiserror::Error)]
pub enum RunConfigError {
    #[error("config file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{message}", location(.path, .line, .column))]
    Invalid {
        path: Option<PathBuf>,
        /// 1-based, where the TOML parser could point at the problem.
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
}

fn location(path: &Option<PathBuf>, line: &Option<usize>, column: &Option<usize>) -> String {
    let mut s = match path {
        Some(p) => format!("config file {}", p.display()),
        None => "config".to_owned(),
    };
    if let Some(l) = line {
        s.push_str(&format!(", line {l}"));
        if let Some(c) = column {
            s.push_str(&format!(", column {c}"));
        }
    }
    s.push_str(": ");
    s
}

impl RunConfigError {
    fn invalid(line: Option<usize>, message: String) -> RunConfigError {
        RunConfigError::Invalid {
            path: None,
            line,
            column: None,
            message,
        }
    }

    fn with_path(mut self, p: &Path) -> RunConfigError {
        if let RunConfigError::Invalid { path, .. } = &mut self {
            *path = Some(p.to_owned());
        }
        self
    }
}

/// The file's shape as far as this module cares. No `deny_unknown_fields`
/// here: other top-level tables belong to other readers.
#[derive(Deserialize)]
struct FileShape {
    #[serde(default)]
    runs: Vec<EntryShape>,
}

/// One `[[runs]]` entry. Unknown members are refused: a misspelt `secret`
/// silently doing nothing would be worse than an error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryShape {
    pattern: RunPattern,
    #[serde(default)]
    config: toml::Table,
    /// Taken as any value and checked by hand: serde's type errors quote the
    /// offending value, which here would be a secret.
    #[serde(default)]
    secrets: Option<toml::Spanned<toml::Value>>,
}

#[derive(Debug, Clone)]
struct Entry {
    pattern: RunPattern,
    config: Map<String, Value>,
    secrets: BTreeMap<String, Secret>,
}

/// All `[[runs]]` entries, ordered least to most specific (ties keep file
/// order), so resolving is one pass where later matches override.
#[derive(Debug, Clone, Default)]
pub struct RunDirectory {
    entries: Vec<Entry>,
}

impl RunDirectory {
    pub fn from_toml_str(s: &str) -> Result<RunDirectory, RunConfigError> {
        let file: FileShape = toml::from_str(s).map_err(|e| {
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = line_col(s, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            // `message()` only, never the error's `Display`: that quotes the
            // source line, which may hold a secret.
            RunConfigError::Invalid {
                path: None,
                line,
                column,
                message: e.message().to_owned(),
            }
        })?;

        let mut entries = Vec::with_capacity(file.runs.len());
        for (i, raw) in file.runs.into_iter().enumerate() {
            let what = format!("runs[{i}] (pattern \"{}\")", raw.pattern);
            let mut config = Map::new();
            for (k, v) in raw.config {
                let v = toml_to_json(v).map_err(|why| {
                    RunConfigError::invalid(None, format!("{what}: config.{k}{why}"))
                })?;
                config.insert(k, v);
            }
            let mut secrets = BTreeMap::new();
            if let Some(spanned) = raw.secrets {
                let line = Some(line_col(s, spanned.span().start).0);
                match spanned.into_inner() {
                    toml::Value::Table(t) => {
                        for (k, v) in t {
                            match v {
                                toml::Value::String(v) => {
                                    secrets.insert(k, Secret(v));
                                }
                                other => {
                                    return Err(RunConfigError::invalid(
                                        line,
                                        format!(
                                            "{what}: secret `{k}` must be a string, found {}",
                                            other.type_str()
                                        ),
                                    ));
                                }
                            }
                        }
                    }
                    other => {
                        return Err(RunConfigError::invalid(
                            line,
                            format!(
                                "{what}: `secrets` must be a table, found {}",
                                other.type_str()
                            ),
                        ));
                    }
                }
            }
            entries.push(Entry {
                pattern: raw.pattern,
                config,
                secrets,
            });
        }
        // Stable: equal specificity keeps file order, so the later entry is
        // applied later and wins.
        entries.sort_by_key(|e| e.pattern.specificity());
        Ok(RunDirectory { entries })
    }

    /// Every matching entry, least specific first, shallow-merged.
    pub fn resolve(&self, run: &RunId) -> ResolvedRun {
        let mut config = Map::new();
        let mut secrets = BTreeMap::new();
        for e in self.entries.iter().filter(|e| e.pattern.matches(run)) {
            config.extend(e.config.iter().map(|(k, v)| (k.clone(), v.clone())));
            secrets.extend(e.secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let version = config_version(&config);
        ResolvedRun {
            config,
            version,
            secrets,
        }
    }

    /// How many `[[runs]]` entries the file had.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// 1-based line and column (in characters) of byte `offset` in `s`.
fn line_col(s: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(s.len());
    let before = s.get(..offset).unwrap_or(s);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// TOML to JSON. Datetimes become their RFC 3339 text (local dates and
/// times, which have no offset, their TOML text). The error is the path
/// suffix plus reason, e.g. `.limits[2] is not a finite number`.
fn toml_to_json(v: toml::Value) -> Result<Value, String> {
    Ok(match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => match serde_json::Number::from_f64(f) {
            Some(n) => Value::Number(n),
            // JSON has no NaN or infinity; refusing beats silently sending null.
            None => return Err(" is not a finite number (JSON cannot carry nan or inf)".to_owned()),
        },
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| toml_to_json(v).map_err(|why| format!("[{i}]{why}")))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(t) => {
            let mut m = Map::new();
            for (k, v) in t {
                let v = toml_to_json(v).map_err(|why| format!(".{k}{why}"))?;
                m.insert(k, v);
            }
            Value::Object(m)
        }
    })
}

/// 16 hex digits of FNV-1a over the config's canonical JSON. Keys are sorted
/// here explicitly rather than trusting `Map`'s order, which becomes
/// insertion order if any crate in the build enables serde_json's
/// `preserve_order`.
fn config_version(config: &Map<String, Value>) -> String {
    let mut text = String::new();
    write_canonical_object(config, &mut text);
    format!("{:016x}", fnv1a64(text.as_bytes()))
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => write_canonical_object(m, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn write_canonical_object(m: &Map<String, Value>, out: &mut String) {
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    out.push('{');
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Value::String(k.clone()).to_string());
        out.push(':');
        if let Some(v) = m.get(k) {
            write_canonical(v, out);
        }
    }
    out.push('}');
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET_BASIS, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    let meta = std::fs::metadata(path)?;
    Ok(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}

#[derive(Debug)]
struct Watched {
    path: PathBuf,
    stamp: Option<FileStamp>,
    checked_at: Instant,
}

#[derive(Debug)]
struct SourceState {
    dir: Arc<RunDirectory>,
    /// `None` for a fixed directory.
    watched: Option<Watched>,
}

/// The run directory, kept in step with the config file.
#[derive(Debug)]
pub struct RunConfigSource {
    state: Mutex<SourceState>,
}

impl RunConfigSource {
    /// Reads and parses the file; unlike later reloads, any problem here is
    /// an error, so a broken file stops the gateway from starting.
    pub fn load(path: &Path) -> Result<RunConfigSource, RunConfigError> {
        let (dir, stamp) = read_file(path)?;
        Ok(RunConfigSource {
            state: Mutex::new(SourceState {
                dir: Arc::new(dir),
                watched: Some(Watched {
                    path: path.to_owned(),
                    stamp,
                    checked_at: Instant::now(),
                }),
            }),
        })
    }

    /// A directory that never changes (no config file, or tests).
    pub fn fixed(dir: RunDirectory) -> RunConfigSource {
        RunConfigSource {
            state: Mutex::new(SourceState {
                dir: Arc::new(dir),
                watched: None,
            }),
        }
    }

    /// The current directory, reloading the file first if it changed. A
    /// file that no longer parses (or vanished) keeps the last good
    /// directory in force: a typo while editing must not drop every run's
    /// config and secrets.
    pub fn current(&self) -> Arc<RunDirectory> {
        let mut state = self.state.lock();
        let SourceState { dir, watched } = &mut *state;
        let Some(w) = watched else {
            return dir.clone();
        };
        let now = Instant::now();
        if now.duration_since(w.checked_at) < RECHECK_INTERVAL {
            return dir.clone();
        }
        w.checked_at = now;
        let new_stamp = stamp(&w.path).ok();
        if new_stamp == w.stamp {
            return dir.clone();
        }
        // Remember the stamp even if the reload fails, so a broken file is
        // reported once per change rather than every interval.
        w.stamp = new_stamp;
        if new_stamp.is_none() {
            tracing::warn!(path = %w.path.display(), "run config file is gone; keeping the previous config");
            return dir.clone();
        }
        match read_file(&w.path) {
            Ok((new_dir, _)) => {
                tracing::info!(path = %w.path.display(), entries = new_dir.len(), "reloaded run config");
                *dir = Arc::new(new_dir);
            }
            Err(e) => {
                tracing::warn!(error = %e, "run config file no longer valid; keeping the previous config");
            }
        }
        dir.clone()
    }
}

/// Stats, then reads: if the file changes in between, the stamp is older
/// than the content and the next check simply reloads again.
fn read_file(path: &Path) -> Result<(RunDirectory, Option<FileStamp>), RunConfigError> {
    let io_err = |source| RunConfigError::Io {
        path: path.to_owned(),
        source,
    };
    let st = stamp(path).map_err(io_err)?;
    let text = std::fs::read_to_string(path).map_err(io_err)?;
    let dir = RunDirectory::from_toml_str(&text).map_err(|e| e.with_path(path))?;
    Ok((dir, Some(st)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &str) -> RunId {
        RunId::new(s).unwrap()
    }

    const LAYERED: &str = r#"
[gateway]
listen = "0.0.0.0:1"
whatever = { nested = [1, 2] }

[[runs]]
pattern = "*"
config = { model = "base", level = "all", stars = 1 }
secrets = { TOKEN = "from-star" }

[[runs]]
pattern = "demo-*"
[runs.config]
model = "demo"
level = "demo"
[runs.secrets]
TOKEN = "from-demo"
API_KEY = "demo-key"

[[runs]]
pattern = "demo-long-*"
config = { level = "demo-long" }

[[runs]]
pattern = "demo-long-1"
config = { level = "exact" }

[[runs]]
pattern = "demo-*"
config = { model = "demo-later" }
"#;

    #[test]
    fn precedence() {
        let dir = RunDirectory::from_toml_str(LAYERED).unwrap();
        assert_eq!(dir.len(), 5);

        let r = dir.resolve(&run("demo-long-1"));
        assert_eq!(r.config["level"], "exact");
        // Two "demo-*" entries: the later one wins the tie.
        assert_eq!(r.config["model"], "demo-later");
        assert_eq!(r.config["stars"], 1);
        assert_eq!(r.secrets["TOKEN"].expose(), "from-demo");
        assert_eq!(r.secrets["API_KEY"].expose(), "demo-key");

        let r = dir.resolve(&run("demo-long-2"));
        assert_eq!(r.config["level"], "demo-long");

        let r = dir.resolve(&run("demo-x"));
        assert_eq!(r.config["level"], "demo");

        let r = dir.resolve(&run("other"));
        assert_eq!(r.config["level"], "all");
        assert_eq!(r.config["model"], "base");
        assert_eq!(r.secrets["TOKEN"].expose(), "from-star");
        assert!(!r.secrets.contains_key("API_KEY"));

        // Nothing matches: empty, but still versioned.
        let r = RunDirectory::default().resolve(&run("x"));
        assert!(r.config.is_empty() && r.secrets.is_empty());
        assert_eq!(r.version.len(), 16);
    }

    #[test]
    fn secrets_stay_redacted() {
        let dir = RunDirectory::from_toml_str(LAYERED).unwrap();
        let r = dir.resolve(&run("demo-1"));
        let s = &r.secrets["API_KEY"];
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{s:?}"), "[redacted]");
        for shown in [format!("{r:?}"), format!("{dir:?}")] {
            assert!(
                !shown.contains("demo-key") && !shown.contains("from-demo"),
                "{shown}"
            );
        }
    }

    #[test]
    fn errors_never_show_secret_values() {
        let cases = [
            // Non-string secret.
            "[[runs]]\npattern = \"a\"\n[runs.secrets]\nPIN = 918273\n",
            // Secrets not a table.
            "[[runs]]\npattern = \"a\"\nsecrets = \"hunter2-918273\"\n",
            // Syntax error on a secret's line.
            "[[runs]]\npattern = \"a\"\n[runs.secrets]\nKEY = \"hunter2-918273\n",
            "[[runs]]\npattern = \"a\"\n[runs.secrets]\nKEY = hunter2-918273\n",
        ];
        for toml in cases {
            let err = RunDirectory::from_toml_str(toml).unwrap_err();
            let msg = err.to_string();
            assert!(!msg.contains("918273"), "{msg}");
            assert!(!format!("{err:?}").contains("918273"), "{err:?}");
            assert!(msg.contains("line 3") || msg.contains("line 4"), "{msg}");
        }
        let msg = RunDirectory::from_toml_str(cases[0])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("secret `PIN` must be a string, found integer"),
            "{msg}"
        );
        assert!(msg.contains("runs[0]"), "{msg}");
    }

    #[test]
    fn unknown_members_and_bad_patterns_refused() {
        let err =
            RunDirectory::from_toml_str("[[runs]]\npattern = \"a\"\nsecret = { A = \"b\" }\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("unknown field `secret`") && err.contains("line 3"),
            "{err}"
        );

        let err = RunDirectory::from_toml_str("[[runs]]\npattern = \"a*b\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad run pattern") && err.contains("line 2"),
            "{err}"
        );

        assert!(RunDirectory::from_toml_str("[[runs]]\nconfig = {}\n").is_err());
        let err = RunDirectory::from_toml_str("[[runs]]\npattern = \"a\"\nconfig = { x = nan }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.x is not a finite number"), "{err}");
    }

    #[test]
    fn other_tables_ignored_and_empty_files_fine() {
        assert!(RunDirectory::from_toml_str("").unwrap().is_empty());
        let dir =
            RunDirectory::from_toml_str("[gateway]\nlisten = 5\n[other.deep]\nx = [1]\n").unwrap();
        assert!(dir.is_empty());
    }

    #[test]
    fn toml_values_become_json() {
        let dir = RunDirectory::from_toml_str(
            r#"
[[runs]]
pattern = "a"
[runs.config]
when = 1979-05-27T07:32:00Z
day = 1979-05-27
f = 1.5
list = [1, "two", { three = true }]
"#,
        )
        .unwrap();
        let c = dir.resolve(&run("a")).config;
        assert_eq!(c["when"], "1979-05-27T07:32:00Z");
        assert_eq!(c["day"], "1979-05-27");
        assert_eq!(c["f"], 1.5);
        assert_eq!(c["list"], serde_json::json!([1, "two", {"three": true}]));
    }

    #[test]
    fn version_tracks_effective_config() {
        let a = RunDirectory::from_toml_str(
            "[[runs]]\npattern = \"*\"\nconfig = { x = 1, y = { b = 2, a = 1 } }\n",
        )
        .unwrap();
        let b = RunDirectory::from_toml_str(
            "[[runs]]\npattern = \"*\"\nsecrets = { S = \"changed\" }\n[runs.config]\ny = { a = 1, b = 2 }\nx = 1\n",
        )
        .unwrap();
        let c = RunDirectory::from_toml_str(
            "[[runs]]\npattern = \"*\"\nconfig = { x = 2, y = { b = 2, a = 1 } }\n",
        )
        .unwrap();
        let va = a.resolve(&run("r")).version;
        assert_eq!(va, a.resolve(&run("r")).version);
        assert_eq!(va, a.resolve(&run("other")).version);
        // Same config written differently, different secrets: same version.
        assert_eq!(va, b.resolve(&run("r")).version);
        assert_ne!(va, c.resolve(&run("r")).version);
        assert!(va.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) && va.len() == 16);
        // Pinned: the version is part of what runtimes see, so it must not
        // drift between builds.
        assert_eq!(
            config_version(&Map::new()),
            format!("{:016x}", fnv1a64(b"{}"))
        );
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn fixed_source_never_changes() {
        let src = RunConfigSource::fixed(RunDirectory::from_toml_str(LAYERED).unwrap());
        assert_eq!(src.current().len(), 5);
    }

    #[test]
    fn reloads_on_change_and_keeps_old_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rungate.toml");
        std::fs::write(&path, "[[runs]]\npattern = \"*\"\nconfig = { v = 1 }\n").unwrap();
        let src = RunConfigSource::load(&path).unwrap();
        let v1 = src.current().resolve(&run("r")).version;

        std::fs::write(
            &path,
            "[[runs]]\npattern = \"*\"\nconfig = { v = 2, more = true }\n",
        )
        .unwrap();
        std::thread::sleep(RECHECK_INTERVAL + Duration::from_millis(50));
        let now = src.current().resolve(&run("r"));
        assert_ne!(now.version, v1);
        assert_eq!(now.config["v"], 2);
        let v2 = now.version;

        std::fs::write(&path, "[[runs]]\npattern = \"*\"\nconfig = { v = 3 \n").unwrap();
        std::thread::sleep(RECHECK_INTERVAL + Duration::from_millis(50));
        assert_eq!(src.current().resolve(&run("r")).version, v2);

        // Fixed again: picked up.
        std::fs::write(&path, "[[runs]]\npattern = \"*\"\nconfig = { v = 4 }\n").unwrap();
        std::thread::sleep(RECHECK_INTERVAL + Duration::from_millis(50));
        assert_eq!(src.current().resolve(&run("r")).config["v"], 4);

        // A broken file at startup is an error with the path in it.
        std::fs::write(&path, "[[runs]\n").unwrap();
        let err = RunConfigSource::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("rungate.toml") && err.contains("line 1"),
            "{err}"
        );
        assert!(RunConfigSource::load(&dir.path().join("missing.toml")).is_err());
    }
}

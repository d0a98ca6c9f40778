//! Tokens: the HMAC key, minting and checking JWTs, run patterns and scopes.
//!
//! Owns what a token may say (kind, runs, capabilities, expiry, tenant) and the one
//! signing scheme (HS256 with a secret kept in a key file). It answers
//! "who is this and what may they touch"; it does not decide what happens
//! to a request (HTTP status codes, refusals on the wire are the gateway's).
//! Must never put token text or key material into errors, logs or `Debug`
//! output: errors are shown to clients and written to logs.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{Capabilities, Capability, MAX_ID_LEN, RunId};
use crate::time::Timestamp;

/// Bytes of randomness in a freshly created key file.
const KEY_BYTES: usize = 32;

/// Why a token, pattern, TTL or key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    /// The reason is a fixed description chosen here, never text copied out
    /// of the token.
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("bad run pattern {0}: expected a run id or a prefix ending in `*`")]
    BadPattern(String),
    #[error("bad ttl {0}: expected a positive number of seconds, optionally with s, m, h or d")]
    BadTtl(String),
    #[error("bad tenant {0}: expected 1 to {MAX_TENANT_LEN} visible ASCII characters")]
    BadTenant(String),
    #[error("auth key file {}: {reason}", path.display())]
    KeyFile { path: PathBuf, reason: String },
}

/// Who a token is for: a runtime executing runs, or a viewer watching them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    Runtime,
    Viewer,
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenKind::Runtime => "runtime",
            TokenKind::Viewer => "viewer",
        })
    }
}

/// An exact run id, or a prefix ending in `*` (`build-*`; `*` alone matches
/// every run). `*` can never be part of a run id, so the two cannot be
/// confused.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RunPattern {
    /// As written, including the trailing `*` of a prefix.
    text: String,
    is_prefix: bool,
}

impl RunPattern {
    pub fn parse(s: &str) -> Result<RunPattern, AuthError> {
        let bad = || AuthError::BadPattern(format!("{s:?}"));
        if s.is_empty() {
            return Err(bad());
        }
        match s.strip_suffix('*') {
            Some(prefix) => {
                // The prefix itself may be empty ("*"), but otherwise must be
                // the start of some valid run id; a prefix longer than any run
                // id could never match and is almost certainly a mistake.
                let valid_chars = prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
                if !valid_chars || prefix.len() > MAX_ID_LEN {
                    return Err(bad());
                }
                Ok(RunPattern {
                    text: s.to_owned(),
                    is_prefix: true,
                })
            }
            None => {
                RunId::new(s).map_err(|_| bad())?;
                Ok(RunPattern {
                    text: s.to_owned(),
                    is_prefix: false,
                })
            }
        }
    }

    pub fn matches(&self, run: &RunId) -> bool {
        if self.is_prefix {
            run.as_str().starts_with(self.prefix())
        } else {
            run.as_str() == self.text
        }
    }

    pub fn is_exact(&self) -> bool {
        !self.is_prefix
    }

    /// Orders patterns that match the same run: an exact id outranks every
    /// prefix, and a longer prefix outranks a shorter one.
    pub fn specificity(&self) -> usize {
        if self.is_prefix {
            // At most MAX_ID_LEN, enforced by `parse`.
            self.prefix().len()
        } else {
            MAX_ID_LEN + 1
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The id an exact pattern names, or the prefix before a prefix's `*`.
    pub fn prefix(&self) -> &str {
        self.text.strip_suffix('*').unwrap_or(&self.text)
    }
}

impl fmt::Display for RunPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for RunPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl std::str::FromStr for RunPattern {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, AuthError> {
        RunPattern::parse(s)
    }
}

impl Serialize for RunPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for RunPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RunPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The runs a token covers: any of its patterns matching is enough.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunScope(Vec<RunPattern>);

impl RunScope {
    /// Parses `a,build-*,c` (spaces around items are ignored). An empty list
    /// or an empty item is refused: a token that covers nothing is a mistake.
    pub fn parse_list(s: &str) -> Result<RunScope, AuthError> {
        let patterns = s
            .split(',')
            .map(|item| RunPattern::parse(item.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RunScope(patterns))
    }

    pub fn covers(&self, run: &RunId) -> bool {
        self.0.iter().any(|p| p.matches(run))
    }

    pub fn patterns(&self) -> &[RunPattern] {
        &self.0
    }
}

impl From<RunPattern> for RunScope {
    fn from(p: RunPattern) -> Self {
        RunScope(vec![p])
    }
}

impl fmt::Display for RunScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(p.as_str())?;
        }
        Ok(())
    }
}

/// What a verified token allows.
#[derive(Debug, Clone)]
pub struct Grant {
    pub kind: TokenKind,
    pub runs: RunScope,
    pub caps: Capabilities,
    pub expires_at: Timestamp,
    /// Which token this is, for counting what one credential holds open.
    pub token: TokenId,
    /// Whose quotas it spends.
    pub tenant: Tenant,
}

/// The longest `sub` claim (tenant name), in characters.
pub const MAX_TENANT_LEN: usize = 128;

/// Whose quotas a token spends (spec/README.md, *Quotas per tenant*): the
/// name in its `sub` claim, or, for a token without one, its run patterns
/// (sorted, without repeats). Tokens minted alike are one tenant, so a
/// fresh token does not reset what the old one used. The text is a store
/// key: `sub:NAME` or `runs:P1,P2`, so a name can never pass for patterns.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tenant(String);

impl Tenant {
    /// The tenant of a token with `sub` (already checked) covering `runs`.
    fn of(sub: Option<&str>, runs: &RunScope) -> Tenant {
        match sub {
            Some(name) => Tenant(format!("sub:{name}")),
            None => {
                let patterns: std::collections::BTreeSet<&str> =
                    runs.patterns().iter().map(RunPattern::as_str).collect();
                let joined: Vec<&str> = patterns.into_iter().collect();
                Tenant(format!("runs:{}", joined.join(",")))
            }
        }
    }

    /// The key under which the store counts this tenant's usage.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `name` may be a tenant (`sub`): 1 to [`MAX_TENANT_LEN`] visible
/// ASCII characters, like the protocol's opaque ids.
fn valid_tenant_name(name: &str) -> bool {
    (1..=MAX_TENANT_LEN).contains(&name.len()) && name.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// Names one token without carrying its text: a keyed hash of it, so a
/// table of open connections per token holds no credential, and nobody
/// can craft two tokens that collide. Two byte-identical tokens are the
/// same token; [`AuthKey::mint`] never makes two alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenId(u64);

/// The claims on the wire. Patterns and capabilities travel as plain strings
/// and are checked after the signature, so a malformed claim surfaces as our
/// own fixed message instead of a serde error quoting the token's content.
#[derive(Serialize, Deserialize)]
struct Claims {
    kind: TokenKind,
    runs: Vec<String>,
    #[serde(default)]
    caps: Vec<String>,
    iat: u64,
    exp: u64,
    /// Random, so two tokens minted in the same second for the same runs
    /// are still two tokens (each counted on its own against
    /// `max_sockets_per_token`). Absent from tokens minted before it existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    jti: String,
    /// The tenant whose quotas the token spends; without it, its run
    /// patterns are (see [`Tenant`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
}

/// The HMAC secret that signs and checks tokens.
#[derive(Clone)]
pub struct AuthKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// The key of [`TokenId`] hashes; random per process.
    ids: std::hash::RandomState,
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl AuthKey {
    /// Reads the key file, or creates it with a fresh random key when it does
    /// not exist yet (so a first `rungate serve` just works).
    pub fn load_or_create(path: &Path) -> Result<AuthKey, AuthError> {
        let key_err = |reason: String| AuthError::KeyFile {
            path: path.to_owned(),
            reason,
        };
        match fs::read(path) {
            Ok(bytes) => {
                warn_if_readable_by_others(path);
                let secret = parse_key_file(&bytes).map_err(|r| key_err(r.to_owned()))?;
                Ok(AuthKey::from_secret(&secret))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let secret: [u8; KEY_BYTES] = rand::random();
                match create_key_file(path, &hex(&secret)) {
                    Ok(true) => {
                        tracing::info!(path = %path.display(), "created a new auth key file");
                        Ok(AuthKey::from_secret(&secret))
                    }
                    // Someone else created it between our read and our
                    // create; theirs wins so both processes agree.
                    Ok(false) => {
                        let bytes =
                            fs::read(path).map_err(|e| key_err(format!("cannot read: {e}")))?;
                        let secret = parse_key_file(&bytes).map_err(|r| key_err(r.to_owned()))?;
                        Ok(AuthKey::from_secret(&secret))
                    }
                    Err(e) => Err(key_err(format!("cannot create: {e}"))),
                }
            }
            Err(e) => Err(key_err(format!("cannot read: {e}"))),
        }
    }

    pub fn from_secret(bytes: &[u8]) -> AuthKey {
        AuthKey {
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
            ids: std::hash::RandomState::new(),
        }
    }

    /// A signed HS256 token for `runs` and `caps`, valid for `ttl` from now,
    /// of the tenant its run patterns make (no `sub`).
    pub fn mint(
        &self,
        kind: TokenKind,
        runs: &RunScope,
        caps: Capabilities,
        ttl: Duration,
    ) -> Result<String, AuthError> {
        self.mint_for_tenant(kind, runs, caps, ttl, None)
    }

    /// [`AuthKey::mint`] with `tenant` as the `sub` claim, when given.
    pub fn mint_for_tenant(
        &self,
        kind: TokenKind,
        runs: &RunScope,
        caps: Capabilities,
        ttl: Duration,
        tenant: Option<&str>,
    ) -> Result<String, AuthError> {
        if let Some(name) = tenant
            && !valid_tenant_name(name)
        {
            return Err(AuthError::BadTenant(format!("{name:?}")));
        }
        if ttl.is_zero() {
            return Err(AuthError::BadTtl("0".to_owned()));
        }
        let now = unix_secs(SystemTime::now());
        // Round a sub-second remainder up, so "valid for 1.5 s" never
        // becomes "valid for 1 s".
        let ttl_secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let exp = now
            .checked_add(ttl_secs)
            .ok_or_else(|| AuthError::BadTtl(format!("{ttl_secs}s")))?;
        self.mint_at(kind, runs, caps, now, exp, tenant)
    }

    /// Mints with explicit `iat`/`exp` (seconds since the epoch).
    fn mint_at(
        &self,
        kind: TokenKind,
        runs: &RunScope,
        caps: Capabilities,
        iat: u64,
        exp: u64,
        tenant: Option<&str>,
    ) -> Result<String, AuthError> {
        if runs.patterns().is_empty() {
            return Err(AuthError::BadPattern("(empty list)".to_owned()));
        }
        let claims = Claims {
            kind,
            runs: runs
                .patterns()
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect(),
            caps: caps.iter().map(|c| c.as_str().to_owned()).collect(),
            iat,
            exp,
            jti: hex(&rand::random::<[u8; 8]>()),
            sub: tenant.map(str::to_owned),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(format!("cannot sign: {}", describe(e.kind()))))
    }

    /// Checks signature (HS256 only), expiry (required, no leeway), `nbf`
    /// when present (no leeway) and that
    /// every claim is one we understand.
    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        // Optional, but honoured when present: a token minted for later is
        // not valid before then.
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                kind => AuthError::Invalid(describe(kind)),
            },
        )?;
        let claims = data.claims;
        if claims.runs.is_empty() {
            return Err(AuthError::Invalid("token covers no runs".to_owned()));
        }
        // Sized to the claims: a `collect` through `Result` cannot know
        // the count up front and starts at room for four patterns, which
        // every socket's grant then keeps for its whole life (96 bytes
        // more per socket for the usual one pattern; BENCHMARKS.md, idle
        // sessions).
        let mut runs = Vec::with_capacity(claims.runs.len());
        for pattern in &claims.runs {
            runs.push(
                RunPattern::parse(pattern).map_err(|_| {
                    AuthError::Invalid("malformed run pattern in claims".to_owned())
                })?,
            );
        }
        let caps = claims
            .caps
            .iter()
            .map(|c| Capability::parse_any(c))
            .collect::<Option<Capabilities>>()
            .ok_or_else(|| AuthError::Invalid("unknown capability in claims".to_owned()))?;
        if let Some(name) = &claims.sub
            && !valid_tenant_name(name)
        {
            return Err(AuthError::Invalid("malformed claim `sub`".to_owned()));
        }
        let runs = RunScope(runs);
        Ok(Grant {
            kind: claims.kind,
            tenant: Tenant::of(claims.sub.as_deref(), &runs),
            runs,
            caps,
            expires_at: Timestamp::from_unix_millis(claims.exp.saturating_mul(1000)),
            token: TokenId(std::hash::BuildHasher::hash_one(&self.ids, token)),
        })
    }
}

/// A fixed description of a JWT library error. Deliberately not the
/// library's `Display`: JSON errors there can quote pieces of the token.
fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::InvalidSignature => "bad signature".to_owned(),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm => "algorithm not accepted (HS256 only)".to_owned(),
        ErrorKind::MissingRequiredClaim(c) => format!("missing claim `{c}`"),
        ErrorKind::InvalidClaimFormat(c) => format!("malformed claim `{c}`"),
        ErrorKind::ImmatureSignature => "not valid yet".to_owned(),
        ErrorKind::Json(_) => "malformed claims or header".to_owned(),
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            "malformed token".to_owned()
        }
        _ => "rejected".to_owned(),
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The key bytes from a key file's text. Reasons never quote the content.
fn parse_key_file(bytes: &[u8]) -> Result<Vec<u8>, &'static str> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not text; expected 64 hex digits")?;
    let text = text.trim();
    if text.is_empty() {
        return Err("empty; expected 64 hex digits (delete it to have a new key generated)");
    }
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("contains a character that is not a hex digit; expected 64 hex digits");
    }
    if text.len() != KEY_BYTES * 2 {
        return Err("wrong length; expected exactly 64 hex digits");
    }
    let secret = text
        .as_bytes()
        .chunks(2)
        .map(|pair| {
            // Both bytes are ASCII hex digits, checked above.
            let digit = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
            digit(pair[0]) << 4 | digit(pair[1])
        })
        .collect();
    Ok(secret)
}

/// Writes a new key file without ever exposing a half-written one: the key
/// goes to a private temporary file that is then hard-linked into place,
/// which fails (rather than overwrites) if another process won the race.
/// Returns `Ok(false)` when the file already existed.
fn create_key_file(path: &Path, hex_key: &str) -> io::Result<bool> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "auth-key".to_owned());
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    write_private(&tmp, hex_key)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        // Some filesystems have no hard links; fall back to an exclusive
        // create, which still never overwrites.
        Err(_) => match write_private(path, hex_key) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        },
    }
}

/// Creates `path` (which must not exist) readable by its owner only.
fn write_private(path: &Path, hex_key: &str) -> io::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(path)?;
    file.write_all(hex_key.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                "auth key file is accessible to other users; chmod 600 it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Parses a token lifetime: `90s`, `30m`, `1h`, `7d`, or plain seconds.
pub fn parse_ttl(s: &str) -> Result<Duration, AuthError> {
    let bad = || AuthError::BadTtl(format!("{s:?}"));
    let t = s.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c),
        _ => (t, 's'),
    };
    let scale: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    // `u64::from_str` would accept a leading `+`; insist on digits only.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = n.checked_mul(scale).ok_or_else(bad)?;
    if secs == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &str) -> RunId {
        RunId::new(s).unwrap()
    }

    fn key() -> AuthKey {
        AuthKey::from_secret(b"test secret, 32 bytes long......")
    }

    fn scope(s: &str) -> RunScope {
        RunScope::parse_list(s).unwrap()
    }

    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    fn b64url_encode(data: &[u8]) -> String {
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            }
        }
        out
    }

    fn b64url_decode(s: &str) -> Vec<u8> {
        let vals: Vec<u32> = s
            .bytes()
            .map(|c| B64.iter().position(|&x| x == c).unwrap() as u32)
            .collect();
        let mut out = Vec::new();
        for chunk in vals.chunks(4) {
            let mut n = 0u32;
            for (i, v) in chunk.iter().enumerate() {
                n |= v << (18 - 6 * i);
            }
            for i in 0..chunk.len() - 1 {
                out.push((n >> (16 - 8 * i)) as u8);
            }
        }
        out
    }

    #[test]
    fn roundtrip_runtime_and_viewer() {
        let k = key();
        let caps: Capabilities = [Capability::KvRead, Capability::SecretsRead]
            .into_iter()
            .collect();
        let token = k
            .mint(
                TokenKind::Runtime,
                &scope("build-*,demo"),
                caps,
                Duration::from_secs(3600),
            )
            .unwrap();
        let g = k.verify(&token).unwrap();
        assert_eq!(g.kind, TokenKind::Runtime);
        assert_eq!(g.caps, caps);
        assert!(g.runs.covers(&run("build-7")));
        assert!(g.runs.covers(&run("demo")));
        assert!(!g.runs.covers(&run("demo-2")));
        assert_eq!(g.runs.to_string(), "build-*,demo");
        let left = g.expires_at.unix_millis() as i64 - Timestamp::now().unix_millis() as i64;
        assert!((3_590_000..=3_601_000).contains(&left), "{left}");

        let token = k
            .mint(
                TokenKind::Viewer,
                &scope("*"),
                Capabilities::default(),
                Duration::from_secs(60),
            )
            .unwrap();
        let g = k.verify(&token).unwrap();
        assert_eq!(g.kind, TokenKind::Viewer);
        assert_eq!(g.caps, Capabilities::default());
        assert!(g.runs.covers(&run("anything")));
    }

    #[test]
    fn tokens_minted_alike_are_distinct_and_ids_follow_the_token() {
        let k = key();
        let mint = || {
            k.mint(
                TokenKind::Runtime,
                &scope("a"),
                Capabilities::default(),
                Duration::from_secs(60),
            )
            .unwrap()
        };
        let (a, b) = (mint(), mint());
        assert_ne!(a, b, "same claims in the same second still differ");
        let (ga, gb) = (k.verify(&a).unwrap(), k.verify(&b).unwrap());
        assert_ne!(ga.token, gb.token);
        assert_eq!(ga.token, k.verify(&a).unwrap().token);
    }

    #[test]
    fn expired_token_is_expired() {
        let k = key();
        let now = unix_secs(SystemTime::now());
        let token = k
            .mint_at(
                TokenKind::Viewer,
                &scope("*"),
                Capabilities::default(),
                now - 100,
                now - 1,
                None,
            )
            .unwrap();
        assert!(matches!(k.verify(&token), Err(AuthError::Expired)));
    }

    #[test]
    fn the_tenant_is_the_sub_claim_or_else_the_sorted_run_patterns() {
        let k = key();
        let hour = Duration::from_secs(3600);
        let caps = Capabilities::default();
        let grant = |runs: &str, tenant: Option<&str>| {
            let token = k
                .mint_for_tenant(TokenKind::Runtime, &scope(runs), caps, hour, tenant)
                .unwrap();
            k.verify(&token).unwrap()
        };
        let named = grant("a-*", Some("acme"));
        assert_eq!(named.tenant.as_str(), "sub:acme");
        // The same name over other runs is the same tenant.
        assert_eq!(grant("b-1", Some("acme")).tenant, named.tenant);
        // Without a name: the patterns, in order, without repeats, so tokens
        // minted alike share one tenant and a fresh token resets nothing.
        let a = grant("c-9,a-*,c-9", None);
        assert_eq!(a.tenant.as_str(), "runs:a-*,c-9");
        assert_eq!(grant("a-*,c-9", None).tenant, a.tenant);
        assert_ne!(a.token, grant("a-*,c-9", None).token);
        assert_ne!(grant("a-*", None).tenant, a.tenant);
        // A name that reads like patterns is still a name.
        assert_ne!(
            grant("a-*", Some("runs:a-*")).tenant,
            grant("a-*", None).tenant
        );
        // Bad names are refused when minting, and in a token signed anyway.
        for bad in ["", "has space", &"x".repeat(MAX_TENANT_LEN + 1), "é"] {
            assert!(matches!(
                k.mint_for_tenant(TokenKind::Runtime, &scope("a"), caps, hour, Some(bad)),
                Err(AuthError::BadTenant(_))
            ));
            let claims = serde_json::json!({
                "kind": "runtime", "runs": ["a"], "iat": 1, "exp": u64::MAX / 2, "sub": bad,
            });
            let forged =
                jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &k.encoding).unwrap();
            assert!(
                matches!(k.verify(&forged), Err(AuthError::Invalid(ref why)) if why.contains("sub")),
                "{bad:?}"
            );
        }
        assert!(
            k.mint_for_tenant(
                TokenKind::Runtime,
                &scope("a"),
                caps,
                hour,
                Some(&"x".repeat(MAX_TENANT_LEN))
            )
            .is_ok()
        );
    }

    #[test]
    fn foreign_key_and_tampering_are_invalid() {
        let k = key();
        let token = k
            .mint(
                TokenKind::Viewer,
                &scope("demo"),
                Capabilities::default(),
                Duration::from_secs(60),
            )
            .unwrap();

        let other = AuthKey::from_secret(b"another secret");
        assert!(matches!(other.verify(&token), Err(AuthError::Invalid(_))));

        // Promote the viewer token to a runtime token for every run, keeping
        // the original signature.
        let parts: Vec<&str> = token.split('.').collect();
        let payload = String::from_utf8(b64url_decode(parts[1])).unwrap();
        assert!(payload.contains("\"viewer\""));
        let forged = payload
            .replace("\"viewer\"", "\"runtime\"")
            .replace("\"demo\"", "\"*\"");
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64url_encode(forged.as_bytes()),
            parts[2]
        );
        let err = k.verify(&tampered).unwrap_err();
        assert!(matches!(err, AuthError::Invalid(_)), "{err:?}");
        assert!(!err.to_string().contains(&tampered));
    }

    #[test]
    fn alg_none_and_other_algs_are_invalid() {
        let k = key();
        let now = unix_secs(SystemTime::now());
        let claims = format!(
            r#"{{"kind":"runtime","runs":["*"],"caps":[],"iat":{now},"exp":{}}}"#,
            now + 600
        );
        let header = b64url_encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64url_encode(claims.as_bytes());
        for token in [format!("{header}.{body}."), format!("{header}.{body}")] {
            assert!(
                matches!(k.verify(&token), Err(AuthError::Invalid(_))),
                "{token}"
            );
        }

        // Same secret, but HS512: still refused, only HS256 is accepted.
        let claims = Claims {
            kind: TokenKind::Runtime,
            runs: vec!["*".into()],
            caps: vec![],
            iat: now,
            exp: now + 600,
            jti: String::new(),
            sub: None,
        };
        let hs512 =
            jsonwebtoken::encode(&Header::new(Algorithm::HS512), &claims, &k.encoding).unwrap();
        assert!(matches!(k.verify(&hs512), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn garbage_and_bad_claims_are_invalid() {
        let k = key();
        for garbage in ["", "garbage", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9.e30.x"] {
            let err = k.verify(garbage).unwrap_err();
            assert!(matches!(err, AuthError::Invalid(_)), "{garbage:?}: {err:?}");
        }

        // Validly signed, but with claims we do not understand.
        let now = unix_secs(SystemTime::now());
        let sign = |runs: Vec<&str>, caps: Vec<&str>| {
            let claims = Claims {
                kind: TokenKind::Runtime,
                runs: runs.into_iter().map(String::from).collect(),
                caps: caps.into_iter().map(String::from).collect(),
                iat: now,
                exp: now + 600,
                jti: String::new(),
                sub: None,
            };
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &k.encoding).unwrap()
        };
        for token in [
            sign(vec!["*"], vec!["kv.read", "root.everything"]),
            sign(vec!["a*b"], vec![]),
            sign(vec![], vec![]),
        ] {
            let err = k.verify(&token).unwrap_err();
            assert!(matches!(err, AuthError::Invalid(_)), "{err:?}");
            assert!(!err.to_string().contains("root.everything"));
        }

        // exp is required.
        let no_exp = serde_json::json!({"kind":"runtime","runs":["*"],"caps":[],"iat":now});
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &no_exp, &k.encoding).unwrap();
        assert!(matches!(k.verify(&token), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn patterns() {
        let exact = RunPattern::parse("build-1").unwrap();
        assert!(exact.is_exact());
        assert!(exact.matches(&run("build-1")));
        assert!(!exact.matches(&run("build-10")));

        let prefix = RunPattern::parse("build-*").unwrap();
        assert!(!prefix.is_exact());
        assert!(prefix.matches(&run("build-10")));
        assert!(prefix.matches(&run("build-")));
        assert!(!prefix.matches(&run("build")));
        assert_eq!(prefix.to_string(), "build-*");

        let all = RunPattern::parse("*").unwrap();
        assert!(all.matches(&run("x")));

        assert!(exact.specificity() > prefix.specificity());
        assert!(prefix.specificity() > RunPattern::parse("b*").unwrap().specificity());
        assert!(RunPattern::parse("b*").unwrap().specificity() > all.specificity());
        let longest = RunPattern::parse(&format!("{}*", "a".repeat(MAX_ID_LEN))).unwrap();
        assert!(RunPattern::parse("a").unwrap().specificity() > longest.specificity());

        for bad in [
            "",
            "a*b",
            "*a",
            "**",
            "a**",
            "run/1*",
            "a b",
            &"a".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(
                matches!(RunPattern::parse(bad), Err(AuthError::BadPattern(_))),
                "{bad:?}"
            );
        }

        let s = RunScope::parse_list("a, b-*").unwrap();
        assert_eq!(s.patterns().len(), 2);
        assert!(s.covers(&run("b-2")) && s.covers(&run("a")) && !s.covers(&run("c")));
        for bad in ["", "a,", "a,,b", ","] {
            assert!(RunScope::parse_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_ttl("600").unwrap(), Duration::from_secs(600));
        for bad in [
            "",
            "0",
            "0h",
            "h",
            "1x",
            "-5",
            "+5",
            "1.5h",
            "1 h",
            "abc",
            "99999999999999999999d",
        ] {
            assert!(
                matches!(parse_ttl(bad), Err(AuthError::BadTtl(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn key_file_is_created_reloaded_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("auth.key");
        let k1 = AuthKey::load_or_create(&path).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        assert!(text.trim_end().bytes().all(|b| b.is_ascii_hexdigit()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temporary files left behind.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);

        let k2 = AuthKey::load_or_create(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
        let token = k1
            .mint(
                TokenKind::Viewer,
                &scope("*"),
                Capabilities::default(),
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(k2.verify(&token).is_ok());
        assert_eq!(format!("{k2:?}"), "[redacted]");
    }

    #[test]
    fn bad_key_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.key");
        let secretish = "zz".repeat(32);
        for content in ["", "abcd\n", secretish.as_str(), &"a".repeat(66), "\u{ff}"] {
            fs::write(&path, content).unwrap();
            match AuthKey::load_or_create(&path) {
                Err(e @ AuthError::KeyFile { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&path.display().to_string()), "{msg}");
                    assert!(content.len() < 4 || !msg.contains(content), "{msg}");
                }
                other => panic!("{content:?}: {other:?}"),
            }
        }
        // Upper-case hex is still hex.
        fs::write(&path, format!("{}\n", "AB".repeat(32))).unwrap();
        assert!(AuthKey::load_or_create(&path).is_ok());
    }
}

//! Which browser origins may use the gateway: the `Origin` check on every
//! endpoint a page could reach (the WebSockets, the runs list, SSE and the
//! dashboard's files).
//!
//! Owns [`AllowedOrigins`] (parsing `--allowed-origins`) and the verdict on
//! one request's `Origin` and `Host` headers. The rule: no `Origin` header
//! (curl, runtimes, server-side clients) is allowed, since only browsers
//! send one and the check exists to stop *other sites'* pages; an `Origin`
//! whose host and port are the `Host` the request was sent to (the
//! dashboard served by this gateway) is allowed; so is one on the list;
//! everything else, `null` included, is refused. Tokens, not cookies,
//! authenticate here, so this is defence in depth against a page that got
//! hold of a token, or that probes a gateway on a private network.
//! Must not know HTTP status codes or error shapes: `http` answers.

use std::fmt;

/// The `--allowed-origins` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// Same origin, plus these (normalized: lowercase `scheme://host[:port]`
    /// without a default port).
    List(Vec<String>),
    /// `*`: no check at all.
    Any,
}

/// Same origin only.
impl Default for AllowedOrigins {
    fn default() -> Self {
        AllowedOrigins::List(Vec::new())
    }
}

/// An `--allowed-origins` entry that is not an origin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "allowed origin {0:?} is not an origin: expected scheme://host[:port] (no path), or * alone"
)]
pub struct BadOrigin(pub String);

/// Why a request's `Origin` was refused; the message is for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused;

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("requests from this page's origin are not allowed (see --allowed-origins)")
    }
}

impl AllowedOrigins {
    /// Parses the flag's comma-separated form.
    pub fn parse_list(s: &str) -> Result<AllowedOrigins, BadOrigin> {
        AllowedOrigins::parse(s.split(',').map(str::trim).filter(|e| !e.is_empty()))
    }

    /// Parses entries one by one: `*` alone, or origins.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, BadOrigin> {
        let entries: Vec<&str> = entries.into_iter().map(str::trim).collect();
        if entries.contains(&"*") {
            // `*` beside real origins is almost certainly a mistake that
            // would silently allow everything.
            return match entries.len() {
                1 => Ok(AllowedOrigins::Any),
                _ => Err(BadOrigin("*".into())),
            };
        }
        let list = entries
            .into_iter()
            .map(|e| normalize(e.strip_suffix('/').unwrap_or(e)).ok_or_else(|| BadOrigin(e.into())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AllowedOrigins::List(list))
    }

    /// The verdict on a request with these `Origin` and `Host` header
    /// values (`None` when absent, or not visible ASCII).
    pub fn check(&self, origin: Option<&str>, host: Option<&str>) -> Result<(), Refused> {
        let Some(origin) = origin else {
            return Ok(());
        };
        if *self == AllowedOrigins::Any {
            return Ok(());
        }
        let Some(origin) = normalize(origin) else {
            return Err(Refused);
        };
        if let AllowedOrigins::List(list) = self
            && list.contains(&origin)
        {
            return Ok(());
        }
        if let Some(host) = host
            && same_origin(&origin, host)
        {
            return Ok(());
        }
        Err(Refused)
    }
}

/// `scheme://host[:port]`, lowercased and without the scheme's default
/// port; `None` if `s` is not of that form (`null`, a path, user info).
fn normalize(s: &str) -> Option<String> {
    let (scheme, authority) = s.split_once("://")?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    let authority_ok = !authority.is_empty()
        && authority
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '_'));
    if !scheme_ok || !authority_ok {
        return None;
    }
    let scheme = scheme.to_ascii_lowercase();
    let authority = strip_default_port(&scheme, &authority.to_ascii_lowercase()).to_owned();
    Some(format!("{scheme}://{authority}"))
}

fn strip_default_port<'a>(scheme: &str, authority: &'a str) -> &'a str {
    let default = match scheme {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => return authority,
    };
    authority.strip_suffix(default).unwrap_or(authority)
}

/// Whether the normalized `origin` names the host and port the request was
/// sent to. Only web schemes can be the gateway's own origin.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    if !matches!(scheme, "http" | "https") {
        return false;
    }
    let host = host.trim().to_ascii_lowercase();
    strip_default_port(scheme, &host) == authority
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_origin_header_is_always_allowed() {
        assert!(
            AllowedOrigins::default()
                .check(None, Some("gw:7700"))
                .is_ok()
        );
        assert!(AllowedOrigins::default().check(None, None).is_ok());
    }

    #[test]
    fn same_origin_is_allowed_and_others_are_not() {
        let same = AllowedOrigins::default();
        assert!(
            same.check(Some("http://127.0.0.1:7700"), Some("127.0.0.1:7700"))
                .is_ok()
        );
        assert!(
            same.check(Some("HTTP://GW.example"), Some("gw.example:80"))
                .is_ok()
        );
        assert!(
            same.check(Some("https://gw.example"), Some("gw.example"))
                .is_ok()
        );
        assert!(
            same.check(Some("https://gw.example:443"), Some("gw.example"))
                .is_ok()
        );
        assert!(
            same.check(Some("http://evil.example"), Some("gw.example"))
                .is_err()
        );
        assert!(
            same.check(Some("http://127.0.0.1:7701"), Some("127.0.0.1:7700"))
                .is_err()
        );
        assert!(same.check(Some("null"), Some("gw.example")).is_err());
        assert!(same.check(Some("http://gw.example"), None).is_err());
        assert!(same.check(Some("file://"), Some("gw.example")).is_err());
        assert!(
            same.check(Some("chrome-extension://gw.example"), Some("gw.example"))
                .is_err()
        );
    }

    #[test]
    fn listed_origins_are_allowed() {
        let list =
            AllowedOrigins::parse_list(" https://App.example/ ,http://localhost:3000").unwrap();
        assert_eq!(
            list,
            AllowedOrigins::List(vec![
                "https://app.example".into(),
                "http://localhost:3000".into()
            ])
        );
        assert!(
            list.check(Some("https://app.example"), Some("gw:7700"))
                .is_ok()
        );
        assert!(
            list.check(Some("https://app.example:443"), Some("gw:7700"))
                .is_ok()
        );
        assert!(
            list.check(Some("http://localhost:3000"), Some("gw:7700"))
                .is_ok()
        );
        assert!(list.check(Some("http://gw:7700"), Some("gw:7700")).is_ok());
        assert!(
            list.check(Some("http://app.example"), Some("gw:7700"))
                .is_err()
        );
        assert!(
            list.check(Some("http://localhost:3001"), Some("gw:7700"))
                .is_err()
        );
    }

    #[test]
    fn star_allows_any_and_bad_entries_are_refused() {
        let any = AllowedOrigins::parse_list("*").unwrap();
        assert!(any.check(Some("null"), None).is_ok());
        assert!(AllowedOrigins::parse_list("*,https://a.example").is_err());
        assert!(AllowedOrigins::parse_list("https://a.example/path").is_err());
        assert!(AllowedOrigins::parse_list("a.example").is_err());
        assert!(AllowedOrigins::parse_list("https://user@a.example").is_err());
        assert_eq!(
            AllowedOrigins::parse_list(""),
            Ok(AllowedOrigins::default())
        );
    }
}

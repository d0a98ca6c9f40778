//! `GET /`: the built-in dashboard, a static page (HTML, CSS, JavaScript)
//! compiled into the binary.
//!
//! Owns the page's files and the headers they are served with. The page is
//! the same for everyone and carries no data, so it needs no token; what it
//! shows it fetches itself from the token-checked endpoints (`/v1/runs`,
//! `/v1/stream`) and from `/metrics`. Every response is `no-store`, so a
//! new binary's page is never mixed with an old cached script, and has a
//! Content-Security-Policy that lets the page load only its own files and
//! talk only to its own origin. Must not know about tokens, runs or
//! streams: the page's behaviour lives in `dashboard/app.js`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::http::Body;

/// One embedded file: its URL path, content type and bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("dashboard/index.html"),
    },
    Asset {
        path: "/assets/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("dashboard/app.js"),
    },
    Asset {
        path: "/assets/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("dashboard/style.css"),
    },
];

/// Scripts and styles from this origin only, no inline code, network
/// access to this origin only (`'self'` covers `ws:`/`wss:` to the same
/// host), images only as `data:` URLs (the favicon), never framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

/// Whether `path` is one of the dashboard's files.
pub(crate) fn serves(path: &str) -> bool {
    find(path).is_some()
}

/// The file at `path`, or 404 if there is none.
pub(crate) fn serve(path: &str) -> Response<Body> {
    let Some(asset) = find(path) else {
        let mut r = Response::new(Full::new(Bytes::new()).boxed_unsync());
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    };
    let mut r = Response::new(Full::new(Bytes::from_static(asset.body)).boxed_unsync());
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The page is first opened with `?token=` in its URL; no request it
    // makes may carry that URL elsewhere in a Referer header.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_served_with_its_type_and_no_store() {
        for asset in ASSETS {
            assert!(serves(asset.path));
            let r = serve(asset.path);
            assert_eq!(r.status(), StatusCode::OK, "{}", asset.path);
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], asset.content_type);
            assert_eq!(h[header::CACHE_CONTROL], "no-store");
            assert!(h.contains_key(header::CONTENT_SECURITY_POLICY));
            assert!(!asset.body.is_empty());
        }
        assert!(!serves("/assets/missing.js"));
        assert!(!serves("/v1/runs"));
    }

    #[test]
    fn the_page_refers_only_to_embedded_assets() {
        let html = std::str::from_utf8(find("/").unwrap().body).unwrap();
        for needle in ["src=\"", "href=\""] {
            for (i, _) in html.match_indices(needle) {
                let rest = &html[i + needle.len()..];
                let url = &rest[..rest.find('"').unwrap()];
                assert!(
                    url.starts_with("data:") || serves(&format!("/{url}")),
                    "index.html refers to {url}, which the gateway does not serve"
                );
            }
        }
    }
}

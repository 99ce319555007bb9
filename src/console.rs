//! The web console at `/console/`: static files embedded in the binary (nothing fetched at
//! run time, no other server), served with a strict Content-Security-Policy. The pages are
//! built on the JavaScript client, which is served from the very file in `clients/js`.

use axum::Router;
use axum::extract::{Path, Request};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::error::Error;

/// One embedded file: its name under `/console/` and its bytes.
struct Asset {
    name: &'static str,
    body: &'static str,
}

/// A file of `console/`, embedded under its own name.
macro_rules! console_file {
    ($name:literal) => {
        Asset {
            name: $name,
            body: include_str!(concat!("../console/", $name)),
        }
    };
}

/// Every file of the console. The client module is `clients/js`'s own file, not a copy.
const ASSETS: &[Asset] = &[
    console_file!("index.html"),
    console_file!("operator.html"),
    console_file!("supervisor.html"),
    console_file!("widget.html"),
    console_file!("admin.html"),
    console_file!("console.css"),
    console_file!("common.js"),
    console_file!("chatpanel.js"),
    console_file!("operator.js"),
    console_file!("supervisor.js"),
    console_file!("widget.js"),
    console_file!("admin.js"),
    Asset {
        name: "presence-hub.js",
        body: include_str!("../clients/js/presence-hub.js"),
    },
];

/// The console's routes, merged into the hub's router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route(
            "/console/",
            get(|req: Request| async move { serve("index.html", req.headers()) }),
        )
        .route(
            "/console/{file}",
            get(
                |Path(file): Path<String>, req: Request| async move { serve(&file, req.headers()) },
            ),
        )
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return Error::NotFound(format!("no console file {name:?}")).into_response();
    };
    let mut res = (StatusCode::OK, asset.body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(name)),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_str(&csp(host(headers))).expect("the host was checked to be plain"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // The files change with the binary only; revalidating is cheap and never shows stale pages.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// The request's `Host` when it is a plain `host[:port]` (anything else is left out of the
/// policy rather than echoed into a header).
fn host(headers: &HeaderMap) -> Option<&str> {
    let h = headers.get(header::HOST)?.to_str().ok()?;
    let plain = !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    plain.then_some(h)
}

/// No inline script or style, nothing from elsewhere. `connect-src` names the hub's own
/// `ws:`/`wss:` origin explicitly: older browsers do not count them as `'self'`.
pub fn csp(host: Option<&str>) -> String {
    let sockets = host
        .map(|h| format!(" ws://{h} wss://{h}"))
        .unwrap_or_default();
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'{sockets}; object-src 'none'; base-uri 'none'; form-action 'self'; \
         frame-ancestors 'none'"
    )
}

/// True when a browser's `Origin` is the hub's own (the console's pages): same host and port
/// as the request's `Host`. Such a request is allowed whatever `server.allowed_origins` says,
/// since the page was served by the hub itself. Trusting `Host` gives a page nothing it could
/// not do without a browser (a rebinding DNS name included): the hub keeps no ambient
/// credentials, no cookie; every socket and API call carries its token or key.
pub fn same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_host(h: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, HeaderValue::from_str(h).unwrap());
        m
    }

    #[test]
    fn console_same_origin_matches_host_and_port_only() {
        let h = with_host("127.0.0.1:8080");
        assert!(same_origin("http://127.0.0.1:8080", &h));
        assert!(same_origin("https://127.0.0.1:8080", &h));
        assert!(!same_origin("http://127.0.0.1:8081", &h));
        assert!(!same_origin("http://127.0.0.1", &h));
        assert!(!same_origin("http://evil.example", &h));
        assert!(!same_origin("null", &h));
        assert!(!same_origin("http://127.0.0.1:8080", &HeaderMap::new()));
        assert!(same_origin(
            "https://Hub.Example",
            &with_host("hub.example")
        ));
    }

    #[test]
    fn console_csp_forbids_inline_and_foreign_sources() {
        let p = csp(Some("hub.example:8080"));
        assert!(p.contains("default-src 'self'"));
        assert!(p.contains("script-src 'self';"));
        assert!(!p.contains("unsafe-inline"));
        assert!(p.contains("connect-src 'self' ws://hub.example:8080 wss://hub.example:8080;"));
        assert!(csp(None).contains("connect-src 'self';"));
    }

    #[test]
    fn console_host_refuses_header_injection() {
        assert_eq!(host(&with_host("a.example:1")), Some("a.example:1"));
        assert_eq!(host(&with_host("a.example; script-src *")), None);
    }

    #[test]
    fn console_embeds_every_file_of_the_console_folder() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/console");
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(
                ASSETS.iter().any(|a| a.name == name),
                "console/{name} is not embedded"
            );
        }
    }

    #[test]
    fn console_serves_every_asset_with_its_type() {
        for a in ASSETS {
            assert!(!a.body.is_empty(), "{} is empty", a.name);
            let res = serve(a.name, &with_host("h:1"));
            assert_eq!(res.status(), StatusCode::OK);
            assert_ne!(
                res.headers()[header::CONTENT_TYPE],
                "application/octet-stream"
            );
        }
        assert_eq!(
            serve("../Cargo.toml", &HeaderMap::new()).status(),
            StatusCode::NOT_FOUND
        );
    }
}

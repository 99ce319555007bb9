//! `GET /api/v1/widget/status?department=N`: public, cheap to poll (ETag / 304), CORS per
//! `server.allowed_origins`.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::model::DeptState;

pub async fn status(State(hub): State<Hub>, req: Request) -> Response {
    let origin = match cors_origin(&hub, req.headers()) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let res = match department(req.uri().query()) {
        Ok(d) => {
            let state = hub.read(|c| c.dept_state(d));
            let tag = etag(&state);
            let fresh = req
                .headers()
                .get(header::IF_NONE_MATCH)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
            let mut res = if fresh {
                StatusCode::NOT_MODIFIED.into_response()
            } else {
                (StatusCode::OK, axum::Json(state)).into_response()
            };
            let h = res.headers_mut();
            h.insert(
                header::ETAG,
                HeaderValue::from_str(&tag).expect("ascii tag"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            res
        }
        Err(e) => e.into_response(),
    };
    with_cors(res, origin)
}

/// CORS preflight.
pub async fn preflight(State(hub): State<Hub>, req: Request) -> Response {
    match cors_origin(&hub, req.headers()) {
        Ok(origin) => {
            let mut res = with_cors(StatusCode::NO_CONTENT.into_response(), origin);
            let h = res.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("If-None-Match"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            res
        }
        Err(e) => e.into_response(),
    }
}

/// The state's strong ETag: it changes exactly when the widget's answer does.
pub fn etag(s: &DeptState) -> String {
    let reason = serde_json::to_value(s.reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let opens = s.opens_at.map_or(String::new(), |t| format!("-{t}"));
    format!(
        "\"{}-{}-{}{opens}\"",
        s.department,
        u8::from(s.online),
        reason
    )
}

fn department(query: Option<&str>) -> Result<u64> {
    let depts = crate::ws::widget::departments(query)?;
    match depts.as_slice() {
        [d] => Ok(*d),
        _ => Err(Error::bad(
            "exactly one department query parameter is required",
        )),
    }
}

/// The `Origin` to echo, if any; a browser from a refused origin gets 403.
fn cors_origin(hub: &Hub, headers: &HeaderMap) -> Result<Option<HeaderValue>> {
    match headers.get(header::ORIGIN) {
        None => Ok(None),
        Some(v)
            if v.to_str().is_ok_and(|o| {
                hub.cfg.origin_allowed(o) || crate::console::same_origin(o, headers)
            }) =>
        {
            Ok(Some(v.clone()))
        }
        Some(_) => Err(Error::Forbidden(
            "origin not allowed (server.allowed_origins)".into(),
        )),
    }
}

fn with_cors(mut res: Response<Body>, origin: Option<HeaderValue>) -> Response {
    if let Some(origin) = origin {
        let h = res.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("ETag"),
        );
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    res
}

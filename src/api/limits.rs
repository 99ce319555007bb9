//! The HTTP side of the limits: a deadline for request bodies (`limits.body_timeout`), the
//! back end's request rate (`limits.api_rate`), and the answer to a connection over
//! `limits.max_connections`.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::Error;
use crate::hub::Hub;

/// Largest request body read (the bodies of the API are small JSON documents).
pub const MAX_BODY: usize = 2 << 20;

/// Reads the request body within `limits.body_timeout`: a client that announces a body and
/// sends it slowly (or never) gets 408 and its connection closed, instead of holding a socket
/// and a buffer for as long as it likes. Requests without a body go straight through.
pub async fn body_deadline(State(hub): State<Hub>, req: Request, next: Next) -> Response {
    if !announces_body(req.headers()) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let deadline = hub.cfg.limits.body_timeout;
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(e)) => {
            // Over MAX_BODY, or the client went away mid-body.
            let too_big = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_big {
                closing(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("request body over {} MiB", MAX_BODY >> 20),
                )
            } else {
                closing(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("cannot read the request body: {e}"),
                )
            }
        }
        Err(_) => {
            metrics::counter!("presence_hub_body_timeouts_total").increment(1);
            closing(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "request body not received within limits.body_timeout ({})",
                    humantime::format_duration(deadline)
                ),
            )
        }
    }
}

/// True when a request says a body follows (`Transfer-Encoding`, or a `Content-Length`
/// other than 0).
pub fn announces_body(h: &http::HeaderMap) -> bool {
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// An error answer after which the connection is closed (its body was not read to the end).
fn closing(status: StatusCode, code: &str, message: String) -> Response {
    let mut res = (
        status,
        axum::Json(json!({ "error": { "code": code, "message": message } })),
    )
        .into_response();
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

/// The back end's request rate: one bucket for the API key (`limits.api_rate`,
/// `limits.api_burst`). Called once the key is checked.
pub fn api_rate(hub: &Hub) -> Result<(), Error> {
    if hub.limits.api_request(Instant::now()) {
        Ok(())
    } else {
        metrics::counter!("presence_hub_rate_limited_total", "kind" => "api").increment(1);
        Err(Error::RateLimited(format!(
            "over limits.api_rate ({} requests/s, burst {}): retry later",
            hub.cfg.limits.api_rate, hub.cfg.limits.api_burst
        )))
    }
}

/// Answers a connection over `limits.max_connections` with a 503 and closes it: the request
/// head is read first (clients expect the answer after their request), all of it bounded in
/// time and bytes, so that a flood of refused connections costs nothing lasting.
pub async fn refuse(mut stream: TcpStream) {
    const BODY: &str = r#"{"error":{"code":"internal","message":"too many connections (limits.max_connections)"}}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut seen = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 8 * 1024 {
            match stream.read(&mut chunk).await? {
                0 => return Ok(()),
                n => seen.extend_from_slice(&chunk[..n]),
            }
        }
        stream.write_all(head.as_bytes()).await?;
        stream.shutdown().await?;
        // Read (and drop) what else the client sends, so that closing does not reset the
        // connection before the client has read the answer.
        while stream.read(&mut chunk).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

//! The HTTP side: the back-end API (API key), the public widget status, health, readiness
//! and metrics, and the three WebSocket upgrades, all on one router.

mod audit;
mod chats;
mod departments;
mod events;
pub mod limits;
mod operators;
mod widget;

use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use http::{StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::ws;

pub fn router(hub: Hub) -> Router {
    let api = Router::new()
        .route("/operators", get(operators::list).put(operators::put_many))
        .route(
            "/operators/{id}",
            put(operators::put)
                .get(operators::get)
                .delete(operators::delete),
        )
        .route(
            "/operators/{id}/status",
            axum::routing::patch(operators::patch_status),
        )
        .route("/operators/{id}/sessions", get(audit::sessions))
        .route("/operators/{id}/log", get(audit::log))
        .route("/reports/online", get(audit::report))
        .route(
            "/departments/{id}",
            put(departments::put).get(departments::get),
        )
        .route("/chats", post(chats::create).get(chats::list))
        .route("/chats/{id}", get(chats::get).patch(chats::patch))
        .route("/chats/{id}/close", post(chats::close))
        .route("/chats/{id}/messages", get(chats::messages))
        .route("/events", get(events::poll))
        .route("/events/stream", get(events::stream))
        .route("/tokens", post(chats::token))
        .route_layer(middleware::from_fn_with_state(hub.clone(), require_api_key))
        .route(
            "/widget/status",
            get(widget::status).options(widget::preflight),
        );
    Router::new()
        .nest("/api/v1", api)
        .route("/ws/operator", get(ws::operator::upgrade))
        .route("/ws/widget", get(ws::widget::upgrade))
        .route("/ws/visitor", get(ws::visitor::upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(record_latency))
        .with_state(hub)
}

/// The WebSocket endpoints, answered without the router (see [`serve`]).
#[derive(Clone, Copy)]
enum Upgrade {
    Operator,
    Widget,
    Visitor,
}

/// Serves one request of an HTTP connection. A WebSocket upgrade (`GET` of a `/ws/…` path
/// without a body) goes straight to its endpoint: the router's matching and its middleware
/// stack (the body deadline has no body to time, the latency is recorded here the same way)
/// are a large share of an upgrade's cost, and reconnect storms are made of upgrades.
/// Everything else, other methods on those paths included, goes through `app`.
pub async fn serve(
    app: Router,
    hub: Hub,
    req: Request,
) -> std::result::Result<Response, std::convert::Infallible> {
    use tower::ServiceExt;
    let upgrade = match req.uri().path() {
        "/ws/operator" => Some(Upgrade::Operator),
        "/ws/widget" => Some(Upgrade::Widget),
        "/ws/visitor" => Some(Upgrade::Visitor),
        _ => None,
    }
    .filter(|_| req.method() == http::Method::GET && !limits::announces_body(req.headers()));
    let Some(upgrade) = upgrade else {
        return app.oneshot(req).await;
    };
    let start = Instant::now();
    let res = match upgrade {
        Upgrade::Operator => ws::operator::upgrade(State(hub), req).await,
        Upgrade::Widget => ws::widget::upgrade(State(hub), req).await,
        Upgrade::Visitor => ws::visitor::upgrade(State(hub), req).await,
    };
    crate::metrics::request("GET", res.status().as_u16(), start.elapsed());
    Ok(res)
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code(), "message": self.to_string() } });
        let mut res = (self.status(), axum::Json(body)).into_response();
        if matches!(self, Error::Unauthorized(_)) {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        res
    }
}

/// Parses a JSON body; a bad one is a 400 that says what is wrong.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::bad(format!("invalid JSON body: {e}")))
}

/// Parses query parameters into a filter; unknown or malformed ones are a 400.
fn query<T: DeserializeOwned>(req_query: Option<&str>) -> Result<T> {
    serde_urlencoded::from_str(req_query.unwrap_or(""))
        .map_err(|e| Error::bad(format!("invalid query: {e}")))
}

/// A path id; anything but a u64 is a 400.
fn id(raw: &str) -> Result<u64> {
    raw.parse()
        .map_err(|_| Error::bad(format!("id must be an unsigned integer, got {raw:?}")))
}

fn ok<T: serde::Serialize>(status: StatusCode, v: T) -> Response {
    (status, axum::Json(v)).into_response()
}

async fn require_api_key(State(hub): State<Hub>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !crate::auth::bearer_matches(given, &hub.api_key) {
        return Error::Unauthorized(
            "missing or wrong API key (Authorization: Bearer <auth.api_key>)".into(),
        )
        .into_response();
    }
    if let Err(e) = limits::api_rate(&hub) {
        return e.into_response();
    }
    next.run(req).await
}

async fn record_latency(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let res = next.run(req).await;
    crate::metrics::request(method.as_str(), res.status().as_u16(), start.elapsed());
    res
}

async fn healthz() -> Response {
    ok(StatusCode::OK, json!({ "status": "ok" }))
}

async fn readyz(State(hub): State<Hub>) -> Response {
    let ready = hub.store_ready() && !hub.shutdown.is_cancelled();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    ok(
        status,
        json!({ "ready": ready, "store": hub.store_ready() }),
    )
}

async fn metrics(State(hub): State<Hub>) -> Response {
    let text = crate::metrics::render(&hub.gauges());
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(Body::from(text))
        .expect("static headers")
}

async fn not_found() -> Response {
    Error::NotFound("no such endpoint".into()).into_response()
}

async fn method_not_allowed() -> Response {
    let body = json!({ "error": { "code": "method_not_allowed", "message": "method not allowed on this endpoint" } });
    ok(StatusCode::METHOD_NOT_ALLOWED, body)
}

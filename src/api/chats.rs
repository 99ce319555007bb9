//! `/api/v1/chats` and `/api/v1/tokens`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::{body, id, ok, query};
use crate::config::parse_duration;
use crate::core::{ChatFilter, ChatOp, NewChat};
use crate::error::Error;
use crate::hub::Hub;
use crate::model::ChatStatus;

pub async fn create(State(hub): State<Hub>, bytes: Bytes) -> Response {
    let run = async {
        let req: NewChat = body(&bytes)?;
        hub.chat(ChatOp::Create { req }, None).await
    };
    match run.await {
        Ok(created) => ok(StatusCode::CREATED, created),
        Err(e) => e.into_response(),
    }
}

pub async fn get(State(hub): State<Hub>, Path(raw): Path<String>) -> Response {
    match id(&raw).and_then(|cid| hub.read(|c| c.chat(cid))) {
        Ok(chat) => ok(StatusCode::OK, chat),
        Err(e) => e.into_response(),
    }
}

pub async fn list(State(hub): State<Hub>, req: Request) -> Response {
    match query::<ChatFilter>(req.uri().query()) {
        Ok(f) => ok(
            StatusCode::OK,
            json!({ "chats": hub.read(|c| c.list_chats(&f)) }),
        ),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchChat {
    status: ChatStatus,
}

/// Only `{"status":"pending"}` on a bot chat: the hand-over to humans.
pub async fn patch(State(hub): State<Hub>, Path(raw): Path<String>, bytes: Bytes) -> Response {
    let run = async {
        let cid = id(&raw)?;
        let p: PatchChat = body(&bytes)?;
        if p.status != ChatStatus::Pending {
            return Err(Error::bad(
                "only {\"status\":\"pending\"} (hand a bot chat to humans) is supported",
            ));
        }
        hub.chat(ChatOp::HandOver { chat: cid }, None).await
    };
    match run.await {
        Ok(chat) => ok(StatusCode::OK, chat),
        Err(e) => e.into_response(),
    }
}

pub async fn close(State(hub): State<Hub>, Path(raw): Path<String>) -> Response {
    let run = async {
        let cid = id(&raw)?;
        hub.chat(
            ChatOp::Close {
                by: None,
                chat: cid,
            },
            None,
        )
        .await
    };
    match run.await {
        Ok(chat) => ok(StatusCode::OK, chat),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    operator: u64,
    ttl: Option<String>,
}

/// Longest token lifetime the API mints.
const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

pub async fn token(State(hub): State<Hub>, bytes: Bytes) -> Response {
    let run = || -> Result<serde_json::Value, Error> {
        let req: TokenRequest = body(&bytes)?;
        let ttl = match req.ttl {
            Some(s) => parse_duration(&s).map_err(Error::BadRequest)?,
            None => Duration::from_secs(3600),
        };
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(Error::bad("ttl must be between 1s and 30 days"));
        }
        if !hub.read(|c| c.has_operator(req.operator)) {
            return Err(Error::NotFound(format!(
                "operator {} is unknown",
                req.operator
            )));
        }
        Ok(json!({ "token": hub.tokens.mint(req.operator, ttl), "expires_in": ttl.as_secs() }))
    };
    match run() {
        Ok(v) => ok(StatusCode::OK, v),
        Err(e) => e.into_response(),
    }
}

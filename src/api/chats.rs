//! `/api/v1/chats` and `/api/v1/tokens`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::{body, id, ok, query};
use crate::config::parse_duration;
use crate::core::{ChatFilter, ChatOp, NewChat};
use crate::error::Error;
use crate::hub::Hub;
use crate::model::{Chat, ChatId, ChatStatus};

pub async fn create(State(hub): State<Hub>, bytes: Bytes) -> Response {
    let run = async {
        let req: NewChat = body(&bytes)?;
        crate::limits::record::visitor(&hub.cfg.limits, &req.visitor)?;
        // A closed chat is no longer live but its id stays used until its retention ends.
        if let Some(id) = req.id
            && hub.store().stored_chat(ChatId(id)).await?.is_some()
        {
            return Err(Error::Conflict(format!("chat {id} already exists")));
        }
        hub.chat(ChatOp::Create { req }, None).await
    };
    match run.await {
        Ok(created) => ok(StatusCode::CREATED, created.wire()),
        Err(e) => e.into_response(),
    }
}

/// A live chat, or a closed one the store still keeps.
async fn find(hub: &Hub, cid: u64) -> Result<Chat, Error> {
    if let Some(chat) = hub.read(|c| c.live_chat(cid)) {
        return Ok(chat);
    }
    hub.store()
        .stored_chat(ChatId(cid))
        .await?
        .ok_or_else(|| Error::NotFound(format!("chat {cid} is unknown")))
}

pub async fn get(State(hub): State<Hub>, Path(raw): Path<String>) -> Response {
    let run = async { find(&hub, id(&raw)?).await };
    match run.await {
        Ok(chat) => ok(StatusCode::OK, chat.view()),
        Err(e) => e.into_response(),
    }
}

/// Query of `GET /api/v1/chats`: the filters and the page.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    department: Option<u64>,
    status: Option<ChatStatus>,
    owner: Option<u64>,
    limit: Option<usize>,
    after: Option<u64>,
}

/// Chats per page by default and at most.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Closed chats one page scans at most in the store (narrow filters over many chats).
const CLOSED_SCAN: usize = 10_000;

/// Live chats from memory and closed ones from the store, merged in id order:
/// `{"chats":[…],"next":ID|null}`.
pub async fn list(State(hub): State<Hub>, RawQuery(raw_query): RawQuery) -> Response {
    let run = async {
        let q: ListQuery = query(raw_query.as_deref())?;
        let limit = page_limit(q.limit)?;
        let f = ChatFilter {
            department: q.department,
            status: q.status,
            owner: q.owner,
        };
        let after = q.after.unwrap_or(0);
        let live = if f.status == Some(ChatStatus::Closed) {
            Vec::new()
        } else {
            hub.read(|c| c.list_chats(&f, after, limit))
        };
        let mut closed = Vec::new();
        // Where the scan of closed chats stopped short of the end, the page must end there.
        let mut scan_end = None;
        if f.status.is_none_or(|s| s == ChatStatus::Closed) {
            let mut from = after;
            let mut scanned = 0;
            loop {
                let batch = hub.store().closed_chats(from, limit).await?;
                let full = batch.scanned == limit;
                scanned += batch.scanned;
                from = batch.last.unwrap_or(from);
                closed.extend(batch.chats.into_iter().filter(|c| f.admits(c)));
                if closed.len() >= limit || !full {
                    break;
                }
                if scanned >= CLOSED_SCAN {
                    scan_end = Some(from);
                    break;
                }
            }
        }
        Ok::<_, Error>(merge_page(live, closed, limit, scan_end))
    };
    match run.await {
        Ok(page) => ok(StatusCode::OK, page),
        Err(e) => e.into_response(),
    }
}

fn page_limit(limit: Option<usize>) -> Result<usize, Error> {
    match limit.unwrap_or(PAGE) {
        0 => Err(Error::bad("limit must be at least 1")),
        n if n > MAX_PAGE => Err(Error::bad(format!("limit must be at most {MAX_PAGE}"))),
        n => Ok(n),
    }
}

/// One page of two id-ordered lists; `next` is the id to pass as `after` for the rest.
fn merge_page(
    live: Vec<Chat>,
    closed: Vec<Chat>,
    limit: usize,
    scan_end: Option<u64>,
) -> serde_json::Value {
    let mut all: std::collections::BTreeMap<u64, Chat> =
        live.into_iter().map(|c| (c.id, c)).collect();
    // A chat closed between the two reads: the store's (closed) copy wins.
    all.extend(closed.into_iter().map(|c| (c.id, c)));
    let mut all: Vec<Chat> = all.into_values().collect();
    if let Some(end) = scan_end {
        all.retain(|c| c.id <= end);
    }
    let more = all.len() > limit;
    all.truncate(limit);
    let next = if more || all.len() == limit {
        all.last().map(|c| c.id)
    } else {
        scan_end
    };
    let chats: Vec<_> = all.iter().map(|c| c.view()).collect();
    json!({ "chats": chats, "next": next })
}

/// Query of `GET /api/v1/chats/{id}/messages`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagesQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

/// Kept messages of a chat, oldest first, whispers included (marked).
pub async fn messages(
    State(hub): State<Hub>,
    Path(raw): Path<String>,
    RawQuery(raw_query): RawQuery,
) -> Response {
    let run = async {
        let cid = id(&raw)?;
        let q: MessagesQuery = query(raw_query.as_deref())?;
        let limit = page_limit(q.limit)?;
        let after = q.after.unwrap_or(0);
        let messages = match hub.read(|c| c.messages(cid, after, limit)) {
            Some(m) => m,
            None => {
                find(&hub, cid).await?;
                hub.store()
                    .stored_messages(ChatId(cid), after, limit)
                    .await?
            }
        };
        Ok::<_, Error>(json!({ "chat": cid, "messages": messages }))
    };
    match run.await {
        Ok(v) => ok(StatusCode::OK, v),
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
        hub.chat(ChatOp::HandOver { chat: cid.into() }, None).await
    };
    match run.await {
        Ok(chat) => ok(StatusCode::OK, chat.wire()),
        Err(e) => e.into_response(),
    }
}

pub async fn close(State(hub): State<Hub>, Path(raw): Path<String>) -> Response {
    let run = async {
        let cid = id(&raw)?;
        hub.chat(
            ChatOp::Close {
                by: None,
                chat: cid.into(),
            },
            None,
        )
        .await
    };
    match run.await {
        Ok(chat) => ok(StatusCode::OK, chat.wire()),
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

//! The event feed of the back end: `GET /api/v1/events` (poll, long poll with `wait`) and
//! `GET /api/v1/events/stream` (Server-Sent Events, resumed with `Last-Event-ID`). Both read
//! the log the store writes with every change; this node's signal wakes waiters for events
//! of any node.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::Stream;
use http::{HeaderMap, StatusCode, header};
use serde::Deserialize;

use super::query;
use crate::config::parse_duration;
use crate::error::Error;
use crate::feed::{Page, Position, StoredEvent, Types};
use crate::hub::Hub;

/// Longest `wait` of a long poll.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Events per answer by default and at most.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// The comment an idle stream sends so proxies and clients know it is alive.
const PING_EVERY: Duration = Duration::from_secs(15);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedQuery {
    after: Option<String>,
    limit: Option<usize>,
    types: Option<String>,
    wait: Option<String>,
}

/// Resolves `after`: absent = the oldest kept event; `$` = only what comes from now on.
async fn position(hub: &Hub, after: Option<String>) -> Result<Position, Error> {
    Ok(match after.as_deref() {
        None | Some("") => Position::Start,
        Some("$") => match hub.store().last_event_id().await? {
            Some(id) => Position::After(id),
            None => Position::Start,
        },
        Some(id) => Position::After(id.to_string()),
    })
}

fn types(list: Option<&str>) -> Result<Types, Error> {
    Types::parse(list.unwrap_or("")).map_err(Error::BadRequest)
}

/// `GET /api/v1/events?after=ID&limit=N&types=a,b&wait=25s` →
/// `{"events":[…],"last_id":"…"}`, oldest first.
pub async fn poll(State(hub): State<Hub>, RawQuery(raw): RawQuery) -> Response {
    let run = async {
        let q: FeedQuery = query(raw.as_deref())?;
        let limit = match q.limit.unwrap_or(PAGE) {
            0 => return Err(Error::bad("limit must be at least 1")),
            n if n > MAX_PAGE => {
                return Err(Error::bad(format!("limit must be at most {MAX_PAGE}")));
            }
            n => n,
        };
        let wait = match q.wait.as_deref() {
            None | Some("") => Duration::ZERO,
            Some(w) => parse_duration(w).map_err(Error::BadRequest)?,
        };
        if wait > MAX_WAIT {
            return Err(Error::bad("wait must be at most 60s"));
        }
        let types = types(q.types.as_deref())?;
        let mut from = position(&hub, q.after).await?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut signal = hub.store().event_signal();
        loop {
            signal.borrow_and_update();
            let page = hub
                .store()
                .read_events(from.clone(), limit, types.clone())
                .await?;
            let now = tokio::time::Instant::now();
            if !page.events.is_empty() || now >= deadline {
                return Ok(page_json(&page, &from));
            }
            if let Some(id) = &page.last_id {
                // The scan stopped short (only events the filter leaves out): read on at
                // once rather than wait for new events.
                let advanced = Some(id.as_str()) != from.id();
                from = Position::After(id.clone());
                if advanced {
                    continue;
                }
            }
            tokio::select! {
                r = signal.changed() => if r.is_err() {
                    tokio::time::sleep_until(deadline).await;
                },
                _ = tokio::time::sleep_until(deadline) => {}
                _ = hub.shutdown.cancelled() => return Ok(page_json(&page, &from)),
            }
        }
    };
    match run.await {
        Ok(body) => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .expect("static headers"),
        Err(e) => e.into_response(),
    }
}

/// The answer of a poll, built from the events' stored JSON without parsing it again.
fn page_json(page: &Page, from: &Position) -> String {
    let last = page.last_id.as_deref().or(from.id());
    let mut out = String::from("{\"events\":[");
    for (i, e) in page.events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&e.to_json());
    }
    out.push_str("],\"last_id\":");
    out.push_str(&serde_json::to_string(&last).expect("strings serialize"));
    out.push('}');
    out
}

/// `GET /api/v1/events/stream`: every event as `id:`, `event:`, `data:`, resumed after
/// `Last-Event-ID` (header) or `after` (query), with `: ping` every 15 s.
pub async fn stream(
    State(hub): State<Hub>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let run = async {
        let q: FeedQuery = query(raw.as_deref())?;
        if q.limit.is_some() || q.wait.is_some() {
            return Err(Error::bad(
                "limit and wait are for GET /api/v1/events, not the stream",
            ));
        }
        let resume = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let types = types(q.types.as_deref())?;
        let from = position(&hub, resume.or(q.after)).await?;
        // A position retention dropped is a 410 now, not a stream that skips.
        let first = hub
            .store()
            .read_events(from.clone(), PAGE, types.clone())
            .await?;
        Ok::<_, Error>(events(hub.clone(), from, first, types))
    };
    match run.await {
        Ok(s) => Sse::new(s)
            .keep_alive(KeepAlive::new().interval(PING_EVERY).text("ping"))
            .into_response(),
        Err(e) => e.into_response(),
    }
}

struct Cursor {
    hub: Hub,
    from: Position,
    pending: std::collections::VecDeque<StoredEvent>,
    types: Types,
    signal: tokio::sync::watch::Receiver<u64>,
    done: bool,
}

fn events(
    hub: Hub,
    from: Position,
    first: Page,
    types: Types,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let signal = hub.store().event_signal();
    let mut cursor = Cursor {
        hub,
        from,
        pending: Default::default(),
        types,
        signal,
        done: false,
    };
    cursor.take(first);
    futures::stream::unfold(cursor, |mut c| async move {
        loop {
            if c.done {
                return None;
            }
            if let Some(e) = c.pending.pop_front() {
                let ev = SseEvent::default()
                    .id(e.id.clone())
                    .event(e.kind.as_str())
                    .data(e.to_json());
                return Some((Ok(ev), c));
            }
            c.signal.borrow_and_update();
            match c
                .hub
                .store()
                .read_events(c.from.clone(), PAGE, c.types.clone())
                .await
            {
                Ok(page) if !page.events.is_empty() => {
                    c.take(page);
                    continue;
                }
                Ok(page) => {
                    let advanced = page
                        .last_id
                        .as_deref()
                        .is_some_and(|l| Some(l) != c.from.id());
                    c.take(page);
                    if advanced {
                        continue;
                    }
                }
                Err(e) => {
                    // Fell behind retention, or the store failed: say so and end; the client
                    // resumes with Last-Event-ID and gets a 410 or the rest.
                    let err = Error::from(e);
                    let body = serde_json::json!({"error": {"code": err.code(), "message": err.to_string()}});
                    c.done = true;
                    let ev = SseEvent::default().event("error").data(body.to_string());
                    return Some((Ok(ev), c));
                }
            }
            tokio::select! {
                r = c.signal.changed() => if r.is_err() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                },
                // Waits bounded, so a lost wake-up costs a second, not the stream.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = c.hub.shutdown.cancelled() => return None,
            }
        }
    })
}

impl Cursor {
    fn take(&mut self, page: Page) {
        if let Some(id) = page.last_id {
            self.from = Position::After(id);
        }
        self.pending.extend(page.events);
    }
}

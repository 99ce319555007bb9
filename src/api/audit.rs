//! Online sessions, the online report and the status log (`/api/v1/operators/{id}/sessions`,
//! `/api/v1/reports/online`, `/api/v1/operators/{id}/log`). Read from the store, so every
//! node of a cluster answers the same.

use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::{id, ok, query};
use crate::audit::{self, parse_rfc3339_ms, rfc3339_ms};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::model::OperatorId;

/// Entries `GET …/log` answers when `limit` is left out, and at most.
const LOG_LIMIT: usize = 100;
const LOG_LIMIT_MAX: usize = 1000;
const DAY_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Window {
    from: Option<String>,
    to: Option<String>,
    department: Option<u64>,
}

/// `[from, to)` in ms: RFC 3339 bounds, by default the last 24 hours.
fn window(w: &Window, now: u64) -> Result<(u64, u64)> {
    let at = |name: &str, v: &Option<String>| -> Result<Option<u64>> {
        v.as_deref()
            .map(|s| {
                parse_rfc3339_ms(s).ok_or_else(|| {
                    Error::bad(format!(
                        "{name} must be an RFC 3339 instant (e.g. 2026-12-01T09:00:00Z), got {s:?}"
                    ))
                })
            })
            .transpose()
    };
    let to = at("to", &w.to)?.unwrap_or(now);
    let from = at("from", &w.from)?.unwrap_or(to.saturating_sub(DAY_MS));
    if from >= to {
        return Err(Error::bad("from must be before to"));
    }
    Ok((from, to))
}

pub async fn sessions(
    State(hub): State<Hub>,
    Path(raw): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let run = async {
        let op = id(&raw)?;
        let w: Window = query(q.as_deref())?;
        if w.department.is_some() {
            return Err(Error::bad("invalid query: unknown field `department`"));
        }
        let now = audit::now_ms();
        let (from, to) = window(&w, now)?;
        let found = hub
            .store()
            .read_sessions(vec![OperatorId(op)], from, to)
            .await?;
        let views: Vec<_> = found.iter().map(|s| s.view(now)).collect();
        Ok(json!({ "sessions": views }))
    };
    match run.await {
        Ok(v) => ok(StatusCode::OK, v),
        Err(e) => e.into_response(),
    }
}

pub async fn report(State(hub): State<Hub>, RawQuery(q): RawQuery) -> Response {
    let run = async {
        let w: Window = query(q.as_deref())?;
        let now = audit::now_ms();
        let (from, to) = window(&w, now)?;
        let ops = hub.read(|c| c.report_operators(w.department));
        let ids: Vec<OperatorId> = ops.iter().map(|(id, _)| OperatorId(*id)).collect();
        let found = hub.store().read_sessions(ids, from, to).await?;
        let lines = audit::report(&ops, &found, from, to, now);
        Ok::<_, Error>(
            json!({ "from": rfc3339_ms(from), "to": rfc3339_ms(to), "operators": lines }),
        )
    };
    match run.await {
        Ok(v) => ok(StatusCode::OK, v),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    limit: Option<usize>,
}

pub async fn log(
    State(hub): State<Hub>,
    Path(raw): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let run = async {
        let op = id(&raw)?;
        let q: LogQuery = query(q.as_deref())?;
        let limit = q.limit.unwrap_or(LOG_LIMIT);
        if limit == 0 || limit > LOG_LIMIT_MAX {
            return Err(Error::bad(format!(
                "limit must be between 1 and {LOG_LIMIT_MAX}"
            )));
        }
        let entries = hub.store().read_log(OperatorId(op), limit).await?;
        Ok(json!({ "log": entries }))
    };
    match run.await {
        Ok(v) => ok(StatusCode::OK, v),
        Err(e) => e.into_response(),
    }
}

//! `/api/v1/operators`: records, views, settings.

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::{body, id, ok, query};
use crate::command::{self, DeleteOperator, PutOperators, SetSettings};
use crate::core::{Actor, OperatorFilter, SettingsChange};
use crate::error::Error;
use crate::hub::Hub;
use crate::model::{OperatorRecord, Permission};

/// `PUT /api/v1/operators/{id}`: the record, and optionally settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutOperator {
    id: Option<u64>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    departments: Vec<u64>,
    #[serde(default)]
    watch_departments: Vec<u64>,
    #[serde(default)]
    permissions: Vec<Permission>,
    #[serde(default)]
    max_chats: u32,
    #[serde(default)]
    exclude_autoassign: bool,
    #[serde(default)]
    auto_accept: bool,
    online: Option<bool>,
    invisible: Option<bool>,
    always_online: Option<bool>,
}

/// The record and settings change a `PutOperator` stands for.
fn record(oid: u64, p: PutOperator) -> (OperatorRecord, SettingsChange) {
    let mut departments = p.departments;
    departments.sort_unstable();
    departments.dedup();
    let mut watch = p.watch_departments;
    watch.sort_unstable();
    watch.dedup();
    let record = OperatorRecord {
        id: oid,
        name: p.name,
        departments,
        watch_departments: watch,
        permissions: p.permissions,
        max_chats: p.max_chats,
        exclude_autoassign: p.exclude_autoassign,
        auto_accept: p.auto_accept,
    };
    let change = SettingsChange {
        online: p.online,
        invisible: p.invisible,
        always_online: p.always_online,
    };
    (record, change)
}

pub async fn put(State(hub): State<Hub>, Path(raw): Path<String>, bytes: Bytes) -> Response {
    let run = async {
        let oid = id(&raw)?;
        let p: PutOperator = body(&bytes)?;
        if p.id.is_some_and(|i| i != oid) {
            return Err(Error::bad("id in the body differs from the path"));
        }
        let limits = &hub.cfg.limits;
        crate::limits::record::departments(limits, "departments", p.departments.len())?;
        crate::limits::record::departments(limits, "watch_departments", p.watch_departments.len())?;
        let (record, change) = record(oid, p);
        hub.apply(command::PutOperator {
            record,
            settings: change,
        })
        .await
    };
    match run.await {
        Ok((view, created)) => ok(
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            view,
        ),
        Err(e) => e.into_response(),
    }
}

/// Operators one bulk `PUT /api/v1/operators` takes at most.
const MAX_BULK: usize = 1000;

/// `PUT /api/v1/operators` with an array of records (each with its `id`): a platform syncs
/// thousands of operators in a few requests. All or nothing: one bad record is a 400 that
/// names it and nothing is applied; the rest is one change, durable at once.
pub async fn put_many(State(hub): State<Hub>, bytes: Bytes) -> Response {
    let run = async {
        let list: Vec<PutOperator> = body(&bytes)?;
        if list.len() > MAX_BULK {
            return Err(Error::bad(format!(
                "at most {MAX_BULK} operators per request, got {}",
                list.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        let mut records = Vec::with_capacity(list.len());
        for (i, p) in list.into_iter().enumerate() {
            let oid =
                p.id.ok_or_else(|| Error::bad(format!("operator at index {i} has no id")))?;
            if !seen.insert(oid) {
                return Err(Error::bad(format!("operator {oid} is listed twice")));
            }
            let (record, settings) = record(oid, p);
            records.push(command::PutOperator { record, settings });
        }
        hub.apply(PutOperators { operators: records }).await
    };
    match run.await {
        Ok(v) => ok(StatusCode::OK, v),
        Err(e) => e.into_response(),
    }
}

pub async fn get(State(hub): State<Hub>, Path(raw): Path<String>) -> Response {
    match id(&raw).and_then(|oid| hub.read(|c| c.operator_view(oid))) {
        Ok(view) => ok(StatusCode::OK, view),
        Err(e) => e.into_response(),
    }
}

pub async fn delete(State(hub): State<Hub>, Path(raw): Path<String>) -> Response {
    let run = async {
        let oid = id(&raw)?;
        hub.apply(DeleteOperator {
            operator: oid.into(),
        })
        .await
    };
    match run.await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn list(State(hub): State<Hub>, req: Request) -> Response {
    match query::<OperatorFilter>(req.uri().query()) {
        Ok(f) => ok(
            StatusCode::OK,
            json!({ "operators": hub.read(|c| c.list_operators(&f)) }),
        ),
        Err(e) => e.into_response(),
    }
}

pub async fn patch_status(
    State(hub): State<Hub>,
    Path(raw): Path<String>,
    bytes: Bytes,
) -> Response {
    let run = async {
        let oid = id(&raw)?;
        let change: SettingsChange = body(&bytes)?;
        hub.apply(SetSettings {
            actor: Actor::Backend,
            operator: oid.into(),
            change,
        })
        .await
    };
    match run.await {
        Ok(view) => ok(StatusCode::OK, view),
        Err(e) => e.into_response(),
    }
}

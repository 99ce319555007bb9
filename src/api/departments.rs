//! `/api/v1/departments/{id}`: settings; GET adds the widget state and counts.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Deserialize;

use super::{body, id, ok};
use crate::command;
use crate::config::{Strategy, parse_duration};
use crate::error::Error;
use crate::hours::{Hours, Schedule};
use crate::hub::Hub;
use crate::model::Department;

/// Longest `accept_timeout` a department may set.
const MAX_ACCEPT_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Fields left out take the config file's defaults (a PUT replaces the department).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutDepartment {
    id: Option<u64>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    disabled: bool,
    assignment: Option<Strategy>,
    max_chats: Option<u32>,
    accept_timeout: Option<String>,
    #[serde(default)]
    pending_max: u32,
    #[serde(default)]
    bot: bool,
    hours: Option<Hours>,
}

pub async fn put(State(hub): State<Hub>, Path(raw): Path<String>, bytes: Bytes) -> Response {
    let run = async {
        let did = id(&raw)?;
        let p: PutDepartment = body(&bytes)?;
        if p.id.is_some_and(|i| i != did) {
            return Err(Error::bad("id in the body differs from the path"));
        }
        let defaults = &hub.cfg.assignment;
        let accept_timeout: Duration = match p.accept_timeout {
            Some(s) => parse_duration(&s).map_err(Error::BadRequest)?,
            None => defaults.accept_timeout,
        };
        if accept_timeout > MAX_ACCEPT_TIMEOUT {
            return Err(Error::bad("accept_timeout must be at most 7 days"));
        }
        if let Some(h) = &p.hours {
            Schedule::parse(h).map_err(|e| Error::BadRequest(e.0))?;
        }
        let dept = Department {
            id: did,
            name: p.name,
            disabled: p.disabled,
            assignment: p.assignment.unwrap_or(defaults.strategy),
            max_chats: p.max_chats.unwrap_or(defaults.default_max_chats),
            accept_timeout,
            pending_max: p.pending_max,
            bot: p.bot,
            hours: p.hours,
            version: 0,
        };
        hub.apply(command::PutDepartment { department: dept }).await
    };
    match run.await {
        Ok(v) => ok(StatusCode::OK, v),
        Err(e) => e.into_response(),
    }
}

pub async fn get(State(hub): State<Hub>, Path(raw): Path<String>) -> Response {
    match id(&raw) {
        Ok(did) => ok(StatusCode::OK, hub.read(|c| c.department_view(did))),
        Err(e) => e.into_response(),
    }
}

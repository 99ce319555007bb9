//! `/ws/widget?department=1[&department=2…]`: public. Sends each department's state at once,
//! then a `widget_status` only when a department's `online` or `reason` changes.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

use super::{Flow, Handler};
use crate::command::{ConnectWidget, DisconnectWidget, Socket};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::model::DeptId;
use crate::peer::{Kind, Peer};
use crate::protocol::error_frame;

/// Departments one widget socket may follow.
const MAX_DEPARTMENTS: usize = 64;

pub async fn upgrade(State(hub): State<Hub>, req: Request) -> Response {
    let depts = match departments(req.uri().query()) {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    super::upgrade(
        hub,
        req,
        Kind::Widget,
        Widget {
            depts: depts.into_boxed_slice(),
        },
    )
}

/// The `department` query parameters: at least one, numeric, without repeats; no other
/// parameter.
pub fn departments(query: Option<&str>) -> Result<Vec<u64>> {
    crate::limits::check_query(query, &["department"])?;
    let mut out = Vec::new();
    for (_, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let d: u64 = v
            .parse()
            .map_err(|_| Error::bad(format!("department must be a number, got {v:?}")))?;
        if !out.contains(&d) {
            out.push(d);
        }
    }
    if out.is_empty() {
        return Err(Error::bad(
            "at least one department query parameter is required",
        ));
    }
    if out.len() > MAX_DEPARTMENTS {
        return Err(Error::bad(format!(
            "at most {MAX_DEPARTMENTS} departments per widget"
        )));
    }
    Ok(out)
}

/// A widget socket's handler: held by its task for the socket's life, so a boxed slice (no
/// spare capacity, no capacity field).
struct Widget {
    depts: Box<[u64]>,
}

impl Handler for Widget {
    fn start(&mut self, hub: &Hub, peer: &Arc<Peer>) -> Result<()> {
        let _ = hub.apply_now(ConnectWidget {
            socket: Socket(peer.clone()),
            departments: self.depts.iter().map(|d| DeptId(*d)).collect(),
        });
        Ok(())
    }

    async fn on_text(&mut self, _hub: &Hub, peer: &Arc<Peer>, _text: &str) -> Flow {
        let _ = peer.send(&error_frame(
            None,
            &Error::bad("widgets only receive; nothing to send"),
        ));
        Flow::Continue
    }

    fn stop(&mut self, hub: &Hub, peer: &Arc<Peer>) {
        let _ = hub.apply_now(DisconnectWidget {
            conn: peer.id,
            departments: self.depts.iter().map(|d| DeptId(*d)).collect(),
        });
    }
}

//! `/ws/visitor?chat=N&token=T`: a visitor in a chat. Sends `send_message`; receives `chat`
//! (status and owner's name, never watchers) and non-whisper `message`s.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

use super::{Flow, Handler};
use crate::core::ChatOp;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::peer::{Kind, Peer};
use crate::protocol::{VisitorRequest, ack_frame, error_frame, parse_request};

pub async fn upgrade(State(hub): State<Hub>, req: Request) -> Response {
    let chat = match authenticate(&hub, req.uri().query()) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    super::upgrade(hub, req, Kind::Visitor(chat), Visitor { chat })
}

/// 401 without a token, 403 with a wrong one, 400 without a chat id.
fn authenticate(hub: &Hub, query: Option<&str>) -> Result<u64> {
    let mut chat = None;
    let mut token = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "chat" => {
                chat = Some(
                    v.parse::<u64>()
                        .map_err(|_| Error::bad("chat must be a number"))?,
                )
            }
            "token" => token = Some(v.into_owned()),
            _ => {}
        }
    }
    let chat = chat.ok_or_else(|| Error::bad("missing chat query parameter"))?;
    let token = token.ok_or_else(|| Error::Unauthorized("missing visitor token".into()))?;
    hub.read(|c| c.check_visitor(chat, &token))
        .map_err(|e| match e {
            Error::NotFound(_) => Error::Forbidden("wrong visitor token for this chat".into()),
            other => other,
        })?;
    Ok(chat)
}

struct Visitor {
    chat: u64,
}

impl Handler for Visitor {
    fn start(&mut self, hub: &Hub, peer: &Arc<Peer>) -> Result<()> {
        hub.run(|core, _| core.connect_visitor(self.chat, peer.clone()))
            .0
    }

    async fn on_text(&mut self, hub: &Hub, peer: &Arc<Peer>, text: &str) -> Flow {
        let (r, req) = parse_request::<VisitorRequest>(text);
        let result = match req {
            Ok(VisitorRequest::SendMessage { text }) => {
                let chat = self.chat;
                let origin = Some(hub.origin(peer.id));
                hub.chat(ChatOp::VisitorMessage { chat, text, origin }, None)
                    .await
            }
            Err(e) => Err(e),
        };
        let frame = match &result {
            Ok(v) => ack_frame(r.as_ref(), Some(v)),
            Err(e) => error_frame(r.as_ref(), e),
        };
        let _ = peer.send(&frame);
        Flow::Continue
    }

    fn stop(&mut self, hub: &Hub, peer: &Arc<Peer>) {
        hub.run(|core, _| core.disconnect_visitor(self.chat, peer.id));
    }
}

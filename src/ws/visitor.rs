//! `/ws/visitor?chat=N&token=T`: a visitor in a chat. Sends `send_message`; receives `chat`
//! (status and owner's name, never watchers) and non-whisper `message`s.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

use super::{Flow, Handler};
use crate::command::{ConnectVisitor, DisconnectVisitor, Socket};
use crate::core::ChatOp;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::model::{ChatId, ChatMessage, ChatStatus, VisitorChatView};
use crate::peer::{Kind, Peer};
use crate::protocol::{Event, Frame, VisitorRequest, ack_frame, error_frame, parse_request};

pub async fn upgrade(State(hub): State<Hub>, req: Request) -> Response {
    let (chat, token) = match params(req.uri().query()) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let closed = match hub.read(|c| c.check_visitor(chat, &token)) {
        Ok(()) => None,
        // A closed chat has left live state; its visitor (a reload) still gets the chat
        // and its history from the store while it is kept.
        Err(Error::NotFound(_)) => match closed_chat(&hub, chat, &token).await {
            Ok(frames) => Some(frames),
            Err(e) => return e.into_response(),
        },
        Err(e) => return e.into_response(),
    };
    super::upgrade(hub, req, Kind::Visitor(chat), Visitor { chat, closed })
}

/// 401 without a token, 400 without a chat id.
fn params(query: Option<&str>) -> Result<(u64, String)> {
    crate::limits::check_query(query, &["chat", "token"])?;
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
    Ok((chat, token))
}

/// The `chat` and `history` frames of a closed chat the store keeps; 403 for a wrong token
/// or an unknown chat (which ids exist is not told).
async fn closed_chat(hub: &Hub, chat: u64, token: &str) -> Result<[Frame; 2]> {
    let refused = || Error::Forbidden("wrong visitor token for this chat".into());
    let stored = hub
        .store()
        .stored_chat(ChatId(chat))
        .await?
        .ok_or_else(refused)?;
    if stored.status != ChatStatus::Closed
        || !crate::core::constant_time_eq(stored.visitor_token.as_bytes(), token.as_bytes())
    {
        return Err(refused());
    }
    let kept = hub.cfg.chats.history.max(1);
    let messages = hub.store().stored_messages(ChatId(chat), 0, kept).await?;
    let shown: Vec<&ChatMessage> = messages.iter().filter(|m| !m.whisper).collect();
    let owner = stored.owner.and_then(|o| hub.read(|c| c.operator_name(o)));
    let first = Event::VisitorChat {
        chat: VisitorChatView {
            id: chat,
            status: ChatStatus::Closed,
            owner_name: owner.as_deref(),
        },
    }
    .frame();
    let history = Event::History {
        chat,
        messages: &shown,
    }
    .frame();
    Ok([first, history])
}

struct Visitor {
    chat: u64,
    /// A closed chat: its last frames, sent once; nothing more happens in it.
    closed: Option<[Frame; 2]>,
}

impl Handler for Visitor {
    fn start(&mut self, hub: &Hub, peer: &Arc<Peer>) -> Result<()> {
        if let Some(frames) = &self.closed {
            for f in frames {
                let _ = peer.send(f);
            }
            return Ok(());
        }
        hub.apply_now(ConnectVisitor {
            chat: self.chat.into(),
            socket: Socket(peer.clone()),
        })
        .0
    }

    async fn on_text(&mut self, hub: &Hub, peer: &Arc<Peer>, text: &str) -> Flow {
        let (r, req) = parse_request::<VisitorRequest>(text);
        let result = match req {
            Ok(VisitorRequest::SendMessage { .. }) if self.closed.is_some() => {
                Err(Error::Conflict(format!("chat {} is closed", self.chat)))
            }
            Ok(VisitorRequest::SendMessage { text }) => {
                if let Err(e) = crate::limits::record::text(&hub.cfg.limits, &text) {
                    let _ = peer.send(&error_frame(r.as_deref(), &e));
                    return Flow::Continue;
                }
                let chat = self.chat;
                let origin = Some(hub.origin(peer.id));
                hub.chat(
                    ChatOp::VisitorMessage {
                        chat: chat.into(),
                        text,
                        origin,
                    },
                    None,
                )
                .await
                .map(|a| serde_json::to_value(a.wire()).expect("answers serialize"))
            }
            Err(e) => Err(e),
        };
        let frame = match &result {
            Ok(v) => ack_frame(r.as_deref(), Some(v)),
            Err(e) => error_frame(r.as_deref(), e),
        };
        let _ = peer.send(&frame);
        Flow::Continue
    }

    fn stop(&mut self, hub: &Hub, peer: &Arc<Peer>) {
        if self.closed.is_some() {
            return;
        }
        let _ = hub.apply_now(DisconnectVisitor {
            chat: self.chat.into(),
            conn: peer.id,
        });
    }
}

//! `/ws/operator`: an operator's dashboard. JWT checked before the upgrade; `hello` first;
//! requests `set_status`, `activity`, `logout`, `open_chat`, `leave_chat`, `send_message`,
//! `close_chat`, each answered by `ack` or `error` carrying the request's `ref`.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::header;
use serde_json::{Value, json};

use super::{Flow, Handler};
use crate::command::{
    ConnectOperator, DisconnectOperator, LeaveChat, SetActive, SetSettings, Socket,
};
use crate::core::{Actor, ChatOp, SettingsChange};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::peer::{Kind, Peer};
use crate::protocol::{OperatorRequest, ack_frame, error_frame, parse_request};

pub async fn upgrade(State(hub): State<Hub>, req: Request) -> Response {
    let op = match authenticate(&hub, &req) {
        Ok(op) => op,
        Err(e) => return e.into_response(),
    };
    super::upgrade(
        hub,
        req,
        Kind::Operator(op),
        Operator {
            id: op,
            logged_out: false,
        },
    )
}

/// The token from `?token=` or `Authorization: Bearer`; 400 for another query parameter,
/// 401 when the token is missing, bad or expired, 403 when the operator is unknown to the hub.
fn authenticate(hub: &Hub, req: &Request) -> Result<u64> {
    let from_query = match req.uri().query() {
        Some(q) => query_token(q)?,
        None => None,
    };
    let token = match from_query {
        Some(t) => t,
        None => req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::bearer)
            .map(Cow::Borrowed)
            .ok_or_else(|| Error::Unauthorized("missing token".into()))?,
    };
    let op = hub.tokens.verify(&token)?;
    if !hub.read(|c| c.has_operator(op)) {
        return Err(Error::Forbidden(format!(
            "operator {op} is unknown to the hub"
        )));
    }
    Ok(op)
}

/// The first `token` of a query, read in one pass; another parameter is refused as
/// `limits::check_query` refuses it. Borrowed from the query when nothing in it is escaped
/// (a JWT never is): then the pairs are split without decoding, which is what decoding
/// would give, and the token is not copied.
fn query_token(q: &str) -> Result<Option<Cow<'_, str>>> {
    let known = |k: &str| -> Result<()> {
        if k == "token" {
            Ok(())
        } else {
            // The same error `check_query` gives for its first unknown parameter.
            crate::limits::check_query(Some(q), &["token"])
        }
    };
    let mut token = None;
    if q.bytes().any(|b| b == b'%' || b == b'+') {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            known(&k)?;
            token.get_or_insert(v);
        }
    } else {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            known(k)?;
            token.get_or_insert(Cow::Borrowed(v));
        }
    }
    Ok(token)
}

struct Operator {
    id: u64,
    logged_out: bool,
}

impl Handler for Operator {
    fn start(&mut self, hub: &Hub, peer: &Arc<Peer>) -> Result<()> {
        hub.apply_now(ConnectOperator {
            operator: self.id.into(),
            socket: Socket(peer.clone()),
        })
        .0
    }

    async fn on_text(&mut self, hub: &Hub, peer: &Arc<Peer>, text: &str) -> Flow {
        let (r, req) = parse_request::<OperatorRequest>(text);
        let result = match req {
            Ok(req) => self.handle(hub, peer, req).await,
            Err(e) => Err(e),
        };
        let frame = match &result {
            Ok(v) => ack_frame(r.as_deref(), v.as_ref()),
            Err(e) => error_frame(r.as_deref(), e),
        };
        let _ = peer.send(&frame);
        if self.logged_out {
            Flow::Close(1000, "logout")
        } else {
            Flow::Continue
        }
    }

    fn stop(&mut self, hub: &Hub, peer: &Arc<Peer>) {
        let logout = self.logged_out;
        let _ = hub.apply_now(DisconnectOperator {
            operator: self.id.into(),
            conn: peer.id,
            logout,
        });
    }
}

impl Operator {
    async fn handle(
        &mut self,
        hub: &Hub,
        peer: &Arc<Peer>,
        req: OperatorRequest,
    ) -> Result<Option<Value>> {
        let me = self.id;
        match req {
            OperatorRequest::SetStatus {
                online,
                invisible,
                always_online,
                operator,
            } => {
                let change = SettingsChange {
                    online,
                    invisible,
                    always_online,
                };
                let target = operator.unwrap_or(me);
                let view = hub
                    .apply(SetSettings {
                        actor: Actor::Operator(me),
                        operator: target.into(),
                        change,
                    })
                    .await?;
                Ok(Some(json!({ "operator": view })))
            }
            OperatorRequest::Activity { active } => {
                let stamp = if active { hub.now_ms() } else { u64::MAX };
                peer.last_activity.store(stamp, Ordering::Relaxed);
                let (_, shown) = hub.apply_now(SetActive {
                    operator: me.into(),
                    conn: peer.id,
                    active,
                });
                // Acked once what it changed is durable and on its way to the sockets (its
                // own `operator_status` before the ack). A failed write is not the client's
                // doing: the hub rebuilds and tells everyone the state again.
                // Bounded: the read loop (pongs) must go on during a long store outage.
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    crate::store::durable(shown),
                )
                .await;
                Ok(None)
            }
            OperatorRequest::Logout {} => {
                self.logged_out = true;
                Ok(None)
            }
            OperatorRequest::OpenChat { chat } => hub
                .chat(
                    ChatOp::Open {
                        me: me.into(),
                        chat: chat.into(),
                    },
                    Some((me, peer)),
                )
                .await
                .map(|a| Some(wire(&a))),
            OperatorRequest::LeaveChat { chat } => hub
                .apply(LeaveChat {
                    operator: me.into(),
                    conn: peer.id,
                    chat: chat.into(),
                })
                .await
                .map(|()| None),
            OperatorRequest::SendMessage {
                chat,
                text,
                whisper,
            } => {
                crate::limits::record::text(&hub.cfg.limits, &text)?;
                let origin = Some(hub.origin(peer.id));
                let op = ChatOp::Message {
                    me: me.into(),
                    chat: chat.into(),
                    text,
                    whisper,
                    origin,
                };
                hub.chat(op, Some((me, peer))).await.map(|a| Some(wire(&a)))
            }
            OperatorRequest::CloseChat { chat } => {
                let closed = hub
                    .chat(
                        ChatOp::Close {
                            by: Some(me.into()),
                            chat: chat.into(),
                        },
                        None,
                    )
                    .await?;
                Ok(Some(json!({ "chat": closed.wire() })))
            }
        }
    }
}

/// The result of an ack: what a chat change answered, as clients see it.
fn wire(answer: &crate::answer::ChatAnswer) -> Value {
    serde_json::to_value(answer.wire()).expect("answers serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the hub read before: `check_query`, then the first `token` through
    /// `form_urlencoded`.
    fn reference(q: &str) -> Result<Option<String>> {
        crate::limits::check_query(Some(q), &["token"])?;
        Ok(form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned()))
    }

    #[test]
    fn auth_query_token_reads_like_form_urlencoded() {
        for q in [
            "token=a.b.c",
            "token=a.b.c&token=d",
            "&&token=x&",
            "token",
            "token=",
            "token=a=b",
            "token=a%2Eb",
            "token=a+b",
            "tok%65n=x",
            "",
            "x=1",
            "token=a&x=1",
            "x=1&token=a",
            "token=a&x",
            "x+y=1",
        ] {
            let ours = query_token(q).map(|t| t.map(Cow::into_owned));
            match (ours, reference(q)) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{q:?}"),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{q:?}"),
                (a, b) => panic!("{q:?}: {a:?} against {b:?}"),
            }
        }
        assert!(matches!(
            query_token("token=a.b.c").unwrap(),
            Some(Cow::Borrowed("a.b.c"))
        ));
    }
}

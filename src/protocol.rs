//! Every WebSocket message of SPEC.md section 6: requests clients send and events the hub
//! pushes. Events are serialized once into [`Frame`] bytes shared by all recipients.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::error::Error;
use crate::model::{ChatMessage, ChatView, DeptState, VisitorChatView};

/// A serialized text frame; cloning shares the bytes.
pub type Frame = Utf8Bytes;

/// Operator → hub.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum OperatorRequest {
    SetStatus {
        online: Option<bool>,
        invisible: Option<bool>,
        always_online: Option<bool>,
        /// Another operator's settings (needs `set_operator_status`).
        operator: Option<u64>,
    },
    Activity {
        active: bool,
    },
    Logout {},
    OpenChat {
        chat: u64,
    },
    LeaveChat {
        chat: u64,
    },
    SendMessage {
        chat: u64,
        text: String,
        #[serde(default)]
        whisper: bool,
    },
    CloseChat {
        chat: u64,
    },
}

/// Visitor → hub.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum VisitorRequest {
    SendMessage { text: String },
}

/// A request's `ref`, kept as the raw JSON the client wrote: it is echoed byte for byte
/// (`123456789012345678901234567890` and `-0` must not come back as floats).
pub type Ref = Box<RawValue>;

/// The `ref` of a request frame, if the frame is a JSON object that has one (other fields
/// are skipped unparsed, so a number beyond f64 elsewhere does not lose it).
pub fn request_ref(text: &str) -> Option<Ref> {
    serde_json::from_str::<RefOnly>(text).ok().and_then(|x| x.r)
}

/// Parses a request frame, separating its `ref` so that an error can still carry it.
pub fn parse_request<T: serde::de::DeserializeOwned>(
    text: &str,
) -> (Option<Ref>, Result<T, Error>) {
    let r = request_ref(text);
    let mut value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return (r, Err(Error::bad(format!("malformed JSON: {e}")))),
    };
    let Some(obj) = value.as_object_mut() else {
        return (None, Err(Error::bad("a message must be a JSON object")));
    };
    obj.remove("ref");
    if !obj.contains_key("type") {
        return (r, Err(Error::bad("missing field `type`")));
    }
    let parsed = serde_json::from_value(value).map_err(|e| Error::bad(e.to_string()));
    (r, parsed)
}

/// Only the `ref` of a request, other fields skipped unparsed.
#[derive(Deserialize)]
struct RefOnly {
    #[serde(rename = "ref")]
    r: Option<Ref>,
}

/// Hub → client.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event<'a> {
    /// Views come pre-serialized: each operator's view is serialized once per change and
    /// reused by every `hello` (a connect storm would otherwise serialize them again and again).
    Hello {
        operator: &'a RawValue,
        operators: &'a [&'a RawValue],
        departments: &'a [DeptState],
        chats: &'a [ChatView<'a>],
    },
    OperatorStatus {
        operator: &'a RawValue,
    },
    DepartmentStatus(&'a DeptState),
    WidgetStatus(&'a DeptState),
    /// The chat view comes pre-serialized: one decision sends it as `chat` and
    /// `chat_assigned`.
    Chat {
        chat: &'a RawValue,
    },
    #[serde(rename = "chat")]
    VisitorChat {
        chat: VisitorChatView<'a>,
    },
    ChatAssigned {
        chat: &'a RawValue,
        reason: AssignReason,
    },
    Message {
        chat: u64,
        message: &'a ChatMessage,
    },
    /// A visitor's chat so far (whispers left out), right after its `chat` frame.
    History {
        chat: u64,
        messages: &'a [&'a ChatMessage],
    },
    Warning {
        code: &'a str,
        message: &'a str,
    },
    /// An online session that ended (the event feed only).
    Session {
        session: &'a crate::audit::SessionView,
    },
    Ack {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r: Option<&'a RawValue>,
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        result: Option<&'a Value>,
    },
    Error {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r: Option<&'a RawValue>,
        code: &'a str,
        message: String,
    },
}

pub use crate::model::AssignReason;

impl Event<'_> {
    pub fn frame(&self) -> Frame {
        // Serializing these types cannot fail: no maps with non-string keys, no floats.
        serde_json::to_string(self)
            .expect("events serialize")
            .into()
    }

    /// [`Event::frame`] written into a buffer of `capacity` bytes: a large frame whose size
    /// is known roughly (a `hello`) is not grown by doubling, copied at each step.
    pub fn frame_with_capacity(&self, capacity: usize) -> Frame {
        let mut out = Vec::with_capacity(capacity);
        serde_json::to_writer(&mut out, self).expect("events serialize");
        String::from_utf8(out)
            .expect("serde_json writes UTF-8")
            .into()
    }
}

/// The answer to a failed request.
pub fn error_frame(r: Option<&RawValue>, e: &Error) -> Frame {
    Event::Error {
        r,
        code: e.code(),
        message: e.to_string(),
    }
    .frame()
}

/// The answer to a request that worked; `result` fields are merged into the ack.
pub fn ack_frame(r: Option<&RawValue>, result: Option<&Value>) -> Frame {
    Event::Ack { r, result }.frame()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(r: &Option<Ref>) -> Option<&str> {
        r.as_deref().map(RawValue::get)
    }

    /// Found by the `ws_frames` fuzz target: a `ref` beyond f64 is echoed as written; the
    /// answer stays valid JSON text (the request itself is refused: its JSON cannot be read).
    #[test]
    fn ref_beyond_f64_is_echoed_verbatim_in_the_error() {
        let (r, req) = parse_request::<OperatorRequest>(r#"{"type":"logout","ref":1e400}"#);
        assert_eq!(raw(&r), Some("1e400"));
        assert!(req.is_err());
        let e = error_frame(r.as_deref(), &req.unwrap_err());
        assert!(e.contains(r#""ref":1e400,"#), "{e}");
        let back: Box<RawValue> = serde_json::from_str(&e).expect("valid JSON text");
        assert!(back.get().starts_with('{'));
    }

    #[test]
    fn ref_is_echoed_verbatim() {
        for written in [
            "123456789012345678901234567890",
            "-0",
            "1.50",
            "\"\\u00e9\"",
            "[1, 2]",
        ] {
            let text = format!(r#"{{"type":"activity","active":true,"ref": {written} }}"#);
            let (r, req) = parse_request::<OperatorRequest>(&text);
            assert!(req.is_ok());
            assert_eq!(raw(&r), Some(written));
            let ack = ack_frame(r.as_deref(), None);
            assert_eq!(&*ack, format!(r#"{{"type":"ack","ref":{written}}}"#));
            let err = error_frame(r.as_deref(), &Error::bad("x"));
            assert!(err.contains(&format!(r#""ref":{written},"#)), "{err}");
        }
    }

    #[test]
    fn parse_keeps_ref_on_error() {
        let (r, req) = parse_request::<OperatorRequest>(r#"{"type":"nope","ref":7}"#);
        assert_eq!(raw(&r), Some("7"));
        assert!(req.unwrap_err().to_string().contains("unknown variant"));
    }

    #[test]
    fn parse_rejects_wrong_types_and_huge_numbers() {
        let (_, req) = parse_request::<OperatorRequest>(r#"{"type":"activity","active":"yes"}"#);
        assert!(req.is_err());
        let (_, req) = parse_request::<OperatorRequest>(r#"{"type":"open_chat","chat":1e400}"#);
        assert!(req.is_err());
        let (_, req) = parse_request::<OperatorRequest>(
            r#"{"type":"open_chat","chat":184467440737095516160}"#,
        );
        assert!(req.is_err());
        let (_, req) = parse_request::<OperatorRequest>(r#"[1,2]"#);
        assert!(req.is_err());
        let (_, req) =
            parse_request::<OperatorRequest>(r#"{"type":"activity","active":true,"x":1}"#);
        assert!(req.is_err(), "unknown fields are refused");
    }

    #[test]
    fn parse_keeps_ref_beside_a_number_beyond_f64() {
        let (r, req) =
            parse_request::<OperatorRequest>(r#"{"type":"open_chat","chat":1e400,"ref":8}"#);
        assert_eq!(raw(&r), Some("8"));
        assert!(req.is_err());
        let (r, _) = parse_request::<OperatorRequest>(r#"{"type":"open_chat","ref":8,"#);
        assert!(r.is_none(), "truly malformed JSON has no ref");
    }

    #[test]
    fn parse_set_status() {
        let (r, req) =
            parse_request::<OperatorRequest>(r#"{"type":"set_status","online":false,"ref":"a"}"#);
        assert_eq!(raw(&r), Some(r#""a""#));
        assert!(matches!(
            req.unwrap(),
            OperatorRequest::SetStatus {
                online: Some(false),
                ..
            }
        ));
    }

    #[test]
    fn ack_merges_result_and_ref() {
        let v = serde_json::json!({"chat": {"id": 1}});
        let r = RawValue::from_string("3".into()).unwrap();
        let f = ack_frame(Some(&r), Some(&v));
        let back: Value = serde_json::from_str(&f).unwrap();
        assert_eq!(
            back,
            serde_json::json!({"type":"ack","ref":3,"chat":{"id":1}})
        );
    }
}

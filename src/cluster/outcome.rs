//! The pure parts of a forwarded chat change: the call as it travels in `{prefix}calls`,
//! its id, its answer as recorded under `{prefix}call:{id}`, and what the caller makes of
//! the record it finds when it stops waiting. No I/O: times are passed in.

use crate::answer::ChatAnswer;
use crate::core::ChatOp;
use crate::error::Error;
use serde::{Deserialize, Serialize};

/// What `{prefix}call:{id}` holds once the caller gave up before any outcome was recorded:
/// the assigner's commit of the call is refused from then on.
pub(super) const CANCELLED: &str = "cancelled";

/// How long before its deadline a call is still started: a later start would most likely
/// commit past the deadline and be refused (which costs the assigner a rebuild).
pub(super) const START_MARGIN_MS: u64 = 250;

/// A chat change forwarded to the assigning node: one entry of `{prefix}calls`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Call {
    /// Unique across nodes and restarts ([`call_id`]).
    pub id: String,
    /// The caller's node id (where the wake-up goes).
    pub from: String,
    /// Unix milliseconds after which the caller no longer waits: the change is not made.
    pub deadline: u64,
    pub op: ChatOp,
}

/// The id of call number `n` of the process run `run` (random per process) of `node`: a
/// node restarted under the same id never reuses one.
pub(super) fn call_id(node: &str, run: u32, n: u64) -> String {
    format!("{node}.{run:08x}.{n}")
}

/// A call's answer, recorded under its id with the change's writes and published to the
/// caller as a wake-up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Reply {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<ChatAnswer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Reply {
    /// The answer of the change's result.
    pub fn of(id: &str, result: &Result<ChatAnswer, Error>) -> Reply {
        match result {
            Ok(v) => Reply {
                id: id.to_string(),
                ok: Some(v.clone()),
                code: None,
                message: None,
            },
            Err(e) => Reply {
                id: id.to_string(),
                ok: None,
                code: Some(error_code(e).into()),
                message: Some(e.to_string()),
            },
        }
    }

    /// What the caller answers its own client.
    pub fn into_result(self) -> Result<ChatAnswer, Error> {
        if let Some(v) = self.ok {
            return Ok(v);
        }
        let m = self.message.unwrap_or_default();
        Err(match self.code.as_deref() {
            Some("bad_request") => Error::BadRequest(m),
            Some("forbidden") => Error::Forbidden(m),
            Some("not_found") => Error::NotFound(m),
            Some("conflict") => Error::Conflict(m),
            Some("internal") => Error::Internal(m),
            _ => Error::Unavailable(m),
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("replies serialize")
    }
}

/// The recorded code of an error: `unavailable` kept apart from `internal` (both are
/// `internal` on the wire) so the caller answers 503, not 500.
fn error_code(e: &Error) -> &'static str {
    match e {
        Error::Unavailable(_) => "unavailable",
        e => e.code(),
    }
}

/// What the caller learns when it settles a call at its deadline.
#[derive(Debug, Clone)]
pub(super) enum Settled {
    /// The assigner recorded an outcome: that is the answer, success included.
    Done(Box<Reply>),
    /// No outcome was recorded: the call is cancelled now and will never be applied.
    Cancelled,
}

/// The settle script's answer: the record found (`None`: none, so it marked the call
/// cancelled). A record that does not parse is treated as cancelled: nothing else writes
/// the key, so that cannot be a success.
pub(super) fn settled(record: Option<&str>) -> Settled {
    match record {
        None | Some(CANCELLED) => Settled::Cancelled,
        Some(raw) => {
            serde_json::from_str(raw).map_or(Settled::Cancelled, |r| Settled::Done(Box::new(r)))
        }
    }
}

/// What the assigner does with a call it read, at Unix ms `now`, given the record of its id.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Next {
    /// Run it (nothing recorded, time left).
    Run,
    /// It ran already (a redelivery): answer from the record, acknowledge.
    Answer(String),
    /// Given up (by its caller, or too late to start): acknowledge without running.
    Drop,
}

pub(super) fn next(call: &Call, record: Option<&str>, now_ms: u64) -> Next {
    match record {
        Some(CANCELLED) => Next::Drop,
        Some(r) => Next::Answer(r.to_string()),
        None if now_ms + START_MARGIN_MS >= call.deadline => Next::Drop,
        None => Next::Run,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chat answer as the core makes one (a message written).
    fn sent(text: &str) -> ChatAnswer {
        serde_json::from_value(serde_json::json!({
            "answer": "sent",
            "message": {"id": 1, "from": {"kind": "visitor"}, "text": text, "whisper": false, "at": "t"},
        }))
        .unwrap()
    }

    fn same(a: &Reply, b: &Reply) -> bool {
        a.to_json() == b.to_json()
    }

    fn call(deadline: u64) -> Call {
        Call {
            id: call_id("b", 0xab, 7),
            from: "b".into(),
            deadline,
            op: ChatOp::HandOver { chat: 9.into() },
        }
    }

    #[test]
    fn calls_encoding_round_trips() {
        let c = call(1_000);
        let raw = serde_json::to_string(&c).unwrap();
        let back: Call = serde_json::from_str(&raw).unwrap();
        assert_eq!((back.id.as_str(), back.deadline), (c.id.as_str(), 1_000));
        assert_eq!(serde_json::to_string(&back).unwrap(), raw);
        let ok = Reply::of("x", &Ok(sent("hi")));
        assert!(same(
            &serde_json::from_str::<Reply>(&ok.to_json()).unwrap(),
            &ok
        ));
        assert!(!ok.to_json().contains("code"), "{}", ok.to_json());
    }

    #[test]
    fn calls_id_is_unique_per_node_run_and_number() {
        let a = call_id("node-a", 1, 1);
        assert_eq!(a, "node-a.00000001.1");
        assert_ne!(a, call_id("node-a", 1, 2));
        assert_ne!(a, call_id("node-a", 2, 1), "a restart draws another run");
        assert_ne!(a, call_id("node-b", 1, 1));
    }

    #[test]
    fn calls_reply_keeps_the_error_kind() {
        let cases = [
            Error::NotFound("no chat 9".into()),
            Error::Conflict("closed".into()),
            Error::BadRequest("empty".into()),
            Error::Forbidden("not yours".into()),
            Error::Unavailable("store".into()),
        ];
        for e in cases {
            let status = e.status();
            let back = Reply::of("x", &Err(e)).into_result().unwrap_err();
            assert_eq!(back.status(), status, "{back}");
        }
        let back = Reply::of("x", &Ok(sent("five"))).into_result().unwrap();
        assert_eq!(
            serde_json::to_value(back).unwrap(),
            serde_json::to_value(sent("five")).unwrap()
        );
    }

    #[test]
    fn calls_settle_outcome_success_is_never_a_503() {
        let done = Reply::of("x", &Ok(sent("one")));
        assert!(matches!(settled(Some(&done.to_json())), Settled::Done(r) if same(&r, &done)));
        assert!(matches!(settled(None), Settled::Cancelled));
        assert!(matches!(settled(Some(CANCELLED)), Settled::Cancelled));
        assert!(matches!(settled(Some("garbage")), Settled::Cancelled));
    }

    #[test]
    fn calls_redelivery_is_answered_from_the_record_not_run() {
        let c = call(10_000);
        assert_eq!(next(&c, None, 1_000), Next::Run);
        assert_eq!(
            next(&c, Some("{\"id\":\"x\"}"), 1_000),
            Next::Answer("{\"id\":\"x\"}".into())
        );
        assert_eq!(next(&c, Some(CANCELLED), 1_000), Next::Drop);
    }

    #[test]
    fn calls_past_their_deadline_are_dropped_unrun() {
        let c = call(10_000);
        assert_eq!(next(&c, None, 10_000), Next::Drop);
        assert_eq!(next(&c, None, 10_000 - START_MARGIN_MS), Next::Drop);
        assert_eq!(next(&c, None, 10_000 - START_MARGIN_MS - 1), Next::Run);
    }
}

//! The pure parts of a forwarded chat change: the call as it travels in `{prefix}calls`,
//! its id, its claim and answer as recorded under `{prefix}call:{id}`, what the assigner
//! makes of the record after claiming, and what the caller makes of the record it finds
//! when it stops waiting. No I/O: times are passed in.

use crate::answer::ChatAnswer;
use crate::core::ChatOp;
use crate::error::Error;
use serde::{Deserialize, Serialize};

/// What `{prefix}call:{id}` holds once the caller gave up before any outcome was recorded
/// (nothing there, or the claim of a token that lost the lease): the assigner's commit of
/// the call is refused from then on.
pub(super) const CANCELLED: &str = "cancelled";

/// How long before its deadline a call is still started (claimed): a later start would
/// most likely commit past the deadline and keep its caller waiting past it.
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

/// What a call's record holds while the assigner holding lease `token` runs it: the
/// assigner claimed it ([`Claimed`]), so only that assigner's fenced commit may record the
/// outcome, and the caller waits for it as long as that token holds the lease.
pub(super) const RUNNING: &str = "running:";

/// The record of a call claimed under lease `token`.
pub(super) fn running(token: &str) -> String {
    format!("{RUNNING}{token}")
}

/// How long a call's record is kept, from Unix ms `now`: past the caller's deadline, plus
/// how long a caller may go on settling a call claimed by a live assigner (two leases: the
/// lease held at the deadline, and the last renewal's), plus a margin. A record that
/// expired while its caller still waited would read as "not made".
pub(super) fn record_ttl_ms(deadline: u64, now_ms: u64, lease_ms: u64) -> u64 {
    deadline.saturating_sub(now_ms) + 2 * lease_ms + 10_000
}

/// What the caller learns when it settles a call at its deadline.
#[derive(Debug, Clone)]
pub(super) enum Settled {
    /// The assigner recorded an outcome: that is the answer, success included.
    Done(Box<Reply>),
    /// No outcome was recorded: the call is cancelled now and will never be applied.
    Cancelled,
    /// Claimed by the assigner that still holds the lease: its commit may still land, so
    /// the caller settles again a moment later.
    Running,
    /// The record does not parse: the outcome is unknown (never "not made").
    Unknown,
}

/// The settle script's answer: the record found (`None`: none, or the claim of an assigner
/// that lost the lease, so it marked the call cancelled; `running:…`: claimed by the
/// assigner that still leads).
pub(super) fn settled(record: Option<&str>) -> Settled {
    match record {
        None | Some(CANCELLED) => Settled::Cancelled,
        Some(r) if r.starts_with(RUNNING) => Settled::Running,
        Some(raw) => {
            serde_json::from_str(raw).map_or(Settled::Unknown, |r| Settled::Done(Box::new(r)))
        }
    }
}

/// Whether a call read at Unix ms `now` may still be started: a later start would most
/// likely commit past the deadline, for a caller about to settle it.
pub(super) fn may_start(call: &Call, now_ms: u64) -> bool {
    now_ms + START_MARGIN_MS < call.deadline
}

/// What the assigner does with a call, given the claim script's answer.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Next {
    /// Ours to run (claimed under our token just now, or by us before a commit that failed).
    Run,
    /// It ran already (a redelivery): answer from the record, acknowledge.
    Answer(String),
    /// Given up (by its caller, or too late to start), or a record that does not parse (the
    /// outcome is unknown: never run twice): acknowledge without running.
    Drop,
    /// Not ours: this node does not hold the lease, or a live assigner claimed it. Left
    /// pending, unacknowledged.
    Leave,
}

/// The claim script's answer when this node does not hold the lease.
pub(super) const NOT_LEADER: &str = "notleader";

/// Decides from the claim script's answer (`record`: the call's record after the claim;
/// `None`: none, and none taken since too late) for the assigner holding `token`.
pub(super) fn next(record: Option<&str>, token: &str) -> Next {
    match record {
        None | Some(CANCELLED) => Next::Drop,
        Some(NOT_LEADER) => Next::Leave,
        Some(r) if r == running(token) => Next::Run,
        Some(r) if r.starts_with(RUNNING) => Next::Leave,
        Some(r) if serde_json::from_str::<Reply>(r).is_ok() => Next::Answer(r.to_string()),
        Some(_) => Next::Drop,
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
    }

    #[test]
    fn calls_settle_waits_while_the_claiming_assigner_leads() {
        // The script answers the claim only while its token still holds the lease.
        assert!(matches!(
            settled(Some(&running("a:3:ff"))),
            Settled::Running
        ));
    }

    #[test]
    fn calls_settle_unparsable_record_is_unknown_never_not_made() {
        assert!(matches!(settled(Some("garbage")), Settled::Unknown));
        let back = Reply::of("x", &Err(Error::Internal("?".into())));
        assert_eq!(back.into_result().unwrap_err().status(), 500);
    }

    #[test]
    fn calls_redelivery_is_answered_from_the_record_not_run() {
        let rec = Reply::of("x", &Ok(sent("one"))).to_json();
        assert_eq!(next(Some(&rec), "a:1:00"), Next::Answer(rec.clone()));
        assert_eq!(next(Some(CANCELLED), "a:1:00"), Next::Drop);
        assert_eq!(next(Some("garbage"), "a:1:00"), Next::Drop);
    }

    #[test]
    fn calls_claim_runs_only_under_our_token() {
        let mine = "a:2:01";
        assert_eq!(next(Some(&running(mine)), mine), Next::Run);
        assert_eq!(next(Some(&running("b:1:07")), mine), Next::Leave);
        assert_eq!(next(Some(NOT_LEADER), mine), Next::Leave);
        assert_eq!(next(None, mine), Next::Drop);
    }

    #[test]
    fn calls_past_their_deadline_are_dropped_unrun() {
        let c = call(10_000);
        assert!(!may_start(&c, 10_000));
        assert!(!may_start(&c, 10_000 - START_MARGIN_MS));
        assert!(may_start(&c, 10_000 - START_MARGIN_MS - 1));
    }

    #[test]
    fn calls_record_outlives_the_settle() {
        // 3 s left, 10 s lease: kept past the deadline and two leases.
        assert_eq!(
            record_ttl_ms(13_000, 10_000, 10_000),
            3_000 + 20_000 + 10_000
        );
        assert_eq!(
            record_ttl_ms(1_000, 5_000, 600),
            1_200 + 10_000,
            "late: never negative"
        );
    }
}

//! Online sessions and the status log, as plain data: the records both stores keep, the
//! rule that makes a session one session however many nodes report it, and the report's
//! arithmetic (online time clipped to a window). No clock reads: times are passed in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::presence::{Reason, Settings};

/// Who changed an operator's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LogActor {
    Operator {
        id: u64,
    },
    /// The back end's API key.
    Api,
}

/// One settings change: `{"at","operator","actor","changes":{"online":[true,false]}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub at: String,
    pub operator: u64,
    pub actor: LogActor,
    /// Setting → [before, after], only the settings that changed.
    pub changes: BTreeMap<String, [bool; 2]>,
}

/// A log entry as stored: `seq` orders an operator's entries and dates them (the record
/// version the change made: microseconds since the epoch, unique per operator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredLog {
    pub seq: u64,
    #[serde(flatten)]
    pub entry: LogEntry,
}

/// The settings that differ between `before` and `after`.
pub fn changes(before: Settings, after: Settings) -> BTreeMap<String, [bool; 2]> {
    let mut out = BTreeMap::new();
    let pairs = [
        ("online", before.online, after.online),
        ("invisible", before.invisible, after.invisible),
        ("always_online", before.always_online, after.always_online),
    ];
    for (name, b, a) in pairs {
        if b != a {
            out.insert(name.to_string(), [b, a]);
        }
    }
    out
}

/// A session as stored. Times are milliseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub operator: u64,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    pub end_reason: Option<Reason>,
}

/// The wire form (`GET …/sessions`, the `session` event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionView {
    pub operator: u64,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub seconds: u64,
    pub end_reason: Option<Reason>,
}

impl SessionRecord {
    /// Milliseconds online; a running session counts until `now_ms`.
    pub fn duration_ms(&self, now_ms: u64) -> u64 {
        self.ended_ms
            .unwrap_or(now_ms)
            .saturating_sub(self.started_ms)
    }

    /// Milliseconds online inside `[from, to)`; a running session counts until `now_ms`.
    pub fn clipped_ms(&self, from_ms: u64, to_ms: u64, now_ms: u64) -> u64 {
        let end = self.ended_ms.unwrap_or(now_ms).min(to_ms);
        end.saturating_sub(self.started_ms.max(from_ms))
    }

    /// Does the session overlap `[from, to)`?
    pub fn overlaps(&self, from_ms: u64, to_ms: u64) -> bool {
        self.started_ms < to_ms && self.ended_ms.is_none_or(|e| e > from_ms)
    }

    pub fn view(&self, now_ms: u64) -> SessionView {
        SessionView {
            operator: self.operator,
            started_at: rfc3339_ms(self.started_ms),
            ended_at: self.ended_ms.map(rfc3339_ms),
            seconds: self.duration_ms(now_ms) / 1000,
            end_reason: self.end_reason,
        }
    }
}

/// Where an operator's session stands in a store: the open one, and when the last ended.
/// Every node of a cluster sees each status transition and reports it; this state makes the
/// reports idempotent, so the first node's start and end count and the others' do nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    pub open: Option<u64>,
    pub last_end: u64,
}

impl SessionState {
    /// A node saw the operator turn online at `at`. Ignored while a session is open, and
    /// when a session already ended after `at` (a late report of a transition already done).
    pub fn start(&mut self, at: u64) -> bool {
        if self.open.is_some() || at < self.last_end {
            return false;
        }
        self.open = Some(at);
        true
    }

    /// A node saw the operator turn offline at `at`: ends the open session, unless it began
    /// after `at` (a late report of an older transition). Returns the session that ended.
    pub fn end(&mut self, operator: u64, at: u64, reason: Reason) -> Option<SessionRecord> {
        let started = self.open.filter(|s| *s <= at)?;
        self.open = None;
        self.last_end = at;
        Some(SessionRecord {
            operator,
            started_ms: started,
            ended_ms: Some(at),
            end_reason: Some(reason),
        })
    }
}

/// One operator's line in `GET /api/v1/reports/online`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportLine {
    pub id: u64,
    pub name: String,
    pub online_seconds: u64,
    pub sessions: u32,
}

/// Online time of each operator inside `[from, to)`: `ops` are (id, name) in report order.
pub fn report(
    ops: &[(u64, String)],
    sessions: &[SessionRecord],
    from_ms: u64,
    to_ms: u64,
    now_ms: u64,
) -> Vec<ReportLine> {
    let mut per: BTreeMap<u64, (u64, u32)> = BTreeMap::new();
    for s in sessions.iter().filter(|s| s.overlaps(from_ms, to_ms)) {
        let e = per.entry(s.operator).or_default();
        e.0 += s.clipped_ms(from_ms, to_ms, now_ms);
        e.1 += 1;
    }
    ops.iter()
        .map(|(id, name)| {
            let (ms, n) = per.get(id).copied().unwrap_or_default();
            ReportLine {
                id: *id,
                name: name.clone(),
                online_seconds: ms / 1000,
                sessions: n,
            }
        })
        .collect()
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339_ms(ms: u64) -> String {
    crate::model::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// Milliseconds since the epoch of an RFC 3339 instant (any offset).
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let t: jiff::Timestamp = s.parse().ok()?;
    u64::try_from(t.as_millisecond()).ok()
}

/// The wall clock in milliseconds since the epoch (the edges read it; the rules take it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(op: u64, s: u64, e: u64) -> SessionRecord {
        SessionRecord {
            operator: op,
            started_ms: s,
            ended_ms: Some(e),
            end_reason: Some(Reason::SetOffline),
        }
    }

    #[test]
    fn session_is_one_session_across_nodes() {
        let mut st = SessionState::default();
        assert!(st.start(1000), "the first node's start counts");
        assert!(
            !st.start(1003),
            "a second node's start of the same session does nothing"
        );
        let ended = st.end(7, 5000, Reason::Inactive).expect("ends");
        assert_eq!(
            ended,
            SessionRecord {
                operator: 7,
                started_ms: 1000,
                ended_ms: Some(5000),
                end_reason: Some(Reason::Inactive)
            }
        );
        assert_eq!(
            st.end(7, 5002, Reason::Inactive),
            None,
            "the second end does nothing"
        );
        assert!(
            !st.start(1003),
            "a late start of the session that ended is ignored"
        );
        assert!(st.start(6000));
        assert_eq!(
            st.end(7, 5002, Reason::Inactive),
            None,
            "a late end never ends a newer session"
        );
        assert_eq!(st.open, Some(6000));
    }

    #[test]
    fn session_report_clipped_to_the_window() {
        let running = SessionRecord {
            operator: 1,
            started_ms: 9_000,
            ended_ms: None,
            end_reason: None,
        };
        let sessions = [
            closed(1, 0, 4_000),
            closed(1, 5_000, 6_000),
            running,
            closed(2, 2_000, 3_000),
        ];
        let ops = vec![
            (1, "Ann".to_string()),
            (2, "Bob".to_string()),
            (3, "Cy".to_string()),
        ];
        // Window [3s, 10s), now = 12s: 1s of the first, 1s of the second, 1s of the running one.
        let r = report(&ops, &sessions, 3_000, 10_000, 12_000);
        assert_eq!(
            r[0],
            ReportLine {
                id: 1,
                name: "Ann".into(),
                online_seconds: 3,
                sessions: 3
            }
        );
        assert_eq!(
            (r[1].online_seconds, r[1].sessions),
            (0, 0),
            "ended at the window's start"
        );
        assert_eq!((r[2].online_seconds, r[2].sessions), (0, 0));
        // A running session counts until now when the window reaches past now.
        let r = report(&ops, &sessions, 8_000, 20_000, 12_000);
        assert_eq!((r[0].online_seconds, r[0].sessions), (3, 1));
    }

    #[test]
    fn log_changes_are_before_and_after() {
        let before = Settings {
            online: true,
            invisible: false,
            always_online: false,
        };
        let after = Settings {
            online: false,
            invisible: false,
            always_online: true,
        };
        let c = changes(before, after);
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"online":[true,false],"always_online":[false,true]})
        );
        let actor = serde_json::to_value(LogActor::Operator { id: 9 }).unwrap();
        assert_eq!(actor, serde_json::json!({"kind":"operator","id":9}));
        assert_eq!(
            serde_json::to_value(LogActor::Api).unwrap(),
            serde_json::json!({"kind":"api"})
        );
    }
}

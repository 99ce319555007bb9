//! Online sessions and the status log in the core: the status transitions `settle` sees open
//! and end sessions, settings changes are logged with their actor. What to keep is decided
//! in `crate::audit` and by the stores (which make a session one session cluster-wide).

use super::*;
use crate::audit::{self, LogActor, LogEntry, SessionRecord, StoredLog};
use crate::feed::EventType;
use crate::presence::Reason;

impl Core {
    /// The operator's status turned online or offline: the one place sessions start and
    /// end. Returns the session that ended (it is also a `session` event in the feed); None
    /// when one started, or when this node did not see it start.
    pub(super) fn session_transition(&mut self, id: u64, online: bool) -> Option<SessionRecord> {
        let at = audit::now_ms();
        if online {
            self.session_started.insert(id, at);
            self.writes.push(Write::SessionStart {
                operator: OperatorId(id),
                at,
            });
            return None;
        }
        let reason = self
            .operators
            .get(&id)
            .and_then(|o| o.presence.status(&o.settings).1)
            .unwrap_or(Reason::SetOffline);
        self.end_session(id, at, reason)
    }

    /// Ends the operator's session at `at`: the store write, and the feed event when this
    /// node knows when it started.
    fn end_session(&mut self, id: u64, at: u64, reason: Reason) -> Option<SessionRecord> {
        self.writes.push(Write::SessionEnd {
            operator: OperatorId(id),
            at,
            reason,
        });
        let started = self.session_started.remove(&id)?;
        let ended = SessionRecord {
            operator: id,
            started_ms: started,
            ended_ms: Some(at),
            end_reason: Some(reason),
        };
        let view = ended.view(at);
        let frame = Event::Session { session: &view }.frame();
        self.log(EventType::Session, &frame, None);
        Some(ended)
    }

    /// At start: operators online now (always online) have a session: the one left open in
    /// the store goes on, else one starts. Alone (no cluster), a session left open by an
    /// operator who is offline now (the hub was killed) ends now; in a cluster other nodes
    /// may still hold that operator, and their transitions end it.
    pub(super) fn boot_sessions(&mut self, open: Vec<(OperatorId, u64)>) {
        let at = audit::now_ms();
        let open: HashMap<u64, u64> = open.into_iter().map(|(o, t)| (o.0, t)).collect();
        let ids: Vec<u64> = self.operators.keys().copied().collect();
        for id in ids {
            let online = self.is_online(id);
            match (online, open.get(&id)) {
                (true, Some(started)) => {
                    self.session_started.insert(id, *started);
                }
                (true, None) => {
                    self.session_transition(id, true);
                }
                (false, Some(started)) if self.cluster => {
                    self.session_started.insert(id, *started);
                }
                (false, Some(started)) => {
                    self.session_started.insert(id, *started);
                    self.end_session(id, at, Reason::Disconnected);
                }
                (false, None) => {}
            }
        }
        // Deleted operators' sessions end too (alone only, as above).
        let gone: Vec<(u64, u64)> = open
            .iter()
            .filter(|(id, _)| !self.operators.contains_key(id))
            .map(|(id, s)| (*id, *s))
            .collect();
        let alone = !self.cluster;
        for (id, started) in gone.into_iter().filter(|_| alone) {
            self.session_started.insert(id, started);
            self.end_session(id, at, Reason::Disconnected);
        }
    }

    /// A clean shutdown of a hub that runs alone ends every open session now (reason
    /// `disconnected`: its sockets are closing); always-online operators start a new one
    /// when it is back. In a cluster the other nodes see this node's sockets go and end
    /// the sessions that really end.
    pub fn end_sessions_at_shutdown(&mut self) {
        if self.cluster {
            return;
        }
        let at = audit::now_ms();
        let open: Vec<u64> = self.session_started.keys().copied().collect();
        for id in open {
            self.end_session(id, at, Reason::Disconnected);
        }
    }

    /// Logs a settings change of `operator` (nothing when nothing changed). `seq` is the
    /// record version the change made.
    pub(super) fn log_change(
        &mut self,
        actor: Actor,
        operator: u64,
        before: Settings,
        after: Settings,
        seq: u64,
    ) {
        let changes = audit::changes(before, after);
        if changes.is_empty() {
            return;
        }
        let actor = match actor {
            Actor::Backend => LogActor::Api,
            Actor::Operator(id) => LogActor::Operator { id },
        };
        self.writes.push(Write::Log(StoredLog {
            seq,
            entry: LogEntry {
                at: now_rfc3339(),
                operator,
                actor,
                changes,
            },
        }));
    }

    /// (id, name) of the operators a report covers: those working in `department`, or all.
    pub fn report_operators(&self, department: Option<u64>) -> Vec<(u64, String)> {
        let mut out: Vec<(u64, String)> = self
            .operators
            .values()
            .filter(|o| department.is_none_or(|d| o.record.works_in(d)))
            .map(|o| (o.record.id, o.record.name.clone()))
            .collect();
        out.sort_unstable();
        out
    }
}

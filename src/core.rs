//! The hub's state and every change to it, behind one lock held by the hub.
//!
//! A change runs to its end in one critical section: it validates, mutates, and collects its
//! effects: the store writes, the timers it needs and the frames for the peers, which the hub
//! queues to the sockets once the writes are durable, in the order the changes happened. The rules themselves live in
//! `presence.rs`, `rules.rs` and `assign.rs`; the files under `core/` wire them to the data:
//! `directory` (records and membership), `connections` (sockets), `chats` (the chat book and
//! `transition`), `assignment` (the driver and `settle`), `fanout` (views, publishing, the
//! feed), `hours`, `audit` (sessions and the status log) and `replica` (other nodes' changes).
//! This file holds the state itself, the shared types, and taking a change's effects.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use tokio::time::Instant;

use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::answer::{ChatAnswer, DepartmentView};
use crate::assign::{self, Candidate, Queued};
use crate::config::{Config, Strategy};
use crate::error::{Error, Result};
use crate::feed::{EventType, LogEvent};
use crate::model::{
    Chat, ChatId, ChatMessage, ChatStatus, ChatView, Department, DeptReason, DeptState, OperatorId,
    OperatorRecord, OperatorView, Sender, SenderKind, StoredOperator, VisitorChatView,
    next_version, now_rfc3339,
};
pub use crate::note::{Note, Origin};
use crate::peer::{Kind, Peer};
use crate::presence::{ConnId, Presence, Settings, Status};
use crate::protocol::{AssignReason, Event, Frame};
use crate::rules;
use crate::store::{Snapshot, Write};

mod assignment;
mod audit;
mod chats;
mod connections;
mod directory;
mod fanout;
mod hours;
mod rebuild;
mod replica;

/// Who asks for a change: the back end (API key, may change anything) or an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Actor {
    Backend,
    Operator(u64),
}

/// A partial settings change (`set_status`, `PATCH …/status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsChange {
    pub online: Option<bool>,
    pub invisible: Option<bool>,
    pub always_online: Option<bool>,
}

impl SettingsChange {
    pub fn touches(&self) -> rules::Touches {
        rules::Touches {
            online: self.online.is_some(),
            invisible: self.invisible.is_some(),
            always_online: self.always_online.is_some(),
        }
    }
}

/// A timer a change asked for; the hub sleeps until `at` and calls back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    GraceEnd {
        operator: u64,
        at: Instant,
    },
    AcceptDeadline {
        chat: u64,
        round: u64,
        at: Instant,
    },
    /// One grace after assigning starts: see [`Core::requeue_offline_owners`].
    OfflineOwners {
        at: Instant,
    },
    /// A department's online hours start or end (see `core/hours.rs`).
    HoursBoundary {
        department: u64,
        generation: u64,
        at: Instant,
    },
}

/// `POST /api/v1/chats`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewChat {
    pub id: Option<u64>,
    pub department: u64,
    #[serde(default)]
    pub bot: bool,
    #[serde(default)]
    pub priority: i64,
    #[serde(default = "empty_object")]
    pub visitor: Value,
}

fn empty_object() -> Value {
    json!({})
}

/// Filters of `GET /api/v1/operators`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorFilter {
    pub department: Option<u64>,
    pub status: Option<Status>,
    pub misconfigured: Option<bool>,
}

/// Filters of `GET /api/v1/chats`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatFilter {
    pub department: Option<u64>,
    pub status: Option<ChatStatus>,
    pub owner: Option<u64>,
}

impl ChatFilter {
    pub fn admits(&self, c: &Chat) -> bool {
        self.department.is_none_or(|d| c.department == d)
            && self.status.is_none_or(|s| c.status == s)
            && self.owner.is_none_or(|o| c.owner == Some(o))
    }
}

pub struct Operator {
    pub record: OperatorRecord,
    pub settings: Settings,
    pub presence: Presence,
    /// This node's connections of the operator.
    peers: Vec<Arc<Peer>>,
    /// Chats each connection opened (to stop watching them on disconnect).
    watching: HashMap<ConnId, BTreeSet<u64>>,
    /// Chats owned and not yet accepted / accepted: the counts are their sizes.
    pending: BTreeSet<u64>,
    active: BTreeSet<u64>,
    last_assigned: u64,
    /// Status as of the last settle, to see transitions.
    was_online: bool,
    /// The last `operator_status` sent, to send only changes.
    view_json: Option<Box<RawValue>>,
    /// The view `view_json` was made from: a change is seen without serializing.
    last_view: Option<OperatorView>,
    /// Local (connections, idle) last told to other nodes.
    noted: (u32, u32),
    /// Version of the record and settings (see [`StoredOperator::version`]).
    version: u64,
    /// Departments the last record change removed: they hear the next `operator_status`.
    left: Vec<u64>,
}

struct ChatEntry {
    chat: Chat,
    history: VecDeque<ChatMessage>,
    next_message: u64,
    /// Operators' connections that opened the chat.
    watchers: HashMap<ConnId, Arc<Peer>>,
    visitors: HashMap<ConnId, Arc<Peer>>,
    /// Bumped on every assignment so a stale accept deadline does nothing.
    round: u64,
    /// Why the chat went back to the queue, for the next `chat_assigned`.
    requeued: Option<AssignReason>,
}

/// What decides where a chat is counted: its owner's sets, its department's counts, the open
/// list and the queue. Copied instead of the whole chat (visitor data and all) on each change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    id: u64,
    department: u64,
    status: ChatStatus,
    owner: Option<u64>,
    priority: i64,
    seq: u64,
}

impl Slot {
    fn of(c: &Chat) -> Slot {
        Slot {
            id: c.id,
            department: c.department,
            status: c.status,
            owner: c.owner,
            priority: c.priority,
            seq: c.seq,
        }
    }
}

/// Per-department counts of chats by status (the pending count drives `queue_full`).
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    pending: u32,
    active: u32,
    bot: u32,
}

#[derive(Default)]
pub struct Core {
    cfg: Arc<Config>,
    operators: HashMap<u64, Operator>,
    departments: HashMap<u64, Department>,
    chats: HashMap<u64, ChatEntry>,
    /// Unowned pending chats per department, in queue order.
    queues: HashMap<u64, BTreeMap<(Reverse<i64>, u64), u64>>,
    /// Chats not closed, per department (for `hello`).
    open_chats: HashMap<u64, BTreeSet<u64>>,
    counts: HashMap<u64, Counts>,
    /// Operators working in / watching each department.
    members: HashMap<u64, BTreeSet<u64>>,
    watchers: HashMap<u64, BTreeSet<u64>>,
    widgets: HashMap<u64, HashMap<ConnId, Arc<Peer>>>,
    /// Department states as last published.
    published: HashMap<u64, DeptState>,
    /// Operators' open sessions as this node saw them start (ms), see `core/audit.rs`.
    session_started: HashMap<u64, u64>,
    /// Departments with online hours (`core/hours.rs`).
    hours: HashMap<u64, hours::DeptHours>,
    hours_generation: u64,
    next_chat_id: u64,
    next_seq: u64,
    assign_clock: u64,

    // Work of the change under way.
    writes: Vec<Write>,
    timers: Vec<Timer>,
    /// Changes other nodes must hear about (cluster mode only).
    notes: Vec<Note>,
    /// Cluster mode: other nodes hold connections too.
    pub cluster: bool,
    /// This node runs auto-assignment and accept deadlines: always alone, the elected
    /// node in a cluster (so one chat never gets two owners).
    pub assigner: bool,
    /// Other nodes' connections per operator: node → (all, idle).
    remote: HashMap<u64, HashMap<String, (u32, u32)>>,
    dirty_ops: BTreeSet<u64>,
    views_to_send: BTreeSet<u64>,
    dirty_depts: BTreeSet<u64>,
    to_assign: BTreeSet<u64>,
    /// While an operator's socket connects: chats assigned meanwhile and why, told to that
    /// socket after its `hello` (it is registered only then).
    assigned_during_connect: Option<Vec<(u64, AssignReason)>>,
    /// The chat view `emit_chat` serialized last, reused by `assign` for `chat_assigned`.
    last_chat_view: Option<(u64, Box<RawValue>)>,
    /// The last chat that closed (it leaves live state at once), for the answer to the close.
    last_closed: Option<Chat>,
    /// Ids of the chats closed most recently, oldest first: a stale open copy that arrives
    /// after the close (a resync racing the close's note) must not bring one back.
    recently_closed: (VecDeque<u64>, std::collections::HashSet<u64>),
    /// Frames of the change under way, for the hub to queue once its writes are durable.
    outbox: Vec<(Arc<Peer>, Frame)>,
    /// Cluster: the assigner lease token while this node assigns; its writes carry it
    /// ([`Write::Fence`]) and are refused once another node holds the lease.
    lease: Option<Arc<str>>,
}

impl Core {
    pub fn new(cfg: Arc<Config>, mut snap: Snapshot) -> Core {
        let now = Instant::now();
        let open_sessions = std::mem::take(&mut snap.open_sessions);
        let mut core = Core::load(cfg, snap, now);
        core.boot(open_sessions, now);
        core
    }

    /// The records of a snapshot, indexed; nobody connected yet.
    fn load(cfg: Arc<Config>, snap: Snapshot, now: Instant) -> Core {
        // In a cluster only the elected node assigns; it starts once elected.
        let cluster = cfg.store.backend == crate::config::Backend::Redis;
        let mut core = Core {
            cfg,
            cluster,
            assigner: !cluster,
            next_chat_id: snap.next_chat_id.max(1),
            ..Default::default()
        };
        for d in snap.departments {
            let id = d.id;
            core.departments.insert(id, d);
            core.set_hours(id, now);
        }
        for o in snap.operators {
            core.insert_operator(o.record, o.settings, o.version);
        }
        let mut messages: HashMap<u64, Vec<ChatMessage>> = HashMap::new();
        for (chat, m) in snap.messages {
            messages.entry(chat.0).or_default().push(m);
        }
        let mut chats = snap.chats;
        chats.sort_by_key(|c| c.seq);
        for chat in chats.into_iter().filter(|c| c.status != ChatStatus::Closed) {
            let history = messages.remove(&chat.id).unwrap_or_default().into();
            core.add_chat(chat, history);
        }
        core
    }

    /// Starts from the loaded records and the sockets there are (none at a start; this
    /// node's, after a rebuild): the states as published, sessions checked, assignment.
    fn boot(&mut self, open_sessions: Vec<(OperatorId, u64)>, now: Instant) {
        let depts: Vec<u64> = self.known_departments().collect();
        for d in depts {
            let state = self.dept_state(d);
            self.published.insert(d, state);
        }
        let ids: Vec<u64> = self.operators.keys().copied().collect();
        for id in ids {
            let online = self.is_online(id);
            if let Some(op) = self.operators.get_mut(&id) {
                op.was_online = online;
            }
        }
        if self.assigner {
            self.start_assigning(now);
        }
        // What the boot settled (assignments of always-online operators, the state of every
        // operator and department in the feed) is written like any change.
        self.settle(now);
        self.boot_sessions(open_sessions);
    }

    /// Takes the frames the last change produced, each with its socket.
    pub fn take_outbox(&mut self) -> Vec<(Arc<Peer>, Frame)> {
        std::mem::take(&mut self.outbox)
    }

    /// Cluster: the lease token this node's writes are fenced with while it assigns.
    pub fn lease_token(&self) -> Option<&str> {
        self.lease.as_deref().filter(|_| self.assigner)
    }

    /// Takes the store writes and timers the last change produced.
    pub fn take_effects(&mut self) -> (Vec<Write>, Vec<Timer>) {
        if let Some(token) = self.lease.as_ref().filter(|_| self.assigner)
            && !self.writes.is_empty()
        {
            self.writes.insert(0, Write::Fence(token.clone()));
        }
        if self.cluster {
            for w in &self.writes {
                match w {
                    Write::Operator { op: o, .. } => self.notes.push(Note::Operator {
                        id: OperatorId(o.record.id),
                        record: Some(o.clone()),
                    }),
                    Write::DeleteOperator(id) => self.notes.push(Note::Operator {
                        id: *id,
                        record: None,
                    }),
                    Write::Department { dept: d, .. } => self.notes.push(Note::Department {
                        department: d.clone(),
                    }),
                    _ => {}
                }
            }
        }
        (
            std::mem::take(&mut self.writes),
            std::mem::take(&mut self.timers),
        )
    }

    /// Adds a write to the change under way (a forwarded call's outcome: recorded in the
    /// same atomic step as the change, under the change's fence).
    pub fn record(&mut self, w: Write) {
        self.writes.push(w);
    }

    /// Takes the notes for other nodes (cluster mode).
    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }

    /// Recomputes every count from the chats and compares (tests and debug checks).
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        for (id, op) in &self.operators {
            let pending = self
                .chats
                .values()
                .filter(|e| e.chat.owner == Some(*id) && e.chat.status == ChatStatus::Pending)
                .count();
            let active = self
                .chats
                .values()
                .filter(|e| e.chat.owner == Some(*id) && e.chat.status == ChatStatus::Active)
                .count();
            if pending != op.pending.len() || active != op.active.len() {
                return Err(format!(
                    "operator {id}: counts {}/{} but chats {pending}/{active}",
                    op.pending.len(),
                    op.active.len()
                ));
            }
        }
        for (d, c) in &self.counts {
            let of = |s| {
                self.chats
                    .values()
                    .filter(|e| e.chat.department == *d && e.chat.status == s)
                    .count() as u32
            };
            if c.pending != of(ChatStatus::Pending)
                || c.active != of(ChatStatus::Active)
                || c.bot != of(ChatStatus::Bot)
            {
                return Err(format!("department {d}: counts drifted"));
            }
        }
        for e in self.chats.values() {
            let queued = self
                .queues
                .get(&e.chat.department)
                .is_some_and(|q| q.values().any(|c| *c == e.chat.id));
            if queued != (e.chat.status == ChatStatus::Pending && e.chat.owner.is_none()) {
                return Err(format!("chat {}: queue membership wrong", e.chat.id));
            }
        }
        Ok(())
    }
}

fn misconfigured_frame() -> Frame {
    Event::Warning {
        code: "online_invisible",
        message: MISCONFIGURED,
    }
    .frame()
}

const MISCONFIGURED: &str =
    "you are online and invisible: auto-assigned chats will not turn active when you open them";

fn unknown_operator(id: u64) -> Error {
    Error::NotFound(format!("operator {id} is unknown"))
}

fn unknown_chat(id: u64) -> Error {
    Error::NotFound(format!("chat {id} is unknown"))
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A change to a chat. In a cluster every chat change runs on the assigning node (the
/// single writer of chats); other nodes forward it there.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ChatOp {
    Create {
        req: NewChat,
    },
    HandOver {
        chat: ChatId,
    },
    /// `by`: the operator closing it; None for the back end.
    Close {
        by: Option<OperatorId>,
        chat: ChatId,
    },
    Open {
        me: OperatorId,
        chat: ChatId,
    },
    Message {
        me: OperatorId,
        chat: ChatId,
        text: String,
        whisper: bool,
        origin: Option<Origin>,
    },
    VisitorMessage {
        chat: ChatId,
        text: String,
        origin: Option<Origin>,
    },
}

fn chat_raw(chat: &Chat) -> Box<RawValue> {
    serde_json::value::to_raw_value(&chat.view()).expect("chats serialize")
}

fn raw(view: &OperatorView) -> Box<RawValue> {
    serde_json::value::to_raw_value(view).expect("views serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::Kind;

    fn core() -> Core {
        Core::new(Arc::new(Config::default()), Snapshot::default())
    }

    #[test]
    fn widget_of_an_unknown_department_leaves_nothing_behind() {
        let mut c = core();
        let peer = Arc::new(Peer::new(1, Kind::Widget, 16, 0));
        c.connect_widget(peer.clone(), &[77, 78]);
        let frames = c.take_outbox();
        assert_eq!(frames.len(), 2, "the state of each department at once");
        assert!(frames.iter().all(|(p, _)| p.id == peer.id));
        assert!(c.published.contains_key(&77));
        c.disconnect_widget(1, &[77, 78]);
        assert!(
            c.published.is_empty() && c.widgets.is_empty(),
            "public ids are not kept"
        );
    }

    #[test]
    fn widget_of_a_known_department_keeps_its_published_state() {
        let mut c = core();
        let now = Instant::now();
        c.put_department(
            Department::with_defaults(5, &Config::default().assignment),
            now,
        );
        let peer = Arc::new(Peer::new(1, Kind::Widget, 16, 0));
        c.connect_widget(peer, &[5]);
        c.disconnect_widget(1, &[5]);
        assert!(c.published.contains_key(&5));
    }
}

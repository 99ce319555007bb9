//! The hub's state and every change to it, behind one lock held by [`crate::hub::Hub`].
//!
//! A change runs to its end in one critical section: it validates, mutates, and collects its
//! effects: the store writes, the timers it needs and the frames for the peers, which the hub
//! queues to the sockets once the writes are durable, in the order the changes happened. The rules themselves live in
//! `presence.rs`, `rules.rs` and `assign.rs`; this file wires them to the data.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::assign::{self, Candidate, Queued};
use crate::cluster::Note;
use crate::config::{Config, Strategy};
use crate::error::{Error, Result};
use crate::feed::{EventType, LogEvent};
use crate::model::{
    Chat, ChatMessage, ChatStatus, ChatView, Department, DeptReason, DeptState, OperatorRecord,
    OperatorView, Sender, SenderKind, StoredOperator, VisitorChatView, next_version, now_rfc3339,
};
use crate::peer::{Kind, Peer};
use crate::presence::{ConnId, Presence, Settings, Status};
use crate::protocol::{AssignReason, Event, Frame};
use crate::rules;
use crate::store::{Snapshot, Write};

mod audit;
mod hours;
mod rebuild;
mod replica;

/// Who asks for a change: the back end (API key, may change anything) or an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    Backend,
    Operator(u64),
}

/// A partial settings change (`set_status`, `PATCH …/status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
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
            messages.entry(chat).or_default().push(m);
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
    fn boot(&mut self, open_sessions: Vec<(u64, u64)>, now: Instant) {
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
                    Write::Operator(o) => self.notes.push(Note::Operator {
                        id: o.record.id,
                        record: Some(o.clone()),
                    }),
                    Write::DeleteOperator(id) => self.notes.push(Note::Operator {
                        id: *id,
                        record: None,
                    }),
                    Write::Department(d) => self.notes.push(Note::Department {
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

    /// Takes the notes for other nodes (cluster mode).
    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }

    // ----- queries -----

    fn known_departments(&self) -> impl Iterator<Item = u64> + '_ {
        let mut all: BTreeSet<u64> = self.departments.keys().copied().collect();
        all.extend(self.members.keys());
        all.extend(self.watchers.keys());
        all.extend(self.counts.keys());
        all.into_iter()
    }

    pub fn department(&self, id: u64) -> Department {
        self.departments
            .get(&id)
            .cloned()
            .unwrap_or_else(|| Department::with_defaults(id, &self.cfg.assignment))
    }

    /// An operator's display name (a closed chat's owner, for its visitor).
    pub fn operator_name(&self, id: u64) -> Option<String> {
        self.operators.get(&id).map(|o| o.record.name.clone())
    }

    pub fn has_operator(&self, id: u64) -> bool {
        self.operators.contains_key(&id)
    }

    fn is_online(&self, id: u64) -> bool {
        self.operators
            .get(&id)
            .is_some_and(|o| o.presence.status(&o.settings).0 == Status::Online)
    }

    /// The one place that decides whether a department is online (SPEC.md section 3).
    pub fn dept_state(&self, d: u64) -> DeptState {
        let dept = self.departments.get(&d);
        let pending = self.counts.get(&d).map_or(0, |c| c.pending);
        let closed = self.closed_by_hours(d);
        let (online, reason) = if dept.is_some_and(|x| x.disabled) {
            (false, DeptReason::Disabled)
        } else if closed.is_some() {
            (false, DeptReason::Closed)
        } else if dept.is_some_and(|x| x.pending_max > 0 && pending >= x.pending_max) {
            (false, DeptReason::QueueFull)
        } else if self
            .members
            .get(&d)
            .is_some_and(|m| m.iter().any(|id| self.is_online(*id)))
        {
            (true, DeptReason::Operators)
        } else if dept.is_some_and(|x| x.bot) {
            (true, DeptReason::Bot)
        } else {
            (false, DeptReason::None)
        };
        DeptState {
            department: d,
            online,
            reason,
            opens_at: closed.flatten().filter(|_| reason == DeptReason::Closed),
        }
    }

    pub fn operator_view(&self, id: u64) -> Result<OperatorView> {
        let op = self
            .operators
            .get(&id)
            .ok_or_else(|| unknown_operator(id))?;
        Ok(self.view_of(op))
    }

    /// The view as last published (serialized once per change), or computed now.
    fn view_raw(&self, op: &Operator) -> Box<RawValue> {
        op.view_json
            .clone()
            .unwrap_or_else(|| raw(&self.view_of(op)))
    }

    fn view_of(&self, op: &Operator) -> OperatorView {
        let (status, status_reason) = op.presence.status(&op.settings);
        OperatorView {
            record: op.record.clone(),
            settings: op.settings,
            connections: op.presence.connections(),
            inactive: op.presence.inactive(),
            active_chats: op.active.len() as u32,
            pending_chats: op.pending.len() as u32,
            status,
            status_reason,
            misconfigured: op.settings.misconfigured(),
        }
    }

    pub fn list_operators(&self, f: &OperatorFilter) -> Vec<OperatorView> {
        let mut out: Vec<OperatorView> = self
            .operators
            .values()
            .filter(|o| {
                f.department
                    .is_none_or(|d| o.record.works_in(d) || o.record.watches(d))
            })
            .map(|o| self.view_of(o))
            .filter(|v| f.status.is_none_or(|s| v.status == s))
            .filter(|v| f.misconfigured.is_none_or(|m| v.misconfigured == m))
            .collect();
        out.sort_by_key(|v| v.record.id);
        out
    }

    pub fn department_view(&self, id: u64) -> Value {
        let dept = self.department(id);
        let state = self.dept_state(id);
        let counts = self.counts.get(&id).copied().unwrap_or_default();
        let online_ops = self
            .members
            .get(&id)
            .map_or(0, |m| m.iter().filter(|o| self.is_online(**o)).count());
        let mut v = serde_json::to_value(&dept).expect("departments serialize");
        let extra = json!({
            "online": state.online,
            "reason": state.reason,
            "operators": self.members.get(&id).map_or(0, |m| m.len()),
            "operators_online": online_ops,
            "pending_chats": counts.pending,
            "queued_chats": self.queues.get(&id).map_or(0, |q| q.len()),
            "active_chats": counts.active,
            "bot_chats": counts.bot,
        });
        if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
            obj.extend(more);
            if state.reason == DeptReason::Closed {
                obj.insert("opens_at".into(), json!(state.opens_at_rfc3339()));
            }
        }
        v
    }

    /// A chat that is not closed (closed ones live in the store only).
    pub fn live_chat(&self, id: u64) -> Option<Chat> {
        self.chats.get(&id).map(|e| e.chat.clone())
    }

    pub fn chat(&self, id: u64) -> Result<Value> {
        let e = self.chats.get(&id).ok_or_else(|| unknown_chat(id))?;
        Ok(serde_json::to_value(e.chat.view()).expect("chats serialize"))
    }

    /// Live chats matching `f` with an id above `after`, in id order, `limit` at most.
    pub fn list_chats(&self, f: &ChatFilter, after: u64, limit: usize) -> Vec<Chat> {
        let mut out: Vec<&ChatEntry> = self
            .chats
            .values()
            .filter(|e| e.chat.id > after && f.admits(&e.chat))
            .collect();
        out.sort_by_key(|e| e.chat.id);
        out.into_iter()
            .take(limit)
            .map(|e| e.chat.clone())
            .collect()
    }

    /// Checks a visitor's token before the upgrade.
    pub fn check_visitor(&self, chat: u64, token: &str) -> Result<()> {
        let e = self.chats.get(&chat).ok_or_else(|| unknown_chat(chat))?;
        if constant_time_eq(e.chat.visitor_token.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(Error::Forbidden("wrong visitor token for this chat".into()))
        }
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

    // ----- operators -----

    fn insert_operator(&mut self, record: OperatorRecord, settings: Settings, version: u64) {
        let id = record.id;
        for d in &record.departments {
            self.members.entry(*d).or_default().insert(id);
        }
        for d in &record.watch_departments {
            self.watchers.entry(*d).or_default().insert(id);
        }
        let op = Operator {
            record,
            settings,
            presence: Presence::default(),
            peers: Vec::new(),
            watching: HashMap::new(),
            pending: BTreeSet::new(),
            active: BTreeSet::new(),
            last_assigned: 0,
            was_online: false,
            view_json: None,
            last_view: None,
            noted: (0, 0),
            version,
            left: Vec::new(),
        };
        self.operators.insert(id, op);
        // Chats may name the operator before its record arrives (replicas, re-created ids).
        let owned: Vec<(u64, ChatStatus)> = self
            .chats
            .values()
            .filter(|e| e.chat.owner == Some(id))
            .map(|e| (e.chat.id, e.chat.status))
            .collect();
        if let Some(op) = self.operators.get_mut(&id) {
            for (chat, status) in owned {
                match status {
                    ChatStatus::Pending => op.pending.insert(chat),
                    ChatStatus::Active => op.active.insert(chat),
                    _ => false,
                };
            }
        }
    }

    fn unindex_operator(&mut self, record: &OperatorRecord) {
        for d in &record.departments {
            if let Some(m) = self.members.get_mut(d) {
                m.remove(&record.id);
            }
        }
        for d in &record.watch_departments {
            if let Some(m) = self.watchers.get_mut(d) {
                m.remove(&record.id);
            }
        }
    }

    /// `PUT /api/v1/operators/{id}`: creates or replaces the record; settings given are
    /// applied, others kept (defaults for a new operator). True when created.
    pub fn put_operator(
        &mut self,
        record: OperatorRecord,
        change: SettingsChange,
        now: Instant,
    ) -> (OperatorView, bool) {
        let version = next_version(self.operators.get(&record.id).map_or(0, |o| o.version));
        let (id, before) = (
            record.id,
            self.operators.get(&record.id).map(|o| o.settings),
        );
        let put = self.put_operator_at(record, change, version, now);
        if let Some(before) = before {
            self.log_change(Actor::Backend, id, before, put.0.settings, version);
        }
        put
    }

    fn put_operator_at(
        &mut self,
        record: OperatorRecord,
        change: SettingsChange,
        version: u64,
        now: Instant,
    ) -> (OperatorView, bool) {
        let id = record.id;
        let created = !self.operators.contains_key(&id);
        let old_record = self.operators.get(&id).map(|o| o.record.clone());
        let old_settings = self.operators.get(&id).map(|o| o.settings);
        let settings = apply_change(old_settings.unwrap_or_default(), change);
        match old_record {
            Some(old) => {
                self.unindex_operator(&old);
                self.dirty_depts.extend(old.all_departments());
                let op = self.operators.get_mut(&id).expect("present");
                op.left = old
                    .all_departments()
                    .filter(|d| !record.works_in(*d) && !record.watches(*d))
                    .collect();
                op.record = record.clone();
                op.settings = settings;
                op.version = version;
                for d in &record.departments {
                    self.members.entry(*d).or_default().insert(id);
                }
                for d in &record.watch_departments {
                    self.watchers.entry(*d).or_default().insert(id);
                }
            }
            None => self.insert_operator(record.clone(), settings, version),
        }
        self.dirty_depts.extend(record.all_departments());
        self.to_assign.extend(record.departments.iter().copied());
        self.writes.push(Write::Operator(StoredOperator {
            record,
            settings,
            version,
        }));
        // Turning Online & Invisible through the record warns like `set_status` does.
        if settings.misconfigured() && old_settings != Some(settings) {
            self.warn_misconfigured(id);
        }
        self.dirty_ops.insert(id);
        self.settle(now);
        (self.operator_view(id).expect("just put"), created)
    }

    /// `DELETE /api/v1/operators/{id}`: closes their sockets, puts their chats back in the
    /// queue and tells colleagues they are gone (a last, offline `operator_status`).
    pub fn delete_operator(&mut self, id: u64, now: Instant) -> Result<()> {
        let op = self
            .operators
            .get_mut(&id)
            .ok_or_else(|| unknown_operator(id))?;
        for p in op.peers.drain(..) {
            p.request_close(1008);
        }
        op.presence = Presence::default();
        op.settings.online = false;
        op.settings.always_online = false;
        // In a cluster the assigning node gives their chats back; the others hear of it.
        let owned: Vec<u64> = if self.assigner {
            op.pending.iter().chain(op.active.iter()).copied().collect()
        } else {
            Vec::new()
        };
        for chat in owned {
            self.transition(chat, |c| {
                c.owner = None;
                c.status = ChatStatus::Pending;
                c.assigned_at = None;
                c.accepted_at = None;
            });
            self.requeued(chat, AssignReason::OperatorUnavailable);
        }
        let watched: Vec<(ConnId, BTreeSet<u64>)> = self
            .operators
            .get_mut(&id)
            .map(|o| o.watching.drain().collect())
            .unwrap_or_default();
        for (conn, chats) in watched {
            for c in chats {
                if let Some(e) = self.chats.get_mut(&c) {
                    e.watchers.remove(&conn);
                }
            }
        }
        self.dirty_ops.insert(id);
        self.settle(now);
        let op = self.operators.remove(&id).expect("present");
        self.unindex_operator(&op.record);
        self.writes.push(Write::DeleteOperator(id));
        self.dirty_depts.extend(op.record.all_departments());
        self.settle(now);
        Ok(())
    }

    /// Changes settings, enforcing permissions: one forbidden field changes nothing.
    pub fn set_settings(
        &mut self,
        actor: Actor,
        target: u64,
        change: SettingsChange,
        now: Instant,
    ) -> Result<OperatorView> {
        let op = self
            .operators
            .get(&target)
            .ok_or_else(|| unknown_operator(target))?;
        if let Actor::Operator(me) = actor {
            let mine = self
                .operators
                .get(&me)
                .ok_or_else(|| unknown_operator(me))?;
            rules::may_change_settings(&mine.record, &op.record, change.touches())?;
        }
        let settings = apply_change(op.settings, change);
        if settings != op.settings {
            let record = op.record.clone();
            let before = op.settings;
            let op = self.operators.get_mut(&target).expect("present");
            op.settings = settings;
            op.version = next_version(op.version);
            let version = op.version;
            self.log_change(actor, target, before, settings, version);
            self.writes.push(Write::Operator(StoredOperator {
                record,
                settings,
                version,
            }));
            if settings.misconfigured() {
                self.warn_misconfigured(target);
            }
            self.dirty_ops.insert(target);
        }
        self.settle(now);
        self.operator_view(target)
    }

    /// Online & Invisible: accepted, but logged and told to the operator.
    fn warn_misconfigured(&mut self, id: u64) {
        tracing::warn!(
            operator = id,
            "operator is online and invisible: auto-assigned chats never turn active"
        );
        self.send_to_operator(id, &misconfigured_frame());
    }

    /// A new socket of an operator: counts it, sends `hello` to it, and events to others.
    pub fn connect_operator(&mut self, id: u64, peer: Arc<Peer>, now: Instant) -> Result<()> {
        let op = self
            .operators
            .get_mut(&id)
            .ok_or_else(|| unknown_operator(id))?;
        op.presence.connect(peer.id);
        self.dirty_ops.insert(id);
        self.assigned_during_connect = Some(Vec::new());
        self.settle(now);
        let assigned = self.assigned_during_connect.take().unwrap_or_default();
        let hello = self.hello(id);
        self.push(&peer, &hello);
        let op = self.operators.get_mut(&id).expect("present");
        op.peers.push(peer.clone());
        if op.settings.misconfigured() {
            self.push(&peer, &misconfigured_frame());
        }
        // Chats the connection got assigned: `assign` told the operator's other sockets only.
        for (chat, reason) in assigned {
            if let Some(e) = self.chats.get(&chat).filter(|e| e.chat.owner == Some(id)) {
                let frame = Event::ChatAssigned {
                    chat: &chat_raw(&e.chat),
                    reason,
                }
                .frame();
                self.push(&peer, &frame);
            }
        }
        Ok(())
    }

    fn hello(&self, id: u64) -> Frame {
        let op = &self.operators[&id];
        let me = self.view_raw(op);
        let depts: Vec<u64> = op.record.all_departments().collect();
        let mut colleagues = BTreeSet::new();
        for d in &depts {
            colleagues.extend(self.members.get(d).into_iter().flatten());
            colleagues.extend(self.watchers.get(d).into_iter().flatten());
        }
        colleagues.remove(&id);
        let colleagues: Vec<&Operator> = colleagues
            .iter()
            .filter_map(|o| self.operators.get(o))
            .collect();
        // Views are serialized once per change; only never-published ones are made here.
        let fresh: Vec<Box<RawValue>> = colleagues
            .iter()
            .filter(|o| o.view_json.is_none())
            .map(|o| raw(&self.view_of(o)))
            .collect();
        let mut fresh = fresh.iter();
        let operators: Vec<&RawValue> = colleagues
            .iter()
            .filter_map(|o| {
                o.view_json
                    .as_deref()
                    .or_else(|| fresh.next().map(|b| &**b))
            })
            .collect();
        let departments: Vec<DeptState> = depts.iter().map(|d| self.dept_state(*d)).collect();
        let chats: Vec<ChatView> = depts
            .iter()
            .flat_map(|d| self.open_chats.get(d).into_iter().flatten())
            .filter_map(|c| self.chats.get(c))
            .filter(|e| matches!(e.chat.status, ChatStatus::Pending | ChatStatus::Active))
            .map(|e| e.chat.view())
            .collect();
        Event::Hello {
            operator: &me,
            operators: &operators,
            departments: &departments,
            chats: &chats,
        }
        .frame()
    }

    /// A socket of an operator closed; with `logout` the grace is skipped.
    pub fn disconnect_operator(&mut self, id: u64, conn: ConnId, logout: bool, now: Instant) {
        let grace = self.cfg.presence.disconnect_grace;
        let Some(op) = self.operators.get_mut(&id) else {
            return;
        };
        op.peers.retain(|p| p.id != conn);
        let watched = op.watching.remove(&conn).unwrap_or_default();
        if logout {
            op.presence.logout(conn);
        } else if let Some(at) = op.presence.disconnect(conn, now, grace) {
            self.timers.push(Timer::GraceEnd { operator: id, at });
        }
        for c in watched {
            if let Some(e) = self.chats.get_mut(&c) {
                e.watchers.remove(&conn);
            }
        }
        self.dirty_ops.insert(id);
        self.settle(now);
    }

    pub fn grace_ended(&mut self, id: u64, now: Instant) {
        if let Some(op) = self.operators.get_mut(&id)
            && op.presence.expire_grace(now)
        {
            self.dirty_ops.insert(id);
            self.settle(now);
        }
    }

    /// `activity` from a connection (or the server-side inactivity timeout).
    pub fn set_active(&mut self, id: u64, conn: ConnId, active: bool, now: Instant) {
        if let Some(op) = self.operators.get_mut(&id)
            && op.presence.set_active(conn, active)
        {
            self.dirty_ops.insert(id);
            self.settle(now);
        }
    }

    // ----- departments -----

    pub fn put_department(&mut self, mut dept: Department, now: Instant) -> Value {
        let id = dept.id;
        if dept.version == 0 {
            dept.version = next_version(self.departments.get(&id).map_or(0, |d| d.version));
        }
        self.writes.push(Write::Department(dept.clone()));
        self.departments.insert(id, dept);
        self.set_hours(id, now);
        self.dirty_depts.insert(id);
        self.to_assign.insert(id);
        self.settle(now);
        self.department_view(id)
    }

    // ----- widgets and visitors -----

    /// Subscribes a widget and sends it the current state of each department at once.
    pub fn connect_widget(&mut self, peer: Arc<Peer>, depts: &[u64]) {
        for d in depts {
            let state = self.dept_state(*d);
            self.published.entry(*d).or_insert(state);
            let frame = Event::WidgetStatus(&state).frame();
            self.push(&peer, &frame);
            self.widgets
                .entry(*d)
                .or_default()
                .insert(peer.id, peer.clone());
        }
    }

    pub fn disconnect_widget(&mut self, conn: ConnId, depts: &[u64]) {
        for d in depts {
            if let Some(w) = self.widgets.get_mut(d) {
                w.remove(&conn);
                if w.is_empty() {
                    self.widgets.remove(d);
                    // A public socket may name any id: forget the ones nothing else knows.
                    let known = self.departments.contains_key(d)
                        || self.members.get(d).is_some_and(|m| !m.is_empty())
                        || self.watchers.get(d).is_some_and(|m| !m.is_empty())
                        || self.counts.contains_key(d);
                    if !known {
                        self.published.remove(d);
                    }
                }
            }
        }
    }

    /// A visitor's socket: the chat, then its history (whispers left out), then what is new.
    pub fn connect_visitor(&mut self, chat: u64, peer: Arc<Peer>) -> Result<()> {
        let frame = self.visitor_frame(chat)?;
        self.push(&peer, &frame);
        let e = self
            .chats
            .get_mut(&chat)
            .ok_or_else(|| unknown_chat(chat))?;
        let messages: Vec<&ChatMessage> = e.history.iter().filter(|m| !m.whisper).collect();
        let history = Event::History {
            chat,
            messages: &messages,
        }
        .frame();
        e.visitors.insert(peer.id, peer.clone());
        self.push(&peer, &history);
        Ok(())
    }

    /// Kept messages of a live chat with an id above `after`, oldest first (whispers too).
    pub fn messages(&self, chat: u64, after: u64, limit: usize) -> Option<Vec<ChatMessage>> {
        let e = self.chats.get(&chat)?;
        Some(
            e.history
                .iter()
                .filter(|m| m.id > after)
                .take(limit)
                .cloned()
                .collect(),
        )
    }

    pub fn disconnect_visitor(&mut self, chat: u64, conn: ConnId) {
        if let Some(e) = self.chats.get_mut(&chat) {
            e.visitors.remove(&conn);
        }
    }

    fn visitor_frame(&self, chat: u64) -> Result<Frame> {
        let e = self.chats.get(&chat).ok_or_else(|| unknown_chat(chat))?;
        let owner_name = e
            .chat
            .owner
            .and_then(|o| self.operators.get(&o))
            .map(|o| o.record.name.as_str());
        Ok(Event::VisitorChat {
            chat: VisitorChatView {
                id: chat,
                status: e.chat.status,
                owner_name,
            },
        }
        .frame())
    }

    // ----- chats -----

    pub fn create_chat(&mut self, req: NewChat, now: Instant) -> Result<(Value, String)> {
        if !req.visitor.is_object() {
            return Err(Error::bad("visitor must be a JSON object"));
        }
        let id = match req.id {
            Some(id) if self.chats.contains_key(&id) => {
                return Err(Error::Conflict(format!("chat {id} already exists")));
            }
            Some(0) => return Err(Error::bad("chat id must be greater than 0")),
            Some(id) if id > MAX_CHAT_ID => {
                return Err(Error::bad(format!(
                    "chat id must be at most {MAX_CHAT_ID} (2^53 - 1)"
                )));
            }
            Some(id) => id,
            None if self.next_chat_id > MAX_CHAT_ID
                || self.chats.contains_key(&self.next_chat_id) =>
            {
                return Err(Error::Conflict(
                    "no chat id left to allocate; give ids explicitly".into(),
                ));
            }
            None => self.next_chat_id,
        };
        self.next_chat_id = self.next_chat_id.max(id.saturating_add(1));
        let chat = Chat {
            id,
            department: req.department,
            status: if req.bot {
                ChatStatus::Bot
            } else {
                ChatStatus::Pending
            },
            owner: None,
            priority: req.priority,
            visitor: req.visitor,
            created_at: now_rfc3339(),
            assigned_at: None,
            accepted_at: None,
            seq: self.next_seq,
            visitor_token: random_token(),
            avoid: None,
            assign_reason: None,
            version: next_version(0),
        };
        self.next_seq += 1;
        let token = chat.visitor_token.clone();
        if self.cluster {
            self.notes.push(Note::Chat { chat: chat.clone() });
        }
        self.writes.push(Write::Chat(chat.clone()));
        self.add_chat(chat, VecDeque::new());
        self.dirty_depts.insert(req.department);
        self.to_assign.insert(req.department);
        self.emit_chat(id);
        self.settle(now);
        Ok((self.chat(id)?, token))
    }

    /// Takes in a chat that is not known yet (loaded, created, or replicated).
    fn add_chat(&mut self, chat: Chat, history: VecDeque<ChatMessage>) {
        self.next_chat_id = self.next_chat_id.max(chat.id.saturating_add(1));
        self.next_seq = self.next_seq.max(chat.seq + 1);
        self.count(&Slot::of(&chat), 1);
        let next_message = history.back().map_or(1, |m| m.id + 1);
        let entry = ChatEntry {
            chat,
            history,
            next_message,
            watchers: HashMap::new(),
            visitors: HashMap::new(),
            round: 0,
            requeued: None,
        };
        self.chats.insert(entry.chat.id, entry);
    }

    /// `PATCH /api/v1/chats/{id}` `{"status":"pending"}`: a bot hands the chat to humans.
    pub fn hand_over(&mut self, id: u64, now: Instant) -> Result<Value> {
        let e = self.chats.get(&id).ok_or_else(|| unknown_chat(id))?;
        if e.chat.status != ChatStatus::Bot {
            return Err(Error::Conflict(
                format!("chat {id} is {:?}, not a bot chat", e.chat.status).to_lowercase(),
            ));
        }
        self.transition(id, |c| c.status = ChatStatus::Pending);
        self.settle(now);
        self.chat(id)
    }

    /// Closes a chat: by its owner, or by the back end.
    pub fn close_chat(&mut self, actor: Actor, id: u64, now: Instant) -> Result<Value> {
        let e = self.chats.get(&id).ok_or_else(|| unknown_chat(id))?;
        if let Actor::Operator(me) = actor
            && e.chat.owner != Some(me)
        {
            return Err(Error::Forbidden(format!(
                "only the owner of chat {id} can close it"
            )));
        }
        if e.chat.status == ChatStatus::Closed {
            return Err(Error::Conflict(format!("chat {id} is already closed")));
        }
        self.transition(id, |c| c.status = ChatStatus::Closed);
        self.settle(now);
        let closed = self.last_closed.take().ok_or_else(|| unknown_chat(id))?;
        Ok(serde_json::to_value(closed.view()).expect("chats serialize"))
    }

    /// `open_chat`: the seed's opening rules; the opener watches the chat from now on.
    pub fn open_chat(&mut self, me: u64, id: u64, now: Instant) -> Result<Value> {
        let takes = {
            let op = self
                .operators
                .get(&me)
                .ok_or_else(|| unknown_operator(me))?;
            let e = self.chats.get(&id).ok_or_else(|| unknown_chat(id))?;
            let access = rules::access(&op.record, &e.chat)?;
            rules::open_takes(&op.settings, access, &e.chat)
        };
        if takes {
            self.take(id, me);
        }
        self.settle(now);
        let e = &self.chats[&id];
        Ok(json!({ "chat": e.chat.view(), "messages": e.history }))
    }

    pub fn leave_chat(&mut self, me: u64, conn: ConnId, id: u64) -> Result<()> {
        let e = self.chats.get_mut(&id).ok_or_else(|| unknown_chat(id))?;
        e.watchers.remove(&conn);
        if let Some(w) = self
            .operators
            .get_mut(&me)
            .and_then(|o| o.watching.get_mut(&conn))
        {
            w.remove(&id);
        }
        Ok(())
    }

    /// `send_message` of an operator: a visible member's first real message takes a
    /// pending or bot chat; whispers reach operators only.
    pub fn operator_message(
        &mut self,
        me: u64,
        id: u64,
        text: String,
        whisper: bool,
        origin: Option<Origin>,
        now: Instant,
    ) -> Result<Value> {
        check_text(&text)?;
        let (takes, name) = {
            let op = self
                .operators
                .get(&me)
                .ok_or_else(|| unknown_operator(me))?;
            let e = self.chats.get(&id).ok_or_else(|| unknown_chat(id))?;
            if e.chat.status == ChatStatus::Closed {
                return Err(Error::Conflict(format!("chat {id} is closed")));
            }
            let access = rules::access(&op.record, &e.chat)?;
            (
                rules::message_takes(&op.settings, access, &e.chat, whisper),
                op.record.name.clone(),
            )
        };
        if takes {
            self.take(id, me);
        }
        let from = Sender {
            kind: SenderKind::Operator,
            id: Some(me),
            name: Some(name),
        };
        let message = self.append_message(id, from, text, whisper, origin);
        self.settle(now);
        Ok(json!({ "message": message }))
    }

    pub fn visitor_message(
        &mut self,
        id: u64,
        text: String,
        origin: Option<Origin>,
    ) -> Result<Value> {
        check_text(&text)?;
        let e = self.chats.get(&id).ok_or_else(|| unknown_chat(id))?;
        if e.chat.status == ChatStatus::Closed {
            return Err(Error::Conflict(format!("chat {id} is closed")));
        }
        let name = e
            .chat
            .visitor
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let from = Sender {
            kind: SenderKind::Visitor,
            id: None,
            name,
        };
        let message = self.append_message(id, from, text, false, origin);
        Ok(json!({ "message": message }))
    }

    fn append_message(
        &mut self,
        id: u64,
        from: Sender,
        text: String,
        whisper: bool,
        origin: Option<Origin>,
    ) -> ChatMessage {
        let e = self.chats.get_mut(&id).expect("checked by caller");
        let message = ChatMessage {
            id: e.next_message,
            from,
            text,
            whisper,
            at: now_rfc3339(),
        };
        self.writes.push(Write::Message(id, message.clone()));
        let frame = Event::Message {
            chat: id,
            message: &message,
        }
        .frame();
        self.log(EventType::Message, &frame, None);
        self.keep_message(id, message.clone());
        if self.cluster {
            self.notes.push(Note::Message {
                chat: id,
                message: message.clone(),
                origin: origin.clone(),
            });
        }
        self.deliver_message(id, &message, origin.as_ref());
        message
    }

    /// Adds a message to the chat's history, dropping the oldest past `chats.history`.
    fn keep_message(&mut self, id: u64, message: ChatMessage) {
        let limit = self.cfg.chats.history.max(1);
        let Some(e) = self.chats.get_mut(&id) else {
            return;
        };
        e.next_message = e.next_message.max(message.id + 1);
        e.history.push_back(message);
        if e.history.len() > limit {
            e.history.pop_front();
            if let Some(first) = e.history.front() {
                self.writes.push(Write::TrimMessages {
                    chat: id,
                    below: first.id,
                });
            }
        }
    }

    /// Sends a message to the owner's and the watchers' sockets on this node, and to the
    /// visitors unless it is a whisper; never back to the socket it came from.
    fn deliver_message(&mut self, id: u64, message: &ChatMessage, origin: Option<&Origin>) {
        let Some(e) = self.chats.get(&id) else { return };
        let skip = origin
            .filter(|o| o.node == self.cfg.server.node_id)
            .map(|o| o.conn);
        let frame = Event::Message { chat: id, message }.frame();
        let mut peers: HashMap<ConnId, Arc<Peer>> = e.watchers.clone();
        if !message.whisper {
            peers.extend(e.visitors.iter().map(|(k, v)| (*k, v.clone())));
        }
        if let Some(o) = e.chat.owner.and_then(|o| self.operators.get(&o)) {
            peers.extend(o.peers.iter().map(|p| (p.id, p.clone())));
        }
        for (conn, p) in &peers {
            if Some(*conn) != skip {
                self.push(p, &frame);
            }
        }
    }

    /// The socket watches the chat: gets its messages until `leave_chat` or disconnect.
    pub fn watch(&mut self, me: u64, peer: &Arc<Peer>, id: u64) {
        if let Some(e) = self.chats.get_mut(&id) {
            e.watchers.insert(peer.id, peer.clone());
        }
        if let Some(op) = self.operators.get_mut(&me) {
            op.watching.entry(peer.id).or_default().insert(id);
        }
    }

    /// `me` becomes the owner and the chat turns active.
    fn take(&mut self, id: u64, me: u64) {
        let stamp = now_rfc3339();
        self.transition(id, |c| {
            if c.owner != Some(me) {
                c.assigned_at = Some(stamp.clone());
                c.assign_reason = None;
            }
            c.owner = Some(me);
            c.status = ChatStatus::Active;
            c.accepted_at = Some(stamp);
        });
    }

    /// An accept deadline passed: the chat goes to another candidate.
    pub fn accept_deadline(&mut self, id: u64, round: u64, now: Instant) {
        let Some(e) = self.chats.get(&id).filter(|_| self.assigner) else {
            return;
        };
        if e.round != round || e.chat.status != ChatStatus::Pending {
            return;
        }
        let Some(prev) = e.chat.owner else { return };
        self.transition(id, |c| {
            c.owner = None;
            c.assigned_at = None;
            c.avoid = Some(prev);
        });
        self.requeued(id, AssignReason::AcceptTimeout);
        self.settle(now);
    }

    fn requeued(&mut self, id: u64, reason: AssignReason) {
        if let Some(e) = self.chats.get_mut(&id) {
            e.requeued = Some(reason);
            self.to_assign.insert(e.chat.department);
        }
    }

    /// The one path that changes a chat's owner or status: keeps every count, the queue and
    /// the store in step, and tells the department.
    fn transition(&mut self, id: u64, f: impl FnOnce(&mut Chat)) {
        let Some(e) = self.chats.get_mut(&id) else {
            return;
        };
        let before = Slot::of(&e.chat);
        f(&mut e.chat);
        if e.chat.owner.is_some() {
            e.chat.avoid = None;
        } else {
            e.chat.assign_reason = None;
        }
        e.chat.version = next_version(e.chat.version);
        if before.owner != e.chat.owner || before.status != e.chat.status {
            e.round += 1;
        }
        let after = Slot::of(&e.chat);
        let stored = e.chat.clone();
        self.count(&before, -1);
        self.count(&after, 1);
        // Capacity may have freed up, or the chat may wait in the queue now.
        self.to_assign.insert(after.department);
        // The previous owner's capacity counts in every department they work in.
        if let Some(prev) = before.owner.and_then(|o| self.operators.get(&o)) {
            self.to_assign
                .extend(prev.record.departments.iter().copied());
        }
        self.dirty_ops
            .extend([before.owner, after.owner].into_iter().flatten());
        self.dirty_depts.insert(after.department);
        if self.cluster {
            self.notes.push(Note::Chat {
                chat: stored.clone(),
            });
        }
        self.writes.push(Write::Chat(stored));
        self.emit_chat(id);
        if after.status == ChatStatus::Closed {
            self.evict_chat(id);
        }
    }

    /// A closed chat leaves live state (the store keeps it for `chats.retention`): memory
    /// is bounded by the open chats, not by every chat ever seen.
    fn evict_chat(&mut self, id: u64) {
        let Some(e) = self.chats.remove(&id) else {
            return;
        };
        for peer in e.watchers.values() {
            if let Kind::Operator(op) = peer.kind
                && let Some(w) = self
                    .operators
                    .get_mut(&op)
                    .and_then(|o| o.watching.get_mut(&peer.id))
            {
                w.remove(&id);
            }
        }
        if let Some(open) = self.open_chats.get_mut(&e.chat.department)
            && open.is_empty()
        {
            self.open_chats.remove(&e.chat.department);
        }
        let (order, set) = &mut self.recently_closed;
        if set.insert(id) {
            order.push_back(id);
        }
        while order.len() > RECENTLY_CLOSED {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        self.last_closed = Some(e.chat);
    }

    /// True for a chat this node saw close lately.
    pub(crate) fn closed_lately(&self, id: u64) -> bool {
        self.recently_closed.1.contains(&id)
    }

    /// A node that starts assigning in a cluster logs the state of every operator and
    /// department: what changed while no node was assigning (an election after a node was
    /// lost) reaches the feed; what did not is dropped by the store (same as last logged).
    fn log_every_state(&mut self) {
        let ids: Vec<u64> = self.operators.keys().copied().collect();
        for id in ids {
            let view = raw(&self.view_of(&self.operators[&id]));
            let frame = Event::OperatorStatus { operator: &view }.frame();
            self.log(
                EventType::OperatorStatus,
                &frame,
                Some(format!("operator:{id}")),
            );
        }
        let depts: Vec<u64> = self.known_departments().collect();
        for d in depts {
            let state = self.dept_state(d);
            let frame = Event::DepartmentStatus(&state).frame();
            self.log(
                EventType::DepartmentStatus,
                &frame,
                Some(format!("department:{d}")),
            );
        }
    }

    /// Appends an event to the feed with the change's writes. The assigning node writes the
    /// feed: alone it is this node; in a cluster it is the single writer of chats and hears
    /// every other node's changes, so the log has one order and no duplicates.
    fn log(&mut self, kind: EventType, frame: &Frame, subject: Option<String>) {
        if self.assigner {
            let mut e = LogEvent::new(kind, frame);
            e.subject = subject;
            self.writes.push(Write::Event(e));
        }
    }

    /// Adds (`sign` 1) or removes (-1) a chat from every count and index it belongs to.
    fn count(&mut self, c: &Slot, sign: i32) {
        let add = sign > 0;
        if let Some(op) = c.owner.and_then(|o| self.operators.get_mut(&o)) {
            let set = match c.status {
                ChatStatus::Pending => Some(&mut op.pending),
                ChatStatus::Active => Some(&mut op.active),
                _ => None,
            };
            if let Some(set) = set {
                if add {
                    set.insert(c.id)
                } else {
                    set.remove(&c.id)
                };
            }
        }
        let n = self.counts.entry(c.department).or_default();
        let slot = match c.status {
            ChatStatus::Pending => Some(&mut n.pending),
            ChatStatus::Active => Some(&mut n.active),
            ChatStatus::Bot => Some(&mut n.bot),
            ChatStatus::Closed => None,
        };
        if let Some(slot) = slot {
            *slot = if add {
                *slot + 1
            } else {
                slot.saturating_sub(1)
            };
        }
        if c.status != ChatStatus::Closed {
            let open = self.open_chats.entry(c.department).or_default();
            if add {
                open.insert(c.id)
            } else {
                open.remove(&c.id)
            };
        }
        if c.status == ChatStatus::Pending && c.owner.is_none() {
            let q = self.queues.entry(c.department).or_default();
            let key = assign::queue_key(c.priority, c.seq);
            if add {
                q.insert(key, c.id)
            } else {
                q.remove(&key)
            };
        }
    }

    // ----- assignment -----

    fn run_assignment(&mut self, d: u64, now: Instant) {
        let dept = self.department(d);
        if !self.assigner || dept.assignment == Strategy::Off {
            return;
        }
        let Some(queue) = self.queues.get(&d).filter(|q| !q.is_empty()) else {
            return;
        };
        let mut cands: Vec<Candidate> = self
            .members
            .get(&d)
            .into_iter()
            .flatten()
            .filter_map(|id| self.operators.get(id))
            .filter(|o| {
                !o.record.exclude_autoassign && o.presence.status(&o.settings).0 == Status::Online
            })
            .map(|o| Candidate {
                id: o.record.id,
                load: (o.active.len() + o.pending.len()) as u32,
                capacity: if o.record.max_chats > 0 {
                    o.record.max_chats
                } else {
                    dept.max_chats
                },
                last_assigned: o.last_assigned,
            })
            .collect();
        if cands.is_empty() {
            return;
        }
        let chats = &self.chats;
        let queued = queue.values().map(|id| Queued {
            chat: *id,
            avoid: chats.get(id).and_then(|e| e.chat.avoid),
        });
        let decisions = assign::plan(dept.assignment, queued, &mut cands, &mut self.assign_clock);
        for (chat, op) in decisions {
            if let Some(c) = cands.iter().find(|c| c.id == op)
                && let Some(o) = self.operators.get_mut(&op)
            {
                o.last_assigned = c.last_assigned;
            }
            self.assign(chat, op, now);
        }
    }

    fn assign(&mut self, id: u64, op: u64, now: Instant) {
        let reason = self
            .chats
            .get_mut(&id)
            .and_then(|e| e.requeued.take())
            .unwrap_or(AssignReason::Auto);
        if let Some(during) = self.assigned_during_connect.as_mut() {
            during.push((id, reason));
        }
        let accepts = self
            .operators
            .get(&op)
            .is_some_and(|o| rules::auto_accepts(&o.record, &o.settings));
        let stamp = now_rfc3339();
        self.transition(id, |c| {
            c.owner = Some(op);
            c.assigned_at = Some(stamp.clone());
            c.assign_reason = Some(reason);
            c.avoid = None;
            if accepts {
                c.status = ChatStatus::Active;
                c.accepted_at = Some(stamp);
            }
        });
        if !accepts {
            self.arm_accept_deadline(id, now);
        }
        let e = &self.chats[&id];
        // The view `emit_chat` just serialized for the department's `chat` event.
        let view = match self.last_chat_view.take() {
            Some((chat, view)) if chat == id => view,
            _ => chat_raw(&e.chat),
        };
        let frame = Event::ChatAssigned {
            chat: &view,
            reason,
        }
        .frame();
        self.log(EventType::ChatAssigned, &frame, None);
        self.send_to_operator(op, &frame);
    }

    /// Re-assigns the chat if its owner has not accepted it within the department's
    /// `accept_timeout` (zero: never).
    fn arm_accept_deadline(&mut self, id: u64, now: Instant) {
        let Some(e) = self.chats.get(&id) else { return };
        let timeout = self.department(e.chat.department).accept_timeout;
        if let Some(at) = now.checked_add(timeout).filter(|_| !timeout.is_zero()) {
            self.timers.push(Timer::AcceptDeadline {
                chat: id,
                round: e.round,
                at,
            });
        }
    }

    // ----- settling and publishing -----

    /// Follows the consequences of a change until nothing moves: status transitions
    /// requeue or trigger assignment; then publishes changed views and department states.
    fn settle(&mut self, now: Instant) {
        loop {
            let ops = std::mem::take(&mut self.dirty_ops);
            if ops.is_empty() && self.to_assign.is_empty() {
                break;
            }
            for id in ops {
                self.views_to_send.insert(id);
                self.note_presence(id);
                let online = self.is_online(id);
                let Some(op) = self.operators.get_mut(&id) else {
                    continue;
                };
                if op.was_online == online {
                    continue;
                }
                op.was_online = online;
                let depts: Vec<u64> = op.record.departments.clone();
                let unaccepted: Vec<u64> = op.pending.iter().copied().collect();
                self.session_transition(id, online);
                self.dirty_depts.extend(depts.iter().copied());
                if online {
                    self.to_assign.extend(depts);
                } else if self.assigner {
                    for chat in unaccepted {
                        self.transition(chat, |c| {
                            c.owner = None;
                            c.assigned_at = None;
                        });
                        self.requeued(chat, AssignReason::OperatorUnavailable);
                    }
                }
            }
            for d in std::mem::take(&mut self.to_assign) {
                self.run_assignment(d, now);
            }
        }
        for id in std::mem::take(&mut self.views_to_send) {
            self.publish_operator(id);
        }
        for d in std::mem::take(&mut self.dirty_depts) {
            self.publish_department(d);
        }
    }

    fn publish_operator(&mut self, id: u64) {
        let Some(op) = self.operators.get(&id) else {
            return;
        };
        let view = self.view_of(op);
        if op.last_view.as_ref() == Some(&view) {
            return;
        }
        let json = raw(&view);
        let frame = Event::OperatorStatus { operator: &json }.frame();
        let mut audience =
            self.audience(op.record.all_departments().chain(op.left.iter().copied()));
        self.log(
            EventType::OperatorStatus,
            &frame,
            Some(format!("operator:{id}")),
        );
        if let Err(at) = audience.binary_search(&id) {
            audience.insert(at, id);
        }
        self.deliver(&audience, &frame);
        if let Some(op) = self.operators.get_mut(&id) {
            op.view_json = Some(json);
            op.last_view = Some(view);
            op.left.clear();
        }
    }

    fn publish_department(&mut self, d: u64) {
        let state = self.dept_state(d);
        let before = self.published.insert(d, state);
        let unchanged = before.map_or(!state.online && state.reason == DeptReason::None, |b| {
            b == state
        });
        if unchanged {
            return;
        }
        let frame = Event::DepartmentStatus(&state).frame();
        self.log(
            EventType::DepartmentStatus,
            &frame,
            Some(format!("department:{d}")),
        );
        let audience = self.audience(std::iter::once(d));
        self.deliver(&audience, &frame);
        if let Some(widgets) = self.widgets.get(&d) {
            let frame = Event::WidgetStatus(&state).frame();
            self.outbox.reserve(widgets.len());
            for p in widgets.values() {
                self.outbox.push((p.clone(), frame.clone()));
            }
        }
    }

    /// Operators who work in or watch a department.
    /// Operators with a socket on this node who work in or watch any of `depts`, sorted.
    fn audience(&self, depts: impl Iterator<Item = u64>) -> Vec<u64> {
        let mut out = Vec::new();
        for d in depts {
            let ops = self
                .members
                .get(&d)
                .into_iter()
                .flatten()
                .chain(self.watchers.get(&d).into_iter().flatten());
            out.extend(ops.filter(|o| self.operators.get(o).is_some_and(|x| !x.peers.is_empty())));
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Queues `frame` to every socket of `ops`.
    fn deliver(&mut self, ops: &[u64], frame: &Frame) {
        for p in ops
            .iter()
            .filter_map(|o| self.operators.get(o))
            .flat_map(|o| &o.peers)
        {
            self.outbox.push((p.clone(), frame.clone()));
        }
    }

    fn emit_chat(&mut self, id: u64) {
        let Some(e) = self.chats.get(&id) else { return };
        let view = chat_raw(&e.chat);
        let frame = Event::Chat { chat: &view }.frame();
        self.log(EventType::Chat, &frame, None);
        let Some(e) = self.chats.get(&id) else { return };
        let audience = self.audience(std::iter::once(e.chat.department));
        // Watchers from the department already have it through their operator.
        let watchers: Vec<Arc<Peer>> = e
            .watchers
            .values()
            .filter(|p| !matches!(p.kind, Kind::Operator(o) if audience.binary_search(&o).is_ok()))
            .cloned()
            .collect();
        let visitors: Vec<Arc<Peer>> = e.visitors.values().cloned().collect();
        self.deliver(&audience, &frame);
        for p in &watchers {
            self.push(p, &frame);
        }
        if !visitors.is_empty()
            && let Ok(vf) = self.visitor_frame(id)
        {
            for p in &visitors {
                self.push(p, &vf);
            }
        }
        self.last_chat_view = Some((id, view));
    }

    fn send_to_operator(&mut self, id: u64, frame: &Frame) {
        let Some(op) = self.operators.get(&id) else {
            return;
        };
        for p in &op.peers {
            self.outbox.push((p.clone(), frame.clone()));
        }
    }

    fn push(&mut self, peer: &Arc<Peer>, frame: &Frame) {
        self.outbox.push((peer.clone(), frame.clone()));
    }
}

/// Closed chat ids remembered against stale copies (a few hundred KiB at most).
const RECENTLY_CLOSED: usize = 10_000;

/// Largest chat id: the largest integer JavaScript clients read exactly.
const MAX_CHAT_ID: u64 = (1 << 53) - 1;

fn misconfigured_frame() -> Frame {
    Event::Warning {
        code: "online_invisible",
        message: MISCONFIGURED,
    }
    .frame()
}

const MISCONFIGURED: &str =
    "you are online and invisible: auto-assigned chats will not turn active when you open them";

fn apply_change(mut s: Settings, c: SettingsChange) -> Settings {
    if let Some(v) = c.online {
        s.online = v;
    }
    if let Some(v) = c.invisible {
        s.invisible = v;
    }
    if let Some(v) = c.always_online {
        s.always_online = v;
    }
    s
}

fn check_text(text: &str) -> Result<()> {
    if text.trim().is_empty() {
        return Err(Error::bad("text must not be empty"));
    }
    Ok(())
}

fn unknown_operator(id: u64) -> Error {
    Error::NotFound(format!("operator {id} is unknown"))
}

fn unknown_chat(id: u64) -> Error {
    Error::NotFound(format!("chat {id} is unknown"))
}

fn random_token() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Core {
    /// Operators whose status is online (metrics).
    pub fn online_operators(&self) -> usize {
        self.operators
            .keys()
            .filter(|id| self.is_online(**id))
            .count()
    }
}

/// Where a message came from: its socket does not get it back as an event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    pub node: String,
    pub conn: ConnId,
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
        chat: u64,
    },
    /// `by`: the operator closing it; None for the back end.
    Close {
        by: Option<u64>,
        chat: u64,
    },
    Open {
        me: u64,
        chat: u64,
    },
    Message {
        me: u64,
        chat: u64,
        text: String,
        whisper: bool,
        origin: Option<Origin>,
    },
    VisitorMessage {
        chat: u64,
        text: String,
        origin: Option<Origin>,
    },
}

impl Core {
    /// Runs a chat change; the answer is what the client is acknowledged with.
    pub fn exec(&mut self, op: ChatOp, now: Instant) -> Result<Value> {
        match op {
            ChatOp::Create { req } => {
                let (chat, token) = self.create_chat(req, now)?;
                Ok(json!({ "chat": chat, "visitor_token": token }))
            }
            ChatOp::HandOver { chat } => self.hand_over(chat, now),
            ChatOp::Close { by, chat } => {
                let actor = by.map_or(Actor::Backend, Actor::Operator);
                self.close_chat(actor, chat, now)
            }
            ChatOp::Open { me, chat } => self.open_chat(me, chat, now),
            ChatOp::Message {
                me,
                chat,
                text,
                whisper,
                origin,
            } => self.operator_message(me, chat, text, whisper, origin, now),
            ChatOp::VisitorMessage { chat, text, origin } => {
                self.visitor_message(chat, text, origin)
            }
        }
    }

    /// Starts assigning (alone at start, or elected in a cluster): accept deadlines start
    /// anew for unaccepted chats, chats of owners who are offline go back to the queue, and
    /// whatever waits is assigned (always-online operators are candidates right away).
    pub fn start_assigning(&mut self, now: Instant) {
        self.assigner = true;
        if self.cluster {
            self.log_every_state();
        }
        let unaccepted: Vec<(u64, Option<u64>)> = self
            .chats
            .values()
            .filter(|e| e.chat.status == ChatStatus::Pending && e.chat.owner.is_some())
            .map(|e| (e.chat.id, e.chat.owner))
            .collect();
        for (id, _) in unaccepted {
            self.arm_accept_deadline(id, now);
        }
        // Owners who are not back within one grace give their unaccepted chats back.
        let at = now + self.cfg.presence.disconnect_grace;
        self.timers.push(Timer::OfflineOwners { at });
        self.to_assign.extend(self.queues.keys().copied());
        self.settle(now);
    }

    /// Puts back in the queue the unaccepted chats of owners who are offline (after a
    /// restart or a failover, when nobody saw them go offline).
    pub fn requeue_offline_owners(&mut self, now: Instant) {
        if !self.assigner {
            return;
        }
        let stale: Vec<u64> = self
            .chats
            .values()
            .filter(|e| e.chat.status == ChatStatus::Pending)
            .filter(|e| e.chat.owner.is_some_and(|o| !self.is_online(o)))
            .map(|e| e.chat.id)
            .collect();
        for id in stale {
            self.transition(id, |c| {
                c.owner = None;
                c.assigned_at = None;
            });
            self.requeued(id, AssignReason::OperatorUnavailable);
        }
        self.settle(now);
    }

    pub fn stop_assigning(&mut self) {
        self.assigner = false;
        self.lease = None;
    }

    /// Starts assigning under the cluster's assigner lease `token`.
    pub fn start_assigning_fenced(&mut self, token: Arc<str>, now: Instant) {
        self.lease = Some(token);
        self.start_assigning(now);
    }
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

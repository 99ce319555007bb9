//! Cluster replicas: applying what other nodes did (presence counts, records, chats and
//! messages of the assigning node) to this node's state. Their writes are already in the
//! store, so only the mirrored write is dropped; events go to this node's clients.

use super::*;

impl Core {
    /// Applies what `node` did, read from the change log.
    pub fn apply_note(&mut self, node: &str, note: Note, now: Instant) {
        match note {
            Note::Presence {
                operator,
                all,
                idle,
                logout,
            } => self.apply_presence(node, operator.0, all, idle, logout, now),
            Note::NodeState { counts } => self.replace_node(node, counts, now),
            Note::Operator { id, record } => self.apply_operator(id.0, record, now),
            Note::Department { department } => self.apply_department(department, now),
            Note::Chat { chat } => self.apply_chat(chat, now),
            Note::Message {
                chat,
                message,
                origin,
            } => self.apply_message(chat.0, message, origin),
        }
    }

    pub(super) fn note_presence(&mut self, id: u64) {
        if !self.cluster {
            return;
        }
        let Some(op) = self.operators.get_mut(&id) else {
            return;
        };
        let counts = (op.presence.local_connections(), op.presence.local_idle());
        if counts != op.noted {
            op.noted = counts;
            let logout = counts.0 == 0 && op.presence.logged_out();
            self.notes.push(Note::Presence {
                operator: OperatorId(id),
                all: counts.0,
                idle: counts.1,
                logout,
            });
        }
    }

    /// Notes every connection count of this node, replacing what others hold of it: heals
    /// counts other nodes dropped while they saw this node's lease lapse.
    pub fn note_node_state(&mut self) {
        if self.cluster {
            let counts = self.local_counts();
            self.notes.push(Note::NodeState { counts });
        }
    }

    /// Another node's connections of an operator.
    pub fn apply_presence(
        &mut self,
        node: &str,
        op: u64,
        all: u32,
        idle: u32,
        logout: bool,
        now: Instant,
    ) {
        let entry = self.remote.entry(op).or_default();
        if all == 0 {
            entry.remove(node);
        } else {
            entry.insert(node.to_string(), (all, idle));
        }
        self.refresh_remote_with(op, logout, now);
        self.settle(now);
    }

    /// Replaces every count of one node (its periodic or after-outage full state).
    pub fn replace_node(&mut self, node: &str, counts: Vec<(OperatorId, u32, u32)>, now: Instant) {
        let mut touched: BTreeSet<u64> = self
            .remote
            .iter()
            .filter(|(_, m)| m.contains_key(node))
            .map(|(op, _)| *op)
            .collect();
        for m in self.remote.values_mut() {
            m.remove(node);
        }
        for (OperatorId(op), all, idle) in counts {
            if all > 0 {
                self.remote
                    .entry(op)
                    .or_default()
                    .insert(node.to_string(), (all, idle));
                touched.insert(op);
            }
        }
        for op in touched {
            self.refresh_remote(op, now);
        }
        self.settle(now);
    }

    /// This node's connections per operator: (operator, all, idle).
    pub fn local_counts(&self) -> Vec<(OperatorId, u32, u32)> {
        self.operators
            .iter()
            .filter(|(_, o)| o.presence.local_connections() > 0)
            .map(|(id, o)| {
                (
                    OperatorId(*id),
                    o.presence.local_connections(),
                    o.presence.local_idle(),
                )
            })
            .collect()
    }

    /// Replaces every remote count (resync after an interruption).
    pub fn replace_remote(
        &mut self,
        nodes: HashMap<String, Vec<(OperatorId, u32, u32)>>,
        now: Instant,
    ) {
        let mut touched: BTreeSet<u64> = self.remote.keys().copied().collect();
        self.remote.clear();
        for (node, counts) in nodes {
            for (OperatorId(op), all, idle) in counts {
                if all > 0 {
                    self.remote
                        .entry(op)
                        .or_default()
                        .insert(node.clone(), (all, idle));
                    touched.insert(op);
                }
            }
        }
        for op in touched {
            self.refresh_remote(op, now);
        }
        self.settle(now);
    }

    /// A node's lease expired: its connections stop counting (the grace then applies).
    pub fn drop_node(&mut self, node: &str, now: Instant) {
        let ops: Vec<u64> = self
            .remote
            .iter()
            .filter(|(_, m)| m.contains_key(node))
            .map(|(op, _)| *op)
            .collect();
        for op in ops {
            if let Some(m) = self.remote.get_mut(&op) {
                m.remove(node);
            }
            self.refresh_remote(op, now);
        }
        self.settle(now);
    }

    fn refresh_remote(&mut self, op: u64, now: Instant) {
        self.refresh_remote_with(op, false, now);
    }

    fn refresh_remote_with(&mut self, op: u64, logout: bool, now: Instant) {
        let (all, idle) = self
            .remote
            .get(&op)
            .map(|m| m.values().fold((0, 0), |(a, i), (x, y)| (a + x, i + y)))
            .unwrap_or((0, 0));
        if self.remote.get(&op).is_some_and(|m| m.is_empty()) {
            self.remote.remove(&op);
        }
        let grace = self.cfg.presence.disconnect_grace;
        if let Some(o) = self.operators.get_mut(&op) {
            if let Some(at) = o.presence.set_remote(all, idle, logout, now, grace) {
                self.timers.push(Timer::GraceEnd { operator: op, at });
            }
            self.dirty_ops.insert(op);
        }
    }

    /// The version of an operator's record as this node holds it.
    pub fn operator_version(&self, id: u64) -> Option<u64> {
        self.operators.get(&id).map(|o| o.version)
    }

    /// Another node changed (or deleted) an operator; an older copy than ours is ignored.
    pub fn apply_operator(&mut self, id: u64, record: Option<StoredOperator>, now: Instant) {
        match record {
            Some(o)
                if self
                    .operators
                    .get(&id)
                    .is_none_or(|x| x.version < o.version) =>
            {
                let change = SettingsChange {
                    online: Some(o.settings.online),
                    invisible: Some(o.settings.invisible),
                    always_online: Some(o.settings.always_online),
                };
                self.put_operator_at(o.record, change, o.version, now);
                self.refresh_remote(id, now);
                self.settle(now);
            }
            Some(_) => {}
            None => {
                if self.operators.contains_key(&id) {
                    let _ = self.delete_operator(id, now);
                }
            }
        }
        // The record is already in the store; what it set off here (assignments on the
        // assigning node) is not, and must be written.
        self.writes.retain(|w| match w {
            Write::Operator { op, .. } => op.record.id != id,
            Write::DeleteOperator(d) => d.0 != id,
            _ => true,
        });
    }

    pub fn apply_department(&mut self, dept: Department, now: Instant) {
        if self
            .departments
            .get(&dept.id)
            .is_none_or(|d| d.version < dept.version)
        {
            let id = dept.id;
            self.put_department(dept, now);
            self.writes
                .retain(|w| !matches!(w, Write::Department { dept, .. } if dept.id == id));
        }
    }

    /// Nodes whose connections count here.
    pub fn remote_nodes(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.remote.values().flat_map(|m| m.keys()).collect();
        set.into_iter().cloned().collect()
    }

    /// Cluster: the assigning node changed a chat; an older copy than ours is ignored.
    pub fn apply_chat(&mut self, chat: Chat, now: Instant) {
        let id = chat.id;
        match self.chats.get(&id) {
            Some(e) if e.chat.version >= chat.version => {}
            Some(e) => {
                let assigned = chat.assign_reason.filter(|_| {
                    chat.owner.is_some()
                        && (e.chat.owner != chat.owner || e.chat.assigned_at != chat.assigned_at)
                });
                let incoming = chat.clone();
                // Only the mirrored write and note go: what `settle` sets off below (an
                // assignment, on the assigning node) must be written and told.
                let (writes, notes) = (self.writes.len(), self.notes.len());
                self.transition(id, |c| *c = incoming);
                self.writes.truncate(writes);
                self.notes.truncate(notes);
                // The writer's version, not a new local one: its next change must apply.
                if let Some(e) = self.chats.get_mut(&id) {
                    e.chat.version = chat.version;
                }
                if let (Some(reason), Some(owner)) = (assigned, chat.owner) {
                    let frame = Event::ChatAssigned {
                        chat: &chat_raw(&chat),
                        reason,
                    }
                    .frame();
                    self.send_to_operator(owner, &frame);
                }
                self.settle(now);
            }
            // A closed chat this node never saw open, or an open copy of one it saw close
            // (older than the close): nothing live to change.
            None if chat.status == ChatStatus::Closed || self.closed_lately(id) => {
                self.next_chat_id = self.next_chat_id.max(id.saturating_add(1));
            }
            None => {
                self.add_chat(chat, VecDeque::new());
                self.dirty_depts.insert(self.chats[&id].chat.department);
                self.emit_chat(id);
                self.settle(now);
            }
        }
    }

    /// Cluster: a message written on another node.
    pub fn apply_message(&mut self, chat: u64, message: ChatMessage, origin: Option<Origin>) {
        let known = self
            .chats
            .get(&chat)
            .is_some_and(|e| e.history.back().is_none_or(|m| m.id < message.id));
        if known {
            self.keep_message(chat, message.clone());
            self.deliver_message(chat, &message, origin.as_ref());
        }
        self.writes
            .retain(|w| !matches!(w, Write::TrimMessages { chat: c, .. } if c.0 == chat));
    }

    /// Ids of the chats this node holds live (resync finds those closed meanwhile).
    pub fn live_chat_ids(&self) -> Vec<u64> {
        self.chats.keys().copied().collect()
    }

    /// Cluster resync: replaces a chat's history with what the store holds.
    pub fn apply_history(&mut self, chat: u64, messages: Vec<ChatMessage>) {
        if let Some(e) = self.chats.get_mut(&chat)
            && messages.last().map(|m| m.id) > e.history.back().map(|m| m.id)
        {
            e.next_message = messages.last().map_or(1, |m| m.id + 1);
            e.history = messages.into();
        }
    }
}

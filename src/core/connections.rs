//! Sockets: operators' connections (counted in their presence, with `hello` on connect, the
//! disconnect grace and activity), widgets subscribed to departments and visitors of a chat.

use super::*;

impl Core {
    /// Checks a visitor's token before the upgrade.
    pub fn check_visitor(&self, chat: u64, token: &str) -> Result<()> {
        let e = self.chats.get(&chat).ok_or_else(|| unknown_chat(chat))?;
        if constant_time_eq(e.chat.visitor_token.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(Error::Forbidden("wrong visitor token for this chat".into()))
        }
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

    pub(super) fn hello(&self, id: u64) -> Frame {
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
        // The views are most of it; departments and chats are small objects.
        let size = me.get().len()
            + operators.iter().map(|v| v.get().len() + 1).sum::<usize>()
            + 96 * departments.len()
            + 256 * chats.len()
            + 96;
        Event::Hello {
            operator: &me,
            operators: &operators,
            departments: &departments,
            chats: &chats,
        }
        .frame_with_capacity(size)
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

    pub fn disconnect_visitor(&mut self, chat: u64, conn: ConnId) {
        if let Some(e) = self.chats.get_mut(&chat) {
            e.visitors.remove(&conn);
        }
    }

    pub(super) fn visitor_frame(&self, chat: u64) -> Result<Frame> {
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
}

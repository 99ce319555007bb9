//! The chat book: chats not closed, with their history, watchers and visitors; creating,
//! handing over, opening, closing and messages. `transition` is the one path that changes a
//! chat's owner or status and keeps the counts, the queue and the store in step (`count`); a
//! closed chat leaves live state at once (`evict_chat`).

use super::*;

impl Core {
    /// A chat that is not closed (closed ones live in the store only).
    pub fn live_chat(&self, id: u64) -> Option<Chat> {
        self.chats.get(&id).map(|e| e.chat.clone())
    }

    fn chat_answer(&self, id: u64) -> Result<ChatAnswer> {
        let e = self.chats.get(&id).ok_or_else(|| unknown_chat(id))?;
        Ok(ChatAnswer::Chat {
            chat: e.chat.clone(),
        })
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

    pub fn create_chat(&mut self, req: NewChat, now: Instant) -> Result<ChatAnswer> {
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
        let chat = self
            .chats
            .get(&id)
            .ok_or_else(|| unknown_chat(id))?
            .chat
            .clone();
        Ok(ChatAnswer::Created {
            chat,
            visitor_token: token,
        })
    }

    /// Takes in a chat that is not known yet (loaded, created, or replicated).
    pub(super) fn add_chat(&mut self, chat: Chat, history: VecDeque<ChatMessage>) {
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
    pub fn hand_over(&mut self, id: u64, now: Instant) -> Result<ChatAnswer> {
        let e = self.chats.get(&id).ok_or_else(|| unknown_chat(id))?;
        if e.chat.status != ChatStatus::Bot {
            return Err(Error::Conflict(
                format!("chat {id} is {:?}, not a bot chat", e.chat.status).to_lowercase(),
            ));
        }
        self.transition(id, |c| c.status = ChatStatus::Pending);
        self.settle(now);
        self.chat_answer(id)
    }

    /// Closes a chat: by its owner, or by the back end.
    pub fn close_chat(&mut self, actor: Actor, id: u64, now: Instant) -> Result<ChatAnswer> {
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
        Ok(ChatAnswer::Chat { chat: closed })
    }

    /// `open_chat`: the seed's opening rules; the opener watches the chat from now on.
    pub fn open_chat(&mut self, me: u64, id: u64, now: Instant) -> Result<ChatAnswer> {
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
        Ok(ChatAnswer::Opened {
            chat: e.chat.clone(),
            messages: e.history.iter().cloned().collect(),
        })
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
    ) -> Result<ChatAnswer> {
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
        Ok(ChatAnswer::Sent { message })
    }

    pub fn visitor_message(
        &mut self,
        id: u64,
        text: String,
        origin: Option<Origin>,
    ) -> Result<ChatAnswer> {
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
        Ok(ChatAnswer::Sent { message })
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
        self.writes
            .push(Write::Message(ChatId(id), message.clone()));
        let frame = Event::Message {
            chat: id,
            message: &message,
        }
        .frame();
        self.log(EventType::Message, &frame, None);
        self.keep_message(id, message.clone());
        if self.cluster {
            self.notes.push(Note::Message {
                chat: ChatId(id),
                message: message.clone(),
                origin: origin.clone(),
            });
        }
        self.deliver_message(id, &message, origin.as_ref());
        message
    }

    /// Adds a message to the chat's history, dropping the oldest past `chats.history`.
    pub(super) fn keep_message(&mut self, id: u64, message: ChatMessage) {
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
                    chat: ChatId(id),
                    below: first.id,
                });
            }
        }
    }

    /// Sends a message to the owner's and the watchers' sockets on this node, and to the
    /// visitors unless it is a whisper; never back to the socket it came from.
    pub(super) fn deliver_message(
        &mut self,
        id: u64,
        message: &ChatMessage,
        origin: Option<&Origin>,
    ) {
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

    pub(super) fn requeued(&mut self, id: u64, reason: AssignReason) {
        if let Some(e) = self.chats.get_mut(&id) {
            e.requeued = Some(reason);
            self.to_assign.insert(e.chat.department);
        }
    }

    /// The one path that changes a chat's owner or status: keeps every count, the queue and
    /// the store in step, and tells the department.
    pub(super) fn transition(&mut self, id: u64, f: impl FnOnce(&mut Chat)) {
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

    /// Runs a chat change; the answer is what the client is acknowledged with.
    pub fn exec(&mut self, op: ChatOp, now: Instant) -> Result<ChatAnswer> {
        match op {
            ChatOp::Create { req } => self.create_chat(req, now),
            ChatOp::HandOver { chat } => self.hand_over(chat.0, now),
            ChatOp::Close { by, chat } => {
                let actor = by.map_or(Actor::Backend, |o| Actor::Operator(o.0));
                self.close_chat(actor, chat.0, now)
            }
            ChatOp::Open { me, chat } => self.open_chat(me.0, chat.0, now),
            ChatOp::Message {
                me,
                chat,
                text,
                whisper,
                origin,
            } => self.operator_message(me.0, chat.0, text, whisper, origin, now),
            ChatOp::VisitorMessage { chat, text, origin } => {
                self.visitor_message(chat.0, text, origin)
            }
        }
    }
}

/// Closed chat ids remembered against stale copies (a few hundred KiB at most).
const RECENTLY_CLOSED: usize = 10_000;

/// Largest chat id: the largest integer JavaScript clients read exactly.
const MAX_CHAT_ID: u64 = (1 << 53) - 1;

fn check_text(text: &str) -> Result<()> {
    if text.trim().is_empty() {
        return Err(Error::bad("text must not be empty"));
    }
    Ok(())
}

fn random_token() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

//! Views and fan-out: the operator and department views (what `dept_state` decides, queries of
//! the API), publishing what changed to the sockets that should hear it (serialized once per
//! change), and the events logged to the feed with the change's writes.

use super::*;

impl Core {
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
    pub(super) fn view_raw(&self, op: &Operator) -> Box<RawValue> {
        op.view_json
            .clone()
            .unwrap_or_else(|| raw(&self.view_of(op)))
    }

    pub(super) fn view_of(&self, op: &Operator) -> OperatorView {
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

    pub fn department_view(&self, id: u64) -> DepartmentView {
        let state = self.dept_state(id);
        let counts = self.counts.get(&id).copied().unwrap_or_default();
        let members = self.members.get(&id);
        DepartmentView {
            department: self.department(id),
            online: state.online,
            reason: state.reason,
            operators: members.map_or(0, |m| m.len()),
            operators_online: members
                .map_or(0, |m| m.iter().filter(|o| self.is_online(**o)).count()),
            pending_chats: counts.pending,
            queued_chats: self.queues.get(&id).map_or(0, |q| q.len()),
            active_chats: counts.active,
            bot_chats: counts.bot,
            opens_at: (state.reason == DeptReason::Closed).then(|| state.opens_at_rfc3339()),
        }
    }

    /// A node that starts assigning in a cluster logs the state of every operator and
    /// department: what changed while no node was assigning (an election after a node was
    /// lost) reaches the feed; what did not is dropped by the store (same as last logged).
    pub(super) fn log_every_state(&mut self) {
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
    pub(super) fn log(&mut self, kind: EventType, frame: &Frame, subject: Option<String>) {
        if self.assigner {
            let mut e = LogEvent::new(kind, frame);
            e.subject = subject;
            self.writes.push(Write::Event(e));
        }
    }

    pub(super) fn publish_operator(&mut self, id: u64) {
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

    pub(super) fn publish_department(&mut self, d: u64) {
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

    pub(super) fn emit_chat(&mut self, id: u64) {
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

    pub(super) fn send_to_operator(&mut self, id: u64, frame: &Frame) {
        let Some(op) = self.operators.get(&id) else {
            return;
        };
        for p in &op.peers {
            self.outbox.push((p.clone(), frame.clone()));
        }
    }

    pub(super) fn push(&mut self, peer: &Arc<Peer>, frame: &Frame) {
        self.outbox.push((peer.clone(), frame.clone()));
    }

    /// Operators whose status is online (metrics).
    pub fn online_operators(&self) -> usize {
        self.operators
            .keys()
            .filter(|id| self.is_online(**id))
            .count()
    }
}

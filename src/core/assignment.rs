//! The assignment driver: `settle` follows a change's consequences (status transitions that
//! requeue or trigger assignment), `run_assignment` asks `crate::assign` whom a department's
//! queue goes to, accept deadlines send a chat on, and starting or stopping the assigner role.

use super::*;

impl Core {
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

    /// Follows the consequences of a change until nothing moves: status transitions
    /// requeue or trigger assignment; then publishes changed views and department states.
    pub(super) fn settle(&mut self, now: Instant) {
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

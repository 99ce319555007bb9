//! The directory: operator and department records and who works in or watches each
//! department (the `members` and `watchers` indexes). Putting or deleting an operator,
//! changing settings and putting a department start here; `settle` follows the consequences.

use super::*;

impl Core {
    pub(super) fn known_departments(&self) -> impl Iterator<Item = u64> + '_ {
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

    pub(super) fn is_online(&self, id: u64) -> bool {
        self.operators
            .get(&id)
            .is_some_and(|o| o.presence.status(&o.settings).0 == Status::Online)
    }

    pub(super) fn insert_operator(
        &mut self,
        record: OperatorRecord,
        settings: Settings,
        version: u64,
    ) {
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

    pub(super) fn put_operator_at(
        &mut self,
        record: OperatorRecord,
        change: SettingsChange,
        version: u64,
        now: Instant,
    ) -> (OperatorView, bool) {
        let id = record.id;
        let created = !self.operators.contains_key(&id);
        let base = self.operators.get(&id).map_or(0, |o| o.version);
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
        self.writes.push(Write::Operator {
            op: StoredOperator {
                record,
                settings,
                version,
            },
            base,
        });
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
        self.writes.push(Write::DeleteOperator(OperatorId(id)));
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
            let base = op.version;
            op.version = next_version(op.version);
            let version = op.version;
            self.log_change(actor, target, before, settings, version);
            self.writes.push(Write::Operator {
                op: StoredOperator {
                    record,
                    settings,
                    version,
                },
                base,
            });
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

    pub fn put_department(&mut self, mut dept: Department, now: Instant) -> DepartmentView {
        let id = dept.id;
        if dept.version == 0 {
            dept.version = next_version(self.departments.get(&id).map_or(0, |d| d.version));
        }
        let base = self.departments.get(&id).map_or(0, |d| d.version);
        self.writes.push(Write::Department {
            dept: dept.clone(),
            base,
        });
        self.departments.insert(id, dept);
        self.set_hours(id, now);
        self.dirty_depts.insert(id);
        self.to_assign.insert(id);
        self.settle(now);
        self.department_view(id)
    }
}

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

//! The presence rules of SPEC.md section 2, as plain data: no sockets, no clock reads.
//! The hub calls in with connection events and the current time and schedules the one
//! timer this module asks for (the end of a disconnect grace).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Identifies one live socket within a node.
pub type ConnId = u64;

/// The three persisted settings of an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Takes part in auto-assignment and counts for the widget (`hide_online = 0`).
    pub online: bool,
    /// Opening a pending chat does not take it (`invisible_mode = 1`).
    pub invisible: bool,
    /// "Always online": closing every connection changes nothing (`always_on = 1`).
    pub always_online: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            online: true,
            invisible: false,
            always_online: false,
        }
    }
}

impl Settings {
    /// Online & Invisible: auto-assigned chats never turn active when opened.
    pub fn misconfigured(&self) -> bool {
        self.online && self.invisible
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Online,
    Offline,
}

/// Why an operator is offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    SetOffline,
    Inactive,
    Disconnected,
    LoggedOut,
}

/// Live state of one operator: their connections on every node and the disconnect grace.
#[derive(Debug, Clone, Default)]
pub struct Presence {
    /// Local connections and whether each last reported the operator active.
    conns: Vec<(ConnId, bool)>,
    /// Connections held by other nodes of a cluster: (all, idle).
    remote: (u32, u32),
    /// Set while the last connection closed less than the grace ago.
    grace_until: Option<Instant>,
    /// The last connection ended with a `logout` rather than a disconnect.
    logged_out: bool,
}

impl Presence {
    pub fn connect(&mut self, id: ConnId) {
        self.conns.push((id, true));
        self.grace_until = None;
        self.logged_out = false;
    }

    /// A connection closed. When it was the last one, the grace starts and its end is
    /// returned for the caller to call [`Presence::expire_grace`] then.
    pub fn disconnect(&mut self, id: ConnId, now: Instant, grace: Duration) -> Option<Instant> {
        // An inactive operator is already offline: a grace would show them online again.
        let was_inactive = self.inactive();
        if !self.remove(id) || self.connections() > 0 {
            return None;
        }
        self.logged_out = false;
        if grace.is_zero() || was_inactive {
            self.grace_until = None;
            return None;
        }
        let until = now + grace;
        self.grace_until = Some(until);
        Some(until)
    }

    /// `logout`: like a disconnect without the grace.
    pub fn logout(&mut self, id: ConnId) {
        if self.remove(id) && self.connections() == 0 {
            self.grace_until = None;
            self.logged_out = true;
        }
    }

    /// Records an `activity` report (or an inactivity timeout); true when it changed.
    pub fn set_active(&mut self, id: ConnId, active: bool) -> bool {
        match self.conns.iter_mut().find(|(c, _)| *c == id) {
            Some((_, a)) if *a != active => {
                *a = active;
                true
            }
            _ => false,
        }
    }

    /// Ends the grace if its time has come; true when it ended.
    pub fn expire_grace(&mut self, now: Instant) -> bool {
        match self.grace_until {
            Some(until) if until <= now => {
                self.grace_until = None;
                true
            }
            _ => false,
        }
    }

    /// Connections of other nodes (cluster); a change may start or end the grace like a
    /// local one (`logout`: the last one ended with a logout, no grace). Returns the grace
    /// end to schedule, if one started.
    pub fn set_remote(
        &mut self,
        all: u32,
        idle: u32,
        logout: bool,
        now: Instant,
        grace: Duration,
    ) -> Option<Instant> {
        let before = self.connections();
        let was_inactive = self.inactive();
        self.remote = (all, idle.min(all));
        let after = self.connections();
        if after > 0 {
            self.grace_until = None;
            self.logged_out = false;
        } else if logout {
            // Also ends a grace another node's full state started before this note came.
            self.grace_until = None;
            self.logged_out = true;
        } else if before > 0 && !grace.is_zero() && !was_inactive {
            let until = now + grace;
            self.grace_until = Some(until);
            return Some(until);
        }
        None
    }

    pub fn local_connections(&self) -> u32 {
        self.conns.len() as u32
    }

    /// Local connections that last reported the operator idle.
    pub fn local_idle(&self) -> u32 {
        self.conns.iter().filter(|(_, a)| !a).count() as u32
    }

    pub fn connections(&self) -> u32 {
        self.local_connections() + self.remote.0
    }

    /// Inactive only while every connection last said `active: false`.
    pub fn inactive(&self) -> bool {
        self.connections() > 0 && self.local_idle() + self.remote.1 == self.connections()
    }

    /// The last connection ended with a `logout`.
    pub fn logged_out(&self) -> bool {
        self.logged_out && self.connections() == 0
    }

    pub fn in_grace(&self) -> bool {
        self.grace_until.is_some()
    }

    /// The rule: online when `online && !inactive && (connections > 0 || always_online)`,
    /// where a connection closed less than the grace ago still counts.
    pub fn status(&self, s: &Settings) -> (Status, Option<Reason>) {
        let present = self.connections() > 0 || self.in_grace() || s.always_online;
        if s.online && !self.inactive() && present {
            return (Status::Online, None);
        }
        let reason = if !s.online {
            Reason::SetOffline
        } else if self.inactive() {
            Reason::Inactive
        } else if self.logged_out {
            Reason::LoggedOut
        } else {
            Reason::Disconnected
        };
        (Status::Offline, Some(reason))
    }

    fn remove(&mut self, id: ConnId) -> bool {
        let before = self.conns.len();
        self.conns.retain(|(c, _)| *c != id);
        self.conns.len() != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GRACE: Duration = Duration::from_secs(5);

    fn settings(online: bool, always_online: bool) -> Settings {
        Settings {
            online,
            invisible: false,
            always_online,
        }
    }

    #[test]
    fn status_online_needs_setting_activity_and_presence() {
        let mut p = Presence::default();
        assert_eq!(
            p.status(&settings(true, false)),
            (Status::Offline, Some(Reason::Disconnected))
        );
        assert_eq!(p.status(&settings(true, true)).0, Status::Online);
        assert_eq!(
            p.status(&settings(false, true)),
            (Status::Offline, Some(Reason::SetOffline))
        );
        p.connect(1);
        assert_eq!(p.status(&settings(true, false)).0, Status::Online);
        assert_eq!(
            p.status(&settings(false, false)),
            (Status::Offline, Some(Reason::SetOffline))
        );
    }

    #[test]
    fn grace_keeps_online_until_it_expires() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        p.connect(1);
        let until = p.disconnect(1, t0, GRACE).expect("grace starts");
        assert_eq!(until, t0 + GRACE);
        assert_eq!(p.status(&settings(true, false)).0, Status::Online);
        assert!(!p.expire_grace(t0 + GRACE - Duration::from_millis(1)));
        assert!(p.expire_grace(until));
        assert_eq!(
            p.status(&settings(true, false)),
            (Status::Offline, Some(Reason::Disconnected))
        );
    }

    #[test]
    fn grace_reconnect_inside_cancels_it() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        p.connect(1);
        p.disconnect(1, t0, GRACE);
        p.connect(2);
        assert!(!p.expire_grace(t0 + GRACE), "a reconnect cancels the grace");
        assert_eq!(p.status(&settings(true, false)).0, Status::Online);
    }

    #[test]
    fn grace_only_when_last_connection_closes() {
        let mut p = Presence::default();
        p.connect(1);
        p.connect(2);
        assert_eq!(p.disconnect(1, Instant::now(), GRACE), None);
        assert_eq!(p.connections(), 1);
    }

    #[test]
    fn logout_is_immediate() {
        let mut p = Presence::default();
        p.connect(1);
        p.logout(1);
        assert_eq!(
            p.status(&settings(true, false)),
            (Status::Offline, Some(Reason::LoggedOut))
        );
        p.connect(2);
        assert_eq!(p.status(&settings(true, false)).0, Status::Online);
    }

    #[test]
    fn always_online_survives_disconnect() {
        let mut p = Presence::default();
        p.connect(1);
        p.disconnect(1, Instant::now(), GRACE);
        p.expire_grace(Instant::now() + GRACE);
        assert_eq!(p.status(&settings(true, true)).0, Status::Online);
    }

    #[test]
    fn inactivity_needs_every_connection_idle() {
        let mut p = Presence::default();
        p.connect(1);
        p.connect(2);
        assert!(p.set_active(1, false));
        assert!(!p.set_active(1, false), "no change, no event");
        assert_eq!(p.status(&settings(true, false)).0, Status::Online);
        p.set_active(2, false);
        assert_eq!(
            p.status(&settings(true, false)),
            (Status::Offline, Some(Reason::Inactive))
        );
        p.connect(3);
        assert_eq!(
            p.status(&settings(true, false)).0,
            Status::Online,
            "a new tab is active"
        );
    }

    #[test]
    fn misconfigured_is_online_and_invisible() {
        assert!(
            Settings {
                online: true,
                invisible: true,
                always_online: false
            }
            .misconfigured()
        );
        assert!(
            !Settings {
                online: false,
                invisible: true,
                always_online: false
            }
            .misconfigured()
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Connect,
        Disconnect(usize),
        Logout(usize),
        Active(usize, bool),
        Advance(u64),
        Set(bool, bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Connect),
            (0..4usize).prop_map(Op::Disconnect),
            (0..4usize).prop_map(Op::Logout),
            (0..4usize, any::<bool>()).prop_map(|(i, a)| Op::Active(i, a)),
            (0..8000u64).prop_map(Op::Advance),
            (any::<bool>(), any::<bool>()).prop_map(|(o, a)| Op::Set(o, a)),
        ]
    }

    proptest! {
        /// For any sequence of connects, disconnects, setting changes and clock advances the
        /// derived status equals the rule of SPEC.md section 2 computed from scratch, and a
        /// disconnect followed by a reconnect inside the grace never shows an offline.
        #[test]
        fn grace_property_status_matches_rule_without_flaps(ops in proptest::collection::vec(op(), 1..60)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut p = Presence::default();
            let mut s = settings(true, false);
            let mut next = 0u64;
            // Reference model: live connections with their activity, and when the last one
            // closed by a disconnect (not a logout).
            let mut conns: Vec<(u64, bool)> = Vec::new();
            let mut last_close: Option<Instant> = None;
            let mut timer: Option<Instant> = None;
            for op in ops {
                match op {
                    Op::Connect => {
                        next += 1;
                        p.connect(next);
                        conns.push((next, true));
                        last_close = None;
                        timer = None;
                    }
                    Op::Disconnect(i) | Op::Logout(i) if i < conns.len() => {
                        let (id, _) = conns.remove(i);
                        if matches!(op, Op::Logout(_)) {
                            p.logout(id);
                            if conns.is_empty() { last_close = None; timer = None; }
                        } else if let Some(until) = p.disconnect(id, now, GRACE) {
                            timer = Some(until);
                            last_close = Some(now);
                        }
                    }
                    Op::Active(i, a) if i < conns.len() => {
                        conns[i].1 = a;
                        p.set_active(conns[i].0, a);
                    }
                    Op::Advance(ms) => {
                        now += Duration::from_millis(ms);
                        if timer.is_some_and(|t| t <= now) {
                            p.expire_grace(now);
                            timer = None;
                        }
                    }
                    Op::Set(online, always) => s = settings(online, always),
                    _ => {}
                }
                let inactive = !conns.is_empty() && conns.iter().all(|(_, a)| !a);
                let in_grace = conns.is_empty() && last_close.is_some_and(|t| now < t + GRACE);
                let expected = s.online && !inactive && (!conns.is_empty() || in_grace || s.always_online);
                let got = p.status(&s).0 == Status::Online;
                // `expected` counts a connection closed inside the grace as present, so
                // equality is also the no-flap property.
                prop_assert_eq!(got, expected);
            }
        }
    }
}

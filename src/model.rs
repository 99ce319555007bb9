//! The hub's records (operators, departments, chats, messages) and the views clients see.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::Strategy;
use crate::presence::{Reason, Settings, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    ChangeOnlineStatus,
    ChangeVisibility,
    ChangeAlwaysOnline,
    /// Change other operators' settings.
    SetOperatorStatus,
    /// Open chats assigned to someone else.
    OpenAll,
}

/// What the platform's back end says about an operator (`PUT /api/v1/operators/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorRecord {
    pub id: u64,
    pub name: String,
    /// Departments the operator works in: counts toward their online state, receives chats.
    pub departments: Vec<u64>,
    /// Departments the operator only watches (supervisor): never online or assigned there.
    pub watch_departments: Vec<u64>,
    pub permissions: Vec<Permission>,
    /// Auto-assignment capacity; 0 = the department's default.
    pub max_chats: u32,
    pub exclude_autoassign: bool,
    pub auto_accept: bool,
}

impl OperatorRecord {
    pub fn can(&self, p: Permission) -> bool {
        self.permissions.contains(&p)
    }

    pub fn works_in(&self, dept: u64) -> bool {
        self.departments.contains(&dept)
    }

    pub fn watches(&self, dept: u64) -> bool {
        self.watch_departments.contains(&dept)
    }

    /// Departments the operator works in or watches, without repeats.
    pub fn all_departments(&self) -> impl Iterator<Item = u64> + '_ {
        let extra = self
            .watch_departments
            .iter()
            .filter(|d| !self.departments.contains(d));
        self.departments.iter().chain(extra).copied()
    }
}

/// An operator as persisted: the record and the three settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredOperator {
    #[serde(flatten)]
    pub record: OperatorRecord,
    #[serde(flatten)]
    pub settings: Settings,
    /// Grows with every change (microseconds, at least the previous + 1), so a node never
    /// applies an older copy over a newer one.
    #[serde(default)]
    pub version: u64,
}

/// The flat operator view of SPEC.md section 2 (HTTP answers, `hello`, `operator_status`).
/// Serialized by hand as one flat struct (the same JSON as the flattened parts would give):
/// it is serialized on every connect and disconnect, and `flatten` goes through serde's map
/// path, about twice the work.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OperatorView {
    #[serde(flatten)]
    pub record: OperatorRecord,
    #[serde(flatten)]
    pub settings: Settings,
    pub connections: u32,
    pub inactive: bool,
    pub active_chats: u32,
    pub pending_chats: u32,
    pub status: Status,
    pub status_reason: Option<Reason>,
    pub misconfigured: bool,
}

impl Serialize for OperatorView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        // Destructured: a field added to a part fails to compile here until it is written.
        let OperatorRecord {
            id,
            name,
            departments,
            watch_departments,
            permissions,
            max_chats,
            exclude_autoassign,
            auto_accept,
        } = &self.record;
        let Settings {
            online,
            invisible,
            always_online,
        } = &self.settings;
        let mut m = s.serialize_struct("OperatorView", 18)?;
        m.serialize_field("id", id)?;
        m.serialize_field("name", name)?;
        m.serialize_field("departments", departments)?;
        m.serialize_field("watch_departments", watch_departments)?;
        m.serialize_field("permissions", permissions)?;
        m.serialize_field("max_chats", max_chats)?;
        m.serialize_field("exclude_autoassign", exclude_autoassign)?;
        m.serialize_field("auto_accept", auto_accept)?;
        m.serialize_field("online", online)?;
        m.serialize_field("invisible", invisible)?;
        m.serialize_field("always_online", always_online)?;
        m.serialize_field("connections", &self.connections)?;
        m.serialize_field("inactive", &self.inactive)?;
        m.serialize_field("active_chats", &self.active_chats)?;
        m.serialize_field("pending_chats", &self.pending_chats)?;
        m.serialize_field("status", &self.status)?;
        m.serialize_field("status_reason", &self.status_reason)?;
        m.serialize_field("misconfigured", &self.misconfigured)?;
        m.end()
    }
}

/// Department settings (`PUT /api/v1/departments/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Department {
    pub id: u64,
    pub name: String,
    /// Always offline.
    pub disabled: bool,
    pub assignment: Strategy,
    /// Default capacity of its operators.
    pub max_chats: u32,
    /// Re-assign a chat not accepted within this; zero = never.
    #[serde(with = "duration_str")]
    pub accept_timeout: Duration,
    /// Pending chats at which the widget turns offline (`queue_full`); 0 = unlimited.
    pub pending_max: u32,
    /// A bot answers when no operator is online.
    pub bot: bool,
    /// Online hours; None = always open. Validated before it is accepted.
    #[serde(default)]
    pub hours: Option<crate::hours::Hours>,
    /// Grows with every change, like [`StoredOperator::version`].
    #[serde(default)]
    pub version: u64,
}

impl Department {
    /// A department referred to but never set: the config file's defaults.
    pub fn with_defaults(id: u64, a: &crate::config::Assignment) -> Department {
        Department {
            id,
            name: String::new(),
            disabled: false,
            assignment: a.strategy,
            max_chats: a.default_max_chats,
            accept_timeout: a.accept_timeout,
            pending_max: 0,
            bot: false,
            hours: None,
            version: 0,
        }
    }
}

/// Why a department is online or offline for the widget (SPEC.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeptReason {
    Disabled,
    /// Outside its online hours.
    Closed,
    QueueFull,
    Operators,
    Bot,
    None,
}

/// A department's state for the widget. `opens_at` is on the wire only with reason `closed`
/// (RFC 3339, or null when it never opens again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeptState {
    pub department: u64,
    pub online: bool,
    pub reason: DeptReason,
    /// Closed only: the next opening in milliseconds since the epoch; None = never.
    pub opens_at: Option<i64>,
}

impl DeptState {
    /// `opens_at` as RFC 3339 (closed departments only).
    pub fn opens_at_rfc3339(&self) -> Option<String> {
        let ms = u64::try_from(self.opens_at?).ok()?;
        Some(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)))
    }
}

impl Serialize for DeptState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let closed = self.reason == DeptReason::Closed;
        let mut st = s.serialize_struct("DeptState", 3 + usize::from(closed))?;
        st.serialize_field("department", &self.department)?;
        st.serialize_field("online", &self.online)?;
        st.serialize_field("reason", &self.reason)?;
        if closed {
            st.serialize_field("opens_at", &self.opens_at_rfc3339())?;
        }
        st.end()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatStatus {
    Bot,
    Pending,
    Active,
    Closed,
}

/// A chat as kept and persisted. The wire form is [`ChatView`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chat {
    pub id: u64,
    pub department: u64,
    pub status: ChatStatus,
    pub owner: Option<u64>,
    pub priority: i64,
    pub visitor: serde_json::Value,
    pub created_at: String,
    pub assigned_at: Option<String>,
    pub accepted_at: Option<String>,
    /// Creation order: "oldest first" within a priority, stable across restarts.
    pub seq: u64,
    pub visitor_token: String,
    /// The owner an `accept_timeout` took the chat from: the next assignment avoids them.
    #[serde(default)]
    pub avoid: Option<u64>,
    /// Why auto-assignment gave the chat to its owner; None when the owner took it.
    #[serde(default)]
    pub assign_reason: Option<AssignReason>,
    /// Grows with every change, like [`StoredOperator::version`].
    #[serde(default)]
    pub version: u64,
}

/// The wire form of a chat for operators and the back end.
#[derive(Debug, Serialize)]
pub struct ChatView<'a> {
    pub id: u64,
    pub department: u64,
    pub status: ChatStatus,
    pub owner: Option<u64>,
    pub priority: i64,
    pub visitor: &'a serde_json::Value,
    pub created_at: &'a str,
    pub assigned_at: Option<&'a str>,
    pub accepted_at: Option<&'a str>,
}

impl Chat {
    pub fn view(&self) -> ChatView<'_> {
        ChatView {
            id: self.id,
            department: self.department,
            status: self.status,
            owner: self.owner,
            priority: self.priority,
            visitor: &self.visitor,
            created_at: &self.created_at,
            assigned_at: self.assigned_at.as_deref(),
            accepted_at: self.accepted_at.as_deref(),
        }
    }
}

/// What a visitor sees of their chat: its status and the owner's name, never watchers.
#[derive(Debug, Serialize)]
pub struct VisitorChatView<'a> {
    pub id: u64,
    pub status: ChatStatus,
    pub owner_name: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SenderKind {
    Operator,
    Visitor,
    System,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sender {
    pub kind: SenderKind,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub id: u64,
    pub from: Sender,
    pub text: String,
    pub whisper: bool,
    pub at: String,
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// Durations as the config writes them (`"60s"`).
pub mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        // Whole seconds as "60s", otherwise milliseconds: the form the config uses.
        let text = if d.subsec_nanos() == 0 {
            format!("{}s", d.as_secs())
        } else {
            format!("{}ms", d.as_millis())
        };
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        crate::config::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// The next version of a record: the clock in microseconds, but always past `prev`.
pub fn next_version(prev: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    now.max(prev + 1)
}

/// Why a chat was given to its owner (`chat_assigned`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssignReason {
    Auto,
    AcceptTimeout,
    OperatorUnavailable,
}

/// Ids that cross modules, typed so that an operator id is never passed as a chat id. On the
/// wire they are plain numbers.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl From<u64> for $name {
            fn from(id: u64) -> Self {
                $name(id)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// An operator (the platform's user id).
    OperatorId
);
id_type!(
    /// A chat.
    ChatId
);
id_type!(
    /// A department.
    DeptId
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The view as `#[serde(flatten)]` of its parts writes it: the reference of the
    /// hand-written serializer.
    #[derive(Serialize)]
    struct Flattened<'a> {
        #[serde(flatten)]
        record: &'a OperatorRecord,
        #[serde(flatten)]
        settings: &'a Settings,
        connections: u32,
        inactive: bool,
        active_chats: u32,
        pending_chats: u32,
        status: Status,
        status_reason: Option<Reason>,
        misconfigured: bool,
    }

    fn view(reason: Option<Reason>) -> OperatorView {
        OperatorView {
            record: OperatorRecord {
                id: 7,
                name: "Ann \"A\" \u{e9}".into(),
                departments: vec![1, 2],
                watch_departments: vec![3],
                permissions: vec![Permission::ChangeOnlineStatus, Permission::OpenAll],
                max_chats: 4,
                exclude_autoassign: true,
                auto_accept: false,
            },
            settings: Settings {
                online: true,
                invisible: false,
                always_online: true,
            },
            connections: 2,
            inactive: true,
            active_chats: 1,
            pending_chats: 3,
            status: Status::Online,
            status_reason: reason,
            misconfigured: false,
        }
    }

    #[test]
    fn operator_view_serializes_flat_like_its_flattened_parts() {
        for reason in [None, Some(Reason::SetOffline)] {
            let v = view(reason);
            let reference = Flattened {
                record: &v.record,
                settings: &v.settings,
                connections: v.connections,
                inactive: v.inactive,
                active_chats: v.active_chats,
                pending_chats: v.pending_chats,
                status: v.status,
                status_reason: v.status_reason,
                misconfigured: v.misconfigured,
            };
            let ours = serde_json::to_string(&v).unwrap();
            assert_eq!(ours, serde_json::to_string(&reference).unwrap());
            assert_eq!(
                serde_json::to_value(&v).unwrap(),
                serde_json::to_value(&reference).unwrap()
            );
            let back: OperatorView = serde_json::from_str(&ours).unwrap();
            assert_eq!(back, v);
        }
    }
}

//! The names of the feed's event types, shared by the feed and the webhook configuration.

use serde::{Deserialize, Serialize};

/// The kinds of event in the log (the `type` of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    OperatorStatus,
    DepartmentStatus,
    Chat,
    ChatAssigned,
    Message,
    Session,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        EventType::OperatorStatus,
        EventType::DepartmentStatus,
        EventType::Chat,
        EventType::ChatAssigned,
        EventType::Message,
        EventType::Session,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::OperatorStatus => "operator_status",
            EventType::DepartmentStatus => "department_status",
            EventType::Chat => "chat",
            EventType::ChatAssigned => "chat_assigned",
            EventType::Message => "message",
            EventType::Session => "session",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

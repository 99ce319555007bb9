//! The event feed of the platform's back end: every change the hub makes, as one ordered
//! log of events. The core emits a [`LogEvent`] beside the records of each change; the store
//! writes both in one step (a redb transaction, or one MULTI/EXEC with a Redis Stream `XADD`)
//! and gives the event its id. This module holds the types both sides share and the rules
//! of a query (positions, type filters, pages).

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::protocol::Frame;

pub use crate::event_type::EventType;

/// A `types` filter; empty = every type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Types(BTreeSet<EventType>);

impl Types {
    /// Parses `chat,chat_assigned`; an unknown name is an error that names it.
    pub fn parse(list: &str) -> Result<Types, String> {
        let mut set = BTreeSet::new();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let t = EventType::parse(name).ok_or_else(|| {
                let known: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
                format!("unknown event type `{name}` (known: {})", known.join(", "))
            })?;
            set.insert(t);
        }
        Ok(Types(set))
    }

    pub fn from_list(types: &[EventType]) -> Types {
        Types(types.iter().copied().collect())
    }

    pub fn admits(&self, t: EventType) -> bool {
        self.0.is_empty() || self.0.contains(&t)
    }
}

/// One event as a change emits it, before the store gives it an id.
#[derive(Debug, Clone)]
pub struct LogEvent {
    pub kind: EventType,
    /// When the change was made, Unix milliseconds.
    pub at_ms: u64,
    /// The WebSocket event (`{"type":…,…}`), the same bytes the sockets get.
    pub frame: Frame,
    /// What a state event (`operator_status`, `department_status`) describes, e.g.
    /// `operator:7`. In a cluster several nodes may publish the same state; the store logs
    /// one only when it differs from the last one logged for its subject.
    pub subject: Option<String>,
}

impl LogEvent {
    pub fn new(kind: EventType, frame: &Frame) -> LogEvent {
        LogEvent {
            kind,
            at_ms: unix_ms(),
            frame: frame.clone(),
            subject: None,
        }
    }

    pub fn about(mut self, subject: String) -> LogEvent {
        self.subject = Some(subject);
        self
    }
}

/// An event read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Opaque and unique; the log's order is the order of ids (per backend).
    pub id: String,
    pub kind: EventType,
    pub at_ms: u64,
    /// The WebSocket event's JSON.
    pub frame: String,
}

impl StoredEvent {
    /// `{"id":…,"at":…,"type":…,…}`: the WebSocket event with its id and time in front.
    pub fn to_json(&self) -> String {
        let rest = self.frame.strip_prefix('{').unwrap_or(&self.frame);
        let id = serde_json::to_string(&self.id).expect("strings serialize");
        let at = crate::model::rfc3339(UNIX_EPOCH + std::time::Duration::from_millis(self.at_ms));
        let mut out = String::with_capacity(self.frame.len() + id.len() + 48);
        out.push_str("{\"id\":");
        out.push_str(&id);
        out.push_str(",\"at\":\"");
        out.push_str(&at);
        out.push_str("\",");
        out.push_str(rest);
        out
    }
}

/// Where a read starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// The oldest kept event.
    Start,
    /// Strictly after this id.
    After(String),
}

/// One page of the log.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub events: Vec<StoredEvent>,
    /// The last id read (also of events the filter left out), to pass as `after` next
    /// time; None when the log was read from the start and nothing was there.
    pub last_id: Option<String>,
}

pub use crate::error::FeedError;

impl Position {
    pub fn id(&self) -> Option<&str> {
        match self {
            Position::Start => None,
            Position::After(id) => Some(id),
        }
    }
}

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_event_json_puts_id_and_time_before_the_websocket_fields() {
        let e = StoredEvent {
            id: "12".into(),
            kind: EventType::Chat,
            at_ms: 0,
            frame: r#"{"type":"chat","chat":{"id":1}}"#.into(),
        };
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":"12","at":"1970-01-01T00:00:00.000Z","type":"chat","chat":{"id":1}})
        );
    }

    #[test]
    fn feed_types_filter_names_an_unknown_type() {
        let t = Types::parse("chat, chat_assigned").unwrap();
        assert!(t.admits(EventType::Chat) && t.admits(EventType::ChatAssigned));
        assert!(!t.admits(EventType::Message));
        assert!(Types::parse("").unwrap().admits(EventType::Session));
        let err = Types::parse("chat,chats").unwrap_err();
        assert!(err.contains("`chats`"), "{err}");
    }
}

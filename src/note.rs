//! What other nodes must hear about a change ([`Note`]), and its store write: the notes of a
//! change travel in its write group, so they are logged exactly when the change is durable.

use serde::{Deserialize, Serialize};

use crate::model::{Chat, ChatId, ChatMessage, Department, OperatorId, StoredOperator};
use crate::presence::ConnId;
use crate::store::{Conns, NoteWrite, Write};

/// Where a message came from: its socket does not get it back as an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub node: String,
    pub conn: ConnId,
}

/// A change other nodes must hear about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Note {
    /// This node's connections of an operator now: all, and those idle; `logout`: the last
    /// one ended with a logout (no grace anywhere).
    Presence {
        operator: OperatorId,
        all: u32,
        idle: u32,
        #[serde(default)]
        logout: bool,
    },
    /// The operator's record and settings as now (None: deleted). Carried in the note: the
    /// store write may land in Redis after the note arrives.
    Operator {
        id: OperatorId,
        record: Option<StoredOperator>,
    },
    /// The department as now.
    Department { department: Department },
    /// Every connection count of the sending node, replacing what others hold of it.
    NodeState { counts: Vec<(OperatorId, u32, u32)> },
    /// A chat as the assigning node left it.
    Chat { chat: Chat },
    /// A message written in a chat; `origin` does not get it back.
    Message {
        chat: ChatId,
        message: ChatMessage,
        origin: Option<Origin>,
    },
}

/// The store write of a note of `node`: one element of its change's log entry, with what
/// it changes in the node's connection counts.
pub fn note_write(node: &str, note: Note) -> Write {
    let conns = match &note {
        Note::Presence {
            operator,
            all,
            idle,
            ..
        } => Conns::One(*operator, *all, *idle),
        Note::NodeState { counts } => Conns::All(counts.clone()),
        _ => Conns::Keep,
    };
    Write::Note(NoteWrite {
        node: node.to_string(),
        json: serde_json::to_string(&note).expect("notes serialize"),
        conns,
    })
}

//! The changes a node makes on its own, not asked by a client: the sweeper marking silent
//! dashboards idle, the cluster logging this node's counts, dropping a node whose lease
//! expired, applying a snapshot read again from Redis, and ending sessions at shutdown.
//! They go the same way as every other change (`Hub::apply_now`): checked, written, shown.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::Change;
use crate::core::Core;
use crate::error::Result;
use crate::model::{Chat, ChatMessage, Department, OperatorId, StoredOperator};
use crate::presence::ConnId;

/// Operator connections silent past `presence.inactivity_timeout`: each is marked idle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MarkIdle {
    pub sockets: Vec<(OperatorId, ConnId)>,
}

impl Change for MarkIdle {
    type Answer = ();
    fn apply(self, core: &mut Core, now: Instant) -> Result<()> {
        for (operator, conn) in self.sockets {
            core.set_active(operator.0, conn, false, now);
        }
        Ok(())
    }
}

/// Every lease, in a cluster: this node's whole connection counts go to the change log,
/// replacing what the others hold of it (they may have dropped them during a pause).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LogNodeState;

impl Change for LogNodeState {
    type Answer = ();
    fn apply(self, core: &mut Core, _: Instant) -> Result<()> {
        core.note_node_state();
        Ok(())
    }
}

/// Another node's lease expired (kill -9, network loss): its connections no longer count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DropNode {
    pub node: String,
}

impl Change for DropNode {
    type Answer = ();
    fn apply(self, core: &mut Core, now: Instant) -> Result<()> {
        core.drop_node(&self.node, now);
        Ok(())
    }
}

/// The records and every live node's counts, read again from Redis (after a gap in the
/// change log or a reconnect). Only copies newer than this node's are applied; a tombstone
/// newer than the copy held here deletes it (a deletion this node missed).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Resync {
    pub operators: Vec<(OperatorId, Option<StoredOperator>)>,
    /// Deleted operators and the version their deletion had.
    pub tombstones: Vec<(OperatorId, u64)>,
    pub departments: Vec<Department>,
    /// Per node: (operator, active connections, idle connections).
    pub remote: HashMap<String, Vec<(OperatorId, u32, u32)>>,
}

impl Change for Resync {
    type Answer = ();
    fn apply(self, core: &mut Core, now: Instant) -> Result<()> {
        for (id, record) in self.operators {
            core.apply_operator(id.0, record, now);
        }
        for (id, deleted) in self.tombstones {
            if core.operator_version(id.0).is_some_and(|v| v < deleted) {
                core.apply_operator(id.0, None, now);
            }
        }
        for d in self.departments {
            core.apply_department(d, now);
        }
        core.replace_remote(self.remote, now);
        Ok(())
    }
}

/// Chats read again from Redis, with their history when it was read too: newer copies are
/// applied, closed ones leave live state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResyncChats {
    pub chats: Vec<(Chat, Option<Vec<ChatMessage>>)>,
}

impl Change for ResyncChats {
    type Answer = ();
    fn apply(self, core: &mut Core, now: Instant) -> Result<()> {
        for (chat, history) in self.chats {
            let id = chat.id;
            core.apply_chat(chat, now);
            if let Some(history) = history {
                core.apply_history(id, history);
            }
        }
        Ok(())
    }
}

/// A clean shutdown of a hub that runs alone: every open session ends now (in a cluster
/// the other nodes end the sessions that really end).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct EndSessions;

impl Change for EndSessions {
    type Answer = ();
    fn apply(self, core: &mut Core, _: Instant) -> Result<()> {
        core.end_sessions_at_shutdown();
        Ok(())
    }
}

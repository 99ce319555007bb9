//! Rebuilding the state from the store after a failed write.
//!
//! A change is applied to memory before its writes are durable (its frames wait, see
//! `hub.rs`). When a write fails, memory holds that change and every later one, the store
//! none of them. Instead of undoing each, the core is loaded again from the store, as at a
//! start, and keeps only what the store cannot know: this node's live sockets (and so the
//! presence they make), other nodes' connection counts, and which chats closed lately.
//! Every socket then hears the state as it is (`hello`, department states, the visitor's
//! chat), since what it was last shown is not known any more.

use tokio::time::Instant;

use super::{Core, Event};
use crate::store::Snapshot;

/// Close code for a socket whose operator or chat is not in the store (its creation was
/// the write that failed): the client reconnects and is told why.
const GONE: u16 = 1011;

impl Core {
    /// Replaces every record by the store's, keeping this node's sockets.
    pub fn rebuild(&mut self, mut snap: Snapshot, now: Instant) {
        let open_sessions = std::mem::take(&mut snap.open_sessions);
        let fresh = Core::load(self.cfg.clone(), snap, now);
        let mut old = std::mem::replace(self, fresh);
        self.cluster = old.cluster;
        // Alone this node assigns; in a cluster it is elected again (and resynced first).
        self.assigner = !old.cluster;
        self.remote = std::mem::take(&mut old.remote);
        // Closes the store does not have (their write failed) are forgotten: the chat is live.
        self.recently_closed = std::mem::take(&mut old.recently_closed);
        let live: Vec<u64> = self
            .recently_closed
            .0
            .iter()
            .copied()
            .filter(|id| self.chats.contains_key(id))
            .collect();
        for id in live {
            self.recently_closed.1.remove(&id);
            self.recently_closed.0.retain(|c| *c != id);
        }
        self.next_chat_id = self.next_chat_id.max(old.next_chat_id);
        self.next_seq = self.next_seq.max(old.next_seq);
        self.assign_clock = self.assign_clock.max(old.assign_clock);
        self.widgets = std::mem::take(&mut old.widgets);
        for (id, mut e) in old.chats.drain() {
            match self.chats.get_mut(&id) {
                Some(n) => {
                    n.watchers = std::mem::take(&mut e.watchers);
                    n.visitors = std::mem::take(&mut e.visitors);
                }
                None => e.visitors.values().for_each(|p| p.request_close(GONE)),
            }
        }
        for (id, mut op) in old.operators.drain() {
            let Some(n) = self.operators.get_mut(&id) else {
                op.peers.iter().for_each(|p| p.request_close(GONE));
                continue;
            };
            n.presence = op.presence;
            n.noted = op.noted;
            for (conn, mut chats) in op.watching.drain() {
                chats.retain(|c| self.chats.contains_key(c));
                n.watching.insert(conn, chats);
            }
            n.peers = std::mem::take(&mut op.peers);
        }
        self.boot(open_sessions, now);
        // Events lost with the failed writes: the state of everything is logged again (a
        // state event equal to the last one logged is dropped by the Redis store).
        if self.assigner {
            self.log_every_state();
        }
        self.resend_all();
    }

    /// Sends every socket the current state: `hello` to operators, each department's state
    /// to its widgets, the chat to its visitors.
    fn resend_all(&mut self) {
        let ops: Vec<u64> = self
            .operators
            .iter()
            .filter(|(_, o)| !o.peers.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for id in ops {
            let hello = self.hello(id);
            let peers = self.operators[&id].peers.clone();
            for p in &peers {
                self.push(p, &hello);
            }
        }
        let depts: Vec<u64> = self.widgets.keys().copied().collect();
        for d in depts {
            let state = self.dept_state(d);
            self.published.insert(d, state);
            let frame = Event::WidgetStatus(&state).frame();
            let peers: Vec<_> = self.widgets[&d].values().cloned().collect();
            for p in &peers {
                self.push(p, &frame);
            }
        }
        let chats: Vec<u64> = self
            .chats
            .iter()
            .filter(|(_, e)| !e.visitors.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for id in chats {
            if let Ok(frame) = self.visitor_frame(id) {
                let peers: Vec<_> = self.chats[&id].visitors.values().cloned().collect();
                for p in &peers {
                    self.push(p, &frame);
                }
            }
        }
    }
}

//! Several hub processes on one Redis act as one service (SPEC.md section 8).
//!
//! The change log is the replication: the notes of a change (what other nodes must hear)
//! are written by the store's script in the same atomic step as the change's records, as
//! one entry of the Redis Stream `{prefix}log` per write group, with a global sequence
//! number (`{prefix}log:seq`); the node's connection counts in `{prefix}conns:{node}` are
//! updated in that step too. Every node follows the stream (`XREAD BLOCK`) and applies the
//! entries of the others in stream order, so an operator connected to node A is online for a
//! widget on node B, and each node sends the resulting events to its own clients exactly
//! once. A gap in the sequence numbers (entries trimmed away while the node lagged) or a
//! reconnect makes the node reload the whole state ([`Cluster::resync`]) and read on. A node
//! that stops renewing its lease (`{prefix}node:{id}`) stops counting within the lease; the
//! grace then applies.
//!
//! Chats have a single writer: the node holding `{prefix}leader` (elected by lease) runs
//! every chat change and all auto-assignment, so one chat never gets two owners and no
//! operator passes capacity. Other nodes forward chat changes to it through the stream
//! `{prefix}calls` (a consumer group; each call's outcome recorded with the change, see
//! [`calls`]) and apply the chats and messages it logs. Pub/sub only wakes a caller up: its
//! answer is read from Redis when the wake-up is lost.

mod calls;
mod changes;
mod lease;
mod outcome;

use std::collections::HashMap;
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::answer::ChatAnswer;
use futures::StreamExt;
use tokio::sync::oneshot;

use redis::AsyncCommands;

use crate::command::{DropNode, Resync, ResyncChats};
use crate::hub::Hub;
use crate::model::{Chat, ChatMessage, Department, OperatorId, StoredOperator};
use crate::store::redis::Keys;

pub use crate::note::{Note, note_write};

pub struct Cluster {
    pub node: String,
    keys: Keys,
    client: redis::Client,
    lease: Duration,
    /// Our assigner lease (`{node}:{epoch}:{random}`) while we hold it: the value of
    /// `{prefix}leader`, which every write of ours as assigner must still find there.
    token: parking_lot::Mutex<Option<String>>,
    /// Asks for a resync (after the hub rebuilt its state from the store).
    resync: tokio::sync::Notify,
    /// Runs an election round now rather than at the next third of a lease: the lease was
    /// released (`{prefix}leader:released`), or the hub rebuilt its state and stopped
    /// assigning under a lease it may still hold.
    elect_now: tokio::sync::Notify,
    /// See [`Cluster::shared`].
    shared: parking_lot::Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// Set at shutdown once the assigner lease is released (or was not held).
    released: std::sync::atomic::AtomicBool,
    /// Chat changes forwarded to the assigning node and waiting for its answer, by call id.
    pending: parking_lot::Mutex<HashMap<String, oneshot::Sender<outcome::Reply>>>,
    next_call: AtomicU64,
    /// Random per process: part of every call id, so a restart never reuses one.
    run: u32,
}

impl Cluster {
    pub fn new(
        url: &str,
        keys: Keys,
        node: String,
        lease: Duration,
    ) -> redis::RedisResult<Cluster> {
        Ok(Cluster {
            node,
            keys,
            client: redis::Client::open(url)?,
            lease,
            token: parking_lot::Mutex::new(None),
            resync: tokio::sync::Notify::new(),
            elect_now: tokio::sync::Notify::new(),
            released: std::sync::atomic::AtomicBool::new(false),
            shared: parking_lot::Mutex::new(None),
            pending: parking_lot::Mutex::new(HashMap::new()),
            next_call: AtomicU64::new(1),
            run: rand::random(),
        })
    }

    fn conns_key(&self, node: &str) -> String {
        self.keys.conns(node)
    }

    fn leader_key(&self) -> String {
        self.keys.leader()
    }

    /// The connection forwarded calls and election rounds share (multiplexed: one TCP
    /// connection for all of them), opened on first use and again after an error.
    async fn shared(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        if let Some(c) = self.shared.lock().clone() {
            return Ok(c);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *self.shared.lock() = Some(c.clone());
        Ok(c)
    }

    fn reset_shared(&self) {
        *self.shared.lock() = None;
    }

    /// Asks for a resync of records and connections from Redis (soon, in the background).
    pub fn resync_soon(&self) {
        self.resync.notify_one();
        self.elect_now.notify_one();
    }

    fn reply_channel(&self, node: &str) -> String {
        format!("{}reply:{node}", self.keys.0)
    }

    /// Starts the change log reader, the reply subscriber, the node watcher, the election
    /// and the server of forwarded chat changes; the first election round is over on return.
    pub async fn start(self, hub: Hub) {
        let me = Arc::new(self);
        // A node restarting under its old id holds no connection yet.
        if let Ok(mut c) = me.client.get_multiplexed_async_connection().await {
            let _: redis::RedisResult<()> = c.del(me.conns_key(&me.node)).await;
        }
        hub.attach_cluster(me.clone());
        hub.on_leave(tokio::spawn(me.clone().leave_cluster(hub.clone())));
        tokio::spawn(me.clone().refresh(hub.clone()));
        tokio::spawn(me.clone().subscribe(hub.clone()));
        tokio::spawn(me.clone().watch_releases(hub.clone()));
        tokio::spawn(me.clone().read_changes(hub.clone()));
        tokio::spawn(me.clone().watch_nodes(hub.clone()));
        tokio::spawn(me.clone().serve_calls(hub.clone()));
        {
            let (me, hub) = (me.clone(), hub.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = me.resync.notified() => {}
                        _ = hub.shutdown.cancelled() => return,
                    }
                    if let Err(e) = me.resync(&hub).await {
                        tracing::warn!(cause = %e, "cluster resync failed");
                    }
                }
            });
        }
        me.clone().elect_once(&hub).await;
        hub.on_leave(tokio::spawn(me.clone().elect(hub.clone())));
    }

    async fn get<T: serde::de::DeserializeOwned>(
        c: &mut redis::aio::MultiplexedConnection,
        key: &str,
    ) -> anyhow::Result<Option<T>> {
        let raw: Option<String> = c.get(key).await?;
        Ok(match raw {
            Some(s) => Some(serde_json::from_str(&s)?),
            None => None,
        })
    }

    /// Reads every record and every live node's connections again.
    async fn resync(&self, hub: &Hub) -> anyhow::Result<()> {
        let mut c = self.client.get_multiplexed_async_connection().await?;
        let op_ids: Vec<u64> = c.smembers(self.keys.operators()).await?;
        let mut ops = Vec::new();
        // Only newer copies are applied: a snapshot may be older than what this node already
        // holds (its own writes may still be in flight). Deletions arrive as notes.
        for id in &op_ids {
            ops.push((
                *id,
                Self::get::<StoredOperator>(&mut c, &self.keys.operator(*id)).await?,
            ));
        }
        let dept_ids: Vec<u64> = c.smembers(self.keys.departments()).await?;
        let mut depts = Vec::new();
        for id in &dept_ids {
            if let Some(d) = Self::get::<Department>(&mut c, &self.keys.department(*id)).await? {
                depts.push(d);
            }
        }
        let mut remote: HashMap<String, Vec<(OperatorId, u32, u32)>> = HashMap::new();
        let pattern = format!("{}conns:*", self.keys.0);
        let conn_keys: Vec<String> = {
            let mut it = c.scan_match::<_, String>(&pattern).await?;
            let mut v = Vec::new();
            while let Some(k) = it.next().await {
                v.push(k?);
            }
            v
        };
        for key in conn_keys {
            let node = key[pattern.len() - 1..].to_string();
            if node == self.node {
                continue;
            }
            let alive: bool = c.exists(self.keys.node(&node)).await?;
            if !alive {
                continue;
            }
            let fields: HashMap<u64, String> = c.hgetall(&key).await?;
            let counts = fields
                .into_iter()
                .filter_map(|(op, v)| {
                    let (a, i) = v.split_once(',')?;
                    Some((OperatorId(op), a.parse().ok()?, i.parse().ok()?))
                })
                .collect();
            remote.insert(node, counts);
        }
        // Deletions this node missed (it was cut off, or a note was lost): a tombstone newer
        // than our copy deletes it; an operator created again since is newer and stays.
        let tombstones: HashMap<u64, u64> = c.hgetall(self.keys.deleted_operators()).await?;
        let _ = hub.apply_now(Resync {
            operators: ops.into_iter().map(|(id, r)| (OperatorId(id), r)).collect(),
            tombstones: tombstones
                .into_iter()
                .map(|(id, v)| (OperatorId(id), v))
                .collect(),
            departments: depts,
            remote,
        });
        self.resync_chats(hub).await
    }

    /// Reads every chat and its history again; only newer copies are applied.
    async fn resync_chats(&self, hub: &Hub) -> anyhow::Result<()> {
        let mut c = self.client.get_multiplexed_async_connection().await?;
        let ids: Vec<u64> = c.smembers(self.keys.chats()).await?;
        for chunk in ids.chunks(256) {
            let keys: Vec<String> = chunk.iter().map(|id| self.keys.chat(*id)).collect();
            let raw: Vec<Option<String>> =
                redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.zrange(self.keys.messages(*id), 0, -1);
            }
            let histories: Vec<Vec<String>> = pipe.query_async(&mut c).await?;
            let mut chats = Vec::new();
            for (chat, history) in raw.into_iter().zip(histories) {
                let Some(chat) = chat.and_then(|s| serde_json::from_str::<Chat>(&s).ok()) else {
                    continue;
                };
                let history: Vec<ChatMessage> = history
                    .iter()
                    .filter_map(|m| serde_json::from_str(m).ok())
                    .collect();
                chats.push((chat, Some(history)));
            }
            let _ = hub.apply_now(ResyncChats { chats });
        }
        // Chats live here but no longer in the set of open chats closed while this node
        // was not listening: their closed copy takes them out of live state.
        let open: std::collections::HashSet<u64> = ids.iter().copied().collect();
        let gone: Vec<u64> = hub
            .read(|c| c.live_chat_ids())
            .into_iter()
            .filter(|id| !open.contains(id))
            .collect();
        for chunk in gone.chunks(256) {
            let keys: Vec<String> = chunk.iter().map(|id| self.keys.chat(*id)).collect();
            let raw: Vec<Option<String>> =
                redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
            let closed: Vec<(Chat, Option<Vec<ChatMessage>>)> = raw
                .into_iter()
                .flatten()
                .filter_map(|s| serde_json::from_str::<Chat>(&s).ok())
                .filter(|c| c.status == crate::model::ChatStatus::Closed)
                .map(|c| (c, None))
                .collect();
            let _ = hub.apply_now(ResyncChats { chats: closed });
        }
        Ok(())
    }

    /// Drops the connections of nodes whose lease expired (kill -9, network loss).
    async fn watch_nodes(self: Arc<Self>, hub: Hub) {
        let every = (self.lease / 8).clamp(Duration::from_millis(50), Duration::from_millis(250));
        let mut conn = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = hub.shutdown.cancelled() => return,
            }
            let nodes = hub.read(|c| c.remote_nodes());
            if nodes.is_empty() {
                continue;
            }
            if conn.is_none() {
                conn = self.client.get_multiplexed_async_connection().await.ok();
            }
            let Some(c) = conn.as_mut() else { continue };
            for node in nodes {
                match c.exists::<_, bool>(self.keys.node(&node)).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(node = %node, "node lease expired: its connections no longer count");
                        let _ = hub.apply_now(DropNode { node: node.clone() });
                        let _: redis::RedisResult<()> = c.del(self.conns_key(&node)).await;
                    }
                    Err(_) => {
                        conn = None;
                        break;
                    }
                }
            }
        }
    }
}

impl crate::hub::Membership for Cluster {
    fn forward(
        &self,
        op: crate::core::ChatOp,
    ) -> futures::future::BoxFuture<'_, crate::error::Result<ChatAnswer>> {
        Box::pin(self.call(op))
    }

    fn resync_soon(&self) {
        Cluster::resync_soon(self);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replication_gap_is_a_jump_in_the_log_sequence() {
        assert!(super::changes::follows(0, 1));
        assert!(super::changes::follows(41, 42));
        // Seen already (a read started before a resync): no gap.
        assert!(super::changes::follows(42, 40));
        assert!(!super::changes::follows(41, 43));
        assert!(!super::changes::follows(0, 7));
    }
}

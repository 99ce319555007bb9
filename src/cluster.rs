//! Several hub processes on one Redis act as one service (SPEC.md section 8).
//!
//! Each node publishes what changed on the channel `{prefix}events` and keeps its own
//! connection counts in `{prefix}conns:{node}`; the other nodes apply those notes to their
//! own state, so an operator connected to node A is online for a widget on node B, and each
//! node sends the resulting events to its own clients exactly once (its own echoes are
//! ignored). A node that stops renewing its lease (`{prefix}node:{id}`) stops counting
//! within the lease; the grace then applies. After any pub/sub interruption a node
//! resynchronises from Redis, which covers the notes it missed.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::hub::Hub;
use crate::model::{Department, StoredOperator};
use crate::store::redis::Keys;

/// A change other nodes must hear about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Note {
    /// This node's connections of an operator now: all, and those idle.
    Presence { operator: u64, all: u32, idle: u32 },
    /// The operator's record and settings as now (None: deleted). Carried in the note: the
    /// store write may land in Redis after the note arrives.
    Operator { id: u64, record: Option<StoredOperator> },
    /// The department as now.
    Department { department: Department },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    node: String,
    #[serde(flatten)]
    note: Note,
}

pub struct Cluster {
    pub node: String,
    keys: Keys,
    client: redis::Client,
    lease: Duration,
}

impl Cluster {
    pub fn new(url: &str, keys: Keys, node: String, lease: Duration) -> redis::RedisResult<Cluster> {
        Ok(Cluster { node, keys, client: redis::Client::open(url)?, lease })
    }

    fn channel(&self) -> String {
        format!("{}events", self.keys.0)
    }

    fn conns_key(&self, node: &str) -> String {
        format!("{}conns:{node}", self.keys.0)
    }

    /// Starts the publisher, the subscriber and the node watcher; returns the sender the
    /// hub queues its notes into.
    pub fn start(self, hub: Hub) -> mpsc::UnboundedSender<Note> {
        let (tx, rx) = mpsc::unbounded_channel();
        let me = std::sync::Arc::new(self);
        hub.on_leave(tokio::spawn(me.clone().publish(rx, hub.clone())));
        tokio::spawn(me.clone().subscribe(hub.clone()));
        tokio::spawn(me.watch_nodes(hub));
        tx
    }

    async fn publish(self: std::sync::Arc<Self>, mut rx: mpsc::UnboundedReceiver<Note>, hub: Hub) {
        let mut conn = None;
        let ttl = (self.lease * 3).as_millis() as i64;
        loop {
            let note = tokio::select! {
                n = rx.recv() => match n { Some(n) => n, None => return },
                _ = hub.shutdown.cancelled() => break,
            };
            if conn.is_none() {
                conn = self.client.get_multiplexed_async_connection().await.ok();
            }
            let Some(c) = conn.as_mut() else {
                tracing::warn!("redis unreachable: a cluster note is dropped (the resync covers it)");
                continue;
            };
            let payload = serde_json::to_string(&Envelope { node: self.node.clone(), note: note.clone() })
                .expect("notes serialize");
            let mut pipe = redis::pipe();
            if let Note::Presence { operator, all, idle } = note {
                let key = self.conns_key(&self.node);
                if all == 0 {
                    pipe.hdel(&key, operator).ignore();
                } else {
                    pipe.hset(&key, operator, format!("{all},{idle}")).ignore();
                }
                pipe.pexpire(&key, ttl).ignore();
            }
            pipe.publish(self.channel(), payload).ignore();
            if let Err(e) = pipe.query_async::<()>(c).await {
                tracing::warn!(cause = %e, "cluster publish failed");
                conn = None;
            }
        }
        // Leaving: our connections no longer count anywhere.
        if let Ok(mut c) = self.client.get_multiplexed_async_connection().await {
            let _: redis::RedisResult<()> = c.del(self.conns_key(&self.node)).await;
            let ops: Vec<u64> = hub.read(|core| core.local_operators());
            for operator in ops {
                let payload = serde_json::to_string(&Envelope {
                    node: self.node.clone(),
                    note: Note::Presence { operator, all: 0, idle: 0 },
                })
                .expect("notes serialize");
                let _: redis::RedisResult<()> = c.publish(self.channel(), payload).await;
            }
        }
    }

    async fn subscribe(self: std::sync::Arc<Self>, hub: Hub) {
        loop {
            if hub.shutdown.is_cancelled() {
                return;
            }
            match self.client.get_async_pubsub().await {
                Ok(mut ps) => {
                    if ps.subscribe(self.channel()).await.is_ok() {
                        // Subscribed first, then read the state: nothing falls in between.
                        if let Err(e) = self.resync(&hub).await {
                            tracing::warn!(cause = %e, "cluster resync failed");
                        }
                        let mut stream = ps.on_message();
                        loop {
                            let msg = tokio::select! {
                                m = stream.next() => m,
                                _ = hub.shutdown.cancelled() => return,
                            };
                            let Some(msg) = msg else { break };
                            let Ok(env) = serde_json::from_slice::<Envelope>(msg.get_payload_bytes()) else {
                                continue;
                            };
                            if env.node != self.node {
                                self.apply(&hub, &env.node, env.note).await;
                            }
                        }
                        tracing::warn!("cluster subscription lost; reconnecting");
                    }
                }
                Err(e) => tracing::debug!(cause = %e, "cluster subscribe failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = hub.shutdown.cancelled() => return,
            }
        }
    }

    async fn apply(&self, hub: &Hub, node: &str, note: Note) {
        match note {
            Note::Presence { operator, all, idle } => {
                hub.run(|c, now| c.apply_presence(node, operator, all, idle, now));
            }
            Note::Operator { id, record } => {
                hub.run(|c, now| c.apply_operator(id, record, now));
            }
            Note::Department { department } => {
                hub.run(|c, now| c.apply_department(department, now));
            }
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> anyhow::Result<Option<T>> {
        let mut c = self.client.get_multiplexed_async_connection().await?;
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
        // Only newer copies are applied, and deletions only through notes: a snapshot may be
        // older than what this node already holds (its own writes may still be in flight).
        for id in &op_ids {
            ops.push((*id, self.get::<StoredOperator>(&self.keys.operator(*id)).await?));
        }
        let dept_ids: Vec<u64> = c.smembers(self.keys.departments()).await?;
        let mut depts = Vec::new();
        for id in &dept_ids {
            if let Some(d) = self.get::<Department>(&self.keys.department(*id)).await? {
                depts.push(d);
            }
        }
        let mut remote: HashMap<String, Vec<(u64, u32, u32)>> = HashMap::new();
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
                    Some((op, a.parse().ok()?, i.parse().ok()?))
                })
                .collect();
            remote.insert(node, counts);
        }
        hub.run(|core, now| {
            for (id, rec) in ops {
                core.apply_operator(id, rec, now);
            }
            for d in depts {
                core.apply_department(d, now);
            }
            core.replace_remote(remote, now);
        });
        Ok(())
    }

    /// Drops the connections of nodes whose lease expired (kill -9, network loss).
    async fn watch_nodes(self: std::sync::Arc<Self>, hub: Hub) {
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
                        hub.run(|core, now| core.drop_node(&node, now));
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

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
//! operator passes capacity. Other nodes forward chat changes to it (`{prefix}calls:{node}`,
//! answers on the pub/sub channel `{prefix}reply:{node}`: the only use of pub/sub, for
//! nothing replicated, as a caller that misses its answer times out) and apply the chats and
//! messages it logs.

use std::collections::HashMap;
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use redis::streams::{StreamId, StreamRangeReply, StreamReadOptions};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::core::ChatOp;
use crate::error::Error;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::core::Origin;
use crate::hub::Hub;
use crate::model::{Chat, ChatMessage, Department, StoredOperator};
use crate::store::redis::Keys;
use crate::store::{Conns, NoteWrite, Write};

/// How long one `XREAD` of the change log blocks; the reader's connection answers slower.
const READ_BLOCK: Duration = Duration::from_millis(1000);

/// Entries taken from the change log per read at most.
const READ_COUNT: usize = 512;

/// A change other nodes must hear about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Note {
    /// This node's connections of an operator now: all, and those idle; `logout`: the last
    /// one ended with a logout (no grace anywhere).
    Presence {
        operator: u64,
        all: u32,
        idle: u32,
        #[serde(default)]
        logout: bool,
    },
    /// The operator's record and settings as now (None: deleted). Carried in the note: the
    /// store write may land in Redis after the note arrives.
    Operator {
        id: u64,
        record: Option<StoredOperator>,
    },
    /// The department as now.
    Department { department: Department },
    /// Every connection count of the sending node, replacing what others hold of it.
    NodeState { counts: Vec<(u64, u32, u32)> },
    /// A chat as the assigning node left it.
    Chat { chat: Chat },
    /// A message written in a chat; `origin` does not get it back.
    Message {
        chat: u64,
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

/// Whether an entry with sequence number `seq` follows the last one seen (`last`) without
/// a gap. Redis numbers entries 1, 2, 3… across nodes; a jump means entries were trimmed
/// away before this node read them.
fn follows(last: u64, seq: u64) -> bool {
    seq <= last + 1
}

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
    /// See [`Cluster::shared`].
    shared: parking_lot::Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// Set at shutdown once the assigner lease is released (or was not held).
    released: std::sync::atomic::AtomicBool,
    /// Chat changes forwarded to the assigning node and waiting for its answer.
    pending: parking_lot::Mutex<HashMap<u64, oneshot::Sender<Result<Value, Error>>>>,
    next_call: AtomicU64,
}

/// A chat change forwarded to the assigning node.
#[derive(Debug, Serialize, Deserialize)]
struct Call {
    id: u64,
    from: String,
    /// Unix milliseconds after which the caller no longer waits: the change is not made.
    deadline: u64,
    op: ChatOp,
}

/// Its answer, published on the caller's reply channel.
#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    id: u64,
    ok: Option<Value>,
    code: Option<String>,
    message: Option<String>,
}

/// The answer of a node that no longer assigns: the change was not run, the caller tries
/// the node that assigns now.
const NOT_ASSIGNER: &str = "this node no longer assigns chats";

/// How long a forwarded chat change may take before the caller gives up.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

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
            released: std::sync::atomic::AtomicBool::new(false),
            shared: parking_lot::Mutex::new(None),
            pending: parking_lot::Mutex::new(HashMap::new()),
            next_call: AtomicU64::new(1),
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
    }

    fn calls_key(&self, node: &str) -> String {
        format!("{}calls:{node}", self.keys.0)
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

    /// Renews our lease on `{prefix}leader`, or takes it when free under a new token (the
    /// epoch `{prefix}leader:epoch` incremented, plus a random part); answers the token we
    /// hold. A round that cannot finish within a third of the lease counts as lost: a node cut
    /// off from Redis stops assigning before its lease can pass to another node.
    async fn hold_lead(&self, hub: &Hub) -> Option<String> {
        let script = redis::Script::new(
            "local cur = redis.call('GET', KEYS[1]) \
             if cur and cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return cur end \
             if cur then return false end \
             local token = ARGV[3] .. ':' .. redis.call('INCR', KEYS[2]) .. ':' .. ARGV[4] \
             redis.call('SET', KEYS[1], token, 'PX', ARGV[2]) \
             return token",
        );
        let mine = self.token.lock().clone().unwrap_or_default();
        let started = hub.now_ms();
        let round = async {
            let mut c = self.shared().await?;
            script
                .key(self.leader_key())
                .key(self.keys.leader_epoch())
                .arg(&mine)
                .arg(self.lease.as_millis() as u64)
                .arg(&self.node)
                .arg(format!("{:016x}", rand::random::<u64>()))
                .invoke_async::<Option<String>>(&mut c)
                .await
        };
        let held = match tokio::time::timeout(self.lease / 3, round).await {
            Ok(Ok(t)) => {
                // Redis answered: this is whether we hold it.
                *self.token.lock() = t.clone();
                t
            }
            _ => {
                // No answer: not held as far as we know, but the round may still have run
                // in Redis, so the token is kept for the next round to renew.
                self.reset_shared();
                None
            }
        };
        if held.is_some() {
            // Redis set the expiry after `started`: until then the lease is surely ours.
            let margin = self.lease / 10;
            hub.lease_until(started + (self.lease - margin).as_millis() as u64);
        }
        held
    }

    /// One election round: renews our lease on `{prefix}leader` or takes it when free.
    /// Becoming the assigning node resynchronises chats first. Whether this node assigns
    /// now is read from the core: it stops on its own when its lease lapsed or a write of
    /// its was fenced.
    async fn elect_once(&self, hub: &Hub) -> bool {
        let before = self.token.lock().clone();
        let mut was = hub.read(|c| c.assigner);
        let Some(token) = self.hold_lead(hub).await else {
            if was {
                tracing::warn!(node = %self.node, "this node no longer assigns chats");
                hub.run(|c, _| c.stop_assigning());
            }
            return false;
        };
        if was && before.as_deref() != Some(token.as_str()) {
            // A new token while assigning (the lease key vanished, e.g. Redis restarted
            // without it): start over under it, resync first, as on any acquisition.
            hub.run(|c, _| c.stop_assigning());
            was = false;
        }
        if !was {
            // The resync must end within the lease, and the lease must still be ours after it.
            match tokio::time::timeout(self.lease / 2, self.resync(hub)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(cause = %e, "resync before assigning failed");
                    return false;
                }
                Err(_) => {
                    tracing::warn!("resync before assigning took longer than half the lease");
                    return false;
                }
            }
            if self.hold_lead(hub).await.as_deref() != Some(token.as_str()) {
                return false;
            }
            tracing::info!(node = %self.node, lease = %token, "this node now assigns chats");
            let fence: Arc<str> = token.into();
            hub.run(|c, now| c.start_assigning_fenced(fence, now));
        }
        true
    }

    async fn elect(self: Arc<Self>, hub: Hub) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.lease / 3) => {}
                _ = hub.shutdown.cancelled() => break,
            }
            self.elect_once(&hub).await;
        }
        let token = self.token.lock().take();
        if let Some(token) = token {
            // Stop deciding first, then hand over at once rather than after the lease: no
            // moment with two deciders. The writes made while assigning (fenced by the
            // token) land first: released before, they would be refused.
            let (_, flushed) = hub.run(|c, _| c.stop_assigning());
            let _ = tokio::time::timeout(self.lease, crate::store::durable(flushed)).await;
            let release = redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
            );
            if let Ok(mut c) = self.client.get_multiplexed_async_connection().await {
                let _ = release
                    .key(self.leader_key())
                    .arg(&token)
                    .invoke_async::<i64>(&mut c)
                    .await;
            }
        }
        self.released.store(true, Ordering::Release);
    }

    /// Forwards a chat change to the assigning node and waits for its answer. While no node
    /// assigns (a failover), waits for one; a node that answers it no longer assigns (it
    /// stepped down before running the change) is passed over for the next one.
    /// `Ok(None)`: this node was elected meanwhile.
    pub async fn call(&self, op: ChatOp) -> Result<Option<Value>, Error> {
        let unavailable = |m: &str| Error::Unavailable(format!("cluster: {m}"));
        let mut c = self
            .shared()
            .await
            .map_err(|e| unavailable(&e.to_string()))?;
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        loop {
            let leader = loop {
                let leader: Option<String> = c.get(self.leader_key()).await.map_err(|e| {
                    self.reset_shared();
                    unavailable(&e.to_string())
                })?;
                match leader.as_deref().map(lease_holder) {
                    Some(l) if l == self.node => return Ok(None),
                    Some(l) => break l.to_string(),
                    None if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    None => return Err(unavailable("no node assigns chats right now")),
                }
            };
            match self.call_once(&mut c, &leader, op.clone(), deadline).await {
                Err(Error::Unavailable(m))
                    if m == NOT_ASSIGNER && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other.map(Some),
            }
        }
    }

    async fn call_once(
        &self,
        c: &mut redis::aio::MultiplexedConnection,
        leader: &str,
        op: ChatOp,
        deadline: tokio::time::Instant,
    ) -> Result<Value, Error> {
        let unavailable = |m: &str| Error::Unavailable(format!("cluster: {m}"));
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let call = serde_json::to_string(&Call {
            id,
            from: self.node.clone(),
            deadline: unix_ms() + left.as_millis() as u64,
            op,
        })
        .expect("calls serialize");
        let pushed: redis::RedisResult<()> = redis::pipe()
            .rpush(self.calls_key(leader), call)
            .ignore()
            .pexpire(
                self.calls_key(leader),
                (CALL_TIMEOUT * 2).as_millis() as i64,
            )
            .ignore()
            .query_async(c)
            .await;
        if let Err(e) = pushed {
            self.reset_shared();
            self.pending.lock().remove(&id);
            return Err(unavailable(&e.to_string()));
        }
        // Whatever ends the wait (answer, timeout, the client going away) forgets the call.
        let _forget = Forget(self, id);
        match tokio::time::timeout(left, rx).await {
            Ok(Ok(r)) => r,
            _ => Err(unavailable("the assigning node did not answer in time")),
        }
    }

    /// Runs chat changes other nodes forward to this one while it is the assigning node.
    /// At shutdown it goes on until the lease is released and a third of the lease more,
    /// answering what still arrives "no longer assigns" (the callers try the next
    /// assigner): no caller waits in vain for a node that left.
    async fn serve_calls(self: Arc<Self>, hub: Hub) {
        let key = self.calls_key(&self.node);
        let mut conn = None;
        let mut leaving_until: Option<tokio::time::Instant> = None;
        loop {
            if hub.shutdown.is_cancelled() && leaving_until.is_none() {
                // Wait (bounded) for the lease to be released, then a third of the lease.
                let released = async {
                    while !self.released.load(Ordering::Acquire) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(3), released).await;
                leaving_until = Some(tokio::time::Instant::now() + self.lease / 3);
            }
            if leaving_until.is_some_and(|t| tokio::time::Instant::now() >= t) {
                return;
            }
            if conn.is_none() {
                // Its own connection (BLPOP blocks it), answering slower than BLPOP blocks:
                // a popped call is never lost to a response timeout.
                let config = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(Duration::from_secs(2)));
                conn = self
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .ok();
                if conn.is_none() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            let c = conn.as_mut().expect("connected");
            let block = if leaving_until.is_some() { 0.05 } else { 0.5 };
            // Never cancelled: a BLPOP dropped mid-way would still pop a call in Redis, and
            // its answer would be lost. It blocks half a second at most.
            let popped: redis::RedisResult<Option<(String, String)>> = c.blpop(&key, block).await;
            let raw = match popped {
                Ok(Some((_, raw))) => raw,
                Ok(None) => continue,
                Err(_) => {
                    conn = None;
                    continue;
                }
            };
            let Ok(call) = serde_json::from_str::<Call>(&raw) else {
                continue;
            };
            if call.deadline < unix_ms() {
                continue; // the caller gave up and answered its client already
            }
            // Just elected: wait (bounded) for the resync to finish before taking changes.
            for _ in 0..100 {
                if leaving_until.is_some() || hub.read(|c| c.assigner) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if call.deadline < unix_ms() {
                continue; // the caller stopped waiting meanwhile
            }
            // Checked under the lock with the change: a node that stepped down runs nothing.
            let result = hub
                .commit(|c, now| {
                    if !c.assigner {
                        return Err(Error::Unavailable(NOT_ASSIGNER.into()));
                    }
                    c.exec(call.op, now)
                })
                .await;
            let reply = match result {
                Ok(v) => Reply {
                    id: call.id,
                    ok: Some(v),
                    code: None,
                    message: None,
                },
                Err(Error::Unavailable(m)) if m == NOT_ASSIGNER => Reply {
                    id: call.id,
                    ok: None,
                    code: Some("not_assigner".into()),
                    message: Some(m),
                },
                Err(e) => Reply {
                    id: call.id,
                    ok: None,
                    code: Some(e.code().into()),
                    message: Some(e.to_string()),
                },
            };
            let payload = serde_json::to_string(&reply).expect("replies serialize");
            let _: redis::RedisResult<()> =
                c.publish(self.reply_channel(&call.from), payload).await;
        }
    }

    fn answer(&self, reply: Reply) {
        let Some(tx) = self.pending.lock().remove(&reply.id) else {
            return;
        };
        let result = match (reply.ok, reply.code) {
            (Some(v), _) => Ok(v),
            (None, code) => {
                let m = reply.message.unwrap_or_default();
                Err(match code.as_deref() {
                    Some("bad_request") => Error::BadRequest(m),
                    Some("forbidden") => Error::Forbidden(m),
                    Some("not_found") => Error::NotFound(m),
                    Some("conflict") => Error::Conflict(m),
                    Some("not_assigner") => Error::Unavailable(NOT_ASSIGNER.into()),
                    _ => Error::Unavailable(m),
                })
            }
        };
        let _ = tx.send(result);
    }

    /// Every lease, logs this node's whole connection counts: counts other nodes dropped
    /// while they saw our node lease lapse (a pause) come back within a lease.
    async fn refresh(self: Arc<Self>, hub: Hub) {
        let mut every = tokio::time::interval(self.lease);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = hub.shutdown.cancelled() => return,
            }
            hub.run(|c, _| c.note_node_state());
        }
    }

    /// At a clean shutdown, once the connections are gone: our counts are dropped from
    /// `{prefix}conns:{node}` and, through the log, from the other nodes. The store is
    /// closed by then, so this is a script of its own that appends the entry as `BATCH` does.
    async fn leave_cluster(self: Arc<Self>, hub: Hub) {
        hub.shutdown.cancelled().await;
        let gone = async {
            while !hub.tasks.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), gone).await;
        let script = redis::Script::new(
            "redis.call('DEL', KEYS[1]) \
             local seq = redis.call('INCR', KEYS[3]) \
             redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'node', ARGV[1], 'seq', seq, 'notes', ARGV[2]) \
             return seq",
        );
        let notes = serde_json::to_string(&[Note::NodeState { counts: Vec::new() }])
            .expect("notes serialize");
        if let Ok(mut c) = self.client.get_multiplexed_async_connection().await {
            let _ = script
                .key(self.conns_key(&self.node))
                .key(self.keys.changes())
                .key(self.keys.changes_seq())
                .arg(&self.node)
                .arg(notes)
                .arg(crate::store::redis::CHANGES_MAXLEN)
                .invoke_async::<i64>(&mut c)
                .await;
        }
    }

    /// Answers to our forwarded calls, on `{prefix}reply:{node}`.
    async fn subscribe(self: Arc<Self>, hub: Hub) {
        loop {
            if hub.shutdown.is_cancelled() {
                return;
            }
            match self.client.get_async_pubsub().await {
                Ok(mut ps) => {
                    if ps.subscribe(self.reply_channel(&self.node)).await.is_ok() {
                        let mut stream = ps.on_message();
                        loop {
                            let msg = tokio::select! {
                                m = stream.next() => m,
                                _ = hub.shutdown.cancelled() => return,
                            };
                            let Some(msg) = msg else { break };
                            if let Ok(reply) =
                                serde_json::from_slice::<Reply>(msg.get_payload_bytes())
                            {
                                self.answer(reply);
                            }
                        }
                        tracing::warn!("cluster reply subscription lost; reconnecting");
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

    /// The id and sequence number of the newest log entry, read in one step: what a reader
    /// starts after. An empty log (trimmed) starts at its start with the current number.
    async fn newest(
        c: &mut redis::aio::MultiplexedConnection,
        keys: &Keys,
    ) -> redis::RedisResult<(String, u64)> {
        let (range, seq): (StreamRangeReply, Option<u64>) = redis::pipe()
            .atomic()
            .cmd("XREVRANGE")
            .arg(keys.changes())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .cmd("GET")
            .arg(keys.changes_seq())
            .query_async(c)
            .await?;
        Ok(match range.ids.first() {
            Some(e) => (e.id.clone(), e.get::<u64>("seq").unwrap_or(0)),
            None => ("0-0".to_string(), seq.unwrap_or(0)),
        })
    }

    /// Follows the change log on a connection of its own and applies the entries of other
    /// nodes in the log's order. On every (re)connect: the newest entry first, then a full
    /// resync, then the entries after it, so nothing falls in between; a gap in the sequence
    /// numbers (entries trimmed away while we lagged) is healed the same way.
    async fn read_changes(self: Arc<Self>, hub: Hub) {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(READ_BLOCK + Duration::from_secs(2)));
        let options = StreamReadOptions::default()
            .block(READ_BLOCK.as_millis() as usize)
            .count(READ_COUNT);
        let mut conn = None;
        // The id and sequence number of the last entry seen; None: (re)start from the newest.
        let mut at: Option<(String, u64)> = None;
        loop {
            if hub.shutdown.is_cancelled() {
                return;
            }
            if conn.is_none() {
                conn = self
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .ok();
            }
            let Some(c) = conn.as_mut() else {
                at = None;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = hub.shutdown.cancelled() => return,
                }
                continue;
            };
            if at.is_none() {
                match Self::newest(c, &self.keys).await {
                    Ok(start) => match self.resync(&hub).await {
                        Ok(()) => at = Some(start),
                        Err(e) => {
                            tracing::warn!(cause = %e, "cluster resync failed");
                            conn = None;
                        }
                    },
                    Err(_) => conn = None,
                }
                continue;
            }
            let Some((id, mut last)) = at.clone() else {
                continue;
            };
            let (keys, ids) = ([self.keys.changes()], [id.as_str()]);
            let read = tokio::select! {
                r = c.xread_options::<_, _, Option<redis::streams::StreamReadReply>>(&keys, &ids, &options) => r,
                _ = hub.shutdown.cancelled() => return,
            };
            let entries: Vec<StreamId> = match read {
                Ok(Some(reply)) => reply.keys.into_iter().flat_map(|k| k.ids).collect(),
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(cause = %e, "change log read failed: reconnecting and reloading");
                    conn = None;
                    at = None;
                    continue;
                }
            };
            let newest = entries.last().map(|e| e.id.clone()).unwrap_or(id);
            for e in &entries {
                let seq = e.get::<u64>("seq").unwrap_or(0);
                if !follows(last, seq) {
                    tracing::warn!(last, seq, "change log entries missed: reloading the state");
                    // Newer than every entry of this read: the rest of it is covered.
                    let last_seq = entries
                        .last()
                        .and_then(|e| e.get::<u64>("seq"))
                        .unwrap_or(seq);
                    if let Err(e) = self.resync(&hub).await {
                        tracing::warn!(cause = %e, "cluster resync failed");
                        at = None;
                        conn = None;
                    } else {
                        at = Some((newest.clone(), last_seq));
                    }
                    break;
                }
                last = last.max(seq);
                at = Some((e.id.clone(), last));
                let node = e.get::<String>("node").unwrap_or_default();
                if node == self.node {
                    continue;
                }
                let notes = e
                    .get::<String>("notes")
                    .and_then(|n: String| serde_json::from_str::<Vec<Note>>(&n).ok())
                    .unwrap_or_default();
                for note in notes {
                    self.apply(&hub, &node, note).await;
                }
            }
        }
    }

    async fn apply(&self, hub: &Hub, node: &str, note: Note) {
        match note {
            Note::Presence {
                operator,
                all,
                idle,
                logout,
            } => {
                hub.run(|c, now| c.apply_presence(node, operator, all, idle, logout, now));
            }
            Note::NodeState { counts } => {
                hub.run(|c, now| c.replace_node(node, counts, now));
            }
            Note::Operator { id, record } => {
                hub.run(|c, now| c.apply_operator(id, record, now));
            }
            Note::Department { department } => {
                hub.run(|c, now| c.apply_department(department, now));
            }
            Note::Chat { chat } => {
                hub.run(|c, now| c.apply_chat(chat, now));
            }
            Note::Message {
                chat,
                message,
                origin,
            } => {
                hub.run(|c, _| c.apply_message(chat, message, origin));
            }
        }
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
        // Deletions this node missed (it was cut off, or a note was lost): a tombstone newer
        // than our copy deletes it; an operator created again since is newer and stays.
        let tombstones: HashMap<u64, u64> = c.hgetall(self.keys.deleted_operators()).await?;
        hub.run(|core, now| {
            for (id, rec) in ops {
                core.apply_operator(id, rec, now);
            }
            for (id, deleted) in tombstones {
                if core.operator_version(id).is_some_and(|v| v < deleted) {
                    core.apply_operator(id, None, now);
                }
            }
            for d in depts {
                core.apply_department(d, now);
            }
            core.replace_remote(remote, now);
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
                chats.push((chat, history));
            }
            hub.run(|core, now| {
                for (chat, history) in chats {
                    let id = chat.id;
                    core.apply_chat(chat, now);
                    core.apply_history(id, history);
                }
            });
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
            let closed: Vec<Chat> = raw
                .into_iter()
                .flatten()
                .filter_map(|s| serde_json::from_str::<Chat>(&s).ok())
                .filter(|c| c.status == crate::model::ChatStatus::Closed)
                .collect();
            hub.run(|core, now| {
                for chat in closed {
                    core.apply_chat(chat, now);
                }
            });
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
                        hub.run(|core, now| core.drop_node(&node, now));
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

/// Removes a forwarded call's entry from `pending` when its caller stops waiting.
struct Forget<'a>(&'a Cluster, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.pending.lock().remove(&self.1);
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The node id in an assigner lease token (`{node}:{epoch}:{random}`).
fn lease_holder(token: &str) -> &str {
    let mut parts = token.rsplitn(3, ':');
    let _random = parts.next();
    let _epoch = parts.next();
    parts.next().unwrap_or(token)
}

#[cfg(test)]
mod tests {
    #[test]
    fn replication_gap_is_a_jump_in_the_log_sequence() {
        assert!(super::follows(0, 1));
        assert!(super::follows(41, 42));
        // Seen already (a read started before a resync): no gap.
        assert!(super::follows(42, 40));
        assert!(!super::follows(41, 43));
        assert!(!super::follows(0, 7));
    }

    #[test]
    fn lease_holder_is_the_node_id_of_the_token() {
        assert_eq!(super::lease_holder("node-a:7:00ff"), "node-a");
        assert_eq!(super::lease_holder("a:b:12:ff"), "a:b");
        assert_eq!(super::lease_holder("old-format"), "old-format");
    }
}

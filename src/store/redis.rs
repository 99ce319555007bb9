//! The Redis store: the same records as the embedded store, under `store.key_prefix`
//! (schema in docs/redis.md). One writer task applies queued writes in order, each group as
//! one call of one Lua script (`redis_write.rs`): records, events and checks in one atomic
//! step. A write that fails is answered with an error and never applied later; the hub then
//! rebuilds its state from Redis. The event feed is a Redis Stream appended to by that same
//! script (read code in `redis_feed.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Client, Commands};

use super::{Queue, Snapshot, Store, StoreError, Ticket, Write};
use crate::audit::{LogEntry, SessionRecord, StoredLog};
use crate::model::{ChatId, ChatStatus, OperatorId};

pub struct RedisStore {
    client: Client,
    prefix: String,
    queue: Queue,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    healthy: Arc<AtomicBool>,
    /// For reads (feed, closed chats); shared with the writer, multiplexed.
    pub(super) conn: ConnectionManager,
    /// Bumped whenever the stream grew (any node's events), for waiters of the feed.
    pub(super) events: tokio::sync::watch::Receiver<u64>,
    pub(super) max_events: u64,
}

pub use super::redis_write::CHANGES_MAXLEN;

/// Key names, in one place (docs/redis.md lists them).
#[derive(Clone)]
pub struct Keys(pub String);

impl Keys {
    pub fn operator(&self, id: u64) -> String {
        format!("{}operator:{id}", self.0)
    }
    pub fn operators(&self) -> String {
        format!("{}operators", self.0)
    }
    /// Tombstones: operator id → when it was deleted (µs since the epoch, a version), so a
    /// node that missed the deletion applies it on its next resync.
    pub fn deleted_operators(&self) -> String {
        format!("{}operators:deleted", self.0)
    }
    pub fn department(&self, id: u64) -> String {
        format!("{}department:{id}", self.0)
    }
    pub fn departments(&self) -> String {
        format!("{}departments", self.0)
    }
    pub fn chat(&self, id: u64) -> String {
        format!("{}chat:{id}", self.0)
    }
    pub fn chats(&self) -> String {
        format!("{}chats", self.0)
    }
    pub fn messages(&self, chat: u64) -> String {
        format!("{}messages:{chat}", self.0)
    }
    pub fn node(&self, node: &str) -> String {
        format!("{}node:{node}", self.0)
    }
    /// The event feed (a Stream) and the digest of the last state logged per subject.
    pub fn events(&self) -> String {
        format!("{}feed", self.0)
    }
    pub fn event_digests(&self) -> String {
        format!("{}feed:last", self.0)
    }
    /// Closed chats: id → Unix ms of the close (retention), and id → id (paging).
    pub fn closed_chats(&self) -> String {
        format!("{}chats:closed", self.0)
    }
    pub fn closed_ids(&self) -> String {
        format!("{}chats:closed:ids", self.0)
    }
    /// Above every chat id ever stored: allocated ids never repeat.
    pub fn next_chat(&self) -> String {
        format!("{}chats:next", self.0)
    }
    pub fn meta(&self) -> String {
        format!("{}meta", self.0)
    }
    /// A role one node holds at a time (`webhooks`).
    pub fn role(&self, name: &str) -> String {
        format!("{}role:{name}", self.0)
    }
    /// The replication stream: one entry per write group of any node.
    pub fn changes(&self) -> String {
        format!("{}log", self.0)
    }
    /// The global sequence number of [`Keys::changes`] entries.
    pub fn changes_seq(&self) -> String {
        format!("{}log:seq", self.0)
    }
    /// A node's connection counts per operator (`all,idle`).
    pub fn conns(&self, node: &str) -> String {
        format!("{}conns:{node}", self.0)
    }
    pub fn log(&self, op: u64) -> String {
        format!("{}log:{op}", self.0)
    }
    pub fn sessions(&self, op: u64) -> String {
        format!("{}sessions:{op}", self.0)
    }
    pub fn session(&self, op: u64) -> String {
        format!("{}session:{op}", self.0)
    }
    pub fn audited(&self) -> String {
        format!("{}audited", self.0)
    }
    /// The stream of chat changes forwarded to the assigning node.
    pub fn calls(&self) -> String {
        format!("{}calls", self.0)
    }

    /// The outcome of forwarded call `id` (or `cancelled`).
    pub fn call(&self, id: &str) -> String {
        format!("{}call:{id}", self.0)
    }

    /// The assigner lease: `{node}:{epoch}:{random}` of the node that assigns.
    pub fn leader(&self) -> String {
        format!("{}leader", self.0)
    }
    /// Incremented on every acquisition of the assigner lease.
    pub fn leader_epoch(&self) -> String {
        format!("{}leader:epoch", self.0)
    }
    /// The last sequence number a store writer applied (see `redis_write.rs`).
    pub fn writer(&self, id: &str) -> String {
        format!("{}writer:{id}", self.0)
    }
}

/// Takes a free role or renews one's own: 1 when held.
const HOLD_ROLE: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

const RELEASE_ROLE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

pub(super) fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("redis: {e}"))
}

impl RedisStore {
    /// Connects (and fails if Redis cannot be reached now) and starts the writer.
    pub async fn open(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        Self::open_with(url, prefix, crate::config::Events::default().max_events).await
    }

    /// Like [`RedisStore::open`], with the feed's bound on its length.
    pub async fn open_with(
        url: &str,
        prefix: &str,
        max_events: u64,
    ) -> Result<RedisStore, StoreError> {
        let client = Client::open(url).map_err(backend)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(backend)?;
        let healthy = Arc::new(AtomicBool::new(true));
        let (queue, rx) = Queue::new();
        let stale = Arc::new(AtomicBool::new(false));
        let writer = super::redis_write::Writer {
            stale: stale.clone(),
            client: client.clone(),
            keys: Keys(prefix.to_string()),
            id: format!("{}", crate::feed::unix_ms()) + &format!("-{:016x}", rand::random::<u64>()),
            gate: queue.gate.clone(),
            healthy: healthy.clone(),
            max_events,
        };
        let writer = tokio::spawn(writer.run(rx));
        tokio::spawn(health_loop(conn.clone(), healthy.clone(), stale));
        let (signal, events) = tokio::sync::watch::channel(0);
        tokio::spawn(super::redis_feed::follow(
            client.clone(),
            Keys(prefix.to_string()),
            signal,
        ));
        Ok(RedisStore {
            client,
            prefix: prefix.to_string(),
            queue,
            writer: Mutex::new(Some(writer)),
            healthy,
            conn,
            events,
            max_events,
        })
    }

    pub fn keys(&self) -> Keys {
        Keys(self.prefix.clone())
    }
}

/// Pings Redis so `/readyz` turns not-ready when it goes away even without writes.
async fn health_loop(
    mut conn: ConnectionManager,
    healthy: Arc<AtomicBool>,
    stale: Arc<AtomicBool>,
) {
    loop {
        let ok = redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok();
        healthy.store(ok, Ordering::Relaxed);
        if !ok {
            stale.store(true, Ordering::Release);
        }
        tokio::time::sleep(Duration::from_millis(if ok { 1000 } else { 200 })).await;
        if Arc::strong_count(&healthy) == 1 {
            return; // the store is gone
        }
    }
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(key: &str, raw: &str) -> Result<T, StoreError> {
    serde_json::from_str(raw).map_err(|e| backend(format!("corrupt record {key}: {e}")))
}

/// Reads every record of one kind: the id set, then the values.
fn read_kind<T: serde::de::DeserializeOwned>(
    conn: &mut redis::Connection,
    set: &str,
    key: impl Fn(u64) -> String,
) -> Result<Vec<T>, StoreError> {
    let ids: Vec<u64> = conn.smembers(set).map_err(backend)?;
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(512) {
        let names: Vec<String> = chunk.iter().map(|id| key(*id)).collect();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&names)
            .query(conn)
            .map_err(backend)?;
        for (name, v) in names.iter().zip(values) {
            if let Some(v) = v {
                out.push(parse(name, &v)?);
            }
        }
    }
    Ok(out)
}

impl Store for RedisStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let keys = self.keys();
        let mut conn = self
            .client
            .get_connection_with_timeout(Duration::from_secs(5))
            .map_err(backend)?;
        // A Redis cut off mid-read (a partition) must not hold the rebuild for minutes.
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(backend)?;
        conn.set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(backend)?;
        let operators = read_kind(&mut conn, &keys.operators(), |id| keys.operator(id))?;
        let departments = read_kind(&mut conn, &keys.departments(), |id| keys.department(id))?;
        let chats: Vec<crate::model::Chat> =
            read_kind(&mut conn, &keys.chats(), |id| keys.chat(id))?;
        let mut messages = Vec::new();
        for c in &chats {
            let key = keys.messages(c.id);
            let raw: Vec<String> = conn.zrange(&key, 0, -1).map_err(backend)?;
            for m in raw {
                messages.push((ChatId(c.id), parse(&key, &m)?));
            }
        }
        let next: Option<u64> = conn.get(keys.next_chat()).map_err(backend)?;
        let next_chat_id = chats
            .iter()
            .map(|c| c.id + 1)
            .chain(next)
            .max()
            .unwrap_or(1);
        // Chats closed by a node that stopped before its set update: not live.
        let chats: Vec<crate::model::Chat> = chats
            .into_iter()
            .filter(|c| c.status != ChatStatus::Closed)
            .collect();
        let live: std::collections::HashSet<u64> = chats.iter().map(|c| c.id).collect();
        messages.retain(|(chat, _)| live.contains(&chat.0));
        let audited: Vec<u64> = conn.smembers(keys.audited()).map_err(backend)?;
        let mut open_sessions = Vec::new();
        for op in audited {
            let open: Option<u64> = conn.hget(keys.session(op), "open").map_err(backend)?;
            if let Some(started) = open {
                open_sessions.push((OperatorId(op), started));
            }
        }
        Ok(Snapshot {
            operators,
            departments,
            chats,
            messages,
            next_chat_id,
            open_sessions,
        })
    }

    fn read_log(
        &self,
        operator: OperatorId,
        limit: usize,
    ) -> futures::future::BoxFuture<'_, Result<Vec<LogEntry>, StoreError>> {
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let key = self.keys().log(operator.0);
            let mut conn = self.conn.clone();
            let raw: Vec<String> = conn
                .zrevrange(&key, 0, limit as isize - 1)
                .await
                .map_err(backend)?;
            raw.iter()
                .map(|r| parse::<StoredLog>(&key, r).map(|l| l.entry))
                .collect()
        })
    }

    fn read_sessions(
        &self,
        operators: Vec<OperatorId>,
        from: u64,
        to: u64,
    ) -> futures::future::BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        Box::pin(async move {
            let keys = self.keys();
            let mut conn = self.conn.clone();
            let mut out = Vec::new();
            // One round trip per 256 operators (a report covers them all).
            for chunk in operators.chunks(256) {
                let mut pipe = redis::pipe();
                for op in chunk {
                    pipe.zrangebyscore(keys.sessions(op.0), format!("({from}"), "+inf");
                    pipe.hget(keys.session(op.0), "open");
                }
                let answers: Vec<(Vec<String>, Option<u64>)> = {
                    let flat: Vec<redis::Value> =
                        pipe.query_async(&mut conn).await.map_err(backend)?;
                    flat.chunks(2)
                        .map(|pair| {
                            let ended =
                                redis::from_redis_value(pair[0].clone()).map_err(backend)?;
                            let open = redis::from_redis_value(pair[1].clone()).map_err(backend)?;
                            Ok((ended, open))
                        })
                        .collect::<Result<_, StoreError>>()?
                };
                for (op, (ended, open)) in chunk.iter().zip(answers) {
                    let key = keys.sessions(op.0);
                    for r in ended {
                        let s: SessionRecord = parse(&key, &r)?;
                        if s.overlaps(from, to) {
                            out.push(s);
                        }
                    }
                    if let Some(started) = open.filter(|s| *s < to) {
                        out.push(SessionRecord {
                            operator: op.0,
                            started_ms: started,
                            ended_ms: None,
                            end_reason: None,
                        });
                    }
                }
            }
            out.sort_by_key(|s| (s.started_ms, s.operator));
            Ok(out)
        })
    }

    fn write(&self, batch: Vec<Write>) -> Ticket {
        self.queue.push(batch)
    }

    fn ready(&self) -> bool {
        self.queue.is_open() && self.healthy.load(Ordering::Relaxed)
    }

    fn diverged(&self) -> tokio::sync::watch::Receiver<u64> {
        self.queue.diverged()
    }

    fn resume(&self) {
        self.queue.resume();
    }

    fn settling(&self) -> bool {
        self.queue.gate.is_settling()
    }

    fn close(&self) {
        self.queue.close();
        if let Some(writer) = self.writer.lock().take() {
            // Called from a blocking thread at shutdown: wait for queued writes to land,
            // bounded so an unreachable Redis cannot hold the exit.
            let handle = tokio::runtime::Handle::current();
            let _ = handle
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), writer).await });
        }
    }

    fn read_events(
        &self,
        from: crate::feed::Position,
        limit: usize,
        types: crate::feed::Types,
    ) -> futures::future::BoxFuture<'_, Result<crate::feed::Page, crate::feed::FeedError>> {
        Box::pin(self.read_events_impl(from, limit, types))
    }

    fn last_event_id(&self) -> futures::future::BoxFuture<'_, Result<Option<String>, StoreError>> {
        Box::pin(self.last_event_id_impl())
    }

    fn event_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events.clone()
    }

    fn stored_chat(
        &self,
        id: ChatId,
    ) -> futures::future::BoxFuture<'_, Result<Option<crate::model::Chat>, StoreError>> {
        Box::pin(self.stored_chat_impl(id.0))
    }

    fn stored_messages(
        &self,
        chat: ChatId,
        after: u64,
        limit: usize,
    ) -> futures::future::BoxFuture<'_, Result<Vec<crate::model::ChatMessage>, StoreError>> {
        Box::pin(self.stored_messages_impl(chat.0, after, limit))
    }

    fn closed_chats(
        &self,
        after: u64,
        limit: usize,
    ) -> futures::future::BoxFuture<'_, Result<super::ClosedPage, StoreError>> {
        Box::pin(self.closed_chats_impl(after, limit))
    }

    fn meta(
        &self,
        key: &'static str,
    ) -> futures::future::BoxFuture<'_, Result<Option<String>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            conn.hget(self.keys().meta(), key).await.map_err(backend)
        })
    }

    fn clean(
        &self,
        r: super::Retention,
    ) -> futures::future::BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(self.clean_impl(r))
    }

    fn hold_role(
        &self,
        name: &'static str,
        token: &str,
        ttl: Duration,
    ) -> futures::future::BoxFuture<'_, Result<bool, StoreError>> {
        let (key, token) = (self.keys().role(name), token.to_string());
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let held: i64 = redis::Script::new(HOLD_ROLE)
                .key(key)
                .arg(token)
                .arg(ttl.as_millis() as u64)
                .invoke_async(&mut conn)
                .await
                .map_err(backend)?;
            Ok(held == 1)
        })
    }

    fn release_role(
        &self,
        name: &'static str,
        token: &str,
    ) -> futures::future::BoxFuture<'_, Result<(), StoreError>> {
        let (key, token) = (self.keys().role(name), token.to_string());
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let _: i64 = redis::Script::new(RELEASE_ROLE)
                .key(key)
                .arg(token)
                .invoke_async(&mut conn)
                .await
                .map_err(backend)?;
            Ok(())
        })
    }
}

/// Claims `node_id` in the cluster for `lease`: refused when a live node holds it.
pub async fn claim_node(
    store_url: &str,
    keys: &Keys,
    node: &str,
    token: &str,
    lease: Duration,
) -> Result<bool, StoreError> {
    let client = Client::open(store_url).map_err(backend)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(backend)?;
    let ok: Option<String> = redis::cmd("SET")
        .arg(keys.node(node))
        .arg(token)
        .arg("NX")
        .arg("PX")
        .arg(lease.as_millis() as u64)
        .query_async(&mut conn)
        .await
        .map_err(backend)?;
    Ok(ok.is_some())
}

/// Renews the node's lease every third of it while `alive` is not cancelled, then drops it.
pub async fn hold_node(
    store_url: String,
    keys: Keys,
    node: String,
    token: String,
    lease: Duration,
    alive: tokio_util::sync::CancellationToken,
) {
    let Ok(client) = Client::open(store_url) else {
        return;
    };
    let key = keys.node(&node);
    // Renew only while the key still holds our token (another node may have taken it over
    // after we lost the lease).
    let renew = redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] or redis.call('EXISTS', KEYS[1]) == 0 then \
         return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) else return false end",
    );
    let release = redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
    );
    let mut conn = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(lease / 3) => {}
            _ = alive.cancelled() => break,
        }
        if conn.is_none() {
            conn = client.get_multiplexed_async_connection().await.ok();
        }
        if let Some(c) = conn.as_mut() {
            match renew
                .key(&key)
                .arg(&token)
                .arg(lease.as_millis() as u64)
                .invoke_async::<Option<String>>(c)
                .await
            {
                Ok(Some(_)) => {}
                Ok(None) => {
                    // Another process runs under our node_id (we were cut off or paused
                    // past the lease and it started meanwhile): two nodes with one id would
                    // count each other's connections as their own. This one leaves.
                    tracing::error!(
                        node = %node,
                        "server.node_id is held by another process now: shutting this node down"
                    );
                    alive.cancel();
                    return;
                }
                Err(e) => {
                    tracing::warn!(cause = %e, "could not renew the node lease");
                    conn = None;
                }
            }
        }
    }
    if conn.is_none() {
        conn = client.get_multiplexed_async_connection().await.ok();
    }
    if let Some(c) = conn.as_mut() {
        let _ = release.key(&key).arg(&token).invoke_async::<i64>(c).await;
    }
}

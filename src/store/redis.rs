//! The Redis store: the same records as the embedded store, under `store.key_prefix`
//! (schema in docs/redis.md). One writer task applies queued writes in order, each group
//! as one MULTI/EXEC. While Redis is unreachable, writes are answered with an error at
//! once (never acknowledged) and kept, in order, to be applied when it is back, so Redis
//! converges to what the hub holds. The event feed is a Redis Stream appended to in the same
//! MULTI/EXEC as the records of its changes (read code in `redis_feed.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Client, Commands};
use tokio::sync::mpsc;

use super::{Job, Queue, Snapshot, Store, StoreError, Ticket, Write};
use crate::audit::{LogEntry, SessionRecord, StoredLog};
use crate::model::ChatStatus;

/// Writes taken into one MULTI/EXEC at most.
const MAX_GROUP: usize = 1024;

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
}

/// Appends one event to the stream, skipping a state event equal to the last one logged
/// for its subject (several nodes publish the same operator's state).
const LOG_EVENT: &str = r"
if ARGV[1] ~= '' then
  local d = redis.sha1hex(ARGV[5])
  if redis.call('HGET', KEYS[2], ARGV[1]) == d then return false end
  redis.call('HSET', KEYS[2], ARGV[1], d)
end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 't', ARGV[3], 'at', ARGV[4], 'f', ARGV[5])
";

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

/// Moves the webhook position forward only: a deliverer that lost its role while a POST
/// was under way cannot set it back (which would re-send delivered batches).
const ADVANCE: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local a, b = string.match(cur, '^(%d+)-(%d+)$')
  local c, d = string.match(ARGV[2], '^(%d+)-(%d+)$')
  if a and c and (tonumber(a) > tonumber(c) or (a == c and tonumber(b) >= tonumber(d))) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// Raises the chat id high-water mark.
const RAISE: &str = r"
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
";

/// [`crate::audit::SessionState::start`] in Redis, atomic with the rest of the write group:
/// only the first node's report of a transition opens the session.
const SESSION_START: &str = "\
if redis.call('HEXISTS', KEYS[1], 'open') == 1 then return 0 end
local last = tonumber(redis.call('HGET', KEYS[1], 'last_end') or '0')
if tonumber(ARGV[1]) < last then return 0 end
redis.call('HSET', KEYS[1], 'open', ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return 1";

/// [`crate::audit::SessionState::end`] in Redis: ends the open session once.
const SESSION_END: &str = "\
local open = redis.call('HGET', KEYS[1], 'open')
if not open or tonumber(open) > tonumber(ARGV[1]) then return 0 end
local rec = '{\"operator\":' .. ARGV[2] .. ',\"started_ms\":' .. open .. ',\"ended_ms\":' .. ARGV[1] .. ',\"end_reason\":\"' .. ARGV[3] .. '\"}'
redis.call('ZADD', KEYS[2], ARGV[1], rec)
redis.call('HDEL', KEYS[1], 'open')
redis.call('HSET', KEYS[1], 'last_end', ARGV[1])
return 1";

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
        let writer = tokio::spawn(writer_loop(
            conn.clone(),
            Keys(prefix.to_string()),
            rx,
            healthy.clone(),
            max_events,
        ));
        tokio::spawn(health_loop(conn.clone(), healthy.clone()));
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
async fn health_loop(mut conn: ConnectionManager, healthy: Arc<AtomicBool>) {
    loop {
        let ok = redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok();
        healthy.store(ok, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(if ok { 1000 } else { 200 })).await;
        if Arc::strong_count(&healthy) == 1 {
            return; // the store is gone
        }
    }
}

async fn writer_loop(
    mut conn: ConnectionManager,
    keys: Keys,
    mut rx: mpsc::UnboundedReceiver<Job>,
    healthy: Arc<AtomicBool>,
    max_events: u64,
) {
    // Writes that failed: kept in order and applied before anything newer.
    let mut backlog: Vec<Write> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let mut writes = std::mem::take(&mut backlog);
        let mut acks = Vec::with_capacity(jobs.len());
        for (w, ack) in jobs {
            writes.extend(w);
            acks.push(ack);
        }
        match apply(&mut conn, &keys, &writes, max_events).await {
            Ok(()) => {
                healthy.store(true, Ordering::Relaxed);
                for a in acks {
                    let _ = a.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::warn!(cause = %e, writes = writes.len(), "redis write failed; retrying until it is back");
                healthy.store(false, Ordering::Relaxed);
                for a in acks {
                    let _ = a.send(Err(e.clone()));
                }
                backlog = writes;
                // Retry the backlog; a write arriving meanwhile fails at once and joins it,
                // unless Redis answers pings again: then the backlog is tried with it at once
                // (a steady stream of writes must not keep the backoff from ever ending).
                let mut delay = Duration::from_millis(100);
                loop {
                    let mut waiting = None;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        job = rx.recv() => match job {
                            Some((w, ack)) => {
                                backlog.extend(w);
                                if !healthy.load(Ordering::Relaxed) {
                                    let _ = ack.send(Err(StoreError::Backend("redis unavailable".into())));
                                    continue;
                                }
                                waiting = Some(ack);
                            }
                            None => return,
                        },
                    }
                    if apply(&mut conn, &keys, &backlog, max_events).await.is_ok() {
                        tracing::info!(writes = backlog.len(), "redis is back; backlog applied");
                        healthy.store(true, Ordering::Relaxed);
                        backlog.clear();
                        if let Some(ack) = waiting {
                            let _ = ack.send(Ok(()));
                        }
                        break;
                    }
                    if let Some(ack) = waiting {
                        let _ = ack.send(Err(StoreError::Backend("redis unavailable".into())));
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

async fn apply(
    conn: &mut ConnectionManager,
    keys: &Keys,
    writes: &[Write],
    max_events: u64,
) -> Result<(), StoreError> {
    if writes.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    pipe.atomic();
    for w in writes {
        match w {
            Write::Operator(o) => {
                pipe.set(keys.operator(o.record.id), json(o)).ignore();
                pipe.sadd(keys.operators(), o.record.id).ignore();
            }
            Write::DeleteOperator(id) => {
                pipe.del(keys.operator(*id)).ignore();
                pipe.srem(keys.operators(), *id).ignore();
            }
            Write::Department(d) => {
                pipe.set(keys.department(d.id), json(d)).ignore();
                pipe.sadd(keys.departments(), d.id).ignore();
            }
            Write::Chat(c) => {
                pipe.set(keys.chat(c.id), json(c)).ignore();
                pipe.cmd("EVAL")
                    .arg(RAISE)
                    .arg(1)
                    .arg(keys.next_chat())
                    .arg(c.id + 1)
                    .ignore();
                if c.status == ChatStatus::Closed {
                    pipe.srem(keys.chats(), c.id).ignore();
                    pipe.cmd("ZADD")
                        .arg(keys.closed_chats())
                        .arg("NX")
                        .arg(crate::feed::unix_ms())
                        .arg(c.id)
                        .ignore();
                    pipe.zadd(keys.closed_ids(), c.id, c.id).ignore();
                } else {
                    pipe.sadd(keys.chats(), c.id).ignore();
                }
            }
            Write::Message(chat, m) => {
                pipe.zadd(keys.messages(*chat), json(m), m.id).ignore();
            }
            Write::TrimMessages { chat, below } => {
                pipe.zrembyscore(keys.messages(*chat), "-inf", format!("({below}"))
                    .ignore();
            }
            Write::Event(e) => {
                pipe.cmd("EVAL")
                    .arg(LOG_EVENT)
                    .arg(2)
                    .arg(keys.events())
                    .arg(keys.event_digests())
                    .arg(e.subject.as_deref().unwrap_or(""))
                    .arg(max_events)
                    .arg(e.kind.as_str())
                    .arg(e.at_ms)
                    .arg(e.frame.as_str())
                    .ignore();
            }
            Write::Meta { key, value } if *key == super::WEBHOOK_POSITION => {
                pipe.cmd("EVAL")
                    .arg(ADVANCE)
                    .arg(1)
                    .arg(keys.meta())
                    .arg(*key)
                    .arg(value)
                    .ignore();
            }
            Write::Meta { key, value } => {
                pipe.hset(keys.meta(), *key, value).ignore();
            }
            Write::Log(l) => {
                pipe.zadd(keys.log(l.entry.operator), json(l), l.seq)
                    .ignore();
                pipe.sadd(keys.audited(), l.entry.operator).ignore();
            }
            Write::SessionStart { operator, at } => {
                pipe.cmd("EVAL")
                    .arg(SESSION_START)
                    .arg(2)
                    .arg(keys.session(*operator))
                    .arg(keys.audited())
                    .arg(*at)
                    .arg(*operator)
                    .ignore();
            }
            Write::SessionEnd {
                operator,
                at,
                reason,
            } => {
                let reason = serde_json::to_value(reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                pipe.cmd("EVAL")
                    .arg(SESSION_END)
                    .arg(2)
                    .arg(keys.session(*operator))
                    .arg(keys.sessions(*operator))
                    .arg(*at)
                    .arg(*operator)
                    .arg(reason)
                    .ignore();
            }
        }
    }
    pipe.query_async::<()>(conn).await.map_err(backend)
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records serialize")
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
        let operators = read_kind(&mut conn, &keys.operators(), |id| keys.operator(id))?;
        let departments = read_kind(&mut conn, &keys.departments(), |id| keys.department(id))?;
        let chats: Vec<crate::model::Chat> =
            read_kind(&mut conn, &keys.chats(), |id| keys.chat(id))?;
        let mut messages = Vec::new();
        for c in &chats {
            let key = keys.messages(c.id);
            let raw: Vec<String> = conn.zrange(&key, 0, -1).map_err(backend)?;
            for m in raw {
                messages.push((c.id, parse(&key, &m)?));
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
        messages.retain(|(chat, _)| live.contains(chat));
        let audited: Vec<u64> = conn.smembers(keys.audited()).map_err(backend)?;
        let mut open_sessions = Vec::new();
        for op in audited {
            let open: Option<u64> = conn.hget(keys.session(op), "open").map_err(backend)?;
            if let Some(started) = open {
                open_sessions.push((op, started));
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
        operator: u64,
        limit: usize,
    ) -> futures::future::BoxFuture<'_, Result<Vec<LogEntry>, StoreError>> {
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let key = self.keys().log(operator);
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
        operators: Vec<u64>,
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
                    pipe.zrangebyscore(keys.sessions(*op), format!("({from}"), "+inf");
                    pipe.hget(keys.session(*op), "open");
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
                    let key = keys.sessions(*op);
                    for r in ended {
                        let s: SessionRecord = parse(&key, &r)?;
                        if s.overlaps(from, to) {
                            out.push(s);
                        }
                    }
                    if let Some(started) = open.filter(|s| *s < to) {
                        out.push(SessionRecord {
                            operator: *op,
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
        id: u64,
    ) -> futures::future::BoxFuture<'_, Result<Option<crate::model::Chat>, StoreError>> {
        Box::pin(self.stored_chat_impl(id))
    }

    fn stored_messages(
        &self,
        chat: u64,
        after: u64,
        limit: usize,
    ) -> futures::future::BoxFuture<'_, Result<Vec<crate::model::ChatMessage>, StoreError>> {
        Box::pin(self.stored_messages_impl(chat, after, limit))
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
        if let Some(c) = conn.as_mut()
            && let Err(e) = renew
                .key(&key)
                .arg(&token)
                .arg(lease.as_millis() as u64)
                .invoke_async::<Option<String>>(c)
                .await
        {
            tracing::warn!(cause = %e, "could not renew the node lease");
            conn = None;
        }
    }
    if conn.is_none() {
        conn = client.get_multiplexed_async_connection().await.ok();
    }
    if let Some(c) = conn.as_mut() {
        let _ = release.key(&key).arg(&token).invoke_async::<i64>(c).await;
    }
}

//! The Redis store's writer: every group of queued writes goes to Redis as one call of one
//! Lua script ([`BATCH`]), so the records of a change, its events and its checks are one
//! atomic step. Each call carries this writer's sequence number: the script refuses a number
//! it has seen, so a call whose answer was lost is found out (and never applied later) by
//! [`RESOLVE`] instead of being sent again. A call of the assigning node carries its lease
//! token and is refused unless the token still holds the lease (fencing).
//!
//! There is no backlog: a write that failed is answered with an error and dropped, and every
//! write queued behind it is refused too ([`super::Gate`]) until the hub has rebuilt its
//! state from Redis. So a write answered with an error never appears later.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};
use tokio::sync::mpsc;

use super::redis::Keys;
use super::{Conns, Gate, Job, StoreError, Write};
use crate::model::ChatStatus;

/// Writes taken into one script call at most.
const MAX_GROUP: usize = 1024;

/// How long the last applied sequence number of a writer is kept: far longer than any
/// answer can be late.
const SEQ_TTL_MS: u64 = 24 * 3600 * 1000;

/// Applies one group of writes atomically.
///
/// KEYS[1]: this writer's last applied sequence number; KEYS[2]: the assigner lease.
/// ARGV[1]: the call's sequence number; ARGV[2]: the lease token the call needs ('' none);
/// ARGV[3]: the feed stream; ARGV[4]: the feed digests; ARGV[5]: the feed's MAXLEN;
/// ARGV[6]: TTL of KEYS[1]; ARGV[7]: the replication stream; ARGV[8]: its sequence number;
/// ARGV[9]: this node; ARGV[10]: the stream's MAXLEN; ARGV[11..]: the operations, each a
/// name and fixed arguments. The `note` operations of the call become ONE stream entry
/// (`node`, `seq`, `notes`: a JSON array in the order of the writes), appended last.
/// Answers 'ok', 'dup' (this sequence number was applied already) or an error: FENCED when
/// the lease is not the caller's, CONFLICT when a versioned record moved on, CALLGONE when a
/// forwarded call (`calldone`) is no longer claimed under the call's lease token
/// (`running:{ARGV[2]}`): it has an outcome already or was settled by its caller. No clock
/// is read: the claim, which the caller respects while the token leads, is the whole check.
pub(super) const BATCH: &str = r#"
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if last >= tonumber(ARGV[1]) then return 'dup' end
if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return redis.error_reply('FENCED the assigner lease is held by another node')
end
local A = ARGV
-- Checks first (a script cannot roll back): each versioned record must still be at the
-- version its change was made from, as the earlier writes of this call leave it.
local arity = {set=2, sadd=2, srem=2, del=1, zadd=3, zaddnx=3, zrembelow=2, hset=3, hdel=2,
  note=1, raise=2, advance=3, event=4, sstart=4, send=5, setv=4, calldone=3}
local seen = {}
local notes = {}
local i, n = 11, #A
while i <= n do
  local op = A[i]
  local k = arity[op]
  if not k then return redis.error_reply('BADOP ' .. tostring(op)) end
  if op == 'setv' then
    local key = A[i+1]
    local have = seen[key]
    if have == nil then
      local cur = redis.call('GET', key)
      have = 0
      if cur then have = tonumber(cjson.decode(cur).version) or 0 end
    end
    if have ~= tonumber(A[i+3]) then
      return redis.error_reply('CONFLICT ' .. key .. ' changed meanwhile through another node')
    end
    seen[key] = tonumber(A[i+4])
  elseif op == 'calldone' then
    -- a forwarded call is applied once, by the assigner that claimed it
    if ARGV[2] == '' or redis.call('GET', A[i+1]) ~= 'running:' .. ARGV[2] then
      return redis.error_reply('CALLGONE ' .. A[i+1] .. ' is not claimed under this lease')
    end
  end
  i = i + 1 + k
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[6])
i = 11
while i <= n do
  local op = A[i]
  if op == 'set' then redis.call('SET', A[i+1], A[i+2]); i = i + 3
  elseif op == 'setv' then redis.call('SET', A[i+1], A[i+2]); i = i + 5
  elseif op == 'sadd' then redis.call('SADD', A[i+1], A[i+2]); i = i + 3
  elseif op == 'srem' then redis.call('SREM', A[i+1], A[i+2]); i = i + 3
  elseif op == 'del' then redis.call('DEL', A[i+1]); i = i + 2
  elseif op == 'zadd' then redis.call('ZADD', A[i+1], A[i+2], A[i+3]); i = i + 4
  elseif op == 'zaddnx' then redis.call('ZADD', A[i+1], 'NX', A[i+2], A[i+3]); i = i + 4
  elseif op == 'zrembelow' then
    redis.call('ZREMRANGEBYSCORE', A[i+1], '-inf', '(' .. A[i+2]); i = i + 3
  elseif op == 'hset' then redis.call('HSET', A[i+1], A[i+2], A[i+3]); i = i + 4
  elseif op == 'hdel' then redis.call('HDEL', A[i+1], A[i+2]); i = i + 3
  elseif op == 'note' then notes[#notes + 1] = A[i+1]; i = i + 2
  elseif op == 'calldone' then redis.call('SET', A[i+1], A[i+2], 'PX', A[i+3]); i = i + 4
  elseif op == 'raise' then
    -- a high-water mark only goes up (chat ids never repeat)
    if tonumber(redis.call('GET', A[i+1]) or '0') < tonumber(A[i+2]) then
      redis.call('SET', A[i+1], A[i+2])
    end
    i = i + 3
  elseif op == 'advance' then
    -- the webhook position only moves forward (a deliverer that lost its role while a
    -- POST was under way cannot set it back)
    local cur = redis.call('HGET', A[i+1], A[i+2])
    local a, b, c, d
    if cur then
      a, b = string.match(cur, '^(%d+)-(%d+)$')
      c, d = string.match(A[i+3], '^(%d+)-(%d+)$')
    end
    if not (a and c and (tonumber(a) > tonumber(c) or (a == c and tonumber(b) >= tonumber(d)))) then
      redis.call('HSET', A[i+1], A[i+2], A[i+3])
    end
    i = i + 4
  elseif op == 'event' then
    -- a state event equal to the last one logged for its subject is dropped
    local subject, frame = A[i+1], A[i+4]
    local skip = false
    if subject ~= '' then
      local digest = redis.sha1hex(frame)
      if redis.call('HGET', ARGV[4], subject) == digest then skip = true
      else redis.call('HSET', ARGV[4], subject, digest) end
    end
    if not skip then
      redis.call('XADD', ARGV[3], 'MAXLEN', '~', ARGV[5], '*', 't', A[i+2], 'at', A[i+3], 'f', frame)
    end
    i = i + 5
  elseif op == 'sstart' then
    -- audit::SessionState::start: the first report of a transition opens the session
    local key, at = A[i+1], tonumber(A[i+3])
    if redis.call('HEXISTS', key, 'open') == 0
       and at >= tonumber(redis.call('HGET', key, 'last_end') or '0') then
      redis.call('HSET', key, 'open', A[i+3])
      redis.call('SADD', A[i+2], A[i+4])
    end
    i = i + 5
  elseif op == 'send' then
    -- audit::SessionState::end: ends the open session once
    local key, at = A[i+1], A[i+3]
    local open = redis.call('HGET', key, 'open')
    if open and tonumber(open) <= tonumber(at) then
      local rec = '{"operator":' .. A[i+4] .. ',"started_ms":' .. open .. ',"ended_ms":' .. at .. ',"end_reason":"' .. A[i+5] .. '"}'
      redis.call('ZADD', A[i+2], at, rec)
      redis.call('HDEL', key, 'open')
      redis.call('HSET', key, 'last_end', at)
    end
    i = i + 6
  else
    return redis.error_reply('BADOP ' .. tostring(op))
  end
end
if #notes > 0 then
  local seq = redis.call('INCR', ARGV[8])
  redis.call('XADD', ARGV[7], 'MAXLEN', '~', ARGV[10], '*',
    'node', ARGV[9], 'seq', seq, 'notes', '[' .. table.concat(notes, ',') .. ']')
end
return 'ok'
"#;

/// Settles a call whose answer was lost: 1 when it was applied; else 0, and its sequence
/// number is burnt so that the call, should it still reach Redis, is refused as a duplicate.
const RESOLVE: &str = r"
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if last >= tonumber(ARGV[1]) then return 1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 0
";

/// Entries the replication stream keeps at least (`MAXLEN ~`): a node that lags further
/// behind finds a gap in the sequence numbers and reloads the whole state.
pub const CHANGES_MAXLEN: u64 = 100_000;

/// The writer task's fixed parts.
pub(super) struct Writer {
    pub client: Client,
    pub keys: Keys,
    /// Unique per process: `{node}:{random}`.
    pub id: String,
    pub gate: Arc<Gate>,
    pub healthy: Arc<AtomicBool>,
    /// Set by the health loop when a ping failed: reconnect before the next call.
    pub stale: Arc<AtomicBool>,
    pub max_events: u64,
}

/// What a failed call left behind.
enum Failure {
    /// Redis answered: nothing of the call was applied.
    Refused(StoreError),
    /// No answer: the call may or may not have been applied.
    Unknown(String),
}

impl Writer {
    pub(super) async fn run(self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let batch = redis::Script::new(BATCH);
        let mut conn: Option<MultiplexedConnection> = None;
        let mut seq: u64 = 0;
        while let Some(first) = rx.recv().await {
            let mut jobs = vec![first];
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            let (jobs, refused): (Vec<Job>, Vec<Job>) =
                jobs.into_iter().partition(|j| self.gate.admits(j));
            refused.into_iter().for_each(super::refuse);
            if jobs.is_empty() {
                continue;
            }
            seq += 1;
            let outcome = self.call(&batch, &mut conn, seq, &jobs).await;
            let result = match outcome {
                Ok(()) => {
                    self.healthy.store(true, Ordering::Relaxed);
                    Ok(())
                }
                Err(Failure::Refused(e)) => {
                    tracing::warn!(cause = %e, "redis refused a write; the hub reloads its state");
                    self.gate.fail(&jobs[0]);
                    Err(e)
                }
                Err(Failure::Unknown(cause)) => {
                    tracing::warn!(%cause, "redis write unanswered; settling it before any other");
                    self.healthy.store(false, Ordering::Relaxed);
                    // Later writes were computed on top of this one: refused until the hub
                    // has reloaded, whatever this one's outcome.
                    self.gate.settling(true);
                    self.gate.fail(&jobs[0]);
                    let settled = self.resolve(&mut conn, seq, &mut rx).await;
                    self.gate.settling(false);
                    match settled {
                        Some(true) => Ok(()),
                        Some(false) => Err(StoreError::Unavailable(cause)),
                        None => Err(StoreError::Closed),
                    }
                }
            };
            for j in jobs {
                let _ = j.ack.send(result.clone());
            }
        }
    }

    async fn connect(&self, conn: &mut Option<MultiplexedConnection>) -> Result<(), String> {
        // Pings failed since: the connection is likely dead; a fresh one tells at once
        // (refused) instead of a write sent into a dead one (outcome unknown).
        if self.stale.swap(false, Ordering::AcqRel) {
            *conn = None;
        }
        if conn.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_millis(500)))
                .set_response_timeout(Some(Duration::from_secs(2)));
            let c = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|e| e.to_string())?;
            *conn = Some(c);
        }
        Ok(())
    }

    async fn call(
        &self,
        script: &redis::Script,
        conn: &mut Option<MultiplexedConnection>,
        seq: u64,
        jobs: &[Job],
    ) -> Result<(), Failure> {
        if let Err(e) = self.connect(conn).await {
            // Not connected: nothing was sent.
            return Err(Failure::Refused(StoreError::Unavailable(format!(
                "redis: {e}"
            ))));
        }
        let writes = jobs.iter().flat_map(|j| j.writes.iter());
        let mut fence = String::new();
        let mut node = "";
        let mut ops: Vec<String> = Vec::new();
        for w in writes {
            match w {
                Write::Fence(token) => fence = token.to_string(),
                Write::Note(n) => node = &n.node,
                _ => {}
            }
            encode(&self.keys, w, &mut ops);
        }
        let mut inv = script.prepare_invoke();
        inv.key(self.keys.writer(&self.id))
            .key(self.keys.leader())
            .arg(seq)
            .arg(&fence)
            .arg(self.keys.events())
            .arg(self.keys.event_digests())
            .arg(self.max_events)
            .arg(SEQ_TTL_MS)
            .arg(self.keys.changes())
            .arg(self.keys.changes_seq())
            .arg(node)
            .arg(CHANGES_MAXLEN);
        for o in &ops {
            inv.arg(o);
        }
        let c = conn.as_mut().expect("connected");
        match inv.invoke_async::<String>(c).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("FENCED") => Err(Failure::Refused(StoreError::Fenced)),
            Err(e) if e.code() == Some("CALLGONE") => {
                Err(Failure::Refused(StoreError::Unavailable(
                    "a forwarded chat change is no longer claimed by this node".into(),
                )))
            }
            Err(e) if e.code() == Some("CONFLICT") => {
                // "CONFLICT {p}operator:7 changed …": name the kind of record to the client.
                let what = if e.detail().is_some_and(|d| d.contains("department:")) {
                    "department"
                } else {
                    "operator"
                };
                Err(Failure::Refused(StoreError::Conflict(format!(
                    "the {what} was changed meanwhile through another node; read it and retry"
                ))))
            }
            Err(e) if e.code().is_some() => {
                // Redis answered with an error: the script did not run, or refused.
                Err(Failure::Refused(StoreError::Backend(format!("redis: {e}"))))
            }
            Err(e) => {
                // Sent on a connection that broke: redis-rs reports every request in flight
                // on a closed connection alike ("broken pipe"), sent or not. Only a call that
                // never had a connection (above) is surely not applied.
                *conn = None;
                Err(Failure::Unknown(format!("redis: {e}")))
            }
        }
    }

    /// Finds out whether call `seq` was applied, retrying until Redis answers; refuses the
    /// writes that arrive meanwhile. `None`: the store closed first.
    async fn resolve(
        &self,
        conn: &mut Option<MultiplexedConnection>,
        seq: u64,
        rx: &mut mpsc::UnboundedReceiver<Job>,
    ) -> Option<bool> {
        let script = redis::Script::new(RESOLVE);
        let mut closed = false;
        loop {
            if self.connect(conn).await.is_ok() {
                let c = conn.as_mut().expect("connected");
                match script
                    .key(self.keys.writer(&self.id))
                    .arg(seq)
                    .arg(SEQ_TTL_MS)
                    .invoke_async::<i64>(c)
                    .await
                {
                    Ok(applied) => {
                        tracing::info!(
                            applied = applied == 1,
                            "redis is back; unanswered write settled"
                        );
                        self.healthy.store(true, Ordering::Relaxed);
                        return Some(applied == 1);
                    }
                    Err(_) => *conn = None,
                }
            }
            if closed {
                return None;
            }
            // Retry every 100 ms: writes succeed again right after Redis is back.
            let pause = tokio::time::sleep(Duration::from_millis(100));
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    job = rx.recv(), if !closed => match job {
                        Some(j) => super::refuse(j),
                        None => closed = true,
                    },
                }
            }
        }
    }
}

/// Appends the script operations of one write.
fn encode(keys: &Keys, w: &Write, ops: &mut Vec<String>) {
    let mut op = |parts: &[&str]| ops.extend(parts.iter().map(|p| p.to_string()));
    match w {
        Write::Fence(_) => {}
        Write::Operator { op: o, base } => {
            let id = o.record.id.to_string();
            op(&[
                "setv",
                &keys.operator(o.record.id),
                &json(o),
                &base.to_string(),
                &o.version.to_string(),
            ]);
            op(&["sadd", &keys.operators(), &id]);
        }
        Write::DeleteOperator(id) => {
            op(&["del", &keys.operator(id.0)]);
            op(&["srem", &keys.operators(), &id.to_string()]);
            let when = crate::model::next_version(0).to_string();
            op(&["hset", &keys.deleted_operators(), &id.to_string(), &when]);
        }
        Write::Department { dept: d, base } => {
            op(&[
                "setv",
                &keys.department(d.id),
                &json(d),
                &base.to_string(),
                &d.version.to_string(),
            ]);
            op(&["sadd", &keys.departments(), &d.id.to_string()]);
        }
        Write::Chat(c) => {
            let id = c.id.to_string();
            op(&["set", &keys.chat(c.id), &json(c)]);
            op(&["raise", &keys.next_chat(), &(c.id + 1).to_string()]);
            if c.status == ChatStatus::Closed {
                op(&["srem", &keys.chats(), &id]);
                let now = crate::feed::unix_ms().to_string();
                op(&["zaddnx", &keys.closed_chats(), &now, &id]);
                op(&["zadd", &keys.closed_ids(), &id, &id]);
            } else {
                op(&["sadd", &keys.chats(), &id]);
            }
        }
        Write::Message(chat, m) => {
            op(&["zadd", &keys.messages(chat.0), &m.id.to_string(), &json(m)]);
        }
        Write::TrimMessages { chat, below } => {
            op(&["zrembelow", &keys.messages(chat.0), &below.to_string()]);
        }
        Write::Event(e) => {
            op(&[
                "event",
                e.subject.as_deref().unwrap_or(""),
                e.kind.as_str(),
                &e.at_ms.to_string(),
                e.frame.as_str(),
            ]);
        }
        Write::Meta { key, value } if *key == super::WEBHOOK_POSITION => {
            op(&["advance", &keys.meta(), key, value]);
        }
        Write::Meta { key, value } => {
            op(&["hset", &keys.meta(), key, value]);
        }
        Write::Note(n) => {
            let key = keys.conns(&n.node);
            match &n.conns {
                Conns::Keep => {}
                Conns::One(operator, 0, _) => op(&["hdel", &key, &operator.to_string()]),
                Conns::One(operator, all, idle) => {
                    op(&[
                        "hset",
                        &key,
                        &operator.to_string(),
                        &format!("{all},{idle}"),
                    ]);
                }
                Conns::All(counts) => {
                    op(&["del", &key]);
                    for (operator, all, idle) in counts {
                        op(&[
                            "hset",
                            &key,
                            &operator.to_string(),
                            &format!("{all},{idle}"),
                        ]);
                    }
                }
            }
            op(&["note", &n.json]);
        }
        Write::CallDone(d) => {
            op(&[
                "calldone",
                &keys.call(&d.id),
                &d.reply,
                &d.ttl_ms.to_string(),
            ]);
        }
        Write::Log(l) => {
            op(&[
                "zadd",
                &keys.log(l.entry.operator),
                &l.seq.to_string(),
                &json(l),
            ]);
            op(&["sadd", &keys.audited(), &l.entry.operator.to_string()]);
        }
        Write::SessionStart { operator, at } => {
            op(&[
                "sstart",
                &keys.session(operator.0),
                &keys.audited(),
                &at.to_string(),
                &operator.to_string(),
            ]);
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
            op(&[
                "send",
                &keys.session(operator.0),
                &keys.sessions(operator.0),
                &at.to_string(),
                &operator.to_string(),
                &reason,
            ]);
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records serialize")
}

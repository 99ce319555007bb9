//! Chat changes forwarded to the assigning node, through one Redis Stream `{prefix}calls`
//! read by a consumer group (at least once, each call with a unique id).
//!
//! - The caller appends the call (`XADD … MAXLEN ~`) on the cluster's shared connection and
//!   waits up to 3 s. The assigner reads the group (`XREADGROUP … BLOCK`, consumer = its
//!   node id, on a connection of its own that answers slower than the block time), and on
//!   taking the lease, and every [`CLAIM_EVERY`] after, claims what is pending for any
//!   consumer (`XAUTOCLAIM`): a call read by an assigner that died before acknowledging it
//!   is run by the next one.
//! - Before running a call the assigner claims it ([`CLAIM`]): `{prefix}call:{id}` set to
//!   `running:{token}`, its lease token, only while nothing is recorded and the token leads.
//!   The outcome (success or error) is then written over the claim by the store's script in
//!   the same atomic step as the change's writes, under the lease fence; the script refuses
//!   the step unless the claim is still there under the same token. So a call is applied at
//!   most once, and "applied" and "answer recorded" cannot come apart. A call found done is
//!   answered from the record.
//! - The answer reaches the caller by pub/sub (`{prefix}reply:{node}`) as a mere wake-up: the
//!   caller also reads the record every [`POLL_EVERY`], and at its deadline it settles the
//!   call atomically ([`SETTLE`]): an outcome recorded by then is the answer, success
//!   included; a claim whose token still leads means the commit may land, so it settles again
//!   a moment later; otherwise (nothing, or the claim of a token that lost the lease, whose
//!   commit is fenced) the call is marked cancelled and never runs. So a 503 is final, a slow
//!   commit is never refused under the feet of the other changes of its write group, and a
//!   lost notification never turns a success into a 503.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimOptions, StreamId, StreamReadOptions};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Cluster;
use super::outcome::{self, Call, Next, Reply, Settled};
use crate::answer::ChatAnswer;
use crate::command::Change;
use crate::core::{ChatOp, Core};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::store::{CallDone, Write};

/// The answer of a node that no longer assigns: the change was not run; the call stays
/// pending in the group for the next assigner.
const NOT_ASSIGNER: &str = "this node no longer assigns chats";

/// How long a forwarded chat change may take before the caller gives up.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The consumer group of the assigning nodes on `{prefix}calls`.
const GROUP: &str = "assigners";

/// Calls the stream keeps at least (`MAXLEN ~`); calls live 3 s, so this is far more than
/// ever waits.
const CALLS_MAXLEN: u64 = 10_000;

/// How long one `XREADGROUP` blocks; the reader's connection answers slower
/// ([`READER_TIMEOUT`]), so a blocked read is never cut by a response timeout.
const READ_BLOCK: Duration = Duration::from_millis(500);
const READER_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the assigner claims calls left pending (by a dead assigner, or by itself when
/// a commit failed), besides at once after taking the lease.
const CLAIM_EVERY: Duration = Duration::from_millis(500);

/// How often a waiting caller reads its call's record (pub/sub may lose the wake-up).
const POLL_EVERY: Duration = Duration::from_millis(500);

/// Settles a call whose caller stops waiting: answers the recorded outcome if there is
/// one; answers the claim `running:{token}` while `{token}` still holds the lease (its
/// commit may land: the caller asks again); else (nothing, or a claim whose token lost the
/// lease, so its commit is fenced) marks the call cancelled (the assigner's commit of it is
/// refused from then on) and answers nil. KEYS[1]: `{prefix}call:{id}`; KEYS[2]: the
/// lease; ARGV[1]: TTL (ms).
const SETTLE: &str = "local v = redis.call('GET', KEYS[1]) \
     if v and string.sub(v, 1, 8) == 'running:' then \
       if redis.call('GET', KEYS[2]) == string.sub(v, 9) then return v end \
     elseif v then return v end \
     redis.call('SET', KEYS[1], 'cancelled', 'PX', ARGV[1]) \
     return false";

/// Claims a call for the assigner holding lease ARGV[1]: sets `running:{token}` when nothing
/// is recorded, or takes over the claim of a token that no longer leads (an assigner that
/// died or was fenced: its commit cannot land), only while the call may still start
/// (ARGV[3] = '1'). Answers the record after, nil when none, or `notleader` when ARGV[1] does
/// not hold the lease. KEYS[1]: `{prefix}call:{id}`; KEYS[2]: the lease; ARGV[2]: TTL (ms).
const CLAIM: &str = "if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 'notleader' end \
     local v = redis.call('GET', KEYS[1]) \
     local mine = 'running:' .. ARGV[1] \
     if ARGV[3] == '1' and (not v or (string.sub(v, 1, 8) == 'running:' and v ~= mine)) then \
       redis.call('SET', KEYS[1], mine, 'PX', ARGV[2]) \
       return mine \
     end \
     return v";

/// How often a caller asks Redis again while it cannot settle its call.
const SETTLE_RETRY: Duration = Duration::from_millis(100);

/// Drops the consumers of the group that hold nothing pending, except the caller's own:
/// the group keeps only consumers that matter (node ids generated at each start would
/// otherwise pile up). A consumer dropped while it still reads comes back with its next
/// read. KEYS[1]: `{prefix}calls`; ARGV[1]: the group; ARGV[2]: this node.
const PRUNE: &str = "local n = 0 \
     for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do \
       local name, pending \
       for j = 1, #c, 2 do \
         if c[j] == 'name' then name = c[j + 1] elseif c[j] == 'pending' then pending = c[j + 1] end \
       end \
       if name and name ~= ARGV[2] and pending == 0 then \
         redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name) \
         n = n + 1 \
       end \
     end \
     return n";

/// Removes a forwarded call's entry from `pending` when its caller stops waiting.
struct Forget<'a>(&'a Cluster, String);

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

fn unavailable(m: &str) -> Error {
    Error::Unavailable(format!("cluster: {m}"))
}

impl Cluster {
    /// Forwards a chat change to whichever node assigns (now, or after a failover within
    /// the 3 s) and waits for its answer. An error answer means the change was not made
    /// and never will be.
    pub async fn call(&self, op: ChatOp) -> Result<ChatAnswer, Error> {
        let n = self.next_call.fetch_add(1, Ordering::Relaxed);
        let id = outcome::call_id(&self.node, self.run, n);
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        let call_deadline = unix_ms() + CALL_TIMEOUT.as_millis() as u64;
        let call = Call {
            id: id.clone(),
            from: self.node.clone(),
            deadline: call_deadline,
            op,
        };
        let raw = serde_json::to_string(&call).expect("calls serialize");
        let (tx, mut rx) = oneshot::channel();
        self.pending.lock().insert(id.clone(), tx);
        // Whatever ends the wait (answer, timeout, the client going away) forgets the call.
        let _forget = Forget(self, id.clone());
        let mut c = self.shared().await.map_err(|e| {
            // Not connected: nothing was sent.
            unavailable(&e.to_string())
        })?;
        let pushed: redis::RedisResult<String> = redis::cmd("XADD")
            .arg(self.keys.calls())
            .arg("MAXLEN")
            .arg("~")
            .arg(CALLS_MAXLEN)
            .arg("*")
            .arg("call")
            .arg(&raw)
            .query_async(&mut c)
            .await;
        if pushed.is_ok() {
            let record = self.keys.call(&id);
            let mut poll =
                tokio::time::interval_at(deadline - CALL_TIMEOUT + POLL_EVERY, POLL_EVERY);
            loop {
                tokio::select! {
                    r = &mut rx => match r {
                        Ok(reply) => return reply.into_result(),
                        Err(_) => break, // never: the sender is ours, in `pending`
                    },
                    _ = poll.tick() => {
                        let found = tokio::time::timeout(POLL_EVERY, c.get::<_, Option<String>>(&record)).await;
                        if let Ok(Ok(Some(raw))) = found
                            && let Settled::Done(reply) = outcome::settled(Some(&raw))
                        {
                            return reply.into_result();
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        } else {
            // The append's answer was lost: it may be in the stream. Settled like a timeout.
            self.reset_shared();
        }
        self.settle(&id, call_deadline, &mut rx).await
    }

    /// The caller stops waiting: the recorded outcome is the answer, or the call is
    /// cancelled for good; while the assigner that claimed it still leads, its commit may
    /// land, so the caller waits for it (a wake-up, or settles again every [`POLL_EVERY`]).
    /// Retried while Redis does not answer, until shutdown: the outcome must be known.
    async fn settle(
        &self,
        id: &str,
        deadline: u64,
        rx: &mut oneshot::Receiver<Reply>,
    ) -> Result<ChatAnswer, Error> {
        let script = redis::Script::new(SETTLE);
        let ttl = outcome::record_ttl_ms(deadline, unix_ms(), self.lease.as_millis() as u64);
        let mut woken = false;
        loop {
            let round = async {
                let mut c = self.shared().await?;
                script
                    .key(self.keys.call(id))
                    .key(self.leader_key())
                    .arg(ttl)
                    .invoke_async::<Option<String>>(&mut c)
                    .await
            };
            let wait = match round.await {
                Ok(record) => match outcome::settled(record.as_deref()) {
                    Settled::Done(reply) => return reply.into_result(),
                    Settled::Cancelled => {
                        return Err(unavailable(
                            "the assigning node did not answer in time; the change was not made",
                        ));
                    }
                    Settled::Unknown => {
                        tracing::error!(call = %id, "a forwarded call's record does not parse");
                        return Err(Error::Internal(
                            "the outcome of the forwarded change is unknown".into(),
                        ));
                    }
                    Settled::Running => POLL_EVERY,
                },
                Err(e) => {
                    self.reset_shared();
                    tracing::debug!(call = %id, cause = %e, "settling a forwarded call failed; retrying");
                    SETTLE_RETRY
                }
            };
            if self.released.load(Ordering::Acquire) {
                return Err(unavailable(
                    "shutting down; the outcome of the forwarded change is unknown",
                ));
            }
            tokio::select! {
                r = &mut *rx, if !woken => match r {
                    Ok(reply) => return reply.into_result(),
                    Err(_) => woken = true,
                },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Runs the chat changes other nodes forward while this node assigns: claims what is
    /// pending first (a previous assigner may have read calls it never ran), then reads the
    /// group. A node that does not assign reads nothing; at shutdown it returns once it
    /// stopped assigning (what it read but did not run stays pending for the next one).
    pub(super) async fn serve_calls(self: Arc<Self>, hub: Hub) {
        let mut conn: Option<MultiplexedConnection> = None;
        // When this node last claimed pending calls; None: not since it took the lease.
        let mut claimed: Option<tokio::time::Instant> = None;
        loop {
            if !hub.read(|c| c.assigner) {
                if hub.shutdown.is_cancelled() {
                    return;
                }
                claimed = None;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = hub.shutdown.cancelled() => {}
                }
                continue;
            }
            if conn.is_none() {
                conn = self.reader().await;
                if conn.is_none() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            let c = conn.as_mut().expect("connected");
            let served = if claimed.is_none_or(|t| t.elapsed() >= CLAIM_EVERY) {
                let takeover = claimed.is_none();
                claimed = Some(tokio::time::Instant::now());
                self.claim_pending(&hub, c, takeover).await
            } else {
                self.read_new(&hub, c).await
            };
            if let Err(e) = served {
                tracing::debug!(cause = %e, "reading forwarded calls failed; reconnecting");
                conn = None;
            }
        }
    }

    /// The assigner's own connection to `{prefix}calls`, with the group created (from the
    /// stream's start: a call appended before the group existed is still read).
    async fn reader(&self) -> Option<MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(READER_TIMEOUT));
        let mut c = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .ok()?;
        let created: redis::RedisResult<()> = c
            .xgroup_create_mkstream(self.keys.calls(), GROUP, "0")
            .await;
        match created {
            Ok(()) => Some(c),
            Err(e) if e.code() == Some("BUSYGROUP") => Some(c),
            Err(e) => {
                tracing::debug!(cause = %e, "creating the calls group failed");
                None
            }
        }
    }

    /// Takes over every call pending in the group (read by any consumer, never
    /// acknowledged) and serves it; on taking the lease (`takeover`) then drops the
    /// consumers left with nothing pending ([`PRUNE`]).
    async fn claim_pending(
        &self,
        hub: &Hub,
        c: &mut MultiplexedConnection,
        takeover: bool,
    ) -> redis::RedisResult<()> {
        let mut start = "0-0".to_string();
        loop {
            let reply: redis::streams::StreamAutoClaimReply = c
                .xautoclaim_options(
                    self.keys.calls(),
                    GROUP,
                    &self.node,
                    0,
                    &start,
                    StreamAutoClaimOptions::default().count(64),
                )
                .await?;
            for entry in &reply.claimed {
                self.serve_one(hub, c, entry).await?;
            }
            if reply.next_stream_id == "0-0" || !hub.read(|core| core.assigner) {
                if takeover {
                    redis::Script::new(PRUNE)
                        .key(self.keys.calls())
                        .arg(GROUP)
                        .arg(&self.node)
                        .invoke_async::<i64>(c)
                        .await?;
                }
                return Ok(());
            }
            start = reply.next_stream_id;
        }
    }

    /// Reads new calls (blocking up to [`READ_BLOCK`]) and serves them.
    async fn read_new(&self, hub: &Hub, c: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let options = StreamReadOptions::default()
            .group(GROUP, &self.node)
            .count(32)
            .block(READ_BLOCK.as_millis() as usize);
        // Never cancelled: a read dropped mid-way would still deliver calls in Redis (they
        // would wait, pending, for the next claim).
        let read: Option<redis::streams::StreamReadReply> = c
            .xread_options(&[self.keys.calls()], &[">"], &options)
            .await?;
        for key in read.map(|r| r.keys).unwrap_or_default() {
            for entry in &key.ids {
                self.serve_one(hub, c, entry).await?;
            }
        }
        Ok(())
    }

    /// Serves one call: claimed ([`CLAIM`]) then run; dropped when given up or too late,
    /// answered from the record when it ran already. Acknowledged unless it was not run
    /// (this node does not lead, another live assigner claimed it, or the commit failed): it
    /// stays pending and is claimed again while time is left.
    async fn serve_one(
        &self,
        hub: &Hub,
        c: &mut MultiplexedConnection,
        entry: &StreamId,
    ) -> redis::RedisResult<()> {
        let ack = |c: &mut MultiplexedConnection| {
            let mut c = c.clone();
            let key = self.keys.calls();
            let id = entry.id.clone();
            async move { c.xack::<_, _, _, ()>(key, GROUP, &[id]).await }
        };
        // The wake-up and the acknowledgement in one round trip (the wake-up may be lost).
        let answer = |c: &mut MultiplexedConnection, from: &str, reply: &str| {
            let mut c = c.clone();
            let mut pipe = redis::pipe();
            pipe.publish(self.reply_channel(from), reply)
                .ignore()
                .xack(self.keys.calls(), GROUP, &[&entry.id])
                .ignore();
            async move { pipe.query_async::<()>(&mut c).await }
        };
        let call = entry
            .get::<String>("call")
            .and_then(|raw| serde_json::from_str::<Call>(&raw).ok());
        let Some(call) = call else {
            return ack(c).await; // not a call of ours
        };
        let Some(token) = self.token.lock().clone() else {
            return Ok(()); // not leading: left pending for the assigner
        };
        let now = unix_ms();
        let ttl = outcome::record_ttl_ms(call.deadline, now, self.lease.as_millis() as u64);
        let record: Option<String> = redis::Script::new(CLAIM)
            .key(self.keys.call(&call.id))
            .key(self.leader_key())
            .arg(&token)
            .arg(ttl)
            .arg(if outcome::may_start(&call, now) {
                "1"
            } else {
                "0"
            })
            .invoke_async(c)
            .await?;
        let reply = match outcome::next(record.as_deref(), &token) {
            Next::Drop => return ack(c).await,
            Next::Leave => return Ok(()),
            Next::Answer(reply) => reply,
            Next::Run => {
                let (id, from) = (call.id.clone(), call.from.clone());
                // Checked under the lock with the change: a node that stepped down, or now
                // leads under another token than the claim's, runs nothing. The outcome,
                // error included, is written with the change, over the claim.
                let result = hub
                    .apply(RunCall {
                        token: token.clone(),
                        id: id.clone(),
                        op: call.op,
                        ttl_ms: ttl,
                    })
                    .await;
                match result {
                    Ok(reply) => return answer(c, &from, &reply).await,
                    Err(e) => {
                        tracing::debug!(call = %id, cause = %e, "a forwarded call was not run");
                        return Ok(());
                    }
                }
            }
        };
        answer(c, &call.from, &reply).await
    }

    fn answer(&self, reply: Reply) {
        if let Some(tx) = self.pending.lock().remove(&reply.id) {
            let _ = tx.send(reply);
        }
    }

    /// Wake-ups for our forwarded calls, on `{prefix}reply:{node}`.
    pub(super) async fn subscribe(self: Arc<Self>, hub: Hub) {
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
}

/// A forwarded chat change, run by the assigner under its claim. Checked under the lock with
/// the change: a node that stepped down, or now leads under another token than the claim's,
/// runs nothing. The outcome, an error included, is written with the change, over the claim,
/// and is the answer (the reply JSON the caller reads).
struct RunCall {
    token: String,
    id: String,
    op: ChatOp,
    ttl_ms: u64,
}

impl Change for RunCall {
    type Answer = String;
    fn apply(self, core: &mut Core, now: Instant) -> Result<String> {
        if core.lease_token() != Some(self.token.as_str()) {
            return Err(Error::Unavailable(NOT_ASSIGNER.into()));
        }
        let result = core.exec(self.op, now);
        let reply = Reply::of(&self.id, &result).to_json();
        core.record(Write::CallDone(CallDone {
            id: self.id,
            reply: reply.clone(),
            ttl_ms: self.ttl_ms,
        }));
        Ok(reply)
    }
}

//! Chat changes forwarded to the assigning node: pushed to its list `{prefix}calls:{node}`,
//! popped and run there, answered on the caller's pub/sub channel `{prefix}reply:{node}`. A
//! node that no longer assigns answers so and the caller tries the next one; at a clean
//! shutdown the assigner goes on answering that for a third of a lease.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::answer::ChatAnswer;
use futures::StreamExt;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::Cluster;
use super::lease::lease_holder;
use crate::core::ChatOp;
use crate::error::Error;
use crate::hub::Hub;

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
    ok: Option<ChatAnswer>,
    code: Option<String>,
    message: Option<String>,
}

/// The answer of a node that no longer assigns: the change was not run, the caller tries
/// the node that assigns now.
const NOT_ASSIGNER: &str = "this node no longer assigns chats";

/// How long a forwarded chat change may take before the caller gives up.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

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

impl Cluster {
    /// Forwards a chat change to the assigning node and waits for its answer. While no node
    /// assigns (a failover), waits for one; a node that answers it no longer assigns (it
    /// stepped down before running the change) is passed over for the next one.
    /// `Ok(None)`: this node was elected meanwhile.
    pub async fn call(&self, op: ChatOp) -> Result<Option<ChatAnswer>, Error> {
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

    pub(super) async fn call_once(
        &self,
        c: &mut redis::aio::MultiplexedConnection,
        leader: &str,
        op: ChatOp,
        deadline: tokio::time::Instant,
    ) -> Result<ChatAnswer, Error> {
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
    pub(super) async fn serve_calls(self: Arc<Self>, hub: Hub) {
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

    /// Answers to our forwarded calls, on `{prefix}reply:{node}`.
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

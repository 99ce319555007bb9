//! The assigner lease `{prefix}leader`: taken under a new token (`{node}:{epoch}:{random}`)
//! when free, renewed every third of the lease, released at a clean shutdown after the
//! fenced writes landed. The token fences every write of the assigning node.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Cluster;
use crate::command::Assign;
use crate::hub::Hub;

impl Cluster {
    /// Renews our lease on `{prefix}leader`, or takes it when free under a new token (the
    /// epoch `{prefix}leader:epoch` incremented, plus a random part); answers the token we
    /// hold. A round that cannot finish within a third of the lease counts as lost: a node cut
    /// off from Redis stops assigning before its lease can pass to another node.
    pub(super) async fn hold_lead(&self, hub: &Hub) -> Option<String> {
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
    pub(super) async fn elect_once(&self, hub: &Hub) -> bool {
        let before = self.token.lock().clone();
        let mut was = hub.read(|c| c.assigner);
        let Some(token) = self.hold_lead(hub).await else {
            if was {
                tracing::warn!(node = %self.node, "this node no longer assigns chats");
                let _ = hub.apply_now(Assign::Stop);
            }
            return false;
        };
        if was && before.as_deref() != Some(token.as_str()) {
            // A new token while assigning (the lease key vanished, e.g. Redis restarted
            // without it): start over under it, resync first, as on any acquisition.
            let _ = hub.apply_now(Assign::Stop);
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
            let _ = hub.apply_now(Assign::Start { lease: token });
        }
        true
    }

    pub(super) async fn elect(self: Arc<Self>, hub: Hub) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.lease / 3) => {}
                _ = self.elect_now.notified() => {}
                _ = hub.shutdown.cancelled() => break,
            }
            self.elect_once(&hub).await;
        }
        let token = self.token.lock().take();
        if let Some(token) = token {
            // Stop deciding first, then hand over at once rather than after the lease: no
            // moment with two deciders. The writes made while assigning (fenced by the
            // token) land first: released before, they would be refused.
            let (_, flushed) = hub.apply_now(Assign::Stop);
            let _ = tokio::time::timeout(self.lease, crate::store::durable(flushed)).await;
            // The others hear of the release at once (a wake-up only: without it they take
            // the lease at their next round), so forwarded calls wait a moment, not a third
            // of a lease.
            let release = redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                   redis.call('DEL', KEYS[1]) redis.call('PUBLISH', KEYS[2], ARGV[1]) return 1 \
                 else return 0 end",
            );
            if let Ok(mut c) = self.client.get_multiplexed_async_connection().await {
                let _ = release
                    .key(self.leader_key())
                    .key(self.released_channel())
                    .arg(&token)
                    .invoke_async::<i64>(&mut c)
                    .await;
            }
        }
        self.released.store(true, Ordering::Release);
    }

    fn released_channel(&self) -> String {
        format!("{}leader:released", self.keys.0)
    }

    /// Runs an election round as soon as another node releases the lease (its clean
    /// shutdown). Only a wake-up: a missed one costs a third of a lease, nothing else.
    pub(super) async fn watch_releases(self: Arc<Self>, hub: Hub) {
        use futures::StreamExt;
        while !hub.shutdown.is_cancelled() {
            if let Ok(mut ps) = self.client.get_async_pubsub().await
                && ps.subscribe(self.released_channel()).await.is_ok()
            {
                let mut stream = ps.on_message();
                loop {
                    tokio::select! {
                        m = stream.next() => match m {
                            Some(_) => self.elect_now.notify_one(),
                            None => break,
                        },
                        _ = hub.shutdown.cancelled() => return,
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                _ = hub.shutdown.cancelled() => return,
            }
        }
    }
}

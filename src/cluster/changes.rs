//! Following the change log: one reader per node on `{prefix}log` (`XREAD BLOCK`), entries
//! of other nodes applied in stream order, a gap in the sequence numbers or a reconnect
//! answered with a full resync; the node's own counts refreshed every lease and cleared at a
//! clean shutdown.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use redis::streams::{StreamId, StreamRangeReply, StreamReadOptions};

use super::{Cluster, Note};
use crate::command::{LogNodeState, Replicate};
use crate::hub::Hub;
use crate::store::redis::Keys;

/// How long one `XREAD` of the change log blocks; the reader's connection answers slower.
const READ_BLOCK: Duration = Duration::from_millis(1000);

/// Entries taken from the change log per read at most.
const READ_COUNT: usize = 512;

/// Whether an entry with sequence number `seq` follows the last one seen (`last`) without
/// a gap. Redis numbers entries 1, 2, 3… across nodes; a jump means entries were trimmed
/// away before this node read them.
pub(super) fn follows(last: u64, seq: u64) -> bool {
    seq <= last + 1
}

impl Cluster {
    /// Every lease, logs this node's whole connection counts: counts other nodes dropped
    /// while they saw our node lease lapse (a pause) come back within a lease.
    pub(super) async fn refresh(self: Arc<Self>, hub: Hub) {
        let mut every = tokio::time::interval(self.lease);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = hub.shutdown.cancelled() => return,
            }
            let _ = hub.apply_now(LogNodeState);
        }
    }

    /// At a clean shutdown, once the connections are gone: our counts are dropped from
    /// `{prefix}conns:{node}` and, through the log, from the other nodes. The store is
    /// closed by then, so this is a script of its own that appends the entry as `BATCH` does.
    pub(super) async fn leave_cluster(self: Arc<Self>, hub: Hub) {
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

    /// The id and sequence number of the newest log entry, read in one step: what a reader
    /// starts after. An empty log (trimmed) starts at its start with the current number.
    pub(super) async fn newest(
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
    pub(super) async fn read_changes(self: Arc<Self>, hub: Hub) {
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

    pub(super) async fn apply(&self, hub: &Hub, node: &str, note: Note) {
        let node = node.to_string();
        let _ = hub.apply_now(Replicate { node, note });
    }
}

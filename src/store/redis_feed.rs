//! Reads of the Redis store beyond the start-up snapshot: the event feed (a Redis Stream
//! shared by every node, so every node serves the same ids in the same order), closed chats
//! and their messages, and the retention clean-up.

use std::time::Duration;

use redis::{AsyncCommands, Client, Value};
use tokio::sync::watch;

use super::Retention;
use super::redis::{Keys, RedisStore, backend, parse};
use crate::feed::{EventType, FeedError, Page, Position, StoredEvent, Types};
use crate::model::{Chat, ChatMessage};
use crate::store::StoreError;

/// Entries one feed read scans at most (a narrow `types` filter over a long log).
const SCAN_LIMIT: usize = 10_000;
/// Closed chats one clean-up round deletes at most.
const CLEAN_BATCH: usize = 1_000;
/// How long one `XREAD BLOCK` of the follower waits; below the connection's timeout.
const BLOCK: Duration = Duration::from_secs(2);

/// A stream id `ms-seq`, ordered as Redis orders them.
fn stream_id(s: &str) -> Option<(u64, u64)> {
    let (ms, seq) = s.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// One `XRANGE` entry: `[id, [field, value, …]]`.
fn entry(v: &Value) -> Option<(String, Option<StoredEvent>)> {
    let Value::Array(parts) = v else { return None };
    let id = text(parts.first()?)?;
    let fields = match parts.get(1)? {
        Value::Array(f) => f,
        _ => return Some((id, None)),
    };
    let (mut kind, mut at_ms, mut frame) = (None, None, None);
    for pair in fields.chunks(2) {
        let (Some(k), Some(v)) = (pair.first().and_then(text), pair.get(1).and_then(text)) else {
            continue;
        };
        match k.as_str() {
            "t" => kind = EventType::parse(&v),
            "at" => at_ms = v.parse().ok(),
            "f" => frame = Some(v),
            _ => {}
        }
    }
    let event = match (kind, at_ms, frame) {
        (Some(kind), Some(at_ms), Some(frame)) => Some(StoredEvent {
            id: id.clone(),
            kind,
            at_ms,
            frame,
        }),
        _ => None,
    };
    Some((id, event))
}

/// Whether events after `a` were dropped, per `XINFO STREAM` (Redis 7): trimming removes
/// the oldest entries (fewer kept than ever added), so a position before the oldest kept one
/// has lost what followed it; `max-deleted-entry-id` covers deletions; a position beyond the
/// last id ever generated belongs to a log that was deleted. (The one position just before
/// the oldest kept entry also answers 410: the stream does not tell whether it was the last
/// one dropped.)
fn dropped_after(info: &Value, a: (u64, u64)) -> bool {
    let last = info_id(info, "last-generated-id");
    if last.is_some_and(|l| a > l) {
        return true;
    }
    if info_id(info, "max-deleted-entry-id").is_some_and(|d| d > a) {
        return true;
    }
    let added = info_int(info, "entries-added").unwrap_or(0);
    let length = info_int(info, "length").unwrap_or(0);
    if added <= length {
        return false;
    }
    match info_id(info, "recorded-first-entry-id").filter(|f| *f != (0, 0)) {
        Some(first) if length > 0 => a < first,
        _ => last.is_some_and(|l| a < l),
    }
}

fn info_field<'a>(info: &'a Value, field: &str) -> Option<&'a Value> {
    let pairs: Vec<(&Value, &Value)> = match info {
        Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(a) => a
            .chunks(2)
            .filter_map(|p| Some((p.first()?, p.get(1)?)))
            .collect(),
        _ => return None,
    };
    pairs
        .into_iter()
        .find(|(k, _)| text(k).as_deref() == Some(field))
        .map(|(_, v)| v)
}

fn info_int(info: &Value, field: &str) -> Option<u64> {
    text(info_field(info, field)?)?.parse().ok()
}

/// A stream id field of `XINFO STREAM`.
fn info_id(info: &Value, field: &str) -> Option<(u64, u64)> {
    stream_id(&text(info_field(info, field)?)?)
}

/// `ZRANGE key (after +inf BYSCORE LIMIT 0 limit`: members scored above `after`, in order.
fn scores_above(key: &str, after: u64, limit: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("ZRANGE");
    cmd.arg(key)
        .arg(format!("({after}"))
        .arg("+inf")
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(0)
        .arg(limit);
    cmd
}

impl RedisStore {
    pub(super) async fn read_events_impl(
        &self,
        from: Position,
        limit: usize,
        types: Types,
    ) -> Result<Page, FeedError> {
        let keys = self.keys();
        let after = match &from {
            Position::Start => None,
            Position::After(id) => Some(stream_id(id).ok_or_else(|| FeedError::BadId(id.clone()))?),
        };
        let mut conn = self.conn.clone();
        let mut page = Page {
            events: Vec::new(),
            last_id: after.map(|(ms, seq)| format!("{ms}-{seq}")),
        };
        let mut start = match after {
            Some((ms, seq)) => format!("({ms}-{seq}"),
            None => "-".to_string(),
        };
        let batch = limit.clamp(1, 1000);
        let mut scanned = 0;
        while page.events.len() < limit && scanned < SCAN_LIMIT {
            let reply: Value = redis::cmd("XRANGE")
                .arg(keys.events())
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(batch)
                .query_async(&mut conn)
                .await
                .map_err(backend)?;
            let Value::Array(entries) = reply else { break };
            let n = entries.len();
            for e in &entries {
                let Some((id, event)) = entry(e) else {
                    continue;
                };
                scanned += 1;
                if page.events.len() >= limit {
                    break;
                }
                page.last_id = Some(id.clone());
                start = format!("({id}");
                match event {
                    Some(ev) if types.admits(ev.kind) => page.events.push(ev),
                    Some(_) => {}
                    None => tracing::error!(event = %id, "corrupt feed entry skipped"),
                }
            }
            if n < batch {
                break;
            }
        }
        // Checked after reading: trimming that ran meanwhile is seen too. A position beyond
        // the newest id (the stream was deleted or restored) would skip events as well.
        if let Some(a) = after {
            let gone = || FeedError::Gone(format!("{}-{}", a.0, a.1));
            let info: Result<Value, redis::RedisError> = redis::cmd("XINFO")
                .arg("STREAM")
                .arg(keys.events())
                .query_async(&mut conn)
                .await;
            match info {
                Ok(info) => {
                    if dropped_after(&info, a) {
                        return Err(gone());
                    }
                }
                Err(e) if e.to_string().contains("no such key") => return Err(gone()),
                Err(e) => return Err(FeedError::Store(backend(e))),
            }
        }
        Ok(page)
    }

    pub(super) async fn last_event_id_impl(&self) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        let reply: Value = redis::cmd("XREVRANGE")
            .arg(self.keys().events())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(match reply {
            Value::Array(entries) => entries.first().and_then(entry).map(|(id, _)| id),
            _ => None,
        })
    }

    pub(super) async fn stored_chat_impl(&self, id: u64) -> Result<Option<Chat>, StoreError> {
        let key = self.keys().chat(id);
        let mut conn = self.conn.clone();
        let raw: Option<String> = conn.get(&key).await.map_err(backend)?;
        raw.map(|r| parse(&key, &r)).transpose()
    }

    pub(super) async fn stored_messages_impl(
        &self,
        chat: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let key = self.keys().messages(chat);
        let mut conn = self.conn.clone();
        let raw: Vec<String> = scores_above(&key, after, limit)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        raw.iter().map(|m| parse(&key, m)).collect()
    }

    pub(super) async fn closed_chats_impl(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<super::ClosedPage, StoreError> {
        let keys = self.keys();
        let mut conn = self.conn.clone();
        let ids: Vec<u64> = scores_above(&keys.closed_ids(), after, limit)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        if ids.is_empty() {
            return Ok(super::ClosedPage::default());
        }
        let names: Vec<String> = ids.iter().map(|id| keys.chat(*id)).collect();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&names)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let mut page = super::ClosedPage {
            chats: Vec::with_capacity(ids.len()),
            scanned: ids.len(),
            last: ids.last().copied(),
        };
        for (name, v) in names.iter().zip(values) {
            if let Some(v) = v {
                page.chats.push(parse(name, &v)?);
            }
        }
        Ok(page)
    }

    /// Deletes closed chats past retention (record, messages, indexes) and trims the
    /// stream by age; its length is bounded by every `XADD` (`MAXLEN ~`).
    pub(super) async fn clean_impl(&self, r: Retention) -> Result<bool, StoreError> {
        let keys = self.keys();
        let mut conn = self.conn.clone();
        let expired: Vec<u64> = redis::cmd("ZRANGE")
            .arg(keys.closed_chats())
            .arg("-inf")
            .arg(format!("({}", r.chats_before_ms))
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(CLEAN_BATCH)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        if !expired.is_empty() {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for id in &expired {
                pipe.del(keys.chat(*id)).ignore();
                pipe.del(keys.messages(*id)).ignore();
                pipe.zrem(keys.closed_chats(), *id).ignore();
                pipe.zrem(keys.closed_ids(), *id).ignore();
                pipe.srem(keys.chats(), *id).ignore();
            }
            pipe.query_async::<()>(&mut conn).await.map_err(backend)?;
        }
        let _: Value = redis::cmd("XTRIM")
            .arg(keys.events())
            .arg("MINID")
            .arg("~")
            .arg(r.events_before_ms)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let _: Value = redis::cmd("XTRIM")
            .arg(keys.events())
            .arg("MAXLEN")
            .arg("~")
            .arg(r.max_events.min(self.max_events))
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        // Status log (scored by seq, µs) and ended sessions (scored by their end, ms).
        let audited: Vec<u64> = conn.smembers(keys.audited()).await.map_err(backend)?;
        if !audited.is_empty() {
            let before_us = r.audit_before_ms.saturating_mul(1000);
            let mut pipe = redis::pipe();
            for op in audited {
                pipe.zrembyscore(keys.log(op), "-inf", format!("({before_us}"))
                    .ignore();
                pipe.zrembyscore(keys.sessions(op), "-inf", format!("({}", r.audit_before_ms))
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await.map_err(backend)?;
        }
        Ok(expired.len() == CLEAN_BATCH)
    }
}

/// Follows the stream with `XREAD BLOCK` on a connection of its own and bumps `signal`
/// whenever it grew, so long polls and SSE streams on this node wake for any node's events.
pub(super) async fn follow(client: Client, keys: Keys, signal: watch::Sender<u64>) {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(BLOCK + Duration::from_secs(2)));
    let mut last = "$".to_string();
    let mut conn = None;
    while !signal.is_closed() {
        if conn.is_none() {
            conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .ok();
            if conn.is_none() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let reply: Result<Value, _> = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(keys.events())
            .arg(&last)
            .query_async(c)
            .await;
        match reply {
            Ok(Value::Nil) => {}
            Ok(v) => {
                if let Some(id) = newest_id(&v) {
                    last = id;
                    signal.send_modify(|n| *n += 1);
                }
            }
            Err(e) => {
                tracing::debug!(cause = %e, "feed follower: reconnecting");
                conn = None;
                // Events may have come meanwhile: wake waiters, they re-read the store.
                signal.send_modify(|n| *n += 1);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The last entry id of an `XREAD` reply (`[[key, [entries…]]]`, or a map in RESP3).
fn newest_id(v: &Value) -> Option<String> {
    let streams: Vec<&Value> = match v {
        Value::Array(a) => a
            .iter()
            .filter_map(|s| match s {
                Value::Array(p) => p.get(1),
                _ => None,
            })
            .collect(),
        Value::Map(m) => m.iter().map(|(_, v)| v).collect(),
        _ => return None,
    };
    streams.into_iter().rev().find_map(|entries| match entries {
        Value::Array(e) => e.last().and_then(entry).map(|(id, _)| id),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_numerically() {
        assert!(stream_id("10-0") > stream_id("9-5"));
        assert!(stream_id("10-2") > stream_id("10-1"));
        assert_eq!(stream_id("12"), None);
        assert_eq!(stream_id("a-1"), None);
    }
}

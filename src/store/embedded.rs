//! The embedded file store: one redb database in the data dir. A single writer thread
//! groups every write queued meanwhile into one transaction (group commit), so many writes
//! share one fsync and each is acknowledged only once its transaction is durable. The event
//! feed is a table written in the same transaction as the records of its changes.
//!
//! This file holds the records' tables (operators, departments, chats and their messages),
//! their reads and the `Store` impl; `embedded/writer.rs` the writer thread and its group
//! commit, `embedded/records.rs` the chat row's binary form (JSON rows of older versions
//! still read), `embedded/feed.rs` the event feed's table and reads, `embedded/audit.rs` the
//! status log and sessions. Retention trims all three in one transaction.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, watch};

use super::{Gate, Job, Queue, Retention, Snapshot, Store, StoreError, Ticket, Write};
use crate::audit::{LogEntry, SessionRecord, SessionState, StoredLog};
use crate::feed::{EventType, FeedError, Page, Position, StoredEvent, Types, unix_ms};
use crate::model::{Chat, ChatId, ChatMessage, ChatStatus, OperatorId};

mod audit;
mod feed;
mod records;
mod writer;

use audit::{
    LOG, LOG_BY_TIME, SESSION_STATE, SESSIONS, SESSIONS_BY_END, read_log, read_sessions,
    session_state,
};
use feed::{EVENTS, EVENTS_DROPPED, Packer, kind_byte};

const OPERATORS: TableDefinition<u64, &[u8]> = TableDefinition::new("operators");
const DEPARTMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("departments");
/// Every chat, closed ones until their retention ends.
const CHATS: TableDefinition<u64, &[u8]> = TableDefinition::new("chats");
/// Key: (chat id, message id).
const MESSAGES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("messages");
/// Closed chats: id → when it closed (Unix ms); and the same by time, for retention.
const CLOSED: TableDefinition<u64, u64> = TableDefinition::new("closed_chats");
const CLOSED_AT: TableDefinition<(u64, u64), ()> = TableDefinition::new("closed_chats_by_time");
/// The hub's own small values: [`Write::Meta`] and the feed's bookkeeping.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Above every chat id ever written: allocated ids never repeat after retention deleted the
/// newest closed chats.
const NEXT_CHAT: &str = "next_chat_id";
/// Rows one clean-up transaction removes at most, so writes never wait long for it.
const CLEAN_BATCH: usize = 10_000;

/// redb's page cache. Its default (1 GiB) grows with the file: the closed chats and the
/// events the store keeps would show up as the hub's memory. The OS page cache still keeps
/// hot pages close.
const CACHE_BYTES: usize = 8 << 20;

/// Writes taken into one transaction at most.
const MAX_GROUP: usize = 4096;

pub struct Embedded {
    /// Dropped by `close`, which releases the file lock (a restart in the same process).
    db: Mutex<Option<Arc<Database>>>,
    queue: Queue,
    writer: Mutex<Option<JoinHandle<()>>>,
    healthy: Arc<AtomicBool>,
    /// The newest event id, for waiters of the feed.
    events: watch::Receiver<u64>,
}

impl Embedded {
    pub fn open(dir: &Path) -> Result<Embedded, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| backend(format!("{}: {e}", dir.display())))?;
        let path = dir.join("presence-hub.redb");
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| backend(format!("{}: {e}", path.display())))?;
        let db = Arc::new(db);
        let last_event = {
            let txn = db.begin_write().map_err(backend)?;
            txn.open_table(OPERATORS).map_err(backend)?;
            txn.open_table(DEPARTMENTS).map_err(backend)?;
            txn.open_table(CHATS).map_err(backend)?;
            txn.open_table(MESSAGES).map_err(backend)?;
            txn.open_table(CLOSED).map_err(backend)?;
            txn.open_table(CLOSED_AT).map_err(backend)?;
            let last = {
                let events = txn.open_table(EVENTS).map_err(backend)?;
                let meta = txn.open_table(META).map_err(backend)?;
                let last = feed::last_id(&events)?;
                last.max(meta_u64(&meta, EVENTS_DROPPED)?)
            };
            txn.open_table(LOG).map_err(backend)?;
            txn.open_table(SESSIONS).map_err(backend)?;
            txn.open_table(LOG_BY_TIME).map_err(backend)?;
            txn.open_table(SESSIONS_BY_END).map_err(backend)?;
            txn.open_table(SESSION_STATE).map_err(backend)?;
            txn.commit().map_err(backend)?;
            last
        };
        let (queue, rx) = Queue::new();
        let healthy = Arc::new(AtomicBool::new(true));
        let (signal, events) = watch::channel(last_event);
        let writer = {
            let db = db.clone();
            let healthy = healthy.clone();
            let gate = queue.gate.clone();
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || writer::writer_loop(&db, rx, &gate, &healthy, signal))
                .map_err(|e| backend(e.to_string()))?
        };
        Ok(Embedded {
            db: Mutex::new(Some(db)),
            queue,
            writer: Mutex::new(Some(writer)),
            healthy,
            events,
        })
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db.lock().clone().ok_or(StoreError::Closed)
    }
}

fn meta_u64<T: ReadableTable<&'static str, &'static [u8]>>(
    meta: &T,
    key: &str,
) -> Result<u64, StoreError> {
    Ok(meta
        .get(key)
        .map_err(backend)?
        .and_then(|v| std::str::from_utf8(v.value()).ok()?.parse().ok())
        .unwrap_or(0))
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn ready<T: Send + 'static>(v: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(v))
}

fn read_all<K, T>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<K, &[u8]>,
) -> Result<Vec<(K::SelfType<'static>, T)>, StoreError>
where
    K: redb::Key + 'static,
    for<'a> K::SelfType<'a>: ToOwned<Owned = K::SelfType<'static>>,
    T: serde::de::DeserializeOwned,
{
    let table = txn.open_table(def).map_err(backend)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(backend)? {
        let (k, v) = row.map_err(backend)?;
        let value = serde_json::from_slice(v.value())
            .map_err(|e| backend(format!("corrupt record: {e}")))?;
        out.push((k.value().to_owned(), value));
    }
    Ok(out)
}

impl Store for Embedded {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(backend)?;
        let closed = txn.open_table(CLOSED).map_err(backend)?;
        let is_closed = |id: u64| closed.get(id).map(|v| v.is_some()).unwrap_or(false);
        let mut chats = Vec::new();
        let meta = txn.open_table(META).map_err(backend)?;
        let mut next_chat_id = meta_u64(&meta, NEXT_CHAT)?.max(1);
        {
            let table = txn.open_table(CHATS).map_err(backend)?;
            for row in table.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                next_chat_id = next_chat_id.max(k.value() + 1);
                if !is_closed(k.value()) {
                    chats.push(chat_row(v.value())?);
                }
            }
        }
        let mut messages = Vec::new();
        {
            let table = txn.open_table(MESSAGES).map_err(backend)?;
            for row in table.iter().map_err(backend)? {
                let (k, v) = row.map_err(backend)?;
                let (chat, _) = k.value();
                if !is_closed(chat) {
                    messages.push((ChatId(chat), parse(v.value())?));
                }
            }
        }
        Ok(Snapshot {
            operators: read_all(&txn, OPERATORS)?
                .into_iter()
                .map(|(_, v)| v)
                .collect(),
            departments: read_all(&txn, DEPARTMENTS)?
                .into_iter()
                .map(|(_, v)| v)
                .collect(),
            chats,
            messages,
            next_chat_id,
            open_sessions: read_all::<u64, SessionState>(&txn, SESSION_STATE)?
                .into_iter()
                .filter_map(|(op, st)| st.open.map(|s| (OperatorId(op), s)))
                .collect(),
        })
    }

    fn read_log(
        &self,
        operator: OperatorId,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<LogEntry>, StoreError>> {
        let db = self.db();
        Box::pin(async move {
            let db = db?;
            tokio::task::spawn_blocking(move || read_log(&db, operator.0, limit))
                .await
                .map_err(backend)?
        })
    }

    fn read_sessions(
        &self,
        operators: Vec<OperatorId>,
        from: u64,
        to: u64,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        let db = self.db();
        let operators: Vec<u64> = operators.into_iter().map(|o| o.0).collect();
        Box::pin(async move {
            let db = db?;
            tokio::task::spawn_blocking(move || read_sessions(&db, &operators, from, to))
                .await
                .map_err(backend)?
        })
    }

    fn write(&self, batch: Vec<Write>) -> Ticket {
        self.queue.push(batch)
    }

    fn ready(&self) -> bool {
        self.queue.is_open() && self.healthy.load(Ordering::Relaxed)
    }

    fn diverged(&self) -> watch::Receiver<u64> {
        self.queue.diverged()
    }

    fn resume(&self) {
        self.queue.resume();
    }

    fn close(&self) {
        self.queue.close();
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
        drop(self.db.lock().take());
    }

    fn read_events(
        &self,
        from: Position,
        limit: usize,
        types: Types,
    ) -> BoxFuture<'_, Result<Page, FeedError>> {
        ready(
            self.db()
                .map_err(FeedError::from)
                .and_then(|db| feed::read_events(&db, &from, limit, &types)),
        )
    }

    fn last_event_id(&self) -> BoxFuture<'_, Result<Option<String>, StoreError>> {
        let last = *self.events.borrow();
        ready(Ok((last > 0).then(|| last.to_string())))
    }

    fn event_signal(&self) -> watch::Receiver<u64> {
        self.events.clone()
    }

    fn stored_chat(&self, id: ChatId) -> BoxFuture<'_, Result<Option<Chat>, StoreError>> {
        ready(self.db().and_then(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(CHATS).map_err(backend)?;
            let row = table.get(id.0).map_err(backend)?;
            row.map(|v| chat_row(v.value())).transpose()
        }))
    }

    fn stored_messages(
        &self,
        chat: ChatId,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<ChatMessage>, StoreError>> {
        let chat = chat.0;
        ready(self.db().and_then(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(MESSAGES).map_err(backend)?;
            let mut out = Vec::new();
            let from = (chat, after.saturating_add(1));
            for row in table
                .range(from..=(chat, u64::MAX))
                .map_err(backend)?
                .take(limit)
            {
                let (_, v) = row.map_err(backend)?;
                out.push(parse(v.value())?);
            }
            Ok(out)
        }))
    }

    fn closed_chats(
        &self,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<super::ClosedPage, StoreError>> {
        ready(self.db().and_then(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let closed = txn.open_table(CLOSED).map_err(backend)?;
            let chats = txn.open_table(CHATS).map_err(backend)?;
            let mut page = super::ClosedPage::default();
            for row in closed
                .range(after.saturating_add(1)..)
                .map_err(backend)?
                .take(limit)
            {
                let (k, _) = row.map_err(backend)?;
                page.scanned += 1;
                page.last = Some(k.value());
                if let Some(v) = chats.get(k.value()).map_err(backend)? {
                    page.chats.push(chat_row(v.value())?);
                }
            }
            Ok(page)
        }))
    }

    fn meta(&self, key: &'static str) -> BoxFuture<'_, Result<Option<String>, StoreError>> {
        ready(self.db().and_then(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let meta = txn.open_table(META).map_err(backend)?;
            let v = meta.get(key).map_err(backend)?;
            Ok(v.map(|v| String::from_utf8_lossy(v.value()).into_owned()))
        }))
    }

    fn hold_role(
        &self,
        _name: &'static str,
        _token: &str,
        _ttl: std::time::Duration,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        ready(self.db().map(|_| true))
    }

    fn release_role(
        &self,
        _name: &'static str,
        _token: &str,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        ready(Ok(()))
    }

    fn clean(&self, r: Retention) -> BoxFuture<'_, Result<bool, StoreError>> {
        let db = self.db();
        Box::pin(async move {
            let db = db?;
            tokio::task::spawn_blocking(move || clean(&db, r))
                .await
                .map_err(backend)?
        })
    }
}

/// One clean-up round: closed chats past retention (with their messages), then events
/// past their age or beyond the count; each bounded to [`CLEAN_BATCH`] rows.
fn clean(db: &Database, r: Retention) -> Result<bool, StoreError> {
    let txn = db.begin_write().map_err(backend)?;
    let mut more = clean_chats(&txn, &r)?;
    more |= feed::clean_events(&txn, &r)?;
    more |= audit::clean_audit(&txn, &r)?;
    txn.commit().map_err(backend)?;
    Ok(more)
}

/// Closed chats past `chats.retention`, with their messages.
fn clean_chats(txn: &redb::WriteTransaction, r: &Retention) -> Result<bool, StoreError> {
    let mut closed = txn.open_table(CLOSED).map_err(backend)?;
    let mut closed_at = txn.open_table(CLOSED_AT).map_err(backend)?;
    let mut chats = txn.open_table(CHATS).map_err(backend)?;
    let mut messages = txn.open_table(MESSAGES).map_err(backend)?;
    let expired: Vec<(u64, u64)> = closed_at
        .range((0, 0)..(r.chats_before_ms, 0))
        .map_err(backend)?
        .take(CLEAN_BATCH)
        .map(|row| row.map(|(k, _)| k.value()))
        .collect::<Result<_, _>>()
        .map_err(backend)?;
    let more = expired.len() == CLEAN_BATCH;
    for (at, id) in expired {
        closed_at.remove((at, id)).map_err(backend)?;
        closed.remove(id).map_err(backend)?;
        chats.remove(id).map_err(backend)?;
        messages
            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)
            .map_err(backend)?;
    }
    Ok(more)
}

/// A chat's row, in the binary form or the older JSON ([`records`]).
fn chat_row(v: &[u8]) -> Result<Chat, StoreError> {
    records::decode_chat(v).map_err(|e| backend(format!("corrupt chat record: {e}")))
}

fn parse<T: serde::de::DeserializeOwned>(v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| backend(format!("corrupt record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{OperatorRecord, StoredOperator};
    use crate::presence::Settings;

    fn op(id: u64) -> StoredOperator {
        StoredOperator {
            record: OperatorRecord {
                id,
                name: format!("op{id}"),
                departments: vec![1],
                watch_departments: vec![],
                permissions: vec![],
                max_chats: 0,
                exclude_autoassign: false,
                auto_accept: false,
            },
            settings: Settings {
                online: false,
                invisible: true,
                always_online: true,
            },
            version: 1,
        }
    }

    #[tokio::test]
    async fn embedded_store_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Embedded::open(dir.path()).unwrap();
            super::super::durable(s.write(vec![
                Write::Operator { op: op(1), base: 0 },
                Write::Operator { op: op(2), base: 0 },
            ]))
            .await
            .unwrap();
            super::super::durable(s.write(vec![Write::DeleteOperator(OperatorId(2))]))
                .await
                .unwrap();
            s.close();
        }
        let s = Embedded::open(dir.path()).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.operators, vec![op(1)]);
        s.close();
    }

    #[tokio::test]
    async fn embedded_store_write_after_close_fails() {
        let dir = tempfile::tempdir().unwrap();
        let s = Embedded::open(dir.path()).unwrap();
        s.close();
        assert!(
            super::super::durable(s.write(vec![Write::Operator { op: op(1), base: 0 }]))
                .await
                .is_err()
        );
        assert!(!s.ready());
    }
    fn chat(id: u64, status: ChatStatus, version: u64) -> Chat {
        Chat {
            id,
            department: 1,
            status,
            owner: (status != ChatStatus::Pending).then_some(7),
            priority: 0,
            visitor: serde_json::json!({"name": format!("v{id}")}),
            created_at: "2026-12-01T21:00:00.000Z".into(),
            assigned_at: None,
            accepted_at: None,
            seq: id,
            visitor_token: format!("t{id}"),
            avoid: None,
            assign_reason: None,
            version,
        }
    }

    #[tokio::test]
    async fn embedded_store_reads_chat_rows_written_as_json_by_an_older_version() {
        let dir = tempfile::tempdir().unwrap();
        let (open, closed) = (
            chat(1, ChatStatus::Pending, 1),
            chat(2, ChatStatus::Closed, 4),
        );
        {
            // The rows as the version before the binary form wrote them.
            let s = Embedded::open(dir.path()).unwrap();
            let db = s.db().unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut chats = txn.open_table(CHATS).unwrap();
                for c in [&open, &closed] {
                    let row = serde_json::to_vec(c).unwrap();
                    chats.insert(c.id, row.as_slice()).unwrap();
                }
                txn.open_table(CLOSED).unwrap().insert(2, 10).unwrap();
                txn.open_table(CLOSED_AT)
                    .unwrap()
                    .insert((10, 2), ())
                    .unwrap();
            }
            txn.commit().unwrap();
            drop(db);
            s.close();
        }
        let s = Embedded::open(dir.path()).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.chats, vec![open.clone()]);
        assert_eq!(snap.next_chat_id, 3);
        assert_eq!(
            s.stored_chat(ChatId(2)).await.unwrap(),
            Some(closed.clone())
        );
        assert_eq!(s.closed_chats(0, 10).await.unwrap().chats, vec![closed]);
        // Written again, the chat is in the binary form and reads back the same.
        let changed = chat(1, ChatStatus::Active, 2);
        super::super::durable(s.write(vec![Write::Chat(changed.clone())]))
            .await
            .unwrap();
        let row = {
            let db = s.db().unwrap();
            let txn = db.begin_read().unwrap();
            let t = txn.open_table(CHATS).unwrap();
            t.get(1).unwrap().unwrap().value().to_vec()
        };
        assert_eq!(row[0], records::CHAT_V1);
        s.close();
        let s = Embedded::open(dir.path()).unwrap();
        assert_eq!(s.load().unwrap().chats, vec![changed]);
        s.close();
    }

    #[tokio::test]
    async fn embedded_store_writes_a_chat_once_per_group_in_its_last_state() {
        let dir = tempfile::tempdir().unwrap();
        let s = Embedded::open(dir.path()).unwrap();
        let last = chat(5, ChatStatus::Closed, 3);
        let other = chat(4, ChatStatus::Pending, 1);
        super::super::durable(s.write(vec![
            Write::Chat(chat(5, ChatStatus::Pending, 1)),
            Write::Chat(other.clone()),
            Write::Chat(chat(5, ChatStatus::Closed, 2)),
            Write::Chat(last.clone()),
        ]))
        .await
        .unwrap();
        assert_eq!(s.stored_chat(ChatId(5)).await.unwrap(), Some(last.clone()));
        // Filed as closed once, whichever of its states closed it.
        let page = s.closed_chats(0, 10).await.unwrap();
        assert_eq!((page.scanned, page.chats), (1, vec![last]));
        s.close();
        let s = Embedded::open(dir.path()).unwrap();
        let snap = s.load().unwrap();
        assert_eq!((snap.chats, snap.next_chat_id), (vec![other], 6));
        s.close();
    }
}

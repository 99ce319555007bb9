//! The embedded file store: one redb database in the data dir. A single writer thread
//! groups every write queued meanwhile into one transaction (group commit), so many writes
//! share one fsync and each is acknowledged only once its transaction is durable.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::mpsc;

use super::{Job, Queue, Snapshot, Store, StoreError, Ticket, Write};

const OPERATORS: TableDefinition<u64, &[u8]> = TableDefinition::new("operators");
const DEPARTMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("departments");
const CHATS: TableDefinition<u64, &[u8]> = TableDefinition::new("chats");
/// Key: (chat id, message id).
const MESSAGES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("messages");

/// Writes taken into one transaction at most.
const MAX_GROUP: usize = 4096;

pub struct Embedded {
    /// Dropped by `close`, which releases the file lock (a restart in the same process).
    db: Mutex<Option<std::sync::Arc<Database>>>,
    queue: Queue,
    writer: Mutex<Option<JoinHandle<()>>>,
    healthy: std::sync::Arc<AtomicBool>,
}

impl Embedded {
    pub fn open(dir: &Path) -> Result<Embedded, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| backend(format!("{}: {e}", dir.display())))?;
        let path = dir.join("presence-hub.redb");
        let db =
            Database::create(&path).map_err(|e| backend(format!("{}: {e}", path.display())))?;
        let db = std::sync::Arc::new(db);
        {
            let txn = db.begin_write().map_err(backend)?;
            txn.open_table(OPERATORS).map_err(backend)?;
            txn.open_table(DEPARTMENTS).map_err(backend)?;
            txn.open_table(CHATS).map_err(backend)?;
            txn.open_table(MESSAGES).map_err(backend)?;
            txn.commit().map_err(backend)?;
        }
        let (queue, rx) = Queue::new();
        let healthy = std::sync::Arc::new(AtomicBool::new(true));
        let writer = {
            let db = db.clone();
            let healthy = healthy.clone();
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || writer_loop(&db, rx, &healthy))
                .map_err(|e| backend(e.to_string()))?
        };
        Ok(Embedded {
            db: Mutex::new(Some(db)),
            queue,
            writer: Mutex::new(Some(writer)),
            healthy,
        })
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn writer_loop(db: &Database, mut rx: mpsc::UnboundedReceiver<Job>, healthy: &AtomicBool) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let result = commit(db, jobs.iter().flat_map(|(w, _)| w.iter()));
        if let Err(e) = &result {
            tracing::error!(cause = %e, "store commit failed");
        }
        healthy.store(result.is_ok(), Ordering::Relaxed);
        for (_, ack) in jobs {
            let _ = ack.send(result.clone());
        }
    }
}

fn commit<'a>(db: &Database, writes: impl Iterator<Item = &'a Write>) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(backend)?;
    {
        let mut operators = txn.open_table(OPERATORS).map_err(backend)?;
        let mut departments = txn.open_table(DEPARTMENTS).map_err(backend)?;
        let mut chats = txn.open_table(CHATS).map_err(backend)?;
        let mut messages = txn.open_table(MESSAGES).map_err(backend)?;
        for w in writes {
            match w {
                Write::Operator(o) => {
                    operators
                        .insert(o.record.id, json(o).as_slice())
                        .map_err(backend)?;
                }
                Write::DeleteOperator(id) => {
                    operators.remove(*id).map_err(backend)?;
                }
                Write::Department(d) => {
                    departments
                        .insert(d.id, json(d).as_slice())
                        .map_err(backend)?;
                }
                Write::Chat(c) => {
                    chats.insert(c.id, json(c).as_slice()).map_err(backend)?;
                }
                Write::Message(chat, m) => {
                    messages
                        .insert((*chat, m.id), json(m).as_slice())
                        .map_err(backend)?;
                }
                Write::TrimMessages { chat, below } => {
                    messages
                        .retain_in((*chat, 0)..(*chat, *below), |_, _| false)
                        .map_err(backend)?;
                }
            }
        }
    }
    txn.commit().map_err(backend)
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
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
        let db = self.db.lock().clone().ok_or(StoreError::Closed)?;
        let txn = db.begin_read().map_err(backend)?;
        Ok(Snapshot {
            operators: read_all(&txn, OPERATORS)?
                .into_iter()
                .map(|(_, v)| v)
                .collect(),
            departments: read_all(&txn, DEPARTMENTS)?
                .into_iter()
                .map(|(_, v)| v)
                .collect(),
            chats: read_all(&txn, CHATS)?.into_iter().map(|(_, v)| v).collect(),
            messages: read_all(&txn, MESSAGES)?
                .into_iter()
                .map(|((chat, _), m)| (chat, m))
                .collect(),
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
            let _ = writer.join();
        }
        drop(self.db.lock().take());
    }
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
            super::super::durable(s.write(vec![Write::Operator(op(1)), Write::Operator(op(2))]))
                .await
                .unwrap();
            super::super::durable(s.write(vec![Write::DeleteOperator(2)]))
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
            super::super::durable(s.write(vec![Write::Operator(op(1))]))
                .await
                .is_err()
        );
        assert!(!s.ready());
    }
}

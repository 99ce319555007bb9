//! Persistence behind one trait with two backends: the embedded file store (redb) and Redis.
//! The hub above does not know which one it talks to. Writes are queued in order and
//! acknowledged through a [`Ticket`] once durable; the hub acknowledges a client only then.

pub mod embedded;
pub mod redis;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::model::{Chat, ChatMessage, Department, StoredOperator};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Backend(String),
    #[error("store is closed")]
    Closed,
}

/// Everything persisted, read once at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub operators: Vec<StoredOperator>,
    pub departments: Vec<Department>,
    pub chats: Vec<Chat>,
    /// Chat id and message, oldest first within a chat.
    pub messages: Vec<(u64, ChatMessage)>,
}

/// One change to persist.
#[derive(Debug, Clone)]
pub enum Write {
    Operator(StoredOperator),
    DeleteOperator(u64),
    Department(Department),
    Chat(Chat),
    Message(u64, ChatMessage),
    /// Drops the messages of `chat` with an id below `below` (history limit).
    TrimMessages {
        chat: u64,
        below: u64,
    },
}

/// Resolves once the writes it stands for are durable (or failed).
pub type Ticket = oneshot::Receiver<Result<(), StoreError>>;

pub trait Store: Send + Sync + 'static {
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Queues writes; called under the hub's lock so the order of writes is the order of
    /// changes. Must not block.
    fn write(&self, batch: Vec<Write>) -> Ticket;
    /// True while the store can take writes (`/readyz`).
    fn ready(&self) -> bool;
    /// Makes every queued write durable and stops; later writes fail.
    fn close(&self);
}

/// Waits for a ticket.
pub async fn durable(ticket: Ticket) -> Result<(), StoreError> {
    ticket.await.unwrap_or(Err(StoreError::Closed))
}

/// A ticket that is already resolved (nothing to write).
pub fn done() -> Ticket {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(Ok(()));
    rx
}

/// Writes queued for a store's writer, with the sender of their ticket.
pub(crate) type Job = (Vec<Write>, oneshot::Sender<Result<(), StoreError>>);

/// The queue into a store's single writer: keeps the order of changes, refuses once closed.
pub(crate) struct Queue(Mutex<Option<mpsc::UnboundedSender<Job>>>);

impl Queue {
    pub(crate) fn new() -> (Queue, mpsc::UnboundedReceiver<Job>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Queue(Mutex::new(Some(tx))), rx)
    }

    pub(crate) fn push(&self, batch: Vec<Write>) -> Ticket {
        let (ack, ticket) = oneshot::channel();
        let refused = match self.0.lock().as_ref() {
            Some(tx) => tx.send((batch, ack)).err().map(|e| e.0.1),
            None => Some(ack),
        };
        if let Some(ack) = refused {
            let _ = ack.send(Err(StoreError::Closed));
        }
        ticket
    }

    pub(crate) fn is_open(&self) -> bool {
        self.0.lock().is_some()
    }

    /// Stops taking writes; the writer ends once it has applied what was queued.
    pub(crate) fn close(&self) {
        drop(self.0.lock().take());
    }
}

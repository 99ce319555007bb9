//! Persistence behind one trait with two backends: the embedded file store (redb) and Redis.
//! The hub above does not know which one it talks to. Writes are queued in order and
//! acknowledged through a [`Ticket`] once durable; the hub acknowledges a client only then.

pub mod embedded;
pub mod redis;
mod redis_feed;
mod redis_write;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};

use crate::audit::{LogEntry, SessionRecord, StoredLog};
use crate::feed::{FeedError, LogEvent, Page, Position, Types};
use crate::model::{Chat, ChatId, ChatMessage, Department, OperatorId, StoredOperator};
use crate::presence::Reason;

pub use crate::error::StoreError;

/// Everything live that is persisted, read once at start. Closed chats stay in the store
/// (for `chats.retention`) but are not part of it.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub operators: Vec<StoredOperator>,
    pub departments: Vec<Department>,
    /// Chats not closed.
    pub chats: Vec<Chat>,
    /// Chat id and message, oldest first within a chat.
    pub messages: Vec<(ChatId, ChatMessage)>,
    /// Above every chat id ever stored (closed chats included): allocated ids never repeat.
    pub next_chat_id: u64,
    /// Online sessions still open: (operator, started, ms since the epoch).
    pub open_sessions: Vec<(OperatorId, u64)>,
}

/// One change to persist.
#[derive(Debug, Clone)]
pub enum Write {
    /// The writes of this batch apply only while this token holds the assigner lease
    /// (Redis; the embedded store has one process and no lease).
    Fence(std::sync::Arc<str>),
    /// An operator record; `base` is the version the change was made from (0: there was
    /// none). On Redis the write is refused (a conflict) unless the stored record still has
    /// that version, so two nodes changing one operator at once cannot overwrite each other.
    Operator {
        op: StoredOperator,
        base: u64,
    },
    DeleteOperator(OperatorId),
    /// A department as now, written only if the store still holds version `base` of it
    /// (0: none), like [`Write::Operator`].
    Department {
        dept: Department,
        base: u64,
    },
    Chat(Chat),
    Message(ChatId, ChatMessage),
    /// Drops the messages of `chat` with an id below `below` (history limit).
    TrimMessages {
        chat: ChatId,
        below: u64,
    },
    /// Appends to the event feed, in the same step as the records of its change.
    Event(LogEvent),
    /// A small named value of the hub's own (the webhook position).
    Meta {
        key: &'static str,
        value: String,
    },
    /// A settings change for the status log.
    Log(StoredLog),
    /// The operator turned online at `at` (ms): opens a session unless one is open or one
    /// already ended after `at` ([`crate::audit::SessionState::start`]).
    SessionStart {
        operator: OperatorId,
        at: u64,
    },
    /// The operator turned offline at `at` (ms): ends the open session if it began by then.
    SessionEnd {
        operator: OperatorId,
        at: u64,
        reason: Reason,
    },
    /// A replication note of this node for the others (Redis: one entry of the `{prefix}log`
    /// stream per write group, with the group's notes in order). The embedded store runs
    /// alone and ignores it.
    Note(NoteWrite),
    /// Cluster: the outcome of a chat change another node forwarded, recorded under its
    /// call id in the same atomic step as the change's writes (Redis: `{prefix}call:{id}`,
    /// kept [`CallDone::ttl_ms`]). The whole step is refused unless the record is still the
    /// claim of the lease token the step is fenced with (`running:{token}`): a forwarded
    /// change is applied at most once, and never once its caller settled it otherwise. The
    /// embedded store runs alone and ignores it.
    CallDone(CallDone),
}

/// See [`Write::CallDone`].
#[derive(Debug, Clone)]
pub struct CallDone {
    /// The call id (unique across nodes and restarts).
    pub id: String,
    /// The answer as the caller reads it (JSON).
    pub reply: String,
    /// How long the outcome is kept, past any settling of its caller.
    pub ttl_ms: u64,
}

/// One replication note, serialized, and what it changes in the sender's connection
/// counts (`{prefix}conns:{node}`), written in the same step.
#[derive(Debug, Clone)]
pub struct NoteWrite {
    /// The sending node.
    pub node: String,
    /// The note as JSON: one element of the stream entry's `notes` array.
    pub json: String,
    pub conns: Conns,
}

/// What a note changes in `{prefix}conns:{node}`.
#[derive(Debug, Clone)]
pub enum Conns {
    Keep,
    /// One operator's connections now: (operator, all, idle); `all` 0 removes the field.
    One(OperatorId, u32, u32),
    /// Every count of the node, replacing the hash.
    All(Vec<(OperatorId, u32, u32)>),
}

/// A page of closed chats. A chat retention deleted while the page was read is scanned but
/// missing: `scanned` and `last` tell where the scan really got to.
#[derive(Debug, Default)]
pub struct ClosedPage {
    pub chats: Vec<Chat>,
    pub scanned: usize,
    pub last: Option<u64>,
}

/// What the periodic clean-up drops (Unix milliseconds).
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Closed chats closed before this go, with their messages.
    pub chats_before_ms: u64,
    /// Events made before this go.
    pub events_before_ms: u64,
    /// At most this many events are kept.
    pub max_events: u64,
    /// Status log entries made, and online sessions ended, before this go.
    pub audit_before_ms: u64,
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
    /// The status log of an operator, newest first, at most `limit` entries.
    fn read_log(
        &self,
        operator: OperatorId,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<LogEntry>, StoreError>>;
    /// Sessions of `operators` that overlap `[from, to)` (ms), the open ones included, in
    /// the order they started.
    fn read_sessions(
        &self,
        operators: Vec<OperatorId>,
        from: u64,
        to: u64,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>>;
    /// Makes every queued write durable and stops; later writes fail.
    fn close(&self);
    /// Changes when a write failed: the hub's state may now differ from the store's, and
    /// every write queued since is refused until [`Store::resume`].
    fn diverged(&self) -> watch::Receiver<u64>;
    /// Takes writes again; called once the hub rebuilt its state from the store.
    fn resume(&self);
    /// True while the writer is still finding out whether a write whose answer was lost
    /// was applied: the store cannot be read for a rebuild yet (it may still change).
    fn settling(&self) -> bool {
        false
    }

    /// Up to `limit` events from `from`, oldest first, of the `types` asked for.
    fn read_events(
        &self,
        from: Position,
        limit: usize,
        types: Types,
    ) -> BoxFuture<'_, Result<Page, FeedError>>;
    /// The newest event's id (`after=$`).
    fn last_event_id(&self) -> BoxFuture<'_, Result<Option<String>, StoreError>>;
    /// Changes whenever events were added (by this node or, on Redis, any node).
    fn event_signal(&self) -> watch::Receiver<u64>;
    /// A chat as stored, also a closed one (until its retention ends).
    fn stored_chat(&self, id: ChatId) -> BoxFuture<'_, Result<Option<Chat>, StoreError>>;
    /// Kept messages of a chat with an id above `after`, oldest first.
    fn stored_messages(
        &self,
        chat: ChatId,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<ChatMessage>, StoreError>>;
    /// Closed chats with an id above `after`, in id order, `limit` ids scanned at most.
    fn closed_chats(
        &self,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<ClosedPage, StoreError>>;
    /// A value written with [`Write::Meta`].
    fn meta(&self, key: &'static str) -> BoxFuture<'_, Result<Option<String>, StoreError>>;
    /// Drops what retention no longer keeps, a bounded batch per call; true when more is
    /// left to drop (the caller goes on at once).
    fn clean(&self, r: Retention) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// Takes or renews the role `name` for `ttl` while no other holder has it (one
    /// webhook deliverer in a cluster); always true on the embedded store (one process).
    fn hold_role(
        &self,
        name: &'static str,
        token: &str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// Gives the role up if `token` still holds it.
    fn release_role(
        &self,
        name: &'static str,
        token: &str,
    ) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// The webhook deliverer's position: the id of the last event delivered.
pub const WEBHOOK_POSITION: &str = "webhook_position";

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

/// Writes queued for a store's writer, with the sender of their ticket and the generation
/// of the hub's state they were computed from (see [`Gate`]).
pub(crate) struct Job {
    pub(crate) writes: Vec<Write>,
    pub(crate) ack: oneshot::Sender<Result<(), StoreError>>,
    generation: u64,
}

/// Keeps "an error means it did not happen" true after a failed write. The hub applied the
/// failed change (and every change queued behind it) in memory already; the store refuses
/// every write of that generation, so none of them lands later, and tells the hub
/// ([`Store::diverged`]), which rebuilds its state from the store and then calls
/// [`Store::resume`]: writes of the new generation are taken again.
pub(crate) struct Gate {
    generation: std::sync::atomic::AtomicU64,
    /// Jobs of this generation or older are refused; 0: none.
    refused: std::sync::atomic::AtomicU64,
    signal: watch::Sender<u64>,
    settling: std::sync::atomic::AtomicBool,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            generation: 1.into(),
            refused: 0.into(),
            signal: watch::channel(0).0,
            settling: false.into(),
        }
    }

    pub(crate) fn settling(&self, on: bool) {
        self.settling
            .store(on, std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn is_settling(&self) -> bool {
        self.settling.load(std::sync::atomic::Ordering::Acquire)
    }

    /// True when the job may be written.
    pub(crate) fn admits(&self, job: &Job) -> bool {
        job.generation > self.refused.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A write of `job`'s generation failed: refuse the rest of it and tell the hub.
    pub(crate) fn fail(&self, job: &Job) {
        use std::sync::atomic::Ordering;
        if self.refused.fetch_max(job.generation, Ordering::AcqRel) < job.generation {
            self.signal.send_replace(job.generation);
        }
    }

    fn resume(&self) {
        use std::sync::atomic::Ordering;
        let refused = self.refused.load(Ordering::Acquire);
        self.generation.fetch_max(refused + 1, Ordering::AcqRel);
    }
}

/// The queue into a store's single writer: keeps the order of changes, refuses once closed.
pub(crate) struct Queue {
    tx: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    pub(crate) gate: std::sync::Arc<Gate>,
}

impl Queue {
    pub(crate) fn new() -> (Queue, mpsc::UnboundedReceiver<Job>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let gate = std::sync::Arc::new(Gate::new());
        (
            Queue {
                tx: Mutex::new(Some(tx)),
                gate,
            },
            rx,
        )
    }

    pub(crate) fn push(&self, writes: Vec<Write>) -> Ticket {
        let (ack, ticket) = oneshot::channel();
        let generation = self
            .gate
            .generation
            .load(std::sync::atomic::Ordering::Acquire);
        let job = Job {
            writes,
            ack,
            generation,
        };
        let refused = match self.tx.lock().as_ref() {
            Some(tx) => tx.send(job).err().map(|e| e.0.ack),
            None => Some(job.ack),
        };
        if let Some(ack) = refused {
            let _ = ack.send(Err(StoreError::Closed));
        }
        ticket
    }

    pub(crate) fn is_open(&self) -> bool {
        self.tx.lock().is_some()
    }

    /// Stops taking writes; the writer ends once it has applied what was queued.
    pub(crate) fn close(&self) {
        drop(self.tx.lock().take());
    }

    /// Bumped with each failed write: the hub must rebuild from the store.
    pub(crate) fn diverged(&self) -> watch::Receiver<u64> {
        self.gate.signal.subscribe()
    }

    pub(crate) fn resume(&self) {
        self.gate.resume();
    }
}

/// Answers the jobs a writer refuses without trying them (their generation failed).
pub(crate) fn refuse(job: Job) {
    let _ = job.ack.send(Err(StoreError::Unavailable(
        "an earlier write failed; state is being reloaded".into(),
    )));
}

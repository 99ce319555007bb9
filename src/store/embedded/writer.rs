//! The embedded store's single writer thread: every write queued while one group commits
//! is the next group, written in one redb transaction (one fsync) and acknowledged once it
//! is durable.
//!
//! What keeps a commit cheap: a group opens only the tables it writes (opening all of them
//! cost a connect's commit as much as its rows); a chat changed several times in a group is
//! written once, its last state (the same durable outcome as writing each in turn: the
//! group commits whole or not at all), in key order; rows are encoded into one buffer the
//! group reuses ([`records`]).
//!
//! Under load a group waits a little for more writes before it commits ([`Linger`]): a
//! commit costs about the same for one write as for fifty (redb rewrites the same pages
//! and syncs once), so fewer, larger groups are most of what a busy store saves.
//!
//! Durability: redb's default, [`redb::Durability::Immediate`] (its single-phase commit with
//! checksummed roots): `commit` returns once the group's pages and the new root are fsynced,
//! so an acknowledged change survives kill -9 and a power cut. Nothing here weakens it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::records::encode_chat;
use super::*;

/// The table in `slot`, opened in `txn` if it is not yet.
fn open<'s, 't, K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &'t redb::WriteTransaction,
    slot: &'s mut Option<redb::Table<'t, K, V>>,
    def: TableDefinition<K, V>,
) -> Result<&'s mut redb::Table<'t, K, V>, StoreError> {
    if slot.is_none() {
        *slot = Some(txn.open_table(def).map_err(backend)?);
    }
    Ok(slot.as_mut().expect("opened just above"))
}

/// [`Tables`]: one slot per table, and `Tables::$name()` opening it on first use.
macro_rules! tables {
    ($($name:ident: $def:expr => $k:ty, $v:ty;)*) => {
        /// The tables of one transaction, each opened the first time the group writes to it.
        struct Tables<'t> {
            txn: &'t redb::WriteTransaction,
            $($name: Option<redb::Table<'t, $k, $v>>,)*
        }

        impl<'t> Tables<'t> {
            fn new(txn: &'t redb::WriteTransaction) -> Self {
                Tables { txn, $($name: None),* }
            }
            $(
                fn $name(&mut self) -> Result<&mut redb::Table<'t, $k, $v>, StoreError> {
                    open(self.txn, &mut self.$name, $def)
                }
            )*
        }
    };
}

tables! {
    operators: OPERATORS => u64, &'static [u8];
    departments: DEPARTMENTS => u64, &'static [u8];
    chats: CHATS => u64, &'static [u8];
    messages: MESSAGES => (u64, u64), &'static [u8];
    closed: CLOSED => u64, u64;
    closed_at: CLOSED_AT => (u64, u64), ();
    events: EVENTS => u64, &'static [u8];
    meta: META => &'static str, &'static [u8];
    log: LOG => (u64, u64), &'static [u8];
    log_by_time: LOG_BY_TIME => (u64, u64), ();
    sessions: SESSIONS => (u64, u64, u64), &'static [u8];
    sessions_by_end: SESSIONS_BY_END => (u64, u64, u64), ();
    states: SESSION_STATE => u64, &'static [u8];
}

/// How long a group waits for more writes when the store is busy: PostgreSQL's
/// `commit_delay`. In a storm of operator connects (`presence-loadtest churn`, about 15,000
/// writes/s) 2 ms cut the hub's CPU per connect to 0.6-0.7 × and raised the connects/s
/// 1.4-1.5 ×; 4 ms did no better (docs/benchmarks.md, "Session 2026-12-02").
const COMMIT_DELAY: Duration = Duration::from_millis(2);

/// Writes in the last group that say the store is busy (PostgreSQL's `commit_siblings`):
/// a group of fewer is followed by one committed at once, so a write that comes alone (a
/// settings change, a widget flip) never waits for company that is not coming.
const BUSY: usize = 4;

/// Whether a group waits before it commits: only right after a busy group (of [`BUSY`]
/// writes or more, committed within [`COMMIT_DELAY`]: a write after a pause is alone), and
/// only while there is room for more.
#[derive(Default)]
struct Linger {
    /// Writes of the last group committed, and when its commit ended.
    last: Option<(usize, Instant)>,
}

impl Linger {
    /// The wait before committing a group of `queued` writes at `now`, if any.
    fn wait(&self, queued: usize, now: Instant) -> Option<Duration> {
        let (n, ended) = self.last?;
        let busy = n >= BUSY && now.saturating_duration_since(ended) < COMMIT_DELAY;
        (busy && queued < MAX_GROUP).then_some(COMMIT_DELAY)
    }

    /// A group of `n` writes was committed (refused writes are not counted), ending at `now`.
    fn committed(&mut self, n: usize, now: Instant) {
        self.last = Some((n, now));
    }
}

/// Moves the writes queued now into `jobs`, up to [`MAX_GROUP`].
fn take_queued(rx: &mut mpsc::UnboundedReceiver<Job>, jobs: &mut Vec<Job>) {
    while jobs.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
}

pub(super) fn writer_loop(
    db: &Database,
    mut rx: mpsc::UnboundedReceiver<Job>,
    gate: &Gate,
    healthy: &AtomicBool,
    signal: watch::Sender<u64>,
) {
    let mut last_event = *signal.borrow();
    let mut buf = Vec::new();
    let mut linger = Linger::default();
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        take_queued(&mut rx, &mut jobs);
        if let Some(wait) = linger.wait(jobs.len(), Instant::now())
            && !rx.is_closed()
        {
            std::thread::sleep(wait);
            take_queued(&mut rx, &mut jobs);
        }
        // Jobs computed on top of a failed write are refused, never written.
        let (jobs, refused): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| gate.admits(j));
        refused.into_iter().for_each(super::super::refuse);
        if jobs.is_empty() {
            linger = Linger::default();
            continue;
        }
        let result = commit(
            db,
            jobs.iter().flat_map(|j| j.writes.iter()),
            last_event,
            &mut buf,
        );
        if let Err(e) = &result {
            tracing::error!(cause = %e, "store commit failed; the hub reloads its state");
            gate.fail(&jobs[0]);
        }
        healthy.store(result.is_ok(), Ordering::Relaxed);
        if let Ok(last) = result
            && last != last_event
        {
            last_event = last;
            signal.send_replace(last);
        }
        linger.committed(jobs.len(), Instant::now());
        for j in jobs {
            let _ = j.ack.send(result.clone().map(|_| ()));
        }
    }
}

/// A chat's last state in a group, and whether any of its states there was closed.
type LastChats<'a> = BTreeMap<u64, (&'a Chat, bool)>;

/// Writes one group in one transaction; answers the newest event id after it. `buf` is
/// the encoding buffer, kept across groups.
pub(super) fn commit<'a>(
    db: &Database,
    writes: impl Iterator<Item = &'a Write>,
    mut last_event: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, StoreError> {
    let txn = db.begin_write().map_err(backend)?;
    {
        let mut t = Tables::new(&txn);
        // The group's events, packed into as few rows as they fit in.
        let mut packer = Packer::default();
        let mut chats = LastChats::new();
        for w in writes {
            match w {
                Write::Operator { op: o, .. } => {
                    json_into(buf, o);
                    t.operators()?
                        .insert(o.record.id, buf.as_slice())
                        .map_err(backend)?;
                }
                Write::DeleteOperator(id) => {
                    t.operators()?.remove(id.0).map_err(backend)?;
                }
                Write::Department { dept: d, .. } => {
                    json_into(buf, d);
                    t.departments()?
                        .insert(d.id, buf.as_slice())
                        .map_err(backend)?;
                }
                Write::Chat(c) => {
                    let closed = c.status == ChatStatus::Closed;
                    chats
                        .entry(c.id)
                        .and_modify(|e| *e = (c, e.1 || closed))
                        .or_insert((c, closed));
                }
                Write::Message(chat, m) => {
                    json_into(buf, m);
                    t.messages()?
                        .insert((chat.0, m.id), buf.as_slice())
                        .map_err(backend)?;
                }
                Write::TrimMessages { chat, below } => {
                    t.messages()?
                        .retain_in((chat.0, 0)..(chat.0, *below), |_, _| false)
                        .map_err(backend)?;
                }
                Write::Event(e) => {
                    last_event += 1;
                    packer.push(last_event, kind_byte(e.kind), e.at_ms, e.frame.as_bytes());
                    if packer.full() {
                        packer.flush(t.events()?)?;
                    }
                }
                Write::Meta { key, value } => {
                    t.meta()?.insert(*key, value.as_bytes()).map_err(backend)?;
                }
                Write::Fence(_) | Write::Note(_) | Write::CallDone(_) => {}
                Write::Log(l) => {
                    json_into(buf, l);
                    t.log()?
                        .insert((l.entry.operator, l.seq), buf.as_slice())
                        .map_err(backend)?;
                    t.log_by_time()?
                        .insert((l.seq, l.entry.operator), ())
                        .map_err(backend)?;
                }
                Write::SessionStart { operator, at } => {
                    let mut st = session_state(t.states()?, operator.0)?;
                    if st.start(*at) {
                        json_into(buf, &st);
                        t.states()?
                            .insert(operator.0, buf.as_slice())
                            .map_err(backend)?;
                    }
                }
                Write::SessionEnd {
                    operator,
                    at,
                    reason,
                } => {
                    let mut st = session_state(t.states()?, operator.0)?;
                    if let Some(done) = st.end(operator.0, *at, *reason) {
                        json_into(buf, &st);
                        t.states()?
                            .insert(operator.0, buf.as_slice())
                            .map_err(backend)?;
                        json_into(buf, &done);
                        t.sessions()?
                            .insert((operator.0, *at, done.started_ms), buf.as_slice())
                            .map_err(backend)?;
                        t.sessions_by_end()?
                            .insert((*at, operator.0, done.started_ms), ())
                            .map_err(backend)?;
                    }
                }
            }
        }
        if packer.pending() {
            packer.flush(t.events()?)?;
        }
        write_chats(&mut t, &chats, buf)?;
    }
    txn.commit().map_err(backend)?;
    Ok(last_event)
}

/// The group's chats, each once in its last state and in key order (neighbouring rows
/// share B-tree pages); a chat closed in the group is filed as closed once, as when each
/// state was written in turn; the next chat id is raised past the group's highest.
fn write_chats(
    t: &mut Tables<'_>,
    chats: &LastChats<'_>,
    buf: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let Some((&highest, _)) = chats.last_key_value() else {
        return Ok(());
    };
    let now = unix_ms();
    for (&id, &(c, closed)) in chats {
        buf.clear();
        encode_chat(c, buf);
        t.chats()?.insert(id, buf.as_slice()).map_err(backend)?;
        if closed && t.closed()?.get(id).map_err(backend)?.is_none() {
            t.closed()?.insert(id, now).map_err(backend)?;
            t.closed_at()?.insert((now, id), ()).map_err(backend)?;
        }
    }
    let next_chat = highest.saturating_add(1);
    let meta = t.meta()?;
    if next_chat > meta_u64(meta, NEXT_CHAT)? {
        meta.insert(NEXT_CHAT, next_chat.to_string().as_bytes())
            .map_err(backend)?;
    }
    Ok(())
}

/// `v`'s JSON in `buf`, replacing what it held.
fn json_into<T: serde::Serialize>(buf: &mut Vec<u8>, v: &T) {
    buf.clear();
    serde_json::to_writer(&mut *buf, v).expect("records serialize");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_group_waits_only_right_after_a_busy_group() {
        let t = Instant::now();
        let soon = t + COMMIT_DELAY / 2;
        let mut l = Linger::default();
        assert_eq!(l.wait(1, t), None, "the first write commits at once");
        l.committed(1, t);
        assert_eq!(
            l.wait(1, soon),
            None,
            "a write after a lone one commits at once"
        );
        l.committed(BUSY - 1, t);
        assert_eq!(l.wait(2, soon), None);
        l.committed(BUSY, t);
        assert_eq!(
            l.wait(1, soon),
            Some(COMMIT_DELAY),
            "busy: the group waits for more"
        );
        assert_eq!(
            l.wait(MAX_GROUP, soon),
            None,
            "a full group has no room to wait for"
        );
        assert_eq!(
            l.wait(1, t + COMMIT_DELAY),
            None,
            "a write after a pause is alone: no wait"
        );
        l.committed(1, t);
        assert_eq!(l.wait(1, soon), None, "the load is gone: no wait again");
    }
}

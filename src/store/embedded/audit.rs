//! The status log and online sessions in the embedded store: their tables (with by-time
//! indexes for retention), reading an operator's log and the sessions in a window, and
//! trimming them past `audit.retention`.

use super::*;

/// Status log. Key: (operator, seq).
pub(super) const LOG: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("status_log");
/// Ended sessions. Key: (operator, ended ms, started ms).
pub(super) const SESSIONS: TableDefinition<(u64, u64, u64), &[u8]> =
    TableDefinition::new("sessions");
/// The same log entries and ended sessions by time, for retention: (seq, operator) and
/// (ended ms, operator, started ms).
pub(super) const LOG_BY_TIME: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("status_log_by_time");
pub(super) const SESSIONS_BY_END: TableDefinition<(u64, u64, u64), ()> =
    TableDefinition::new("sessions_by_end");
/// Where each operator's session stands ([`SessionState`]). Key: operator.
pub(super) const SESSION_STATE: TableDefinition<u64, &[u8]> = TableDefinition::new("session_state");

pub(super) fn session_state(
    t: &redb::Table<u64, &[u8]>,
    operator: u64,
) -> Result<SessionState, StoreError> {
    match t.get(operator).map_err(backend)? {
        Some(v) => serde_json::from_slice(v.value())
            .map_err(|e| backend(format!("corrupt session state: {e}"))),
        None => Ok(SessionState::default()),
    }
}

/// The status log of one operator, newest first (`Store::read_log`).
pub(super) fn read_log(
    db: &Database,
    operator: u64,
    limit: usize,
) -> Result<Vec<LogEntry>, StoreError> {
    let txn = db.begin_read().map_err(backend)?;
    let table = txn.open_table(LOG).map_err(backend)?;
    let mut out = Vec::new();
    for row in table
        .range((operator, 0)..=(operator, u64::MAX))
        .map_err(backend)?
        .rev()
        .take(limit)
    {
        let (_, v) = row.map_err(backend)?;
        let l: StoredLog = serde_json::from_slice(v.value())
            .map_err(|e| backend(format!("corrupt log entry: {e}")))?;
        out.push(l.entry);
    }
    Ok(out)
}

/// Sessions overlapping a window (`Store::read_sessions`).
pub(super) fn read_sessions(
    db: &Database,
    operators: &[u64],
    from: u64,
    to: u64,
) -> Result<Vec<SessionRecord>, StoreError> {
    let txn = db.begin_read().map_err(backend)?;
    let table = txn.open_table(SESSIONS).map_err(backend)?;
    let states = txn.open_table(SESSION_STATE).map_err(backend)?;
    let mut out = Vec::new();
    for op in operators {
        // Ended after `from`: the key's second part.
        for row in table
            .range((*op, from.saturating_add(1), 0)..=(*op, u64::MAX, u64::MAX))
            .map_err(backend)?
        {
            let (_, v) = row.map_err(backend)?;
            let s: SessionRecord = serde_json::from_slice(v.value())
                .map_err(|e| backend(format!("corrupt session: {e}")))?;
            if s.overlaps(from, to) {
                out.push(s);
            }
        }
        if let Some(v) = states.get(*op).map_err(backend)? {
            let st: SessionState = serde_json::from_slice(v.value())
                .map_err(|e| backend(format!("corrupt session state: {e}")))?;
            if let Some(started) = st.open.filter(|s| *s < to) {
                out.push(SessionRecord {
                    operator: *op,
                    started_ms: started,
                    ended_ms: None,
                    end_reason: None,
                });
            }
        }
    }
    out.sort_by_key(|s| (s.started_ms, s.operator));
    Ok(out)
}

/// Status log entries and ended sessions past `audit.retention`.
pub(super) fn clean_audit(txn: &redb::WriteTransaction, r: &Retention) -> Result<bool, StoreError> {
    // Status log seqs are microseconds; a session is dated by its end (running ones
    // live in `session_state` and are never dropped). Bounded like the rest.
    let before_us = r.audit_before_ms.saturating_mul(1000);
    let mut log = txn.open_table(LOG).map_err(backend)?;
    let mut log_by_time = txn.open_table(LOG_BY_TIME).map_err(backend)?;
    let old: Vec<(u64, u64)> = log_by_time
        .range((0, 0)..(before_us, 0))
        .map_err(backend)?
        .take(CLEAN_BATCH)
        .map(|row| row.map(|(k, _)| k.value()))
        .collect::<Result<_, _>>()
        .map_err(backend)?;
    let mut more = old.len() == CLEAN_BATCH;
    for (seq, op) in old {
        log_by_time.remove((seq, op)).map_err(backend)?;
        log.remove((op, seq)).map_err(backend)?;
    }
    let mut sessions = txn.open_table(SESSIONS).map_err(backend)?;
    let mut sessions_by_end = txn.open_table(SESSIONS_BY_END).map_err(backend)?;
    let old: Vec<(u64, u64, u64)> = sessions_by_end
        .range((0, 0, 0)..(r.audit_before_ms, 0, 0))
        .map_err(backend)?
        .take(CLEAN_BATCH)
        .map(|row| row.map(|(k, _)| k.value()))
        .collect::<Result<_, _>>()
        .map_err(backend)?;
    more |= old.len() == CLEAN_BATCH;
    for (ended, op, started) in old {
        sessions_by_end
            .remove((ended, op, started))
            .map_err(backend)?;
        sessions.remove((op, ended, started)).map_err(backend)?;
    }
    Ok(more)
}

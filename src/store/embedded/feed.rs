//! The event feed in the embedded store: a table written in the same transaction as the
//! records of its changes, read in pages after an id, trimmed by age and count.

use super::*;

/// The event feed: id → kind byte, Unix ms (8 bytes, little endian), the event's JSON.
pub(super) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// Highest event id retention dropped: a read after an id below it would skip events.
pub(super) const EVENTS_DROPPED: &str = "events_dropped";
/// Rows one feed read scans at most (a narrow `types` filter over a long log).
pub(super) const SCAN_LIMIT: usize = 10_000;

pub(super) fn kind_byte(k: EventType) -> u8 {
    EventType::ALL.iter().position(|t| *t == k).unwrap_or(0) as u8
}

pub(super) fn decode_event(id: u64, row: &[u8]) -> Option<StoredEvent> {
    let kind = *EventType::ALL.get(usize::from(*row.first()?))?;
    let at_ms = u64::from_le_bytes(row.get(1..9)?.try_into().ok()?);
    let frame = std::str::from_utf8(row.get(9..)?).ok()?.to_owned();
    Some(StoredEvent {
        id: id.to_string(),
        kind,
        at_ms,
        frame,
    })
}

/// A page of the feed after `from` (`Store::read_events`).
pub(super) fn read_events(
    db: &Database,
    from: &Position,
    limit: usize,
    types: &Types,
) -> Result<Page, FeedError> {
    let after = match &from {
        Position::Start => None,
        Position::After(id) => Some(
            id.parse::<u64>()
                .map_err(|_| FeedError::BadId(id.clone()))?,
        ),
    };
    let txn = db.begin_read().map_err(backend)?;
    let meta = txn.open_table(META).map_err(backend)?;
    let dropped = meta_u64(&meta, EVENTS_DROPPED)?;
    let table = txn.open_table(EVENTS).map_err(backend)?;
    // Before what retention dropped, or beyond the newest id (a wiped or restored
    // data dir): either way events would be skipped.
    let newest = table
        .last()
        .map_err(backend)?
        .map_or(0, |(k, _)| k.value())
        .max(dropped);
    if let Some(a) = after
        && (a < dropped || a > newest)
    {
        return Err(FeedError::Gone(a.to_string()));
    }
    let start = after.map_or(0, |a| a + 1);
    let mut page = Page {
        events: Vec::new(),
        last_id: after.map(|a| a.to_string()),
    };
    for (scanned, row) in table.range(start..).map_err(backend)?.enumerate() {
        if page.events.len() >= limit || scanned >= SCAN_LIMIT {
            break;
        }
        let (k, v) = row.map_err(backend)?;
        page.last_id = Some(k.value().to_string());
        match decode_event(k.value(), v.value()) {
            Some(e) if types.admits(e.kind) => page.events.push(e),
            Some(_) => {}
            None => tracing::error!(event = k.value(), "corrupt event row skipped"),
        }
    }
    Ok(page)
}

/// Events past their age or beyond the count; the highest id dropped is kept in
/// [`EVENTS_DROPPED`] so a read after it is answered `gone`.
pub(super) fn clean_events(
    txn: &redb::WriteTransaction,
    r: &Retention,
) -> Result<bool, StoreError> {
    let mut events = txn.open_table(EVENTS).map_err(backend)?;
    let mut meta = txn.open_table(META).map_err(backend)?;
    let mut over = events.len().map_err(backend)?.saturating_sub(r.max_events);
    let mut dropped = None;
    let mut removed = 0;
    for _ in 0..CLEAN_BATCH {
        let Some((k, v)) = events.first().map_err(backend)? else {
            break;
        };
        let (id, at) = (
            k.value(),
            decode_event(k.value(), v.value()).map_or(0, |e| e.at_ms),
        );
        drop((k, v));
        if over == 0 && at >= r.events_before_ms {
            break;
        }
        events.remove(id).map_err(backend)?;
        over = over.saturating_sub(1);
        dropped = Some(id);
        removed += 1;
    }
    let more = removed == CLEAN_BATCH;
    if let Some(id) = dropped {
        meta.insert(EVENTS_DROPPED, id.to_string().as_bytes())
            .map_err(backend)?;
    }
    Ok(more)
}

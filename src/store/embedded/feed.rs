//! The event feed in the embedded store: a table written in the same transaction as the
//! records of its changes, read in pages after an id, trimmed by age and count.
//!
//! Events are packed: one row holds consecutive events (keyed by the first one's id), as
//! many as a group commit has until the row reaches [`ROW_BYTES`]. One B-tree insert per
//! row instead of one per event is what makes a decision cheap to write: an assignment
//! logs two events (`chat`, `chat_assigned`), and redb's insert is most of the writer's
//! time. Ids stay one per event, consecutive, and a read or a trim may start or end in
//! the middle of a row. Rows of one event each (the format before packing) are read too.

use super::*;

/// The event feed: first id → a packed row ([`Packer`]), or (the older format, still
/// read) one event: kind byte, Unix ms (8 bytes, little endian), the event's JSON.
pub(super) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// Highest event id retention dropped: a read after an id below it would skip events.
pub(super) const EVENTS_DROPPED: &str = "events_dropped";
/// Events one feed read scans at most (a narrow `types` filter over a long log).
pub(super) const SCAN_LIMIT: usize = 10_000;
/// A packed row is closed once it holds this many bytes: a read decodes a whole row, so
/// rows stay small next to a page of events.
pub(super) const ROW_BYTES: usize = 16 << 10;
/// First byte of a packed row; a row of the older format starts with a kind byte, which
/// is far below it.
const PACKED: u8 = 0xFF;

pub(super) fn kind_byte(k: EventType) -> u8 {
    EventType::ALL.iter().position(|t| *t == k).unwrap_or(0) as u8
}

/// One event of a row, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct RawEvent<'a> {
    pub(super) id: u64,
    pub(super) kind: EventType,
    pub(super) at_ms: u64,
    pub(super) frame: &'a str,
}

impl RawEvent<'_> {
    fn stored(&self) -> StoredEvent {
        StoredEvent {
            id: self.id.to_string(),
            kind: self.kind,
            at_ms: self.at_ms,
            frame: self.frame.to_owned(),
        }
    }
}

/// Builds one packed row: [`PACKED`], the count (u32 LE), then per event its kind byte,
/// Unix ms (u64 LE), the frame's length (u32 LE) and the frame.
#[derive(Debug, Default)]
pub(super) struct Packer {
    first: u64,
    count: u32,
    row: Vec<u8>,
}

impl Packer {
    /// Adds the event `id`; ids of one row are consecutive.
    pub(super) fn push(&mut self, id: u64, kind: u8, at_ms: u64, frame: &[u8]) {
        if self.count == 0 {
            self.first = id;
            self.row.clear();
            self.row.push(PACKED);
            self.row.extend_from_slice(&0u32.to_le_bytes());
        }
        debug_assert_eq!(id, self.first + u64::from(self.count));
        self.count += 1;
        self.row.push(kind);
        self.row.extend_from_slice(&at_ms.to_le_bytes());
        let len = u32::try_from(frame.len()).expect("a frame is far below 4 GiB");
        self.row.extend_from_slice(&len.to_le_bytes());
        self.row.extend_from_slice(frame);
    }

    /// Whether events wait for [`Packer::flush`].
    pub(super) fn pending(&self) -> bool {
        self.count > 0
    }

    pub(super) fn full(&self) -> bool {
        self.row.len() >= ROW_BYTES
    }

    /// Writes the row (if any) and starts a new one.
    pub(super) fn flush(
        &mut self,
        events: &mut redb::Table<'_, u64, &'static [u8]>,
    ) -> Result<(), StoreError> {
        if self.count == 0 {
            return Ok(());
        }
        self.row[1..5].copy_from_slice(&self.count.to_le_bytes());
        events
            .insert(self.first, self.row.as_slice())
            .map_err(backend)?;
        self.count = 0;
        Ok(())
    }
}

/// How many events a row holds (its last id is `key + count - 1`); 1 for a row that
/// cannot be read.
pub(super) fn row_count(row: &[u8]) -> u64 {
    match row {
        [PACKED, n @ ..] => n
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map_or(1, |b| u64::from(u32::from_le_bytes(b)).max(1)),
        _ => 1,
    }
}

/// The events of the row `key`; None when it is corrupt.
pub(super) fn decode_row(key: u64, row: &[u8]) -> Option<Vec<RawEvent<'_>>> {
    let kind_of = |b: u8| EventType::ALL.get(usize::from(b)).copied();
    let u64_at =
        |r: &[u8], at: usize| Some(u64::from_le_bytes(r.get(at..at + 8)?.try_into().ok()?));
    if row.first() != Some(&PACKED) {
        return Some(vec![RawEvent {
            id: key,
            kind: kind_of(*row.first()?)?,
            at_ms: u64_at(row, 1)?,
            frame: std::str::from_utf8(row.get(9..)?).ok()?,
        }]);
    }
    let count = u32::from_le_bytes(row.get(1..5)?.try_into().ok()?);
    let mut out = Vec::with_capacity(count as usize);
    let mut at = 5;
    for i in 0..u64::from(count) {
        let kind = kind_of(*row.get(at)?)?;
        let at_ms = u64_at(row, at + 1)?;
        let len = u32::from_le_bytes(row.get(at + 9..at + 13)?.try_into().ok()?) as usize;
        let frame = std::str::from_utf8(row.get(at + 13..(at + 13).checked_add(len)?)?).ok()?;
        at += 13 + len;
        out.push(RawEvent {
            id: key + i,
            kind,
            at_ms,
            frame,
        });
    }
    (at == row.len()).then_some(out)
}

/// The newest event id in the table (0: none).
pub(super) fn last_id<T: ReadableTable<u64, &'static [u8]>>(events: &T) -> Result<u64, StoreError> {
    Ok(events
        .last()
        .map_err(backend)?
        .map_or(0, |(k, v)| k.value() + row_count(v.value()) - 1))
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
    let newest = last_id(&table)?.max(dropped);
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
    // The row holding `start` may begin before it.
    let first_row = match table.range(..=start).map_err(backend)?.next_back() {
        Some(row) => {
            let (k, v) = row.map_err(backend)?;
            if k.value() + row_count(v.value()) > start {
                k.value()
            } else {
                start
            }
        }
        None => start,
    };
    let mut scanned = 0;
    'rows: for row in table.range(first_row..).map_err(backend)? {
        let (k, v) = row.map_err(backend)?;
        let Some(events) = decode_row(k.value(), v.value()) else {
            if page.events.len() >= limit || scanned >= SCAN_LIMIT {
                break;
            }
            tracing::error!(event = k.value(), "corrupt event row skipped");
            page.last_id = Some((k.value() + row_count(v.value()) - 1).to_string());
            continue;
        };
        for e in events.iter().filter(|e| e.id >= start) {
            if page.events.len() >= limit || scanned >= SCAN_LIMIT {
                break 'rows;
            }
            scanned += 1;
            page.last_id = Some(e.id.to_string());
            if types.admits(e.kind) {
                page.events.push(e.stored());
            }
        }
    }
    Ok(page)
}

/// Events past their age or beyond the count; the highest id dropped is kept in
/// [`EVENTS_DROPPED`] so a read after it is answered `gone`. A row partly past them is
/// written again with the events it keeps, under the first one's id.
pub(super) fn clean_events(
    txn: &redb::WriteTransaction,
    r: &Retention,
) -> Result<bool, StoreError> {
    let mut events = txn.open_table(EVENTS).map_err(backend)?;
    let mut meta = txn.open_table(META).map_err(backend)?;
    let first = events.first().map_err(backend)?.map(|(k, _)| k.value());
    let Some(first) = first else {
        return Ok(false);
    };
    // Ids are consecutive from the oldest kept to the newest.
    let mut over = (last_id(&events)? + 1 - first).saturating_sub(r.max_events);
    let mut dropped = None;
    let mut removed = 0;
    while removed < CLEAN_BATCH {
        let Some((k, v)) = events.first().map_err(backend)? else {
            break;
        };
        let (key, row) = (k.value(), v.value().to_vec());
        drop((k, v));
        let Some(evs) = decode_row(key, &row) else {
            // Unreadable: it cannot be served either.
            let n = row_count(&row);
            events.remove(key).map_err(backend)?;
            over = over.saturating_sub(n);
            dropped = Some(key + n - 1);
            removed += n as usize;
            continue;
        };
        let mut cut = 0;
        for e in &evs {
            if over == 0 && e.at_ms >= r.events_before_ms {
                break;
            }
            over = over.saturating_sub(1);
            cut += 1;
        }
        if cut == 0 {
            break;
        }
        events.remove(key).map_err(backend)?;
        dropped = Some(evs[cut - 1].id);
        removed += cut;
        if cut < evs.len() {
            let mut rest = Packer::default();
            for e in &evs[cut..] {
                rest.push(e.id, kind_byte(e.kind), e.at_ms, e.frame.as_bytes());
            }
            rest.flush(&mut events)?;
            break;
        }
    }
    let more = removed >= CLEAN_BATCH;
    if let Some(id) = dropped {
        meta.insert(EVENTS_DROPPED, id.to_string().as_bytes())
            .map_err(backend)?;
    }
    Ok(more)
}

#[cfg(test)]
#[path = "feed_tests.rs"]
mod tests;

//! Packed event rows: reads and trims that start or end inside a row, and rows of the
//! older one-event format.

use super::*;
use crate::feed::LogEvent;
use redb::ReadableTableMetadata;

/// A store in a temp dir (kept alive by the guard) and its database.
fn store() -> (tempfile::TempDir, Embedded, Arc<Database>) {
    let dir = tempfile::tempdir().unwrap();
    let s = Embedded::open(dir.path()).unwrap();
    let db = s.db().unwrap();
    (dir, s, db)
}

/// `n` events; event i (1-based id) is a `chat` event (odd) or `chat_assigned` (even), made
/// at ms i, with a frame of about `size` bytes that names it.
fn events(n: u64, size: usize) -> Vec<Write> {
    (1..=n)
        .map(|i| {
            let kind = if i % 2 == 1 {
                EventType::Chat
            } else {
                EventType::ChatAssigned
            };
            let frame = format!(
                r#"{{"type":"{}","n":{i},"pad":"{}"}}"#,
                kind.as_str(),
                "x".repeat(size)
            );
            let mut e = LogEvent::new(kind, &frame.into());
            e.at_ms = i;
            Write::Event(e)
        })
        .collect()
}

fn ids(page: &Page) -> Vec<u64> {
    page.events.iter().map(|e| e.id.parse().unwrap()).collect()
}

fn rows(db: &Database) -> u64 {
    let txn = db.begin_read().unwrap();
    txn.open_table(EVENTS).unwrap().len().unwrap()
}

#[tokio::test]
async fn feed_rows_pack_events_and_pages_start_inside_a_row() {
    let (_dir, s, db) = store();
    // 300 events of ~200 bytes: several rows of about ROW_BYTES.
    super::super::super::durable(s.write(events(300, 200)))
        .await
        .unwrap();
    let n = rows(&db);
    assert!(n > 1 && n < 20, "300 events in {n} rows");
    let all = Types::default();
    let mut seen = Vec::new();
    let mut from = Position::Start;
    // Pages of 7 never line up with the rows.
    loop {
        let page = read_events(&db, &from, 7, &all).unwrap();
        if page.events.is_empty() {
            break;
        }
        for e in &page.events {
            let i: u64 = e.id.parse().unwrap();
            assert_eq!(e.at_ms, i);
            assert!(e.frame.contains(&format!(r#""n":{i},"#)), "{}", e.frame);
        }
        seen.extend(ids(&page));
        from = Position::After(page.last_id.clone().unwrap());
    }
    assert_eq!(seen, (1..=300).collect::<Vec<_>>());
    // A filter scans inside rows too; `last_id` is the last event scanned.
    let assigned = Types::from_list(&[EventType::ChatAssigned]);
    let page = read_events(&db, &Position::After("100".into()), 5, &assigned).unwrap();
    assert_eq!(ids(&page), vec![102, 104, 106, 108, 110]);
    assert_eq!(page.last_id.as_deref(), Some("110"));
    assert!(matches!(
        read_events(&db, &Position::After("301".into()), 5, &all),
        Err(FeedError::Gone(_))
    ));
    assert!(
        read_events(&db, &Position::After("300".into()), 5, &all)
            .unwrap()
            .events
            .is_empty()
    );
    drop(db);
    s.close();
    // The newest id survives a reopen.
    let s = Embedded::open(_dir.path()).unwrap();
    assert_eq!(s.last_event_id().await.unwrap().as_deref(), Some("300"));
    s.close();
}

#[tokio::test]
async fn feed_retention_trims_inside_a_packed_row() {
    let (_dir, s, db) = store();
    super::super::super::durable(s.write(events(300, 200)))
        .await
        .unwrap();
    let keep = |max_events, before_ms| Retention {
        chats_before_ms: 0,
        events_before_ms: before_ms,
        max_events,
        audit_before_ms: 0,
    };
    // By count: the 250 oldest go, whatever rows they are in.
    assert!(!clean(&db, keep(50, 0)).unwrap());
    let all = Types::default();
    let page = read_events(&db, &Position::Start, 1000, &all).unwrap();
    assert_eq!(ids(&page), (251..=300).collect::<Vec<_>>());
    assert!(matches!(
        read_events(&db, &Position::After("249".into()), 5, &all),
        Err(FeedError::Gone(_))
    ));
    assert_eq!(
        ids(&read_events(&db, &Position::After("250".into()), 3, &all).unwrap()),
        vec![251, 252, 253]
    );
    // By age: events made before ms 261 go.
    assert!(!clean(&db, keep(1000, 261)).unwrap());
    let page = read_events(&db, &Position::Start, 1000, &all).unwrap();
    assert_eq!(ids(&page), (261..=300).collect::<Vec<_>>());
    s.close();
}

#[tokio::test]
async fn feed_reads_rows_of_the_older_format() {
    let (dir, s, db) = store();
    {
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(EVENTS).unwrap();
            for i in 1..=3u64 {
                let mut row = vec![kind_byte(EventType::Message)];
                row.extend_from_slice(&(i * 10).to_le_bytes());
                row.extend_from_slice(format!(r#"{{"type":"message","n":{i}}}"#).as_bytes());
                t.insert(i, row.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    drop(db);
    s.close();
    // Reopened, new events continue after them, packed.
    let s = Embedded::open(dir.path()).unwrap();
    let db = s.db().unwrap();
    super::super::super::durable(s.write(events(4, 10).split_off(3)))
        .await
        .unwrap();
    let page = read_events(&db, &Position::After("1".into()), 10, &Types::default()).unwrap();
    assert_eq!(ids(&page), vec![2, 3, 4]);
    assert_eq!(page.events[0].at_ms, 20);
    assert_eq!(page.events[0].kind, EventType::Message);
    assert_eq!(page.events[1].frame, r#"{"type":"message","n":3}"#);
    assert_eq!(page.events[2].kind, EventType::ChatAssigned);
    s.close();
}

#[tokio::test]
async fn feed_appends_after_a_reopen_continue_the_ids_in_order() {
    let (dir, s, db) = store();
    let all_events = events(250, 100);
    super::super::super::durable(s.write(all_events[..100].to_vec()))
        .await
        .unwrap();
    let before = rows(&db);
    drop(db);
    s.close();
    // Reopened, the next events take the ids after the last and pack into new rows.
    let s = Embedded::open(dir.path()).unwrap();
    let db = s.db().unwrap();
    assert_eq!(s.last_event_id().await.unwrap().as_deref(), Some("100"));
    super::super::super::durable(s.write(all_events[100..].to_vec()))
        .await
        .unwrap();
    assert_eq!(s.last_event_id().await.unwrap().as_deref(), Some("250"));
    let keys: Vec<u64> = {
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(EVENTS).unwrap();
        t.iter().unwrap().map(|r| r.unwrap().0.value()).collect()
    };
    assert!(
        keys.contains(&101),
        "a row starts after the reopen: {keys:?}"
    );
    assert!(rows(&db) > before);
    // A page across the reopen, and the whole feed, in order; each event is the one written.
    let all = Types::default();
    let page = read_events(&db, &Position::After("95".into()), 10, &all).unwrap();
    assert_eq!(ids(&page), (96..=105).collect::<Vec<_>>());
    let page = read_events(&db, &Position::Start, 1000, &all).unwrap();
    assert_eq!(ids(&page), (1..=250).collect::<Vec<_>>());
    for e in &page.events {
        let i: u64 = e.id.parse().unwrap();
        assert_eq!(e.at_ms, i);
        assert!(e.frame.contains(&format!(r#""n":{i},"#)), "{}", e.frame);
    }
    s.close();
}

#[test]
fn feed_row_decoding_refuses_a_truncated_row() {
    let mut p = Packer::default();
    p.push(5, kind_byte(EventType::Chat), 1, b"{}");
    p.push(6, kind_byte(EventType::Chat), 2, b"{\"a\":1}");
    p.row[1..5].copy_from_slice(&p.count.to_le_bytes());
    let row = p.row.clone();
    let evs = decode_row(5, &row).unwrap();
    assert_eq!(
        evs.iter().map(|e| (e.id, e.frame)).collect::<Vec<_>>(),
        vec![(5, "{}"), (6, "{\"a\":1}")]
    );
    assert_eq!(row_count(&row), 2);
    assert!(decode_row(5, &row[..row.len() - 1]).is_none());
    let mut longer = row.clone();
    longer.push(b' ');
    assert!(decode_row(5, &longer).is_none());
}

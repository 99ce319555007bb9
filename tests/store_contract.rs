//! The store contract, run against both backends: what one keeps, the other keeps too.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::RedisServer;
use presence_hub::config::Strategy;
use presence_hub::model::{
    Chat, ChatId, ChatMessage, ChatStatus, Department, OperatorId, OperatorRecord, Sender,
    SenderKind, StoredOperator,
};
use presence_hub::presence::Settings;
use presence_hub::store::embedded::Embedded;
use presence_hub::store::redis::RedisStore;
use presence_hub::store::{Snapshot, Store, Write, durable};

fn operator(id: u64) -> StoredOperator {
    StoredOperator {
        record: OperatorRecord {
            id,
            name: format!("op{id}"),
            departments: vec![1, 2],
            watch_departments: vec![3],
            permissions: vec![],
            max_chats: 3,
            exclude_autoassign: false,
            auto_accept: true,
        },
        settings: Settings {
            online: false,
            invisible: true,
            always_online: true,
        },
        version: 1,
    }
}

fn department(id: u64) -> Department {
    Department {
        id,
        name: format!("d{id}"),
        disabled: false,
        assignment: Strategy::RoundRobin,
        max_chats: 2,
        accept_timeout: Duration::from_secs(30),
        pending_max: 5,
        bot: true,
        // Hours persist with the department.
        hours: Some(presence_hub::hours::Hours {
            timezone: "Europe/Vilnius".into(),
            weekly: [("mon".to_string(), vec!["09:00-13:00".to_string()])].into(),
            closed_dates: vec!["2026-12-25".into()],
        }),
        version: 1,
    }
}

fn chat(id: u64) -> Chat {
    Chat {
        id,
        department: 1,
        status: ChatStatus::Active,
        owner: Some(1),
        priority: 2,
        visitor: serde_json::json!({"name": "Ann"}),
        created_at: "2026-11-25T12:00:00.000Z".into(),
        assigned_at: Some("2026-11-25T12:00:01.000Z".into()),
        accepted_at: None,
        seq: id,
        visitor_token: "t".into(),
        avoid: None,
        assign_reason: None,
        version: 1,
    }
}

fn message(id: u64) -> ChatMessage {
    ChatMessage {
        id,
        from: Sender {
            kind: SenderKind::Visitor,
            id: None,
            name: Some("Ann".into()),
        },
        text: format!("m{id}"),
        whisper: false,
        at: "2026-11-25T12:00:02.000Z".into(),
    }
}

/// Writes a little of everything, then checks what a fresh store reads back.
async fn contract(store: &dyn Store) {
    durable(store.write(vec![
        Write::Operator {
            op: operator(1),
            base: 0,
        },
        Write::Operator {
            op: operator(2),
            base: 0,
        },
    ]))
    .await
    .unwrap();
    durable(store.write(vec![
        Write::Department {
            dept: department(1),
            base: 0,
        },
        Write::Chat(chat(7)),
    ]))
    .await
    .unwrap();
    let msgs: Vec<Write> = (1..=5)
        .map(|i| Write::Message(ChatId(7), message(i)))
        .collect();
    durable(store.write(msgs)).await.unwrap();
    durable(store.write(vec![
        Write::TrimMessages {
            chat: ChatId(7),
            below: 3,
        },
        Write::DeleteOperator(OperatorId(2)),
    ]))
    .await
    .unwrap();
    let mut updated = operator(1);
    updated.settings.online = true;
    let base = operator(1).version;
    durable(store.write(vec![Write::Operator {
        op: updated.clone(),
        base,
    }]))
    .await
    .unwrap();
    assert!(store.ready());
    let _ = updated;
}

fn check(snap: Snapshot) {
    let mut expected_op = operator(1);
    expected_op.settings.online = true;
    assert_eq!(
        snap.operators,
        vec![expected_op],
        "deleted operator gone, update kept"
    );
    assert_eq!(snap.departments, vec![department(1)]);
    assert_eq!(snap.chats, vec![chat(7)]);
    let ids: Vec<u64> = snap
        .messages
        .iter()
        .map(|(c, m)| {
            assert_eq!(*c, ChatId(7));
            m.id
        })
        .collect();
    assert_eq!(ids, vec![3, 4, 5], "trimmed below 3, in order");
    assert_eq!(snap.messages[0].1, message(3));
}

#[tokio::test]
async fn store_contract_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let store = Embedded::open(dir.path()).unwrap();
    contract(&store).await;
    store.close();
    assert!(
        durable(store.write(vec![Write::Operator {
            op: operator(9),
            base: 0
        }]))
        .await
        .is_err(),
        "closed store refuses"
    );
    let reopened = Embedded::open(dir.path()).unwrap();
    check(reopened.load().unwrap());
    reopened.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_contract_redis() {
    let redis = RedisServer::start().await;
    let store = Arc::new(RedisStore::open(&redis.url(), "t:").await.unwrap());
    contract(store.as_ref()).await;
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.close())
        .await
        .unwrap();
    let reopened = RedisStore::open(&redis.url(), "t:").await.unwrap();
    let snap = tokio::task::spawn_blocking(move || reopened.load())
        .await
        .unwrap()
        .unwrap();
    check(snap);
    // Another prefix is another hub's state.
    let other = RedisStore::open(&redis.url(), "other:").await.unwrap();
    let snap = tokio::task::spawn_blocking(move || other.load())
        .await
        .unwrap()
        .unwrap();
    assert!(snap.operators.is_empty());
}

/// A record change made from a version Redis no longer holds (another node changed or
/// deleted it meanwhile) is refused as a conflict, with nothing of its call written; the
/// store takes writes again once resumed (what the hub does after rebuilding).
#[tokio::test]
async fn store_redis_operator_write_from_a_stale_version_is_a_conflict() {
    let redis = RedisServer::start().await;
    let store = RedisStore::open(&redis.url(), "t:").await.unwrap();
    let v1 = operator(1);
    durable(store.write(vec![Write::Operator {
        op: v1.clone(),
        base: 0,
    }]))
    .await
    .unwrap();
    let mut v2 = v1.clone();
    v2.record.name = "changed on node a".into();
    v2.version = v1.version + 1;
    durable(store.write(vec![Write::Operator {
        op: v2.clone(),
        base: v1.version,
    }]))
    .await
    .unwrap();
    // Node b still holds v1: its change and the rest of its call are refused.
    let mut stale = v1.clone();
    stale.record.name = "changed on node b".into();
    stale.version = v1.version + 2;
    let refused = durable(store.write(vec![
        Write::Department {
            dept: department(5),
            base: 0,
        },
        Write::Operator {
            op: stale,
            base: v1.version,
        },
    ]))
    .await;
    assert!(
        matches!(refused, Err(presence_hub::store::StoreError::Conflict(_))),
        "{refused:?}"
    );
    store.resume();
    // A deleted operator is not brought back by a change made from its old version.
    durable(store.write(vec![Write::DeleteOperator(OperatorId(1))]))
        .await
        .unwrap();
    let revived = durable(store.write(vec![Write::Operator {
        op: v2.clone(),
        base: v2.version,
    }]))
    .await;
    assert!(
        matches!(revived, Err(presence_hub::store::StoreError::Conflict(_))),
        "{revived:?}"
    );
    store.resume();
    let snap = tokio::task::spawn_blocking(move || store.load())
        .await
        .unwrap()
        .unwrap();
    assert!(snap.operators.is_empty(), "{:?}", snap.operators);
    assert!(
        snap.departments.is_empty(),
        "nothing of a refused call is written"
    );
}

#[tokio::test]
async fn store_redis_department_write_from_a_stale_version_is_a_conflict() {
    let redis = RedisServer::start().await;
    let store = RedisStore::open(&redis.url(), "t:").await.unwrap();
    let mut v1 = department(4);
    v1.version = 10;
    durable(store.write(vec![Write::Department {
        dept: v1.clone(),
        base: 0,
    }]))
    .await
    .unwrap();
    let mut v2 = v1.clone();
    v2.name = "renamed on node a".into();
    v2.version = 11;
    durable(store.write(vec![Write::Department {
        dept: v2.clone(),
        base: 10,
    }]))
    .await
    .unwrap();
    // Node b still holds version 10: its change is refused, and nothing of its call lands.
    let mut stale = v1.clone();
    stale.disabled = true;
    stale.version = 12;
    let refused = durable(store.write(vec![
        Write::Operator {
            op: operator(8),
            base: 0,
        },
        Write::Department {
            dept: stale,
            base: 10,
        },
    ]))
    .await;
    assert!(
        matches!(&refused, Err(presence_hub::store::StoreError::Conflict(m)) if m.contains("department")),
        "{refused:?}"
    );
    store.resume();
    let snap = tokio::task::spawn_blocking(move || store.load())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snap.departments, vec![v2], "node a's change stands");
    assert!(snap.operators.is_empty(), "{:?}", snap.operators);
}

fn log(op: u64, seq: u64, online: [bool; 2]) -> presence_hub::audit::StoredLog {
    presence_hub::audit::StoredLog {
        seq,
        entry: presence_hub::audit::LogEntry {
            at: "2026-11-25T12:00:00.000Z".into(),
            operator: op,
            actor: presence_hub::audit::LogActor::Api,
            changes: [("online".to_string(), online)].into(),
        },
    }
}

/// A clean-up round that drops only audit records older than `before_ms`.
fn audit_only(before_ms: u64) -> presence_hub::store::Retention {
    presence_hub::store::Retention {
        chats_before_ms: 0,
        events_before_ms: 0,
        max_events: u64::MAX,
        audit_before_ms: before_ms,
    }
}

/// Sessions and the status log: the same on both stores, reports of one transition by two
/// nodes count once, and retention drops what is old. Times are ms (log seqs µs).
async fn audit_contract(store: Arc<dyn Store>) {
    use presence_hub::presence::Reason;
    let end = |at, reason| Write::SessionEnd {
        operator: OperatorId(1),
        at,
        reason,
    };
    let start = |at| Write::SessionStart {
        operator: OperatorId(1),
        at,
    };
    durable(store.write(vec![
        Write::Log(log(1, 1_000_000, [true, false])),
        Write::Log(log(1, 3_000_000, [false, true])),
        Write::Log(log(2, 2_000_000, [true, false])),
        // Two nodes report the same session: 1000..5000.
        start(1_000),
        start(1_003),
        end(5_000, Reason::SetOffline),
        end(5_002, Reason::SetOffline),
        // A late start of that session does nothing; a new one runs from 8000.
        start(1_003),
        start(8_000),
        end(7_000, Reason::Inactive),
    ]))
    .await
    .unwrap();
    let log1 = store.read_log(OperatorId(1), 10).await.unwrap();
    let sessions = store
        .read_sessions(vec![OperatorId(1), OperatorId(2)], 0, 100_000)
        .await
        .unwrap();
    let early = store
        .read_sessions(vec![OperatorId(1)], 0, 3_000)
        .await
        .unwrap();
    assert_eq!(
        log1,
        vec![
            log(1, 3_000_000, [false, true]).entry,
            log(1, 1_000_000, [true, false]).entry
        ],
        "newest first, only operator 1"
    );
    let got: Vec<(u64, Option<u64>, Option<Reason>)> = sessions
        .iter()
        .map(|s| (s.started_ms, s.ended_ms, s.end_reason))
        .collect();
    assert_eq!(
        got,
        vec![
            (1_000, Some(5_000), Some(Reason::SetOffline)),
            (8_000, None, None)
        ],
        "one session per transition, the open one included"
    );
    assert_eq!(early.len(), 1, "only what overlaps the window");
    // Retention at 2.5 s: log entries before it go; the session ended at 5 s stays.
    store.clean(audit_only(2_500)).await.unwrap();
    let log1 = store.read_log(OperatorId(1), 10).await.unwrap();
    let log2 = store.read_log(OperatorId(2), 10).await.unwrap();
    let sessions = store
        .read_sessions(vec![OperatorId(1)], 0, 100_000)
        .await
        .unwrap();
    assert_eq!(log1.len(), 1, "entries before 2.5 s dropped");
    assert!(log2.is_empty());
    assert_eq!(sessions.len(), 2, "the session ended at 5 s is kept");
    store.clean(audit_only(6_000)).await.unwrap();
    let sessions = store
        .read_sessions(vec![OperatorId(1)], 0, 100_000)
        .await
        .unwrap();
    let s = store.clone();
    let snap = tokio::task::spawn_blocking(move || s.load().unwrap())
        .await
        .unwrap();
    assert_eq!(sessions.len(), 1, "only the open one is left");
    assert_eq!(
        snap.open_sessions,
        vec![(OperatorId(1), 8_000)],
        "open sessions load at start"
    );
}

#[tokio::test]
async fn store_contract_audit_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(Embedded::open(dir.path()).unwrap());
    audit_contract(store.clone()).await;
    store.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_contract_audit_redis() {
    let redis = RedisServer::start().await;
    let store: Arc<dyn Store> = Arc::new(RedisStore::open(&redis.url(), "a:").await.unwrap());
    audit_contract(store.clone()).await;
    tokio::task::spawn_blocking(move || store.close())
        .await
        .unwrap();
}

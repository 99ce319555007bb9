//! The store contract, run against both backends: what one keeps, the other keeps too.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::RedisServer;
use presence_hub::config::Strategy;
use presence_hub::model::{
    Chat, ChatMessage, ChatStatus, Department, OperatorRecord, Sender, SenderKind, StoredOperator,
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
        Write::Operator(operator(1)),
        Write::Operator(operator(2)),
    ]))
    .await
    .unwrap();
    durable(store.write(vec![Write::Department(department(1)), Write::Chat(chat(7))]))
        .await
        .unwrap();
    let msgs: Vec<Write> = (1..=5).map(|i| Write::Message(7, message(i))).collect();
    durable(store.write(msgs)).await.unwrap();
    durable(store.write(vec![
        Write::TrimMessages { chat: 7, below: 3 },
        Write::DeleteOperator(2),
    ]))
    .await
    .unwrap();
    let mut updated = operator(1);
    updated.settings.online = true;
    durable(store.write(vec![Write::Operator(updated.clone())]))
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
            assert_eq!(*c, 7);
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
        durable(store.write(vec![Write::Operator(operator(9))]))
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

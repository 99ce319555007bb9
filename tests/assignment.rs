//! Auto-assignment through real sockets (SPEC.md section 5): its triggers, the queue order,
//! who is a candidate, capacity, the strategies, accept deadlines, owners going offline,
//! `auto_accept`, who is told of a decision, and counts that never drift.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::{Client, TestHub};
use serde_json::{Value, json};

/// Window over which an absence is checked.
const SHORT: Duration = Duration::from_millis(200);

fn id_of(chat: &Value) -> u64 {
    chat["id"].as_u64().expect("chat id")
}

fn is_chat(m: &Value, id: u64) -> bool {
    m["type"] == "chat" && m["chat"]["id"] == id
}

fn assigned(m: &Value, id: u64) -> bool {
    m["type"] == "chat_assigned" && m["chat"]["id"] == id
}

fn assert_ack(v: &Value) {
    assert_eq!(v["type"], "ack", "{v}");
}

async fn new_chat(hub: &TestHub, body: Value) -> Value {
    hub.create_chat(body).await.0
}

async fn owner_of(hub: &TestHub, id: u64) -> Value {
    hub.chat_view(id).await["owner"].clone()
}

/// The operator's `chat_assigned` for `id`, checked to name them as the owner.
async fn expect_assigned(c: &mut Client, op: u64, id: u64, reason: &str) -> Value {
    let m = c.next_where("chat_assigned", |m| assigned(m, id)).await;
    assert_eq!(m["reason"], reason, "{m}");
    assert_eq!(m["chat"]["owner"], op, "{m}");
    assert!(m["chat"]["assigned_at"].is_string(), "{m}");
    m
}

async fn close(hub: &TestHub, id: u64) {
    let (status, v) = hub
        .post(&format!("/api/v1/chats/{id}/close"), json!({}))
        .await;
    assert_eq!(status, 200, "{v}");
}

// ----- triggers -----

#[tokio::test]
async fn assignment_runs_when_a_chat_becomes_pending() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    let created = new_chat(&hub, json!({"department": 1})).await;
    assert_eq!(
        created["owner"], 1,
        "a new pending chat is assigned at once: {created}"
    );
    expect_assigned(&mut op, 1, id_of(&created), "auto").await;
    let bot = new_chat(&hub, json!({"department": 1, "bot": true})).await;
    let id = id_of(&bot);
    assert_eq!(
        bot["owner"],
        Value::Null,
        "a bot chat waits for no one: {bot}"
    );
    op.silent_for(SHORT, "a bot chat assigned", |m| assigned(m, id))
        .await;
    let (status, v) = hub
        .patch(&format!("/api/v1/chats/{id}"), json!({"status": "pending"}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["owner"], 1, "handed over, then assigned: {v}");
    expect_assigned(&mut op, 1, id, "auto").await;
}

#[tokio::test]
async fn assignment_runs_when_an_operator_becomes_online() {
    let hub = TestHub::start().await;
    hub.operator_with(
        1,
        json!({"name": "op1", "departments": [1], "permissions": ["change_online_status"],
        "online": false}),
    )
    .await;
    let (mut op, _) = hub.connect(1).await;
    let chat = new_chat(&hub, json!({"department": 1})).await;
    let id = id_of(&chat);
    assert_eq!(chat["owner"], Value::Null, "{chat}");
    // Sent without waiting for the ack: `request` would skip the event that precedes it.
    op.send(json!({"type": "set_status", "online": true})).await;
    expect_assigned(&mut op, 1, id, "auto").await;
    assert_eq!(owner_of(&hub, id).await, 1);
}

#[tokio::test]
async fn assignment_runs_when_an_operator_connects_and_tells_them() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let chat = new_chat(&hub, json!({"department": 1})).await;
    let id = id_of(&chat);
    assert_eq!(chat["owner"], Value::Null, "{chat}");
    let (mut op, hello) = hub.connect(1).await;
    assert_eq!(hello["operator"]["status"], "online", "{hello}");
    expect_assigned(&mut op, 1, id, "auto").await;
    assert_eq!(owner_of(&hub, id).await, 1);
    assert_eq!(hub.view(1).await["pending_chats"], 1);
}

#[tokio::test]
async fn assignment_runs_when_capacity_frees_up_on_close() {
    let hub = TestHub::start().await;
    hub.operator_with(
        1,
        json!({"name": "op1", "departments": [1], "max_chats": 1}),
    )
    .await;
    let (mut op, _) = hub.connect(1).await;
    let a = id_of(&new_chat(&hub, json!({"department": 1})).await);
    let b = id_of(&new_chat(&hub, json!({"department": 1})).await);
    expect_assigned(&mut op, 1, a, "auto").await;
    assert_eq!(
        owner_of(&hub, b).await,
        Value::Null,
        "no room for a second chat"
    );
    assert_ack(&op.request(json!({"type": "open_chat", "chat": a})).await);
    assert_eq!(
        owner_of(&hub, b).await,
        Value::Null,
        "accepting frees nothing"
    );
    op.send(json!({"type": "close_chat", "chat": a})).await;
    expect_assigned(&mut op, 1, b, "auto").await;
}

#[tokio::test]
async fn assignment_runs_when_capacity_frees_up_in_another_department() {
    let hub = TestHub::start().await;
    hub.operator_with(
        1,
        json!({"name": "op1", "departments": [1, 2], "max_chats": 1}),
    )
    .await;
    let (mut op, _) = hub.connect(1).await;
    let a = id_of(&new_chat(&hub, json!({"department": 2})).await);
    expect_assigned(&mut op, 1, a, "auto").await;
    let b = id_of(&new_chat(&hub, json!({"department": 1})).await);
    assert_eq!(owner_of(&hub, b).await, Value::Null);
    close(&hub, a).await;
    expect_assigned(&mut op, 1, b, "auto").await;
}

// ----- queue order -----

#[tokio::test]
async fn queue_order_priority_then_oldest_first() {
    let hub = TestHub::start().await;
    hub.operator_with(
        1,
        json!({"name": "op1", "departments": [1], "max_chats": 1}),
    )
    .await;
    let mut ids = BTreeMap::new();
    for (name, priority) in [("a", 0), ("b", 5), ("c", 5), ("d", 0), ("e", 9)] {
        ids.insert(
            name,
            id_of(&new_chat(&hub, json!({"department": 1, "priority": priority})).await),
        );
    }
    let (mut op, _) = hub.connect(1).await;
    let mut order = String::new();
    for _ in 0..5 {
        let m = op.next_of("chat_assigned").await;
        let id = id_of(&m["chat"]);
        order.push_str(
            ids.iter()
                .find(|(_, v)| **v == id)
                .map(|(k, _)| *k)
                .unwrap(),
        );
        close(&hub, id).await;
    }
    assert_eq!(order, "ebcad");
}

// ----- candidates -----

#[tokio::test]
async fn candidate_disconnected_always_online_operator_gets_chats() {
    let hub = TestHub::start().await;
    hub.operator_with(
        1,
        json!({"name": "op1", "departments": [1], "always_online": true}),
    )
    .await;
    let v = hub.view(1).await;
    assert_eq!(
        (v["status"].clone(), v["connections"].clone()),
        (json!("online"), json!(0)),
        "{v}"
    );
    let chat = new_chat(&hub, json!({"department": 1})).await;
    assert_eq!(chat["owner"], 1, "{chat}");
    assert_eq!(hub.view(1).await["pending_chats"], 1);
    let (mut op, hello) = hub.connect(1).await;
    assert!(
        hello["chats"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == chat["id"] && c["owner"] == 1),
        "{hello}"
    );
    op.silent_for(SHORT, "a second assignment", |m| {
        m["type"] == "chat_assigned"
    })
    .await;
}

#[tokio::test]
async fn candidate_never_a_connected_offline_operator() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    assert_ack(
        &op.request(json!({"type": "set_status", "online": false}))
            .await,
    );
    let chat = new_chat(&hub, json!({"department": 1})).await;
    assert_eq!(chat["owner"], Value::Null, "{chat}");
    op.silent_for(SHORT, "an assignment while offline", |m| {
        m["type"] == "chat_assigned"
    })
    .await;
    assert_eq!(hub.view(1).await["pending_chats"], 0);
}

#[tokio::test]
async fn candidate_never_exclude_autoassign() {
    let hub = TestHub::start().await;
    hub.operator_with(
        1,
        json!({"name": "op1", "departments": [1], "exclude_autoassign": true}),
    )
    .await;
    hub.operator(2, &[1]).await;
    let (mut excluded, hello) = hub.connect(1).await;
    assert_eq!(hello["operator"]["status"], "online");
    let id = id_of(&new_chat(&hub, json!({"department": 1})).await);
    assert_eq!(owner_of(&hub, id).await, Value::Null);
    let (mut other, _) = hub.connect(2).await;
    expect_assigned(&mut other, 2, id, "auto").await;
    excluded
        .silent_for(SHORT, "an assignment", |m| m["type"] == "chat_assigned")
        .await;
}

// ----- capacity -----

/// Creates `n` chats in department 1 and counts those operator 1 was given.
async fn assigned_of(hub: &TestHub, n: usize) -> usize {
    for _ in 0..n {
        new_chat(hub, json!({"department": 1})).await;
    }
    let (_, v) = hub.get("/api/v1/chats?owner=1").await;
    let owned = v["chats"].as_array().unwrap().len();
    assert_eq!(hub.view(1).await["pending_chats"], owned as u64);
    owned
}

#[tokio::test]
async fn capacity_operator_max_chats_first() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"max_chats": 3})).await;
    hub.operator_with(
        1,
        json!({"name": "op1", "departments": [1], "max_chats": 2, "always_online": true}),
    )
    .await;
    assert_eq!(assigned_of(&hub, 5).await, 2);
}

#[tokio::test]
async fn capacity_department_max_chats_when_operator_has_none() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"max_chats": 3})).await;
    hub.operator_with(
        1,
        json!({"name": "op1", "departments": [1], "always_online": true}),
    )
    .await;
    assert_eq!(assigned_of(&hub, 5).await, 3);
}

#[tokio::test]
async fn capacity_config_default_when_department_not_set() {
    let hub = TestHub::start_with(|cfg| cfg.assignment.default_max_chats = 2).await;
    hub.operator_with(
        1,
        json!({"name": "op1", "departments": [1], "always_online": true}),
    )
    .await;
    assert_eq!(assigned_of(&hub, 5).await, 2);
    let (_, d) = hub.get("/api/v1/departments/1").await;
    assert_eq!(d["max_chats"], 2, "{d}");
}

// ----- strategies -----

/// Operator 1 gets two chats alone, operator 2 connects, three more chats come: their owners.
async fn strategy_owners(strategy: &str) -> Vec<u64> {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"assignment": strategy, "max_chats": 9}))
        .await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let mut owners = Vec::new();
    let (_a, _) = hub.connect(1).await;
    for _ in 0..2 {
        owners.push(
            new_chat(&hub, json!({"department": 1})).await["owner"]
                .as_u64()
                .unwrap(),
        );
    }
    let (_b, _) = hub.connect(2).await;
    for _ in 0..3 {
        owners.push(
            new_chat(&hub, json!({"department": 1})).await["owner"]
                .as_u64()
                .unwrap(),
        );
    }
    owners
}

#[tokio::test]
async fn least_loaded_fewest_chats_then_longest_since_assigned() {
    assert_eq!(strategy_owners("least_loaded").await, vec![1, 1, 2, 2, 1]);
}

#[tokio::test]
async fn round_robin_longest_since_assigned() {
    assert_eq!(strategy_owners("round_robin").await, vec![1, 1, 2, 1, 2]);
}

#[tokio::test]
async fn assignment_off_per_department() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"assignment": "off"})).await;
    hub.operator(1, &[1, 2]).await;
    let (mut op, _) = hub.connect(1).await;
    let off = new_chat(&hub, json!({"department": 1})).await;
    let on = new_chat(&hub, json!({"department": 2})).await;
    assert_eq!(off["owner"], Value::Null, "{off}");
    assert_eq!(on["owner"], 1, "{on}");
    expect_assigned(&mut op, 1, id_of(&on), "auto").await;
    op.silent_for(SHORT, "an assignment in an `off` department", |m| {
        assigned(m, id_of(&off))
    })
    .await;
    // Switching the department on assigns what waits.
    hub.put_department(1, json!({"assignment": "round_robin"}))
        .await;
    expect_assigned(&mut op, 1, id_of(&off), "auto").await;
}

// ----- accept deadlines and owners going offline -----

/// Department 1 with `accept_timeout`, operators 1 and 2 connected; a chat assigned to one
/// of them. Returns (hub, clients by id, chat, owner, other, when the chat was created).
async fn two_candidates(
    accept_timeout: &str,
) -> (TestHub, HashMap<u64, Client>, u64, u64, u64, Instant) {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"accept_timeout": accept_timeout}))
        .await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let mut clients = HashMap::new();
    clients.insert(1, hub.connect(1).await.0);
    clients.insert(2, hub.connect(2).await.0);
    let created = Instant::now();
    let chat = new_chat(&hub, json!({"department": 1})).await;
    let id = id_of(&chat);
    let owner = chat["owner"].as_u64().expect("assigned");
    let other = 3 - owner;
    let c = clients.get_mut(&owner).unwrap();
    expect_assigned(c, owner, id, "auto").await;
    (hub, clients, id, owner, other, created)
}

#[tokio::test]
async fn accept_timeout_reassigns_to_another_candidate() {
    let (hub, mut clients, id, first, other, created) = two_candidates("300ms").await;
    let m = expect_assigned(
        clients.get_mut(&other).unwrap(),
        other,
        id,
        "accept_timeout",
    )
    .await;
    assert!(
        created.elapsed() >= Duration::from_millis(290),
        "not before the deadline"
    );
    assert_eq!(m["chat"]["status"], "pending", "{m}");
    let ev = clients
        .get_mut(&first)
        .unwrap()
        .next_where("the chat moved", |m| {
            is_chat(m, id) && m["chat"]["owner"] == other
        })
        .await;
    assert_eq!(ev["chat"]["status"], "pending");
    assert_eq!(hub.view(first).await["pending_chats"], 0);
    assert_eq!(hub.view(other).await["pending_chats"], 1);
}

#[tokio::test]
async fn accept_timeout_does_nothing_once_accepted() {
    let (hub, mut clients, id, first, other, _) = two_candidates("300ms").await;
    assert_ack(
        &clients
            .get_mut(&first)
            .unwrap()
            .request(json!({"type": "open_chat", "chat": id}))
            .await,
    );
    clients
        .get_mut(&other)
        .unwrap()
        .silent_for(Duration::from_millis(600), "a re-assignment", |m| {
            assigned(m, id)
        })
        .await;
    let c = hub.chat_view(id).await;
    assert_eq!(
        (c["owner"].clone(), c["status"].clone()),
        (json!(first), json!("active")),
        "{c}"
    );
}

#[tokio::test]
async fn owner_turning_offline_before_accepting_requeues_at_once() {
    let (hub, mut clients, id, first, other, _) = two_candidates("60s").await;
    let c = clients.get_mut(&first).unwrap();
    assert_ack(
        &c.request(json!({"type": "set_status", "online": false}))
            .await,
    );
    let started = Instant::now();
    expect_assigned(
        clients.get_mut(&other).unwrap(),
        other,
        id,
        "operator_unavailable",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "at once, not at the accept deadline"
    );
    assert_eq!(hub.view(first).await["pending_chats"], 0);
    // The new owner logs out before accepting: nobody is left, the chat waits unowned.
    let c = clients.get_mut(&other).unwrap();
    c.send(json!({"type": "logout"})).await;
    c.closed().await;
    let chat = hub
        .poll_until(
            &format!("/api/v1/chats/{id}"),
            "the chat back in the queue",
            |v| v["owner"].is_null(),
        )
        .await;
    assert_eq!(chat["status"], "pending");
    assert_eq!(chat["assigned_at"], Value::Null, "{chat}");
    assert_eq!(hub.view(other).await["pending_chats"], 0);
}

#[tokio::test]
async fn owner_disconnecting_before_accepting_requeues_after_the_grace() {
    let (hub, mut clients, id, first, other, _) = two_candidates("60s").await;
    let started = Instant::now();
    clients.remove(&first).unwrap().close().await;
    expect_assigned(
        clients.get_mut(&other).unwrap(),
        other,
        id,
        "operator_unavailable",
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(290),
        "not inside the 300 ms grace"
    );
    assert_eq!(hub.view(first).await["status"], "offline");
}

// ----- auto_accept -----

#[tokio::test]
async fn auto_accept_makes_an_assigned_chat_active_at_once() {
    let hub = TestHub::start().await;
    hub.operator_with(
        1,
        json!({"name": "op1", "departments": [1], "auto_accept": true}),
    )
    .await;
    let (mut op, _) = hub.connect(1).await;
    let chat = new_chat(&hub, json!({"department": 1})).await;
    assert_eq!(
        (chat["owner"].clone(), chat["status"].clone()),
        (json!(1), json!("active")),
        "{chat}"
    );
    assert!(chat["accepted_at"].is_string(), "{chat}");
    let m = expect_assigned(&mut op, 1, id_of(&chat), "auto").await;
    assert_eq!(m["chat"]["status"], "active", "{m}");
    let v = hub.view(1).await;
    assert_eq!(
        (v["active_chats"].clone(), v["pending_chats"].clone()),
        (json!(1), json!(0)),
        "{v}"
    );
}

#[tokio::test]
async fn auto_accept_not_when_invisible() {
    let hub = TestHub::start().await;
    hub.operator_with(
        1,
        json!({"name": "op1", "departments": [1], "auto_accept": true, "invisible": true}),
    )
    .await;
    let (mut op, _) = hub.connect(1).await;
    let chat = new_chat(&hub, json!({"department": 1})).await;
    assert_eq!(
        (chat["owner"].clone(), chat["status"].clone()),
        (json!(1), json!("pending")),
        "{chat}"
    );
    let m = expect_assigned(&mut op, 1, id_of(&chat), "auto").await;
    assert_eq!(m["chat"]["status"], "pending", "{m}");
    assert_eq!(hub.view(1).await["pending_chats"], 1);
}

// ----- who is told -----

#[tokio::test]
async fn every_decision_goes_to_the_assignee_and_the_department() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    hub.operator_with(
        2,
        json!({"name": "op2", "departments": [1], "exclude_autoassign": true}),
    )
    .await;
    hub.operator_with(3, json!({"name": "sup", "watch_departments": [1]}))
        .await;
    hub.operator(4, &[2]).await;
    let (mut assignee, _) = hub.connect(1).await;
    let (mut colleague, _) = hub.connect(2).await;
    let (mut sup, _) = hub.connect(3).await;
    let (mut outsider, _) = hub.connect(4).await;
    let id = id_of(&new_chat(&hub, json!({"department": 1})).await);
    let m = expect_assigned(&mut assignee, 1, id, "auto").await;
    for c in [&mut colleague, &mut sup] {
        let ev = c
            .next_where("the decision", |m| {
                is_chat(m, id) && m["chat"]["owner"] == 1
            })
            .await;
        assert_eq!(
            ev["chat"], m["chat"],
            "the department sees the chat as assigned"
        );
    }
    tokio::join!(
        colleague.silent_for(SHORT, "chat_assigned to someone else", |m| m["type"]
            == "chat_assigned"),
        sup.silent_for(SHORT, "chat_assigned to someone else", |m| m["type"]
            == "chat_assigned"),
        outsider.silent_for(SHORT, "another department's chat", |m| m["type"] == "chat"
            || m["type"] == "chat_assigned"),
    );
}

// ----- counts never drift -----

/// xorshift64*: a seeded, deterministic sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> Option<T> {
        if xs.is_empty() {
            None
        } else {
            Some(xs[self.below(xs.len())])
        }
    }
}

struct Spec {
    id: u64,
    departments: Vec<u64>,
    watch: Vec<u64>,
    max_chats: u32,
    exclude: bool,
}

/// (owner, status, department) of every chat.
async fn chat_table(hub: &TestHub) -> BTreeMap<u64, (Option<u64>, String, u64)> {
    let (_, v) = hub.get("/api/v1/chats").await;
    v["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                id_of(c),
                (
                    c["owner"].as_u64(),
                    c["status"].as_str().unwrap().to_string(),
                    c["department"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

#[tokio::test]
async fn counts_never_drift_under_random_operations() {
    let hub = TestHub::start_with(|cfg| cfg.presence.disconnect_grace = Duration::ZERO).await;
    let dept_max: HashMap<u64, u32> = HashMap::from([(1, 2), (2, 3)]);
    hub.put_department(
        1,
        json!({"assignment": "least_loaded", "max_chats": 2, "accept_timeout": "0s"}),
    )
    .await;
    hub.put_department(
        2,
        json!({"assignment": "round_robin", "max_chats": 3, "accept_timeout": "0s"}),
    )
    .await;
    let all = [
        "change_online_status",
        "change_visibility",
        "change_always_online",
        "open_all",
    ];
    let specs = [
        Spec {
            id: 1,
            departments: vec![1],
            watch: vec![],
            max_chats: 0,
            exclude: false,
        },
        Spec {
            id: 2,
            departments: vec![1],
            watch: vec![],
            max_chats: 1,
            exclude: false,
        },
        Spec {
            id: 3,
            departments: vec![2],
            watch: vec![],
            max_chats: 0,
            exclude: false,
        },
        Spec {
            id: 4,
            departments: vec![1, 2],
            watch: vec![],
            max_chats: 2,
            exclude: false,
        },
        Spec {
            id: 5,
            departments: vec![],
            watch: vec![1, 2],
            max_chats: 0,
            exclude: false,
        },
        Spec {
            id: 6,
            departments: vec![1],
            watch: vec![],
            max_chats: 0,
            exclude: true,
        },
    ];
    for s in &specs {
        let perms: &[&str] = if s.id % 2 == 1 { &all } else { &all[..3] };
        hub.operator_with(
            s.id,
            json!({"name": format!("op{}", s.id), "departments": s.departments,
            "watch_departments": s.watch, "permissions": perms, "max_chats": s.max_chats,
            "exclude_autoassign": s.exclude, "auto_accept": s.id == 4}),
        )
        .await;
    }
    let spec = |id: u64| specs.iter().find(|s| s.id == id).unwrap();
    let capacity = |op: u64, dept: u64| {
        let s = spec(op);
        if s.max_chats > 0 {
            s.max_chats
        } else {
            dept_max[&dept]
        }
    };
    let mut clients: BTreeMap<u64, Client> = BTreeMap::new();
    for id in [1, 3, 5] {
        clients.insert(id, hub.connect(id).await.0);
    }
    let mut rng = Rng(0x5EED_0FC0_FFEE);
    let mut log: Vec<String> = Vec::new();
    let mut auto_assignments = 0;

    for step in 0..100 {
        let before = chat_table(&hub).await;
        let open: Vec<u64> = before
            .iter()
            .filter(|(_, c)| c.1 != "closed")
            .map(|(id, _)| *id)
            .collect();
        let connected: Vec<u64> = clients.keys().copied().collect();
        let away: Vec<u64> = specs
            .iter()
            .map(|s| s.id)
            .filter(|id| !clients.contains_key(id))
            .collect();
        // The operator and chat of a manual take, which is not an auto-assignment.
        let mut took: Option<(u64, u64)> = None;
        let op = match rng.below(15) {
            0..=2 => {
                let dept = 1 + rng.below(2) as u64;
                let bot = rng.below(4) == 0;
                let priority = rng.below(3);
                let (chat, _) = hub
                    .create_chat(json!({"department": dept, "bot": bot, "priority": priority}))
                    .await;
                format!(
                    "create {} dept {dept} bot {bot} prio {priority}",
                    chat["id"]
                )
            }
            3 => {
                let bots: Vec<u64> = before
                    .iter()
                    .filter(|(_, c)| c.1 == "bot")
                    .map(|(id, _)| *id)
                    .collect();
                match rng.pick(&bots) {
                    Some(id) => {
                        let (status, _) = hub
                            .patch(&format!("/api/v1/chats/{id}"), json!({"status": "pending"}))
                            .await;
                        assert_eq!(status, 200);
                        format!("hand over {id}")
                    }
                    None => "no bot chat".into(),
                }
            }
            4..=7 => match (rng.pick(&connected), rng.pick(&open)) {
                (Some(me), Some(chat)) => {
                    let message = rng.below(2) == 0;
                    let whisper = rng.below(4) == 0;
                    let req = if message {
                        json!({"type": "send_message", "chat": chat, "text": format!("m{step}"), "whisper": whisper})
                    } else {
                        json!({"type": "open_chat", "chat": chat})
                    };
                    let answer = clients.get_mut(&me).unwrap().request(req.clone()).await;
                    took = Some((me, chat));
                    format!("op{me} {req} -> {}", answer["type"])
                }
                _ => "nobody to open".into(),
            },
            8 => match rng.pick(&connected) {
                Some(me) => {
                    let mine: Vec<u64> = open
                        .iter()
                        .copied()
                        .filter(|id| before[id].0 == Some(me))
                        .collect();
                    match rng.pick(&mine).or(rng.pick(&open)) {
                        Some(chat) => {
                            let a = clients
                                .get_mut(&me)
                                .unwrap()
                                .request(json!({"type": "close_chat", "chat": chat}))
                                .await;
                            format!("op{me} closes {chat} -> {}", a["type"])
                        }
                        None => "nothing to close".into(),
                    }
                }
                None => "nobody to close".into(),
            },
            9 => match rng.pick(&open) {
                Some(chat) => {
                    close(&hub, chat).await;
                    format!("back end closes {chat}")
                }
                None => "nothing open".into(),
            },
            10 | 11 => {
                let id = specs[rng.below(specs.len())].id;
                let field = ["online", "invisible", "always_online"][rng.below(3)];
                // Mostly visible: invisible operators take nothing, which would make a dull run.
                let value = if field == "invisible" {
                    rng.below(3) == 0
                } else {
                    rng.below(3) != 0
                };
                match clients.get_mut(&id) {
                    Some(c) if rng.below(2) == 0 => {
                        let a = c.request(json!({"type": "set_status", field: value})).await;
                        assert_ack(&a);
                    }
                    _ => {
                        let (status, v) = hub
                            .patch(
                                &format!("/api/v1/operators/{id}/status"),
                                json!({field: value}),
                            )
                            .await;
                        assert_eq!(status, 200, "{v}");
                    }
                }
                format!("op{id} {field}={value}")
            }
            12 | 13 => match rng.pick(&away) {
                Some(id) => {
                    clients.insert(id, hub.connect(id).await.0);
                    format!("op{id} connects")
                }
                None => "everyone connected".into(),
            },
            _ => match rng.pick(&connected) {
                Some(id) => {
                    clients.remove(&id).unwrap().close().await;
                    hub.poll_until(&format!("/api/v1/operators/{id}"), "the disconnect", |v| {
                        v["connections"] == 0
                    })
                    .await;
                    format!("op{id} disconnects")
                }
                None => "nobody connected".into(),
            },
        };
        log.push(format!("{step}: {op}"));
        let ctx = || log[log.len().saturating_sub(8)..].join("\n");

        // Everything a socket was told of an assignment names that socket's operator.
        for (id, c) in clients.iter_mut() {
            for m in c.drain().await {
                if m["type"] == "chat_assigned" {
                    assert_eq!(
                        m["chat"]["owner"],
                        *id,
                        "chat_assigned to the wrong socket: {m}\n{}",
                        ctx()
                    );
                }
            }
        }

        let after = chat_table(&hub).await;
        let (_, ops) = hub.get("/api/v1/operators").await;
        let views: HashMap<u64, Value> = ops["operators"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["id"].as_u64().unwrap(), v.clone()))
            .collect();
        for s in &specs {
            let v = &views[&s.id];
            let owned = |status: &str| {
                after
                    .values()
                    .filter(|c| c.0 == Some(s.id) && c.1 == status)
                    .count()
            };
            assert_eq!(
                v["active_chats"],
                owned("active"),
                "op{} active_chats drifted\n{}",
                s.id,
                ctx()
            );
            assert_eq!(
                v["pending_chats"],
                owned("pending"),
                "op{} pending_chats drifted\n{}",
                s.id,
                ctx()
            );
        }
        for (chat, (owner, status, dept)) in &after {
            let Some(owner) = *owner else { continue };
            let newly = before.get(chat).is_none_or(|b| b.0 != Some(owner));
            if !newly || took == Some((owner, *chat)) || status == "closed" {
                continue;
            }
            auto_assignments += 1;
            let s = spec(owner);
            let v = &views[&owner];
            assert!(
                s.departments.contains(dept) && !s.exclude,
                "chat {chat} auto-assigned to op{owner}\n{}",
                ctx()
            );
            assert_eq!(
                v["status"],
                "online",
                "chat {chat} auto-assigned to an offline op{owner}\n{}",
                ctx()
            );
            let load = v["active_chats"].as_u64().unwrap() + v["pending_chats"].as_u64().unwrap();
            assert!(
                load <= capacity(owner, *dept) as u64,
                "chat {chat} auto-assigned to op{owner} past capacity ({load})\n{}",
                ctx()
            );
        }
        for d in [1u64, 2] {
            let (_, dv) = hub.get(&format!("/api/v1/departments/{d}")).await;
            let of = |status: &str| after.values().filter(|c| c.2 == d && c.1 == status).count();
            let queued = after
                .values()
                .filter(|c| c.2 == d && c.1 == "pending" && c.0.is_none())
                .count();
            assert_eq!(
                dv["pending_chats"],
                of("pending"),
                "department {d}\n{}",
                ctx()
            );
            assert_eq!(
                dv["active_chats"],
                of("active"),
                "department {d}\n{}",
                ctx()
            );
            assert_eq!(dv["bot_chats"], of("bot"), "department {d}\n{}", ctx());
            assert_eq!(dv["queued_chats"], queued, "department {d}\n{}", ctx());
        }
    }
    let final_table = chat_table(&hub).await;
    let statuses: Vec<&str> = final_table.values().map(|c| c.1.as_str()).collect();
    for s in ["active", "closed"] {
        assert!(
            statuses.contains(&s),
            "the run never produced a {s} chat: {statuses:?}"
        );
    }
    assert!(
        auto_assignments >= 5,
        "the run exercised assignment only {auto_assignments} times"
    );
}

//! Several hub nodes on one real redis-server act as one service (SPEC.md section 8).

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{Client, TestHub};
use presence_hub::config::Backend;
use serde_json::json;

async fn node(
    redis: &RedisServer,
    id: &str,
    tweak: impl FnOnce(&mut presence_hub::config::Config),
) -> TestHub {
    common::node::redis_node(redis, id, tweak).await
}

/// Waits until `hub` knows operator `id` (records reach other nodes through Redis).
async fn known(hub: &TestHub, id: u64) {
    for _ in 0..200 {
        if hub.get(&format!("/api/v1/operators/{id}")).await.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("operator {id} never reached the node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_operator_on_node_a_is_online_for_widget_on_node_b() {
    let redis = RedisServer::start().await;
    let a = node(&redis, "a", |_| {}).await;
    let b = node(&redis, "b", |_| {}).await;
    a.operator(1, &[1]).await;
    known(&b, 1).await;
    let mut widget = b.widget(&[1]).await;
    assert_eq!(widget.next().await["online"], false);
    let (op, _) = a.connect(1).await;
    let flip = widget.next_of("widget_status").await;
    assert_eq!(flip["online"], true, "{flip}");
    assert_eq!(
        b.view(1).await["connections"],
        1,
        "node B counts node A's connection"
    );
    // A colleague on node B sees the operator on node A.
    b.operator(2, &[1]).await;
    known(&a, 2).await;
    let (_, hello) = b.connect(2).await;
    let colleague = hello["operators"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == 1)
        .cloned()
        .unwrap();
    assert_eq!(colleague["status"], "online");
    op.close().await;
    let off = widget.next_of("widget_status").await;
    assert_eq!(off["online"], false, "offline everywhere after the grace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_settings_changed_on_one_node_reach_the_other() {
    let redis = RedisServer::start().await;
    let a = node(&redis, "a", |_| {}).await;
    let b = node(&redis, "b", |_| {}).await;
    a.operator(1, &[1]).await;
    known(&b, 1).await;
    let (_op, _) = b.connect(1).await;
    let mut widget = a.widget(&[1]).await;
    if widget.next().await["online"] == false {
        assert_eq!(widget.next_of("widget_status").await["online"], true);
    }
    let (status, _) = b
        .patch("/api/v1/operators/1/status", json!({"online": false}))
        .await;
    assert_eq!(status, 200);
    let w = widget.next_of("widget_status").await;
    assert_eq!(
        w["online"], false,
        "a change on node B reaches widgets on node A once"
    );
    widget
        .silent_for(Duration::from_millis(300), "a duplicate event", |v| {
            v["type"] == "widget_status"
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_grace_reconnect_to_other_node_does_not_flap() {
    let redis = RedisServer::start().await;
    let grace = |cfg: &mut presence_hub::config::Config| {
        cfg.presence.disconnect_grace = Duration::from_secs(2)
    };
    let a = node(&redis, "a", grace).await;
    let b = node(&redis, "b", grace).await;
    a.operator(1, &[1]).await;
    known(&b, 1).await;
    let (op, _) = a.connect(1).await;
    let mut wa = a.widget(&[1]).await;
    let mut wb = b.widget(&[1]).await;
    assert_eq!(wa.next().await["online"], true);
    let first = wb.next().await;
    if first["online"] == false {
        assert_eq!(wb.next_of("widget_status").await["online"], true);
    }
    op.close().await;
    let (_op2, _) = b.connect(1).await;
    let offline = |v: &serde_json::Value| v["type"] == "widget_status" && v["online"] == false;
    wa.silent_for(Duration::from_millis(2500), "a flap on node A", offline)
        .await;
    wb.silent_for(Duration::from_millis(200), "a flap on node B", offline)
        .await;
    assert_eq!(a.view(1).await["status"], "online");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_refuses_a_node_id_already_alive() {
    let redis = RedisServer::start().await;
    let _a = node(&redis, "same", |_| {}).await;
    let mut cfg = common::test_config(tempfile::tempdir().unwrap().path());
    cfg.store.backend = Backend::Redis;
    cfg.store.redis_url.0 = redis.url();
    cfg.server.node_id = "same".into();
    let err = presence_hub::server::build(cfg)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("already alive"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_restart_loses_nothing_and_always_online_is_online_at_once() {
    let redis = RedisServer::start().await;
    let a = node(&redis, "a", |_| {}).await;
    a.operator_with(
        1,
        json!({"name": "Ann", "departments": [1], "always_online": true}),
    )
    .await;
    a.put(
        "/api/v1/departments/1",
        json!({"name": "Sales", "max_chats": 2}),
    )
    .await;
    let _ = a.stop_keep_dir().await;
    let a2 = node(&redis, "a", |_| {}).await;
    let v = a2.view(1).await;
    assert_eq!(v["name"], "Ann");
    assert_eq!(
        v["status"], "online",
        "always online before anyone connects: {v}"
    );
    let (_, d) = a2.get("/api/v1/departments/1").await;
    assert_eq!(d["max_chats"], 2);
    assert_eq!(d["online"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_redis_outage_is_not_ready_refuses_writes_and_recovers() {
    let mut redis = RedisServer::start().await;
    let a = node(&redis, "a", |_| {}).await;
    a.operator(1, &[1]).await;
    let (mut op, _) = a.connect(1).await;
    redis.stop().await;
    // Not ready once the store notices; writes are refused, not pretended.
    let ready = readyz_until(&a, 503).await;
    assert_eq!(ready, 503);
    let (status, body) = a
        .put(
            "/api/v1/operators/2",
            json!({"name": "Bob", "departments": [1]}),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    let err = op
        .request(json!({"type": "set_status", "invisible": true}))
        .await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "internal");
    assert_eq!(a.view(1).await["connections"], 1, "sockets are kept");
    redis.spawn().await;
    let ready = readyz_until(&a, 200).await;
    assert_eq!(ready, 200, "reconnects by itself");
    let (status, _) = a
        .put(
            "/api/v1/operators/3",
            json!({"name": "Cy", "departments": [1]}),
        )
        .await;
    assert_eq!(status, 201);
    // Acknowledged writes from before the outage and after it are in Redis.
    let store = presence_hub::store::redis::RedisStore::open(&redis.url(), "hub:")
        .await
        .unwrap();
    let snap = tokio::task::spawn_blocking(move || presence_hub::store::Store::load(&store))
        .await
        .unwrap()
        .unwrap();
    let ids: Vec<u64> = snap.operators.iter().map(|o| o.record.id).collect();
    assert!(ids.contains(&1) && ids.contains(&3), "{ids:?}");
}

/// kill -9 of a node: the others stop counting its connections within the lease, then the
/// grace applies. Prints the measured ghost-online time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_killed_stops_counting_within_lease_and_grace() {
    let redis = RedisServer::start().await;
    let lease = Duration::from_millis(1000);
    let grace = Duration::from_millis(500);
    let a = node(&redis, "a", |cfg| {
        cfg.cluster.node_lease = lease;
        cfg.presence.disconnect_grace = grace;
    })
    .await;
    a.operator(1, &[1]).await;
    a.put(
        "/api/v1/departments/1",
        json!({"name": "Sales", "accept_timeout": "0s"}),
    )
    .await;
    // Node B: the real binary, in its own process, so that it can be killed.
    let mut b = common::node::NodeProcess::start(
        &redis,
        "b",
        "[cluster]\nnode_lease = \"1s\"\n[presence]\ndisconnect_grace = \"500ms\"\n",
    )
    .await;
    let port = b.port;
    let token = a.token(1);
    let mut op = Client::connect(&format!("ws://127.0.0.1:{port}/ws/operator?token={token}")).await;
    assert_eq!(op.next().await["type"], "hello");
    let mut widget = a.widget(&[1]).await;
    widget
        .next_where("online on node A", |v| {
            v["type"] == "widget_status" && v["online"] == true
        })
        .await;
    // A chat assigned to the operator on node B, not accepted yet.
    let (chat, _) = a.create_chat(json!({"department": 1})).await;
    let id = chat["id"].as_u64().unwrap();
    chat_where(&a, id, "assigned", |c| c["owner"] == 1).await;
    let killed = Instant::now();
    b.kill(); // SIGKILL
    let off = widget
        .next_where("offline after the kill", |v| v["type"] == "widget_status")
        .await;
    let ghost = killed.elapsed();
    assert_eq!(off["online"], false);
    println!("ghost-online after kill -9: {ghost:?} (lease {lease:?} + grace {grace:?})");
    // The chat pending on the dead node's operator goes back to the queue.
    let back = chat_where(&a, id, "back in the queue", |c| c["owner"].is_null()).await;
    assert_eq!(back["status"], "pending");
    assert!(
        ghost <= lease + grace + Duration::from_secs(1),
        "ghost online for {ghost:?}"
    );
    assert!(ghost >= grace, "the grace still applies: {ghost:?}");
}

/// Waits until `hub` knows chat `id` with `pred` true of it.
async fn chat_where(
    hub: &TestHub,
    id: u64,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..300 {
        let (status, v) = hub.get(&format!("/api/v1/chats/{id}")).await;
        if status == 200 && pred(&v) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("chat {id} never became {what} on {}", hub.addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_chat_created_on_one_node_is_assigned_to_an_operator_on_another() {
    let redis = RedisServer::start().await;
    let a = node(&redis, "a", |_| {}).await; // first: assigns
    let b = node(&redis, "b", |_| {}).await;
    a.operator(1, &[1]).await;
    known(&b, 1).await;
    let (mut op, _) = b.connect(1).await;
    // A's view must count B's connection before it can assign to operator 1.
    for _ in 0..200 {
        if a.view(1).await["status"] == "online" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (chat, token) = b
        .create_chat(json!({"department": 1, "visitor": {"name": "Ann"}}))
        .await;
    let id = chat["id"].as_u64().unwrap();
    let assigned = op.next_of("chat_assigned").await;
    assert_eq!(assigned["chat"]["id"], id);
    assert_eq!(assigned["chat"]["owner"], 1);
    assert_eq!(assigned["reason"], "auto");
    // Accept it from node B; the visitor on node A sees it and the messages flow both ways.
    let (mut visitor, _) = a.visitor(id, &token).await;
    let ack = op.request(json!({"type": "open_chat", "chat": id})).await;
    assert_eq!(ack["chat"]["status"], "active", "{ack}");
    let update = visitor
        .next_where("active", |v| {
            v["type"] == "chat" && v["chat"]["status"] == "active"
        })
        .await;
    assert_eq!(update["chat"]["owner_name"], "op1");
    op.request(json!({"type": "send_message", "chat": id, "text": "hello from B"}))
        .await;
    let m = visitor.next_of("message").await;
    assert_eq!(m["message"]["text"], "hello from B");
    visitor
        .send(json!({"type": "send_message", "text": "hi from A"}))
        .await;
    let m = op.next_of("message").await;
    assert_eq!(m["message"]["text"], "hi from A");
    assert_eq!(
        chat_where(&a, id, "active", |c| c["status"] == "active").await["owner"],
        1
    );
}

/// Chats created concurrently through three nodes: none gets two owners, nobody passes
/// capacity, and every node ends with the same owners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_concurrent_creation_never_two_owners_nor_past_capacity() {
    let redis = RedisServer::start().await;
    let nodes = [
        node(&redis, "a", |_| {}).await,
        node(&redis, "b", |_| {}).await,
        node(&redis, "c", |_| {}).await,
    ];
    nodes[0]
        .put(
            "/api/v1/departments/1",
            json!({"name": "Sales", "max_chats": 3, "accept_timeout": "0s"}),
        )
        .await;
    let mut sockets = Vec::new();
    for id in 1..=6u64 {
        nodes[0].operator(id, &[1]).await;
        known(&nodes[(id % 3) as usize], id).await;
        sockets.push(nodes[(id % 3) as usize].connect(id).await.0);
    }
    for _ in 0..300 {
        let (_, v) = nodes[0]
            .get("/api/v1/operators?department=1&status=online")
            .await;
        if v["operators"].as_array().unwrap().len() == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 30 chats for 18 places, 10 through each node at once.
    let mut creations = Vec::new();
    for i in 0..30usize {
        let hub = &nodes[i % 3];
        creations.push(async move { hub.post("/api/v1/chats", json!({"department": 1})).await });
    }
    let results = futures::future::join_all(creations).await;
    let mut ids: Vec<u64> = results
        .iter()
        .map(|(s, v)| {
            assert_eq!(*s, 201, "{v}");
            v["chat"]["id"].as_u64().unwrap()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 30, "every chat has its own id");
    // Wait until the assigning node has placed 18 chats and every node agrees.
    let mut owners = Vec::new();
    for hub in &nodes {
        let mut seen = Vec::new();
        for _ in 0..300 {
            let (_, v) = hub.get("/api/v1/chats?department=1").await;
            seen = v["chats"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| (c["id"].as_u64().unwrap(), c["owner"].as_u64()))
                .collect();
            if seen.iter().filter(|(_, o)| o.is_some()).count() == 18 && seen.len() == 30 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        owners.push(seen);
    }
    assert_eq!(
        owners[0].iter().filter(|(_, o)| o.is_some()).count(),
        18,
        "capacity 6 × 3 filled"
    );
    assert_eq!(owners[0], owners[1], "nodes agree");
    assert_eq!(owners[0], owners[2], "nodes agree");
    for op in 1..=6u64 {
        let n = owners[0].iter().filter(|(_, o)| *o == Some(op)).count();
        assert!(n <= 3, "operator {op} has {n} chats, capacity 3");
        for hub in &nodes {
            assert_eq!(
                hub.view(op).await["pending_chats"],
                n as u64,
                "counts agree on {}",
                hub.addr
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_assigning_node_stops_and_another_takes_over() {
    let redis = RedisServer::start().await;
    let mut a = node(&redis, "a", |_| {}).await;
    let b = node(&redis, "b", |_| {}).await;
    a.operator_with(
        1,
        json!({"name": "Ann", "departments": [1], "always_online": true}),
    )
    .await;
    known(&b, 1).await;
    a.stop().await;
    // B is elected within a third of the lease and assigns chats created through it.
    let (chat, _) = b.create_chat(json!({"department": 1})).await;
    let id = chat["id"].as_u64().unwrap();
    let c = chat_where(&b, id, "assigned", |c| c["owner"] == 1).await;
    assert_eq!(c["status"], "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_logout_is_immediate_on_every_node() {
    let redis = RedisServer::start().await;
    let long_grace = |cfg: &mut presence_hub::config::Config| {
        cfg.presence.disconnect_grace = Duration::from_secs(30)
    };
    let a = node(&redis, "a", long_grace).await;
    let b = node(&redis, "b", long_grace).await;
    a.operator(1, &[1]).await;
    known(&b, 1).await;
    let (mut op, _) = a.connect(1).await;
    let mut widget = b.widget(&[1]).await;
    widget
        .next_where("online on node B", |v| {
            v["type"] == "widget_status" && v["online"] == true
        })
        .await;
    let ack = op.request(json!({"type": "logout"})).await;
    assert_eq!(ack["type"], "ack");
    // Well inside the 30 s grace: only a logout that skips the grace everywhere passes.
    let off = widget.next_of("widget_status").await;
    assert_eq!(off["online"], false);
    assert_eq!(b.view(1).await["status_reason"], "logged_out");
}

/// Polls /readyz (nothing pushes readiness) until it answers `want`, for at most 5 s.
async fn readyz_until(hub: &TestHub, want: u16) -> u16 {
    let mut status = 0;
    for _ in 0..100 {
        status = hub
            .http
            .get(hub.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    status
}

//! Online sessions, the status log and online hours in a cluster: two nodes on one real
//! redis-server agree (SPEC.md sections 3, 8 and 11).

mod common;

use std::time::{Duration, Instant};

use common::TestHub;
use common::redis::RedisServer;
use serde_json::{Value, json};

async fn node(redis: &RedisServer, id: &str) -> TestHub {
    common::node::redis_node(redis, id, |_| {}).await
}

/// Reads `GET path` on `hub` until `pred` holds, bounded.
async fn until(hub: &TestHub, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + common::WAIT;
    loop {
        let (s, v) = hub.get(path).await;
        if s == 200 && pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: last answer {s} {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sessions(v: &Value) -> Vec<Value> {
    v["sessions"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_session_is_one_session_across_two_nodes() {
    let redis = RedisServer::start().await;
    let a = node(&redis, "a").await;
    let b = node(&redis, "b").await;
    a.operator(1, &[1]).await;
    until(&b, "/api/v1/operators/1", "the record on node B", |_| true).await;
    // Two tabs, one on each node: both nodes see the operator turn online.
    let (tab_a, _) = a.connect(1).await;
    let (tab_b, _) = b.connect(1).await;
    until(&a, "/api/v1/operators/1", "both tabs counted on A", |v| {
        v["connections"] == 2
    })
    .await;
    until(&b, "/api/v1/operators/1", "both tabs counted on B", |v| {
        v["connections"] == 2
    })
    .await;
    let on_a = until(&a, "/api/v1/operators/1/sessions", "a session", |v| {
        sessions(v).len() == 1
    })
    .await;
    let on_b = b.get("/api/v1/operators/1/sessions").await.1;
    assert_eq!(on_a, on_b, "the same answer from every node");
    assert_eq!(sessions(&on_a)[0]["ended_at"], Value::Null);

    // Both tabs close; after the grace both nodes see the operator go offline.
    tab_a.close().await;
    tab_b.close().await;
    let done = until(
        &b,
        "/api/v1/operators/1/sessions",
        "the session ended",
        |v| sessions(v).iter().all(|s| !s["ended_at"].is_null()),
    )
    .await;
    until(&a, "/api/v1/operators/1", "offline on A", |v| {
        v["status"] == "offline"
    })
    .await;
    until(&b, "/api/v1/operators/1", "offline on B", |v| {
        v["status"] == "offline"
    })
    .await;
    let from_a = a.get("/api/v1/operators/1/sessions").await.1;
    assert_eq!(
        sessions(&done).len(),
        1,
        "one session, not one per node: {done}"
    );
    assert_eq!(sessions(&done)[0]["end_reason"], "disconnected");
    assert_eq!(
        sessions(&done)[0]["started_at"],
        sessions(&on_a)[0]["started_at"]
    );
    assert_eq!(from_a, b.get("/api/v1/operators/1/sessions").await.1);
    let report = a.get("/api/v1/reports/online").await.1;
    assert_eq!(report["operators"][0]["sessions"], 1, "{report}");
    // One `session` event in the feed, the same from both nodes.
    let feed = until(
        &a,
        "/api/v1/events?types=session",
        "the session event",
        |v| v["events"].as_array().is_some_and(|e| !e.is_empty()),
    )
    .await;
    assert_eq!(feed["events"].as_array().unwrap().len(), 1, "{feed}");
    assert_eq!(feed["events"][0]["session"]["end_reason"], "disconnected");
    assert_eq!(feed, b.get("/api/v1/events?types=session").await.1);

    // The status log is the same from both nodes.
    b.patch("/api/v1/operators/1/status", json!({"online": false}))
        .await;
    let log = until(&a, "/api/v1/operators/1/log", "the entry on A", |v| {
        v["log"].as_array().is_some_and(|l| l.len() == 1)
    })
    .await;
    assert_eq!(log["log"][0]["actor"], json!({"kind":"api"}));
    assert_eq!(log, b.get("/api/v1/operators/1/log").await.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_hours_are_the_same_on_every_node() {
    let redis = RedisServer::start().await;
    let a = node(&redis, "a").await;
    let b = node(&redis, "b").await;
    let hours = json!({"timezone":"Pacific/Auckland","weekly":{},"closed_dates":[]});
    let (s, v) = a
        .put(
            "/api/v1/departments/4",
            json!({"bot": true, "hours": hours}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let on_b = until(&b, "/api/v1/departments/4", "the hours on B", |v| {
        v["hours"] == hours
    })
    .await;
    assert_eq!(on_b["reason"], "closed");
    assert_eq!(on_b["opens_at"], Value::Null);
    // Opening the department on B reaches A too.
    b.put("/api/v1/departments/4", json!({"bot": true})).await;
    until(&a, "/api/v1/departments/4", "open again on A", |v| {
        v["reason"] == "bot"
    })
    .await;
}

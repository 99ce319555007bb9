//! Online sessions, the online report, the status log and their retention (SPEC.md section
//! 11) through real sockets and the HTTP API, on the embedded store. The store contract
//! (both stores) is in `store_contract.rs`, the two-node case in `cluster.rs`.

mod common;

use std::time::{Duration, Instant};

use common::{Client, TestHub};
use serde_json::{Value, json};

/// Reads `GET path` until `pred` holds (the change that leads there may be a timer or an
/// `activity` report, which are not acknowledged); fails after a bounded wait.
async fn until(hub: &TestHub, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + common::WAIT;
    loop {
        let (s, v) = hub.get(path).await;
        assert_eq!(s, 200, "{path}: {v}");
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: last answer {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sessions(v: &Value) -> Vec<Value> {
    v["sessions"].as_array().cloned().unwrap_or_default()
}

fn reasons(v: &Value) -> Vec<Value> {
    sessions(v)
        .iter()
        .map(|s| s["end_reason"].clone())
        .collect()
}

async fn session_list(hub: &TestHub, op: u64) -> Value {
    hub.get(&format!("/api/v1/operators/{op}/sessions")).await.1
}

/// Waits until operator `op` has `n` sessions, the last one running.
async fn running(hub: &TestHub, op: u64, n: usize) -> Value {
    until(
        hub,
        &format!("/api/v1/operators/{op}/sessions"),
        "a running session",
        |v| sessions(v).len() == n && sessions(v)[n - 1]["ended_at"].is_null(),
    )
    .await
}

/// Waits until operator `op` has `n` sessions, all ended.
async fn ended(hub: &TestHub, op: u64, n: usize) -> Value {
    until(
        hub,
        &format!("/api/v1/operators/{op}/sessions"),
        "sessions ended",
        |v| sessions(v).len() == n && sessions(v).iter().all(|s| !s["ended_at"].is_null()),
    )
    .await
}

fn ms(v: &Value) -> u64 {
    let t: jiff::Timestamp = v.as_str().expect("an RFC 3339 string").parse().unwrap();
    t.as_millisecond() as u64
}

#[tokio::test]
async fn session_starts_and_ends_with_each_reason() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    assert!(
        sessions(&session_list(&hub, 1).await).is_empty(),
        "offline: no session"
    );
    let (mut op, _) = hub.connect(1).await;
    let v = running(&hub, 1, 1).await;
    let s = &sessions(&v)[0];
    assert_eq!(s["operator"], 1);
    assert_eq!(s["end_reason"], Value::Null);

    // set_offline
    let ack = op
        .request(json!({"type":"set_status","online":false}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    ended(&hub, 1, 1).await;
    op.request(json!({"type":"set_status","online":true})).await;
    running(&hub, 1, 2).await;
    // inactive
    op.send(json!({"type":"activity","active":false})).await;
    ended(&hub, 1, 2).await;
    op.send(json!({"type":"activity","active":true})).await;
    running(&hub, 1, 3).await;
    // disconnected: after the grace
    op.close().await;
    ended(&hub, 1, 3).await;
    // logged_out
    let (mut op, _) = hub.connect(1).await;
    running(&hub, 1, 4).await;
    op.send(json!({"type":"logout"})).await;
    let v = ended(&hub, 1, 4).await;
    assert_eq!(
        reasons(&v),
        vec![
            json!("set_offline"),
            json!("inactive"),
            json!("disconnected"),
            json!("logged_out")
        ]
    );
    for s in sessions(&v) {
        assert!(ms(&s["ended_at"]) >= ms(&s["started_at"]), "{s}");
        assert_eq!(
            s["seconds"].as_u64().unwrap(),
            (ms(&s["ended_at"]) - ms(&s["started_at"])) / 1000
        );
    }
}

#[tokio::test]
async fn session_reconnect_inside_the_grace_does_not_split() {
    let hub = TestHub::start_with(|c| c.presence.disconnect_grace = Duration::from_secs(2)).await;
    hub.operator(1, &[1]).await;
    let (op, _) = hub.connect(1).await;
    let v = running(&hub, 1, 1).await;
    let started = sessions(&v)[0]["started_at"].clone();
    op.close().await;
    let (_op, _) = hub.connect(1).await;
    assert_eq!(hub.view(1).await["connections"], 1);
    // Past the first grace's end: still the one session, running.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let v = session_list(&hub, 1).await;
    assert_eq!(sessions(&v).len(), 1, "{v}");
    assert_eq!(sessions(&v)[0]["started_at"], started);
    assert_eq!(sessions(&v)[0]["ended_at"], Value::Null);
}

#[tokio::test]
async fn session_report_clipped_to_a_window() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    hub.operator(3, &[2]).await;
    let (mut one, _) = hub.connect(1).await;
    let (_two, _) = hub.connect(2).await;
    running(&hub, 2, 1).await;
    // A session of about 2.2 s for operator 1 (time has to pass for seconds to count).
    tokio::time::sleep(Duration::from_millis(2200)).await;
    one.request(json!({"type":"set_status","online":false}))
        .await;
    let s = sessions(&ended(&hub, 1, 1).await)[0].clone();
    let (start, end) = (ms(&s["started_at"]), ms(&s["ended_at"]));
    let running_start = ms(&sessions(&session_list(&hub, 2).await)[0]["started_at"]);

    // Window from one second into the session to an hour ahead.
    let from = start + 1000;
    let q = format!(
        "/api/v1/reports/online?from={}&to={}&department=1",
        presence_hub::audit::rfc3339_ms(from),
        presence_hub::audit::rfc3339_ms(from + 3_600_000)
    );
    let before = presence_hub::audit::now_ms();
    let (status, r) = hub.get(&q).await;
    let after = presence_hub::audit::now_ms();
    assert_eq!(status, 200, "{r}");
    let ops = r["operators"].as_array().unwrap();
    assert_eq!(ops.len(), 2, "department 1 only: {r}");
    assert_eq!(ops[0]["id"], 1);
    assert_eq!(ops[0]["name"], "op1");
    assert_eq!(ops[0]["sessions"], 1);
    assert_eq!(
        ops[0]["online_seconds"].as_u64().unwrap(),
        (end - from) / 1000
    );
    // The running session counts from the window's start until now.
    let two = ops[1]["online_seconds"].as_u64().unwrap();
    let lo = (before - from.max(running_start)) / 1000;
    let hi = (after - from.max(running_start)) / 1000;
    assert!((lo..=hi).contains(&two), "{two} not in {lo}..={hi}");
    assert_eq!(ms(&r["from"]), from);

    // A window that ends before operator 1's session began counts nothing.
    let q = format!(
        "/api/v1/reports/online?from={}&to={}",
        presence_hub::audit::rfc3339_ms(start - 5000),
        presence_hub::audit::rfc3339_ms(start)
    );
    let r = hub.get(&q).await.1;
    assert_eq!(
        r["operators"].as_array().unwrap().len(),
        3,
        "all operators: {r}"
    );
    assert!(
        r["operators"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["online_seconds"] == 0)
    );
    // Bad windows are 400s.
    for bad in [
        "from=yesterday",
        "from=2026-12-01T10:00:00Z&to=2026-12-01T09:00:00Z",
        "x=1",
    ] {
        let (s, v) = hub.get(&format!("/api/v1/reports/online?{bad}")).await;
        assert_eq!(s, 400, "{bad}: {v}");
    }
}

#[tokio::test]
async fn session_ended_at_shutdown_and_always_online_runs_again_after_a_restart() {
    let hub = TestHub::start().await;
    hub.operator_with(
        1,
        json!({"name":"ann","departments":[1],"always_online":true}),
    )
    .await;
    running(&hub, 1, 1).await;
    let dir = hub.dir.clone();
    let _tmp = hub.stop_keep_dir().await;
    let hub = TestHub::start_in(&dir, |_| {}).await;
    let v = running(&hub, 1, 2).await;
    assert_eq!(
        sessions(&v)[0]["end_reason"],
        "disconnected",
        "ended at shutdown: {v}"
    );
}

#[tokio::test]
async fn log_actor_and_changes_of_own_supervisor_and_backend_changes() {
    let hub = TestHub::start().await;
    hub.operator(7, &[1]).await;
    hub.operator_with(
        9,
        json!({"name":"sup","watch_departments":[1],"permissions":["set_operator_status"]}),
    )
    .await;
    let (mut ann, _) = hub.connect(7).await;
    let (mut sup, _) = hub.connect(9).await;
    ann.request(json!({"type":"set_status","invisible":true}))
        .await;
    let ack = sup
        .request(json!({"type":"set_status","operator":7,"online":false}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let (s, _) = hub
        .patch(
            "/api/v1/operators/7/status",
            json!({"online": true, "invisible": false}),
        )
        .await;
    assert_eq!(s, 200);
    // A PUT that changes a setting is the back end's change too; one that does not is not logged.
    hub.operator_with(
        7,
        json!({"name":"op7","departments":[1],"always_online":true}),
    )
    .await;
    hub.operator_with(7, json!({"name":"op7","departments":[1]}))
        .await;
    // A refused change is not logged.
    let err = sup
        .request(json!({"type":"set_status","operator":9,"online":false}))
        .await;
    assert_eq!(err["code"], "forbidden");

    let (s, v) = hub.get("/api/v1/operators/7/log").await;
    assert_eq!(s, 200, "{v}");
    let log: Vec<Value> = v["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| json!({"operator": e["operator"], "actor": e["actor"], "changes": e["changes"]}))
        .collect();
    assert_eq!(
        log,
        vec![
            json!({"operator":7,"actor":{"kind":"api"},"changes":{"always_online":[false,true]}}),
            json!({"operator":7,"actor":{"kind":"api"},"changes":{"online":[false,true],"invisible":[true,false]}}),
            json!({"operator":7,"actor":{"kind":"operator","id":9},"changes":{"online":[true,false]}}),
            json!({"operator":7,"actor":{"kind":"operator","id":7},"changes":{"invisible":[false,true]}}),
        ],
        "newest first"
    );
    let at: Vec<u64> = v["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| ms(&e["at"]))
        .collect();
    assert!(at.windows(2).all(|w| w[0] >= w[1]), "{at:?}");
    let (_, v) = hub.get("/api/v1/operators/7/log?limit=1").await;
    assert_eq!(v["log"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["log"][0]["changes"],
        json!({"always_online":[false,true]})
    );
    assert!(
        hub.get("/api/v1/operators/9/log").await.1["log"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    for bad in ["limit=0", "limit=5000", "limit=x", "since=1"] {
        let (s, v) = hub.get(&format!("/api/v1/operators/7/log?{bad}")).await;
        assert_eq!(s, 400, "{bad}: {v}");
    }
}

#[tokio::test]
async fn audit_retention_drops_old_sessions_and_log_entries() {
    let hub = TestHub::start_with(|c| c.audit.retention = Duration::from_secs(1)).await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    op.request(json!({"type":"set_status","online":false}))
        .await;
    let v = ended(&hub, 1, 1).await;
    assert_eq!(reasons(&v), vec![json!("set_offline")]);
    assert_eq!(
        hub.get("/api/v1/operators/1/log").await.1["log"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Within about a second plus a cleanup period, both are gone.
    until(
        &hub,
        "/api/v1/operators/1/log",
        "the log entry dropped",
        |v| v["log"].as_array().is_some_and(|l| l.is_empty()),
    )
    .await;
    until(
        &hub,
        "/api/v1/operators/1/sessions",
        "the session dropped",
        |v| sessions(v).is_empty(),
    )
    .await;
    // A running session is never dropped.
    op.request(json!({"type":"set_status","online":true})).await;
    running(&hub, 1, 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sessions(&session_list(&hub, 1).await).len(), 1);
    drop::<Client>(op);
}

#[tokio::test]
async fn session_ended_is_a_session_event_in_the_feed() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    running(&hub, 1, 1).await;
    op.request(json!({"type":"set_status","online":false}))
        .await;
    let stored = sessions(&ended(&hub, 1, 1).await)[0].clone();
    let page = until(
        &hub,
        "/api/v1/events?types=session",
        "a session event",
        |v| v["events"].as_array().is_some_and(|e| !e.is_empty()),
    )
    .await;
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{page}");
    let e = &events[0];
    assert_eq!(e["type"], "session");
    assert_eq!(
        e["session"], stored,
        "the event carries the session as stored"
    );
    assert!(e["id"].is_string() && e["at"].is_string(), "{e}");
    // A session that starts is no event; nor is one still running.
    op.request(json!({"type":"set_status","online":true})).await;
    running(&hub, 1, 2).await;
    let (_, page) = hub.get("/api/v1/events?types=session").await;
    assert_eq!(page["events"].as_array().unwrap().len(), 1, "{page}");
}

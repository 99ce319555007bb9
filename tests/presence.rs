//! The presence rules of SPEC.md section 2 and the operator WebSocket of section 6, through
//! real sockets. Each test is named after its rule (`cargo test grace`, `cargo test logout`).
//! Events are awaited with the harness's bounded waits; absence is shown either by a fence
//! (a request whose answer the hub queues after any event the change could have caused) or,
//! for timer-driven events, by watching over the window in which they would come.

mod common;

use std::time::{Duration, Instant};

use common::{Client, TestHub};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ALL_PERMISSIONS: [&str; 4] = [
    "change_online_status",
    "change_visibility",
    "change_always_online",
    "set_operator_status",
];

/// True for an `operator_status` about operator `id` whose view satisfies `pred`.
fn status_of(id: u64, pred: impl Fn(&Value) -> bool) -> impl Fn(&Value) -> bool {
    move |m: &Value| {
        m["type"] == "operator_status" && m["operator"]["id"] == id && pred(&m["operator"])
    }
}

fn offline(v: &Value) -> bool {
    v["status"] == "offline"
}

/// The next `operator_status` about `id` matching `pred`; returns the view.
async fn await_status(c: &mut Client, id: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    c.next_where(what, status_of(id, pred)).await["operator"].clone()
}

/// The next `widget_status` of `dept`.
async fn widget_next(w: &mut Client, dept: u64) -> Value {
    w.next_where("widget_status", |m| {
        m["type"] == "widget_status" && m["department"] == dept
    })
    .await
}

/// Sends a no-op request and reads up to its answer, failing on any message matching `bad`
/// before it. Every event a finished change caused is queued before this answer, so passing
/// proves that the change sent nothing matching `bad` to this socket.
async fn fence(c: &mut Client, what: &str, bad: impl Fn(&Value) -> bool) {
    let r = format!("fence-{}", rand_ref());
    c.send(json!({"type":"activity","active":true,"ref":r}))
        .await;
    loop {
        let m = c.next().await;
        if m["ref"] == r.as_str() {
            assert_eq!(m["type"], "ack", "{m}");
            return;
        }
        assert!(!bad(&m), "unexpected {what}: {m}");
    }
}

fn rand_ref() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Sends a request and returns its answer and the events that came before it.
async fn request_with_events(c: &mut Client, mut req: Value) -> (Value, Vec<Value>) {
    let r = format!("req-{}", rand_ref());
    req["ref"] = json!(r);
    c.send(req).await;
    let mut before = Vec::new();
    loop {
        let m = c.next().await;
        if m["ref"] == r.as_str() && (m["type"] == "ack" || m["type"] == "error") {
            return (m, before);
        }
        before.push(m);
    }
}

fn ids(views: &Value) -> Vec<u64> {
    let mut v: Vec<u64> = views
        .as_array()
        .expect("an array")
        .iter()
        .map(|o| o["id"].as_u64().unwrap())
        .collect();
    v.sort_unstable();
    v
}

async fn widget_http(hub: &TestHub, dept: u64) -> Value {
    let res = hub
        .http
        .get(hub.url(&format!("/api/v1/widget/status?department={dept}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    res.json().await.unwrap()
}

// ----- status derived from the settings and the live state -----

#[tokio::test]
async fn status_derived_from_settings_and_connections() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;

    // Never connected, based on activity: offline, disconnected.
    let v = hub.view(1).await;
    assert_eq!(
        (v["status"].as_str(), v["status_reason"].as_str()),
        (Some("offline"), Some("disconnected")),
        "{v}"
    );
    assert_eq!(v["connections"], 0);
    assert_eq!(
        (
            v["online"].clone(),
            v["invisible"].clone(),
            v["always_online"].clone()
        ),
        (json!(true), json!(false), json!(false)),
        "defaults"
    );

    // Connected and online: online, no reason.
    let (mut op, hello) = hub.connect(1).await;
    assert_eq!(hello["operator"]["status"], "online");
    assert_eq!(hello["operator"]["status_reason"], Value::Null);
    assert_eq!(hello["operator"]["connections"], 1);

    // online = false: offline with `set_offline`, on the socket and over HTTP.
    let ack = op
        .request(json!({"type":"set_status","online":false}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["operator"]["status"], "offline");
    assert_eq!(ack["operator"]["status_reason"], "set_offline");
    let v = hub.view(1).await;
    assert_eq!(
        (v["status"].as_str(), v["status_reason"].as_str()),
        (Some("offline"), Some("set_offline")),
        "{v}"
    );
    assert_eq!(v["connections"], 1, "still connected");

    // always_online does not override online = false.
    let (s, v) = hub
        .patch("/api/v1/operators/1/status", json!({"always_online": true}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["status"].as_str(), v["status_reason"].as_str()),
        (Some("offline"), Some("set_offline")),
        "{v}"
    );

    // Back online.
    let ack = op.request(json!({"type":"set_status","online":true})).await;
    assert_eq!(ack["operator"]["status"], "online", "{ack}");
}

#[tokio::test]
async fn status_always_online_without_connection_is_online() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (s, v) = hub
        .patch("/api/v1/operators/1/status", json!({"always_online": true}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "online", "{v}");
    assert_eq!(v["status_reason"], Value::Null);
    assert_eq!(v["connections"], 0);
    assert_eq!(widget_http(&hub, 1).await["online"], true);
    let (s, v) = hub.get("/api/v1/operators?status=online").await;
    assert_eq!(s, 200);
    assert_eq!(ids(&v["operators"]), vec![1]);
}

#[tokio::test]
async fn status_view_is_flat_with_every_field() {
    let hub = TestHub::start().await;
    hub.operator_with(
        1,
        json!({"name":"Ann","departments":[1],"watch_departments":[2],
        "permissions":["open_all"],"max_chats":3,"exclude_autoassign":true,"auto_accept":true}),
    )
    .await;
    let (_op, hello) = hub.connect(1).await;
    for v in [hello["operator"].clone(), hub.view(1).await] {
        for key in common::VIEW_KEYS {
            assert!(v.get(key).is_some(), "view lacks {key}: {v}");
        }
        assert_eq!(v["name"], "Ann");
        assert_eq!(v["watch_departments"], json!([2]));
        assert_eq!(v["max_chats"], 3);
        assert_eq!(v["misconfigured"], false);
    }
}

// ----- hello and who hears operator_status -----

#[tokio::test]
async fn hello_has_own_view_colleagues_and_department_states() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await; // shares department 1
    hub.operator(2, &[1, 2]).await; // the one who connects
    hub.operator(3, &[3]).await; // unrelated
    hub.operator_with(
        4,
        json!({"name":"sup","departments":[],"watch_departments":[2]}),
    )
    .await; // watches 2
    hub.operator(5, &[2]).await; // shares department 2
    let (s, pending) = hub.post("/api/v1/chats", json!({"department":1})).await;
    assert_eq!(s, 201, "{pending}");
    let (s, unrelated) = hub.post("/api/v1/chats", json!({"department":3})).await;
    assert_eq!(s, 201, "{unrelated}");
    let (_c1, _) = hub.connect(1).await;

    let (_c2, hello) = hub.connect(2).await;
    let me = &hello["operator"];
    assert_eq!(me["id"], 2);
    assert_eq!(me["status"], "online");
    assert_eq!(me["connections"], 1);
    assert_eq!(
        ids(&hello["operators"]),
        vec![1, 4, 5],
        "colleagues and watchers, not 3, not self: {hello}"
    );
    let one = hello["operators"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == 1)
        .unwrap();
    assert_eq!(one["status"], "online", "colleague's live state: {one}");
    assert_eq!(one["connections"], 1);
    let five = hello["operators"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == 5)
        .unwrap();
    assert_eq!(five["status"], "offline");
    assert_eq!(five["status_reason"], "disconnected");

    let mut depts = hello["departments"].as_array().unwrap().clone();
    depts.sort_by_key(|d| d["department"].as_u64());
    assert_eq!(
        depts,
        vec![
            json!({"department":1,"online":true,"reason":"operators"}),
            json!({"department":2,"online":true,"reason":"operators"}),
        ],
        "{hello}"
    );
    let chats = ids(&hello["chats"]);
    assert!(
        chats.contains(&pending["chat"]["id"].as_u64().unwrap()),
        "pending chat of department 1: {hello}"
    );
    assert!(
        !chats.contains(&unrelated["chat"]["id"].as_u64().unwrap()),
        "chat of an unrelated department: {hello}"
    );
}

#[tokio::test]
async fn hello_of_supervisor_lists_watched_department() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[2]).await;
    hub.operator_with(
        9,
        json!({"name":"sup","departments":[],"watch_departments":[1]}),
    )
    .await;
    let (_c1, _) = hub.connect(1).await;
    let (_s, hello) = hub.connect(9).await;
    assert_eq!(ids(&hello["operators"]), vec![1]);
    assert_eq!(
        hello["departments"],
        json!([{"department":1,"online":true,"reason":"operators"}])
    );
}

#[tokio::test]
async fn operator_status_reaches_colleagues_and_watchers_not_unrelated() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await; // colleague
    hub.operator_with(
        2,
        json!({"name":"sup","departments":[5],"watch_departments":[1]}),
    )
    .await; // supervisor
    hub.operator(3, &[3]).await; // unrelated
    hub.operator(7, &[1]).await; // the one who changes
    let (mut colleague, _) = hub.connect(1).await;
    let (mut sup, _) = hub.connect(2).await;
    let (mut unrelated, _) = hub.connect(3).await;

    let (mut me, _) = hub.connect(7).await;
    let v = await_status(&mut colleague, 7, "7 online to colleague", |v| {
        v["status"] == "online"
    })
    .await;
    assert_eq!(v["connections"], 1);
    await_status(&mut sup, 7, "7 online to supervisor", |v| {
        v["status"] == "online"
    })
    .await;

    let (ack, events) =
        request_with_events(&mut me, json!({"type":"set_status","online":false})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let own = events
        .iter()
        .find(|m| status_of(7, offline)(m))
        .unwrap_or_else(|| panic!("no own operator_status: {events:?}"));
    assert_eq!(own["operator"]["status_reason"], "set_offline");
    let v = await_status(&mut colleague, 7, "7 offline to colleague", offline).await;
    assert_eq!(v["status_reason"], "set_offline");
    await_status(&mut sup, 7, "7 offline to supervisor", offline).await;

    // Operator 3 shares nothing with 7: neither change reached it.
    fence(
        &mut unrelated,
        "operator_status of 7",
        status_of(7, |_| true),
    )
    .await;
}

// ----- disconnect grace -----

fn grace_config(ms: u64) -> impl FnOnce(&mut presence_hub::config::Config) {
    move |cfg| cfg.presence.disconnect_grace = Duration::from_millis(ms)
}

#[tokio::test]
async fn grace_reconnect_inside_grace_shows_no_flap() {
    const GRACE: Duration = Duration::from_millis(600);
    let hub = TestHub::start_with(grace_config(600)).await;
    // Operator 1 alone keeps department 1 online; colleague 2 shares department 2 with them.
    hub.operator(1, &[1, 2]).await;
    hub.operator(2, &[2]).await;
    let mut widget = hub.widget(&[1]).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], false);
    let (mut colleague, _) = hub.connect(2).await;

    let (op, _) = hub.connect(1).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], true);
    await_status(&mut colleague, 1, "1 online", |v| v["status"] == "online").await;
    op.close().await;
    // The close is seen (connections 0) while the status stays online.
    let v = await_status(&mut colleague, 1, "1 with no connection", |v| {
        v["connections"] == 0
    })
    .await;
    assert_eq!(v["status"], "online", "inside the grace: {v}");
    let (_op, hello) = hub.connect(1).await;
    assert_eq!(hello["operator"]["status"], "online");
    assert_eq!(hello["operator"]["connections"], 1);

    // Watch past the end of the first grace: neither the widget nor the colleague ever
    // sees operator 1 or department 1 offline.
    let window = GRACE + Duration::from_millis(400);
    let w = widget.silent_for(window, "widget change", |m| m["type"] == "widget_status");
    let c = colleague.silent_for(window, "offline of 1", status_of(1, offline));
    tokio::join!(w, c);
    let v = hub.view(1).await;
    assert_eq!(
        (v["status"].as_str(), v["connections"].as_u64()),
        (Some("online"), Some(1)),
        "{v}"
    );
    assert_eq!(widget_http(&hub, 1).await["online"], true);
}

#[tokio::test]
async fn grace_expires_offline_disconnected() {
    const GRACE: Duration = Duration::from_millis(500);
    let hub = TestHub::start_with(grace_config(500)).await;
    // Department 4 is operator 1's alone; colleague 2 keeps department 1 online.
    hub.operator(1, &[1, 4]).await;
    hub.operator(2, &[1]).await;
    let (mut colleague, _) = hub.connect(2).await;
    let (op, _) = hub.connect(1).await;
    let mut widget = hub.widget(&[1]).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], true);
    let mut alone = hub.widget(&[4]).await;
    assert_eq!(widget_next(&mut alone, 4).await["online"], true);

    let closed_at = Instant::now();
    op.close().await;
    let v = await_status(&mut colleague, 1, "1 offline after the grace", offline).await;
    let elapsed = closed_at.elapsed();
    assert_eq!(v["status_reason"], "disconnected", "{v}");
    assert_eq!(v["connections"], 0);
    assert!(
        elapsed >= GRACE - Duration::from_millis(50),
        "offline after {elapsed:?}, before the grace of {GRACE:?}"
    );
    let w = widget_next(&mut alone, 4).await;
    assert_eq!(
        (w["online"].clone(), w["reason"].clone()),
        (json!(false), json!("none")),
        "{w}"
    );
    let v = hub.view(1).await;
    assert_eq!(
        (v["status"].as_str(), v["status_reason"].as_str()),
        (Some("offline"), Some("disconnected"))
    );
    assert_eq!(v["online"], true, "the online setting is kept");
    // Department 1 still has operator 2.
    widget
        .silent_for(Duration::from_millis(100), "department 1 change", |m| {
            m["type"] == "widget_status"
        })
        .await;
}

#[tokio::test]
async fn grace_keeps_online_setting_next_connection_is_online() {
    let hub = TestHub::start_with(grace_config(200)).await;
    hub.operator(1, &[1]).await;
    let mut widget = hub.widget(&[1]).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], false);
    let (op, _) = hub.connect(1).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], true);
    op.close().await;
    let w = widget_next(&mut widget, 1).await;
    assert_eq!(w["online"], false, "{w}");
    assert_eq!(hub.view(1).await["status_reason"], "disconnected");

    let (_op, hello) = hub.connect(1).await;
    assert_eq!(hello["operator"]["status"], "online", "{hello}");
    assert_eq!(hello["operator"]["online"], true);
    let w = widget_next(&mut widget, 1).await;
    assert_eq!(
        (w["online"].clone(), w["reason"].clone()),
        (json!(true), json!("operators"))
    );
}

// ----- always online -----

#[tokio::test]
async fn always_online_survives_closing_every_connection() {
    let hub = TestHub::start_with(grace_config(200)).await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let (s, _) = hub
        .patch("/api/v1/operators/1/status", json!({"always_online": true}))
        .await;
    assert_eq!(s, 200);
    let (mut colleague, _) = hub.connect(2).await;
    colleague
        .request(json!({"type":"set_status","online":false}))
        .await; // so 1 alone keeps 1 online
    let mut widget = hub.widget(&[1]).await;
    let (a, _) = hub.connect(1).await;
    let (b, hello) = hub.connect(1).await;
    assert_eq!(hello["operator"]["connections"], 2);
    assert_eq!(widget_next(&mut widget, 1).await["online"], true);

    a.close().await;
    b.close().await;
    let v = await_status(&mut colleague, 1, "1 without connections", |v| {
        v["connections"] == 0
    })
    .await;
    assert_eq!(v["status"], "online", "{v}");
    let window = Duration::from_millis(600); // three graces
    let w = widget.silent_for(window, "widget offline", |m| {
        m["type"] == "widget_status" && m["online"] == false
    });
    let c = colleague.silent_for(window, "offline of 1", status_of(1, offline));
    tokio::join!(w, c);
    let v = hub.view(1).await;
    assert_eq!(
        (v["status"].as_str(), v["connections"].as_u64()),
        (Some("online"), Some(0)),
        "{v}"
    );
    assert_eq!(widget_http(&hub, 1).await["online"], true);

    // Auto-assignment still includes them.
    let (s, chat) = hub.post("/api/v1/chats", json!({"department":1})).await;
    assert_eq!(s, 201, "{chat}");
    assert_eq!(chat["chat"]["owner"], 1, "{chat}");
}

// ----- logout -----

#[tokio::test]
async fn logout_closes_1000_and_is_offline_at_once() {
    let hub = TestHub::start_with(grace_config(30_000)).await;
    let (mut colleague, mut widget, mut op) = alone_in_department(&hub).await;

    let ack = op.request(json!({"type":"logout"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let frame = op.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1000, "{frame:?}");

    // With a 30 s grace only an immediate offline arrives within the harness's wait.
    let v = await_status(&mut colleague, 1, "1 logged out", offline).await;
    assert_eq!(v["status_reason"], "logged_out", "{v}");
    assert_eq!(v["connections"], 0);
    let w = widget_next(&mut widget, 1).await;
    assert_eq!(
        (w["online"].clone(), w["reason"].clone()),
        (json!(false), json!("none")),
        "{w}"
    );
    let v = hub.view(1).await;
    assert_eq!(
        (v["status"].as_str(), v["status_reason"].as_str()),
        (Some("offline"), Some("logged_out"))
    );
    assert_eq!(v["online"], true, "logout keeps the online setting");

    let (_op, hello) = hub.connect(1).await;
    assert_eq!(hello["operator"]["status"], "online");
}

// ----- several tabs -----

#[tokio::test]
async fn tabs_offline_only_after_last_closes() {
    let hub = TestHub::start_with(grace_config(200)).await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let (mut colleague, _) = hub.connect(2).await;
    let (a, hello_a) = hub.connect(1).await;
    assert_eq!(hello_a["operator"]["connections"], 1);
    let (b, hello_b) = hub.connect(1).await;
    assert_eq!(hello_b["operator"]["connections"], 2);
    let (c, _) = hub.connect(1).await;
    await_status(&mut colleague, 1, "3 connections", |v| {
        v["connections"] == 3
    })
    .await;
    assert_eq!(hub.view(1).await["connections"], 3);

    a.close().await;
    let v = await_status(&mut colleague, 1, "2 connections", |v| {
        v["connections"] == 2
    })
    .await;
    assert_eq!(v["status"], "online");
    b.close().await;
    let v = await_status(&mut colleague, 1, "1 connection", |v| v["connections"] == 1).await;
    assert_eq!(v["status"], "online");
    // No grace runs while a tab is open: nothing goes offline over more than the grace.
    colleague
        .silent_for(
            Duration::from_millis(400),
            "offline of 1",
            status_of(1, offline),
        )
        .await;

    c.close().await;
    let v = await_status(&mut colleague, 1, "1 offline", offline).await;
    assert_eq!(v["status_reason"], "disconnected");
    assert_eq!(v["connections"], 0);
}

// ----- inactivity -----

#[tokio::test]
async fn inactivity_needs_every_connection_idle() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let (mut colleague, _) = hub.connect(2).await;
    colleague
        .request(json!({"type":"set_status","online":false}))
        .await;
    let mut widget = hub.widget(&[1]).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], false);
    let (mut a, _) = hub.connect(1).await;
    let (mut b, _) = hub.connect(1).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], true);

    let ack = a.request(json!({"type":"activity","active":false})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let v = hub.view(1).await;
    assert_eq!(
        (v["inactive"].clone(), v["status"].clone()),
        (json!(false), json!("online")),
        "one idle tab of two: {v}"
    );
    fence(&mut colleague, "offline of 1", status_of(1, offline)).await;

    b.request(json!({"type":"activity","active":false})).await;
    let v = await_status(&mut colleague, 1, "1 inactive", offline).await;
    assert_eq!(v["status_reason"], "inactive", "{v}");
    assert_eq!(v["inactive"], true);
    let w = widget_next(&mut widget, 1).await;
    assert_eq!(w["online"], false, "{w}");

    a.request(json!({"type":"activity","active":true})).await;
    let v = await_status(&mut colleague, 1, "1 active again", |v| {
        v["status"] == "online"
    })
    .await;
    assert_eq!(v["inactive"], false);
    assert_eq!(v["status_reason"], Value::Null);
    assert_eq!(widget_next(&mut widget, 1).await["online"], true);
}

#[tokio::test]
async fn inactivity_new_connection_is_active() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (mut a, _) = hub.connect(1).await;
    a.request(json!({"type":"activity","active":false})).await;
    assert_eq!(hub.view(1).await["status_reason"], "inactive");
    let (_b, hello) = hub.connect(1).await;
    assert_eq!(
        hello["operator"]["status"], "online",
        "a new tab is active: {hello}"
    );
    assert_eq!(hello["operator"]["inactive"], false);
}

#[tokio::test]
async fn inactivity_timeout_marks_idle_connection_and_activity_restores() {
    const IDLE: Duration = Duration::from_millis(300);
    let hub = TestHub::start_with(|cfg| cfg.presence.inactivity_timeout = IDLE).await;
    hub.operator(1, &[1]).await;
    let connected_at = Instant::now();
    let (mut op, hello) = hub.connect(1).await;
    assert_eq!(hello["operator"]["status"], "online");
    let v = await_status(&mut op, 1, "idle after the timeout", offline).await;
    let elapsed = connected_at.elapsed();
    assert_eq!(
        (v["status_reason"].clone(), v["inactive"].clone()),
        (json!("inactive"), json!(true)),
        "{v}"
    );
    assert!(
        elapsed >= IDLE - Duration::from_millis(20),
        "idle after {elapsed:?}, timeout {IDLE:?}"
    );

    let ack = op.request(json!({"type":"activity","active":true})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let v = hub.view(1).await;
    assert_eq!(
        (v["status"].clone(), v["inactive"].clone()),
        (json!("online"), json!(false)),
        "{v}"
    );
    // Idle again after another timeout without activity.
    let v = await_status(&mut op, 1, "idle again", offline).await;
    assert_eq!(v["status_reason"], "inactive");
}

#[tokio::test]
async fn inactivity_timeout_reset_by_activity_messages() {
    const IDLE: Duration = Duration::from_millis(400);
    let hub = TestHub::start_with(|cfg| cfg.presence.inactivity_timeout = IDLE).await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    // Report activity every 100 ms for three timeouts' worth of time: never idle.
    let until = Instant::now() + IDLE * 3;
    while Instant::now() < until {
        let (ack, events) =
            request_with_events(&mut op, json!({"type":"activity","active":true})).await;
        assert_eq!(ack["type"], "ack");
        assert!(
            !events.iter().any(status_of(1, offline)),
            "went idle despite activity: {events:?}"
        );
        op.silent_for(
            Duration::from_millis(100),
            "offline of 1",
            status_of(1, offline),
        )
        .await;
    }
    assert_eq!(hub.view(1).await["status"], "online");
}

// ----- dead connections: ping / pong -----

fn ping_config(cfg: &mut presence_hub::config::Config) {
    cfg.presence.ping_interval = Duration::from_millis(100);
    cfg.presence.pong_timeout = Some(Duration::from_millis(300));
    cfg.presence.disconnect_grace = Duration::from_millis(100);
}

/// Does the WebSocket handshake by hand and returns the socket, which the caller never
/// reads nor writes again: a peer that vanished without closing.
async fn silent_operator_socket(hub: &TestHub, id: u64) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let req = format!(
        "GET /ws/operator?token={} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        hub.token(id),
        hub.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(common::WAIT, s.read(&mut byte))
            .await
            .expect("handshake in time")
            .unwrap();
        assert_eq!(n, 1, "connection closed during the handshake");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

#[tokio::test]
async fn ping_silent_connection_is_closed_and_counts_as_disconnect() {
    let hub = TestHub::start_with(ping_config).await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let (mut colleague, _) = hub.connect(2).await;
    let opened = Instant::now();
    let _dead = silent_operator_socket(&hub, 1).await;
    let v = await_status(&mut colleague, 1, "1 online", |v| v["status"] == "online").await;
    assert_eq!(v["connections"], 1);
    // The colleague keeps reading (and so answering pings) while the silent socket is
    // detected, closed, and its grace runs out.
    let v = await_status(&mut colleague, 1, "1 offline", offline).await;
    assert_eq!(v["status_reason"], "disconnected", "{v}");
    assert_eq!(v["connections"], 0);
    assert!(
        opened.elapsed() >= Duration::from_millis(300),
        "closed before the pong timeout: {:?}",
        opened.elapsed()
    );
    assert_eq!(
        hub.view(2).await["connections"],
        1,
        "the reading colleague is still connected"
    );
}

#[tokio::test]
async fn ping_unpolled_client_is_closed() {
    let hub = TestHub::start_with(ping_config).await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let (mut colleague, _) = hub.connect(2).await;
    let (mut idle, _) = hub.connect(1).await; // never polled until the end
    await_status(&mut colleague, 1, "1 offline", offline).await;
    // The hub closed it: what the client reads now ends in a close (or the socket's end).
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        match tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut idle.ws))
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn ping_polled_client_stays_connected() {
    let hub = TestHub::start_with(ping_config).await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    // Ten ping intervals, three pong timeouts: reading answers the pings.
    let pings = {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1000);
        let mut pings = 0;
        loop {
            match tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut op.ws)).await {
                Err(_) => break pings,
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    assert!(!status_of(1, |v| v["connections"] == 0)(&v), "dropped: {v}");
                }
                Ok(other) => panic!("socket ended: {other:?}"),
            }
        }
    };
    assert!(
        pings >= 3,
        "the hub pings every ping_interval: {pings} pings in 1 s"
    );
    let v = hub.view(1).await;
    assert_eq!(
        (v["status"].clone(), v["connections"].clone()),
        (json!("online"), json!(1)),
        "{v}"
    );
    let ack = op.request(json!({"type":"activity","active":true})).await;
    assert_eq!(ack["type"], "ack");
}

// ----- Online & Invisible -----

#[tokio::test]
async fn online_invisible_warns_on_set_status() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let (mut op, hello) = hub.connect(1).await;
    assert_eq!(hello["operator"]["misconfigured"], false);
    let (ack, events) =
        request_with_events(&mut op, json!({"type":"set_status","invisible":true})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["operator"]["misconfigured"], true, "{ack}");
    let warning = events
        .iter()
        .find(|m| m["type"] == "warning")
        .unwrap_or_else(|| panic!("no warning before the ack: {events:?}"));
    assert_eq!(warning["code"], "online_invisible", "{warning}");
    assert!(warning["message"].as_str().is_some_and(|m| !m.is_empty()));

    let v = hub.view(1).await;
    assert_eq!(
        (
            v["online"].clone(),
            v["invisible"].clone(),
            v["misconfigured"].clone()
        ),
        (json!(true), json!(true), json!(true))
    );
    assert_eq!(
        v["status"], "online",
        "the hub accepts the misconfiguration"
    );
    let (s, list) = hub.get("/api/v1/operators?misconfigured=true").await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(ids(&list["operators"]), vec![1]);
    let (_, list) = hub.get("/api/v1/operators?misconfigured=false").await;
    assert_eq!(ids(&list["operators"]), vec![2]);

    // Offline & Invisible is fine.
    let (ack, events) =
        request_with_events(&mut op, json!({"type":"set_status","online":false})).await;
    assert_eq!(ack["operator"]["misconfigured"], false, "{ack}");
    assert!(!events.iter().any(|m| m["type"] == "warning"), "{events:?}");
    let (_, list) = hub.get("/api/v1/operators?misconfigured=true").await;
    assert_eq!(ids(&list["operators"]), Vec::<u64>::new());
}

#[tokio::test]
async fn online_invisible_warns_on_connect() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (s, v) = hub
        .patch("/api/v1/operators/1/status", json!({"invisible": true}))
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["misconfigured"], true, "{v}");
    let (mut op, hello) = hub.connect(1).await;
    assert_eq!(hello["operator"]["misconfigured"], true);
    let w = op.next().await;
    assert_eq!(
        (w["type"].clone(), w["code"].clone()),
        (json!("warning"), json!("online_invisible")),
        "{w}"
    );
}

#[tokio::test]
async fn online_invisible_backend_change_warns_connected_operator() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    let (s, _) = hub
        .patch("/api/v1/operators/1/status", json!({"invisible": true}))
        .await;
    assert_eq!(s, 200);
    let w = op.next_of("warning").await;
    assert_eq!(w["code"], "online_invisible");
    let v = await_status(&mut op, 1, "misconfigured view", |v| {
        v["misconfigured"] == true
    })
    .await;
    assert_eq!(v["invisible"], true);
}

// ----- permissions -----

#[tokio::test]
async fn permissions_each_setting_needs_its_permission() {
    let hub = TestHub::start().await;
    hub.operator_with(1, json!({"name":"none","departments":[1],"permissions":[]}))
        .await;
    let (mut op, _) = hub.connect(1).await;
    for (field, value) in [
        ("online", false),
        ("invisible", true),
        ("always_online", true),
    ] {
        let mut req = json!({"type":"set_status"});
        req[field] = json!(value);
        let err = op.request(req).await;
        assert_eq!(
            (err["type"].clone(), err["code"].clone()),
            (json!("error"), json!("forbidden")),
            "{field}: {err}"
        );
    }
    let v = hub.view(1).await;
    assert_eq!(
        (
            v["online"].clone(),
            v["invisible"].clone(),
            v["always_online"].clone()
        ),
        (json!(true), json!(false), json!(false)),
        "{v}"
    );
    fence(&mut op, "operator_status", |m| {
        m["type"] == "operator_status"
    })
    .await;

    // Each permission alone allows its own setting.
    for (perm, field, value) in [
        ("change_online_status", "online", false),
        ("change_visibility", "invisible", true),
        ("change_always_online", "always_online", true),
    ] {
        hub.operator_with(
            2,
            json!({"name":"one","departments":[1],"permissions":[perm]}),
        )
        .await;
        let (mut c, _) = hub.connect(2).await;
        let mut req = json!({"type":"set_status"});
        req[field] = json!(value);
        let ack = c.request(req).await;
        assert_eq!(ack["type"], "ack", "{perm}: {ack}");
        assert_eq!(hub.view(2).await[field], json!(value), "{perm}");
        c.close().await;
    }
}

#[tokio::test]
async fn permissions_one_forbidden_field_changes_nothing() {
    let hub = TestHub::start().await;
    hub.operator_with(
        1,
        json!({"name":"a","departments":[1],"permissions":["change_online_status"]}),
    )
    .await;
    let mut widget = hub.widget(&[1]).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], false);
    let (mut op, _) = hub.connect(1).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], true);
    let before = hub.view(1).await;

    let err = op
        .request(json!({"type":"set_status","online":false,"invisible":true}))
        .await;
    assert_eq!(
        (err["type"].clone(), err["code"].clone()),
        (json!("error"), json!("forbidden")),
        "{err}"
    );
    let after = hub.view(1).await;
    assert_eq!(before, after, "nothing changed");
    assert_eq!(after["online"], true);
    fence(&mut op, "a status change", |m| {
        m["type"] == "operator_status" || m["type"] == "warning"
    })
    .await;
    widget
        .silent_for(Duration::from_millis(150), "widget change", |m| {
            m["type"] == "widget_status"
        })
        .await;

    let err = op
        .request(json!({"type":"set_status","online":false,"always_online":true}))
        .await;
    assert_eq!(err["code"], "forbidden", "{err}");
    assert_eq!(hub.view(1).await, before);
}

#[tokio::test]
async fn permissions_other_operator_needs_set_operator_status() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await; // every field permission, not set_operator_status
    // A supervisor: set_operator_status alone, watching department 1 only.
    hub.operator_with(
        2,
        json!({"name":"sup","watch_departments":[1],"permissions":["set_operator_status"]}),
    )
    .await;
    hub.operator(3, &[1]).await;
    let (mut one, _) = hub.connect(1).await;
    let (mut sup, _) = hub.connect(2).await;
    let (mut target, _) = hub.connect(3).await;

    let err = one
        .request(json!({"type":"set_status","operator":3,"online":false}))
        .await;
    assert_eq!(
        (err["type"].clone(), err["code"].clone()),
        (json!("error"), json!("forbidden")),
        "{err}"
    );
    assert_eq!(hub.view(3).await["online"], true);
    fence(&mut target, "a change of 3", status_of(3, |_| true)).await;

    // No change_online_status needed to set a colleague offline.
    let ack = sup
        .request(json!({"type":"set_status","operator":3,"online":false,"invisible":true}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["operator"]["id"], 3);
    assert_eq!(ack["operator"]["status_reason"], "set_offline");
    let v = await_status(&mut target, 3, "3 set offline by the supervisor", offline).await;
    assert_eq!(v["status_reason"], "set_offline");
    assert_eq!(v["invisible"], true);
    assert_eq!(
        hub.view(2).await["online"],
        true,
        "the supervisor's own setting is untouched"
    );

    let err = sup
        .request(json!({"type":"set_status","operator":999,"online":false}))
        .await;
    assert_eq!(err["code"], "not_found", "{err}");
}

#[tokio::test]
async fn permissions_supervisor_forbidden_without_a_shared_department() {
    let hub = TestHub::start().await;
    hub.operator_with(
        2,
        json!({"name":"sup","departments":[5],"watch_departments":[6],"permissions":ALL_PERMISSIONS}),
    )
    .await;
    hub.operator(3, &[1]).await;
    let (mut sup, _) = hub.connect(2).await;
    let (mut target, _) = hub.connect(3).await;
    let before = hub.view(3).await;
    let err = sup
        .request(json!({"type":"set_status","operator":3,"online":false}))
        .await;
    assert_eq!(err["code"], "forbidden", "{err}");
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains("shares no department")),
        "{err}"
    );
    assert_eq!(hub.view(3).await, before, "nothing changed");
    fence(&mut target, "a change of 3", status_of(3, |_| true)).await;
}

#[tokio::test]
async fn permissions_backend_may_change_anything() {
    let hub = TestHub::start().await;
    hub.operator_with(1, json!({"name":"none","departments":[1],"permissions":[]}))
        .await;
    let (mut op, _) = hub.connect(1).await;
    let (s, v) = hub
        .patch(
            "/api/v1/operators/1/status",
            json!({"online": false, "invisible": true, "always_online": true}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["online"].clone(),
            v["invisible"].clone(),
            v["always_online"].clone()
        ),
        (json!(false), json!(true), json!(true))
    );
    assert_eq!(v["status_reason"], "set_offline");
    let seen = await_status(&mut op, 1, "own change by the back end", offline).await;
    assert_eq!(seen["invisible"], true);
    assert_eq!(hub.view(1).await["always_online"], true);
    let (s, v) = hub
        .patch("/api/v1/operators/1/status", json!({"online": "yes"}))
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(hub.view(1).await["online"], false);
}

// ----- watchers -----

#[tokio::test]
async fn watchers_never_make_department_online() {
    let hub = TestHub::start().await;
    hub.operator_with(
        9,
        json!({"name":"sup","departments":[],"watch_departments":[1]}),
    )
    .await;
    let mut widget = hub.widget(&[1]).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], false);
    let (_sup, hello) = hub.connect(9).await;
    assert_eq!(
        hello["operator"]["status"], "online",
        "the supervisor is online as a person"
    );
    assert_eq!(
        hello["departments"],
        json!([{"department":1,"online":false,"reason":"none"}])
    );
    widget
        .silent_for(Duration::from_millis(200), "widget change", |m| {
            m["type"] == "widget_status"
        })
        .await;
    let w = widget_http(&hub, 1).await;
    assert_eq!(
        (w["online"].clone(), w["reason"].clone()),
        (json!(false), json!("none")),
        "{w}"
    );
    // And a watcher is never assigned there.
    let (s, chat) = hub.post("/api/v1/chats", json!({"department":1})).await;
    assert_eq!(s, 201);
    assert_eq!(chat["chat"]["owner"], Value::Null, "{chat}");
}

#[tokio::test]
async fn watchers_receive_department_status() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    hub.operator_with(
        9,
        json!({"name":"sup","departments":[],"watch_departments":[1]}),
    )
    .await;
    let (mut sup, _) = hub.connect(9).await;
    let (_op, _) = hub.connect(1).await;
    let d = sup.next_of("department_status").await;
    assert_eq!(
        d,
        json!({"type":"department_status","department":1,"online":true,"reason":"operators"})
    );
}

// ----- authentication -----

fn token_with(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn auth_refuses_missing_bad_or_expired_token_with_401() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    assert_eq!(
        Client::refused(&hub.ws_url("/ws/operator")).await,
        401,
        "missing"
    );
    assert_eq!(
        Client::refused(&hub.ws_url("/ws/operator?token=garbage")).await,
        401,
        "garbage"
    );
    let other =
        presence_hub::auth::Tokens::new("another-secret").mint(1, Duration::from_secs(3600));
    assert_eq!(
        Client::refused(&hub.ws_url(&format!("/ws/operator?token={other}"))).await,
        401,
        "wrong secret"
    );
    let expired = token_with(
        common::JWT_SECRET,
        json!({"sub":"1","exp": unix_now() - 120}),
    );
    assert_eq!(
        Client::refused(&hub.ws_url(&format!("/ws/operator?token={expired}"))).await,
        401,
        "expired"
    );
    let no_exp = token_with(common::JWT_SECRET, json!({"sub":"1"}));
    assert_eq!(
        Client::refused(&hub.ws_url(&format!("/ws/operator?token={no_exp}"))).await,
        401,
        "no exp"
    );
    let bad_sub = token_with(
        common::JWT_SECRET,
        json!({"sub":"ann","exp": unix_now() + 600}),
    );
    assert_eq!(
        Client::refused(&hub.ws_url(&format!("/ws/operator?token={bad_sub}"))).await,
        401,
        "sub not an id"
    );
    // A valid token of the same operator does connect (the refusals were about the token).
    let (_op, hello) = hub.connect(1).await;
    assert_eq!(hello["operator"]["id"], 1);
    assert_eq!(
        hub.view(1).await["connections"],
        1,
        "no refused attempt counted as a connection"
    );
}

#[tokio::test]
async fn auth_unknown_operator_is_403() {
    let hub = TestHub::start().await;
    let url = hub.ws_url(&format!("/ws/operator?token={}", hub.token(404)));
    assert_eq!(Client::refused(&url).await, 403);
    hub.operator(404, &[1]).await;
    let (_op, hello) = hub.connect(404).await;
    assert_eq!(hello["operator"]["id"], 404);
}

#[tokio::test]
async fn auth_bearer_header_token_works() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let mut req = hub.ws_url("/ws/operator").into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", hub.token(1)).parse().unwrap(),
    );
    let (mut ws, res) = tokio::time::timeout(common::WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("in time")
        .expect("upgrade accepted with a header token");
    assert_eq!(res.status().as_u16(), 101);
    let hello = loop {
        match tokio::time::timeout(common::WAIT, futures::StreamExt::next(&mut ws))
            .await
            .expect("hello in time")
        {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(&t).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("no hello: {other:?}"),
        }
    };
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["operator"]["id"], 1);
    assert_eq!(hello["operator"]["status"], "online");

    let mut bad = hub.ws_url("/ws/operator").into_client_request().unwrap();
    bad.headers_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    match tokio_tungstenite::connect_async(bad).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status().as_u16(), 401)
        }
        Err(e) => panic!("expected 401, got {e}"),
        Ok(_) => panic!("a bad header token was accepted"),
    }
}

// ----- the operator socket's protocol -----

#[tokio::test]
async fn operator_socket_bad_frame_gets_error_and_goes_on() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    op.send_raw(Message::Text("{not json".into())).await;
    let e = op.next_of("error").await;
    assert_eq!(e["code"], "bad_request", "{e}");
    let e = op.request(json!({"type":"set_status","online":"no"})).await;
    assert_eq!(
        (e["type"].clone(), e["code"].clone()),
        (json!("error"), json!("bad_request")),
        "{e}"
    );
    let e = op.request(json!({"type":"fly"})).await;
    assert_eq!(e["code"], "bad_request", "{e}");
    assert_eq!(hub.view(1).await["online"], true, "no state change");
    let ack = op
        .request(json!({"type":"set_status","online":false}))
        .await;
    assert_eq!(ack["type"], "ack", "the connection goes on: {ack}");
}

#[tokio::test]
async fn operator_socket_ack_carries_ref() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    op.send(json!({"type":"activity","active":true,"ref":"abc"}))
        .await;
    let a = op.next_where("ack", |m| m["type"] == "ack").await;
    assert_eq!(a["ref"], "abc");
    op.send(json!({"type":"open_chat","chat":424242,"ref":{"n":1}}))
        .await;
    let e = op.next_where("error", |m| m["type"] == "error").await;
    assert_eq!(
        (e["ref"].clone(), e["code"].clone()),
        (json!({"n":1}), json!("not_found")),
        "{e}"
    );
}

// ----- combinations -----

#[tokio::test]
async fn grace_does_not_bring_inactive_operator_online() {
    // An operator already offline for inactivity who closes the tab must not reappear as
    // online during the grace: the grace keeps an online operator online, nothing more.
    let hub = TestHub::start_with(grace_config(500)).await;
    let (mut colleague, mut widget, mut op) = alone_in_department(&hub).await;
    op.request(json!({"type":"activity","active":false})).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], false);
    await_status(&mut colleague, 1, "1 inactive", offline).await;

    op.close().await;
    let v = await_status(&mut colleague, 1, "1 with no connection", |v| {
        v["connections"] == 0
    })
    .await;
    assert_eq!(
        v["status"], "offline",
        "an inactive operator who leaves stays offline: {v}"
    );
    let window = Duration::from_millis(800);
    let w = widget.silent_for(window, "widget online", |m| {
        m["type"] == "widget_status" && m["online"] == true
    });
    let c = colleague.silent_for(
        window,
        "1 online",
        status_of(1, |v| v["status"] == "online"),
    );
    tokio::join!(w, c);
    let v = hub.view(1).await;
    assert_eq!(
        (v["status"].as_str(), v["status_reason"].as_str()),
        (Some("offline"), Some("disconnected")),
        "{v}"
    );
}

#[tokio::test]
async fn grace_restarts_on_each_last_disconnect() {
    const GRACE: Duration = Duration::from_millis(500);
    let hub = TestHub::start_with(grace_config(500)).await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let (mut colleague, _) = hub.connect(2).await;
    let (op, _) = hub.connect(1).await;
    op.close().await;
    // Reconnect and leave again half a grace later: the first grace's timer must not end
    // the second one early.
    colleague
        .silent_for(GRACE / 2, "offline of 1", status_of(1, offline))
        .await;
    let (op, _) = hub.connect(1).await;
    let second_close = Instant::now();
    op.close().await;
    let v = await_status(&mut colleague, 1, "1 offline", offline).await;
    let elapsed = second_close.elapsed();
    assert_eq!(v["status_reason"], "disconnected");
    assert!(
        elapsed >= GRACE - Duration::from_millis(50),
        "offline {elapsed:?} after the second close, grace {GRACE:?}"
    );
}

#[tokio::test]
async fn grace_backend_set_offline_during_grace_is_immediate() {
    let hub = TestHub::start_with(grace_config(30_000)).await;
    hub.operator(1, &[1]).await;
    let mut widget = hub.widget(&[1]).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], false);
    let (op, _) = hub.connect(1).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], true);
    op.close().await;
    let (s, v) = hub
        .patch("/api/v1/operators/1/status", json!({"online": false}))
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        (v["status"].as_str(), v["status_reason"].as_str()),
        (Some("offline"), Some("set_offline")),
        "{v}"
    );
    assert_eq!(widget_next(&mut widget, 1).await["online"], false);
}

#[tokio::test]
async fn always_online_turned_off_while_disconnected_goes_offline() {
    let hub = TestHub::start_with(grace_config(100)).await;
    hub.operator(1, &[1]).await;
    hub.patch("/api/v1/operators/1/status", json!({"always_online": true}))
        .await;
    let mut widget = hub.widget(&[1]).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], true);
    let (s, v) = hub
        .patch(
            "/api/v1/operators/1/status",
            json!({"always_online": false}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        (v["status"].as_str(), v["status_reason"].as_str()),
        (Some("offline"), Some("disconnected")),
        "{v}"
    );
    let w = widget_next(&mut widget, 1).await;
    assert_eq!(
        (w["online"].clone(), w["reason"].clone()),
        (json!(false), json!("none"))
    );
}

#[tokio::test]
async fn online_invisible_via_operator_put_warns() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    let v = hub
        .operator_with(1, json!({"name":"op1","departments":[1],"invisible":true}))
        .await;
    assert_eq!(v["misconfigured"], true, "{v}");
    let w = op.next_of("warning").await;
    assert_eq!(w["code"], "online_invisible");
}

#[tokio::test]
async fn logout_with_another_tab_keeps_operator_online() {
    let hub = TestHub::start_with(grace_config(30_000)).await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let (mut colleague, _) = hub.connect(2).await;
    let (mut a, _) = hub.connect(1).await;
    let (_b, _) = hub.connect(1).await;
    await_status(&mut colleague, 1, "2 tabs", |v| v["connections"] == 2).await;
    a.request(json!({"type":"logout"})).await;
    assert_eq!(a.closed().await.map(|f| u16::from(f.code)), Some(1000));
    let v = await_status(&mut colleague, 1, "1 tab", |v| v["connections"] == 1).await;
    assert_eq!(v["status"], "online", "the other tab is still open: {v}");
}

/// Operator 1 alone online in department 1: colleague 2 is connected but set offline, and a
/// widget of department 1 has seen it turn online. Returns (colleague, widget, operator 1).
async fn alone_in_department(hub: &TestHub) -> (Client, Client, Client) {
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let (mut colleague, _) = hub.connect(2).await;
    colleague
        .request(json!({"type":"set_status","online":false}))
        .await;
    let mut widget = hub.widget(&[1]).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], false);
    let (op, _) = hub.connect(1).await;
    assert_eq!(widget_next(&mut widget, 1).await["online"], true);
    (colleague, widget, op)
}

/// The connect runs as the upgrade is answered: an upgrade whose hand-over then fails (here
/// an `OnUpgrade` that never gets a connection) is a disconnect, not a connection counted
/// forever.
#[tokio::test]
async fn grace_upgrade_that_fails_after_the_connect_is_a_disconnect() {
    use axum::extract::State;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::test_config(tmp.path());
    let listener = presence_hub::server::bind(cfg.server.listen).unwrap();
    let addr = listener.local_addr().unwrap();
    let hub = presence_hub::server::build(cfg).await.expect("hub builds");
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(presence_hub::server::run(listener, hub.clone(), {
        let stop = stop.clone();
        async move { stop.cancelled().await }
    }));
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/api/v1/operators/1");
    let put = http
        .put(&url)
        .bearer_auth(common::API_KEY)
        .json(&json!({"name": "Ann", "departments": [1]}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{put:?}");
    let token =
        presence_hub::auth::Tokens::new(common::JWT_SECRET).mint(1, Duration::from_secs(60));
    let mut req = http::Request::builder()
        .uri(format!("/ws/operator?token={token}"))
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "13")
        .body(axum::body::Body::empty())
        .unwrap();
    // What a request whose connection cannot be upgraded carries: it resolves to an error.
    let never = hyper::upgrade::on(http::Request::new(()));
    req.extensions_mut().insert(never);
    let res = presence_hub::ws::operator::upgrade(State(hub.clone()), req).await;
    assert_eq!(res.status(), 101);
    let deadline = Instant::now() + common::WAIT;
    loop {
        let view: Value = http
            .get(&url)
            .bearer_auth(common::API_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if view["connections"] == 0 && view["status"] == "offline" {
            break;
        }
        assert!(Instant::now() < deadline, "still counted: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    server.await.unwrap();
}

/// A socket's connect runs as its upgrade is answered (before hyper hands the connection
/// over): clients that drop the TCP connection right after sending the upgrade request leave
/// nothing counted.
#[tokio::test]
async fn grace_upgrade_dropped_mid_handshake_leaves_no_connection_counted() {
    let hub = TestHub::start_with(grace_config(100)).await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let (mut colleague, _) = hub.connect(2).await;
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
        let req = format!(
            "GET /ws/operator?token={} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            hub.token(1),
            hub.addr
        );
        s.write_all(req.as_bytes()).await.unwrap();
        // Closed with the request unanswered, or its answer unread.
        drop(s);
    }
    // A socket of its own after them, closed: once its grace ends, the operator is offline
    // with nothing counted, unless a dropped one was counted and never taken back.
    let (own, _) = hub.connect(1).await;
    own.close().await;
    let v = await_status(&mut colleague, 1, "1 offline, nothing counted", |v| {
        v["status"] == "offline" && v["connections"] == 0
    })
    .await;
    assert_eq!(v["status_reason"], "disconnected", "{v}");
    assert_eq!(hub.view(1).await["connections"], 0);
}

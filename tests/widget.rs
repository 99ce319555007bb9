//! The widget side (SPEC.md section 3 and 6): `GET /api/v1/widget/status` with ETag and CORS,
//! and the widget WebSocket, which sends the state at once and then only changes.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Client, TestHub};
use reqwest::Method;
use serde_json::{Value, json};

const SHOP: &str = "https://shop.example";
const EVIL: &str = "https://evil.example";

/// Long enough for a change already made to have reached a socket if it were going to.
const QUIET: Duration = Duration::from_millis(400);

fn is_widget_status(v: &Value) -> bool {
    v["type"] == "widget_status"
}

async fn status(hub: &TestHub, query: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    hub.public(
        Method::GET,
        &format!("/api/v1/widget/status?{query}"),
        headers,
    )
    .await
}

fn etag(res: &reqwest::Response) -> String {
    res.headers()
        .get("etag")
        .expect("an ETag")
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn widget_status_answers_department_online_and_reason() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let res = status(&hub, "department=1", &[]).await;
    assert_eq!(res.status().as_u16(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let v: Value = res.json().await.unwrap();
    assert_eq!(v, json!({"department":1,"online":false,"reason":"none"}));
    let (_op, _) = hub.connect(1).await;
    let v: Value = status(&hub, "department=1", &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        v,
        json!({"department":1,"online":true,"reason":"operators"})
    );
    // Another department is not affected.
    let v: Value = status(&hub, "department=2", &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!({"department":2,"online":false,"reason":"none"}));
}

#[tokio::test]
async fn widget_status_refuses_missing_or_bad_department() {
    let hub = TestHub::start().await;
    for q in [
        "",
        "department=abc",
        "department=-1",
        "department=1&department=2",
        "dept=1",
    ] {
        let res = status(&hub, q, &[]).await;
        assert_eq!(res.status().as_u16(), 400, "{q}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], "bad_request", "{q}: {v}");
    }
}

#[tokio::test]
async fn widget_status_etag_answers_304_until_the_state_changes() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let res = status(&hub, "department=1", &[]).await;
    let tag = etag(&res);
    let res = status(&hub, "department=1", &[("if-none-match", &tag)]).await;
    assert_eq!(res.status().as_u16(), 304);
    assert_eq!(etag(&res), tag);
    assert!(res.bytes().await.unwrap().is_empty(), "304 has no body");

    // A change that does not change the answer keeps the tag.
    hub.put("/api/v1/departments/1", json!({"name":"Support"}))
        .await;
    assert_eq!(
        status(&hub, "department=1", &[("if-none-match", &tag)])
            .await
            .status()
            .as_u16(),
        304
    );

    let (_op, _) = hub.connect(1).await;
    let res = status(&hub, "department=1", &[("if-none-match", &tag)]).await;
    assert_eq!(res.status().as_u16(), 200, "changed: a full answer");
    let tag2 = etag(&res);
    assert_ne!(tag2, tag);
    assert_eq!(res.json::<Value>().await.unwrap()["online"], true);
    assert_eq!(
        status(&hub, "department=1", &[("if-none-match", &tag2)])
            .await
            .status()
            .as_u16(),
        304
    );

    // A second operator coming online changes nothing for the widget.
    let (_op2, _) = hub.connect(2).await;
    assert_eq!(
        status(&hub, "department=1", &[("if-none-match", &tag2)])
            .await
            .status()
            .as_u16(),
        304
    );

    // Tags of different departments differ even for the same state.
    let other = etag(&status(&hub, "department=2", &[]).await);
    assert_ne!(other, tag);
    assert_eq!(
        status(&hub, "department=2", &[("if-none-match", &tag)])
            .await
            .status()
            .as_u16(),
        200
    );
}

#[tokio::test]
async fn widget_cors_echoes_allowed_origin_and_refuses_others() {
    let hub = TestHub::start_with(|cfg| cfg.server.allowed_origins = vec![SHOP.into()]).await;
    let res = status(&hub, "department=1", &[("origin", SHOP)]).await;
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(res.headers()["access-control-allow-origin"], SHOP);
    let exposed = res
        .headers()
        .get("access-control-expose-headers")
        .map(|v| v.to_str().unwrap().to_lowercase());
    assert!(
        exposed.is_some_and(|e| e.contains("etag")),
        "the widget script may read the ETag"
    );

    let res = status(&hub, "department=1", &[("origin", EVIL)]).await;
    assert_eq!(res.status().as_u16(), 403);
    assert!(res.headers().get("access-control-allow-origin").is_none());
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "forbidden");

    // Without an Origin it is not a browser: answered, no CORS headers.
    let res = status(&hub, "department=1", &[]).await;
    assert_eq!(res.status().as_u16(), 200);
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn widget_cors_preflight() {
    let hub = TestHub::start_with(|cfg| cfg.server.allowed_origins = vec![SHOP.into()]).await;
    let pre = [
        ("origin", SHOP),
        ("access-control-request-method", "GET"),
        ("access-control-request-headers", "if-none-match"),
    ];
    let res = hub
        .public(Method::OPTIONS, "/api/v1/widget/status?department=1", &pre)
        .await;
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(res.headers()["access-control-allow-origin"], SHOP);
    let methods = res.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(methods.contains("GET"), "{methods}");
    let allowed = res.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(allowed.contains("if-none-match"), "{allowed}");

    let pre = [("origin", EVIL), ("access-control-request-method", "GET")];
    let res = hub
        .public(Method::OPTIONS, "/api/v1/widget/status?department=1", &pre)
        .await;
    assert_eq!(res.status().as_u16(), 403);
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn widget_cors_any_origin_by_default() {
    let hub = TestHub::start().await;
    let res = status(&hub, "department=1", &[("origin", EVIL)]).await;
    assert_eq!(res.status().as_u16(), 200);
    let acao = res.headers()["access-control-allow-origin"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(acao == EVIL || acao == "*", "{acao}");
}

#[tokio::test]
async fn widget_socket_sends_each_department_state_at_once() {
    let hub = TestHub::start().await;
    hub.put(
        "/api/v1/departments/2",
        json!({"name":"closed","disabled":true}),
    )
    .await;
    hub.put("/api/v1/departments/3", json!({"name":"bot","bot":true}))
        .await;
    hub.operator_with(
        1,
        json!({"name":"a","departments":[4],"always_online":true}),
    )
    .await;
    let mut w = hub.widget(&[1, 2, 3, 4]).await;
    let mut got = BTreeMap::new();
    for _ in 0..4 {
        let m = w.next().await;
        assert!(is_widget_status(&m), "{m}");
        assert_eq!(
            m.as_object().unwrap().len(),
            4,
            "type, department, online, reason: {m}"
        );
        got.insert(
            m["department"].as_u64().unwrap(),
            (m["online"].clone(), m["reason"].clone()),
        );
    }
    let want: BTreeMap<u64, (Value, Value)> = [
        (1, (json!(false), json!("none"))),
        (2, (json!(false), json!("disabled"))),
        (3, (json!(true), json!("bot"))),
        (4, (json!(true), json!("operators"))),
    ]
    .into();
    assert_eq!(got, want);
    w.silent_for(QUIET, "more than the initial state", |_| true)
        .await;
}

#[tokio::test]
async fn widget_socket_sends_only_online_or_reason_changes() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    hub.operator(3, &[2]).await;
    let mut w = hub.widget(&[1]).await;
    assert_eq!(
        w.next().await,
        json!({"type":"widget_status","department":1,"online":false,"reason":"none"})
    );

    let (mut op1, _) = hub.connect(1).await;
    assert_eq!(
        w.next().await,
        json!({"type":"widget_status","department":1,"online":true,"reason":"operators"})
    );

    // Unrelated changes: a second operator of the department, a department not followed,
    // a rename, a setting that does not change the answer.
    let (_op2, _) = hub.connect(2).await;
    let (_op3, _) = hub.connect(3).await;
    hub.put("/api/v1/departments/1", json!({"name":"Support"}))
        .await;
    hub.patch("/api/v1/operators/2/status", json!({"always_online":true}))
        .await;
    let ack = op1
        .request(json!({"type":"set_status","online":false}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    w.silent_for(QUIET, "a widget_status without a change", is_widget_status)
        .await;

    // The last online operator of the department goes: offline.
    hub.patch("/api/v1/operators/2/status", json!({"online":false}))
        .await;
    assert_eq!(
        w.next().await,
        json!({"type":"widget_status","department":1,"online":false,"reason":"none"})
    );
    w.silent_for(QUIET, "a repeated widget_status", is_widget_status)
        .await;
}

#[tokio::test]
async fn widget_socket_reasons_disabled_operators_bot_none() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let mut w = hub.widget(&[1]).await;
    let mut expect = async |online: bool, reason: &str| {
        let m = w.next_of("widget_status").await;
        assert_eq!(
            m,
            json!({"type":"widget_status","department":1,"online":online,"reason":reason})
        );
    };
    expect(false, "none").await;
    hub.put("/api/v1/departments/1", json!({"bot":true})).await;
    expect(true, "bot").await;
    let (_op, _) = hub.connect(1).await;
    expect(true, "operators").await;
    hub.put("/api/v1/departments/1", json!({"bot":true,"disabled":true}))
        .await;
    expect(false, "disabled").await;
    hub.put("/api/v1/departments/1", json!({})).await;
    expect(true, "operators").await;
    hub.patch("/api/v1/operators/1/status", json!({"online":false}))
        .await;
    expect(false, "none").await;
}

#[tokio::test]
async fn widget_socket_queue_full_when_pending_max_reached() {
    let hub = TestHub::start().await;
    hub.put("/api/v1/departments/1", json!({"pending_max":2,"bot":true}))
        .await;
    let mut w = hub.widget(&[1]).await;
    assert_eq!(w.next().await["reason"], "bot");
    let (status, c1) = hub.post("/api/v1/chats", json!({"department":1})).await;
    assert_eq!(status, 201, "{c1}");
    w.silent_for(QUIET, "a change below pending_max", is_widget_status)
        .await;
    let (status, _) = hub.post("/api/v1/chats", json!({"department":1})).await;
    assert_eq!(status, 201);
    assert_eq!(
        w.next().await,
        json!({"type":"widget_status","department":1,"online":false,"reason":"queue_full"})
    );
    let v: Value = status_json(&hub, 1).await;
    assert_eq!(v["reason"], "queue_full");
    let id = c1["chat"]["id"].as_u64().unwrap();
    let (status, _) = hub
        .post(&format!("/api/v1/chats/{id}/close"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        w.next().await,
        json!({"type":"widget_status","department":1,"online":true,"reason":"bot"})
    );
}

async fn status_json(hub: &TestHub, d: u64) -> Value {
    status(hub, &format!("department={d}"), &[])
        .await
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn widget_socket_from_disallowed_origin_is_closed_with_1008() {
    let hub = TestHub::start_with(|cfg| cfg.server.allowed_origins = vec![SHOP.into()]).await;
    let mut bad =
        Client::connect_with_headers(&hub.ws_url("/ws/widget?department=1"), &[("origin", EVIL)])
            .await;
    assert_eq!(bad.close_code().await, Some(1008));

    let mut good =
        Client::connect_with_headers(&hub.ws_url("/ws/widget?department=1"), &[("origin", SHOP)])
            .await;
    assert_eq!(good.next().await["type"], "widget_status");
    let mut plain = hub.widget(&[1]).await;
    assert_eq!(
        plain.next().await["type"],
        "widget_status",
        "no Origin: not a browser, not refused"
    );
}

#[tokio::test]
async fn widget_socket_refuses_missing_or_bad_department() {
    let hub = TestHub::start().await;
    for q in ["", "?department=x", "?department=1&department=-2"] {
        assert_eq!(
            Client::refused(&hub.ws_url(&format!("/ws/widget{q}"))).await,
            400,
            "{q}"
        );
    }
}

#[tokio::test]
async fn widget_socket_answers_a_sent_frame_with_an_error_and_goes_on() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let mut w = hub.widget(&[1]).await;
    w.next().await;
    w.send(json!({"type":"set_status","online":true})).await;
    let e = w.next().await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "bad_request");
    let (_op, _) = hub.connect(1).await;
    assert_eq!(w.next().await["online"], true, "the socket goes on");
}

//! The back-end API (SPEC.md sections 2, 3 and 6): operators, departments, tokens, the API
//! key and JSON errors, over real HTTP.

mod common;

use common::{API_KEY, Client, TestHub};
use reqwest::Method;
use serde_json::{Value, json};

fn ids(list: &Value) -> Vec<u64> {
    let arr = list["operators"]
        .as_array()
        .unwrap_or_else(|| panic!("an operators list: {list}"));
    arr.iter().map(|v| v["id"].as_u64().unwrap()).collect()
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    let msg = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("an error message: {body}"));
    assert!(!msg.is_empty(), "{body}");
}

#[tokio::test]
async fn operator_put_creates_with_201_and_replaces_with_200() {
    let hub = TestHub::start().await;
    let body = json!({"name":"Ann","departments":[2,1,2],"watch_departments":[3],
        "permissions":["change_online_status"],"max_chats":3,"exclude_autoassign":true,"auto_accept":true});
    let (status, v) = hub.put("/api/v1/operators/7", body).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["id"], 7);
    assert_eq!(v["name"], "Ann");
    assert_eq!(v["departments"], json!([1, 2]), "sorted, without repeats");
    assert_eq!(v["watch_departments"], json!([3]));
    assert_eq!(v["max_chats"], 3);
    assert_eq!(v["exclude_autoassign"], true);
    assert_eq!(v["auto_accept"], true);

    // Settings changed in between are kept by a PUT that does not name them.
    let (status, _) = hub
        .patch("/api/v1/operators/7/status", json!({"invisible":true}))
        .await;
    assert_eq!(status, 200);
    let (status, v) = hub
        .put(
            "/api/v1/operators/7",
            json!({"name":"Ann B.","departments":[4]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["name"], "Ann B.");
    assert_eq!(v["departments"], json!([4]), "the record is replaced");
    assert_eq!(v["watch_departments"], json!([]));
    assert_eq!(v["permissions"], json!([]));
    assert_eq!(v["auto_accept"], false);
    assert_eq!(v["invisible"], true, "settings are not part of the record");
    assert_eq!(hub.view(7).await, v, "GET answers what PUT answered");
}

#[tokio::test]
async fn operator_put_may_set_settings() {
    let hub = TestHub::start().await;
    let (status, v) = hub
        .put(
            "/api/v1/operators/1",
            json!({"name":"a","online":false,"always_online":true}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        (
            v["online"].clone(),
            v["invisible"].clone(),
            v["always_online"].clone()
        ),
        (json!(false), json!(false), json!(true))
    );
    assert_eq!(v["status"], "offline");
    assert_eq!(v["status_reason"], "set_offline");
}

#[tokio::test]
async fn operator_view_is_flat_with_settings_live_state_and_status() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let v = hub.view(1).await;
    let obj = v.as_object().unwrap();
    for k in common::VIEW_KEYS {
        assert!(obj.contains_key(k), "view lacks {k}: {v}");
    }
    for nested in ["record", "settings", "presence"] {
        assert!(
            !obj.contains_key(nested),
            "the view is flat, found {nested}: {v}"
        );
    }
    // Defaults of a new operator, nobody connected.
    assert_eq!(v["online"], true);
    assert_eq!(v["invisible"], false);
    assert_eq!(v["always_online"], false);
    assert_eq!(v["connections"], 0);
    assert_eq!(v["inactive"], false);
    assert_eq!(v["active_chats"], 0);
    assert_eq!(v["pending_chats"], 0);
    assert_eq!(v["status"], "offline");
    assert_eq!(v["status_reason"], "disconnected");
    assert_eq!(v["misconfigured"], false);

    let (_op, hello) = hub.connect(1).await;
    let v = hub.view(1).await;
    assert_eq!(v["connections"], 1);
    assert_eq!(v["status"], "online");
    assert!(v["status_reason"].is_null(), "null when online: {v}");
    assert_eq!(hello["operator"], v, "hello carries the same view");
}

#[tokio::test]
async fn operator_delete_answers_204_then_404() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    let res = hub
        .http
        .delete(hub.url("/api/v1/operators/1"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 204);
    assert!(res.bytes().await.unwrap().is_empty(), "204 has no body");
    let (status, v) = hub.get("/api/v1/operators/1").await;
    assert_error(status, &v, 404, "not_found");
    let (status, v) = hub.delete("/api/v1/operators/1").await;
    assert_error(status, &v, 404, "not_found");
    // The deleted operator's socket does not outlive them; the colleague stays.
    assert!(
        op.close_code()
            .await
            .is_some_and(|c| c != 1000 && c != 1001)
    );
    let (status, list) = hub.get("/api/v1/operators").await;
    assert_eq!(status, 200);
    assert_eq!(ids(&list), vec![2]);
    // A token of the deleted operator no longer opens a socket.
    assert_eq!(
        Client::refused(&hub.ws_url(&format!("/ws/operator?token={}", hub.token(1)))).await,
        403
    );
}

#[tokio::test]
async fn operators_list_filters_by_department_status_and_misconfigured() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[2]).await;
    hub.operator(3, &[1, 2]).await;
    hub.operator_with(4, json!({"name":"sup","watch_departments":[9]}))
        .await;
    let (_c1, _) = hub.connect(1).await;
    let (status, v) = hub
        .patch("/api/v1/operators/2/status", json!({"invisible":true}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["misconfigured"], true, "online & invisible: {v}");

    let list = |q: &'static str| {
        let hub = &hub;
        async move {
            let (status, v) = hub.get(&format!("/api/v1/operators{q}")).await;
            assert_eq!(status, 200, "{q}: {v}");
            ids(&v)
        }
    };
    assert_eq!(list("").await, vec![1, 2, 3, 4]);
    assert_eq!(list("?department=1").await, vec![1, 3]);
    assert_eq!(list("?department=2").await, vec![2, 3]);
    assert_eq!(list("?department=5").await, Vec::<u64>::new());
    assert_eq!(list("?status=online").await, vec![1]);
    assert_eq!(list("?status=offline").await, vec![2, 3, 4]);
    assert_eq!(list("?misconfigured=true").await, vec![2]);
    assert_eq!(list("?misconfigured=false").await, vec![1, 3, 4]);
    assert_eq!(list("?department=1&status=offline").await, vec![3]);

    let (status, v) = hub.get("/api/v1/operators").await;
    assert_eq!(status, 200);
    assert_eq!(v["operators"][0], hub.view(1).await, "the list holds views");

    for bad in [
        "?status=away",
        "?department=x",
        "?misconfigured=maybe",
        "?colour=red",
    ] {
        let (status, v) = hub.get(&format!("/api/v1/operators{bad}")).await;
        assert_error(status, &v, 400, "bad_request");
    }
}

#[tokio::test]
async fn operator_patch_status_changes_settings() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (_c, _) = hub.connect(1).await;
    let (status, v) = hub
        .patch("/api/v1/operators/1/status", json!({"online":false}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["online"], false);
    assert_eq!(v["status"], "offline");
    assert_eq!(v["status_reason"], "set_offline");
    let (status, v) = hub
        .patch(
            "/api/v1/operators/1/status",
            json!({"online":true,"always_online":true}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "online");
    assert_eq!(v["always_online"], true);
    assert_eq!(hub.view(1).await, v);
    // The back end's key needs no permissions: an operator without any is changed too.
    hub.operator_with(2, json!({"name":"nobody"})).await;
    let (status, v) = hub
        .patch("/api/v1/operators/2/status", json!({"invisible":true}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["invisible"], true);
}

#[tokio::test]
async fn operator_patch_status_refuses_bad_input_and_changes_nothing() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let before = hub.view(1).await;
    for (body, code) in [
        (json!({"online":false,"visible":true}), 400),
        (json!({"online":"no"}), 400),
        (json!({"online":false,"invisible":1}), 400),
        (json!([false]), 400),
        (json!({"status":"offline"}), 400),
    ] {
        let (status, v) = hub.patch("/api/v1/operators/1/status", body.clone()).await;
        assert_error(status, &v, code, "bad_request");
    }
    assert_eq!(hub.view(1).await, before, "no state changed");
    let (status, v) = hub
        .patch("/api/v1/operators/99/status", json!({"online":false}))
        .await;
    assert_error(status, &v, 404, "not_found");
    let (status, v) = hub
        .patch("/api/v1/operators/x/status", json!({"online":false}))
        .await;
    assert_error(status, &v, 400, "bad_request");
}

#[tokio::test]
async fn department_put_and_get_with_state_and_counts() {
    let hub = TestHub::start().await;
    let body = json!({"name":"Sales","disabled":false,"assignment":"round_robin","max_chats":2,
        "accept_timeout":"30s","pending_max":3,"bot":false});
    let (status, v) = hub.put("/api/v1/departments/5", body).await;
    assert_eq!(status, 200, "{v}");
    let (status, g) = hub.get("/api/v1/departments/5").await;
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["id"], 5);
    assert_eq!(g["name"], "Sales");
    assert_eq!(g["disabled"], false);
    assert_eq!(g["assignment"], "round_robin");
    assert_eq!(g["max_chats"], 2);
    assert_eq!(
        humantime::parse_duration(g["accept_timeout"].as_str().unwrap())
            .unwrap()
            .as_secs(),
        30
    );
    assert_eq!(g["pending_max"], 3);
    assert_eq!(g["bot"], false);
    assert_eq!(g["online"], false);
    assert_eq!(g["reason"], "none");
    assert_eq!(g["operators_online"], 0);
    assert_eq!(g["pending_chats"], 0);

    hub.operator(1, &[5]).await;
    let (_c, _) = hub.connect(1).await;
    let (_, g) = hub.get("/api/v1/departments/5").await;
    assert_eq!(g["online"], true);
    assert_eq!(g["reason"], "operators");
    assert_eq!(g["operators"], 1);
    assert_eq!(g["operators_online"], 1);

    // A PUT replaces: fields left out take the config defaults again.
    let (status, _) = hub
        .put(
            "/api/v1/departments/5",
            json!({"name":"Sales","disabled":true}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, g) = hub.get("/api/v1/departments/5").await;
    assert_eq!(g["disabled"], true);
    assert_eq!(g["assignment"], "least_loaded");
    assert_eq!(g["max_chats"], 4);
    assert_eq!(g["pending_max"], 0);
    assert_eq!(g["online"], false);
    assert_eq!(
        g["reason"], "disabled",
        "disabled wins over online operators"
    );
}

#[tokio::test]
async fn department_never_set_has_config_defaults() {
    let hub = TestHub::start_with(|cfg| {
        cfg.assignment.default_max_chats = 7;
        cfg.assignment.accept_timeout = std::time::Duration::from_secs(90);
        cfg.assignment.strategy = presence_hub::config::Strategy::RoundRobin;
    })
    .await;
    let (status, g) = hub.get("/api/v1/departments/42").await;
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["id"], 42);
    assert_eq!(g["max_chats"], 7);
    assert_eq!(g["assignment"], "round_robin");
    assert_eq!(
        humantime::parse_duration(g["accept_timeout"].as_str().unwrap())
            .unwrap()
            .as_secs(),
        90
    );
    assert_eq!(g["disabled"], false);
    assert_eq!(g["bot"], false);
    assert_eq!(g["pending_max"], 0);
    assert_eq!(g["online"], false);
    assert_eq!(g["reason"], "none");
}

#[tokio::test]
async fn department_put_refuses_bad_input_and_changes_nothing() {
    let hub = TestHub::start().await;
    let (status, _) = hub
        .put(
            "/api/v1/departments/1",
            json!({"name":"Support","max_chats":6}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, before) = hub.get("/api/v1/departments/1").await;
    for body in [
        json!({"name":"x","accept_timeout":"soon"}),
        json!({"name":"x","assignment":"random"}),
        json!({"name":"x","max_chats":-1}),
        json!({"name":"x","pending_max":"3"}),
        json!({"name":"x","bot":"yes"}),
        json!({"name":"x","colour":"red"}),
        json!({"id":2,"name":"x"}),
        json!("Support"),
    ] {
        let (status, v) = hub.put("/api/v1/departments/1", body.clone()).await;
        assert_error(status, &v, 400, "bad_request");
    }
    let (_, after) = hub.get("/api/v1/departments/1").await;
    assert_eq!(after, before, "no state changed");
    let (status, v) = hub.get("/api/v1/departments/abc").await;
    assert_error(status, &v, 400, "bad_request");
}

#[tokio::test]
async fn token_endpoint_mints_tokens_the_operator_socket_accepts() {
    let hub = TestHub::start().await;
    hub.operator(7, &[1]).await;
    let (status, v) = hub
        .post("/api/v1/tokens", json!({"operator":7,"ttl":"1h"}))
        .await;
    assert_eq!(status, 200, "{v}");
    let token = v["token"]
        .as_str()
        .unwrap_or_else(|| panic!("a token: {v}"))
        .to_string();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let mut c = Client::connect(&hub.ws_url(&format!("/ws/operator?token={token}"))).await;
    let hello = c.next().await;
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["operator"]["id"], 7);

    // Without ttl: the default.
    let (status, v) = hub.post("/api/v1/tokens", json!({"operator":7})).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["token"].is_string());
}

#[tokio::test]
async fn token_endpoint_refuses_unknown_operator_and_bad_ttl() {
    let hub = TestHub::start().await;
    hub.operator(7, &[1]).await;
    let (status, v) = hub
        .post("/api/v1/tokens", json!({"operator":8,"ttl":"1h"}))
        .await;
    assert_error(status, &v, 404, "not_found");
    for ttl in [json!("forever"), json!("0s"), json!(3600), json!("-1h")] {
        let (status, v) = hub
            .post("/api/v1/tokens", json!({"operator":7,"ttl":ttl}))
            .await;
        assert_error(status, &v, 400, "bad_request");
    }
    for body in [
        json!({"ttl":"1h"}),
        json!({"operator":"7"}),
        json!({"operator":7,"scope":"all"}),
    ] {
        let (status, v) = hub.post("/api/v1/tokens", body).await;
        assert_error(status, &v, 400, "bad_request");
    }
}

#[tokio::test]
async fn operator_socket_refuses_missing_bad_and_foreign_tokens() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    assert_eq!(Client::refused(&hub.ws_url("/ws/operator")).await, 401);
    assert_eq!(
        Client::refused(&hub.ws_url("/ws/operator?token=garbage")).await,
        401
    );
    let foreign = presence_hub::auth::Tokens::new("another-secret")
        .mint(1, std::time::Duration::from_secs(60));
    assert_eq!(
        Client::refused(&hub.ws_url(&format!("/ws/operator?token={foreign}"))).await,
        401
    );
    // Expired, or without a numeric `sub`, signed with the right secret.
    let key = jsonwebtoken::EncodingKey::from_secret(common::JWT_SECRET.as_bytes());
    let sign = |claims: Value| {
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for claims in [
        json!({"sub":"1","exp":now - 10}),
        json!({"sub":"one","exp":now + 600}),
        json!({"exp":now + 600}),
        json!({"sub":"1"}),
    ] {
        let url = hub.ws_url(&format!("/ws/operator?token={}", sign(claims.clone())));
        assert_eq!(Client::refused(&url).await, 401, "{claims}");
    }
    // The control: the same signing with good claims is accepted.
    let good = sign(json!({"sub":"1","exp":now + 600}));
    let mut c = Client::connect(&hub.ws_url(&format!("/ws/operator?token={good}"))).await;
    assert_eq!(c.next().await["type"], "hello");
    // A valid token of an operator the hub does not know.
    assert_eq!(
        Client::refused(&hub.ws_url(&format!("/ws/operator?token={}", hub.token(99)))).await,
        403
    );
    // The token may come as `Authorization: Bearer` instead.
    let mut c = Client::connect_with_headers(
        &hub.ws_url("/ws/operator"),
        &[("authorization", &format!("Bearer {}", hub.token(1)))],
    )
    .await;
    assert_eq!(c.next().await["type"], "hello");
}

#[tokio::test]
async fn api_key_is_required_except_for_widget_status() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let calls: [(Method, &str); 7] = [
        (Method::GET, "/api/v1/operators"),
        (Method::GET, "/api/v1/operators/1"),
        (Method::PUT, "/api/v1/operators/2"),
        (Method::DELETE, "/api/v1/operators/1"),
        (Method::PATCH, "/api/v1/operators/1/status"),
        (Method::GET, "/api/v1/departments/1"),
        (Method::POST, "/api/v1/tokens"),
    ];
    for (method, path) in calls {
        for auth in [
            None,
            Some("Bearer wrong-key"),
            Some(API_KEY),
            Some("Basic dGVzdA=="),
        ] {
            let mut req = hub
                .http
                .request(method.clone(), hub.url(path))
                .json(&json!({"operator":1}));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let v: Value = res.json().await.unwrap_or(Value::Null);
            assert_error(status, &v, 401, "unauthorized");
        }
    }
    assert_eq!(hub.view(1).await["id"], 1, "nothing was deleted");
    let (status, list) = hub.get("/api/v1/operators").await;
    assert_eq!(status, 200);
    assert_eq!(ids(&list), vec![1], "nothing was created");
    let res = hub
        .public(Method::GET, "/api/v1/widget/status?department=1", &[])
        .await;
    assert_eq!(res.status().as_u16(), 200, "the widget status is public");
}

#[tokio::test]
async fn json_errors_for_malformed_body_unknown_fields_and_wrong_types() {
    let hub = TestHub::start().await;
    let send = |method: Method, path: &'static str, body: &'static str| {
        let hub = &hub;
        async move {
            let res = hub
                .http
                .request(method, hub.url(path))
                .bearer_auth(API_KEY)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            let ctype = res
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string());
            let v: Value = res.json().await.unwrap_or(Value::Null);
            assert!(
                ctype.is_some_and(|c| c.starts_with("application/json")),
                "{path} {body}: JSON error"
            );
            (status, v)
        }
    };
    for (method, path, body) in [
        (Method::PUT, "/api/v1/operators/1", "{\"name\":"),
        (Method::PUT, "/api/v1/operators/1", ""),
        (Method::PUT, "/api/v1/operators/1", "not json"),
        (
            Method::PUT,
            "/api/v1/operators/1",
            "{\"name\":\"a\",\"nickname\":\"b\"}",
        ),
        (Method::PUT, "/api/v1/operators/1", "{\"name\":7}"),
        (
            Method::PUT,
            "/api/v1/operators/1",
            "{\"departments\":\"1\"}",
        ),
        (
            Method::PUT,
            "/api/v1/operators/1",
            "{\"departments\":[1e400]}",
        ),
        (
            Method::PUT,
            "/api/v1/operators/1",
            "{\"departments\":[18446744073709551616]}",
        ),
        (Method::PUT, "/api/v1/operators/1", "{\"departments\":[-1]}"),
        (
            Method::PUT,
            "/api/v1/operators/1",
            "{\"permissions\":[\"fly\"]}",
        ),
        (Method::PUT, "/api/v1/operators/1", "{\"max_chats\":1.5}"),
        (Method::PUT, "/api/v1/operators/1", "{\"id\":2}"),
        (Method::PUT, "/api/v1/operators/1", "[]"),
        (Method::PUT, "/api/v1/departments/1", "{\"name\":"),
        (Method::PATCH, "/api/v1/operators/1/status", "{"),
        (Method::POST, "/api/v1/tokens", "{\"operator\":"),
    ] {
        let (status, v) = send(method, path, body).await;
        assert_error(status, &v, 400, "bad_request");
    }
    let (status, list) = hub.get("/api/v1/operators").await;
    assert_eq!(status, 200);
    assert_eq!(
        ids(&list),
        Vec::<u64>::new(),
        "no bad request created an operator"
    );
}

#[tokio::test]
async fn json_errors_for_bad_ids_unknown_ids_and_paths() {
    let hub = TestHub::start().await;
    for path in [
        "/api/v1/operators/abc",
        "/api/v1/operators/-1",
        "/api/v1/operators/1.5",
        "/api/v1/operators/18446744073709551616",
        "/api/v1/departments/x",
    ] {
        let (status, v) = hub.get(path).await;
        assert_error(status, &v, 400, "bad_request");
    }
    let (status, v) = hub.put("/api/v1/operators/abc", json!({"name":"a"})).await;
    assert_error(status, &v, 400, "bad_request");
    let (status, v) = hub.delete("/api/v1/operators/abc").await;
    assert_error(status, &v, 400, "bad_request");

    let (status, v) = hub.get("/api/v1/operators/12345").await;
    assert_error(status, &v, 404, "not_found");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("12345"),
        "{v}"
    );
    let (status, v) = hub.delete("/api/v1/operators/12345").await;
    assert_error(status, &v, 404, "not_found");

    for path in [
        "/api/v1/nope",
        "/api/v2/operators",
        "/nope",
        "/api/v1/operators/1/nope",
    ] {
        let (status, v) = hub.get(path).await;
        assert_error(status, &v, 404, "not_found");
    }
    let (status, v) = hub.post("/api/v1/operators/1", json!({})).await;
    assert_eq!(status, 405, "{v}");
    assert!(v["error"]["code"].is_string(), "{v}");
}

/// The WebSocket paths are answered before the router (`api::serve`): what is not an
/// upgrade still gets the router's JSON answers, and every answer is timed in the metrics.
#[tokio::test]
async fn ws_paths_answer_json_errors_outside_the_router() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let call = |method: Method, path: String| {
        let req = hub.http.request(method, hub.url(&path));
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap())
        }
    };
    // A GET that is no upgrade: the endpoint's own checks answer.
    let token = hub.token(1);
    let (status, body) = call(Method::GET, format!("/ws/operator?token={token}")).await;
    assert_error(status, &body, 400, "bad_request");
    let (status, body) = call(Method::GET, "/ws/operator?token=nope".into()).await;
    assert_error(status, &body, 401, "unauthorized");
    let (status, body) = call(Method::GET, "/ws/widget".into()).await;
    assert_error(status, &body, 400, "bad_request");
    // Other methods, and paths beside the three, go through the router.
    let (status, body) = call(Method::POST, format!("/ws/operator?token={token}")).await;
    assert_error(status, &body, 405, "method_not_allowed");
    let (status, body) = call(Method::GET, "/ws/operator/".into()).await;
    assert_error(status, &body, 404, "not_found");
    let metrics = hub
        .http
        .get(hub.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let timed = |status: &str| {
        metrics.lines().any(|l| {
            l.starts_with("presence_hub_http_request_duration_seconds_count")
                && l.contains("method=\"GET\"")
                && l.contains(&format!("status=\"{status}\""))
        })
    };
    assert!(timed("400") && timed("401"), "{metrics}");
}

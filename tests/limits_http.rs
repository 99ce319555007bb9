//! Limits under abuse on the HTTP side (SPEC.md sections 6 and 9): the request body deadline,
//! the back end's rate, record sizes, JWT details, and one rule for unknown query parameters.

mod common;

use std::time::{Duration, Instant};

use common::{API_KEY, Client, JWT_SECRET, TestHub, WAIT};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads to the end of the connection; returns what came.
async fn read_all(tcp: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&all).into_owned(),
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn body_timeout_answers_408_and_closes_slow_bodies() {
    let hub = TestHub::start_with(|cfg| cfg.limits.body_timeout = Duration::from_millis(300)).await;
    // Many clients announce a large body and send one byte of it.
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut tcp = TcpStream::connect(hub.addr).await.unwrap();
        let head = format!(
            "POST /api/v1/chats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        slow.push(tcp);
    }
    let started = Instant::now();
    for tcp in &mut slow {
        let answer = tokio::time::timeout(WAIT, read_all(tcp))
            .await
            .expect("answered and closed within the deadline");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
        assert!(answer.contains("limits.body_timeout"), "{answer}");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "all closed after {took:?}");
    // The hub holds none of them: every place is free again, and a body sent in time works.
    hub.poll_until("/metrics", "slow connections released", |v| {
        let text = v.as_str().unwrap_or("");
        common::metric_value(text, "presence_hub_connections", &["kind=\"http\""])
            .is_some_and(|n| n <= 2.0)
    })
    .await;
    hub.operator(1, &[1]).await;
    let (chat, _) = hub.create_chat(json!({"department": 1})).await;
    assert_eq!(chat["department"], 1);
}

#[tokio::test]
async fn rate_limit_api_key_answers_429_rate_limited() {
    let hub = TestHub::start_with(|cfg| {
        cfg.limits.api_rate = 1;
        cfg.limits.api_burst = 5;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let (status, body) = hub.get("/api/v1/operators").await;
        if status == 429 {
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("limits.api_rate")
            );
        }
        statuses.push(status);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!((5..=6).contains(&ok), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    // Public endpoints are not the back end's: not limited by its key.
    let (status, _) = hub.get("/api/v1/widget/status?department=1").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn record_size_departments_and_visitor_are_bounded() {
    let hub = TestHub::start_with(|cfg| {
        cfg.limits.max_departments = 10;
        cfg.limits.max_visitor_bytes = 64;
    })
    .await;
    let many: Vec<u64> = (1..=11).collect();
    let (status, body) = hub
        .put(
            "/api/v1/operators/1",
            json!({"name":"a","departments": many}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_departments"),
        "{body}"
    );
    let (status, body) = hub
        .put(
            "/api/v1/operators/1",
            json!({"name":"a","departments":[1],"watch_departments": many}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("watch_departments")
    );
    let (status, _) = hub.get("/api/v1/operators/1").await;
    assert_eq!(status, 404, "nothing was stored");
    hub.operator(1, &many[..10]).await;

    let (status, body) = hub
        .post(
            "/api/v1/chats",
            json!({"department":1,"visitor":{"name":"x".repeat(64)}}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_visitor_bytes"),
        "{body}"
    );
    let (status, body) = hub.get("/api/v1/chats").await;
    assert_eq!(status, 200);
    assert_eq!(body["chats"], json!([]), "nothing was created");
    hub.create_chat(json!({"department":1,"visitor":{"name":"x".repeat(40)}}))
        .await;
}

fn sign(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn jwt_sub_canonical_nbf_and_bearer_case() {
    let hub = TestHub::start().await;
    hub.operator(7, &[1]).await;
    let exp = now_s() + 3600;
    for sub in ["+7", "07", " 7", "7 "] {
        let url = hub.ws_url(&format!(
            "/ws/operator?token={}",
            sign(json!({"sub": sub, "exp": exp}))
        ));
        assert_eq!(Client::refused(&url).await, 401, "sub {sub:?}");
    }
    let later = sign(json!({"sub": "7", "exp": exp, "nbf": now_s() + 600}));
    let url = hub.ws_url(&format!("/ws/operator?token={later}"));
    assert_eq!(Client::refused(&url).await, 401, "a future nbf");
    let now = sign(json!({"sub": "7", "exp": exp, "nbf": now_s() - 5}));
    Client::connect(&hub.ws_url(&format!("/ws/operator?token={now}"))).await;

    // The scheme of Authorization is case-insensitive, on the socket and on the API.
    let token = hub.token(7);
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let mut c = Client::connect_with_headers(
            &hub.ws_url("/ws/operator"),
            &[("authorization", &format!("{scheme} {token}"))],
        )
        .await;
        assert_eq!(c.next().await["type"], "hello", "{scheme}");
        let res = hub
            .public(
                reqwest::Method::GET,
                "/api/v1/operators/7",
                &[("authorization", &format!("{scheme} {API_KEY}"))],
            )
            .await;
        assert_eq!(res.status().as_u16(), 200, "{scheme}");
    }
}

#[tokio::test]
async fn unknown_query_parameter_is_400_on_every_endpoint_with_a_query() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (chat, token) = hub.create_chat(json!({"department": 1})).await;
    let chat = chat["id"].as_u64().unwrap();
    for path in [
        "/api/v1/operators?department=1&departmnet=2".to_string(),
        "/api/v1/chats?status=pending&x=1".to_string(),
        "/api/v1/widget/status?department=1&x=1".to_string(),
        format!("/api/v1/chats/{chat}/messages?limit=10&x=1"),
        "/api/v1/events?limit=10&x=1".to_string(),
    ] {
        let (status, body) = hub.get(&path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{path}");
        let (status, _) = hub.get(&path[..path.rfind('&').unwrap()]).await;
        assert_eq!(status, 200, "{path} without the unknown parameter");
    }
    let token1 = hub.token(1);
    for path in [
        format!("/ws/operator?token={token1}&x=1"),
        "/ws/widget?department=1&x=1".to_string(),
        format!("/ws/visitor?chat={chat}&token={token}&x=1"),
    ] {
        let url = hub.ws_url(&path);
        assert_eq!(Client::refused(&url).await, 400, "{path}");
        let res = hub.public(reqwest::Method::GET, &path, &[]).await;
        let body: serde_json::Value = res.json().await.unwrap();
        assert!(
            body["error"]["message"].as_str().unwrap().contains("`x`"),
            "{path}: {body}"
        );
        Client::connect(&hub.ws_url(&path[..path.rfind('&').unwrap()])).await;
    }
}

//! The event feed of the back end (`GET /api/v1/events`, its SSE stream), message history,
//! chat retention and the paged chat list, through real sockets on both stores.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{API_KEY, TestHub, WAIT};
use serde_json::{Value, json};

async fn events(hub: &TestHub, query: &str) -> (u16, Value) {
    hub.get(&format!("/api/v1/events{query}")).await
}

fn types(page: &Value) -> Vec<String> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

/// Every event of the log, read page by page with `after`.
async fn all_events(hub: &TestHub) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let (status, page) = events(hub, &format!("?limit=3{after}")).await;
        assert_eq!(status, 200, "{page}");
        let batch = page["events"].as_array().unwrap().clone();
        if batch.is_empty() {
            return out;
        }
        after = format!("&after={}", page["last_id"].as_str().unwrap());
        out.extend(batch);
    }
}

/// Waits until the log holds an event matching `pred` (the log is written with the change,
/// so it is there once the change is acknowledged; this bounds the wait when it is not).
async fn event_where(hub: &TestHub, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(e) = all_events(hub).await.into_iter().find(|e| pred(e)) {
            return e;
        }
        assert!(Instant::now() < deadline, "no {what} in the feed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn scene(hub: &TestHub) -> u64 {
    hub.put_department(1, json!({"name": "Sales"})).await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    let (chat, _) = hub.create_chat(json!({"department": 1})).await;
    let id = chat["id"].as_u64().unwrap();
    op.next_of("chat_assigned").await;
    let ack = op
        .request(json!({"type": "send_message", "chat": id, "text": "hello"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let ack = op
        .request(json!({"type": "send_message", "chat": id, "text": "psst", "whisper": true}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let (status, _) = hub
        .post(&format!("/api/v1/chats/{id}/close"), json!({}))
        .await;
    assert_eq!(status, 200);
    op.close().await;
    id
}

#[tokio::test]
async fn feed_has_every_change_in_order() {
    let hub = TestHub::start().await;
    let chat = scene(&hub).await;
    let offline = event_where(&hub, "the operator going offline", |e| {
        e["type"] == "operator_status" && e["operator"]["status"] == "offline"
    })
    .await;
    assert_eq!(offline["operator"]["status_reason"], "disconnected");
    let all = all_events(&hub).await;
    let ids: Vec<u64> = all
        .iter()
        .map(|e| e["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in order: {ids:?}");
    for e in &all {
        assert!(e["at"].as_str().unwrap().ends_with('Z'), "{e}");
    }
    let of_chat: Vec<(String, String)> = all
        .iter()
        .filter(|e| e["chat"] == chat || e["chat"]["id"] == chat)
        .map(|e| {
            let detail = match e["type"].as_str().unwrap() {
                "chat" => e["chat"]["status"].as_str().unwrap().to_string(),
                "chat_assigned" => e["reason"].as_str().unwrap().to_string(),
                "message" => e["message"]["text"].as_str().unwrap().to_string(),
                t => t.to_string(),
            };
            (e["type"].as_str().unwrap().to_string(), detail)
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("chat", "pending"),
        ("chat", "pending"),
        ("chat_assigned", "auto"),
        ("chat", "active"),
        ("message", "hello"),
        ("message", "psst"),
        ("chat", "closed"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(of_chat, want, "the chat's story, in order");
    let whisper = all
        .iter()
        .find(|e| e["type"] == "message" && e["message"]["text"] == "psst")
        .unwrap();
    assert_eq!(whisper["message"]["whisper"], true, "whispers are marked");
    let online = all
        .iter()
        .position(|e| e["type"] == "operator_status" && e["operator"]["status"] == "online")
        .expect("the operator going online");
    let dept = all
        .iter()
        .position(|e| e["type"] == "department_status" && e["online"] == true)
        .expect("the department going online");
    assert!(online < dept || all[dept]["reason"] == "operators");
}

#[tokio::test]
async fn feed_types_filter_and_bad_queries() {
    let hub = TestHub::start().await;
    scene(&hub).await;
    let (status, page) = events(&hub, "?types=chat_assigned,message").await;
    assert_eq!(status, 200);
    assert_eq!(types(&page), ["chat_assigned", "message", "message"]);
    for bad in [
        "?types=chats",
        "?limit=0",
        "?limit=1001",
        "?wait=61s",
        "?after=abc",
        "?colour=red",
    ] {
        let (status, body) = events(&hub, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{bad}");
    }
    let res = hub
        .http
        .get(hub.url("/api/v1/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "the feed needs the API key");
}

#[tokio::test]
async fn feed_after_dollar_long_polls_until_the_next_change() {
    let hub = TestHub::start().await;
    scene(&hub).await;
    // The scene's last change (the grace after the operator left) is in before `$`.
    event_where(&hub, "the department going offline", |e| {
        e["type"] == "department_status" && e["online"] == false
    })
    .await;
    let (_, now) = events(&hub, "?after=$").await;
    assert_eq!(now["events"], json!([]), "nothing after now");
    let mark = now["last_id"].as_str().unwrap().to_string();
    let url = hub.url(&format!("/api/v1/events?after={mark}&wait=10s"));
    let http = hub.http.clone();
    let started = Instant::now();
    let poll = tokio::spawn(async move {
        let res = http.get(url).bearer_auth(API_KEY).send().await.unwrap();
        let v: Value = res.json().await.unwrap();
        (v, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "the long poll waits for an event");
    hub.put_department(7, json!({"bot": true})).await;
    let (v, took) = tokio::time::timeout(WAIT, poll).await.unwrap().unwrap();
    assert_eq!(types(&v), ["department_status"], "{v}");
    assert_eq!(v["events"][0]["department"], 7);
    assert!(took < Duration::from_secs(5), "answered at once: {took:?}");
    let (_, empty) = events(&hub, "?after=$&wait=200ms").await;
    assert_eq!(
        empty["events"],
        json!([]),
        "an empty answer when the wait ends"
    );
}

/// Reads SSE frames until `n` events came; returns (id, event, data) of each.
async fn sse_events(res: &mut reqwest::Response, n: usize) -> Vec<(String, String, Value)> {
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while out.len() < n {
        let chunk = tokio::time::timeout_at(deadline, res.chunk())
            .await
            .expect("SSE events in time")
            .unwrap()
            .expect("stream open");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut id, mut ev, mut data) = (String::new(), String::new(), Value::Null);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = v.into();
                } else if let Some(v) = line.strip_prefix("event: ") {
                    ev = v.into();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(v).unwrap();
                }
            }
            if !id.is_empty() {
                out.push((id, ev, data));
            }
        }
    }
    out
}

#[tokio::test]
async fn feed_stream_sends_sse_and_resumes_after_last_event_id() {
    let hub = TestHub::start().await;
    let mut res = hub
        .http
        .get(hub.url("/api/v1/events/stream?types=department_status"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    for d in 1..=3 {
        hub.put_department(d, json!({"bot": true})).await;
    }
    let got = sse_events(&mut res, 3).await;
    let depts: Vec<&Value> = got.iter().map(|(_, _, d)| &d["department"]).collect();
    assert_eq!(depts, [1, 2, 3]);
    for (id, ev, data) in &got {
        assert_eq!(ev, "department_status");
        assert_eq!(&data["id"], id, "the data carries the id too");
    }
    drop(res);
    // A client that saw only the first resumes after it.
    let mut again = hub
        .http
        .get(hub.url("/api/v1/events/stream?types=department_status"))
        .bearer_auth(API_KEY)
        .header("Last-Event-ID", &got[0].0)
        .send()
        .await
        .unwrap();
    let resumed = sse_events(&mut again, 2).await;
    assert_eq!(resumed[0].0, got[1].0);
    assert_eq!(resumed[1].0, got[2].0);
}

#[tokio::test]
async fn feed_position_dropped_by_retention_is_410_gone() {
    let hub = TestHub::start_with(|c| c.events.retention = Duration::from_millis(500)).await;
    hub.put_department(1, json!({"bot": true})).await;
    let (_, page) = events(&hub, "").await;
    let first = page["events"][0]["id"].as_str().unwrap().to_string();
    hub.put_department(2, json!({"bot": true})).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = events(&hub, &format!("?after={first}")).await;
        if status == 410 {
            assert_eq!(body["error"]["code"], "gone", "{body}");
            break;
        }
        assert_eq!(status, 200);
        assert!(
            Instant::now() < deadline,
            "retention never dropped the events"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // `after=$` goes on from now.
    let (status, _) = events(&hub, "?after=$").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn feed_max_events_bounds_the_log() {
    let hub = TestHub::start_with(|c| {
        c.events.max_events = 3;
        // The clean-up runs every tenth of the shortest retention.
        c.chats.retention = Duration::from_secs(1);
    })
    .await;
    for d in 1..=8 {
        hub.put_department(d, json!({"bot": true})).await;
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let all = all_events(&hub).await;
        if all.len() <= 3 {
            let depts: Vec<&Value> = all.iter().map(|e| &e["department"]).collect();
            assert_eq!(depts, [6, 7, 8], "the newest are kept");
            break;
        }
        assert!(Instant::now() < deadline, "still {} events", all.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn history_for_the_back_end_and_a_reconnecting_visitor() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"assignment": "off"})).await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    let (chat, token) = hub
        .create_chat(json!({"department": 1, "visitor": {"name": "Ann"}}))
        .await;
    let id = chat["id"].as_u64().unwrap();
    let (mut visitor, _) = hub.visitor(id, &token).await;
    let ack = visitor
        .request(json!({"type": "send_message", "text": "hi, my order?"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    for (text, whisper) in [
        ("on it", false),
        ("angry one", true),
        ("shipped today", false),
    ] {
        let ack = op
            .request(json!({"type": "send_message", "chat": id, "text": text, "whisper": whisper}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let (status, h) = hub.get(&format!("/api/v1/chats/{id}/messages")).await;
    assert_eq!(status, 200, "{h}");
    let texts: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["hi, my order?", "on it", "angry one", "shipped today"]
    );
    assert_eq!(h["messages"][2]["whisper"], true);
    let second = h["messages"][1]["id"].as_u64().unwrap();
    let (_, later) = hub
        .get(&format!(
            "/api/v1/chats/{id}/messages?after={second}&limit=1"
        ))
        .await;
    assert_eq!(later["messages"].as_array().unwrap().len(), 1);
    assert_eq!(later["messages"][0]["text"], "angry one");
    // The visitor reloads the page.
    visitor.close().await;
    let (_, first, history) = hub.visitor_with_history(id, &token).await;
    assert_eq!(first["chat"]["status"], "active");
    let seen: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        seen,
        ["hi, my order?", "on it", "shipped today"],
        "no whisper"
    );
    let (status, _) = hub.get("/api/v1/chats/999/messages").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn chats_retention_keeps_a_closed_chat_then_deletes_it() {
    let hub = TestHub::start_with(|c| c.chats.retention = Duration::from_millis(800)).await;
    hub.put_department(1, json!({"assignment": "off"})).await;
    let (chat, _) = hub.create_chat(json!({"department": 1})).await;
    let id = chat["id"].as_u64().unwrap();
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    op.request(json!({"type": "send_message", "chat": id, "text": "bye"}))
        .await;
    let (status, _) = hub
        .post(&format!("/api/v1/chats/{id}/close"), json!({}))
        .await;
    assert_eq!(status, 200);
    let (status, c) = hub.get(&format!("/api/v1/chats/{id}")).await;
    assert_eq!((status, c["status"].clone()), (200, json!("closed")));
    let (_, m) = hub.get(&format!("/api/v1/chats/{id}/messages")).await;
    assert_eq!(
        m["messages"][0]["text"], "bye",
        "history kept with the chat"
    );
    let (status, again) = hub
        .post(&format!("/api/v1/chats/{id}/close"), json!({}))
        .await;
    assert_eq!(status, 409, "{again}");
    let (status, _) = hub
        .post("/api/v1/chats", json!({"id": id, "department": 1}))
        .await;
    assert_eq!(status, 409, "a closed chat's id stays used while kept");
    hub.poll_until(&format!("/api/v1/chats/{id}"), "the chat's deletion", |v| {
        v["error"]["code"] == "not_found"
    })
    .await;
    let (status, _) = hub.get(&format!("/api/v1/chats/{id}/messages")).await;
    assert_eq!(status, 404, "messages go with the chat");
}

#[tokio::test]
async fn chats_list_paging_visits_every_chat_exactly_once() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"assignment": "off"})).await;
    hub.put_department(2, json!({"assignment": "off"})).await;
    let mut made = BTreeSet::new();
    let mut in_two = BTreeSet::new();
    let mut closed = BTreeSet::new();
    for i in 0..23 {
        let (chat, _) = hub
            .create_chat(json!({"department": 1 + i % 2, "bot": i % 3 == 0}))
            .await;
        let id = chat["id"].as_u64().unwrap();
        made.insert(id);
        if i % 2 == 1 {
            in_two.insert(id);
        }
        if i % 4 == 0 {
            let (s, _) = hub
                .post(&format!("/api/v1/chats/{id}/close"), json!({}))
                .await;
            assert_eq!(s, 200);
            closed.insert(id);
        }
    }
    for (query, want) in [
        ("", made.clone()),
        ("department=2&", in_two.clone()),
        ("status=closed&", closed.clone()),
    ] {
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let (status, page) = hub
                .get(&format!("/api/v1/chats?{query}limit=5&after={after}"))
                .await;
            assert_eq!(status, 200, "{page}");
            let chats = page["chats"].as_array().unwrap();
            assert!(chats.len() <= 5);
            seen.extend(chats.iter().map(|c| c["id"].as_u64().unwrap()));
            match page["next"].as_u64() {
                Some(n) => after = n,
                None => break,
            }
        }
        let unique: BTreeSet<u64> = seen.iter().copied().collect();
        assert_eq!(unique.len(), seen.len(), "{query}: no chat twice: {seen:?}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{query}: id order");
        assert_eq!(
            unique, want,
            "{query}: every chat that matches, and only those"
        );
    }
    let (status, body) = hub.get("/api/v1/chats?limit=1001").await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn history_of_a_closed_chat_for_its_reloading_visitor() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"assignment": "off"})).await;
    let (chat, token) = hub
        .create_chat(json!({"department": 1, "visitor": {"name": "Ann"}}))
        .await;
    let id = chat["id"].as_u64().unwrap();
    let (mut visitor, _) = hub.visitor(id, &token).await;
    let ack = visitor
        .request(json!({"type": "send_message", "text": "thanks, bye"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let (s, _) = hub
        .post(&format!("/api/v1/chats/{id}/close"), json!({}))
        .await;
    assert_eq!(s, 200);
    visitor.close().await;
    let (mut again, first, history) = hub.visitor_with_history(id, &token).await;
    assert_eq!(first["chat"]["status"], "closed");
    assert_eq!(history["messages"][0]["text"], "thanks, bye");
    let err = again
        .request(json!({"type": "send_message", "text": "hello?"}))
        .await;
    assert_eq!(err["code"], "conflict", "{err}");
    let refused = common::Client::refused(&hub.visitor_url(id, "wrong")).await;
    assert_eq!(refused, 403);
}

#[tokio::test]
async fn chats_allocated_ids_never_repeat_after_retention_and_a_restart() {
    let hub = TestHub::start_with(|c| c.chats.retention = Duration::from_millis(300)).await;
    hub.put_department(1, json!({"assignment": "off"})).await;
    let (chat, _) = hub.create_chat(json!({"department": 1})).await;
    let id = chat["id"].as_u64().unwrap();
    hub.post(&format!("/api/v1/chats/{id}/close"), json!({}))
        .await;
    hub.poll_until(&format!("/api/v1/chats/{id}"), "the chat's deletion", |v| {
        v["error"]["code"] == "not_found"
    })
    .await;
    let dir = hub.stop_keep_dir().await;
    let hub = TestHub::start_in(dir.path(), |_| {}).await;
    let (chat, _) = hub.create_chat(json!({"department": 1})).await;
    assert!(chat["id"].as_u64().unwrap() > id, "{chat}");
}

#[tokio::test]
async fn feed_position_beyond_the_newest_is_410_gone() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"bot": true})).await;
    let (status, body) = events(&hub, "?after=999999").await;
    assert_eq!(status, 410, "a position this log never had: {body}");
}

#[tokio::test]
async fn chats_allocated_ids_never_repeat_after_a_restart() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"assignment": "off"})).await;
    let (chat, _) = hub.create_chat(json!({"department": 1})).await;
    let id = chat["id"].as_u64().unwrap();
    hub.post(&format!("/api/v1/chats/{id}/close"), json!({}))
        .await;
    let dir = hub.stop_keep_dir().await;
    let hub = TestHub::start_in(dir.path(), |_| {}).await;
    let (chat, _) = hub.create_chat(json!({"department": 1})).await;
    assert!(chat["id"].as_u64().unwrap() > id, "{chat}");
    let (status, old) = hub.get(&format!("/api/v1/chats/{id}")).await;
    assert_eq!((status, old["status"].clone()), (200, json!("closed")));
}

async fn redis_node(redis: &RedisServer, id: &str) -> TestHub {
    common::node::redis_node(redis, id, |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_feed_same_ids_in_the_same_order_from_every_node() {
    let redis = RedisServer::start().await;
    let a = redis_node(&redis, "a").await;
    let b = redis_node(&redis, "b").await;
    a.put_department(1, json!({"name": "Sales"})).await;
    a.operator(1, &[1]).await;
    b.operator(2, &[1]).await;
    b.poll_until("/api/v1/operators/1", "operator 1 on node b", |v| {
        v["id"] == 1
    })
    .await;
    let (mut op1, _) = a.connect(1).await;
    let (_op2, _) = b.connect(2).await;
    let (chat, _) = b.create_chat(json!({"department": 1})).await;
    let id = chat["id"].as_u64().unwrap();
    let assigned = event_where(&a, "the assignment", |e| e["type"] == "chat_assigned").await;
    assert_eq!(assigned["chat"]["id"], id);
    let owner = assigned["chat"]["owner"].as_u64().unwrap();
    if owner == 1 {
        op1.next_of("chat_assigned").await;
    }
    let (s, _) = a
        .post(&format!("/api/v1/chats/{id}/close"), json!({}))
        .await;
    assert_eq!(s, 200);
    event_where(&b, "the close", |e| {
        e["type"] == "chat" && e["chat"]["status"] == "closed"
    })
    .await;
    let from_a = all_events(&a).await;
    let from_b = all_events(&b).await;
    assert_eq!(from_a, from_b, "one log, served by both nodes");
    let online: Vec<u64> = from_a
        .iter()
        .filter(|e| e["type"] == "operator_status" && e["operator"]["status"] == "online")
        .map(|e| e["operator"]["id"].as_u64().unwrap())
        .collect();
    assert!(online.contains(&1) && online.contains(&2), "{online:?}");
    // Each state change once, not once per node: never the same view twice in a row.
    let mut last = std::collections::HashMap::new();
    for e in from_a.iter().filter(|e| e["type"] == "operator_status") {
        let view = e["operator"].to_string();
        let before = last.insert(e["operator"]["id"].as_u64().unwrap(), view.clone());
        assert_ne!(before, Some(view), "logged twice: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_feed_position_dropped_by_retention_is_410_on_redis() {
    let redis = RedisServer::start().await;
    let hub = common::node::redis_node(&redis, "a", |cfg| {
        // `MAXLEN ~` trims whole stream nodes (100 entries): 250 events keep ~100–200.
        cfg.events.max_events = 10;
    })
    .await;
    // The node logs once it assigns (elected).
    let deadline = Instant::now() + WAIT;
    let first = loop {
        hub.put_department(1, json!({"bot": true})).await;
        hub.put_department(1, json!({"bot": false})).await;
        let (_, page) = events(&hub, "?limit=1").await;
        if let Some(id) = page["events"][0]["id"].as_str() {
            break id.to_string();
        }
        assert!(Instant::now() < deadline, "the node never wrote the feed");
    };
    for i in 0..250 {
        hub.put_department(1, json!({"bot": i % 2 == 0})).await;
    }
    let (status, body) = events(&hub, &format!("?after={first}")).await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["error"]["code"], "gone");
    let (status, page) = events(&hub, "?limit=1000").await;
    assert_eq!(status, 200);
    let kept = page["events"].as_array().unwrap().len();
    assert!(
        (10..250).contains(&kept),
        "bounded, never below max_events: {kept}"
    );
}

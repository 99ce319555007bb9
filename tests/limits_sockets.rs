//! Limits under abuse on the WebSocket side (SPEC.md section 9): the outbound queue bounded in
//! bytes, the 1008 close frame reaching a peer that stopped reading, 1002 on protocol errors,
//! widget sockets limited apart, the per-socket rate, record sizes, and `ref` echoed verbatim.
//! The abusive peers are raw TCP clients writing frames byte for byte.

mod common;

use std::time::{Duration, Instant};

use common::raw::{RawWs, frame};
use common::{Client, TestHub, WAIT, metric_value};
use serde_json::json;

fn dropped(text: &str) -> f64 {
    metric_value(text, "presence_hub_slow_consumers_dropped_total", &[]).unwrap_or(0.0)
}

/// A chat in department 1 and operator 1 (the writer) and 2 (the watcher) in it, both
/// allowed to open it whoever owns it.
async fn chat_with_two_operators(hub: &TestHub) -> u64 {
    for id in [1, 2] {
        hub.operator_with(
            id,
            json!({"name": format!("op{id}"), "departments": [1], "permissions": ["open_all"]}),
        )
        .await;
    }
    let (chat, _) = hub
        .create_chat(json!({"department": 1, "visitor": {"name": "v"}}))
        .await;
    chat["id"].as_u64().unwrap()
}

#[tokio::test]
async fn slow_consumer_outbound_bytes_bound_closes_a_reader_that_stopped_with_a_1008_frame() {
    let hub = TestHub::start_with(|cfg| {
        cfg.limits.outbound_bytes = 256 * 1024;
        cfg.limits.max_text_bytes = 60_000;
        cfg.limits.rate = 0;
    })
    .await;
    let chat = chat_with_two_operators(&hub).await;
    let before = dropped(&hub.metrics_text().await);

    // The watcher opens the chat, then stops reading (a frozen tab).
    let mut watcher =
        RawWs::connect(hub.addr, &format!("/ws/operator?token={}", hub.token(2))).await;
    assert_eq!(watcher.next_json().await["type"], "hello");
    watcher
        .send_text(&json!({"type":"open_chat","chat":chat,"ref":"open"}).to_string())
        .await;
    loop {
        let m = watcher.next_json().await;
        if m["ref"] == "open" {
            assert_eq!(m["type"], "ack", "{m}");
            break;
        }
    }

    // 50 KB whispers: the frame count (1024) stays far away; the byte bound (256 KiB) is
    // what closes the watcher, once the socket buffers are full.
    let (mut writer, _) = hub.connect(1).await;
    let ack = writer
        .request(json!({"type":"open_chat","chat":chat}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let text = "w".repeat(50_000);
    let started = Instant::now();
    let mut sent = 0;
    loop {
        let ack = writer
            .request(json!({"type":"send_message","chat":chat,"text":text,"whisper":true}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        writer.drain().await;
        sent += 1;
        if sent % 8 == 0 && dropped(&hub.metrics_text().await) > before {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no slow consumer after {sent} whispers"
        );
    }
    // Only now the watcher reads: everything the socket buffers held, then the close frame.
    let (close, frames) = watcher.read_to_close(WAIT).await;
    let close = close.unwrap_or_else(|| panic!("no close frame after {frames} frames"));
    assert_eq!(close.close_code(), Some(1008), "{close:?}");
    assert!(
        frames < sent,
        "the queued whispers were not written ({frames} of {sent})"
    );
    // The writer and the hub go on.
    let ack = writer
        .request(json!({"type":"activity","active":true}))
        .await;
    assert_eq!(ack["type"], "ack");
    hub.poll_until("/api/v1/operators/2", "the watcher gone", |v| {
        v["connections"] == 0
    })
    .await;
}

/// Each frame breaks RFC 6455; the hub answers with a 1002 close frame, then closes TCP.
#[tokio::test]
async fn protocol_error_closes_with_1002() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let cases: [(&str, Vec<u8>); 6] = [
        (
            "unmasked client frame",
            frame(0x81, br#"{"type":"logout"}"#, false),
        ),
        ("RSV1 without an extension", frame(0xC1, b"{}", true)),
        ("opcode 3", frame(0x83, b"x", true)),
        ("continuation without a start", frame(0x80, b"x", true)),
        ("a 126-byte ping", frame(0x89, &[b'p'; 126], true)),
        ("a fragmented ping", frame(0x09, b"p", true)),
    ];
    for (what, bytes) in cases {
        let mut ws =
            RawWs::connect(hub.addr, &format!("/ws/operator?token={}", hub.token(1))).await;
        assert_eq!(ws.next_json().await["type"], "hello");
        ws.write(&bytes).await;
        let (close, _) = ws.read_to_close(WAIT).await;
        let close = close.unwrap_or_else(|| panic!("{what}: no close frame"));
        assert_eq!(close.close_code(), Some(1002), "{what}: {close:?}");
    }
    // The hub goes on.
    let (mut c, _) = hub.connect(1).await;
    let ack = c.request(json!({"type":"activity","active":true})).await;
    assert_eq!(ack["type"], "ack");
}

#[tokio::test]
async fn max_widget_connections_never_lock_operators_out() {
    let hub = TestHub::start_with(|cfg| {
        cfg.limits.max_connections = 10;
        cfg.limits.max_widget_connections = Some(3);
    })
    .await;
    hub.operator(1, &[1]).await;
    let mut widgets = Vec::new();
    for _ in 0..3 {
        let mut w = hub.widget(&[1]).await;
        assert_eq!(w.next().await["type"], "widget_status");
        widgets.push(w);
    }
    let url = hub.ws_url("/ws/widget?department=1");
    assert_eq!(
        Client::refused(&url).await,
        503,
        "the widgets' share is full"
    );
    // Operators still get in.
    let (_op, hello) = hub.connect(1).await;
    assert_eq!(hello["operator"]["id"], 1);
    // A widget place freed is taken again.
    widgets.pop().unwrap().close().await;
    let deadline = Instant::now() + WAIT;
    while tokio_tungstenite::connect_async(&url).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the widget place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn max_widget_connections_default_leaves_a_tenth_of_max_connections() {
    let mut cfg = presence_hub::config::Limits::default();
    assert_eq!(cfg.max_widget_connections(), 16_200);
    cfg.max_connections = 3;
    assert_eq!(cfg.max_widget_connections(), 2, "at least one place stays");
}

#[tokio::test]
async fn rate_limit_on_a_socket_answers_rate_limited_and_the_socket_goes_on() {
    let hub = TestHub::start_with(|cfg| {
        cfg.limits.rate = 5;
        cfg.limits.rate_burst = 10;
    })
    .await;
    hub.operator(1, &[1]).await;
    let (mut c, _) = hub.connect(1).await;
    // 40 requests at once: the burst passes, the rest is refused (a few may refill meanwhile).
    for i in 0..40 {
        c.send(json!({"type":"activity","active":true,"ref":i}))
            .await;
    }
    let (mut acked, mut limited) = (0, 0);
    while acked + limited < 40 {
        let m = c.next().await;
        match (m["type"].as_str(), m["code"].as_str()) {
            (Some("ack"), _) => acked += 1,
            (Some("error"), Some("rate_limited")) => {
                assert!(m["ref"].is_number(), "the refusal carries the ref: {m}");
                limited += 1;
            }
            _ => {}
        }
    }
    assert!((10..20).contains(&acked), "{acked} acked");
    assert!(limited >= 20, "{limited} refused");
    // The socket goes on: after a pause, requests pass again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let ack = c.request(json!({"type":"activity","active":true})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
}

#[tokio::test]
async fn ref_is_echoed_verbatim() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let mut ws = RawWs::connect(hub.addr, &format!("/ws/operator?token={}", hub.token(1))).await;
    assert_eq!(ws.next_json().await["type"], "hello");
    for (written, answer) in [
        ("123456789012345678901234567890", "ack"),
        ("-0", "ack"),
        ("1.50", "error"),
        (r#""r\u00e9f""#, "ack"),
    ] {
        let body = if answer == "ack" {
            r#""type":"activity","active":true"#
        } else {
            r#""type":"activity","active":"no""#
        };
        ws.send_text(&format!(r#"{{{body},"ref":{written}}}"#))
            .await;
        let f = loop {
            let f = ws.next_frame(WAIT).await.expect("an answer");
            if f.opcode == 1 {
                break f;
            }
        };
        let text = String::from_utf8(f.payload).unwrap();
        assert!(
            text.contains(&format!(r#""ref":{written}"#)),
            "{written} not verbatim in {text}"
        );
        assert!(text.contains(&format!(r#""type":"{answer}""#)), "{text}");
    }
}

#[tokio::test]
async fn record_size_message_text_over_max_text_bytes_is_refused() {
    let hub = TestHub::start_with(|cfg| cfg.limits.max_text_bytes = 100).await;
    hub.operator(1, &[1]).await;
    let (chat, token) = hub.create_chat(json!({"department": 1})).await;
    let chat = chat["id"].as_u64().unwrap();
    let (mut op, _) = hub.connect(1).await;
    let e = op
        .request(json!({"type":"send_message","chat":chat,"text":"x".repeat(101)}))
        .await;
    assert_eq!(e["code"], "bad_request", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_text_bytes"),
        "{e}"
    );
    let ack = op
        .request(json!({"type":"send_message","chat":chat,"text":"x".repeat(100)}))
        .await;
    assert_eq!(ack["type"], "ack", "exactly the limit is fine: {ack}");

    let (mut visitor, _, _) = hub.visitor_with_history(chat, &token).await;
    visitor
        .send(json!({"type":"send_message","text":"é".repeat(51),"ref":1}))
        .await;
    let e = visitor.next_where("the refusal", |m| m["ref"] == 1).await;
    assert_eq!(e["code"], "bad_request", "{e}");
    assert!(e["message"].as_str().unwrap().contains("102 bytes"), "{e}");
    // The open_chat ack carries the recent messages: only the one within the limit.
    let ack = op.request(json!({"type":"open_chat","chat":chat})).await;
    let texts: Vec<usize> = ack["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("{ack}"))
        .iter()
        .filter_map(|m| m["text"].as_str().map(str::len))
        .collect();
    assert_eq!(texts, [100], "{ack}");
}

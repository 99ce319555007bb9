//! Limits and bad input (SPEC.md section 9): frame size, slow consumers, connection count,
//! handshake time, and every kind of bad frame on an operator socket.

mod common;

use std::time::{Duration, Instant};

use common::{Client, TestHub, WAIT, metric_value};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// A valid request whose ack shows the connection goes on.
async fn still_serves(c: &mut Client) {
    let ack = c.request(json!({"type":"activity","active":true})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
}

#[tokio::test]
async fn frame_over_max_message_bytes_closes_with_1009_and_the_hub_goes_on() {
    let hub = TestHub::start_with(|cfg| cfg.limits.max_message_bytes = 1024).await;
    hub.operator(1, &[1]).await;
    let (mut c, _) = hub.connect(1).await;
    // Just under the limit is fine.
    let text = "x".repeat(900);
    let ack = c
        .request(json!({"type":"activity","active":true,"pad":text}))
        .await;
    assert_eq!(ack["type"], "error", "unknown field, but read: {ack}");
    let big = json!({"type":"activity","active":true,"pad":"x".repeat(2000)});
    c.send(big).await;
    assert_eq!(c.close_code().await, Some(1009));

    let (mut again, hello) = hub.connect(1).await;
    assert_eq!(hello["operator"]["status"], "online");
    still_serves(&mut again).await;
    let (status, _) = hub.get("/api/v1/operators/1").await;
    assert_eq!(status, 200);
}

/// Reads a widget socket in the background and forwards every message.
fn forward(mut c: Client) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = c.ws.next().await {
            if let Message::Text(t) = m
                && tx.send(serde_json::from_str(&t).unwrap()).is_err()
            {
                return;
            }
        }
    });
    rx
}

#[tokio::test]
async fn slow_consumer_is_closed_with_1008_and_others_go_on() {
    const DEPTS: [u64; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
    let hub = TestHub::start_with(|cfg| {
        cfg.limits.outbound_queue = 16;
        // A small kernel send buffer: what the slow widget does not read waits in its queue
        // after a few KiB, not after the several MiB Linux autotunes a loopback socket to.
        cfg.limits.send_buffer = 4096;
        // The operator flips as fast as acks come back: far over the per-socket rate.
        cfg.limits.rate = 0;
    })
    .await;
    hub.operator(1, &DEPTS).await;
    let dropped =
        |t: &str| metric_value(t, "presence_hub_slow_consumers_dropped_total", &[]).unwrap_or(0.0);
    let before = dropped(&hub.metrics_text().await);

    // Each flip of the operator's status changes every department: the slow widget gets 12
    // frames, the operator 14 (its view, 12 department states, the ack), fewer than the queue
    // holds, so only a reader that does not keep up can fill it. The flips are `activity`
    // reports (no store write, so thousands take a moment): the status turns offline
    // (`inactive`) and back.
    let query: Vec<String> = DEPTS.iter().map(|d| format!("department={d}")).collect();
    let mut slow =
        Client::connect_small_buffer(&hub.ws_url(&format!("/ws/widget?{}", query.join("&")))).await;
    let mut fast = forward(hub.widget(&[1]).await);
    assert_eq!(fast.recv().await.unwrap()["online"], false);
    let (mut op, _) = hub.connect(1).await;
    assert_eq!(fast.recv().await.unwrap()["online"], true);

    let started = Instant::now();
    let mut flips = 0u32;
    loop {
        // One change at a time (each acked before the next), so that a reader that keeps
        // up never has more than one change's frames queued.
        let ack = op
            .request(json!({"type":"activity","active": flips % 2 == 1}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        flips += 1;
        if flips.is_multiple_of(64) && dropped(&hub.metrics_text().await) > before {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no slow consumer dropped after {flips} flips"
        );
    }
    let after = dropped(&hub.metrics_text().await);
    assert_eq!(
        after - before,
        1.0,
        "one slow consumer, counted once (after {flips} flips)"
    );

    // The slow widget: what was queued before the bound, then the end (1008 when the close
    // frame still fits, or just the end of the socket).
    let code = tokio::time::timeout(WAIT * 2, slow.close_code())
        .await
        .expect("the slow socket ends");
    assert!(code.is_none_or(|c| c == 1008), "closed with {code:?}");

    // The fast widget is still served and up to date.
    hub.put("/api/v1/departments/1", json!({"disabled":true}))
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = tokio::time::timeout_at(deadline, fast.recv())
            .await
            .expect("the fast widget sees the change")
            .expect("the fast widget is still open");
        if m["reason"] == "disabled" {
            break;
        }
    }
    let mut fresh = hub.widget(&[1]).await;
    assert_eq!(fresh.next().await["reason"], "disabled");
    still_serves(&mut op).await;
}

/// Connects until the hub accepts (a place freed by a closed connection is given back once
/// the hub has seen the close: no event tells the client when).
async fn connect_when_free(url: &str) -> Client {
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => {
                let mut c = Client::from(ws);
                assert_eq!(c.next().await["type"], "widget_status");
                return c;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "no place freed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[tokio::test]
async fn max_connections_counts_http_connections_and_websockets() {
    let mut hub = TestHub::start_with(|cfg| cfg.limits.max_connections = 3).await;
    // No idle keep-alive connection of the test's own HTTP client takes a place.
    hub.http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    hub.operator(1, &[1]).await;
    let url = hub.ws_url("/ws/widget?department=1");
    let _w = connect_when_free(&url).await;
    // Two idle TCP connections (HTTP clients that have sent nothing yet) fill the rest.
    let idle1 = TcpStream::connect(hub.addr).await.unwrap();
    let _idle2 = TcpStream::connect(hub.addr).await.unwrap();
    assert_eq!(Client::refused(&url).await, 503);
    assert_eq!(
        Client::refused(&hub.ws_url(&format!("/ws/operator?token={}", hub.token(1)))).await,
        503
    );
    // HTTP is refused too, with the JSON error.
    let (status, body) = hub.get("/healthz").await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "internal", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_connections"),
        "{body}"
    );
    // A place freed by an HTTP connection is taken again.
    drop(idle1);
    let _w2 = connect_when_free(&url).await;
    assert_eq!(Client::refused(&url).await, 503);
}

#[tokio::test]
async fn handshake_timeout_closes_a_silent_connection() {
    let hub =
        TestHub::start_with(|cfg| cfg.limits.handshake_timeout = Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut tcp = TcpStream::connect(hub.addr).await.unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("the hub closes a silent connection")
        .unwrap_or(0);
    let took = started.elapsed();
    // hyper may answer 408 before closing; either way the connection ends.
    if n > 0 {
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 408"), "{head}");
        let rest = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("then closed");
        assert!(matches!(rest, Ok(0) | Err(_)));
    }
    assert!(
        took >= Duration::from_millis(250),
        "closed after {took:?}, before the timeout"
    );

    // A slow, partial request head is cut off too.
    let mut tcp = TcpStream::connect(hub.addr).await.unwrap();
    tcp.write_all(b"GET /ws/widget?department=1 HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let n = tokio::time::timeout(WAIT, async {
        let mut all = Vec::new();
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the hub closes a half-sent request");
    let head = String::from_utf8_lossy(&n);
    assert!(
        head.is_empty() || head.starts_with("HTTP/1.1 408"),
        "{head}"
    );

    // A client that sends in time is served.
    let (status, _) = hub.get("/healthz").await;
    assert_eq!(status, 200);
}

/// Sends `frame` and expects a `bad_request` error carrying `r` (when the request had one).
async fn expect_bad_request(c: &mut Client, frame: Message, r: Option<Value>) {
    let what = format!("{frame:?}");
    c.send_raw(frame).await;
    let e = c.next_where("an error", |m| m["type"] == "error").await;
    assert_eq!(e["code"], "bad_request", "{what}: {e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    match r {
        Some(r) => assert_eq!(e["ref"], r, "{what}: {e}"),
        None => assert!(e.get("ref").is_none(), "{what}: {e}"),
    }
    still_serves(c).await;
}

fn text(s: &str) -> Message {
    Message::Text(s.to_string().into())
}

#[tokio::test]
async fn bad_input_gets_bad_request_and_the_connection_goes_on() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let (mut c, _) = hub.connect(1).await;
    let before = (hub.view(1).await, hub.view(2).await);

    let with_ref = [
        r#"{"type":"fly","ref":1}"#,
        r#"{"ref":2}"#,
        r#"{"type":7,"ref":3}"#,
        r#"{"type":"set_status","online":"no","ref":4}"#,
        r#"{"type":"set_status","online":false,"invisible":1,"ref":5}"#,
        r#"{"type":"set_status","online":false,"operator":"2","ref":6}"#,
        r#"{"type":"set_status","online":false,"operator":18446744073709551616,"ref":7}"#,
        r#"{"type":"set_status","online":false,"operator":1e400,"ref":8}"#,
        r#"{"type":"set_status","online":false,"operator":-2,"ref":9}"#,
        r#"{"type":"set_status","online":false,"operator":2.5,"ref":10}"#,
        r#"{"type":"open_chat","chat":1e400,"ref":11}"#,
        r#"{"type":"open_chat","chat":18446744073709551616,"ref":12}"#,
        r#"{"type":"open_chat","chat":99999999999999999999999999999999999999,"ref":13}"#,
        r#"{"type":"open_chat","ref":14}"#,
        r#"{"type":"activity","active":true,"extra":1,"ref":15}"#,
        r#"{"type":"send_message","chat":1,"text":["a"],"ref":16}"#,
        r#"{"type":"activity","active":[true],"ref":17}"#,
    ];
    for (i, s) in with_ref.iter().enumerate() {
        expect_bad_request(&mut c, text(s), Some(json!(i + 1))).await;
    }
    // The control: a valid request with a string ref is acked with it.
    c.send_raw(text(r#"{"type":"activity","active":true,"ref":"s-1"}"#))
        .await;
    let ack = c.next_where("the ack", |m| m["ref"] == "s-1").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    for s in [
        r#"{"type":"#,
        "not json",
        "",
        "[1,2]",
        "\"set_status\"",
        "42",
        "null",
        "true",
        r#"{"type":"activity"} x"#,
    ] {
        expect_bad_request(&mut c, text(s), None).await;
    }
    expect_bad_request(
        &mut c,
        Message::Binary(br#"{"type":"logout"}"#.to_vec().into()),
        None,
    )
    .await;

    assert_eq!(
        (hub.view(1).await, hub.view(2).await),
        before,
        "no state changed"
    );
    let ack = c.request(json!({"type":"set_status","online":false})).await;
    assert_eq!(
        ack["operator"]["online"], false,
        "and a valid change still works: {ack}"
    );
}

/// Deviation from SPEC.md section 9 (docs/protocol.md): the WebSocket library ends the stream
/// after a text frame that is not UTF-8, so the hub answers `bad_request` and closes with
/// 1007 (RFC 6455) instead of going on. The hub and the operator's state go on.
#[tokio::test]
async fn bad_input_invalid_utf8_gets_bad_request_then_close_1007() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (mut c, _) = hub.connect(1).await;
    let (mut other, _) = hub.connect(1).await;
    let before = hub.view(1).await;
    // tungstenite will not build such a frame from a string: hand it a raw one.
    let invalid = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    c.send_raw(Message::Frame(invalid)).await;
    let e = c.next_of("error").await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], "bad_request", "{e}");
    assert!(e["message"].as_str().unwrap().contains("UTF-8"), "{e}");
    assert_eq!(c.close_code().await, Some(1007));

    still_serves(&mut other).await;
    let mut after = hub.view(1).await;
    assert_eq!(after["connections"], 1);
    after["connections"] = before["connections"].clone();
    assert_eq!(after, before, "nothing else changed");
}

#[tokio::test]
async fn bad_input_unknown_ids_are_not_found_and_change_nothing() {
    let hub = TestHub::start().await;
    hub.operator_with(
        1,
        json!({"name":"a","departments":[1],"permissions":["set_operator_status","change_online_status"]}),
    )
    .await;
    let (mut c, _) = hub.connect(1).await;
    let before = hub.view(1).await;
    for req in [
        json!({"type":"set_status","operator":77,"online":false}),
        json!({"type":"open_chat","chat":77}),
        json!({"type":"leave_chat","chat":77}),
        json!({"type":"send_message","chat":77,"text":"hi"}),
        json!({"type":"close_chat","chat":77}),
    ] {
        let e = c.request(req.clone()).await;
        assert_eq!(e["type"], "error", "{req}: {e}");
        assert_eq!(e["code"], "not_found", "{req}: {e}");
    }
    assert_eq!(hub.view(1).await, before);
    still_serves(&mut c).await;
}

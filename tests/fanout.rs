//! Fan-out to many sockets (SPEC.md sections 3 and 6): every change reaches every widget that
//! keeps up, in order, whether the hub wrote the frame straight from the broadcaster or had
//! to queue it; frames the socket library makes itself (pongs) never cut into them.

mod common;

use common::{Client, TestHub, WAIT};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Widgets that follow the flipping department.
const WIDGETS: usize = 60;
/// Status flips of its only operator.
const FLIPS: usize = 40;

/// The next `widget_status`, answering nothing (the client library answers pings itself).
async fn next_status(c: &mut Client) -> Value {
    c.next_of("widget_status").await
}

#[tokio::test]
async fn fanout_every_change_reaches_every_widget_that_keeps_up_in_order() {
    let hub = TestHub::start_with(|cfg| cfg.limits.rate = 0).await;
    hub.operator(1, &[1]).await;
    let mut widgets = Vec::new();
    for _ in 0..WIDGETS {
        let mut w = hub.widget(&[1]).await;
        assert_eq!(next_status(&mut w).await["online"], false);
        widgets.push(w);
    }
    let (mut op, _) = hub.connect(1).await;
    // The flips do not wait for the widgets: each is acknowledged once durable, and the
    // widgets read concurrently, so frames are written while others are being read.
    let readers: Vec<_> = widgets
        .into_iter()
        .map(|mut w| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while seen.len() < FLIPS + 1 {
                    seen.push(next_status(&mut w).await["online"].as_bool().unwrap());
                }
                seen
            })
        })
        .collect();
    for k in 0..FLIPS {
        let ack = op
            .request(json!({"type":"set_status","online": k % 2 == 1}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    // Connected (online), then offline, online, … : every state, in order, on every widget.
    let want: Vec<bool> = std::iter::once(true)
        .chain((0..FLIPS).map(|k| k % 2 == 1))
        .collect();
    for r in readers {
        let seen = tokio::time::timeout(WAIT * 2, r)
            .await
            .expect("every widget got every change in time")
            .unwrap();
        assert_eq!(seen, want);
    }
}

#[tokio::test]
async fn fanout_pongs_are_written_between_frames_never_inside_one() {
    let hub = TestHub::start_with(|cfg| cfg.limits.rate = 0).await;
    hub.operator(1, &[1]).await;
    let mut w = hub.widget(&[1]).await;
    assert_eq!(next_status(&mut w).await["online"], false);
    let (mut op, _) = hub.connect(1).await;
    // The client pings (100-byte payloads) while the hub writes statuses: the pongs
    // tungstenite makes go through the same queue as the hub's frames.
    let flipper = tokio::spawn(async move {
        for k in 0..FLIPS {
            let ack = op
                .request(json!({"type":"set_status","online": k % 2 == 1}))
                .await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
        op
    });
    let mut statuses = Vec::new();
    let mut pongs = Vec::new();
    let mut sent = 0u8;
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    let mut last_pong = false;
    while statuses.len() < FLIPS + 1 || !last_pong {
        if statuses.len() == FLIPS + 1 && sent < 200 {
            // Every status is in: one last ping, whose pong ends the loop.
            w.ws.send(Message::Ping(vec![200; 100].into()))
                .await
                .unwrap();
            sent = 200;
        }
        if sent < 30 {
            w.ws.send(Message::Ping(vec![sent; 100].into()))
                .await
                .unwrap();
            sent += 1;
        }
        let msg = tokio::time::timeout_at(deadline, w.ws.next())
            .await
            .expect("frames and pongs in time")
            .expect("socket open")
            .expect("every frame well formed");
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).expect("JSON text");
                if v["type"] == "widget_status" {
                    statuses.push(v["online"].as_bool().unwrap());
                }
            }
            Message::Pong(p) => {
                last_pong |= p[..] == [200; 100];
                pongs.push(p.to_vec());
            }
            Message::Close(f) => panic!("closed by the hub: {f:?}"),
            _ => {}
        }
    }
    flipper.await.unwrap();
    let want: Vec<bool> = std::iter::once(true)
        .chain((0..FLIPS).map(|k| k % 2 == 1))
        .collect();
    assert_eq!(statuses, want);
    // tungstenite answers the latest ping when several wait; each pong echoes a ping whole.
    assert!(!pongs.is_empty());
    for p in &pongs {
        assert_eq!(p.len(), 100);
        assert!(
            p.iter().all(|b| *b == p[0] && (*b < 30 || *b == 200)),
            "{p:?}"
        );
    }
    // The socket goes on.
    hub.put("/api/v1/departments/1", json!({"disabled": true}))
        .await;
    let v = next_status(&mut w).await;
    assert_eq!(v["reason"], "disabled");
}

#[tokio::test]
async fn fanout_nothing_is_written_after_the_close_frame() {
    use common::raw::RawWs;
    use std::time::Duration;
    // Pings every 50 ms, written by the sweeper straight to the socket, while the hub waits
    // for the answer to its close frame (which this client never sends).
    let hub = TestHub::start_with(|cfg| {
        cfg.presence.ping_interval = Duration::from_millis(50);
        cfg.presence.pong_timeout = Some(Duration::from_secs(30));
    })
    .await;
    hub.operator(1, &[1]).await;
    let mut ws = RawWs::connect(hub.addr, &format!("/ws/operator?token={}", hub.token(1))).await;
    assert_eq!(ws.next_json().await["type"], "hello");
    // Pings are flowing.
    loop {
        let f = ws.next_frame(WAIT).await.expect("a frame");
        if f.opcode == 9 {
            break;
        }
    }
    ws.send_text(&json!({"type":"logout","ref":1}).to_string())
        .await;
    // Up to the close frame: frames (acks, pings); after it, only the end of the connection.
    let (close, _) = ws.read_to_close(WAIT).await;
    assert_eq!(close.expect("a close frame").close_code(), Some(1000));
}

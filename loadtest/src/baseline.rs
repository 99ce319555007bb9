//! The baseline: a bare tokio-tungstenite broadcast server, the least any WebSocket fan-out
//! server can cost. `idle`, `fanout` and `churn` run against it with `--target baseline`
//! (or `--compare`) so every hub figure has a ratio to this floor.
//!
//! - `GET /ws/widget?department=N[&department=M…]`: one `widget_status` frame per department at
//!   once (as the hub sends), then every frame published to those departments.
//! - `GET /pub?department=N`: every text frame received is broadcast to department N's widgets.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use futures::{SinkExt, StreamExt};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::broadcast,
};
use tokio_tungstenite::tungstenite::{
    Message, Utf8Bytes,
    handshake::server::{Request, Response},
    protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode},
};

/// WebSocket buffer settings of the server side.
///
/// MUST MATCH THE HUB'S for widgets: `presence_hub::ws::ws_config_for` (src/ws/mod.rs:
/// `WIDGET_READ_BUFFER` 128 bytes, `WRITE_BUFFER` 8 KiB, frame and message limit
/// `limits.max_message_bytes`, 64 KiB by default). Otherwise the per-connection memory ratio hub/baseline compares buffer sizes
/// rather than the hub's own cost. (tungstenite's default read buffer is 128 KiB, allocated
/// eagerly per connection.)
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(128)
        .write_buffer_size(8 * 1024)
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(64 * 1024))
}

/// Per-department broadcast channels (as many frames queued per widget as the hub's
/// `limits.outbound_queue` default; a widget further behind is closed with 1008, like the hub).
#[derive(Default)]
struct Topics(Mutex<HashMap<u64, broadcast::Sender<Utf8Bytes>>>);

impl Topics {
    fn sender(&self, department: u64) -> broadcast::Sender<Utf8Bytes> {
        let mut map = self.0.lock().unwrap();
        map.entry(department)
            .or_insert_with(|| broadcast::channel(1024).0)
            .clone()
    }
}

/// Listen backlog. tokio's `TcpListener::bind` uses 128, which overflows in connection
/// storms (SYNs dropped, clients retry after 1 s); like the hub's, ours is larger.
pub const LISTEN_BACKLOG: u32 = 1024;

pub async fn serve(listen: SocketAddr) -> Result<()> {
    let socket = if listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    let listener: TcpListener = socket.listen(LISTEN_BACKLOG)?;
    eprintln!("baseline-server listening on {}", listener.local_addr()?);
    let topics = Arc::new(Topics::default());
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let topics = topics.clone();
                tokio::spawn(async move {
                    let _ = handle(stream, topics).await;
                });
            }
            // Out of files (EMFILE) and the like: back off instead of spinning.
            Err(e) => {
                eprintln!("baseline-server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn handle(stream: TcpStream, topics: Arc<Topics>) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut uri = String::new();
    // tungstenite's callback signature: its error type is an HTTP response.
    #[allow(clippy::result_large_err)]
    let capture = |req: &Request, resp: Response| {
        uri = req.uri().to_string();
        Ok(resp)
    };
    let mut ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, capture, Some(ws_config())).await?;
    let (path, query) = uri.split_once('?').unwrap_or((uri.as_str(), ""));
    let mut departments: Vec<u64> = query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("department="))
        .filter_map(|v| v.parse().ok())
        .collect();
    if departments.is_empty() {
        departments.push(1);
    }

    match path {
        "/pub" => {
            let tx = topics.sender(departments[0]);
            while let Some(msg) = ws.next().await {
                if let Message::Text(text) = msg? {
                    let _ = tx.send(text);
                }
            }
        }
        "/ws/widget" => {
            let mut rxs: Vec<_> = departments
                .iter()
                .map(|d| topics.sender(*d).subscribe())
                .collect();
            for d in &departments {
                let initial = format!(
                    r#"{{"type":"widget_status","department":{d},"online":false,"reason":"none"}}"#
                );
                ws.send(Message::text(initial)).await?;
            }
            loop {
                tokio::select! {
                    got = recv_any(&mut rxs) => match got {
                        Ok(text) => ws.send(Message::Text(text)).await?,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let frame = CloseFrame { code: CloseCode::Policy, reason: "slow consumer".into() };
                            ws.close(Some(frame)).await?;
                            break;
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    msg = ws.next() => match msg {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e.into()),
                        None => break,
                    },
                }
            }
        }
        _ => {
            let frame = CloseFrame {
                code: CloseCode::Policy,
                reason: "unknown path".into(),
            };
            ws.close(Some(frame)).await?;
        }
    }
    Ok(())
}

/// The next frame from any of the subscribed departments.
async fn recv_any(
    rxs: &mut [broadcast::Receiver<Utf8Bytes>],
) -> Result<Utf8Bytes, broadcast::error::RecvError> {
    if let [rx] = rxs {
        return rx.recv().await;
    }
    let futs = rxs.iter_mut().map(|rx| Box::pin(rx.recv()));
    futures::future::select_all(futs).await.0
}

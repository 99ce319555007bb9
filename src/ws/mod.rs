//! WebSocket endpoints: the upgrade (checks happen before it, so a bad token is a plain
//! HTTP 401), the connection loop shared by every kind, and one module per kind for what
//! its clients may send.

pub mod conn;
pub mod operator;
pub mod visitor;
pub mod widget;

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use crate::error::Error;
use crate::hub::Hub;
use crate::limits::Bucket;
use crate::peer::{Kind, Peer};
use crate::protocol::{error_frame, request_ref};
use conn::Conn;

pub type Socket = WebSocketStream<Conn>;

/// Bytes the read buffer starts with, and reads at most at once. tungstenite's default
/// (128 KiB, allocated eagerly) is sized for throughput; presence traffic is tiny and
/// connections are many.
pub const READ_BUFFER: usize = 1024;
/// The read buffer of a widget socket: widgets only receive (what they may send is a ping,
/// a pong, a close, or a frame answered with an error), and they are the many.
pub const WIDGET_READ_BUFFER: usize = 128;
/// Frames tungstenite writes itself (pongs, the close frame) are buffered up to this; the
/// hub's own frames do not go through it (`wire`).
pub const WRITE_BUFFER: usize = 8 * 1024;

/// The socket settings of every connection but widgets' (the fuzzer's too).
pub fn ws_config(max_message_bytes: usize) -> WebSocketConfig {
    ws_config_with_read_buffer(max_message_bytes, READ_BUFFER)
}

/// The socket settings of a connection of `kind` (the load tester's baseline, a widget
/// server, uses the widgets').
pub fn ws_config_for(kind: Kind, max_message_bytes: usize) -> WebSocketConfig {
    let read_buffer = match kind {
        Kind::Widget => WIDGET_READ_BUFFER,
        Kind::Operator(_) | Kind::Visitor(_) => READ_BUFFER,
    };
    ws_config_with_read_buffer(max_message_bytes, read_buffer)
}

fn ws_config_with_read_buffer(max_message_bytes: usize, read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

/// What the loop does after a request.
pub enum Flow {
    Continue,
    /// Close with this code and reason.
    Close(u16, &'static str),
}

/// Checks that a request is a WebSocket upgrade and answers `101`, or says what is wrong.
fn accept(req: &mut Request) -> Result<(Response, OnUpgrade), Error> {
    let h = req.headers();
    let has = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has(header::UPGRADE, "websocket") || !has(header::CONNECTION, "upgrade") {
        return Err(Error::bad(
            "expected a WebSocket upgrade (Upgrade: websocket)",
        ));
    }
    if h.get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err(Error::bad("Sec-WebSocket-Version must be 13"));
    }
    let key = h
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| Error::bad("missing Sec-WebSocket-Key"))?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = req
        .extensions_mut()
        .remove::<OnUpgrade>()
        .ok_or_else(|| Error::Internal("connection cannot be upgraded".into()))?;
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = res.headers_mut();
    hs.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    hs.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    hs.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    Ok((res, on_upgrade))
}

/// Checks capacity, answers the upgrade and runs the socket with `handler` (the endpoint
/// has authenticated the request already).
pub fn upgrade<H: Handler>(hub: Hub, mut req: Request, kind: Kind, handler: H) -> Response {
    if let Err(e) = check_capacity(&hub) {
        return e.into_response();
    }
    let origin_ok = origin_ok(&hub, req.headers());
    let addr = req.extensions().get::<PeerAddr>().copied();
    match accept(&mut req) {
        Ok((res, on_upgrade)) => {
            // A widget takes its place last, once nothing else can refuse it (the place is
            // given back when its peer is removed).
            if kind == Kind::Widget
                && !hub
                    .limits
                    .admit_widget(hub.cfg.limits.max_widget_connections())
            {
                metrics::counter!("presence_hub_connections_refused_total").increment(1);
                return Error::Unavailable(
                    "too many widget connections (limits.max_widget_connections)".into(),
                )
                .into_response();
            }
            spawn(hub, on_upgrade, kind, handler, origin_ok, addr);
            res
        }
        Err(e) => e.into_response(),
    }
}

/// Refuses a new socket past `limits.max_connections`: sockets plus open HTTP connections,
/// this request's own among them (it becomes the socket).
fn check_capacity(hub: &Hub) -> Result<(), Error> {
    if hub.peers.len() + hub.limits.http_open() > hub.cfg.limits.max_connections {
        metrics::counter!("presence_hub_connections_refused_total").increment(1);
        return Err(Error::Unavailable("too many connections".into()));
    }
    Ok(())
}

/// True when a browser's `Origin` is allowed (no `Origin`: not a browser, not refused; the
/// hub's own origin, the console's pages: allowed whatever `allowed_origins` says).
fn origin_ok(hub: &Hub, headers: &HeaderMap) -> bool {
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(o) => hub.cfg.origin_allowed(o) || crate::console::same_origin(o, headers),
    }
}

/// The behaviour of one kind of socket.
pub trait Handler: Send + 'static {
    /// Registers the socket with the hub; it pushes the first frames (`hello`, state).
    /// Called as the upgrade is answered, before the connection is handed over: the frames
    /// wait in the peer's queue until the socket is served.
    fn start(&mut self, hub: &Hub, peer: &Arc<Peer>) -> Result<(), Error>;
    /// A text frame from the client.
    fn on_text(
        &mut self,
        hub: &Hub,
        peer: &Arc<Peer>,
        text: &str,
    ) -> impl Future<Output = Flow> + Send;
    /// The socket is gone (any reason, the upgrade failing after `start` too); not called
    /// when `start` failed.
    fn stop(&mut self, hub: &Hub, peer: &Arc<Peer>);
}

/// Answers the upgrade and runs the socket to its end in a tracked task.
///
/// The task is small on purpose (widgets are the many, and each holds one for its whole
/// life): the stream lives on the heap, the loop borrows what it needs instead of owning
/// copies (an `async fn` keeps its arguments beside its locals), once-per-socket steps are
/// boxed, and the hub's shutdown reaches the socket through its peer ([`close_all`]) instead
/// of a cancellation future in every task.
fn spawn<H: Handler>(
    hub: Hub,
    on_upgrade: OnUpgrade,
    kind: Kind,
    mut handler: H,
    origin_ok: bool,
    addr: Option<PeerAddr>,
) {
    let peer = hub.new_peer(kind);
    let span = tracing::info_span!(
        "ws",
        conn = peer.id,
        peer = addr.map(|a| tracing::field::display(a.0)),
        kind = kind.label(),
        operator = tracing::field::Empty
    );
    if let Kind::Operator(op) = kind {
        span.record("operator", op);
    }
    // Started now, while hyper writes the `101` and hands the connection over: the connect's
    // durable write runs meanwhile, and its frames (`hello` first) wait in the peer's queue
    // until the socket is served. Not started for a refused origin.
    let started = origin_ok.then(|| span.in_scope(|| handler.start(&hub, &peer)));
    // What the socket ends with when the hub refuses it before serving it (decided here, so
    // the task keeps a code, not the error).
    let refused = match &started {
        None => Some(Refused::Origin),
        Some(Err(e)) => {
            let _span = span.enter();
            tracing::info!(cause = %e, "refused after upgrade");
            Some(if matches!(e, Error::NotFound(_) | Error::Forbidden(_)) {
                Refused::Policy
            } else {
                Refused::Internal
            })
        }
        Some(Ok(())) => None,
    };
    let task = {
        let hub = hub.clone();
        async move {
            let ws = Box::pin(upgraded(&hub, on_upgrade, &peer)).await;
            match (ws, refused) {
                (Some(mut ws), Some(refused)) => {
                    let (code, reason) = refused.close();
                    close(&mut ws, code, reason).await;
                }
                (Some(mut ws), None) => {
                    tracing::debug!("connected");
                    let (code, reason) = serve(&hub, &mut ws, &peer, &mut handler).await;
                    handler.stop(&hub, &peer);
                    if let Some(code) = code {
                        close(&mut ws, code, reason).await;
                    }
                    tracing::debug!(code, "disconnected");
                }
                // Connected already: the socket that never came is a disconnect.
                (None, None) => handler.stop(&hub, &peer),
                (None, Some(_)) => {}
            }
            peer.detach();
            hub.remove_peer(peer.id);
        }
    };
    let task = tracing::Instrument::instrument(task, span);
    // What every socket's task holds for its whole life (the figure docs/benchmarks.md
    // breaks down): read it with RUST_LOG=presence_hub::ws=trace.
    tracing::trace!(
        kind = kind.label(),
        task_bytes = std::mem::size_of_val(&task),
        "connection task"
    );
    hub.tasks.spawn(task);
}

/// Why a socket is closed right after its upgrade.
#[derive(Clone, Copy)]
enum Refused {
    /// Its `Origin` is not allowed.
    Origin,
    /// The connect was refused (unknown or forbidden).
    Policy,
    /// The connect failed.
    Internal,
}

impl Refused {
    fn close(self) -> (u16, &'static str) {
        match self {
            Refused::Origin => (1008, "origin not allowed"),
            Refused::Policy => (1008, "refused"),
            Refused::Internal => (1011, "refused"),
        }
    }
}

/// Waits for hyper to hand the connection over and makes the WebSocket stream on it (on the
/// heap: the task keeps a pointer); `None` when the upgrade failed.
async fn upgraded(hub: &Hub, on_upgrade: OnUpgrade, peer: &Arc<Peer>) -> Option<Box<Socket>> {
    // The server speaks HTTP/1 over plain TCP, so the upgraded connection is the TCP stream
    // itself: the peer writes to it directly.
    let parts = match on_upgrade
        .await
        .map(|io| io.downcast::<TokioIo<TcpStream>>())
    {
        Ok(Ok(parts)) => parts,
        Ok(Err(_)) => {
            tracing::error!("upgraded connection is not a TCP stream");
            return None;
        }
        Err(e) => {
            tracing::debug!(cause = %e, "upgrade failed");
            return None;
        }
    };
    let sock = Arc::new(parts.io.into_inner());
    peer.attach(sock.clone());
    let io = Conn::new(sock, peer.clone(), parts.read_buf);
    let ws = WebSocketStream::from_raw_socket(
        io,
        Role::Server,
        Some(ws_config_for(peer.kind, hub.cfg.limits.max_message_bytes)),
    )
    .await;
    Some(Box::new(ws))
}

/// Asks every socket to close with 1001 (the hub is shutting down): called once the hub's
/// `shutdown` token is cancelled. A socket that registers after this sees the token
/// cancelled when its loop starts ([`serve`]).
pub fn close_all(hub: &Hub) {
    for peer in hub.peers.iter() {
        peer.request_close(1001);
    }
}

/// What woke the loop.
enum Event {
    /// Frames were queued or a close was requested.
    Woken,
    /// A frame from the client, an error, or the end of the stream.
    Frame(Option<Result<Message, WsError>>),
}

/// What the loop does with a frame from the client.
enum Step {
    Continue,
    /// A request to run.
    Request(Utf8Bytes),
    /// End the connection, closing with this code if there is one.
    End(Option<u16>, &'static str),
    /// Write what is queued (an error frame saying why), then close.
    FlushAndClose(u16, &'static str),
}

/// The loop: frames from the client, frames queued for it, a close from the hub.
/// Returns the close code to send, if the hub is the one closing.
async fn serve<H: Handler>(
    hub: &Hub,
    ws: &mut Socket,
    peer: &Arc<Peer>,
    handler: &mut H,
) -> (Option<u16>, &'static str) {
    // Registered in `hub.peers` before this check: either `close_all` reached the peer, or
    // the token was cancelled before it and is seen here.
    if hub.shutdown.is_cancelled() {
        return (Some(1001), close_reason(1001));
    }
    let limits = &hub.cfg.limits;
    let mut bucket = Bucket::new(limits.rate, limits.rate_burst, Instant::now());
    loop {
        // One poll of both sources (a close request, the hub's shutdown included, comes as
        // a wake-up): the idle state is two references, not a `select!` of futures.
        let event = std::future::poll_fn(|cx| {
            if peer.poll_woken(cx).is_ready() {
                return Poll::Ready(Event::Woken);
            }
            ws.poll_next_unpin(cx).map(Event::Frame)
        })
        .await;
        let step = match event {
            Event::Woken => match flush(ws, peer).await {
                Some(end) => return end,
                None => continue,
            },
            Event::Frame(frame) => {
                peer.touch(hub.now_ms());
                on_frame(hub, peer, &mut bucket, frame)
            }
        };
        match step {
            Step::Continue => {}
            Step::End(code, reason) => return (code, reason),
            Step::FlushAndClose(code, reason) => {
                write_queued(ws, peer).await;
                return (Some(code), reason);
            }
            Step::Request(text) => {
                // Events keep flowing to the client while its request waits (for the
                // store, or the assigning node of a cluster).
                // Boxed, with its text: an operator's request future is ~3 KiB, and held
                // inline it would make every socket's task that large while idle.
                let mut request = {
                    let handler = &mut *handler;
                    Box::pin(async move { handler.on_text(hub, peer, text.as_str()).await })
                };
                let flow = loop {
                    let woken = std::future::poll_fn(|cx| match request.as_mut().poll(cx) {
                        Poll::Ready(flow) => Poll::Ready(Some(flow)),
                        Poll::Pending => peer.poll_woken(cx).map(|()| None),
                    })
                    .await;
                    match woken {
                        Some(flow) => break flow,
                        None => {
                            if let Some(end) = flush(ws, peer).await {
                                return end;
                            }
                        }
                    }
                };
                if let Flow::Close(code, reason) = flow {
                    // Flush what the request queued (its ack) before closing.
                    write_queued(ws, peer).await;
                    return (Some(code), reason);
                }
            }
        }
    }
}

/// Answers what needs no request (errors, control frames); a text frame within the rate is
/// a request.
fn on_frame(
    hub: &Hub,
    peer: &Peer,
    bucket: &mut Bucket,
    frame: Option<Result<Message, WsError>>,
) -> Step {
    let limits = &hub.cfg.limits;
    match frame {
        None => Step::End(None, ""),
        Some(Ok(Message::Text(text))) if !bucket.take(Instant::now()) => {
            // Over `limits.rate`: answered, not run; the socket goes on.
            metrics::counter!("presence_hub_rate_limited_total", "kind" => peer.kind.label())
                .increment(1);
            let e = Error::RateLimited(format!(
                "over limits.rate ({} requests/s, burst {})",
                limits.rate, limits.rate_burst
            ));
            let _ = peer.send(&error_frame(request_ref(text.as_str()).as_deref(), &e));
            Step::Continue
        }
        Some(Ok(Message::Text(text))) => Step::Request(text),
        Some(Ok(Message::Binary(_))) => {
            let _ = peer.send(&error_frame(
                None,
                &Error::bad("binary frames are not supported; send JSON text frames"),
            ));
            Step::Continue
        }
        // Ping, pong (answered by tungstenite), close (the stream ends at `None`).
        Some(Ok(_)) => Step::Continue,
        Some(Err(WsError::Capacity(e))) => {
            tracing::info!(cause = %e, "frame too large");
            Step::End(Some(1009), "message too big")
        }
        Some(Err(WsError::Utf8(_))) => {
            let _ = peer.send(&error_frame(
                None,
                &Error::bad("text frame is not valid UTF-8"),
            ));
            // tokio-tungstenite ends the stream after any read error, so the connection
            // cannot go on (RFC 6455 fails it too): say why, close 1007.
            Step::FlushAndClose(1007, "invalid UTF-8")
        }
        Some(Err(WsError::Protocol(e))) => {
            // Unmasked or reserved-bit frames, unknown opcodes, a continuation without a
            // start, large or fragmented control frames (RFC 6455 5.1–5.5).
            tracing::info!(cause = %e, "websocket protocol error");
            Step::End(Some(1002), "protocol error")
        }
        Some(Err(e)) => {
            tracing::debug!(cause = %e, "socket error");
            Step::End(None, "")
        }
    }
}

/// Writes everything queued; `Some(end)` when the connection must end.
async fn flush(ws: &mut Socket, peer: &Peer) -> Option<(Option<u16>, &'static str)> {
    if let Some(code) = peer.closing() {
        return Some((Some(code), close_reason(code)));
    }
    if !write_queued(ws, peer).await {
        return Some(match peer.closing() {
            Some(code) => (Some(code), close_reason(code)),
            None => (None, ""),
        });
    }
    None
}

/// Writes what the socket did not take when the frames were pushed; false when the socket
/// failed or the hub asked to close meanwhile (a reader that does not read must not hold the
/// task in a write forever).
async fn write_queued(ws: &Socket, peer: &Peer) -> bool {
    let sock = ws.get_ref().socket();
    std::future::poll_fn(|cx| match peer.poll_flush(sock, cx) {
        std::task::Poll::Ready(r) => std::task::Poll::Ready(r.is_ok()),
        std::task::Poll::Pending => {
            // Frames queued meanwhile are written by this same flush.
            while peer.poll_woken(cx).is_ready() {
                if peer.closing().is_some() {
                    return std::task::Poll::Ready(false);
                }
            }
            std::task::Poll::Pending
        }
    })
    .await
}

fn close_reason(code: u16) -> &'static str {
    match code {
        1000 => "logout",
        1001 => "server shutting down",
        1008 => "policy violation",
        1002 => "protocol error",
        _ => "",
    }
}

/// Time the close frame gets to reach a client that stopped reading (its socket buffers
/// full) and the client's answer to come back; then the TCP connection is dropped.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(2);

/// Sends a close frame (ahead of anything still in the hub's queue, which is not written)
/// and waits briefly for the client's answer.
async fn close(ws: &mut Socket, code: u16, reason: &str) {
    // Boxed: it runs once per socket, and its timer held inline would be part of every
    // socket's task for its whole life.
    Box::pin(close_now(ws, code, reason)).await
}

async fn close_now(ws: &mut Socket, code: u16, reason: &str) {
    // Nothing queued is written after the hub decided to close (a frame begun is finished).
    ws.get_ref().peer().discard_unsent();
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    };
    let _ = tokio::time::timeout(CLOSE_DEADLINE, async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widget_sockets_get_the_small_read_buffer() {
        let widget = ws_config_for(Kind::Widget, 65536);
        assert_eq!(widget.read_buffer_size, WIDGET_READ_BUFFER);
        assert_eq!(widget.max_message_size, Some(65536));
        for kind in [Kind::Operator(1), Kind::Visitor(1)] {
            let c = ws_config_for(kind, 4096);
            assert_eq!(c.read_buffer_size, READ_BUFFER, "{kind:?}");
            assert_eq!(c.write_buffer_size, WRITE_BUFFER);
            assert_eq!(c.max_frame_size, Some(4096));
        }
    }
}

/// The remote address of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

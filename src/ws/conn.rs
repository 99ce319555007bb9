//! The socket as tungstenite sees it: reads go to the TCP stream (after the bytes hyper read
//! past the upgrade request), writes (its pongs, the close frame) go through the peer's queue,
//! so they take their turn with the frames the broadcaster writes itself.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::peer::Peer;

/// A WebSocket connection's transport, shared with its [`Peer`] (which writes to `sock`).
pub struct Conn {
    sock: Arc<TcpStream>,
    peer: Arc<Peer>,
    /// Client bytes read by hyper along with the upgrade request.
    early: Bytes,
}

impl Conn {
    pub fn new(sock: Arc<TcpStream>, peer: Arc<Peer>, early: Bytes) -> Conn {
        // Copied: hyper's slice would keep its whole read buffer (KiBs) alive for the
        // connection's life, empty or not.
        let early = if early.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&early)
        };
        Conn { sock, peer, early }
    }

    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early[..n]);
            this.early.advance(n);
            if this.early.is_empty() {
                this.early = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.sock.poll_read_ready(cx))?;
            let dst = buf.initialize_unfilled();
            match this.sock.try_read(dst) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was cleared: the next poll registers the waker.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Taken whole (tungstenite hands over whole frames): what the socket does not take
        // now waits in the queue, written by `poll_flush`.
        Poll::Ready(self.peer.push_raw(buf).map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.peer.poll_flush(&self.sock, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The descriptor is closed when the connection ends (dropped by task and peer).
        self.peer.poll_flush(&self.sock, cx)
    }
}

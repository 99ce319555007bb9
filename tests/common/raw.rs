//! A raw WebSocket client over a plain `TcpStream`: it writes frames byte for byte (also
//! frames no library would send: unmasked, reserved bits, unknown opcodes) and reads the
//! hub's frames only when told to, so that a test can be a peer that stopped reading.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

pub struct RawWs {
    pub tcp: TcpStream,
    /// Bytes read past the last whole frame.
    buf: Vec<u8>,
}

/// A frame from the hub.
#[derive(Debug)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// One client frame: `first` is the FIN/RSV/opcode byte, the payload is masked when `masked`.
pub fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

impl RawWs {
    /// Upgrades `path` on a fresh TCP connection; panics unless the hub answers 101.
    pub async fn connect(addr: SocketAddr, path: &str) -> RawWs {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(WAIT, tcp.read(&mut byte))
                .await
                .expect("an upgrade answer in time")
                .unwrap();
            assert_eq!(
                n,
                1,
                "closed during the upgrade: {}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        RawWs {
            tcp,
            buf: Vec::new(),
        }
    }

    /// Writes bytes as they are.
    pub async fn write(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }

    /// A masked text frame, as a well-behaved client sends it.
    pub async fn send_text(&mut self, text: &str) {
        self.write(&frame(0x81, text.as_bytes(), true)).await;
    }

    /// The next frame from the hub; None when the connection ended first.
    pub async fn next_frame(&mut self, within: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(f) = self.parse() {
                return Some(f);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk))
                .await
                .expect("a frame or the end in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next text frame's JSON, skipping pings.
    pub async fn next_json(&mut self) -> serde_json::Value {
        loop {
            let f = self.next_frame(WAIT).await.expect("a frame");
            match f.opcode {
                1 => return serde_json::from_slice(&f.payload).unwrap(),
                9 | 10 => continue,
                _ => panic!("expected a text frame, got {f:?}"),
            }
        }
    }

    /// Reads every frame up to the hub's close frame and the end of the connection; returns
    /// the close frame (None when the connection ended without one) and the frames before it.
    pub async fn read_to_close(&mut self, within: Duration) -> (Option<Frame>, usize) {
        let mut before = 0;
        loop {
            match self.next_frame(within).await {
                None => return (None, before),
                Some(f) if f.opcode == 8 => {
                    // The end of the TCP connection follows the close frame.
                    let end = self.next_frame(within).await;
                    assert!(end.is_none(), "frames after the close frame: {end:?}");
                    return (Some(f), before);
                }
                Some(_) => before += 1,
            }
        }
    }

    fn parse(&mut self) -> Option<Frame> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        assert_eq!(b[1] & 0x80, 0, "the hub never masks its frames");
        let (len, mut at) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if b.len() < at + len {
            return None;
        }
        let f = Frame {
            fin: b[0] & 0x80 != 0,
            opcode: b[0] & 0x0f,
            payload: b[at..at + len].to_vec(),
        };
        at += len;
        self.buf.drain(..at);
        Some(f)
    }
}

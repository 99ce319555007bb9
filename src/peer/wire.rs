//! Server frames on the wire, written by whoever delivers them. A frame the hub sends is
//! final and unmasked, so its header is two to ten bytes in front of bytes that exist already
//! (shared by every recipient): the broadcaster writes header and payload to the socket in one
//! call (a small frame copied into one buffer for `send`, a large one as two slices), without
//! tungstenite or a task wake-up (`Peer::push`). Only what the socket does not take at once is
//! queued for the connection's task.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd};

use super::Out;

/// The non-blocking write of a socket (tokio's `TcpStream`; a fake in tests).
pub trait TryWrite {
    /// Writes what the socket takes now; `WouldBlock` when it takes nothing.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// [`TryWrite::try_write_vectored`] of one buffer.
    fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
        self.try_write_vectored(&[IoSlice::new(buf)])
    }
}

impl TryWrite for tokio::net::TcpStream {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // `sendmsg`, not tokio's `writev`: the socket's own call skips the file layer
        // (`vfs_writev`), a tenth of the kernel's work per frame in a broadcast.
        self.try_io(tokio::io::Interest::WRITABLE, || {
            Direct(self.as_fd()).try_write_vectored(bufs)
        })
    }

    fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
        self.try_io(tokio::io::Interest::WRITABLE, || {
            Direct(self.as_fd()).try_send(buf)
        })
    }
}

/// The broadcaster's write: the system call alone, without tokio's readiness. A broadcast
/// touches thousands of sockets once each, and reading each one's readiness (a cache miss
/// per socket) was a third of the hub's own work in it. Safe to skip: a write that would
/// block queues the frame for the socket's task, whose writes go through the readiness
/// ([`TryWrite`] of `TcpStream`) and register for the next writable edge.
pub struct Direct<'a>(pub BorrowedFd<'a>);

impl TryWrite for Direct<'_> {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        socket2::SockRef::from(&self.0).send_vectored_with_flags(bufs, NOSIGNAL)
    }

    fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
        socket2::SockRef::from(&self.0).send_with_flags(buf, NOSIGNAL)
    }
}

/// A write to a socket the client reset fails with `EPIPE` instead of raising `SIGPIPE`
/// (which the Rust runtime ignores, but a library cannot count on that).
const NOSIGNAL: libc::c_int = libc::MSG_NOSIGNAL;

/// Opcodes of the frames the hub writes itself (RFC 6455 5.2), FIN bit set.
const TEXT: u8 = 0x81;
const PING: u8 = 0x89;

/// Frames up to this size on the wire are copied into one buffer and written with `send`:
/// in the kernel, `sendmsg` of two slices costs more than the copy (perf of a broadcast).
const SMALL: usize = 512;

/// Frames queued at most in one vectored write (two slices each, well under `IOV_MAX`).
const MAX_FRAMES: usize = 32;

/// A frame's header: bytes and length.
#[derive(Clone, Copy)]
struct Header([u8; 10], usize);

impl Header {
    fn new(first: u8, len: usize) -> Header {
        let mut h = [0u8; 10];
        h[0] = first;
        let n = if len < 126 {
            h[1] = len as u8;
            2
        } else if let Ok(short) = u16::try_from(len) {
            h[1] = 126;
            h[2..4].copy_from_slice(&short.to_be_bytes());
            4
        } else {
            h[1] = 127;
            h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Header(h, n)
    }

    /// The header `out` is written with and its payload (`Raw` is framed already).
    fn of(out: &Out) -> (Header, &[u8]) {
        match out {
            Out::Text(t) => (Header::new(TEXT, t.len()), t.as_bytes()),
            Out::Ping => (Header::new(PING, 0), &[]),
            Out::Raw(b) => (Header([0; 10], 0), b),
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.0[..self.1]
    }
}

/// Bytes `out` takes on the wire.
pub fn wire_len(out: &Out) -> usize {
    let (h, payload) = Header::of(out);
    h.1 + payload.len()
}

/// Writes `out` whole or in part; returns the bytes written (0 when the socket would block).
pub fn write_one(w: &impl TryWrite, out: &Out) -> io::Result<usize> {
    let (h, payload) = Header::of(out);
    let len = h.1 + payload.len();
    if len <= SMALL {
        let mut buf = [0u8; SMALL];
        buf[..h.1].copy_from_slice(h.bytes());
        buf[h.1..len].copy_from_slice(payload);
        return written(w.try_send(&buf[..len]));
    }
    let bufs = [IoSlice::new(h.bytes()), IoSlice::new(payload)];
    written(w.try_write_vectored(&bufs))
}

/// Writes from the front of `frames` (`head` bytes of the first written already) as much as
/// the socket takes, several frames per call. Written frames are popped and their payload
/// taken off `bytes`. `Ok(true)`: all written; `Ok(false)`: the socket would block.
pub fn write_front(
    w: &impl TryWrite,
    frames: &mut VecDeque<Out>,
    head: &mut usize,
    bytes: &mut usize,
) -> io::Result<bool> {
    while !frames.is_empty() {
        let n = frames.len().min(MAX_FRAMES);
        let mut headers = [Header([0; 10], 0); MAX_FRAMES];
        for (h, out) in headers.iter_mut().zip(frames.iter()) {
            *h = Header::of(out).0;
        }
        let mut bufs = [IoSlice::new(&[]); 2 * MAX_FRAMES];
        let mut used = 0;
        let mut skip = *head;
        for (i, out) in frames.iter().take(n).enumerate() {
            let h = headers[i].bytes();
            let payload = Header::of(out).1;
            let (h, payload) = if skip < h.len() {
                (&h[skip..], payload)
            } else {
                (&h[h.len()..], &payload[skip - h.len()..])
            };
            skip = 0;
            for part in [h, payload] {
                if !part.is_empty() {
                    bufs[used] = IoSlice::new(part);
                    used += 1;
                }
            }
        }
        let mut done = written(w.try_write_vectored(&bufs[..used]))?;
        if done == 0 {
            return Ok(false);
        }
        while done > 0 {
            let Some(front) = frames.front() else { break };
            let left = wire_len(front) - *head;
            if done < left {
                *head += done;
                break;
            }
            done -= left;
            *head = 0;
            if let Some(out) = frames.pop_front() {
                *bytes = bytes.saturating_sub(out.bytes());
            }
        }
    }
    Ok(true)
}

/// True when `frames` (whole server frames, as tungstenite writes them: unmasked) hold a
/// close frame. Bytes that do not parse as frames hold none.
pub fn has_close(mut frames: &[u8]) -> bool {
    while frames.len() >= 2 {
        if frames[0] & 0x0f == 0x8 {
            return true;
        }
        let (len, at): (usize, usize) = match frames[1] & 0x7f {
            126 if frames.len() >= 4 => (u16::from_be_bytes([frames[2], frames[3]]) as usize, 4),
            127 if frames.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&frames[2..10]);
                (u64::from_be_bytes(n) as usize, 10)
            }
            126 | 127 => return false,
            n => (n as usize, 2),
        };
        let Some(rest) = frames.get(at.saturating_add(len)..) else {
            return false;
        };
        frames = rest;
    }
    false
}

/// `WouldBlock` as 0 bytes; 0 bytes taken of a non-empty write as the error it is.
fn written(r: io::Result<usize>) -> io::Result<usize> {
    match r {
        Ok(0) => Err(io::ErrorKind::WriteZero.into()),
        Ok(n) => Ok(n),
        // A full socket, or a signal came first: nothing written, tried again later.
        Err(e) if blocked(&e) => Ok(0),
        Err(e) => Err(e),
    }
}

fn blocked(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A socket that takes `room` bytes, then would block.
    struct Fake {
        wire: RefCell<Vec<u8>>,
        room: RefCell<usize>,
    }

    impl Fake {
        fn new(room: usize) -> Fake {
            Fake {
                wire: RefCell::new(Vec::new()),
                room: RefCell::new(room),
            }
        }
    }

    impl TryWrite for Fake {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut room = self.room.borrow_mut();
            if *room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(*room);
                self.wire.borrow_mut().extend_from_slice(&b[..take]);
                *room -= take;
                n += take;
            }
            Ok(n)
        }
    }

    /// What tungstenite makes of the bytes, as a client reads them.
    fn read_frames(wire: &[u8]) -> Vec<tokio_tungstenite::tungstenite::Message> {
        use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};
        let mut ws = WebSocket::from_raw_socket(io::Cursor::new(wire.to_vec()), Role::Client, None);
        let mut out = Vec::new();
        while let Ok(m) = ws.read() {
            out.push(m);
        }
        out
    }

    #[test]
    fn frames_of_every_length_class_are_read_back_by_tungstenite() {
        for len in [0, 1, 125, 126, 127, 507, 508, 509, 65535, 65536, 70000] {
            let text = "x".repeat(len);
            let w = Fake::new(usize::MAX);
            let out = Out::Text(text.clone().into());
            assert_eq!(write_one(&w, &out).unwrap(), wire_len(&out));
            let got = read_frames(&w.wire.borrow());
            assert_eq!(got.len(), 1, "len {len}");
            assert_eq!(got[0].to_text().unwrap(), text, "len {len}");
        }
    }

    #[test]
    fn partly_written_queue_resumes_mid_frame_in_order() {
        let mut frames: VecDeque<Out> = (0..40)
            .map(|i| Out::Text(format!("frame {i} {}", "y".repeat(i * 7)).into()))
            .collect();
        frames.push_back(Out::Ping);
        let total: usize = frames.iter().map(|f| f.bytes()).sum();
        let mut bytes = total;
        let mut head = 0;
        let w = Fake::new(0);
        // The socket takes 13 bytes at a time: frames end and start mid-write.
        let mut rounds = 0;
        loop {
            *w.room.borrow_mut() = 13;
            if write_front(&w, &mut frames, &mut head, &mut bytes).unwrap() {
                break;
            }
            rounds += 1;
            assert!(rounds < 10_000, "no progress");
        }
        assert!(frames.is_empty());
        assert_eq!((head, bytes), (0, 0));
        let got = read_frames(&w.wire.borrow());
        assert_eq!(got.len(), 41);
        for (i, m) in got.iter().take(40).enumerate() {
            assert_eq!(
                m.to_text().unwrap(),
                format!("frame {i} {}", "y".repeat(i * 7))
            );
        }
        assert!(got[40].is_ping());
    }

    /// A frame as tungstenite's server side writes it.
    fn server_frame(msg: tokio_tungstenite::tungstenite::Message) -> Vec<u8> {
        use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};
        let mut ws = WebSocket::from_raw_socket(io::Cursor::new(Vec::new()), Role::Server, None);
        ws.send(msg).unwrap();
        ws.get_ref().get_ref().clone()
    }

    #[test]
    fn has_close_finds_a_close_frame_behind_others() {
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        let close = server_frame(Message::Close(Some(CloseFrame {
            code: 1000.into(),
            reason: "logout".into(),
        })));
        let pong = server_frame(Message::Pong(vec![7; 125].into()));
        let long_pong = [pong.clone(), pong.clone()].concat();
        assert!(has_close(&close));
        assert!(has_close(&[long_pong.clone(), close.clone()].concat()));
        assert!(!has_close(&long_pong));
        assert!(!has_close(&server_frame(Message::Text(
            "x".repeat(300).into()
        ))));
        // A frame cut short, and nothing at all, hold no close frame.
        assert!(!has_close(&pong[..pong.len() - 1]));
        assert!(!has_close(&[]));
    }

    #[test]
    fn a_socket_that_takes_nothing_keeps_the_queue() {
        let mut frames: VecDeque<Out> = VecDeque::from([Out::Text("a".into())]);
        let (mut head, mut bytes) = (0, 1);
        let w = Fake::new(0);
        assert!(!write_front(&w, &mut frames, &mut head, &mut bytes).unwrap());
        assert_eq!((frames.len(), head, bytes), (1, 0, 1));
        assert_eq!(write_one(&w, &frames[0]).unwrap(), 0);
    }
}

//! One live socket as the rest of the hub sees it: its writing end, an outbound queue bounded
//! in frames and in bytes, a close request, and the liveness clocks the sweeper reads. Small on
//! purpose: there is one per connection, and an idle connection must cost a few KiB at most.
//!
//! Whoever delivers a frame writes it: when nothing is queued, [`Peer::push`] writes the frame
//! to the socket at once (`try_write`, see [`wire`]), so a reader that keeps up costs one
//! system call per frame and no task wake-up. Only what the socket does not take now is
//! queued, and the connection's task is woken to write it when the socket is writable. Every
//! write, the task's own included, happens under the queue's lock: the bytes of two frames
//! never interleave.

pub mod broadcast;
pub mod wire;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use parking_lot::Mutex;

use tokio::net::TcpStream;

use crate::presence::ConnId;
use crate::protocol::Frame;

/// Who is on the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Operator(u64),
    Widget,
    Visitor(u64),
}

impl Kind {
    pub fn label(&self) -> &'static str {
        match self {
            Kind::Operator(_) => "operator",
            Kind::Widget => "widget",
            Kind::Visitor(_) => "visitor",
        }
    }
}

/// What the connection task writes next.
#[derive(Debug, Clone)]
pub enum Out {
    Text(Frame),
    Ping,
    /// A frame tungstenite made (a pong, the close frame), written in its turn.
    Raw(bytes::Bytes),
}

/// A burst (one change reaching many chats or departments) may queue this many times
/// `outbound_queue` at once; past that the reader is closed at once. Memory stays bounded
/// either way, and a healthy reader gets the time of one sweep to catch up.
pub const BURST: usize = 8;

impl Out {
    /// Bytes this entry holds for the queue's byte bound (a ping holds none of its own).
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Out::Text(f) => f.len(),
            Out::Ping => 0,
            Out::Raw(b) => b.len(),
        }
    }
}

/// Returned by [`Peer::push`] when the queue is full: the peer is being closed with 1008.
#[derive(Debug, PartialEq, Eq)]
pub struct SlowConsumer;

/// The socket's writing end and the frames waiting for it.
#[derive(Default)]
struct Queue {
    frames: VecDeque<Out>,
    /// Payload bytes in `frames`.
    bytes: usize,
    /// Bytes of the first frame written already: a frame begun is finished before any other
    /// (a close frame included), or the stream would be corrupt.
    head: usize,
    /// Set once the socket is upgraded, taken when its task ends (the descriptor is not kept
    /// open by someone still holding the peer).
    /// Kept with its descriptor, read once at attach: the broadcaster's write needs nothing
    /// else of the socket, and reading it through the `Arc` was a cache miss per delivery.
    sock: Option<(Arc<TcpStream>, RawFd)>,
    /// A write failed: the connection is over, frames go nowhere.
    failed: bool,
    /// A close frame is queued or written: nothing follows it on the wire (RFC 6455 5.5.1),
    /// whoever wrote it (the hub closing, or tungstenite answering the client's close).
    sealed: bool,
}

impl Queue {
    /// Lets go of every queued frame but one begun.
    fn discard(&mut self) {
        let keep = if self.head > 0 {
            self.frames.pop_front()
        } else {
            None
        };
        self.frames = VecDeque::new();
        self.bytes = 0;
        if let Some(front) = keep {
            self.bytes = front.bytes();
            self.frames.push_back(front);
        }
    }

    /// Writes what the socket takes; `Ok(true)` once nothing is left.
    fn write(&mut self) -> io::Result<bool> {
        let Some((sock, _)) = &self.sock else {
            return Ok(self.frames.is_empty());
        };
        let r = wire::write_front(&**sock, &mut self.frames, &mut self.head, &mut self.bytes);
        if let Err(_) | Ok(true) = r {
            if r.is_err() {
                self.failed = true;
            }
            // An idle socket keeps no queue allocation.
            self.frames = VecDeque::new();
        }
        r
    }
}

pub struct Peer {
    pub id: ConnId,
    pub kind: Kind,
    queue: Mutex<Queue>,
    capacity: usize,
    /// Bytes the queue may hold (`limits.outbound_bytes`): past it the peer is closed at
    /// once. Frames are shared among queues, so this bounds what one reader keeps alive.
    max_bytes: usize,
    /// Wakes the connection task (its only waiter): frames queued or a close requested.
    /// A flag and a waker instead of a `Notify`: no wait list to join on every loop turn.
    wake: AtomicWaker,
    woke: AtomicBool,
    /// Close code requested by the hub; 0 = none.
    close: AtomicU16,
    /// The queue was above `outbound_queue` at the last sweep.
    over: AtomicBool,
    /// Milliseconds (hub clock) of the last frame received: dead-connection detection.
    pub last_seen: AtomicU64,
    /// Milliseconds (hub clock) of the last `activity` message: server-side inactivity.
    pub last_activity: AtomicU64,
}

impl Peer {
    pub fn new(id: ConnId, kind: Kind, capacity: usize, now_ms: u64) -> Peer {
        Peer {
            id,
            kind,
            queue: Mutex::new(Queue::default()),
            capacity,
            max_bytes: usize::MAX,
            wake: AtomicWaker::new(),
            woke: AtomicBool::new(false),
            close: AtomicU16::new(0),
            over: AtomicBool::new(false),
            last_seen: AtomicU64::new(now_ms),
            last_activity: AtomicU64::new(now_ms),
        }
    }

    /// Bounds the queue in bytes too (`limits.outbound_bytes`).
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Peer {
        self.max_bytes = max_bytes;
        self
    }

    /// Queues a frame. A full queue (in frames or in bytes) means the reader cannot keep up:
    /// the peer is closed with 1008 rather than buffered without bound.
    pub fn push(&self, out: Out) -> Result<(), SlowConsumer> {
        if self.closing().is_some() {
            // Being closed already (and counted as a slow consumer once, if it is one):
            // the frame goes nowhere.
            return Ok(());
        }
        let mut q = self.queue.lock();
        if q.failed || q.sealed {
            return Ok(());
        }
        if q.frames.is_empty()
            && self.kind == Kind::Widget
            && let Some((_, fd)) = q.sock
        {
            // SAFETY: `fd` is the descriptor of the stream beside it, which stays open while
            // the queue holds it, and the queue's lock is held for the whole write.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            // Nothing ahead of it: written now, from the delivering thread. Widgets only:
            // they get one frame per change, in broadcasts of thousands, where a wake-up per
            // socket is the cost. Operators and visitors get bursts (an assignment round is
            // dozens of frames to one dashboard): queued, their task writes them together
            // (one vectored write instead of a system call per frame).
            match wire::write_one(&wire::Direct(fd), &out) {
                Ok(n) if n == wire::wire_len(&out) => return Ok(()),
                Ok(n) => q.head = n,
                Err(_) => {
                    // The task sees the socket fail on its next turn.
                    q.failed = true;
                    drop(q);
                    self.notify();
                    return Ok(());
                }
            }
        }
        let bytes = out.bytes();
        // A frame fits while the backlog is under the bound, however large the frame (an
        // `open_chat` ack with a long history): the queue holds at most the bound plus one
        // frame, and the frame exists already (shared with other queues).
        let over_bytes = q.bytes >= self.max_bytes;
        if q.frames.len() >= self.capacity * BURST || over_bytes {
            drop(q);
            self.slow_consumer();
            return Err(SlowConsumer);
        }
        q.frames.push_back(out);
        q.bytes += bytes;
        drop(q);
        self.notify();
        Ok(())
    }

    /// Closes with 1008 and lets go of every queued frame at once: nothing queued will be
    /// written (the close frame goes first), and a frame shared with other queues is freed
    /// as soon as the last of them drops it.
    fn slow_consumer(&self) {
        self.request_close(1008);
        self.queue.lock().discard();
    }

    /// Lets go of every queued frame but one begun (the hub closes: the close frame goes
    /// next).
    pub fn discard_unsent(&self) {
        self.queue.lock().discard();
    }

    /// The upgraded socket: from now on frames are written to it.
    pub fn attach(&self, sock: Arc<TcpStream>) {
        let fd = sock.as_raw_fd();
        self.queue.lock().sock = Some((sock, fd));
    }

    /// The connection is over: frames go nowhere and the socket is let go.
    pub fn detach(&self) {
        let mut q = self.queue.lock();
        q.failed = true;
        q.sock = None;
        q.discard();
        q.frames = VecDeque::new();
    }

    /// Writes a frame made by tungstenite (a pong, the close frame), behind what is queued,
    /// even while closing. Bounded by the queue's byte bound like any frame, but the close
    /// frame (at most 127 bytes, once: the queue is sealed after it): it is what tells the
    /// client why, also behind a large frame left half-written.
    pub fn push_raw(&self, frame: &[u8]) -> io::Result<()> {
        let close = wire::has_close(frame);
        let mut q = self.queue.lock();
        if q.failed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if q.bytes >= self.max_bytes && !close {
            // A client sending pings without reading the pongs.
            drop(q);
            self.slow_consumer();
            return Ok(());
        }
        if q.sealed {
            // tungstenite writes nothing after its close frame; nothing is lost here.
            return Ok(());
        }
        q.sealed = close;
        q.bytes += frame.len();
        q.frames
            .push_back(Out::Raw(bytes::Bytes::copy_from_slice(frame)));
        q.write().map(|_| ())
    }

    /// Writes what is queued (the connection's task, woken by [`Peer::push`]): ready once
    /// nothing is left, pending until `sock` is writable again.
    pub fn poll_flush(&self, sock: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            {
                let mut q = self.queue.lock();
                if q.failed {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                }
                if q.write()? {
                    return Poll::Ready(Ok(()));
                }
            }
            // Registered after the write that would block: a wake-up between is not lost
            // (tokio keeps the readiness until a write sees `WouldBlock` again).
            std::task::ready!(sock.poll_write_ready(cx))?;
        }
    }

    /// Frames waiting to be written.
    pub fn queued(&self) -> usize {
        self.queue.lock().frames.len()
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.queue.lock().bytes
    }

    /// Called by the sweeper on each tick: a queue still above `outbound_queue` on two
    /// ticks in a row belongs to a reader that cannot keep up; it is closed with 1008.
    pub fn check_backlog(&self) -> Result<(), SlowConsumer> {
        let over = self.queued() > self.capacity;
        if over && self.over.swap(true, Ordering::AcqRel) && self.closing().is_none() {
            self.slow_consumer();
            return Err(SlowConsumer);
        }
        if !over {
            self.over.store(false, Ordering::Release);
        }
        Ok(())
    }

    pub fn send(&self, frame: &Frame) -> Result<(), SlowConsumer> {
        self.push(Out::Text(frame.clone()))
    }

    /// The queued text frames, taken (tests of the queue without a socket).
    #[cfg(test)]
    pub(crate) fn take_queued_texts(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.drain(&mut out);
        out.into_iter()
            .filter_map(|o| match o {
                Out::Text(t) => Some(t.as_str().to_string()),
                _ => None,
            })
            .collect()
    }

    /// Takes every queued frame, in order (tests of the queue without a socket).
    #[cfg(test)]
    fn drain(&self, into: &mut Vec<Out>) {
        let frames = {
            let mut q = self.queue.lock();
            q.bytes = 0;
            std::mem::take(&mut q.frames)
        };
        into.extend(frames);
    }

    /// Asks the connection task to close with `code` (first request wins).
    pub fn request_close(&self, code: u16) {
        let _ = self
            .close
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.notify();
    }

    pub fn closing(&self) -> Option<u16> {
        match self.close.load(Ordering::Acquire) {
            0 => None,
            c => Some(c),
        }
    }

    /// Resolves when frames were queued or a close was requested since the last call.
    pub fn woken(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| self.poll_woken(cx))
    }

    /// [`Peer::woken`] as a poll: ready when woken since the last ready, else the task of
    /// `cx` is registered to be woken.
    pub fn poll_woken(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.woke.swap(false, Ordering::AcqRel) {
            return std::task::Poll::Ready(());
        }
        self.wake.register(cx.waker());
        // A wake between the check and the registration must not be lost.
        if self.woke.swap(false, Ordering::AcqRel) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    fn notify(&self) {
        if !self.woke.swap(true, Ordering::AcqRel) {
            self.wake.wake();
        }
    }

    pub fn touch(&self, now_ms: u64) {
        self.last_seen.store(now_ms, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_consumer_is_closed_with_1008_past_the_burst_bound() {
        let p = Peer::new(1, Kind::Widget, 2, 0);
        for i in 0..2 * BURST {
            assert!(p.send(&format!("{i}").into()).is_ok(), "a burst fits");
        }
        assert_eq!(p.send(&"x".into()), Err(SlowConsumer));
        assert_eq!(p.closing(), Some(1008));
        assert!(
            p.send(&"d".into()).is_ok(),
            "a slow consumer is reported once"
        );
        let mut out = Vec::new();
        p.drain(&mut out);
        assert!(
            out.is_empty(),
            "the queue is let go: the close frame goes first"
        );
    }

    #[test]
    fn slow_consumer_is_closed_when_backlog_stays_over_two_sweeps() {
        let p = Peer::new(1, Kind::Widget, 2, 0);
        for _ in 0..3 {
            p.send(&"a".into()).unwrap();
        }
        assert!(
            p.check_backlog().is_ok(),
            "first sweep: a burst may still drain"
        );
        assert_eq!(
            p.check_backlog(),
            Err(SlowConsumer),
            "second sweep: still behind"
        );
        assert_eq!(p.closing(), Some(1008));
    }

    #[test]
    fn backlog_that_drains_between_sweeps_is_fine() {
        let p = Peer::new(1, Kind::Widget, 2, 0);
        for _ in 0..3 {
            p.send(&"a".into()).unwrap();
        }
        assert!(p.check_backlog().is_ok());
        p.drain(&mut Vec::new());
        assert!(p.check_backlog().is_ok());
        for _ in 0..3 {
            p.send(&"a".into()).unwrap();
        }
        assert!(
            p.check_backlog().is_ok(),
            "over again, but not on two sweeps in a row"
        );
        assert_eq!(p.closing(), None);
    }

    #[test]
    fn slow_consumer_outbound_bytes_bound_closes_with_1008_and_frees_the_queue() {
        let p = Peer::new(1, Kind::Widget, 1024, 0).with_max_bytes(10);
        let big: Frame = "0123456789".into();
        assert!(p.send(&big).is_ok(), "exactly the bound fits");
        assert_eq!(p.queued_bytes(), 10);
        assert_eq!(
            p.send(&"x".into()),
            Err(SlowConsumer),
            "one byte more does not"
        );
        assert_eq!(p.closing(), Some(1008));
        assert_eq!(p.queued(), 0, "queued frames are let go at once");
        assert_eq!(p.queued_bytes(), 0);
    }

    #[test]
    fn slow_consumer_shared_frame_is_freed_when_the_last_queue_drops_it() {
        let frame: Frame = "x".repeat(100).into();
        let a = Peer::new(1, Kind::Widget, 1024, 0).with_max_bytes(100);
        let b = Peer::new(2, Kind::Widget, 1024, 0).with_max_bytes(100);
        a.send(&frame).unwrap();
        b.send(&frame).unwrap();
        let weak = frame.clone();
        drop(frame);
        // Both queues overflow: each lets go of its share.
        assert!(a.send(&weak).is_err());
        assert!(b.send(&weak).is_err());
        assert_eq!(a.queued() + b.queued(), 0);
        // `weak` is now the only handle: the bytes are owned by it alone.
        let bytes: bytes::Bytes = weak.into();
        assert!(bytes.is_unique(), "no queue still holds the frame");
    }

    #[test]
    fn slow_consumer_bytes_bound_lets_one_large_frame_in_under_the_bound() {
        let p = Peer::new(1, Kind::Widget, 1024, 0).with_max_bytes(10);
        assert!(p.send(&"a".into()).is_ok());
        assert!(
            p.send(&"x".repeat(50).into()).is_ok(),
            "a large frame behind a small one"
        );
        assert_eq!(
            p.send(&"y".into()),
            Err(SlowConsumer),
            "nothing fits behind it"
        );
    }

    #[test]
    fn drain_resets_the_byte_count() {
        let p = Peer::new(1, Kind::Widget, 1024, 0).with_max_bytes(10);
        p.send(&"12345".into()).unwrap();
        p.drain(&mut Vec::new());
        assert_eq!(p.queued_bytes(), 0);
        p.send(&"1234567890".into()).unwrap();
        assert_eq!(p.closing(), None);
    }

    #[test]
    fn close_frame_is_the_last_thing_queued() {
        let p = Peer::new(1, Kind::Widget, 16, 0);
        p.send(&"before".into()).unwrap();
        // A close frame as tungstenite writes it (code 1000), behind a pong.
        p.push_raw(&[0x8a, 0x01, 0x07, 0x88, 0x02, 0x03, 0xe8])
            .unwrap();
        p.send(&"after".into()).unwrap();
        p.push(Out::Ping).unwrap();
        p.push_raw(&[0x8a, 0x00]).unwrap();
        assert_eq!(p.queued(), 2, "the frame before and the close frame");
        assert_eq!(p.take_queued_texts(), ["before"]);
    }

    #[test]
    fn close_frame_is_queued_past_the_byte_bound_a_pong_is_not() {
        let p = Peer::new(1, Kind::Widget, 16, 0).with_max_bytes(8);
        // Below the bound when it came, so queued however large: the queue is now past it.
        p.send(&"x".repeat(100).as_str().into()).unwrap();
        p.push_raw(&[0x8a, 0x00]).unwrap();
        assert_eq!(
            p.closing(),
            Some(1008),
            "a pong past the bound: slow consumer"
        );
        let p = Peer::new(2, Kind::Widget, 16, 0).with_max_bytes(8);
        p.send(&"x".repeat(100).as_str().into()).unwrap();
        p.push_raw(&[0x88, 0x02, 0x03, 0xe8]).unwrap();
        assert_eq!(p.queued(), 2, "the close frame is queued behind it");
        assert_eq!(p.closing(), None);
    }

    #[test]
    fn first_close_request_wins() {
        let p = Peer::new(1, Kind::Widget, 2, 0);
        p.request_close(1001);
        p.request_close(1008);
        assert_eq!(p.closing(), Some(1001));
    }
}

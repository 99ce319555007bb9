//! Writing a change's frames to their sockets. Each frame is written by the delivering thread
//! itself (`Peer::push`: a system call when nothing is queued for the socket), one thread for a
//! whole change, so a socket's frames stay in their order and a change is all written before
//! the next.

use std::sync::Arc;

use crate::peer::{Out, Peer};
use crate::protocol::Frame;

/// At most this many frames of a change without writes are written under the core's lock
/// (in order, at once); more go through the release task, off the lock.
pub const INLINE_MAX: usize = 64;

/// Writes the frames on this thread.
pub fn deliver(frames: Vec<(Arc<Peer>, Frame)>) {
    let (mut sent, mut dropped) = (0, 0);
    for (peer, frame) in frames {
        match peer.push(Out::Text(frame)) {
            Ok(()) => sent += 1,
            Err(_) => dropped += 1,
        }
    }
    crate::metrics::events(sent, dropped);
}

/// [`deliver`] for the release task, which takes an async deliverer (its tests give their
/// own). One thread writes the whole change: splitting a change of thousands of sockets over
/// the two worker threads cost 5–10 % more CPU per delivery (context switches, the shared
/// frames' counters on two cores) and did not lower the fan-out's p99 (docs/benchmarks.md,
/// "Final runs of 2026-12-01 night").
pub async fn deliver_later(frames: Vec<(Arc<Peer>, Frame)>) {
    deliver(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::Kind;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deliver_later_queues_every_frame_in_order() {
        let peers: Vec<Arc<Peer>> = (0..50)
            .map(|id| Arc::new(Peer::new(id, Kind::Widget, 1024, 0)))
            .collect();
        let frames: Vec<(Arc<Peer>, Frame)> = (0..2048)
            .map(|k| (peers[k % 50].clone(), format!("{k}").into()))
            .collect();
        deliver_later(frames).await;
        for p in &peers {
            let got: Vec<usize> = p
                .take_queued_texts()
                .iter()
                .map(|f| f.parse().unwrap())
                .collect();
            let want: Vec<usize> = (0..2048).filter(|k| k % 50 == p.id as usize).collect();
            assert_eq!(got, want, "peer {}", p.id);
        }
    }
}

//! Writing a change's frames to their sockets. Each frame is written by the delivering thread
//! itself (`Peer::push`: a system call when nothing is queued for the socket), so a change
//! that reaches thousands of sockets is split over the runtime's worker threads, by socket:
//! the frames of one socket stay in one part, in their order, and the parts of a change are all
//! written before the next change's.

use std::sync::Arc;

use crate::peer::{Out, Peer};
use crate::protocol::Frame;

/// Below this many frames a change is written by one thread: a few system calls cost less
/// than handing work to another thread.
pub const SPLIT_AT: usize = 1024;

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

/// Writes the frames, over every worker thread when there are many; done when all are
/// written or queued.
pub async fn deliver_spread(frames: Vec<(Arc<Peer>, Frame)>) {
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    if frames.len() < SPLIT_AT || workers < 2 {
        return deliver(frames);
    }
    let mut parts = split(frames, workers);
    let mine = parts.pop().unwrap_or_default();
    let others: Vec<_> = parts
        .into_iter()
        .map(|part| tokio::spawn(async move { deliver(part) }))
        .collect();
    deliver(mine);
    for task in others {
        // A part that panicked has lost its frames; the next change goes on regardless.
        let _ = task.await;
    }
}

/// Parts by socket: every frame of a socket lands in the same part, in order.
fn split(frames: Vec<(Arc<Peer>, Frame)>, n: usize) -> Vec<Vec<(Arc<Peer>, Frame)>> {
    let mut parts: Vec<Vec<_>> = (0..n)
        .map(|_| Vec::with_capacity(frames.len() / n + 1))
        .collect();
    for (peer, frame) in frames {
        let i = (peer.id % n as u64) as usize;
        parts[i].push((peer, frame));
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::Kind;

    #[test]
    fn split_keeps_every_socket_in_one_part_in_order() {
        let peers: Vec<Arc<Peer>> = (0..7)
            .map(|id| Arc::new(Peer::new(id, Kind::Widget, 16, 0)))
            .collect();
        let frames: Vec<(Arc<Peer>, Frame)> = (0..70)
            .map(|k| (peers[k % 7].clone(), format!("{k}").into()))
            .collect();
        let parts = split(frames, 3);
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 70);
        for p in &peers {
            let holding: Vec<_> = parts
                .iter()
                .filter(|part| part.iter().any(|(q, _)| q.id == p.id))
                .collect();
            assert_eq!(holding.len(), 1, "peer {} in one part", p.id);
            let mine: Vec<u64> = holding[0]
                .iter()
                .filter(|(q, _)| q.id == p.id)
                .map(|(_, f)| f.as_str().parse().unwrap())
                .collect();
            let want: Vec<u64> = (0..10).map(|i| i * 7 + p.id).collect();
            assert_eq!(mine, want);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deliver_spread_queues_every_frame_in_order() {
        let peers: Vec<Arc<Peer>> = (0..50)
            .map(|id| Arc::new(Peer::new(id, Kind::Widget, 1024, 0)))
            .collect();
        let frames: Vec<(Arc<Peer>, Frame)> = (0..2 * SPLIT_AT)
            .map(|k| (peers[k % 50].clone(), format!("{k}").into()))
            .collect();
        deliver_spread(frames).await;
        for p in &peers {
            let got: Vec<usize> = p
                .take_queued_texts()
                .iter()
                .map(|f| f.parse().unwrap())
                .collect();
            let want: Vec<usize> = (0..2 * SPLIT_AT)
                .filter(|k| k % 50 == p.id as usize)
                .collect();
            assert_eq!(got, want, "peer {}", p.id);
        }
    }
}

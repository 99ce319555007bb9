//! Showing each change once its writes are durable, and answering its caller. A change's
//! frames go out in two lanes: the interactive sockets (operators, visitors: the caller's own
//! among them) first, then the change is answered, and the widgets' frames (the broadcast
//! audience, thousands per department) are written by a lane of their own. The answer waits
//! for the store and a few frames, not for ten thousand writes.
//!
//! Order stays what it was: a socket is in one lane only (by its kind), each lane writes its
//! changes in the order of changes, and a lane's frames of a change are all written or
//! queued before its next change's. A change is "held" until both lanes are done with it, so
//! a later change shown at once under the core's lock (`Hub::finish`) cannot overtake it.
//!
//! The lanes part only while the widget lane keeps up: once [`WIDGET_BACKLOG`] changes wait
//! for it, the release task waits too, and with it the answers and interactive frames of
//! later changes (back-pressure instead of unbounded memory).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::peer::{Kind, Peer};
use crate::protocol::Frame;
use crate::store::{self, StoreError, Ticket};

/// Changes whose widget frames may wait for the widget lane (each holds one entry per
/// socket it reaches).
pub const WIDGET_BACKLOG: usize = 16;

/// Frames of one change, each with its socket.
pub type Frames = Vec<(Arc<Peer>, Frame)>;

/// The frames of a change, held until its writes are durable.
pub struct Release {
    pub ticket: Ticket,
    pub frames: Frames,
    pub done: oneshot::Sender<Result<(), StoreError>>,
    /// The rebuild the change was made on ([`Divergence::epoch`]).
    pub epoch: u64,
}

/// Whether the state in memory went apart from the store's (a write failed) and which
/// rebuild it is, in one atomic word (epoch × 2 + diverged). A failure the release task
/// reaches late (its change waited behind the widget lane) can only mark the state it was
/// made on: one rebuilt since stays good, so a late failure never leaves the hub refusing
/// everything with nothing left to rebuild it.
#[derive(Debug, Default)]
pub struct Divergence(AtomicU64);

impl Divergence {
    /// The current rebuild: changes made now are of this epoch.
    pub fn epoch(&self) -> u64 {
        self.0.load(Ordering::Acquire) >> 1
    }

    /// True from a failed write until the state is rebuilt.
    pub fn diverged(&self) -> bool {
        self.0.load(Ordering::Acquire) & 1 == 1
    }

    /// A write of a change made on `epoch` failed: that state is diverged (no-op if it was
    /// rebuilt since).
    pub fn fail(&self, epoch: u64) {
        let _ = self.0.compare_exchange(
            epoch << 1,
            (epoch << 1) | 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The store signalled a failure: the current state is diverged.
    pub fn mark(&self) {
        self.0.fetch_or(1, Ordering::AcqRel);
    }

    /// The state was rebuilt from the store: a new epoch, not diverged. Called under the
    /// core's lock, so no change is made between the rebuild and this.
    pub fn rebuilt(&self) {
        let next = self.epoch() + 1;
        self.0.store(next << 1, Ordering::Release);
    }
}

/// The frames for the sockets that wait on an answer (written before it) and the widgets'
/// (written after it), each in the order given.
pub fn by_lane(frames: Frames) -> (Frames, Frames) {
    frames
        .into_iter()
        .partition(|(peer, _)| peer.kind != Kind::Widget)
}

/// The release task: waits for each change's writes in order, writes its interactive frames
/// with `deliver`, answers, and hands the widgets' frames to the widget lane (`deliver` too).
/// `held` counts changes not yet through both lanes; a failed write marks the state it was
/// made on diverged (nothing made on that state is shown: the rebuild shows everyone the
/// state after).
pub async fn run<D, F>(
    mut rx: mpsc::UnboundedReceiver<Release>,
    held: Arc<AtomicUsize>,
    divergence: Arc<Divergence>,
    deliver: D,
) where
    D: Fn(Frames) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (widgets_tx, widgets_rx) = mpsc::channel(WIDGET_BACKLOG);
    tokio::spawn(widget_lane(widgets_rx, held.clone(), deliver.clone()));
    while let Some(r) = rx.recv().await {
        let result = store::durable(r.ticket).await;
        // A change without writes queued behind a failed one, or one made on a state rebuilt
        // since, was made on the failed state: shown to nobody (the rebuild sends everyone
        // the state after).
        if result.is_ok() && r.epoch == divergence.epoch() && !divergence.diverged() {
            let (now, later) = by_lane(r.frames);
            if !now.is_empty() {
                deliver(now).await;
            }
            let _ = r.done.send(result);
            if later.is_empty() {
                held.fetch_sub(1, Ordering::AcqRel);
            } else if let Err(lost) = widgets_tx.send(later).await {
                // The lane ended (the runtime shuts down): the frames go nowhere.
                drop(lost);
                held.fetch_sub(1, Ordering::AcqRel);
            }
            continue;
        }
        if result.is_err() {
            // Before `held` can reach 0: no change made on the failed state is shown.
            divergence.fail(r.epoch);
        }
        held.fetch_sub(1, Ordering::AcqRel);
        let _ = r.done.send(result);
    }
}

/// Writes the widgets' frames of each change in the order of changes; a change stops being
/// held once they are written or queued.
async fn widget_lane<D, F>(mut rx: mpsc::Receiver<Frames>, held: Arc<AtomicUsize>, deliver: D)
where
    D: Fn(Frames) -> F,
    F: Future<Output = ()>,
{
    while let Some(frames) = rx.recv().await {
        deliver(frames).await;
        held.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::watch;

    const WAIT: Duration = Duration::from_secs(5);

    /// A change already durable, its answer, and the hub's count of held changes.
    fn change(frames: Frames) -> (Release, oneshot::Receiver<Result<(), StoreError>>) {
        let (done, answer) = oneshot::channel();
        let release = Release {
            ticket: store::done(),
            frames,
            done,
            epoch: 0,
        };
        (release, answer)
    }

    type Answer = oneshot::Receiver<Result<(), StoreError>>;

    /// A change whose writes resolve with what is sent on the sender (its failure): the
    /// release, its answer, the sender.
    fn failing(frames: Frames) -> (Release, Answer, oneshot::Sender<Result<(), StoreError>>) {
        let (fail, ticket) = oneshot::channel();
        let (done, answer) = oneshot::channel();
        let release = Release {
            ticket,
            frames,
            done,
            epoch: 0,
        };
        (release, answer, fail)
    }

    fn texts(p: &Peer) -> Vec<String> {
        p.take_queued_texts()
    }

    #[tokio::test]
    async fn fanout_ack_does_not_wait_for_the_widgets_frames() {
        let op = Arc::new(Peer::new(1, Kind::Operator(7), 1024, 0));
        let widgets: Vec<Arc<Peer>> = (2..12)
            .map(|id| Arc::new(Peer::new(id, Kind::Widget, 1024, 0)))
            .collect();
        // Widget frames are written only once the gate opens: a lane as slow as you like.
        let (gate_tx, gate) = watch::channel(false);
        let deliver = move |frames: Frames| {
            let mut gate = gate.clone();
            async move {
                if frames.iter().any(|(p, _)| p.kind == Kind::Widget) {
                    let _ = gate.wait_for(|open| *open).await;
                }
                crate::peer::broadcast::deliver(frames);
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let held = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run(rx, held.clone(), Arc::default(), deliver));
        let mut answers = Vec::new();
        for k in 0..2 {
            let mut frames: Frames = vec![(op.clone(), format!("op {k}").into())];
            frames.extend(widgets.iter().map(|w| (w.clone(), format!("w {k}").into())));
            let (r, answer) = change(frames);
            held.fetch_add(1, Ordering::AcqRel);
            tx.send(r).unwrap();
            answers.push(answer);
        }
        for a in answers {
            let r = tokio::time::timeout(WAIT, a)
                .await
                .expect("answered while the widgets' frames are still unwritten");
            assert!(r.unwrap().is_ok());
        }
        // The caller's own socket had its frames before the answer; no widget has any yet,
        // and both changes are still held (a change shown at once must queue behind them).
        assert_eq!(texts(&op), ["op 0", "op 1"]);
        assert!(widgets.iter().all(|w| w.queued() == 0));
        assert_eq!(held.load(Ordering::Acquire), 2);
        gate_tx.send(true).unwrap();
        tokio::time::timeout(WAIT, async {
            while held.load(Ordering::Acquire) > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the widget lane finishes");
        for w in &widgets {
            assert_eq!(texts(w), ["w 0", "w 1"], "every change, in order");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fanout_widget_lane_backlog_is_bounded_answers_wait_past_it() {
        let w = Arc::new(Peer::new(1, Kind::Widget, 1024, 0));
        let (gate_tx, gate) = watch::channel(false);
        let deliver = move |frames: Frames| {
            let mut gate = gate.clone();
            async move {
                assert!(frames.iter().all(|(p, _)| p.kind == Kind::Widget));
                let _ = gate.wait_for(|open| *open).await;
                crate::peer::broadcast::deliver(frames);
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let held = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run(rx, held.clone(), Arc::default(), deliver));
        let n = WIDGET_BACKLOG + 3;
        let mut answers = Vec::new();
        for k in 0..n {
            let (r, answer) = change(vec![(w.clone(), format!("{k}").into())]);
            held.fetch_add(1, Ordering::AcqRel);
            tx.send(r).unwrap();
            answers.push(answer);
        }
        // One change in the lane's hands, WIDGET_BACKLOG waiting, one answered and waiting
        // to be handed over; the last is not answered while the lane is stuck (time is
        // paused: the timeout fires only once every task waits).
        let last = answers.pop().unwrap();
        for a in answers {
            assert!(a.await.unwrap().is_ok());
        }
        let mut last = Box::pin(last);
        assert!(
            tokio::time::timeout(Duration::from_secs(60), &mut last)
                .await
                .is_err(),
            "answered past the backlog"
        );
        assert_eq!(w.queued(), 0);
        gate_tx.send(true).unwrap();
        assert!(last.await.unwrap().is_ok());
        tokio::time::timeout(WAIT, async {
            while held.load(Ordering::Acquire) > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the widget lane finishes");
        let want: Vec<String> = (0..n).map(|k| k.to_string()).collect();
        assert_eq!(texts(&w), want);
    }

    #[tokio::test]
    async fn fanout_nothing_of_a_failed_change_is_shown_and_it_answers_the_failure() {
        let w = Arc::new(Peer::new(1, Kind::Widget, 1024, 0));
        let (tx, rx) = mpsc::unbounded_channel();
        let held = Arc::new(AtomicUsize::new(0));
        let divergence: Arc<Divergence> = Arc::default();
        tokio::spawn(run(rx, held.clone(), divergence.clone(), |f| async move {
            crate::peer::broadcast::deliver(f)
        }));
        let (failed, answer, fail) = failing(vec![(w.clone(), "failed".into())]);
        fail.send(Err(StoreError::Closed)).unwrap();
        held.fetch_add(2, Ordering::AcqRel);
        tx.send(failed).unwrap();
        // A change without writes queued behind it was made on the failed state.
        let (after, after_answer) = change(vec![(w.clone(), "after".into())]);
        tx.send(after).unwrap();
        assert!(answer.await.unwrap().is_err());
        assert!(after_answer.await.unwrap().is_ok());
        assert!(divergence.diverged());
        assert_eq!(held.load(Ordering::Acquire), 0);
        assert!(texts(&w).is_empty());
    }

    /// The state was rebuilt (after the store signalled a failure) before the release task
    /// reached the failed change, as when it waited behind the widget lane: the late failure
    /// does not mark the rebuilt state diverged (the hub would refuse everything for good),
    /// a change made on the old state is still shown to nobody, one made after is shown.
    #[tokio::test]
    async fn fanout_a_failure_reached_after_the_rebuild_leaves_the_rebuilt_state_good() {
        let w = Arc::new(Peer::new(1, Kind::Widget, 1024, 0));
        let (tx, rx) = mpsc::unbounded_channel();
        let held = Arc::new(AtomicUsize::new(0));
        let divergence: Arc<Divergence> = Arc::default();
        // The failed change's ticket resolves only once the rebuild is done.
        let (failed, answer, fail) = failing(vec![(w.clone(), "failed".into())]);
        held.fetch_add(3, Ordering::AcqRel);
        tx.send(failed).unwrap();
        let (old, old_answer) = change(vec![(w.clone(), "old".into())]);
        tx.send(old).unwrap();
        divergence.mark();
        divergence.rebuilt();
        let (mut new, new_answer) = change(vec![(w.clone(), "new".into())]);
        new.epoch = divergence.epoch();
        tx.send(new).unwrap();
        tokio::spawn(run(rx, held.clone(), divergence.clone(), |f| async move {
            crate::peer::broadcast::deliver(f)
        }));
        fail.send(Err(StoreError::Closed)).unwrap();
        assert!(answer.await.unwrap().is_err());
        assert!(old_answer.await.unwrap().is_ok());
        assert!(new_answer.await.unwrap().is_ok());
        assert!(!divergence.diverged(), "the rebuilt state stays good");
        let deadline = tokio::time::Instant::now() + WAIT;
        while held.load(Ordering::Acquire) != 0 {
            assert!(tokio::time::Instant::now() < deadline, "still held");
            tokio::task::yield_now().await;
        }
        assert_eq!(texts(&w), ["new"]);
    }

    #[test]
    fn fanout_lanes_keep_the_order_of_each_kind() {
        let peers = [
            Arc::new(Peer::new(1, Kind::Widget, 16, 0)),
            Arc::new(Peer::new(2, Kind::Operator(1), 16, 0)),
            Arc::new(Peer::new(3, Kind::Visitor(1), 16, 0)),
        ];
        let frames: Frames = (0..9)
            .map(|k| (peers[k % 3].clone(), format!("{k}").into()))
            .collect();
        let (now, later) = by_lane(frames);
        let ids = |f: &Frames| {
            f.iter()
                .map(|(p, t)| (p.id, t.as_str().to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids(&now),
            [(2, "1"), (3, "2"), (2, "4"), (3, "5"), (2, "7"), (3, "8")]
                .map(|(i, t)| (i, t.to_string()))
        );
        assert_eq!(
            ids(&later),
            [(1, "0"), (1, "3"), (1, "6")].map(|(i, t)| (i, t.to_string()))
        );
    }
}

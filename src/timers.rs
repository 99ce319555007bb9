//! The timer wheel: every timer a change asks for (grace ends, accept deadlines, offline
//! owners, hours boundaries) waits in one [`DelayQueue`] driven by one task, instead of a task
//! per timer that nobody could cancel. A timer is keyed by what it is for ([`TimerKey`]):
//! arming a key again replaces the timer armed before, so at most one timer per operator,
//! chat and department waits, and memory stays bounded by what is live. Times are tokio's
//! [`Instant`], so tests drive the wheel with `tokio::time::pause()`.

use std::collections::HashMap;
use std::future::poll_fn;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};

use crate::core::Timer;

/// What a timer is for: one timer at most waits per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimerKey {
    GraceEnd(u64),
    AcceptDeadline(u64),
    OfflineOwners,
    HoursBoundary(u64),
}

impl Timer {
    /// The key a later timer for the same thing replaces this one under.
    pub fn key(&self) -> TimerKey {
        match *self {
            Timer::GraceEnd { operator, .. } => TimerKey::GraceEnd(operator),
            Timer::AcceptDeadline { chat, .. } => TimerKey::AcceptDeadline(chat),
            Timer::OfflineOwners { .. } => TimerKey::OfflineOwners,
            Timer::HoursBoundary { department, .. } => TimerKey::HoursBoundary(department),
        }
    }

    /// When the timer is due.
    pub fn at(&self) -> Instant {
        match *self {
            Timer::GraceEnd { at, .. }
            | Timer::AcceptDeadline { at, .. }
            | Timer::OfflineOwners { at }
            | Timer::HoursBoundary { at, .. } => at,
        }
    }
}

/// The armed timers, in deadline order, at most one per key.
#[derive(Default)]
pub struct Wheel {
    queue: DelayQueue<TimerKey>,
    armed: HashMap<TimerKey, (delay_queue::Key, Timer)>,
}

impl Wheel {
    /// Arms `t`, replacing the timer armed under the same key (its deadline moves).
    pub fn arm(&mut self, t: Timer) {
        match self.armed.get_mut(&t.key()) {
            Some((slot, armed)) => {
                self.queue.reset_at(slot, t.at());
                *armed = t;
            }
            None => {
                let slot = self.queue.insert_at(t.key(), t.at());
                self.armed.insert(t.key(), (slot, t));
            }
        }
    }

    /// Cancels the timer armed under `key`; true when there was one.
    pub fn cancel(&mut self, key: TimerKey) -> bool {
        match self.armed.remove(&key) {
            Some((slot, _)) => {
                self.queue.remove(&slot);
                true
            }
            None => false,
        }
    }

    /// Timers waiting.
    pub fn len(&self) -> usize {
        self.armed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.armed.is_empty()
    }

    /// Waits for the next timer that is due and takes it out; None when none is armed.
    pub async fn next_due(&mut self) -> Option<Timer> {
        let expired = poll_fn(|cx| self.queue.poll_expired(cx)).await?;
        self.armed.remove(expired.get_ref()).map(|(_, t)| t)
    }
}

/// The timer task: arms what comes in on `rx`, hands each due timer to `fire`, and ends on
/// shutdown or when every sender is gone (the hub was dropped).
pub async fn run(
    mut rx: mpsc::UnboundedReceiver<Timer>,
    shutdown: CancellationToken,
    mut fire: impl FnMut(Timer),
) {
    let mut wheel = Wheel::default();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            t = rx.recv() => match t {
                Some(t) => wheel.arm(t),
                None => return,
            },
            Some(t) = wheel.next_due(), if !wheel.is_empty() => fire(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn grace(operator: u64, at: Instant) -> Timer {
        Timer::GraceEnd { operator, at }
    }

    fn deadline(chat: u64, round: u64, at: Instant) -> Timer {
        Timer::AcceptDeadline { chat, round, at }
    }

    /// Takes every timer due by now without waiting (time is paused: nothing moves).
    async fn due(wheel: &mut Wheel) -> Vec<Timer> {
        let mut out = Vec::new();
        while !wheel.is_empty() {
            match tokio::time::timeout(Duration::ZERO, wheel.next_due()).await {
                Ok(Some(t)) => out.push(t),
                _ => break,
            }
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn timers_fire_in_deadline_order() {
        let t0 = Instant::now();
        let mut w = Wheel::default();
        w.arm(deadline(3, 1, t0 + Duration::from_millis(300)));
        w.arm(grace(1, t0 + Duration::from_millis(100)));
        w.arm(Timer::OfflineOwners {
            at: t0 + Duration::from_millis(200),
        });
        assert!(due(&mut w).await.is_empty(), "nothing is due at the start");
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(
            due(&mut w).await,
            vec![
                grace(1, t0 + Duration::from_millis(100)),
                Timer::OfflineOwners {
                    at: t0 + Duration::from_millis(200)
                },
            ]
        );
        assert_eq!(w.len(), 1);
        assert_eq!(
            w.next_due().await,
            Some(deadline(3, 1, t0 + Duration::from_millis(300)))
        );
        assert_eq!(Instant::now(), t0 + Duration::from_millis(300));
        assert!(w.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn timers_rearmed_key_replaces_the_earlier_timer() {
        let t0 = Instant::now();
        let mut w = Wheel::default();
        w.arm(deadline(7, 1, t0 + Duration::from_millis(100)));
        // The next round's deadline, later: the first one never fires.
        w.arm(deadline(7, 2, t0 + Duration::from_millis(500)));
        // Another chat's deadline is another key.
        w.arm(deadline(8, 1, t0 + Duration::from_millis(100)));
        assert_eq!(w.len(), 2);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(
            due(&mut w).await,
            vec![deadline(8, 1, t0 + Duration::from_millis(100))]
        );
        // Re-armed earlier: the deadline moves forward too.
        w.arm(deadline(7, 3, t0 + Duration::from_millis(250)));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(
            due(&mut w).await,
            vec![deadline(7, 3, t0 + Duration::from_millis(250))]
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(due(&mut w).await.is_empty() && w.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn timers_cancelled_never_fire() {
        let t0 = Instant::now();
        let mut w = Wheel::default();
        w.arm(grace(1, t0 + Duration::from_millis(100)));
        w.arm(grace(2, t0 + Duration::from_millis(100)));
        assert!(w.cancel(TimerKey::GraceEnd(1)));
        assert!(!w.cancel(TimerKey::GraceEnd(1)), "cancelled once");
        assert!(!w.cancel(TimerKey::HoursBoundary(1)), "never armed");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(
            due(&mut w).await,
            vec![grace(2, t0 + Duration::from_millis(100))]
        );
        // A key whose timer fired can be armed again.
        w.arm(grace(2, t0 + Duration::from_millis(300)));
        assert_eq!(
            w.next_due().await,
            Some(grace(2, t0 + Duration::from_millis(300)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn timers_past_due_fire_at_once() {
        let t0 = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut w = Wheel::default();
        w.arm(grace(1, t0));
        assert_eq!(due(&mut w).await, vec![grace(1, t0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn timers_task_fires_due_timers_and_stops_on_shutdown() {
        let t0 = Instant::now();
        let (tx, rx) = mpsc::unbounded_channel();
        let (fired_tx, mut fired) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(rx, shutdown.clone(), move |t| {
            let _ = fired_tx.send((t, Instant::now()));
        }));
        tx.send(grace(1, t0 + Duration::from_millis(100))).unwrap();
        tx.send(grace(1, t0 + Duration::from_millis(400))).unwrap();
        tx.send(deadline(5, 1, t0 + Duration::from_millis(200)))
            .unwrap();
        // Paused time jumps to each deadline as soon as every task waits.
        let (t, at) = fired.recv().await.unwrap();
        assert_eq!(t, deadline(5, 1, t0 + Duration::from_millis(200)));
        assert_eq!(at, t0 + Duration::from_millis(200));
        let (t, at) = fired.recv().await.unwrap();
        assert_eq!(t, grace(1, t0 + Duration::from_millis(400)), "re-armed");
        assert_eq!(at, t0 + Duration::from_millis(400));
        tx.send(grace(2, t0 + Duration::from_secs(10))).unwrap();
        tokio::task::yield_now().await;
        shutdown.cancel();
        task.await.unwrap();
        assert!(fired.recv().await.is_none(), "nothing fires after shutdown");
    }

    #[tokio::test(start_paused = true)]
    async fn timers_task_ends_when_the_hub_is_gone() {
        let (tx, rx) = mpsc::unbounded_channel::<Timer>();
        let task = tokio::spawn(run(rx, CancellationToken::new(), |_| {}));
        tx.send(grace(1, Instant::now() + Duration::from_secs(60)))
            .unwrap();
        drop(tx);
        task.await.unwrap();
    }
}

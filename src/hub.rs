//! The hub handle: a cheap clone around the shared state (mini-redis's `Db`). It owns the
//! lock around [`Core`], the concurrent map of live connections, the store, the timer task and
//! the sweeper that pings connections and closes dead ones.
//!
//! Every change goes one way: it runs on the core under the lock (checked, applied to
//! memory), its writes are queued to the store in the order of changes, and the frames it
//! makes are held ([`Release`]) until those writes are durable; only then are they written to
//! the sockets and the caller answered (after its own sockets' frames, not after every
//! widget's: [`release`]). A write that fails drops its frames and every later
//! change's until the hub has rebuilt its state from the store ([`Hub::heal`]): what clients
//! were shown, and what callers were told succeeded, is always in the store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::answer::ChatAnswer;
use crate::auth::{Secrets, Tokens};
use crate::command::{Change, EndSessions, Expire, MarkIdle, Socket, WatchChat};
use crate::config::Config;
use crate::core::{ChatOp, Core, Origin, Timer};
use crate::error::Result;
use crate::model::OperatorId;
use crate::peer::broadcast;
use crate::peer::{Kind, Out, Peer};
use crate::presence::ConnId;
use crate::store::{self, Store, StoreError, Ticket};
use std::sync::atomic::AtomicUsize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

mod release;

use release::Release;

/// What the hub needs of the cluster it joined (`cluster::Cluster` implements it), so that
/// the hub does not depend on the cluster module.
pub trait Membership: Send + Sync + 'static {
    /// Runs a chat change on the assigning node, whichever it is (this one included).
    fn forward(&self, op: ChatOp) -> futures::future::BoxFuture<'_, Result<ChatAnswer>>;
    /// Reloads the other nodes' state soon (after this node rebuilt its own).
    fn resync_soon(&self);
}

pub struct Shared {
    pub cfg: Arc<Config>,
    core: Mutex<Core>,
    /// Every live WebSocket of this node.
    pub peers: DashMap<ConnId, Arc<Peer>>,
    /// Open HTTP connections and widget sockets, for `limits.max_connections` and
    /// `limits.max_widget_connections`.
    pub limits: crate::limits::Limiter,
    store: Arc<dyn Store>,
    next_conn: AtomicU64,
    epoch: Instant,
    pub tokens: Tokens,
    pub api_key: String,
    /// Fired once on shutdown; every connection and background task watches it.
    pub shutdown: CancellationToken,
    /// Connection tasks, waited for on shutdown.
    pub tasks: TaskTracker,
    /// Cluster mode: forwards chat changes to the assigning node.
    cluster: OnceLock<Arc<dyn Membership>>,
    /// Tasks that leave the cluster cleanly after shutdown (lease release, last notes).
    leaving: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Held frames, in the order of their changes, for the release task.
    release: mpsc::UnboundedSender<Release>,
    /// Changes whose frames are held: while any is, later frames queue behind them.
    held: Arc<AtomicUsize>,
    /// A store write failed and the state is being rebuilt: changes are refused, and frames
    /// are shown to nobody. Set by the release task as soon as it sees a failure (before a
    /// later change could be shown), cleared by [`Hub::heal`].
    divergence: Arc<release::Divergence>,
    /// Cluster: until when (ms, [`Hub::now_ms`]) the assigner lease is surely still ours.
    lease_until: AtomicU64,
    /// Where timers go to the timer task (`crate::timers`).
    timers: mpsc::UnboundedSender<Timer>,
}

#[derive(Clone)]
pub struct Hub(Arc<Shared>);

impl std::ops::Deref for Hub {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl Hub {
    /// Loads the state from the store; always-online operators are online at once.
    pub fn open(cfg: Config, secrets: Secrets, store: Arc<dyn Store>) -> Result<Hub> {
        let cfg = Arc::new(cfg);
        let snapshot = store.load()?;
        let (release_tx, releases) = mpsc::unbounded_channel();
        // Subscribed before the boot writes: their failure, too, is seen.
        let failures = store.diverged();
        let core_cfg = cfg.clone();
        let mut core = Core::new(cfg.clone(), snapshot);
        let (writes, timers) = core.take_effects();
        if !writes.is_empty() {
            // Queued before any request can be served: ordered before every later change.
            drop(store.write(writes));
        }
        let (timers_tx, timers_rx) = mpsc::unbounded_channel();
        let hub = Hub(Arc::new(Shared {
            cfg,
            core: Mutex::new(core),
            peers: DashMap::new(),
            limits: crate::limits::Limiter::new(&core_cfg.limits),
            store,
            next_conn: AtomicU64::new(1),
            epoch: Instant::now(),
            tokens: Tokens::new(&secrets.jwt_secret),
            api_key: secrets.api_key,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            cluster: OnceLock::new(),
            leaving: Mutex::new(Vec::new()),
            release: release_tx,
            held: Arc::new(AtomicUsize::new(0)),
            divergence: Arc::default(),
            lease_until: AtomicU64::new(0),
            timers: timers_tx,
        }));
        // The task holds the hub weakly: dropping the hub ends it, like the shutdown does.
        let weak = Arc::downgrade(&hub.0);
        tokio::spawn(crate::timers::run(
            timers_rx,
            hub.shutdown.clone(),
            move |t| {
                if let Some(shared) = weak.upgrade() {
                    let _ = Hub(shared).apply_now(Expire::from(t));
                }
            },
        ));
        for t in timers {
            hub.schedule(t);
        }
        tokio::spawn(release::run(
            releases,
            hub.held.clone(),
            hub.divergence.clone(),
            broadcast::deliver_later,
        ));
        tokio::spawn(hub.clone().heal(failures));
        Ok(hub)
    }

    /// Runs a change under the lock; returns its result and the ticket of its writes,
    /// which resolves once they are durable and the change's frames are queued to sockets.
    fn run<R>(&self, f: impl FnOnce(&mut Core, Instant) -> R) -> (R, Ticket) {
        let mut core = self.core.lock();
        let now = Instant::now();
        if core.assigner && core.cluster && self.now_ms() > self.lease_until.load(Ordering::Acquire)
        {
            // The lease may have passed to another node (this process was paused or cut
            // off): stop deciding before anything else runs.
            tracing::warn!("assigner lease not renewed in time: this node stops assigning");
            core.stop_assigning();
        }
        let r = f(&mut core, now);
        let ticket = self.finish(&mut core);
        (r, ticket)
    }

    /// Performs the effects of the change just run, in order: writes to the store (the
    /// notes for other nodes among them: replicated only if the change is durable), frames
    /// held until they are durable, timers.
    fn finish(&self, core: &mut Core) -> Ticket {
        let (mut writes, timers) = core.take_effects();
        if self.cluster.get().is_some() {
            let node = &self.cfg.server.node_id;
            writes.extend(
                core.take_notes()
                    .into_iter()
                    .map(|n| crate::note::note_write(node, n)),
            );
        }
        let frames = core.take_outbox();
        let ticket = if self.divergence.diverged() {
            // Made on a state about to be replaced: shown to nobody.
            drop(frames);
            if writes.is_empty() {
                store::done()
            } else {
                self.store.write(writes)
            }
        } else if writes.is_empty()
            && self.held.load(Ordering::Acquire) == 0
            && frames.len() <= broadcast::INLINE_MAX
        {
            // Nothing to wait for: shown at once, under the lock (in order). Many frames
            // (system calls, `peer::broadcast`) go to the release task: not under the lock.
            broadcast::deliver(frames);
            store::done()
        } else {
            let ticket = if writes.is_empty() {
                store::done()
            } else {
                self.store.write(writes)
            };
            let (done, answer) = oneshot::channel();
            self.held.fetch_add(1, Ordering::AcqRel);
            let held = Release {
                ticket,
                frames,
                done,
                epoch: self.divergence.epoch(),
            };
            if let Err(e) = self.release.send(held) {
                self.held.fetch_sub(1, Ordering::AcqRel);
                let _ = e.0.done.send(Err(StoreError::Closed));
            }
            answer
        };
        for t in timers {
            self.schedule(t);
        }
        ticket
    }

    /// Runs a change and waits until it is durable: what a client is acknowledged. While
    /// the state is being rebuilt after a failed write, changes are refused at once.
    async fn commit<R>(&self, f: impl FnOnce(&mut Core, Instant) -> Result<R>) -> Result<R> {
        if self.divergence.diverged() {
            return Err(crate::error::Error::Unavailable(
                "store unavailable: reloading state after a failed write".into(),
            ));
        }
        let (r, ticket) = self.run(f);
        let r = r?;
        store::durable(ticket).await?;
        Ok(r)
    }

    /// Applies a command and waits until it is durable: its typed answer is what the
    /// client is acknowledged with. The one way for a change from a client.
    pub async fn apply<C: Change>(&self, command: C) -> Result<C::Answer> {
        self.commit(|core, now| command.apply(core, now)).await
    }

    /// Applies a command without waiting for it to be durable (socket events: the socket's
    /// task goes on; what the change shows is still held until durable). The ticket says
    /// when it is.
    pub fn apply_now<C: Change>(&self, command: C) -> (Result<C::Answer>, Ticket) {
        self.run(|core, now| command.apply(core, now))
    }

    /// Rebuilds the state from the store whenever a write failed: the failed change and
    /// everything applied after it are dropped from memory (the store refused them all), the
    /// live sockets stay and hear the state as it is now.
    async fn heal(self, mut failures: tokio::sync::watch::Receiver<u64>) {
        loop {
            tokio::select! {
                r = failures.changed() => if r.is_err() { return },
                _ = self.shutdown.cancelled() => return,
            }
            self.divergence.mark();
            tracing::warn!("a store write failed: rebuilding the state from the store");
            loop {
                if self.shutdown.is_cancelled() {
                    return;
                }
                // Not gated on `ready()`: the embedded store turns ready again only with a
                // successful commit, which needs the rebuild first. A store that cannot be
                // read yet fails the load, and the next round tries again. But a write whose
                // answer was lost must be settled first: it may still land.
                if !self.store.settling() {
                    let st = self.store.clone();
                    match tokio::task::spawn_blocking(move || st.load()).await {
                        Ok(Ok(snapshot)) => {
                            let mut core = self.core.lock();
                            core.rebuild(snapshot, Instant::now());
                            // Writes of the rebuilt state are taken again (they queue behind
                            // nothing: every older one was refused).
                            self.store.resume();
                            self.divergence.rebuilt();
                            self.finish(&mut core);
                            drop(core);
                            tracing::info!("state rebuilt from the store; changes taken again");
                            if let Some(c) = self.cluster.get() {
                                c.resync_soon();
                            }
                            break;
                        }
                        Ok(Err(e)) => tracing::warn!(cause = %e, "reloading from the store failed"),
                        Err(e) => tracing::warn!(cause = %e, "reloading from the store failed"),
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = self.shutdown.cancelled() => return,
                }
            }
            // A failure signalled while rebuilding (of an old write, or of a new one right
            // after `resume`) makes `changed()` fire again: at worst one rebuild too many,
            // never a failure left without one.
        }
    }

    /// Cluster: the assigner lease is ours until `until` (ms, [`Hub::now_ms`]).
    pub fn lease_until(&self, until: u64) {
        self.lease_until.store(until, Ordering::Release);
    }

    /// A read-only look at the state.
    pub fn read<R>(&self, f: impl FnOnce(&Core) -> R) -> R {
        f(&self.core.lock())
    }

    /// The store, for reads beyond live state (closed chats, the event feed).
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// The store takes writes and the state is not being rebuilt (`/readyz`).
    pub fn store_ready(&self) -> bool {
        self.store.ready() && !self.divergence.diverged()
    }

    /// Milliseconds since the hub started (the peers' liveness clock).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Registers a new socket in the connection map.
    pub fn new_peer(&self, kind: Kind) -> Arc<Peer> {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let peer = Arc::new(
            Peer::new(id, kind, self.cfg.limits.outbound_queue, self.now_ms())
                .with_max_bytes(self.cfg.limits.outbound_bytes),
        );
        self.peers.insert(id, peer.clone());
        peer
    }

    pub fn remove_peer(&self, id: ConnId) {
        if let Some((_, peer)) = self.peers.remove(&id)
            && peer.kind == Kind::Widget
        {
            self.limits.widget_closed();
        }
    }

    /// Arms a timer in the timer task; one armed before for the same thing is replaced.
    fn schedule(&self, t: Timer) {
        // Closed only when the timer task ended, at shutdown: nothing is due any more.
        let _ = self.timers.send(t);
    }

    /// Pings every connection each `ping_interval`, closes those silent for `pong_timeout`
    /// and marks operator connections idle after `inactivity_timeout`. One task for all
    /// connections instead of a timer in each keeps idle connections small.
    pub async fn sweep(self) {
        let p = &self.cfg.presence;
        let mut period = p.ping_interval.min(p.pong_timeout() / 2);
        if !p.inactivity_timeout.is_zero() {
            period = period.min(p.inactivity_timeout);
        }
        let period = (period / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
        let ping_every = p.ping_interval.as_millis() as u64;
        let dead_after = p.pong_timeout().as_millis() as u64;
        let idle_after = p.inactivity_timeout.as_millis() as u64;
        let mut last_ping = self.now_ms();
        let mut trim = crate::trim::Trim::default();
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let now = self.now_ms();
            let ping = now.saturating_sub(last_ping) >= ping_every;
            if ping {
                last_ping = now;
            }
            let mut idle = Vec::new();
            let mut dropped = 0;
            for entry in self.peers.iter() {
                let peer = entry.value();
                if now.saturating_sub(peer.last_seen.load(Ordering::Relaxed)) > dead_after {
                    tracing::info!(
                        conn = peer.id,
                        kind = peer.kind.label(),
                        "no pong in time: closing"
                    );
                    peer.request_close(1008);
                    continue;
                }
                if ping && peer.push(Out::Ping).is_err() {
                    dropped += 1;
                }
                if peer.check_backlog().is_err() {
                    dropped += 1;
                }
                if let Kind::Operator(op) = peer.kind
                    && idle_after > 0
                {
                    let last = peer.last_activity.load(Ordering::Relaxed);
                    if last != u64::MAX && now.saturating_sub(last) >= idle_after {
                        peer.last_activity.store(u64::MAX, Ordering::Relaxed);
                        idle.push((OperatorId(op), peer.id));
                    }
                }
            }
            crate::metrics::events(0, dropped);
            if trim.due(self.next_conn.load(Ordering::Relaxed), self.peers.len()) {
                crate::trim::release_free_heap();
            }
            if !idle.is_empty() {
                let _ = self.apply_now(MarkIdle { sockets: idle });
            }
        }
    }

    /// Enforces retention in the store: closed chats after `chats.retention`, events after
    /// `events.retention` or beyond `events.max_events`. Every node may run it: each round
    /// is idempotent.
    pub async fn clean(self) {
        let shortest = self
            .cfg
            .chats
            .retention
            .min(self.cfg.events.retention)
            .min(self.cfg.audit.retention);
        let period = (shortest / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let now = crate::feed::unix_ms();
            let before = |d: Duration| now.saturating_sub(d.as_millis() as u64);
            let r = store::Retention {
                chats_before_ms: before(self.cfg.chats.retention),
                events_before_ms: before(self.cfg.events.retention),
                max_events: self.cfg.events.max_events,
                audit_before_ms: before(self.cfg.audit.retention),
            };
            // Batches back to back while there is more: a busy hub's log and closed chats
            // are dropped as fast as they come, not a batch a minute.
            loop {
                match self.store.clean(r).await {
                    Ok(true) if !self.shutdown.is_cancelled() => tokio::task::yield_now().await,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(cause = %e, "retention clean-up failed; retrying next round");
                        break;
                    }
                }
            }
        }
    }

    /// The gauges of a metrics scrape: connections by kind, open HTTP connections, operators
    /// online.
    pub fn gauges(&self) -> crate::metrics::Gauges {
        let mut g = crate::metrics::Gauges::default();
        for p in self.peers.iter() {
            match p.kind {
                Kind::Operator(_) => g.operators += 1,
                Kind::Widget => g.widgets += 1,
                Kind::Visitor(_) => g.visitors += 1,
            }
        }
        g.http = self.limits.http_open();
        g.online = self.read(|c| c.online_operators());
        g
    }

    /// Joins the cluster: from now on changes are told to the other nodes.
    pub fn attach_cluster(&self, cluster: Arc<dyn Membership>) {
        let _ = self.cluster.set(cluster);
    }

    /// Runs a chat change: here when this node assigns (always when alone), else on the
    /// assigning node of the cluster. `watch`: the socket that opened or wrote in the chat
    /// watches it from now on.
    pub async fn chat(&self, op: ChatOp, watch: Option<(u64, &Arc<Peer>)>) -> Result<ChatAnswer> {
        let target = match &op {
            ChatOp::Create { .. } => None,
            ChatOp::HandOver { chat }
            | ChatOp::Close { chat, .. }
            | ChatOp::Open { chat, .. }
            | ChatOp::Message { chat, .. }
            | ChatOp::VisitorMessage { chat, .. } => Some(*chat),
        };
        let result = self.chat_here_or_there(op, watch).await;
        // A closed chat left live state; the store still knows it for a while.
        if let (Err(crate::error::Error::NotFound(_)), Some(id)) = (&result, target)
            && let Ok(Some(c)) = self.store.stored_chat(id).await
            && c.status == crate::model::ChatStatus::Closed
        {
            return Err(crate::error::Error::Conflict(format!(
                "chat {id} is closed"
            )));
        }
        result
    }

    async fn chat_here_or_there(
        &self,
        op: ChatOp,
        watch: Option<(u64, &Arc<Peer>)>,
    ) -> Result<ChatAnswer> {
        let chat = match &op {
            ChatOp::Open { chat, .. } | ChatOp::Message { chat, .. } => Some(*chat),
            _ => None,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(cluster) = self.cluster.get().filter(|_| !self.read(|c| c.assigner)) {
                let v = cluster.forward(op.clone()).await?;
                if let (Some((me, peer)), Some(chat)) = (watch, chat) {
                    let _ = self.apply_now(WatchChat {
                        operator: me.into(),
                        socket: Socket(peer.clone()),
                        chat,
                    });
                }
                return Ok(v);
            }
            // Checked again under the lock, with the change: `run` stops a node whose lease
            // was not renewed in time (a paused process waking up) before the change runs,
            // and a node that no longer assigns must not decide a chat: it forwards.
            let local = self
                .commit(|c, now| {
                    if c.cluster && !c.assigner {
                        return Ok(None);
                    }
                    let v = op.clone().apply(c, now)?;
                    if let (Some((me, peer)), Some(chat)) = (watch, chat) {
                        c.watch(me, peer, chat.0);
                    }
                    Ok(Some(v))
                })
                .await?;
            match local {
                Some(v) => return Ok(v),
                None if tokio::time::Instant::now() < deadline => continue,
                None => {
                    return Err(crate::error::Error::Unavailable(
                        "cluster: election under way".into(),
                    ));
                }
            }
        }
    }

    /// Where a message written through `conn` comes from.
    pub fn origin(&self, conn: ConnId) -> Origin {
        Origin {
            node: self.cfg.server.node_id.clone(),
            conn,
        }
    }

    /// A task to wait for at shutdown, after the store is closed.
    pub fn on_leave(&self, task: tokio::task::JoinHandle<()>) {
        self.leaving.lock().push(task);
    }

    /// Waits (bounded) for the tasks registered with [`Hub::on_leave`].
    pub async fn leave(&self) {
        let tasks: Vec<_> = std::mem::take(&mut *self.leaving.lock());
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
    }

    /// Makes every queued write durable and closes the store (ending the sessions a hub
    /// that runs alone ends at shutdown: [`EndSessions`]).
    pub fn close_store(&self) {
        let _ = self.apply_now(EndSessions);
        self.store.close();
    }
}

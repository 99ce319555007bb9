//! Faults for real: Redis killed with SIGKILL and started again on its append-only file, a
//! node paused with SIGSTOP past its lease, a node cut off from Redis by a TCP proxy. What
//! must hold through each: an acknowledged write is never lost, a refused one never appears
//! later, the nodes end up agreeing, and a chat never has two deciders.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::node::{NodeProcess, redis_node};
use common::proxy::Proxy;
use common::redis::RedisServer;
use common::{API_KEY, TestHub};
use parking_lot::Mutex;
use serde_json::{Value, json};

/// The outcome of every write a writer made: id → acknowledged (2xx) or refused (an error
/// status). Writes without an answer (timed out) are left out: they are neither.
#[derive(Default)]
struct Outcomes {
    acked: Vec<u64>,
    refused: Vec<u64>,
    /// When each acknowledged write was answered.
    acked_at: Vec<Instant>,
}

/// PUTs a new operator every `every` until `stop`, ids from `first` upwards.
fn writer(
    http: reqwest::Client,
    base: String,
    first: u64,
    every: Duration,
    out: Arc<Mutex<Outcomes>>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut id = first;
        let mut inflight = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            let (http, base, out) = (http.clone(), base.clone(), out.clone());
            let n = id;
            id += 1;
            // Each write on its own: one waiting for Redis does not hold back the rate.
            inflight.spawn(async move {
                let r = http
                    .put(format!("{base}/api/v1/operators/{n}"))
                    .bearer_auth(API_KEY)
                    .json(&json!({"name": format!("w{n}"), "departments": [1]}))
                    .timeout(Duration::from_secs(20))
                    .send()
                    .await;
                let Ok(r) = r else { return };
                let mut o = out.lock();
                if r.status().is_success() {
                    o.acked.push(n);
                    o.acked_at.push(Instant::now());
                } else {
                    o.refused.push(n);
                }
            });
        }
        while inflight.join_next().await.is_some() {}
    })
}

/// Which of `ids` exist, as the hub at `base` answers them.
async fn existing(http: &reqwest::Client, base: &str, ids: &[u64]) -> Vec<u64> {
    let (status, body) = get(http, base, "/api/v1/operators").await;
    assert_eq!(status, 200, "{body}");
    let have: std::collections::HashSet<u64> = body["operators"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|o| o["id"].as_u64())
        .collect();
    ids.iter().copied().filter(|id| have.contains(id)).collect()
}

async fn get(http: &reqwest::Client, base: &str, path: &str) -> (u16, Value) {
    let r = http
        .get(format!("{base}{path}"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Redis killed with SIGKILL and started again 1.5 s later (AOF) while writes run at
/// 20/s: writes succeed again within 1 s of Redis being back, every acknowledged write is
/// there, no refused write ever appears, also after the hub restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_killed_acknowledged_writes_kept_refused_never_appear() {
    let mut redis = RedisServer::start().await;
    let hub = redis_node(&redis, "a", |_| {}).await;
    let base = format!("http://{}", hub.addr);
    let out = Arc::new(Mutex::new(Outcomes::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let w = writer(
        hub.http.clone(),
        base.clone(),
        1000,
        Duration::from_millis(50),
        out.clone(),
        stop.clone(),
    );
    // Writes land before the fault.
    wait_for(|| out.lock().acked.len() >= 10, "writes before the fault").await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_back = out.lock().acked.len();
    redis.spawn().await;
    let back = Instant::now();
    wait_for(
        || out.lock().acked.len() > before_back + 5,
        "writes after Redis is back",
    )
    .await;
    stop.cancel();
    w.await.unwrap();
    let o = std::mem::take(&mut *out.lock());
    let first_after = o
        .acked_at
        .iter()
        .filter(|t| **t > back)
        .min()
        .copied()
        .expect("a write after Redis came back");
    let recovery = first_after - back;
    println!(
        "redis back → first acknowledged write: {recovery:?}; acknowledged {}, refused {}",
        o.acked.len(),
        o.refused.len()
    );
    assert!(
        recovery < Duration::from_secs(1),
        "writes succeed again within 1 s of Redis being back: {recovery:?}"
    );
    assert!(!o.refused.is_empty(), "the outage refused writes");
    let check = |hub_base: String, http: reqwest::Client| {
        let (acked, refused) = (o.acked.clone(), o.refused.clone());
        async move {
            let kept = existing(&http, &hub_base, &acked).await;
            assert_eq!(kept.len(), acked.len(), "every acknowledged write is kept");
            let risen = existing(&http, &hub_base, &refused).await;
            assert!(risen.is_empty(), "refused writes that appeared: {risen:?}");
        }
    };
    check(base.clone(), hub.http.clone()).await;
    // What Redis holds, read by a hub started afresh on it.
    let mut hub = hub;
    hub.stop().await;
    let again = redis_node(&redis, "a", |_| {}).await;
    check(format!("http://{}", again.addr), again.http.clone()).await;
}

/// Polls `cond` (every 10 ms, at most 15 s).
async fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

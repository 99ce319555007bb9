//! Faults for real: Redis killed with SIGKILL and started again on its append-only file, a
//! node paused with SIGSTOP past its lease, a node cut off from Redis by a TCP proxy. What
//! must hold through each: an acknowledged write is never lost, a refused one never appears
//! later, the nodes end up agreeing, and a chat never has two deciders.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::API_KEY;
use common::node::{NodeProcess, redis_node};
use common::proxy::Proxy;
use common::redis::RedisServer;
use common::remote::{ChatTraffic, Node, agree};
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

/// In the feed's order, a chat goes from one owner to another only through the queue (no
/// owner in between): two nodes deciding at once would hand it straight from one to the
/// other.
fn assert_one_decider(feed: &[Value]) {
    let mut owner: HashMap<u64, Option<u64>> = HashMap::new();
    for e in feed.iter().filter(|e| e["type"] == "chat") {
        let id = e["chat"]["id"].as_u64().unwrap();
        let now = e["chat"]["owner"].as_u64();
        let before = owner.insert(id, now).flatten();
        if let (Some(b), Some(n)) = (before, now) {
            assert_eq!(b, n, "chat {id} went from owner {b} straight to {n}: {e}");
        }
    }
}

/// Nobody owns more than `max` open chats.
fn assert_capacity(chats: &BTreeMap<u64, (String, Option<u64>)>, max: usize) {
    let mut load: HashMap<u64, usize> = HashMap::new();
    for (_, owner) in chats.values() {
        if let Some(o) = owner {
            *load.entry(*o).or_default() += 1;
        }
    }
    for (op, n) in load {
        assert!(n <= max, "operator {op} owns {n} chats, capacity {max}");
    }
}

const CLUSTER: &str =
    "[cluster]\nnode_lease = \"600ms\"\n[presence]\ndisconnect_grace = \"300ms\"\n";

/// The assigning node is paused (SIGSTOP) past its lease while accept deadlines run out,
/// then resumed: the other node took over and re-assigned; the paused one, whose timers
/// all fire at once on waking, decides nothing. Both agree on every owner, nobody is over
/// capacity, no chat was handed from owner to owner by two deciders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_paused_leader_decides_nothing_after_waking() {
    let redis = RedisServer::start().await;
    let pa = NodeProcess::start(&redis, "a", CLUSTER).await; // first: assigns
    let pb = NodeProcess::start(&redis, "b", CLUSTER).await;
    let (a, b) = (Node::of(&pa), Node::of(&pb));
    let (s, v) = a
        .put(
            "/api/v1/departments/1",
            json!({"accept_timeout": "1s", "max_chats": 2}),
        )
        .await;
    assert!(s == 200 || s == 201, "{s} {v}");
    for op in [1, 2] {
        let (s, v) = a
            .put(
                &format!("/api/v1/operators/{op}"),
                json!({"name": format!("op{op}"), "departments": [1]}),
            )
            .await;
        assert!(s == 200 || s == 201, "{s} {v}");
    }
    // Both operators on B, so that they stay online while A sleeps.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.get("/api/v1/operators/2").await.0 != 200 {
        assert!(Instant::now() < deadline, "operator 2 reaches node b");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _o1 = b.operator_socket(1).await;
    let _o2 = b.operator_socket(2).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, v) = a.get("/api/v1/operators?status=online").await;
        if v["operators"].as_array().is_some_and(|o| o.len() == 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A sees both operators online: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in 0..3 {
        let (s, v) = b
            .post(
                "/api/v1/chats",
                json!({"department": 1, "visitor": {"name": format!("v{n}")}}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    // Assigned by A, not accepted: their deadlines run on A's timers.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b
        .chats()
        .await
        .values()
        .filter(|(_, o)| o.is_some())
        .count()
        < 3
    {
        assert!(Instant::now() < deadline, "the chats are assigned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pa.pause();
    // Past the lease (600 ms) and the accept deadlines (1 s): B takes over and re-assigns.
    let paused = Instant::now();
    let before: BTreeMap<u64, Option<u64>> = b
        .chats()
        .await
        .into_iter()
        .map(|(id, (_, o))| (id, o))
        .collect();
    let deadline = paused + Duration::from_secs(8);
    loop {
        let now: BTreeMap<u64, Option<u64>> = b
            .chats()
            .await
            .into_iter()
            .map(|(id, (_, o))| (id, o))
            .collect();
        if now
            .iter()
            .any(|(id, o)| o.is_some() && before.get(id) != Some(o))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B re-assigns after the accept deadline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep_until((paused + Duration::from_millis(2500)).into()).await;
    pa.resume();
    // More chats, through the node that slept: they go to the assigner of now. Right after
    // waking, the node may be rebuilding (its fenced writes were refused): a 503 then, and
    // the chat must not exist.
    let mut acked = 0;
    for n in 3..5 {
        let (s, v) = a
            .post(
                "/api/v1/chats",
                json!({"department": 1, "visitor": {"name": format!("v{n}")}}),
            )
            .await;
        assert!(s == 201 || s == 503, "{s} {v}");
        acked += usize::from(s == 201);
    }
    let chats = agree(&a, &b).await;
    assert_eq!(chats.len(), 3 + acked, "acknowledged ⇔ there");
    assert_capacity(&chats, 2);
    let feed = b.feed().await;
    assert_one_decider(&feed);
    // One log: both nodes serve the same events in the same order. The log may still grow
    // between the two reads (states logged as the woken node settles), so the first read
    // is a prefix of the second.
    let later = a.feed().await;
    let ids = |f: &[Value]| f.iter().map(|e| e["id"].to_string()).collect::<Vec<_>>();
    assert!(
        later.len() >= feed.len(),
        "{} vs {}",
        later.len(),
        feed.len()
    );
    assert_eq!(ids(&later[..feed.len()]), ids(&feed), "one log");
}

/// The assigning node is cut off from Redis (a proxy that holds every byte, as a partition
/// does) past its lease; chats created on it meanwhile are refused. When the path is back
/// (the held bytes delivered late, as TCP retransmits them), nothing the cut-off node did
/// survives, and it rejoins: both nodes agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_partitioned_node_writes_nothing_that_survives_and_rejoins() {
    let redis = RedisServer::start().await;
    let proxy = Proxy::start(redis.addr()).await;
    let pa = NodeProcess::start_url(&proxy.url(), "a", CLUSTER).await; // assigns
    let pb = NodeProcess::start(&redis, "b", CLUSTER).await;
    let (a, b) = (Node::of(&pa), Node::of(&pb));
    let (s, v) = a
        .put("/api/v1/departments/1", json!({"max_chats": 5}))
        .await;
    assert!(s == 200 || s == 201, "{s} {v}");
    let (s, _) = a
        .put(
            "/api/v1/operators/1",
            json!({"name": "op1", "departments": [1]}),
        )
        .await;
    assert!(s == 200 || s == 201);
    let (s, v) = b
        .post(
            "/api/v1/chats",
            json!({"department": 1, "visitor": {"name": "before"}}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    proxy.cut();
    let cut = Instant::now();
    // Chats created on the cut-off node meanwhile, each answered whenever it is.
    let mut tries = tokio::task::JoinSet::new();
    for n in 0..4 {
        let base = a.base.clone();
        tries.spawn(async move {
            let node = Node {
                base,
                http: reqwest::Client::new(),
            };
            let name = format!("cut{n}");
            let (s, v) = node
                .call(
                    reqwest::Method::POST,
                    "/api/v1/chats",
                    Some(json!({"department": 1, "visitor": {"name": name}})),
                )
                .await;
            (name, s, v["chat"]["id"].as_u64())
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // B takes over once A's lease lapses, and serves chats.
    let deadline = cut + Duration::from_secs(10);
    loop {
        let (s, _) = b
            .post(
                "/api/v1/chats",
                json!({"department": 1, "visitor": {"name": "on b"}}),
            )
            .await;
        if s == 201 {
            break;
        }
        assert!(Instant::now() < deadline, "B takes over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past the writer's 2 s response timeout: the cut-off node's calls go unanswered and
    // are settled (RESOLVE) once the path is back, while the held calls arrive late.
    tokio::time::sleep_until((cut + Duration::from_millis(3000)).into()).await;
    proxy.heal();
    let mut outcomes = Vec::new();
    while let Some(r) = tries.join_next().await {
        outcomes.push(r.unwrap());
    }
    let chats = agree(&a, &b).await;
    let names: Vec<String> = {
        let (_, body) = b.get("/api/v1/chats?limit=1000").await;
        body["chats"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["visitor"]["name"].as_str().unwrap_or("").to_string())
            .collect()
    };
    // Acknowledged ⇔ there: what the cut-off node decided alone is refused and gone.
    let mut acked = 0;
    for (name, status, _) in &outcomes {
        let there = names.contains(name);
        assert_eq!(
            *status == 201,
            there,
            "{name}: answered {status}, in the store: {there} ({names:?})"
        );
        acked += usize::from(*status == 201);
    }
    println!("chats tried on the cut-off node: {outcomes:?}; kept {acked}");
    assert_eq!(chats.len(), 2 + acked, "{names:?}");
    // A rejoined: a change made on B reaches it.
    let (s, _) = b
        .put(
            "/api/v1/operators/7",
            json!({"name": "after", "departments": [1]}),
        )
        .await;
    assert!(s == 200 || s == 201);
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.get("/api/v1/operators/7").await.0 != 200 {
        assert!(Instant::now() < deadline, "A hears B's changes again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A follower cut off from Redis (its connections dropped, new ones held) while the other
/// node changes an operator, deletes another, closes a chat and opens one: once the path is
/// back it holds the same state, the deletion included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_cut_off_follower_catches_up_deletion_included() {
    let redis = RedisServer::start().await;
    let proxy = Proxy::start(redis.addr()).await;
    let pa = NodeProcess::start(&redis, "a", CLUSTER).await; // assigns
    let pb = NodeProcess::start_url(&proxy.url(), "b", CLUSTER).await;
    let (a, b) = (Node::of(&pa), Node::of(&pb));
    for op in [1, 2] {
        let (s, _) = a
            .put(
                &format!("/api/v1/operators/{op}"),
                json!({"name": format!("op{op}"), "departments": [1]}),
            )
            .await;
        assert!(s == 200 || s == 201);
    }
    let (s, v) = a
        .post(
            "/api/v1/chats",
            json!({"department": 1, "visitor": {"name": "first"}}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let first = v["chat"]["id"].as_u64().unwrap();
    agree(&a, &b).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.get("/api/v1/operators/2").await.0 != 200 {
        assert!(Instant::now() < deadline, "B knows operator 2");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.cut();
    proxy.drop_all();
    let (s, _) = a
        .put(
            "/api/v1/operators/1",
            json!({"name": "renamed", "departments": [1]}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = a
        .call(reqwest::Method::DELETE, "/api/v1/operators/2", None)
        .await;
    assert!(s / 100 == 2, "{s} {v}");
    let (s, v) = a
        .post(&format!("/api/v1/chats/{first}/close"), json!({}))
        .await;
    assert!(s / 100 == 2, "{s} {v}");
    let (s, v) = a
        .post(
            "/api/v1/chats",
            json!({"department": 1, "visitor": {"name": "second"}}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    proxy.heal();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let renamed = b.get("/api/v1/operators/1").await.1["name"] == "renamed";
        let deleted = b.get("/api/v1/operators/2").await.0 == 404;
        let chats = b.chats().await;
        if renamed && deleted && !chats.contains_key(&first) && chats.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B catches up: renamed {renamed}, deleted {deleted}, chats {chats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(agree(&a, &b).await.len(), 1);
}

/// The assigning node shuts down cleanly (SIGTERM) while chats are created through the
/// other node at 20/s: every creation is acknowledged, and each exists exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_clean_shutdown_of_the_assigner_refuses_nothing_applies_nothing_twice() {
    clean_shutdown_under_traffic(CLUSTER).await;
}

/// The same with the default lease (10 s): the other node takes the lease when told of its
/// release, not a third of a lease later, so no forwarded call outwaits its 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_clean_shutdown_with_the_default_lease_refuses_nothing() {
    clean_shutdown_under_traffic("[presence]\ndisconnect_grace = \"300ms\"\n").await;
}

async fn clean_shutdown_under_traffic(config: &str) {
    let redis = RedisServer::start().await;
    let mut pa = NodeProcess::start(&redis, "a", config).await; // assigns
    let pb = NodeProcess::start(&redis, "b", config).await;
    let b = Node::of(&pb);
    let traffic = ChatTraffic::start(&b, "c");
    wait_for(|| traffic.answered() >= 10, "chats before the shutdown").await;
    pa.terminate().await;
    let stopped = traffic.answered();
    wait_for(
        || traffic.answered() >= stopped + 20,
        "chats after the shutdown",
    )
    .await;
    let answers = traffic.stop().await;
    let refused: Vec<_> = answers.iter().filter(|(_, s, _)| *s != 201).collect();
    assert!(
        refused.is_empty(),
        "refused during the shutdown: {refused:?}"
    );
    let (_, body) = b.get("/api/v1/chats?limit=1000").await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for c in body["chats"].as_array().unwrap() {
        *seen
            .entry(c["visitor"]["name"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for (name, _, _) in &answers {
        assert_eq!(seen.get(name), Some(&1), "{name} exists exactly once");
    }
    assert_eq!(seen.len(), answers.len());
    println!(
        "{} chats created across the shutdown, none refused",
        answers.len()
    );
}

//! Chat changes forwarded to the assigning node through the stream `{prefix}calls`: a call
//! is applied at most once however often it is delivered, a call whose caller gave up
//! (answered 503) never happens, and across a `kill -9` of the assigner every acknowledged
//! change is there exactly once and no refused one appears. Real redis-server, real
//! `presence-hub` processes.

mod common;

use std::time::{Duration, Instant};

use common::node::NodeProcess;
use common::proxy::Proxy;
use common::redis::RedisServer;
use common::remote::{ChatTraffic, Node};
use futures::StreamExt;
use presence_hub::store::{CallDone, Store, Write};
use redis::AsyncCommands;
use serde_json::{Value, json};

const CLUSTER: &str =
    "[cluster]\nnode_lease = \"600ms\"\n[presence]\ndisconnect_grace = \"300ms\"\n";

/// A lease far longer than the pause of the test: nobody takes over meanwhile.
const LONG_LEASE: &str = "[cluster]\nnode_lease = \"10s\"\n";

async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A forwarded chat creation as a caller appends it.
fn create_call(id: &str, name: &str, deadline: u64) -> String {
    json!({
        "id": id,
        "from": "gone",
        "deadline": deadline,
        "op": {"op": "create", "req": {"department": 1, "visitor": {"name": name}}},
    })
    .to_string()
}

async fn append(c: &mut redis::aio::MultiplexedConnection, call: &str) -> String {
    redis::cmd("XADD")
        .arg("hub:calls")
        .arg("*")
        .arg("call")
        .arg(call)
        .query_async(c)
        .await
        .unwrap()
}

/// A chat creation for visitor `name`.
fn chat(name: &str) -> Value {
    json!({"department": 1, "visitor": {"name": name}})
}

/// Node `a` (started first: it assigns) and node `b` reaching Redis at `b_url`, both with
/// the long lease, and a chat "before" created through `b`: forwarding works.
async fn assigner_and_caller(redis: &RedisServer, b_url: &str) -> (NodeProcess, NodeProcess) {
    let pa = NodeProcess::start(redis, "a", LONG_LEASE).await;
    let pb = NodeProcess::start_url(b_url, "b", LONG_LEASE).await;
    let (s, v) = Node::of(&pb).post("/api/v1/chats", chat("before")).await;
    assert_eq!(s, 201, "{v}");
    (pa, pb)
}

/// The visitor names a node holds, once `name` is among them (10 s at most).
async fn names_once(node: &Node, name: &str) -> std::collections::HashMap<String, usize> {
    until(&format!("{name} on the node"), || async {
        let n = node.visitor_names().await;
        n.contains_key(name).then_some(n)
    })
    .await
}

/// Polls `f` every 20 ms until it answers Some (10 s at most).
async fn until<T, F: std::future::Future<Output = Option<T>>>(what: &str, f: impl Fn() -> F) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An assigner read a call and died before acknowledging it, and the caller's retry
/// appended the same call (same id) again: the next assigner claims the pending entry and
/// runs it, answers the retry from the record, and the chat exists once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_redelivered_call_is_applied_once() {
    let redis = RedisServer::start().await;
    let mut c = redis_conn(&redis).await;
    let _: () = c
        .xgroup_create_mkstream("hub:calls", "assigners", "0")
        .await
        .unwrap();
    let deadline = unix_ms() + 20_000;
    let first = append(&mut c, &create_call("gone.1.1", "redelivered", deadline)).await;
    // Read by an assigner that then died: pending for consumer "ghost", never acknowledged.
    let read: redis::streams::StreamReadReply = c
        .xread_options(
            &["hub:calls"],
            &[">"],
            &redis::streams::StreamReadOptions::default().group("assigners", "ghost"),
        )
        .await
        .unwrap();
    assert_eq!(read.keys[0].ids[0].id, first);
    append(&mut c, &create_call("gone.1.1", "redelivered", deadline)).await;
    append(&mut c, &create_call("gone.1.2", "after", deadline)).await;

    let pa = NodeProcess::start(&redis, "a", CLUSTER).await;
    let pb = NodeProcess::start(&redis, "b", CLUSTER).await;
    let (a, b) = (Node::of(&pa), Node::of(&pb));
    let redis_url = redis.url();
    let record = |id: &'static str| {
        let url = redis_url.clone();
        async move {
            let mut c = redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            c.get::<_, Option<String>>(format!("hub:call:{id}"))
                .await
                .unwrap()
        }
    };
    // Calls are served in stream order: the last one recorded means all were served.
    until("the last call's outcome", || record("gone.1.2")).await;
    let done: Value = serde_json::from_str(&record("gone.1.1").await.unwrap()).unwrap();
    let chat = done["ok"]["chat"]["id"]
        .as_u64()
        .expect("recorded as a success");
    for node in [&a, &b] {
        let names = names_once(node, "after").await;
        assert_eq!(names.get("redelivered"), Some(&1), "{names:?}");
        assert_eq!(names.get("after"), Some(&1), "{names:?}");
        assert!(node.chats().await.contains_key(&chat));
    }
    let pending: redis::streams::StreamPendingReply =
        c.xpending("hub:calls", "assigners").await.unwrap();
    assert_eq!(pending.count(), 0, "every call acknowledged");
    // The dead reader's consumer was dropped once its call was taken over.
    let consumers: redis::streams::StreamInfoConsumersReply =
        c.xinfo_consumers("hub:calls", "assigners").await.unwrap();
    let names: Vec<&str> = consumers
        .consumers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["a"]);
}

/// The assigner is paused (SIGSTOP) past the caller's 3 s deadline, then resumed: the
/// caller answered 503, and the change never appears, neither on the nodes nor in the store
/// read by a node started afterwards; the call is recorded as cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_given_up_by_the_caller_never_happen() {
    let redis = RedisServer::start().await;
    let (pa, pb) = assigner_and_caller(&redis, &redis.url()).await;
    let (a, b) = (Node::of(&pa), Node::of(&pb));
    pa.pause();
    let asked = Instant::now();
    let (s, v) = b.post("/api/v1/chats", chat("given-up")).await;
    let waited = asked.elapsed();
    pa.resume();
    assert_eq!(s, 503, "{v}");
    assert!(
        waited >= Duration::from_millis(2900),
        "answered after {waited:?}"
    );
    // The assigner goes on; served in stream order, so the given-up call was seen first.
    let (s, v) = b.post("/api/v1/chats", chat("after")).await;
    assert_eq!(s, 201, "{v}");
    let pc = NodeProcess::start(&redis, "c", LONG_LEASE).await;
    for node in [&a, &b, &Node::of(&pc)] {
        let names = names_once(node, "after").await;
        assert_eq!(names.get("given-up"), None, "{names:?}");
        assert_eq!(names.get("before"), Some(&1), "{names:?}");
    }
    let mut c = redis_conn(&redis).await;
    let keys: Vec<String> = c.keys("hub:call:b.*").await.unwrap();
    let mut outcomes = Vec::new();
    for k in keys {
        outcomes.push(c.get::<_, String>(k).await.unwrap());
    }
    assert_eq!(
        outcomes.iter().filter(|o| *o == "cancelled").count(),
        1,
        "{outcomes:?}"
    );
}

/// The store's script writes a call's outcome with the change, once, over the claim of the
/// lease token the write is fenced with: a second outcome for the same call (a redelivery),
/// a call its caller settled as cancelled, one never claimed, or one claimed under another
/// token is refused whole, the change's other writes with it. No clock is read: a call
/// claimed before its deadline lands after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_outcome_recorded_with_the_change_once_only_under_the_claim() {
    let redis = RedisServer::start().await;
    let store = presence_hub::store::redis::RedisStore::open(&redis.url(), "hub:")
        .await
        .unwrap();
    let mut c = redis_conn(&redis).await;
    let token = "a:1:00ff";
    let _: () = c.set("hub:leader", token).await.unwrap();
    let claimer = c.clone();
    let claim = |id: &str, by: &str| {
        let (key, by) = (format!("hub:call:{id}"), format!("running:{by}"));
        let mut c = claimer.clone();
        async move {
            let _: () = c.set(key, by).await.unwrap();
        }
    };
    let done = |id: &str| {
        Write::CallDone(CallDone {
            id: id.into(),
            reply: format!("{{\"id\":\"{id}\",\"ok\":1}}"),
            ttl_ms: 60_000,
        })
    };
    let probe = |v: &str| Write::Meta {
        key: "probe",
        value: v.into(),
    };
    let fenced = |w: Vec<Write>| {
        let mut all = vec![Write::Fence(token.into())];
        all.extend(w);
        presence_hub::store::durable(store.write(all))
    };

    claim("x.1", token).await;
    fenced(vec![probe("one"), done("x.1")]).await.unwrap();
    let rec: Option<String> = c.get("hub:call:x.1").await.unwrap();
    assert_eq!(rec.as_deref(), Some("{\"id\":\"x.1\",\"ok\":1}"));
    let ttl: i64 = c.pttl("hub:call:x.1").await.unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");

    let _: () = c.set("hub:call:x.2", "cancelled").await.unwrap();
    claim("x.4", "b:2:0001").await;
    let cases = [
        ("a redelivery", done("x.1")),
        ("settled as cancelled", done("x.2")),
        ("never claimed", done("x.3")),
        ("claimed under another token", done("x.4")),
    ];
    for (what, w) in cases {
        let r = fenced(vec![probe(what), w]).await;
        assert!(r.is_err(), "{what}: refused");
        store.resume();
        let p: Option<String> = c.hget("hub:meta", "probe").await.unwrap();
        assert_eq!(p.as_deref(), Some("one"), "{what}: nothing of it written");
    }
    let x2: Option<String> = c.get("hub:call:x.2").await.unwrap();
    assert_eq!(x2.as_deref(), Some("cancelled"));
    let x3: Option<String> = c.get("hub:call:x.3").await.unwrap();
    assert_eq!(x3, None);
    let x4: Option<String> = c.get("hub:call:x.4").await.unwrap();
    assert_eq!(x4.as_deref(), Some("running:b:2:0001"));
    claim("x.5", token).await;
    fenced(vec![probe("two"), done("x.5")]).await.unwrap();
    let p: Option<String> = c.hget("hub:meta", "probe").await.unwrap();
    assert_eq!(p.as_deref(), Some("two"), "the store goes on");
}

/// The assigning node is killed (`kill -9`) while chats are created through the other node
/// at 20/s: every acknowledged creation exists exactly once (also for a node started
/// afterwards), and none answered with an error appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_assigner_killed_under_forwarded_traffic_acknowledged_exactly_once() {
    let redis = RedisServer::start().await;
    let mut pa = NodeProcess::start(&redis, "a", CLUSTER).await; // assigns
    let pb = NodeProcess::start(&redis, "b", CLUSTER).await;
    let b = Node::of(&pb);
    let traffic = ChatTraffic::start(&b, "k");
    until("chats before the kill", || async {
        (traffic.answered() >= 10).then_some(())
    })
    .await;
    pa.kill();
    let killed = traffic.answered();
    until("chats after the kill", || async {
        (traffic.answered() >= killed + 40).then_some(())
    })
    .await;
    let answers = traffic.stop().await;
    let acked: Vec<&String> = answers
        .iter()
        .filter(|(_, s, _)| *s == 201)
        .map(|(n, _, _)| n)
        .collect();
    // 0: no answer within the client's 10 s (neither acknowledged nor refused).
    let refused: Vec<&String> = answers
        .iter()
        .filter(|(_, s, _)| *s != 201 && *s != 0)
        .map(|(n, _, _)| n)
        .collect();
    let pc = NodeProcess::start(&redis, "c", CLUSTER).await;
    for node in [&b, &Node::of(&pc)] {
        let names = until("every acknowledged chat on the node", || async {
            let n = node.visitor_names().await;
            acked.iter().all(|a| n.contains_key(*a)).then_some(n)
        })
        .await;
        for name in &acked {
            assert_eq!(names.get(*name), Some(&1), "{name} exists exactly once");
        }
        for name in &refused {
            assert_eq!(names.get(*name), None, "{name} was refused but exists");
        }
    }
    println!(
        "{} chats across the kill: {} acknowledged, {} refused, {} unanswered",
        answers.len(),
        acked.len(),
        refused.len(),
        answers.len() - acked.len() - refused.len()
    );
}

/// The race the claim closes: the assigner starts a call late (it was stopped, SIGSTOP,
/// until 1.9 s into the caller's 3 s) and its commit is held up (`CLIENT PAUSE WRITE` on
/// Redis the moment the claim lands) until past the caller's deadline. The caller answers
/// the real outcome (201, the chat exists once), a change made on the assigner meanwhile
/// (in flight with the slow commit) is not refused, and the assigner goes on under the same
/// lease, ready, without rebuilding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_commit_under_way_at_the_deadline_answers_its_outcome_and_refuses_nothing() {
    let redis = RedisServer::start().await;
    let (pa, pb) = assigner_and_caller(&redis, &redis.url()).await;
    let (a, b) = (Node::of(&pa), Node::of(&pb));
    let mut c = redis_conn(&redis).await;
    let lease: String = c.get("hub:leader").await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("K$")
        .query_async(&mut c)
        .await
        .unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut ps = client.get_async_pubsub().await.unwrap();
    ps.psubscribe("__keyspace@0__:hub:call:b.*").await.unwrap();
    let mut events = ps.into_on_message();
    let mut seen = std::collections::HashSet::new();
    // The pause must land between the claim and the commit: retried when the commit won.
    for attempt in 0..8 {
        let name = format!("slow{attempt}");
        pa.pause();
        let asked = Instant::now();
        let slow = {
            let (node, body) = (Node::of(&pb), chat(&name));
            tokio::spawn(async move { node.post("/api/v1/chats", body).await })
        };
        // Shapes the race rather than awaits an event: the call must start late.
        tokio::time::sleep(Duration::from_millis(1900)).await;
        pa.resume();
        // The first write of the new call's record: the claim.
        let key = loop {
            let m = tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .expect("the call's record written")
                .expect("subscribed");
            let key = m
                .get_channel_name()
                .trim_start_matches("__keyspace@0__:")
                .to_string();
            if seen.insert(key.clone()) {
                break key;
            }
        };
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(1500)
            .arg("WRITE")
            .query_async(&mut c)
            .await
            .unwrap();
        let rec: Option<String> = c.get(&key).await.unwrap();
        if rec.as_deref() != Some(&format!("running:{lease}")) {
            // The commit landed first (or nothing was claimed): no race this time.
            let _: () = redis::cmd("CLIENT")
                .arg("UNPAUSE")
                .query_async(&mut c)
                .await
                .unwrap();
            let _ = slow.await.unwrap();
            continue;
        }
        // A change on the assigner while the claimed commit is held up.
        let beside = {
            let (node, body) = (Node::of(&pa), chat(&format!("beside{attempt}")));
            tokio::spawn(async move { node.post("/api/v1/chats", body).await })
        };
        let (s, v) = slow.await.unwrap();
        let waited = asked.elapsed();
        assert_eq!(s, 201, "the real outcome, after {waited:?}: {v}");
        assert!(
            waited >= Duration::from_millis(3000),
            "answered past the caller's deadline: {waited:?}"
        );
        let (s, v) = beside.await.unwrap();
        assert_eq!(s, 201, "the change beside it is not refused: {v}");
        let rec: String = c.get(&key).await.unwrap();
        let rec: Value = serde_json::from_str(&rec).unwrap();
        assert!(rec["ok"]["chat"]["id"].is_u64(), "{rec}");
        // The assigner did not rebuild or lose its lease: ready, same token, assigns at once.
        let (s, v) = a.get("/readyz").await;
        assert_eq!(s, 200, "{v}");
        let now: String = c.get("hub:leader").await.unwrap();
        assert_eq!(now, lease);
        let quick = Instant::now();
        let (s, v) = b.post("/api/v1/chats", chat("after")).await;
        assert_eq!(s, 201, "{v}");
        assert!(
            quick.elapsed() < Duration::from_secs(1),
            "{:?}",
            quick.elapsed()
        );
        for node in [&a, &b] {
            let names = names_once(node, "after").await;
            assert_eq!(names.get(name.as_str()), Some(&1), "{names:?}");
            assert_eq!(
                names.get(format!("beside{attempt}").as_str()),
                Some(&1),
                "{names:?}"
            );
        }
        println!("race set up at attempt {attempt}; answered after {waited:?}");
        return;
    }
    panic!("the pause never landed between a claim and its commit");
}

/// A forwarded call as its caller `b` appended it, with the assigner stopped (SIGSTOP) so
/// nothing serves it, then claimed under the assigner's lease token by hand: what the
/// assigner writes just before its commit. Answers the caller's request and the call id.
async fn claimed_while_stopped(
    c: &mut redis::aio::MultiplexedConnection,
    pa: &NodeProcess,
    pb: &NodeProcess,
    name: &str,
) -> (tokio::task::JoinHandle<(u16, Value)>, Instant, String) {
    let lease: String = c.get("hub:leader").await.unwrap();
    pa.pause();
    let asked = Instant::now();
    let slow = {
        let (node, body) = (Node::of(pb), chat(name));
        tokio::spawn(async move { node.post("/api/v1/chats", body).await })
    };
    let id = until("the call in the stream", || {
        let mut c = c.clone();
        async move {
            let last: redis::streams::StreamRangeReply =
                c.xrevrange_count("hub:calls", "+", "-", 1).await.unwrap();
            let raw: String = last.ids.first()?.get("call")?;
            let call: Value = serde_json::from_str(&raw).unwrap();
            (call["op"]["req"]["visitor"]["name"] == name)
                .then(|| call["id"].as_str().unwrap().to_string())
        }
    })
    .await;
    let _: () = c
        .pset_ex(format!("hub:call:{id}"), format!("running:{lease}"), 60_000)
        .await
        .unwrap();
    // Past the caller's 3 s deadline: it settles, finds the claim of the leading token.
    tokio::time::sleep_until((asked + Duration::from_millis(3600)).into()).await;
    assert!(
        !slow.is_finished(),
        "the caller waits for the claimed commit"
    );
    let rec: Option<String> = c.get(format!("hub:call:{id}")).await.unwrap();
    assert_eq!(rec, Some(format!("running:{lease}")));
    (slow, asked, id)
}

/// The caller's deadline passes while the assigner holding the lease has claimed its call:
/// it keeps settling, and answers the real outcome once the commit lands (the assigner
/// resumed), not a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_settle_waits_for_the_claiming_assigner_while_it_leads() {
    let redis = RedisServer::start().await;
    let (pa, pb) = assigner_and_caller(&redis, &redis.url()).await;
    let b = Node::of(&pb);
    let mut c = redis_conn(&redis).await;
    let (slow, asked, id) = claimed_while_stopped(&mut c, &pa, &pb, "held").await;
    pa.resume();
    let (s, v) = slow.await.unwrap();
    assert_eq!(s, 201, "the real outcome, after {:?}: {v}", asked.elapsed());
    let rec: String = c.get(format!("hub:call:{id}")).await.unwrap();
    assert!(rec.contains("\"ok\""), "{rec}");
    let names = b.visitor_names().await;
    assert_eq!(names.get("held"), Some(&1), "{names:?}");
}

/// The claiming assigner loses the lease (another token holds it) while the caller waits
/// past its deadline: the claim's commit is fenced, so the caller cancels the call and
/// answers 503, and the change never appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_settle_cancels_a_claim_whose_token_lost_the_lease() {
    let redis = RedisServer::start().await;
    let (pa, pb) = assigner_and_caller(&redis, &redis.url()).await;
    let b = Node::of(&pb);
    let mut c = redis_conn(&redis).await;
    let (slow, _, id) = claimed_while_stopped(&mut c, &pa, &pb, "lost").await;
    // Another node's lease, for a moment (then anyone may take it again).
    let _: () = c.pset_ex("hub:leader", "z:99:00", 1_000).await.unwrap();
    let (s, v) = slow.await.unwrap();
    assert_eq!(s, 503, "{v}");
    let rec: Option<String> = c.get(format!("hub:call:{id}")).await.unwrap();
    assert_eq!(rec.as_deref(), Some("cancelled"));
    pa.resume();
    let names = until("a chat created once a node assigns again", || async {
        let (s, _) = b.post("/api/v1/chats", chat("after")).await;
        let n = b.visitor_names().await;
        (s == 201 && n.contains_key("after")).then_some(n)
    })
    .await;
    assert_eq!(names.get("lost"), None, "{names:?}");
    let rec: Option<String> = c.get(format!("hub:call:{id}")).await.unwrap();
    assert_eq!(rec.as_deref(), Some("cancelled"));
}

/// The caller is cut off from Redis (a proxy holds its traffic) from just after appending
/// its call until past its 3 s deadline, while the assigner runs the call and records the
/// outcome. The caller cannot know the outcome meanwhile, so it neither answers 503 nor gives
/// up: it keeps settling, and once Redis is reachable again answers what really happened
/// (201, the chat exists once on both nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_caller_cut_off_from_redis_past_its_deadline_answers_the_real_outcome() {
    let redis = RedisServer::start().await;
    let proxy = Proxy::start(redis.addr()).await;
    let (pa, pb) = assigner_and_caller(&redis, &proxy.url()).await;
    let (a, b) = (Node::of(&pa), Node::of(&pb));
    let c = redis_conn(&redis).await;
    // Stopped, the assigner leaves the call in the stream until the caller is cut off.
    pa.pause();
    let asked = Instant::now();
    let cut_off = {
        let (node, body) = (Node::of(&pb), chat("cut-off"));
        tokio::spawn(async move { node.post("/api/v1/chats", body).await })
    };
    let (id, deadline) = until("the call in the stream", || {
        let mut c = c.clone();
        async move {
            let last: redis::streams::StreamRangeReply =
                c.xrevrange_count("hub:calls", "+", "-", 1).await.unwrap();
            let raw: String = last.ids.first()?.get("call")?;
            let call: Value = serde_json::from_str(&raw).unwrap();
            (call["op"]["req"]["visitor"]["name"] == "cut-off").then(|| {
                (
                    call["id"].as_str().unwrap().to_string(),
                    call["deadline"].as_u64().unwrap(),
                )
            })
        }
    })
    .await;
    proxy.cut();
    pa.resume();
    let outcome = until("the outcome recorded by the assigner", || {
        let mut c = c.clone();
        let key = format!("hub:call:{id}");
        async move {
            let rec: Option<String> = c.get(&key).await.unwrap();
            rec.filter(|r| r.starts_with('{'))
        }
    })
    .await;
    let outcome: Value = serde_json::from_str(&outcome).unwrap();
    assert!(outcome["ok"]["chat"]["id"].is_u64(), "{outcome}");
    // Shapes the fault rather than awaits an event: the caller's deadline (a wall-clock
    // time in the call) passes while it is cut off, and its settling then fails at least
    // once (its Redis connection answers nothing for longer than its 2 s response timeout;
    // the margin covers a node running late on a loaded machine).
    let past = deadline.saturating_sub(unix_ms()) + 3500;
    tokio::time::sleep(Duration::from_millis(past)).await;
    assert!(
        !cut_off.is_finished(),
        "the caller did not answer while it could not know the outcome"
    );
    proxy.heal();
    let (s, v) = tokio::time::timeout(Duration::from_secs(10), cut_off)
        .await
        .expect("the caller answers once Redis is reachable")
        .unwrap();
    let waited = asked.elapsed();
    assert_eq!(s, 201, "the real outcome, after {waited:?}: {v}");
    assert_eq!(v["chat"]["id"], outcome["ok"]["chat"]["id"], "{v}");
    for node in [&a, &b] {
        let names = names_once(node, "cut-off").await;
        assert_eq!(names.get("cut-off"), Some(&1), "{names:?}");
    }
}

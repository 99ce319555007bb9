//! The change log is the replication: the notes of a change are one entry of the Redis
//! Stream `{prefix}log`, written with the change's records; every node follows the stream,
//! and a node that finds entries missing (trimmed away while it lagged) reloads the state.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::node::NodeProcess;
use common::proxy::Proxy;
use common::redis::RedisServer;
use common::remote::Node;
use serde_json::{Value, json};

const CLUSTER: &str =
    "[cluster]\nnode_lease = \"600ms\"\n[presence]\ndisconnect_grace = \"300ms\"\n";

/// One API call to the node at `base` (status 0: no answer).
async fn call(
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    Node {
        base: base.to_string(),
        http: reqwest::Client::new(),
    }
    .call(method, path, body)
    .await
}

/// Ids of the chats a node holds open.
async fn open_chats(base: &str) -> Vec<u64> {
    Node {
        base: base.to_string(),
        http: reqwest::Client::new(),
    }
    .chats()
    .await
    .into_keys()
    .collect()
}

async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A change's notes are one stream entry with the sending node, the global sequence
/// number and the notes as a JSON array; the connection counts are in the same step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_change_is_one_log_entry_with_node_seq_and_notes() {
    let redis = RedisServer::start().await;
    let a = NodeProcess::start(&redis, "a", CLUSTER).await;
    let mut c = redis_conn(&redis).await;
    let (s, v) = call(
        &a.base,
        reqwest::Method::PUT,
        "/api/v1/operators/7",
        Some(json!({"name": "seven", "departments": [1]})),
    )
    .await;
    assert!(s == 200 || s == 201, "{s} {v}");
    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg("hub:log")
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    let seq: u64 = redis::cmd("GET")
        .arg("hub:log:seq")
        .query_async(&mut c)
        .await
        .unwrap();
    let (_, last) = entries.last().expect("the change is logged");
    assert_eq!(last["node"], "a");
    assert_eq!(last["seq"].parse::<u64>().unwrap(), seq);
    // Sequence numbers count up by one from 1, entry after entry.
    let seqs: Vec<u64> = entries
        .iter()
        .map(|(_, f)| f["seq"].parse().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seq).collect::<Vec<_>>());
    let notes: Vec<Value> = entries
        .iter()
        .flat_map(|(_, f)| serde_json::from_str::<Vec<Value>>(&f["notes"]).unwrap())
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n["kind"] == "operator" && n["id"] == 7 && n["record"]["name"] == "seven"),
        "{notes:?}"
    );
}

/// The follower is cut off (its bytes held by a proxy) while the assigning node renames an
/// operator, deletes another and closes a chat; the test trims those entries from the log
/// (`XTRIM MAXLEN 0`) before the follower can read them, then one more change is logged. The
/// follower sees the jump in the sequence numbers, reloads the state, and ends the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_lost_notes_seq_gap_reloads_to_the_same_state() {
    let redis = RedisServer::start().await;
    let proxy = Proxy::start(redis.addr()).await;
    let a = NodeProcess::start(&redis, "a", CLUSTER).await; // assigns
    let b = NodeProcess::start_url(&proxy.url(), "b", CLUSTER).await;
    let put = reqwest::Method::PUT;
    for op in [1, 2] {
        let body = json!({"name": format!("op{op}"), "departments": [1]});
        let (s, v) = call(
            &a.base,
            put.clone(),
            &format!("/api/v1/operators/{op}"),
            Some(body),
        )
        .await;
        assert!(s == 200 || s == 201, "{s} {v}");
    }
    let (s, v) = call(
        &a.base,
        reqwest::Method::POST,
        "/api/v1/chats",
        Some(json!({"department": 1, "visitor": {"name": "first"}})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let first = v["chat"]["id"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while call(&b.base, reqwest::Method::GET, "/api/v1/operators/2", None)
        .await
        .0
        != 200
        || !open_chats(&b.base).await.contains(&first)
    {
        assert!(Instant::now() < deadline, "B knows operator 2 and the chat");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    proxy.cut();
    let (s, v) = call(
        &a.base,
        put.clone(),
        "/api/v1/operators/1",
        Some(json!({"name": "renamed", "departments": [1], "max_chats": 2})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(
        &a.base,
        reqwest::Method::DELETE,
        "/api/v1/operators/2",
        None,
    )
    .await;
    assert!(s / 100 == 2, "{s} {v}");
    let (s, v) = call(
        &a.base,
        reqwest::Method::POST,
        &format!("/api/v1/chats/{first}/close"),
        Some(json!({})),
    )
    .await;
    assert!(s / 100 == 2, "{s} {v}");
    let mut c = redis_conn(&redis).await;
    let before: u64 = redis::cmd("GET")
        .arg("hub:log:seq")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: i64 = redis::cmd("XTRIM")
        .arg("hub:log")
        .arg("MAXLEN")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    // One more change after the trim: what B reads next jumps over the trimmed entries.
    let (s, v) = call(
        &a.base,
        put.clone(),
        "/api/v1/operators/3",
        Some(json!({"name": "op3", "departments": [1]})),
    )
    .await;
    assert!(s == 200 || s == 201, "{s} {v}");
    let after: u64 = redis::cmd("GET")
        .arg("hub:log:seq")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(after > before, "the last change is logged after the trim");
    proxy.heal();

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, one) = call(&b.base, reqwest::Method::GET, "/api/v1/operators/1", None).await;
        let renamed = one["name"] == "renamed" && one["max_chats"] == 2;
        let deleted = call(&b.base, reqwest::Method::GET, "/api/v1/operators/2", None)
            .await
            .0
            == 404;
        let closed = !open_chats(&b.base).await.contains(&first);
        let third = call(&b.base, reqwest::Method::GET, "/api/v1/operators/3", None)
            .await
            .0
            == 200;
        if renamed && deleted && closed && third {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B catches up: renamed {renamed} ({one}), deleted {deleted}, chat closed {closed}, op 3 {third}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And it goes on following the log.
    let (s, v) = call(
        &a.base,
        put,
        "/api/v1/operators/1",
        Some(json!({"name": "again", "departments": [1]})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while call(&b.base, reqwest::Method::GET, "/api/v1/operators/1", None)
        .await
        .1["name"]
        != "again"
    {
        assert!(
            Instant::now() < deadline,
            "B follows the log after the reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

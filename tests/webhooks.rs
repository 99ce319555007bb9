//! Webhook delivery of the event feed to a real HTTP receiver on loopback: signature, order,
//! retries through failures and timeouts, the position kept across a restart and a failover.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::redis::RedisServer;
use common::{API_KEY, TestHub, WAIT};
use presence_hub::config::Config;
use serde_json::{Value, json};

const SECRET: &str = "webhook-secret";

/// How the receiver answers its next request.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Status(u16),
    /// Answers only after this long (past the hub's timeout).
    Hang(Duration),
}

#[derive(Clone, Debug)]
struct Delivery {
    signature: String,
    delivery: String,
    raw: Vec<u8>,
    body: Value,
    ok: bool,
}

#[derive(Clone, Default)]
struct Receiver {
    plan: Arc<Mutex<VecDeque<Answer>>>,
    log: Arc<Mutex<Vec<Delivery>>>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let answer = r
        .plan
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Answer::Status(200));
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(header("content-type"), "application/json");
    let ok = matches!(answer, Answer::Status(s) if (200..300).contains(&s));
    r.log.lock().unwrap().push(Delivery {
        signature: header("x-presence-hub-signature"),
        delivery: header("x-presence-hub-delivery"),
        raw: body.to_vec(),
        body: serde_json::from_slice(&body).unwrap(),
        ok,
    });
    match answer {
        Answer::Status(s) => StatusCode::from_u16(s).unwrap(),
        Answer::Hang(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK
        }
    }
}

impl Receiver {
    async fn start(plan: &[Answer]) -> (Receiver, String) {
        let r = Receiver::default();
        r.plan.lock().unwrap().extend(plan.iter().copied());
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (r, url)
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.log.lock().unwrap().clone()
    }

    /// Ids of the events of the answered (2xx) deliveries, in the order they came.
    fn delivered_ids(&self) -> Vec<String> {
        self.deliveries()
            .iter()
            .filter(|d| d.ok)
            .flat_map(|d| d.body["events"].as_array().unwrap().clone())
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// Waits until the answered deliveries hold `n` events.
    async fn until_delivered(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT * 2;
        loop {
            let ids = self.delivered_ids();
            if ids.len() >= n {
                return ids;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} events delivered: {:?}",
                ids.len(),
                self.deliveries()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn hooks(cfg: &mut Config, url: &str) {
    cfg.webhooks.url = url.to_string();
    cfg.webhooks.secret.0 = SECRET.into();
    cfg.webhooks.batch = 2;
    cfg.webhooks.timeout = Duration::from_millis(300);
    cfg.webhooks.max_backoff = Duration::from_millis(400);
    cfg.webhooks.types = vec![presence_hub::feed::EventType::DepartmentStatus];
}

/// Every event id of the hub's feed of department changes, page by page.
async fn feed_ids(hub: &TestHub) -> Vec<String> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let (_, page) = hub
            .get(&format!(
                "/api/v1/events?types=department_status&limit=1000{after}"
            ))
            .await;
        let events = page["events"].as_array().unwrap();
        if events.is_empty() {
            return out;
        }
        out.extend(events.iter().map(|e| e["id"].as_str().unwrap().to_string()));
        after = format!("&after={}", page["last_id"].as_str().unwrap());
    }
}

fn check_signatures(r: &Receiver) {
    for d in r.deliveries() {
        assert_eq!(
            d.signature,
            presence_hub::webhooks::signature(SECRET.as_bytes(), &d.raw),
            "signed body"
        );
        let last = d.body["events"].as_array().unwrap().last().unwrap()["id"].clone();
        assert_eq!(
            json!(d.delivery),
            last,
            "delivery id = the batch's last event"
        );
        assert!(
            d.body["events"].as_array().unwrap().len() <= 2,
            "batch bound"
        );
    }
}

#[tokio::test]
async fn webhooks_retry_through_failures_and_timeouts_in_order() {
    let (r, url) = Receiver::start(&[
        Answer::Status(500),
        Answer::Hang(Duration::from_secs(1)),
        Answer::Status(404),
    ])
    .await;
    let hub = TestHub::start_with(|c| hooks(c, &url)).await;
    for d in 1..=5 {
        hub.put_department(d, json!({"bot": true})).await;
    }
    let delivered = r.until_delivered(5).await;
    assert_eq!(
        delivered,
        feed_ids(&hub).await,
        "everything, in order, once"
    );
    let all = r.deliveries();
    assert!(
        all.len() >= 6,
        "three failed attempts, then three batches: {all:?}"
    );
    assert!(
        !all[0].ok && !all[1].ok && !all[2].ok && all[3].ok,
        "the first batch is retried until it is answered 2xx"
    );
    assert_eq!(all[0].raw, all[3].raw, "the same batch, byte for byte");
    check_signatures(&r);
    let metrics = hub.metrics_text().await;
    let failed = common::metric_value(&metrics, "presence_hub_webhook_failed_attempts_total", &[]);
    assert!(failed.is_some_and(|f| f >= 3.0), "{metrics}");
}

#[tokio::test]
async fn webhooks_position_survives_a_restart_without_resending() {
    let (r, url) = Receiver::start(&[]).await;
    let hub = TestHub::start_with(|c| hooks(c, &url)).await;
    for d in 1..=3 {
        hub.put_department(d, json!({"bot": true})).await;
    }
    r.until_delivered(3).await;
    let dir = hub.stop_keep_dir().await;
    let url2 = url.clone();
    let hub = TestHub::start_in(dir.path(), |c| hooks(c, &url2)).await;
    for d in 4..=6 {
        hub.put_department(d, json!({"bot": true})).await;
    }
    let ids = r.until_delivered(6).await;
    assert_eq!(
        ids,
        feed_ids(&hub).await,
        "the rest after the restart, nothing again"
    );
    check_signatures(&r);
}

#[tokio::test]
async fn webhooks_receiver_down_gets_everything_when_back() {
    // Down for its first 12 attempts (a long outage at this backoff), then up.
    let plan: Vec<Answer> = (0..12).map(|_| Answer::Status(503)).collect();
    let (r, url) = Receiver::start(&plan).await;
    let hub = TestHub::start_with(|c| {
        hooks(c, &url);
        c.webhooks.batch = 100;
        c.webhooks.max_backoff = Duration::from_millis(50);
    })
    .await;
    for d in 1..=40 {
        hub.put_department(d, json!({"bot": true})).await;
    }
    let ids = r.until_delivered(40).await;
    assert_eq!(ids, feed_ids(&hub).await);
}

/// The delivering node is killed (SIGKILL): the other node takes the role over and goes on
/// after the last delivered batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_webhooks_fail_over_when_the_deliverer_is_killed() {
    let redis = RedisServer::start().await;
    let (r, url) = Receiver::start(&[]).await;
    // Node B first, as a real process: it takes the role.
    let mut node_b = common::node::NodeProcess::start(
        &redis,
        "b",
        &format!(
            "[cluster]\nnode_lease = \"1s\"\n[webhooks]\nurl = \"{url}\"\nsecret = \"{SECRET}\"\nbatch = 2\ntimeout = \"300ms\"\ntypes = [\"department_status\"]\n"
        ),
    )
    .await;
    let http = reqwest::Client::new();
    let b = node_b.base.clone();
    for d in 1..=3 {
        let res = http
            .put(format!("{b}/api/v1/departments/{d}"))
            .bearer_auth(API_KEY)
            .json(&json!({"bot": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let first = r.until_delivered(3).await;
    // The position is saved right after the 2xx: wait for it before the kill.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let pos: Option<String> = redis::cmd("HGET")
            .arg("hub:meta")
            .arg("webhook_position")
            .query_async(&mut conn)
            .await
            .unwrap();
        if pos.as_deref() == first.last().map(String::as_str) {
            break;
        }
        assert!(Instant::now() < deadline, "position never saved: {pos:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url_a = url.clone();
    let a = common::node::redis_node(&redis, "a", move |cfg| {
        cfg.cluster.node_lease = Duration::from_secs(1);
        hooks(cfg, &url_a);
    })
    .await;
    node_b.kill(); // SIGKILL: the role is released by its expiry only
    for d in 4..=6 {
        a.put_department(d, json!({"bot": true})).await;
    }
    let ids = r.until_delivered(6).await;
    assert_eq!(
        ids,
        feed_ids(&a).await,
        "in order, nothing skipped, nothing again"
    );
    check_signatures(&r);
}

/// A receiver that was down while N events happened (N = `PH_WEBHOOK_EVENTS`, default 1000)
/// gets every one, in order, once it is back; prints how long the catch-up took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_catch_up_after_an_outage_of_the_receiver() {
    let n: usize = std::env::var("PH_WEBHOOK_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let (r, url) = Receiver::start(&[]).await;
    // Down: every answer is 503 until the plan says otherwise.
    r.plan
        .lock()
        .unwrap()
        .extend(std::iter::repeat_n(Answer::Status(503), 1_000_000));
    let hub = TestHub::start_with(|c| {
        hooks(c, &url);
        c.webhooks.batch = 100;
        c.webhooks.max_backoff = Duration::from_secs(1);
    })
    .await;
    for i in 0..n {
        hub.put_department(1, json!({"bot": i % 2 == 0})).await;
    }
    let made = feed_ids(&hub).await.len();
    assert_eq!(made, n, "one department_status per change");
    let back = Instant::now();
    r.plan.lock().unwrap().clear();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ids = loop {
        let ids = r.delivered_ids();
        if ids.len() >= n {
            break ids;
        }
        assert!(Instant::now() < deadline, "{} of {n} delivered", ids.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = back.elapsed();
    println!("webhook catch-up: {n} events in {took:?} after the receiver came back");
    assert_eq!(ids, feed_ids(&hub).await, "in order, once");
}

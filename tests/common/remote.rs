//! A node as seen from outside, over HTTP: the API calls the cluster and chaos tests make
//! against real `presence-hub` processes, and the checks they share.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::node::NodeProcess;
use super::{API_KEY, Client, JWT_SECRET};

/// A node of the cluster as seen from outside: its base URL.
pub struct Node {
    pub base: String,
    pub http: reqwest::Client,
}

impl Node {
    pub fn of(p: &NodeProcess) -> Node {
        Node {
            base: p.base.clone(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(API_KEY)
            .timeout(Duration::from_secs(10));
        if let Some(b) = body {
            r = r.json(&b);
        }
        match r.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Open chats as this node holds them: id → (status, owner).
    pub async fn chats(&self) -> BTreeMap<u64, (String, Option<u64>)> {
        let (status, body) = self.get("/api/v1/chats?limit=1000").await;
        assert_eq!(status, 200, "{body}");
        body["chats"]
            .as_array()
            .expect("chats")
            .iter()
            .filter(|c| c["status"] != "closed")
            .map(|c| {
                (
                    c["id"].as_u64().unwrap(),
                    (
                        c["status"].as_str().unwrap().to_string(),
                        c["owner"].as_u64(),
                    ),
                )
            })
            .collect()
    }

    pub async fn operator_socket(&self, id: u64) -> Client {
        let token = presence_hub::auth::Tokens::new(JWT_SECRET).mint(id, Duration::from_secs(3600));
        let ws = self.base.replace("http://", "ws://");
        let mut c = Client::connect(&format!("{ws}/ws/operator?token={token}")).await;
        assert_eq!(c.next().await["type"], "hello");
        c
    }

    /// Every event of the feed, oldest first.
    pub async fn feed(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let q = after
                .as_ref()
                .map_or(String::new(), |a| format!("&after={a}"));
            let (status, body) = self.get(&format!("/api/v1/events?limit=1000{q}")).await;
            assert_eq!(status, 200, "{body}");
            let events = body["events"].as_array().cloned().unwrap_or_default();
            if events.is_empty() {
                return out;
            }
            after = body["last_id"].as_str().map(str::to_owned);
            out.extend(events);
        }
    }
}

/// Polls until both nodes hold the same open chats with the same owners (10 s at most).
pub async fn agree(a: &Node, b: &Node) -> BTreeMap<u64, (String, Option<u64>)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ca, cb) = (a.chats().await, b.chats().await);
        if ca == cb {
            return ca;
        }
        assert!(
            Instant::now() < deadline,
            "the nodes do not agree on the chats:\n a: {ca:?}\n b: {cb:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Node {
    /// How many chats (open and closed) carry each visitor name, as this node lists them.
    pub async fn visitor_names(&self) -> std::collections::HashMap<String, usize> {
        let (status, body) = self.get("/api/v1/chats?limit=1000").await;
        assert_eq!(status, 200, "{body}");
        let mut seen = std::collections::HashMap::new();
        for c in body["chats"].as_array().expect("chats") {
            if let Some(name) = c["visitor"]["name"].as_str() {
                *seen.entry(name.to_string()).or_default() += 1;
            }
        }
        seen
    }
}

/// Chats created through a node every 50 ms (visitor names `{prefix}{n}`), each answer
/// recorded as it comes: the traffic of the failure tests.
pub struct ChatTraffic {
    answers: std::sync::Arc<parking_lot::Mutex<Vec<(String, u16, Value)>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ChatTraffic {
    pub fn start(node: &Node, prefix: &str) -> ChatTraffic {
        let answers = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (base, prefix) = (node.base.clone(), prefix.to_string());
        let task = tokio::spawn({
            let (answers, stop) = (answers.clone(), stop.clone());
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                let mut set = tokio::task::JoinSet::new();
                for n in 0.. {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => break,
                    }
                    let node = Node {
                        base: base.clone(),
                        http: reqwest::Client::new(),
                    };
                    let (answers, name) = (answers.clone(), format!("{prefix}{n}"));
                    set.spawn(async move {
                        let (s, v) = node
                            .post(
                                "/api/v1/chats",
                                serde_json::json!({"department": 1, "visitor": {"name": name}}),
                            )
                            .await;
                        answers.lock().push((name, s, v));
                    });
                }
                while set.join_next().await.is_some() {}
            }
        });
        ChatTraffic {
            answers,
            stop,
            task,
        }
    }

    /// Answers received so far.
    pub fn answered(&self) -> usize {
        self.answers.lock().len()
    }

    /// Stops creating, waits for every answer, and hands them over: (name, status, body).
    pub async fn stop(self) -> Vec<(String, u16, Value)> {
        self.stop.cancel();
        self.task.await.expect("the traffic task ends");
        std::mem::take(&mut *self.answers.lock())
    }
}

//! Test harness: a real hub on 127.0.0.1:0 in this process, a real HTTP client and real
//! WebSocket clients. Every wait is bounded, so a missing event fails the test instead of
//! hanging it.
#![allow(dead_code)]

pub mod node;
pub mod proxy;
pub mod raw;
pub mod redis;
pub mod remote;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use presence_hub::config::Config;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const API_KEY: &str = "test-api-key";
pub const JWT_SECRET: &str = "test-jwt-secret";
/// Longest wait for an event that must come.
pub const WAIT: Duration = Duration::from_secs(5);

pub struct TestHub {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

/// A config for tests: known secrets, a fresh data dir, short timers where tests need them.
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.auth.jwt_secret.0 = JWT_SECRET.into();
    cfg.auth.api_key.0 = API_KEY.into();
    cfg.store.data_dir = dir.to_path_buf();
    cfg.presence.disconnect_grace = Duration::from_millis(300);
    cfg
}

impl TestHub {
    pub async fn start() -> TestHub {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestHub {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut hub = Self::start_in(&dir, tweak).await;
        hub._tmp = Some(tmp);
        hub
    }

    /// Starts a hub on an existing data dir (restart tests).
    pub async fn start_in(dir: &std::path::Path, tweak: impl FnOnce(&mut Config)) -> TestHub {
        let mut cfg = test_config(dir);
        tweak(&mut cfg);
        let listener = presence_hub::server::bind(cfg.server.listen).unwrap();
        let addr = listener.local_addr().unwrap();
        let hub = presence_hub::server::build(cfg).await.expect("hub builds");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(presence_hub::server::run(listener, hub, async {
            let _ = stopped.await;
        }));
        TestHub {
            addr,
            dir: dir.to_path_buf(),
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
            _tmp: None,
        }
    }

    /// Graceful shutdown; returns once the store is flushed. Keeps the data dir.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .expect("hub stops in time")
                .unwrap();
        }
    }

    /// Stops and hands over the temp dir so a new hub can start on it.
    pub async fn stop_keep_dir(mut self) -> tempfile::TempDir {
        self.stop().await;
        self._tmp.take().expect("owned temp dir")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// A request to the back-end API with the API key.
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, self.url(path))
            .bearer_auth(API_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("request sent");
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.api(reqwest::Method::GET, path, None).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.api(reqwest::Method::PUT, path, Some(body)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.api(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        self.api(reqwest::Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.api(reqwest::Method::DELETE, path, None).await
    }

    /// Creates (or replaces) an operator working in `departments` with every permission.
    pub async fn operator(&self, id: u64, departments: &[u64]) -> Value {
        self.operator_with(
            id,
            json!({ "name": format!("op{id}"), "departments": departments,
            "permissions": ["change_online_status", "change_visibility", "change_always_online"] }),
        )
        .await
    }

    pub async fn operator_with(&self, id: u64, body: Value) -> Value {
        let (status, v) = self.put(&format!("/api/v1/operators/{id}"), body).await;
        assert!(
            status == 200 || status == 201,
            "PUT operator {id}: {status} {v}"
        );
        v
    }

    pub async fn view(&self, id: u64) -> Value {
        let (status, v) = self.get(&format!("/api/v1/operators/{id}")).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    pub fn token(&self, operator: u64) -> String {
        presence_hub::auth::Tokens::new(JWT_SECRET).mint(operator, Duration::from_secs(3600))
    }

    /// An operator socket, with its `hello` already read.
    pub async fn connect(&self, operator: u64) -> (Client, Value) {
        let mut c =
            Client::connect(&self.ws_url(&format!("/ws/operator?token={}", self.token(operator))))
                .await;
        let hello = c.next().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        (c, hello)
    }

    pub async fn widget(&self, departments: &[u64]) -> Client {
        let q: Vec<String> = departments
            .iter()
            .map(|d| format!("department={d}"))
            .collect();
        Client::connect(&self.ws_url(&format!("/ws/widget?{}", q.join("&")))).await
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_ref: u64,
}

impl From<WebSocketStream<MaybeTlsStream<TcpStream>>> for Client {
    fn from(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
        Client { ws, next_ref: 0 }
    }
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("upgrade accepted");
        Client { ws, next_ref: 0 }
    }

    /// Like [`Client::connect`] with a small socket receive buffer (4 KiB): a reader that
    /// stops reading backs the hub up after a few KiB instead of the megabytes the kernel
    /// would buffer otherwise.
    pub async fn connect_small_buffer(url: &str) -> Client {
        let addr: SocketAddr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let stream = MaybeTlsStream::Plain(stream);
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, stream))
            .await
            .expect("connect in time")
            .expect("upgrade accepted");
        Client { ws, next_ref: 0 }
    }

    /// The HTTP status of a refused upgrade.
    pub async fn refused(url: &str) -> u16 {
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(res)) => res.status().as_u16(),
            Err(e) => panic!("expected an HTTP refusal, got {e}"),
            Ok(_) => panic!("expected a refusal, the upgrade was accepted"),
        }
    }

    /// The next JSON message (pings are skipped); panics after [`WAIT`].
    pub async fn next(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a message in time")
                .expect("socket open")
                .expect("no socket error");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).expect("JSON text"),
                Message::Close(f) => panic!("closed by the hub: {f:?}"),
                _ => continue,
            }
        }
    }

    /// The next message whose `type` is `ty`, skipping others.
    pub async fn next_of(&mut self, ty: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = tokio::time::timeout_at(deadline, self.next())
                .await
                .unwrap_or_else(|_| panic!("no {ty} in time"));
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// The next message matching `pred`, skipping others.
    pub async fn next_where(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = tokio::time::timeout_at(deadline, self.next())
                .await
                .unwrap_or_else(|_| panic!("no {what} in time"));
            if pred(&v) {
                return v;
            }
        }
    }

    /// Asserts that no message matching `pred` arrives within `window` (absence can only be
    /// shown by watching for a while).
    pub async fn silent_for(
        &mut self,
        window: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + window;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    assert!(!pred(&v), "unexpected {what}: {v}");
                }
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!("socket ended while watching for {what}: {other:?}"),
            }
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.expect("send");
    }

    /// Sends a request with a fresh `ref` and returns its answer (`ack` or `error`),
    /// skipping events in between.
    pub async fn request(&mut self, mut v: Value) -> Value {
        self.next_ref += 1;
        let r = self.next_ref;
        v["ref"] = json!(r);
        self.send(v).await;
        self.next_where("answer", |m| {
            m["ref"] == json!(r) && (m["type"] == "ack" || m["type"] == "error")
        })
        .await
    }

    /// Waits for the hub to close the socket; returns the close frame.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("closed in time")
            {
                Some(Ok(Message::Close(f))) => return f,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

// ----- helpers for the api, widget, limits and ops tests -----

impl TestHub {
    /// A request without the API key (public endpoints, or to show the key is required).
    pub async fn public(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self.http.request(method, self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("request sent")
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let res = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics");
        assert_eq!(res.status().as_u16(), 200);
        res.text().await.unwrap()
    }
}

/// The value of the first sample of `metric` whose line contains every one of `labels`
/// (e.g. `kind="widget"`); None when absent.
pub fn metric_value(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(metric) && matches!(l.as_bytes().get(metric.len()), Some(b'{' | b' '))
        })
        .find(|l| labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

impl Client {
    /// Connects with extra request headers (e.g. a browser's `Origin`).
    pub async fn connect_with_headers(url: &str, headers: &[(&str, &str)]) -> Client {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("connect in time")
            .expect("upgrade accepted");
        Client { ws, next_ref: 0 }
    }

    /// Waits for the hub's close frame, answers it and reads to the end (so the hub's close
    /// handshake completes at once); returns the close code, None when the socket just ended.
    pub async fn close_code(&mut self) -> Option<u16> {
        let frame = self.closed().await;
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
        frame.map(|f| u16::from(f.code))
    }
}

// ----- chats, departments, visitors (appended for tests/chats.rs and tests/assignment.rs) -----

impl TestHub {
    /// `POST /api/v1/chats`; returns the chat and its visitor token.
    pub async fn create_chat(&self, body: Value) -> (Value, String) {
        let (status, v) = self.post("/api/v1/chats", body).await;
        assert_eq!(status, 201, "POST chat: {v}");
        let token = v["visitor_token"]
            .as_str()
            .expect("visitor_token")
            .to_string();
        (v["chat"].clone(), token)
    }

    /// `GET /api/v1/chats/{id}`.
    pub async fn chat_view(&self, id: u64) -> Value {
        let (status, v) = self.get(&format!("/api/v1/chats/{id}")).await;
        assert_eq!(status, 200, "GET chat {id}: {v}");
        v
    }

    /// `PUT /api/v1/departments/{id}`.
    pub async fn put_department(&self, id: u64, body: Value) -> Value {
        let (status, v) = self.put(&format!("/api/v1/departments/{id}"), body).await;
        assert!(
            status == 200 || status == 201,
            "PUT department {id}: {status} {v}"
        );
        v
    }

    pub fn visitor_url(&self, chat: u64, token: &str) -> String {
        self.ws_url(&format!("/ws/visitor?chat={chat}&token={token}"))
    }

    /// A visitor socket, with its first `chat` frame already read.
    /// A visitor's socket, after its `chat` frame and `history` frame (returned: the chat).
    pub async fn visitor(&self, chat: u64, token: &str) -> (Client, Value) {
        let (c, first, history) = self.visitor_with_history(chat, token).await;
        assert_eq!(history["messages"], serde_json::json!([]), "{history}");
        (c, first)
    }

    /// A visitor's socket with its first two frames: the chat and its history.
    pub async fn visitor_with_history(&self, chat: u64, token: &str) -> (Client, Value, Value) {
        let mut c = Client::connect(&self.visitor_url(chat, token)).await;
        let first = c.next().await;
        assert_eq!(first["type"], "chat", "{first}");
        let history = c.next().await;
        assert_eq!(history["type"], "history", "{history}");
        assert_eq!(history["chat"], chat, "{history}");
        (c, first, history)
    }

    /// Polls the HTTP API until `pred` holds for `path`'s answer (for changes no socket
    /// of the test is told about, e.g. a socket's close being processed); panics after [`WAIT`].
    pub async fn poll_until(&self, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, v) = self.get(path).await;
            if pred(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} not reached: {v}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Client {
    /// Every message already received, without waiting (keeps the hub's queue for this
    /// socket short in long tests).
    pub async fn drain(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::ZERO, self.ws.next()).await {
            if let Message::Text(t) = msg {
                out.push(serde_json::from_str(&t).expect("JSON text"));
            }
        }
        out
    }
}

/// Every key of the flat operator view (SPEC.md section 2).
pub const VIEW_KEYS: [&str; 18] = [
    "id",
    "name",
    "departments",
    "watch_departments",
    "permissions",
    "max_chats",
    "exclude_autoassign",
    "auto_accept",
    "online",
    "invisible",
    "always_online",
    "connections",
    "inactive",
    "active_chats",
    "pending_chats",
    "status",
    "status_reason",
    "misconfigured",
];

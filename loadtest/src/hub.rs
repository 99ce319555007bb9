//! The system under test: a presence-hub (spawned with a temp config, or already running at
//! `--hub-url`), the baseline server (spawned as a child `presence-loadtest baseline-server`)
//! or the uWebSockets.js peer (`node uws-server.js` from `loadtest/peers/uws/`), with its PID
//! for RSS/CPU figures and, for the hub, its back-end HTTP API.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Hub,
    /// The bare tokio-tungstenite broadcast server (`src/baseline.rs`).
    Baseline,
    /// µWebSockets through uWebSockets.js with its built-in pub/sub (`peers/uws/`).
    Uws,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Hub => "hub",
            TargetKind::Baseline => "baseline",
            TargetKind::Uws => "uws",
        }
    }

    /// Text frames a widget socket gets on open, per department: the hub and the baseline
    /// send the department's `widget_status`, the uWS peer sends nothing.
    pub fn widget_greeting(self) -> usize {
        match self {
            TargetKind::Hub | TargetKind::Baseline => 1,
            TargetKind::Uws => 0,
        }
    }
}

/// What `--compare` runs after the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// The bare tokio-tungstenite baseline server.
    Baseline,
    /// The uWebSockets.js peer server.
    Uws,
}

#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// What to load: the hub or the bare baseline server.
    #[arg(long, value_enum, default_value = "hub")]
    pub target: TargetKind,
    /// Run against the hub, then against the given peer server(s), spawned, and print hub/peer
    /// ratios: `--compare` alone = the baseline, `--compare uws`, `--compare baseline,uws`.
    #[arg(long, value_enum, num_args = 0..=1, value_delimiter = ',', default_missing_value = "baseline")]
    pub compare: Vec<Peer>,
    /// Directory of the uWebSockets.js peer (uws-server.js, package.json, package-lock.json);
    /// its node_modules are installed with `npm ci` when missing.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/uws"))]
    pub uws_dir: PathBuf,
    /// presence-hub binary to spawn [default: presence-hub next to this executable].
    #[arg(long)]
    pub hub_bin: Option<PathBuf>,
    /// Use running hub(s) instead of spawning one: comma separated base URLs
    /// (http://127.0.0.1:8080,…). Client sockets are spread over them round robin; HTTP API
    /// calls go to the first.
    #[arg(long = "hub-url", visible_alias = "url", value_delimiter = ',')]
    pub hub_url: Vec<String>,
    /// Use a running baseline server (base URL) instead of spawning one.
    #[arg(long)]
    pub baseline_url: Option<String>,
    /// PID(s) of the running hub(s), comma separated: RSS and CPU figures are their sum.
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// PID of the running baseline server (with --baseline-url).
    #[arg(long)]
    pub baseline_pid: Option<u32>,
    /// auth.api_key (written into a spawned hub's config).
    #[arg(long, default_value = "loadtest-api-key")]
    pub api_key: String,
    /// auth.jwt_secret; operator tokens are minted locally with it (HS256).
    #[arg(long, default_value = "loadtest-jwt-secret-0123456789abcdef")]
    pub jwt_secret: String,
    /// presence.disconnect_grace of a spawned hub.
    #[arg(long, default_value = "200ms")]
    pub grace: String,
    /// limits.max_connections of a spawned hub.
    #[arg(long, default_value_t = 19_000)]
    pub max_connections: u64,
    /// Extra environment for a spawned hub, KEY=VALUE (repeatable). RUST_LOG defaults to warn.
    #[arg(long = "hub-env")]
    pub hub_env: Vec<String>,
    /// Loopback source addresses client sockets are bound to, rotating (127.0.0.2, …).
    #[arg(long, default_value_t = 16)]
    pub sources: usize,
    /// First id of the operators/departments the run creates [default: 1 on a spawned hub,
    /// time based on a running one so reruns do not collide].
    #[arg(long)]
    pub id_base: Option<u64>,
    /// Keep a spawned hub's temp dir (config, data, hub.log) for inspection.
    #[arg(long)]
    pub keep_tmp: bool,
}

impl TargetArgs {
    /// Targets to run, in order.
    pub fn kinds(&self) -> Vec<TargetKind> {
        if self.compare.is_empty() {
            return vec![self.target];
        }
        let mut kinds = vec![TargetKind::Hub];
        for peer in &self.compare {
            let kind = match peer {
                Peer::Baseline => TargetKind::Baseline,
                Peer::Uws => TargetKind::Uws,
            };
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        kinds
    }

    /// Whether any peer server runs besides the hub (`--compare …` or `--target` ≠ hub).
    pub fn has_peer(&self) -> bool {
        !self.compare.is_empty() || self.target != TargetKind::Hub
    }

    pub fn id_base(&self) -> u64 {
        self.id_base.unwrap_or_else(|| {
            if self.hub_url.is_empty() {
                1
            } else {
                // Seconds since 2025 × 100k: a fresh range per run on a long-lived hub.
                let secs = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                (secs - 1_735_689_600) * 100_000
            }
        })
    }
}

/// A running target.
pub struct Target {
    pub kind: TargetKind,
    /// Base URLs, http://host:port.
    pub urls: Vec<String>,
    pub pids: Vec<u32>,
    api: Option<Api>,
    pub jwt_secret: String,
    child: Option<Child>,
    tmp: Option<tempfile::TempDir>,
    log_path: Option<PathBuf>,
}

impl Target {
    pub async fn start(kind: TargetKind, args: &TargetArgs) -> Result<Target> {
        match kind {
            TargetKind::Hub if !args.hub_url.is_empty() => {
                let api = Api::new(&args.hub_url[0], &args.api_key)?;
                if !api.ready().await {
                    bail!(
                        "hub at {} does not answer GET /readyz with 200",
                        args.hub_url[0]
                    );
                }
                Ok(Target {
                    kind,
                    urls: args.hub_url.clone(),
                    pids: args.pid.clone(),
                    api: Some(api),
                    jwt_secret: args.jwt_secret.clone(),
                    child: None,
                    tmp: None,
                    log_path: None,
                })
            }
            TargetKind::Hub => spawn_hub(args).await,
            TargetKind::Baseline => match (&args.baseline_url, args.target) {
                (Some(url), _) => {
                    let pids = args.baseline_pid.into_iter().collect();
                    Ok(Target::external_baseline(vec![url.clone()], pids, args))
                }
                // `--target baseline --hub-url …`: the URLs (and PIDs) are baseline servers.
                (None, TargetKind::Baseline) if !args.hub_url.is_empty() => {
                    let mut pids: Vec<u32> = args.baseline_pid.into_iter().collect();
                    if pids.is_empty() {
                        pids = args.pid.clone();
                    }
                    Ok(Target::external_baseline(args.hub_url.clone(), pids, args))
                }
                _ => spawn_baseline(args).await,
            },
            TargetKind::Uws => spawn_uws(args).await,
        }
    }

    fn external_baseline(urls: Vec<String>, pids: Vec<u32>, args: &TargetArgs) -> Target {
        Target {
            kind: TargetKind::Baseline,
            urls,
            pids,
            api: None,
            jwt_secret: args.jwt_secret.clone(),
            child: None,
            tmp: None,
            log_path: None,
        }
    }

    pub fn api(&self) -> Result<&Api> {
        self.api
            .as_ref()
            .ok_or_else(|| anyhow!("the {} has no HTTP API", self.kind.name()))
    }

    /// Resident memory of the target process(es), KiB (None without a PID).
    pub fn rss_kib(&self) -> Option<u64> {
        if self.pids.is_empty() {
            return None;
        }
        self.pids.iter().map(|p| proc_rss_kib(*p)).sum()
    }

    /// CPU seconds (user + system) used so far by the target process(es).
    pub fn cpu_secs(&self) -> Option<f64> {
        if self.pids.is_empty() {
            return None;
        }
        self.pids.iter().map(|p| proc_cpu_secs(*p)).sum()
    }

    /// Fails (with the end of the hub's log) if a spawned target has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = &mut self.child
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "the {} exited: {status}\n{}",
                self.kind.name(),
                self.log_tail(30)
            );
        }
        Ok(())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let Some(path) = &self.log_path else {
            return String::new();
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "--- last lines of {} ---\n{}",
            path.display(),
            all[from..].join("\n")
        )
    }

    /// Stop a spawned target (SIGTERM, then SIGKILL after 5 s). A running one is left alone.
    pub async fn shutdown(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "the {} had already exited: {status}\n{}",
                self.kind.name(),
                self.log_tail(30)
            );
        }
        if let Some(pid) = child.id() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "the {} did not stop within 5 s of SIGTERM; killing it",
                self.kind.name()
            );
            child.kill().await?;
        }
        Ok(())
    }
}

pub fn proc_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) closed by ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) as f64 / hz)
}

/// CPU seconds used by this load-tester process so far.
pub fn own_cpu_secs() -> f64 {
    proc_cpu_secs(std::process::id()).unwrap_or(0.0)
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn default_hub_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.with_file_name("presence-hub")
}

/// Kill the child if this process dies, whatever the way.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

async fn spawn_hub(args: &TargetArgs) -> Result<Target> {
    let bin = args.hub_bin.clone().unwrap_or_else(default_hub_bin);
    if !bin.exists() {
        bail!(
            "hub binary {} not found (cargo build --release -p presence-hub, or --hub-bin)",
            bin.display()
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("presence-loadtest-")
        .tempdir()?;
    let port = free_port()?;
    let config = format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[auth]
jwt_secret = "{secret}"
api_key = "{key}"

[store]
data_dir = "{data}"

[presence]
disconnect_grace = "{grace}"

[limits]
max_connections = {maxc}
"#,
        secret = args.jwt_secret,
        key = args.api_key,
        data = tmp.path().join("data").display(),
        grace = args.grace,
        maxc = args.max_connections,
    );
    let config_path = tmp.path().join("hub.toml");
    std::fs::write(&config_path, config)?;
    let log_path = tmp.path().join("hub.log");
    let log = std::fs::File::create(&log_path)?;

    let mut cmd = Command::new(&bin);
    cmd.arg("serve")
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    for kv in &args.hub_env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--hub-env wants KEY=VALUE"))?;
        cmd.env(k, v);
    }
    die_with_parent(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    let pid = child.id().unwrap_or(0);
    let url = format!("http://127.0.0.1:{port}");
    let mut target = Target {
        kind: TargetKind::Hub,
        urls: vec![url.clone()],
        pids: vec![pid],
        api: Some(Api::new(&url, &args.api_key)?),
        jwt_secret: args.jwt_secret.clone(),
        child: Some(child),
        tmp: Some(tmp),
        log_path: Some(log_path),
    };
    if args.keep_tmp {
        let dir = target.tmp.take().unwrap().keep();
        eprintln!("hub temp dir (kept): {}", dir.display());
        target.log_path = Some(dir.join("hub.log"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        target.check_alive()?;
        if target.api()?.ready().await {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "spawned hub not ready (GET /readyz) within 30 s\n{}",
                target.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("hub spawned: pid {pid}, {url}");
    Ok(target)
}

async fn spawn_baseline(args: &TargetArgs) -> Result<Target> {
    let port = free_port()?;
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("baseline-server")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    let child = cmd.spawn().context("spawning the baseline server")?;
    let pid = child.id().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("baseline server did not listen within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Target {
        kind: TargetKind::Baseline,
        urls: vec![format!("http://127.0.0.1:{port}")],
        pids: vec![pid],
        api: None,
        jwt_secret: args.jwt_secret.clone(),
        child: Some(child),
        tmp: None,
        log_path: None,
    })
}

/// Start the uWebSockets.js peer: `node uws-server.js` in `--uws-dir` (after `npm ci` when
/// its node_modules are missing), PORT and PIDS_FILE in its environment; its PID is the one
/// it writes to PIDS_FILE.
async fn spawn_uws(args: &TargetArgs) -> Result<Target> {
    let dir = &args.uws_dir;
    if !dir.join("uws-server.js").exists() {
        bail!("no uws-server.js in {} (--uws-dir)", dir.display());
    }
    if !dir.join("node_modules").join("uwebsockets").exists() {
        eprintln!(
            "installing the uWS peer's node_modules (npm ci in {})…",
            dir.display()
        );
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .await
            .context("running npm ci (is Node 20 with npm installed?)")?;
        if !status.success() {
            bail!("npm ci in {} failed: {status}", dir.display());
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("presence-loadtest-uws-")
        .tempdir()?;
    let pids_file = tmp.path().join("pids");
    let log_path = tmp.path().join("uws.log");
    let log = std::fs::File::create(&log_path)?;
    let port = free_port()?;
    let mut cmd = Command::new("node");
    cmd.arg("uws-server.js")
        .current_dir(dir)
        .env("PORT", port.to_string())
        .env("PIDS_FILE", &pids_file)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    let child = cmd.spawn().context("spawning node uws-server.js")?;
    let mut target = Target {
        kind: TargetKind::Uws,
        urls: vec![format!("http://127.0.0.1:{port}")],
        pids: Vec::new(),
        api: None,
        jwt_secret: args.jwt_secret.clone(),
        child: Some(child),
        tmp: Some(tmp),
        log_path: Some(log_path),
    };
    // The server writes its PID once it listens.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        target.check_alive()?;
        let pids = std::fs::read_to_string(&pids_file).unwrap_or_default();
        let pid = pids
            .lines()
            .find_map(|l| l.strip_prefix("server ")?.trim().parse::<u32>().ok());
        if let Some(pid) = pid {
            target.pids = vec![pid];
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the uWS peer did not listen within 15 s\n{}",
                target.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("uws spawned: pid {}, {}", target.pids[0], target.urls[0]);
    Ok(target)
}

/// Publishes to the uWS peer's `POST /publish` in order, one request at a time on one
/// keep-alive connection (concurrent requests could overtake each other and reorder flips).
pub struct UwsPublisher {
    tx: tokio::sync::mpsc::UnboundedSender<Value>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl UwsPublisher {
    pub fn new(base: &str) -> Result<UwsPublisher> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let url = format!("{}/publish", base.trim_end_matches('/'));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
        let task = tokio::spawn(async move {
            while let Some(body) = rx.recv().await {
                let resp = http.post(&url).json(&body).send().await?;
                if !resp.status().is_success() {
                    bail!("POST /publish → {}", resp.status());
                }
            }
            Ok(())
        });
        Ok(UwsPublisher { tx, task })
    }

    /// Queue one publish; it is sent after every one queued before it.
    pub fn publish(&self, body: Value) -> Result<()> {
        self.tx
            .send(body)
            .map_err(|_| anyhow!("the uWS publisher stopped"))
    }

    /// Wait until every queued publish was answered.
    pub async fn finish(self) -> Result<()> {
        drop(self.tx);
        self.task.await?
    }
}

/// An operator JWT: HS256, claims `sub` (id as a string) and `exp`.
pub fn mint_token(secret: &str, operator: u64, ttl: Duration) -> Result<String> {
    let exp = (SystemTime::now() + ttl)
        .duration_since(UNIX_EPOCH)?
        .as_secs();
    let claims = json!({ "sub": operator.to_string(), "exp": exp });
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &key,
    )?)
}

/// The hub's back-end HTTP API.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    pub fn new(base: &str, key: &str) -> Result<Api> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(Api {
            http,
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
        })
    }

    pub async fn ready(&self) -> bool {
        match self.http.get(format!("{}/readyz", self.base)).send().await {
            Ok(r) => r.status() == StatusCode::OK,
            Err(_) => false,
        }
    }

    /// One call; a status outside 2xx is an error naming the call and the body.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = &body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "{method} {path} → {status}: {}",
                text.chars().take(300).collect::<String>()
            );
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .with_context(|| format!("{method} {path}: body is not JSON: {text}"))
    }

    pub async fn put_operator(
        &self,
        id: u64,
        departments: &[u64],
        max_chats: u32,
    ) -> Result<Value> {
        let body = json!({
            "name": format!("op{id}"),
            "departments": departments,
            "permissions": ["change_online_status", "change_visibility", "change_always_online"],
            "max_chats": max_chats,
        });
        self.call(Method::PUT, &format!("/api/v1/operators/{id}"), Some(body))
            .await
    }

    pub async fn put_department(&self, id: u64, max_chats: u32) -> Result<Value> {
        let body =
            json!({ "name": format!("d{id}"), "max_chats": max_chats, "accept_timeout": "0s" });
        self.call(
            Method::PUT,
            &format!("/api/v1/departments/{id}"),
            Some(body),
        )
        .await
    }

    pub async fn set_online(&self, operator: u64, online: bool) -> Result<Value> {
        let path = format!("/api/v1/operators/{operator}/status");
        self.call(Method::PATCH, &path, Some(json!({ "online": online })))
            .await
    }

    /// Create a pending chat; its id.
    pub async fn create_chat(&self, department: u64) -> Result<u64> {
        let v = self
            .call(
                Method::POST,
                "/api/v1/chats",
                Some(json!({ "department": department })),
            )
            .await?;
        let chat = v.get("chat").unwrap_or(&v);
        chat.get("id")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("POST /api/v1/chats: no chat id in {v}"))
    }

    /// `GET path`, then the array under `field` (or the body itself if it is an array),
    /// following `next` through every page of a paged list.
    async fn list(&self, path: &str, field: &str) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut page_path = path.to_string();
        loop {
            let v = self.call(Method::GET, &page_path, None).await?;
            let next = v.get("next").and_then(Value::as_u64);
            match v {
                Value::Array(a) => return Ok(a),
                Value::Object(mut o) => match o.remove(field) {
                    Some(Value::Array(a)) => out.extend(a),
                    _ => bail!("GET {path}: no `{field}` array in the answer"),
                },
                other => bail!("GET {path}: unexpected answer {other}"),
            }
            match next {
                Some(after) => {
                    let sep = if path.contains('?') { '&' } else { '?' };
                    page_path = format!("{path}{sep}limit=1000&after={after}");
                }
                None => return Ok(out),
            }
        }
    }

    /// Closes a chat (`POST /api/v1/chats/{id}/close`).
    pub async fn close_chat(&self, id: u64) -> Result<()> {
        self.call(
            Method::POST,
            &format!("/api/v1/chats/{id}/close"),
            Some(json!({})),
        )
        .await
        .map(|_| ())
    }

    pub async fn chats(&self, department: u64) -> Result<Vec<Value>> {
        self.list(&format!("/api/v1/chats?department={department}"), "chats")
            .await
    }

    /// Every chat (no filter).
    pub async fn all_chats(&self) -> Result<Vec<Value>> {
        self.list("/api/v1/chats", "chats").await
    }

    pub async fn operators(&self, query: &str) -> Result<Vec<Value>> {
        self.list(&format!("/api/v1/operators?{query}"), "operators")
            .await
    }

    /// Prometheus text of GET /metrics.
    pub async fn metrics(&self) -> Result<String> {
        let resp = self
            .http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.key)
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("GET /metrics → {status}");
        }
        Ok(text)
    }

    /// Counters and gauges named `presence_hub_*` from GET /metrics, summed over labels
    /// (histogram series left out).
    pub async fn metric_totals(&self) -> Result<BTreeMap<String, f64>> {
        let text = self.metrics().await?;
        let mut totals = BTreeMap::new();
        for line in text.lines().filter(|l| l.starts_with("presence_hub_")) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            if ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.ends_with(s))
                || series.contains("quantile=")
            {
                continue;
            }
            if let Ok(v) = value.parse::<f64>() {
                *totals.entry(name.to_string()).or_default() += v;
            }
        }
        Ok(totals)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        json: Option<String>,
    }

    fn kinds(args: &[&str]) -> Vec<TargetKind> {
        let cli = Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .expect("arguments parse");
        cli.target.kinds()
    }

    #[test]
    fn compare_alone_means_the_baseline() {
        use TargetKind::*;
        assert_eq!(kinds(&[]), vec![Hub]);
        assert_eq!(kinds(&["--compare"]), vec![Hub, Baseline]);
        // A flag right after `--compare` is not taken as its value.
        assert_eq!(
            kinds(&["--compare", "--json", "x.json"]),
            vec![Hub, Baseline]
        );
    }

    #[test]
    fn compare_names_the_peers() {
        use TargetKind::*;
        assert_eq!(kinds(&["--compare", "uws"]), vec![Hub, Uws]);
        assert_eq!(kinds(&["--compare=uws"]), vec![Hub, Uws]);
        assert_eq!(
            kinds(&["--compare", "baseline,uws"]),
            vec![Hub, Baseline, Uws]
        );
        assert_eq!(kinds(&["--compare", "uws,uws"]), vec![Hub, Uws]);
        assert_eq!(kinds(&["--target", "uws"]), vec![Uws]);
        assert!(Cli::try_parse_from(["t", "--compare", "socketio"]).is_err());
    }
}

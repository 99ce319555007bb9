//! Running the hub (SPEC.md sections 6, 7 and 8): health, readiness, metrics, graceful
//! shutdown and restart on the same data, and the real binary with its CLI, config file,
//! environment overrides, generated secrets and SIGTERM.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Client, TestHub, metric_value};
use reqwest::Method;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_presence-hub");

#[tokio::test]
async fn healthz_and_readyz_answer_200() {
    let hub = TestHub::start().await;
    let res = hub.public(Method::GET, "/healthz", &[]).await;
    assert_eq!(res.status().as_u16(), 200);
    let res = hub.public(Method::GET, "/readyz", &[]).await;
    assert_eq!(res.status().as_u16(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["ready"], true, "{v}");
}

#[tokio::test]
async fn metrics_count_connections_operators_events_and_http_latency() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    let (_op, _) = hub.connect(1).await;
    let (_op_b, _) = hub.connect(1).await;
    let mut w = hub.widget(&[1]).await;
    assert_eq!(w.next().await["online"], true);

    let res = hub.public(Method::GET, "/metrics", &[]).await;
    assert_eq!(res.status().as_u16(), 200);
    let ctype = res.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let text = res.text().await.unwrap();
    let value = |m: &str, labels: &[&str]| {
        metric_value(&text, m, labels).unwrap_or_else(|| panic!("no {m} {labels:?} in\n{text}"))
    };
    assert_eq!(
        value("presence_hub_connections", &["kind=\"operator\""]),
        2.0
    );
    assert_eq!(value("presence_hub_connections", &["kind=\"widget\""]), 1.0);
    assert_eq!(
        value("presence_hub_connections", &["kind=\"visitor\""]),
        0.0
    );
    assert_eq!(value("presence_hub_operators_online", &[]), 1.0);
    assert!(
        value("presence_hub_events_sent_total", &[]) >= 3.0,
        "hellos and the widget state were sent"
    );
    // HTTP latency: a histogram (rendered as a summary) with method and status labels.
    let puts = value(
        "presence_hub_http_request_duration_seconds_count",
        &["method=\"PUT\"", "status=\"201\""],
    );
    assert!(puts >= 2.0, "{puts}");
    assert!(
        value(
            "presence_hub_http_request_duration_seconds_sum",
            &["method=\"PUT\""]
        ) > 0.0
    );

    // The gauges follow the hub.
    hub.patch("/api/v1/operators/2/status", json!({"always_online":true}))
        .await;
    let text = hub.metrics_text().await;
    assert_eq!(
        metric_value(&text, "presence_hub_operators_online", &[]),
        Some(2.0)
    );
}

#[tokio::test]
async fn graceful_shutdown_closes_sockets_with_1001() {
    let mut hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    let mut w = hub.widget(&[1]).await;
    w.next().await;
    let started = Instant::now();
    let (_, op_code, w_code) = tokio::join!(hub.stop(), op.close_code(), w.close_code());
    assert_eq!(op_code, Some(1001));
    assert_eq!(w_code, Some(1001));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "stopped in {:?}",
        started.elapsed()
    );
    assert!(
        tokio::net::TcpStream::connect(hub.addr).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn restart_keeps_operators_settings_and_departments() {
    let hub = TestHub::start().await;
    hub.operator_with(
        1,
        json!({"name":"Ann","departments":[1],"watch_departments":[2],"permissions":["open_all"],
            "max_chats":3,"exclude_autoassign":true,"auto_accept":true}),
    )
    .await;
    let (status, _) = hub
        .patch(
            "/api/v1/operators/1/status",
            json!({"online":false,"invisible":true}),
        )
        .await;
    assert_eq!(status, 200);
    hub.operator(3, &[1]).await;
    let (status, _) = hub.delete("/api/v1/operators/3").await;
    assert_eq!(status, 204);
    let (status, _) = hub
        .put(
            "/api/v1/departments/1",
            json!({"name":"Sales","assignment":"round_robin","max_chats":2,"accept_timeout":"30s","pending_max":5,"bot":true}),
        )
        .await;
    assert_eq!(status, 200);
    let op_before = hub.view(1).await;
    let (_, dept_before) = hub.get("/api/v1/departments/1").await;

    let dir = hub.stop_keep_dir().await;
    let mut hub = TestHub::start_in(dir.path(), |_| {}).await;
    assert_eq!(hub.view(1).await, op_before);
    assert_eq!(op_before["invisible"], true);
    let (status, dept_after) = hub.get("/api/v1/departments/1").await;
    assert_eq!(status, 200);
    assert_eq!(dept_after, dept_before);
    assert_eq!(dept_after["name"], "Sales");
    let (status, _) = hub.get("/api/v1/operators/3").await;
    assert_eq!(status, 404, "a deletion is kept too");
    hub.stop().await;
}

#[tokio::test]
async fn restart_always_online_operator_is_online_before_anyone_connects() {
    let hub = TestHub::start().await;
    hub.operator_with(
        5,
        json!({"name":"Bo","departments":[3],"always_online":true}),
    )
    .await;
    hub.operator(6, &[4]).await;
    let dir = hub.stop_keep_dir().await;

    let mut hub = TestHub::start_in(dir.path(), |_| {}).await;
    let v = hub.view(5).await;
    assert_eq!(v["status"], "online", "{v}");
    assert_eq!(v["connections"], 0);
    assert!(v["status_reason"].is_null());
    let (_, list) = hub.get("/api/v1/operators?status=online").await;
    assert_eq!(list["operators"].as_array().unwrap().len(), 1, "{list}");
    let res = hub
        .public(Method::GET, "/api/v1/widget/status?department=3", &[])
        .await;
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"department":3,"online":true,"reason":"operators"})
    );
    let mut w = hub.widget(&[3, 4]).await;
    let a = w.next().await;
    let b = w.next().await;
    let (on, off) = if a["department"] == 3 { (a, b) } else { (b, a) };
    assert_eq!(on["online"], true);
    assert_eq!(
        off["online"], false,
        "an operator without always_online is not"
    );
    hub.stop().await;
}

// ----- the real binary -----

/// A free port: bind 127.0.0.1:0 and let it go.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A command for the binary without the caller's `PRESENCE_HUB_*` variables.
fn command(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("PRESENCE_HUB_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    cmd
}

/// A config file with a fresh data dir and empty secrets (generated on start).
fn write_config(dir: &Path, port: u16) -> PathBuf {
    let path = dir.join("hub.toml");
    let data = dir.join("data");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[auth]\njwt_secret = \"\"\napi_key = \"\"\n\n\
         [store]\ndata_dir = {data:?}\n\n[presence]\ndisconnect_grace = \"300ms\"\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

struct Running {
    child: tokio::process::Child,
    log: PathBuf,
    port: u16,
}

impl Running {
    /// Starts `serve` and waits until `/healthz` answers (nothing to await but polling: the
    /// child is another process).
    async fn start(mut cmd: tokio::process::Command, dir: &Path, port: u16) -> Running {
        let log = dir.join("hub.log");
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        cmd.stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("binary starts");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "hub exited with {status}:\n{}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            if let Ok(res) = http
                .get(format!("http://127.0.0.1:{port}/healthz"))
                .send()
                .await
                && res.status().is_success()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "hub not up:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Running { child, log, port }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn terminate(&self) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    async fn exit_status(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("no exit after SIGTERM:\n{}", self.logs()))
            .unwrap()
    }
}

fn secret_file(dir: &Path, name: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("data").join(name);
    let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "{} mode",
        path.display()
    );
    let s = std::fs::read_to_string(&path).unwrap().trim().to_string();
    assert!(s.len() >= 32, "a real secret in {}", path.display());
    s
}

#[tokio::test]
async fn binary_serves_generates_secrets_and_exits_0_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(tmp.path(), port);
    let mut hub = Running::start(
        command(&["serve", "--config", config.to_str().unwrap()]),
        tmp.path(),
        port,
    )
    .await;

    let api_key = secret_file(tmp.path(), "api_key");
    let jwt_secret = secret_file(tmp.path(), "jwt_secret");
    assert_ne!(api_key, jwt_secret);
    let logs = hub.logs();
    for name in ["api_key", "jwt_secret"] {
        let path = tmp.path().join("data").join(name);
        assert!(
            logs.contains(&path.display().to_string()),
            "the log says where {name} is:\n{logs}"
        );
    }
    assert!(
        !logs.contains(&api_key),
        "the log never shows the key itself"
    );

    // The generated key opens the API, another does not.
    let http = reqwest::Client::new();
    let put = |key: &str| {
        http.put(hub.url("/api/v1/operators/1"))
            .bearer_auth(key)
            .json(&json!({"name":"a","departments":[1]}))
            .send()
    };
    assert_eq!(put("wrong").await.unwrap().status().as_u16(), 401);
    assert_eq!(put(&api_key).await.unwrap().status().as_u16(), 201);

    // `token --operator 1` mints with the generated secret: the running hub accepts it.
    let out = command(&[
        "token",
        "--operator",
        "1",
        "--config",
        config.to_str().unwrap(),
    ])
    .output()
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let mut op = Client::connect(&format!("ws://127.0.0.1:{port}/ws/operator?token={token}")).await;
    let hello = op.next().await;
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["operator"]["id"], 1);
    assert_eq!(hello["operator"]["status"], "online");

    // SIGTERM: sockets closed with 1001, exit status 0.
    hub.terminate();
    assert_eq!(op.close_code().await, Some(1001));
    let status = hub.exit_status().await;
    assert_eq!(status.code(), Some(0), "{status}:\n{}", hub.logs());

    // Started again, the secrets are read back, not generated anew.
    let mut again = Running::start(
        command(&["--config", config.to_str().unwrap()]),
        tmp.path(),
        port,
    )
    .await;
    assert_eq!(secret_file(tmp.path(), "api_key"), api_key);
    let res = http
        .get(again.url("/api/v1/operators/1"))
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200, "the operator was kept too");
    again.terminate();
    assert_eq!(again.exit_status().await.code(), Some(0));
}

#[tokio::test]
async fn binary_env_override_of_listen_address() {
    let tmp = tempfile::tempdir().unwrap();
    let file_port = free_port();
    let env_port = free_port();
    let config = write_config(tmp.path(), file_port);
    let mut cmd = command(&["--config", config.to_str().unwrap()]);
    cmd.env(
        "PRESENCE_HUB_SERVER_LISTEN",
        format!("127.0.0.1:{env_port}"),
    );
    let mut hub = Running::start(cmd, tmp.path(), env_port).await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", file_port))
            .await
            .is_err(),
        "the file's address is not used"
    );
    hub.terminate();
    assert_eq!(hub.exit_status().await.code(), Some(0));
}

async fn check_config(text: Option<&str>, env: &[(&str, &str)]) -> (i32, String) {
    let tmp = tempfile::tempdir().unwrap();
    let path = match text {
        Some(t) => {
            let p = tmp.path().join("c.toml");
            std::fs::write(&p, t).unwrap();
            p
        }
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"),
    };
    let mut cmd = command(&["check-config", "--config", path.to_str().unwrap()]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("exited"), text)
}

#[tokio::test]
async fn check_config_accepts_the_default_config() {
    let (code, out) = check_config(None, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok"), "{out}");
}

#[tokio::test]
async fn check_config_refuses_unknown_keys() {
    let (code, out) = check_config(
        Some("[server]\nlisten = \"127.0.0.1:8080\"\nlisen = \"x\"\n"),
        &[],
    )
    .await;
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("lisen"), "names the key: {out}");
    let (code, out) = check_config(Some("[serverr]\n"), &[]).await;
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("serverr"), "names the section: {out}");
    let (code, out) = check_config(None, &[("PRESENCE_HUB_LIMITS_MAX_CONECTIONS", "5")]).await;
    assert_ne!(code, 0, "{out}");
    assert!(out.to_lowercase().contains("max_conections"), "{out}");
}

#[tokio::test]
async fn check_config_refuses_bad_durations() {
    let (code, out) =
        check_config(Some("[presence]\ndisconnect_grace = \"5 parsecs\"\n"), &[]).await;
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("disconnect_grace") && out.contains("duration"),
        "{out}"
    );
    let (code, out) = check_config(Some("[presence]\nping_interval = 20\n"), &[]).await;
    assert_ne!(code, 0, "a number is not a duration: {out}");
    assert!(out.contains("ping_interval"), "{out}");
}

#[tokio::test]
async fn check_config_refuses_bad_addresses() {
    let (code, out) = check_config(Some("[server]\nlisten = \"localhost\"\n"), &[]).await;
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("server.listen") && out.contains("address"),
        "{out}"
    );
    let (code, out) =
        check_config(None, &[("PRESENCE_HUB_SERVER_LISTEN", "127.0.0.1:99999")]).await;
    assert_ne!(code, 0, "an override is checked too: {out}");
    assert!(out.contains("address"), "{out}");
}

#[tokio::test]
async fn check_config_refuses_a_missing_file() {
    let out = command(&["check-config", "--config", "/nonexistent/hub.toml"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/hub.toml"));
}

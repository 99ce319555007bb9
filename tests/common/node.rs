//! Cluster nodes for tests: in this process (a [`TestHub`] on Redis), or as the real binary
//! in a process of its own, so that it can be killed with SIGKILL.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use presence_hub::config::{Backend, Config};

use super::redis::RedisServer;
use super::{API_KEY, JWT_SECRET, TestHub};

/// A node of the cluster on `redis`, named `id`, lease 600 ms unless `tweak` says otherwise.
pub async fn redis_node(redis: &RedisServer, id: &str, tweak: impl FnOnce(&mut Config)) -> TestHub {
    let url = redis.url();
    let id = id.to_string();
    TestHub::start_with(move |cfg| {
        cfg.store.backend = Backend::Redis;
        cfg.store.redis_url.0 = url;
        cfg.server.node_id = id;
        cfg.cluster.node_lease = Duration::from_millis(600);
        tweak(cfg);
    })
    .await
}

/// The real `presence-hub` binary as a node of the cluster on `redis`.
pub struct NodeProcess {
    pub port: u16,
    /// `http://127.0.0.1:port`.
    pub base: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl NodeProcess {
    /// Starts node `id` with the test secrets and `extra` TOML appended to its config
    /// (sections other than `[server]`, `[auth]` and `[store]`), and waits until it is ready.
    pub async fn start(redis: &RedisServer, id: &str, extra: &str) -> NodeProcess {
        Self::start_url(&redis.url(), id, extra).await
    }

    /// Like [`NodeProcess::start`], on Redis at `url` (a [`super::proxy::Proxy`]).
    pub async fn start_url(url: &str, id: &str, extra: &str) -> NodeProcess {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("node.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nnode_id = \"{id}\"\n[auth]\njwt_secret = \"{JWT_SECRET}\"\napi_key = \"{API_KEY}\"\n\
                 [store]\nbackend = \"redis\"\nredis_url = \"{}\"\ndata_dir = \"{}\"\n{extra}",
                url,
                dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_presence-hub"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let node = NodeProcess {
            port,
            base: format!("http://127.0.0.1:{port}"),
            child,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        for _ in 0..400 {
            if http
                .get(format!("{}/readyz", node.base))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return node;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("node {id} did not become ready");
    }

    /// SIGSTOP: the process stops where it is (a long GC pause, a frozen VM).
    pub fn pause(&self) {
        let _ = Command::new("kill")
            .args(["-STOP", &self.child.id().to_string()])
            .status();
    }

    /// SIGCONT after [`NodeProcess::pause`].
    pub fn resume(&self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
    }

    /// SIGTERM (a clean shutdown), and waits (10 s at most) for the process to exit.
    pub async fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..1000 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the node did not stop within 10 s of SIGTERM");
    }

    /// kill -9, and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

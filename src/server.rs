//! The accept loop: one hyper HTTP/1 connection per socket (the WebSocket upgrades leave
//! it), shutdown injected as a future, connections drained before the store is flushed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::auth::Secrets;
use crate::cluster::Cluster;
use crate::config::{Backend, Config};
use crate::hub::Hub;
use crate::store::Store;
use crate::store::embedded::Embedded;
use crate::store::redis::{Keys, RedisStore, claim_node, hold_node};

/// Opens the store the config names.
pub async fn open_store(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    match cfg.store.backend {
        Backend::Embedded => Ok(Arc::new(Embedded::open(&cfg.store.data_dir)?)),
        Backend::Redis => {
            let url = cfg.store.redis_url.as_str();
            Ok(Arc::new(
                RedisStore::open_with(url, &cfg.store.key_prefix, cfg.events.max_events).await?,
            ))
        }
    }
}

/// Builds the hub from a config: secrets, store, state. With Redis, the node first claims
/// its `node_id` (refused when a live node holds it) and keeps the lease while it runs.
pub async fn build(mut cfg: Config) -> anyhow::Result<Hub> {
    if cfg.server.node_id.is_empty() {
        let n: u32 = rand::random();
        cfg.server.node_id = format!("node-{n:08x}");
    }
    let secrets = Secrets::resolve(&cfg)?;
    let store = open_store(&cfg).await?;
    let mut lease = None;
    if cfg.store.backend == Backend::Redis {
        let keys = Keys(cfg.store.key_prefix.clone());
        let token = format!("{:016x}", rand::random::<u64>());
        let url = cfg.store.redis_url.as_str().to_string();
        let node = cfg.server.node_id.clone();
        if !claim_node(&url, &keys, &node, &token, cfg.cluster.node_lease).await? {
            anyhow::bail!(
                "server.node_id {node:?} is already alive in the cluster: give each node its own node_id"
            );
        }
        lease = Some((url, keys, node, token, cfg.cluster.node_lease));
    }
    let hub = Hub::open(cfg, secrets, store)?;
    if let Some((url, keys, node, token, ttl)) = lease {
        let cluster = Cluster::new(&url, keys.clone(), node.clone(), ttl)?;
        cluster.start(hub.clone()).await;
        hub.on_leave(tokio::spawn(hold_node(
            url,
            keys,
            node,
            token,
            ttl,
            hub.shutdown.clone(),
        )));
    }
    Ok(hub)
}

/// Serves until `shutdown` resolves; then closes every socket with 1001, waits for the
/// connection tasks and makes the store durable.
pub async fn run(listener: TcpListener, hub: Hub, shutdown: impl Future<Output = ()>) {
    crate::metrics::init();
    let app = crate::api::router(hub.clone())
        .merge(crate::console::router())
        .layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            crate::api::limits::body_deadline,
        ));
    let sweeper = tokio::spawn(hub.clone().sweep());
    let cleaner = tokio::spawn(hub.clone().clean());
    let webhooks =
        (!hub.cfg.webhooks.url.is_empty()).then(|| tokio::spawn(crate::webhooks::run(hub.clone())));
    let handshake = hub.cfg.limits.handshake_timeout;
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
            // The hub can end itself (its node id was taken over in the cluster).
            _ = hub.shutdown.cancelled() => break,
        };
        // HTTP connections count in `limits.max_connections` beside the sockets: a flood of
        // idle or slow requests must not run the process out of descriptors either.
        let Some(slot) = hub
            .limits
            .admit_http(hub.peers.len(), hub.cfg.limits.max_connections)
        else {
            metrics::counter!("presence_hub_connections_refused_total").increment(1);
            tokio::spawn(crate::api::limits::refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        if hub.cfg.limits.send_buffer > 0
            && let Err(e) =
                socket2::SockRef::from(&stream).set_send_buffer_size(hub.cfg.limits.send_buffer)
        {
            // Once: the same cause would fail every connection.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(cause = %e, "limits.send_buffer could not be set; the system's applies");
            });
        }
        // The peer's address rides along in the request, for the connection's log span.
        let svc = {
            let (app, hub) = (app.clone(), hub.clone());
            service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let mut req = req.map(axum::body::Body::new);
                req.extensions_mut().insert(crate::ws::PeerAddr(addr));
                crate::api::serve(app.clone(), hub.clone(), req)
            })
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(handshake)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = hub.shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(peer = %addr, cause = %e, "http connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down: closing connections");
    drop(listener);
    hub.shutdown.cancel();
    // Every socket closes with 1001 (through its peer: no socket task waits on the token).
    crate::ws::close_all(&hub);
    hub.tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), hub.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close within 10s");
    }
    let _ = sweeper.await;
    let _ = cleaner.await;
    if let Some(w) = webhooks {
        let _ = w.await;
    }
    let store_hub = hub.clone();
    let _ = tokio::task::spawn_blocking(move || store_hub.close_store()).await;
    hub.leave().await;
    tracing::info!("stopped");
}

/// Binds the listener with a deep accept backlog: connection bursts (a deploy, a network
/// blip reconnecting thousands of widgets) must not be dropped by the kernel and retried a
/// second later. tokio's `TcpListener::bind` uses 128.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

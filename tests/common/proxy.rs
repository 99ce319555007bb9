//! A TCP proxy on 127.0.0.1:0 in front of a server (Redis), to cut a node off without
//! touching the server: [`Proxy::cut`] stops forwarding in both directions and holds what
//! arrives (a partition: packets wait, as TCP would retransmit them), [`Proxy::heal`]
//! delivers what was held and forwards again, [`Proxy::drop_all`] closes every connection.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    healed: Arc<Notify>,
    /// Bumped to close every connection open now.
    drop_all: watch::Sender<u64>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let healed = Arc::new(Notify::new());
        let (drop_all, _) = watch::channel(0u64);
        let (c, h, d) = (cut.clone(), healed.clone(), drop_all.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, c.clone(), h.clone(), d.subscribe()));
                tokio::spawn(pipe(sr, cw, c.clone(), h.clone(), d.subscribe()));
            }
        });
        Proxy {
            addr,
            cut,
            healed,
            drop_all,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.healed.notify_waiters();
    }

    pub fn drop_all(&self) {
        self.drop_all.send_modify(|n| *n += 1);
    }
}

async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
    healed: Arc<Notify>,
    mut drop_all: watch::Receiver<u64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = drop_all.changed() => return,
        };
        // Cut off: what arrived waits (TCP retransmits it once the path is back).
        while cut.load(Ordering::SeqCst) {
            let wait = healed.notified();
            if !cut.load(Ordering::SeqCst) {
                break;
            }
            tokio::select! {
                _ = wait => {}
                _ = drop_all.changed() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
            }
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

//! Client side: WebSocket connections bound to rotating loopback source addresses
//! (127.0.0.2, 127.0.0.3, …) so tens of thousands of sockets never run out of ephemeral
//! ports, plus helpers to connect many at once and to hold them open.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::{
    net::{TcpSocket, TcpStream},
    sync::watch,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{self, Message, protocol::WebSocketConfig},
};

pub type Ws = WebSocketStream<TcpStream>;

/// Client buffers: small read buffer (thousands of sockets in this process) but no small
/// message limit, since a `hello` listing many chats can be large.
pub fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

/// Opens WebSocket connections to one or several targets (round robin), each bound to the
/// next loopback source address.
pub struct Connector {
    targets: Vec<(SocketAddr, String)>,
    sources: Vec<IpAddr>,
    next_source: AtomicUsize,
    next_target: AtomicUsize,
}

impl Connector {
    /// `http_urls`: base URLs such as `http://127.0.0.1:8080`; `sources`: how many loopback
    /// source addresses to rotate over (0 = let the kernel choose).
    pub async fn new(http_urls: &[String], sources: usize) -> Result<Self> {
        let mut targets = Vec::new();
        for url in http_urls {
            let hostport = url
                .trim_end_matches('/')
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("ws://"))
                .ok_or_else(|| anyhow!("target URL {url} must start with http:// or ws://"))?;
            let addr = tokio::net::lookup_host(hostport)
                .await?
                .next()
                .ok_or_else(|| anyhow!("cannot resolve {hostport}"))?;
            targets.push((addr, format!("ws://{hostport}")));
        }
        if targets.is_empty() {
            bail!("no target URL");
        }
        let loopback = targets
            .iter()
            .all(|(a, _)| a.ip().is_loopback() && a.is_ipv4());
        let sources = if loopback {
            (0..sources)
                .map(|i| IpAddr::V4(Ipv4Addr::from(0x7f00_0002u32 + i as u32)))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            targets,
            sources,
            next_source: AtomicUsize::new(0),
            next_target: AtomicUsize::new(0),
        })
    }

    /// Use the block of source addresses after `blocks` blocks of the same size (worker
    /// process `blocks` of several does not share ports with the others).
    pub fn offset_sources(&mut self, blocks: usize) {
        let n = self.sources.len() as u32;
        for ip in &mut self.sources {
            if let IpAddr::V4(v4) = ip {
                *ip = IpAddr::V4(Ipv4Addr::from(u32::from(*v4) + n * blocks as u32));
            }
        }
    }

    /// Connect to the next target (round robin) on `path_and_query` (e.g. `/ws/widget?department=1`).
    pub async fn connect(&self, path_and_query: &str) -> Result<Ws> {
        let i = self.next_target.fetch_add(1, Ordering::Relaxed) % self.targets.len();
        self.connect_to(i, path_and_query).await
    }

    pub async fn connect_to(&self, target: usize, path_and_query: &str) -> Result<Ws> {
        let (addr, base) = &self.targets[target % self.targets.len()];
        let stream = self.tcp_connect(*addr).await?;
        let url = format!("{base}{path_and_query}");
        let (ws, _resp) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(client_ws_config()))
                .await?;
        Ok(ws)
    }

    async fn tcp_connect(&self, addr: SocketAddr) -> Result<TcpStream> {
        if self.sources.is_empty() {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            return Ok(s);
        }
        // A source whose ports are used up fails to bind or connect with AddrInUse /
        // AddrNotAvailable: move on to the next one.
        let mut last_err = None;
        for _ in 0..self.sources.len() {
            let i = self.next_source.fetch_add(1, Ordering::Relaxed) % self.sources.len();
            let socket = TcpSocket::new_v4()?;
            if let Err(e) = socket.bind(SocketAddr::new(self.sources[i], 0)) {
                last_err = Some(e);
                continue;
            }
            match socket.connect(addr).await {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                    ) =>
                {
                    last_err = Some(e)
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_err
            .map(Into::into)
            .unwrap_or_else(|| anyhow!("no source address")))
    }
}

/// A short, countable name for a connection error ("http 401", "io ConnectionRefused", "timeout").
pub fn classify(e: &anyhow::Error) -> String {
    for cause in e.chain() {
        if let Some(te) = cause.downcast_ref::<tungstenite::Error>() {
            return match te {
                tungstenite::Error::Http(resp) => format!("http {}", resp.status().as_u16()),
                tungstenite::Error::Io(io) => format!("io {:?}", io.kind()),
                tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                    "closed".into()
                }
                tungstenite::Error::Protocol(p) => format!("protocol: {p}"),
                tungstenite::Error::Capacity(c) => format!("capacity: {c}"),
                other => format!("ws: {other}"),
            };
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return format!("io {:?}", io.kind());
        }
        if cause
            .downcast_ref::<tokio::time::error::Elapsed>()
            .is_some()
        {
            return "timeout".into();
        }
    }
    let s = e.to_string();
    s.chars().take(80).collect()
}

/// Error name → count.
pub type ErrorCounts = BTreeMap<String, u64>;

pub fn count_error(errors: &mut ErrorCounts, e: &anyhow::Error) {
    *errors.entry(classify(e)).or_default() += 1;
}

/// The next text frame as JSON; `None` when the peer closed. Pings are answered by
/// tungstenite while reading.
pub async fn next_json(ws: &mut Ws) -> Result<Option<Value>> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return Ok(Some(
                    serde_json::from_str(&t).with_context(|| format!("bad JSON: {t}"))?,
                ));
            }
            Some(Ok(Message::Close(frame))) => {
                if let Some(f) = frame {
                    bail!("closed by peer: {} {}", u16::from(f.code), f.reason);
                }
                return Ok(None);
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => return Ok(None),
        }
    }
}

/// Read `n` text frames (the greeting: `hello`, or one `widget_status` per department).
pub async fn first_frames(ws: &mut Ws, n: usize, within: Duration) -> Result<Vec<Value>> {
    tokio::time::timeout(within, async {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match next_json(ws).await? {
                Some(v) => out.push(v),
                None => bail!("closed before the greeting"),
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| anyhow::Error::new(e).context("waiting for the greeting"))?
}

/// The first text frame, unparsed (cheap: a hub `hello` can be large), with the close
/// reason as the error when the peer closes first.
pub async fn first_text(ws: &mut Ws, within: Duration) -> Result<String> {
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
                Some(Ok(Message::Close(f))) => {
                    bail!(
                        "closed before the greeting: {:?}",
                        f.map(|f| (u16::from(f.code), f.reason))
                    )
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => bail!("closed before the greeting"),
            }
        }
    };
    tokio::time::timeout(within, read)
        .await
        .map_err(|e| anyhow::Error::new(e).context("waiting for the greeting"))?
}

/// Close politely: close frame, then wait (bounded) for the peer's close.
pub async fn close(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Latency histogram in microseconds, 1 µs .. 10 min, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record((d.as_micros() as u64).clamp(1, 600_000_000));
}

/// Outcome of connecting many sockets.
pub struct Connected<T> {
    pub items: Vec<T>,
    pub errors: ErrorCounts,
    /// From the first attempt to the last greeting.
    pub elapsed: Duration,
    /// Per connection: TCP connect + upgrade + greeting.
    pub handshake: Histogram<u64>,
}

/// Open `n` connections, at most `concurrency` in flight; connection `i` goes to
/// `path(i)`, is established once `greeting` text frames arrived, and is then handed to
/// `on_ready(i, ws, greeting)`.
pub async fn connect_many<T, P, F>(
    conn: &Connector,
    n: usize,
    concurrency: usize,
    greeting: usize,
    path: P,
    mut on_ready: F,
) -> Connected<T>
where
    P: Fn(usize) -> String,
    F: FnMut(usize, Ws, Vec<Value>) -> T,
{
    let start = Instant::now();
    let path = &path;
    let mut results = futures::stream::iter(0..n)
        .map(|i| async move {
            let t0 = Instant::now();
            let r = async {
                let mut ws = conn.connect(&path(i)).await?;
                let greet = first_frames(&mut ws, greeting, Duration::from_secs(30)).await?;
                anyhow::Ok((ws, greet))
            };
            let r = tokio::time::timeout(Duration::from_secs(30), r)
                .await
                .unwrap_or_else(|e| Err(anyhow::Error::new(e)));
            (i, r, t0.elapsed())
        })
        .buffer_unordered(concurrency.max(1));
    let mut out = Connected {
        items: Vec::with_capacity(n),
        errors: ErrorCounts::new(),
        elapsed: Duration::ZERO,
        handshake: new_histogram(),
    };
    let mut done = 0usize;
    while let Some((i, r, took)) = results.next().await {
        match r {
            Ok((ws, greet)) => {
                record(&mut out.handshake, took);
                out.items.push(on_ready(i, ws, greet));
            }
            Err(e) => count_error(&mut out.errors, &e),
        }
        done += 1;
        if n >= 5000 && done.is_multiple_of(5000) {
            eprintln!(
                "  … {done}/{n} connections attempted ({:.1}s)",
                start.elapsed().as_secs_f64()
            );
        }
    }
    out.elapsed = start.elapsed();
    out
}

/// What a held connection saw.
#[derive(Debug, Default, Clone)]
pub struct HoldStats {
    pub frames: u64,
    /// Set when the peer closed or the connection failed before we stopped.
    pub lost: Option<String>,
}

/// Keep a connection open, reading (so pings get answered), until `stop` flips; then close.
pub async fn hold(mut ws: Ws, mut stop: watch::Receiver<bool>) -> HoldStats {
    let mut stats = HoldStats::default();
    loop {
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            _ = stop.changed() => break,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(_))) => stats.frames += 1,
                Some(Ok(Message::Close(f))) => {
                    stats.lost = Some(match f {
                        Some(f) => format!("closed {}", u16::from(f.code)),
                        None => "closed".into(),
                    });
                    return stats;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    stats.lost = Some(classify(&e.into()));
                    return stats;
                }
                None => {
                    stats.lost = Some("eof".into());
                    return stats;
                }
            },
        }
    }
    close(ws).await;
    stats
}

//! `soak`: for a given time, a mix of everything at once against one hub: operators churning
//! (connect, a few requests, disconnect), widgets on random departments coming and going,
//! chats created, assigned (by the hub, to the online operators) and closed, slow readers
//! (widgets that never read: the hub must cut them off) and malformed frames (bad JSON,
//! unknown types, binary frames, frames over the size limit). Samples the hub's RSS and its
//! live set every second and fails when memory grows while the live set does not. Can plot
//! the RSS curve to a PNG.
//!
//! The live set is measured as it is: sockets open (from `/metrics`) and chats held. Closed
//! chats stay in the hub's memory today (until chat retention lands), so they are counted in
//! the live set, and the growth allowed grows with them (`--per-chat-kib` each).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::{on_target, parse_duration, put_operators};
use crate::{
    Common,
    client::{self, Connector},
    hub::{Target, TargetKind, mint_token},
    report::{Report, Run},
};

#[derive(Args, Debug, Clone)]
pub struct SoakArgs {
    /// How long the mix runs.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub duration: Duration,
    /// Operators taking turns connecting.
    #[arg(long, default_value_t = 100)]
    pub operators: usize,
    /// Operator sockets connecting and disconnecting at once.
    #[arg(long, default_value_t = 8)]
    pub churners: usize,
    /// Departments the operators, widgets and chats spread over.
    #[arg(long, default_value_t = 10)]
    pub departments: usize,
    /// Widget sockets open at any time (each lives 1–10 s, then is replaced).
    #[arg(long, default_value_t = 200)]
    pub widgets: usize,
    /// Chats created per second (each closed 1–5 s later).
    #[arg(long, default_value_t = 10.0)]
    pub chat_rate: f64,
    /// A widget that never reads is opened every this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub slow_every: Duration,
    /// RSS sample period.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub sample: Duration,
    /// Part of the run ignored for the growth check (allocator and caches warming up).
    #[arg(long, default_value_t = 0.2)]
    pub warmup: f64,
    /// Growth allowed past the warm-up with an unchanged live set, MiB.
    #[arg(long, default_value_t = 24)]
    pub max_growth_mib: u64,
    /// Growth allowed per chat added to the live set (closed chats are kept), KiB.
    #[arg(long, default_value_t = 8)]
    pub per_chat_kib: u64,
    /// Plot RSS and the live set over time to this PNG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// TTF font for the plot's text.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    pub font: PathBuf,
}

/// One sample of the hub.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at_s: f64,
    pub rss_mib: f64,
    pub sockets: f64,
    pub chats: f64,
}

#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    requests: AtomicU64,
    malformed: AtomicU64,
    chats_created: AtomicU64,
    chats_closed: AtomicU64,
    slow_opened: AtomicU64,
    errors: AtomicU64,
}

pub async fn run(common: &Common, args: &SoakArgs) -> Result<Report> {
    let mut report = Report::new(
        "soak",
        json!({
            "duration_s": args.duration.as_secs_f64(), "operators": args.operators,
            "churners": args.churners, "departments": args.departments, "widgets": args.widgets,
            "chat_rate": args.chat_rate, "slow_every_s": args.slow_every.as_secs_f64(),
        }),
    );
    let mut target_args = common.target.clone();
    if target_args.hub_url.is_empty() {
        // Dead (non-reading) sockets are found within a few seconds.
        target_args
            .hub_env
            .push("PRESENCE_HUB_PRESENCE_PING_INTERVAL=1s".into());
        target_args
            .hub_env
            .push("PRESENCE_HUB_LIMITS_MAX_MESSAGE_BYTES=8192".into());
    }
    let run = on_target(TargetKind::Hub, &target_args, async |t| {
        measure(t, common, args, &mut report).await
    })
    .await?;
    report.runs.push(run);
    Ok(report)
}

fn rand_below(n: usize) -> usize {
    (rand_u64() % n.max(1) as u64) as usize
}

/// A cheap thread-local xorshift: the mix needs spread, not quality.
fn rand_u64() -> u64 {
    use std::cell::Cell;
    thread_local!(static S: Cell<u64> = Cell::new(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1));
    S.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

fn millis(lo: u64, hi: u64) -> Duration {
    Duration::from_millis(lo + rand_u64() % (hi - lo).max(1))
}

async fn measure(
    t: &mut Target,
    common: &Common,
    args: &SoakArgs,
    report: &mut Report,
) -> Result<Run> {
    let mut run = Run::new("hub");
    let base = common.target.id_base();
    let k = args.departments.max(1) as u64;
    let ops: Vec<u64> = (0..args.operators.max(1) as u64)
        .map(|i| base + i)
        .collect();
    put_operators(t, &ops, |i| base + i as u64 % k, 4).await?;
    let connector = Arc::new(Connector::new(&t.urls, common.target.sources).await?);
    let api = t.api()?.clone();
    let c = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let secret = t.jwt_secret.clone();
    let mut tasks = Vec::new();

    // Operators churning: connect, hello, a few requests (some malformed), disconnect.
    for w in 0..args.churners {
        let (connector, c, stop, ops, secret) = (
            connector.clone(),
            c.clone(),
            stop.clone(),
            ops.clone(),
            secret.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                n += 1;
                let id = ops[rand_below(ops.len())];
                let Ok(token) = mint_token(&secret, id, Duration::from_secs(3600)) else {
                    continue;
                };
                let Ok(mut ws) = connector
                    .connect(&format!("/ws/operator?token={token}"))
                    .await
                else {
                    c.errors.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                c.connects.fetch_add(1, Relaxed);
                if client::first_frames(&mut ws, 1, Duration::from_secs(10))
                    .await
                    .is_err()
                {
                    c.errors.fetch_add(1, Relaxed);
                    continue;
                }
                let frames: Vec<Message> = match (w as u64 + n) % 4 {
                    // Malformed: bad JSON, an unknown type, a binary frame, a frame over
                    // the size limit (the hub closes with 1009).
                    0 => {
                        c.malformed.fetch_add(4, Relaxed);
                        vec![
                            Message::text("{\"type\":"),
                            Message::text(r#"{"type":"dance","ref":1}"#),
                            Message::binary(vec![0u8, 1, 2]),
                            Message::text("x".repeat(9000)),
                        ]
                    }
                    _ => {
                        c.requests.fetch_add(3, Relaxed);
                        vec![
                            Message::text(r#"{"type":"activity","active":true,"ref":1}"#),
                            Message::text(r#"{"type":"set_status","online":true,"ref":2}"#),
                            Message::text(r#"{"type":"activity","active":false,"ref":3}"#),
                        ]
                    }
                };
                for f in frames {
                    if ws.send(f).await.is_err() {
                        break;
                    }
                }
                // Read for a while (chats get assigned meanwhile), then go.
                let _ = tokio::time::timeout(millis(200, 2000), async {
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
                if n.is_multiple_of(3) {
                    drop(ws); // abrupt
                } else {
                    client::close(ws).await;
                }
            }
        }));
    }

    // Widgets on random departments, each living 1–10 s.
    for _ in 0..args.widgets {
        let (connector, c, stop) = (connector.clone(), c.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                let d = base + rand_below(k as usize) as u64;
                let Ok(mut ws) = connector
                    .connect(&format!("/ws/widget?department={d}"))
                    .await
                else {
                    c.errors.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                c.connects.fetch_add(1, Relaxed);
                let _ = tokio::time::timeout(millis(1000, 10_000), async {
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
                client::close(ws).await;
            }
        }));
    }

    // Chats: created at a fixed rate, each closed 1–5 s later.
    {
        let (api, c, stop) = (api.clone(), c.clone(), stop.clone());
        let period = Duration::from_secs_f64(1.0 / args.chat_rate.max(0.01));
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            while !stop.load(Relaxed) {
                tick.tick().await;
                let d = base + rand_below(k as usize) as u64;
                match api.create_chat(d).await {
                    Ok(id) => {
                        c.chats_created.fetch_add(1, Relaxed);
                        let (api, c) = (api.clone(), c.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(millis(1000, 5000)).await;
                            let path = format!("/api/v1/chats/{id}/close");
                            match api.call(reqwest::Method::POST, &path, None).await {
                                Ok(_) => c.chats_closed.fetch_add(1, Relaxed),
                                Err(_) => c.errors.fetch_add(1, Relaxed),
                            };
                        });
                    }
                    Err(_) => {
                        c.errors.fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }

    // Slow readers: a widget on every department that never reads (nor answers pings).
    {
        let (connector, c, stop) = (connector.clone(), c.clone(), stop.clone());
        let every = args.slow_every;
        tasks.push(tokio::spawn(async move {
            let q: Vec<String> = (0..k.min(64))
                .map(|j| format!("department={}", base + j))
                .collect();
            let path = format!("/ws/widget?{}", q.join("&"));
            let mut held = Vec::new();
            while !stop.load(Relaxed) {
                if let Ok(ws) = connector.connect(&path).await {
                    c.slow_opened.fetch_add(1, Relaxed);
                    held.push(ws);
                }
                // The client lets go of them after a minute (the hub should have long before).
                if held.len() > (60.0 / every.as_secs_f64().max(0.1)) as usize {
                    held.remove(0);
                }
                tokio::time::sleep(every).await;
            }
        }));
    }

    // Sampling.
    let t0 = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut tick = tokio::time::interval(args.sample);
    while t0.elapsed() < args.duration {
        tick.tick().await;
        let rss = t.rss_kib().unwrap_or(0) as f64 / 1024.0;
        let totals = api.metric_totals().await.unwrap_or_default();
        let sockets = totals
            .get("presence_hub_connections")
            .copied()
            .unwrap_or(0.0);
        let chats = api
            .all_chats()
            .await
            .map(|v| v.len() as f64)
            .unwrap_or(f64::NAN);
        samples.push(Sample {
            at_s: t0.elapsed().as_secs_f64(),
            rss_mib: rss,
            sockets,
            chats,
        });
        if samples.len().is_multiple_of(30) {
            eprintln!(
                "{:>5.0}s  RSS {rss:.1} MiB  sockets {sockets}  chats held {chats}  connects {}  chats created {}",
                t0.elapsed().as_secs_f64(),
                c.connects.load(Relaxed),
                c.chats_created.load(Relaxed)
            );
        }
        t.check_alive()?;
    }
    stop.store(true, Relaxed);
    for task in tasks {
        task.abort();
    }

    let (ok, detail) = judge(&samples, args);
    report.check("hub", "memory_bounded_by_live_set", ok, detail);
    for (name, v) in [
        ("connects", &c.connects),
        ("requests_sent", &c.requests),
        ("malformed_frames_sent", &c.malformed),
        ("chats_created", &c.chats_created),
        ("chats_closed", &c.chats_closed),
        ("slow_readers_opened", &c.slow_opened),
        ("client_errors", &c.errors),
    ] {
        run.add(name, v.load(Relaxed) as f64, "");
    }
    let peak = samples.iter().map(|s| s.rss_mib).fold(0.0, f64::max);
    run.add("rss_peak", peak, "MiB");
    if let Some(last) = samples.last() {
        run.add("rss_end", last.rss_mib, "MiB");
        run.add("chats_held_end", last.chats, "");
    }
    if let Some(path) = &args.plot {
        crate::plot::rss_over_time(path, &args.font, &samples)
            .with_context(|| format!("plotting to {}", path.display()))?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(run)
}

/// Memory past the warm-up against the live set: RSS may grow by `max_growth_mib`, plus
/// `per_chat_kib` for each chat added to what the hub holds, plus what more sockets cost
/// (taken as 64 KiB each, generous). Compares the mean of the first and the last fifth of
/// the samples after the warm-up, so one spike does not decide.
pub fn judge(samples: &[Sample], args: &SoakArgs) -> (bool, String) {
    let skip = (samples.len() as f64 * args.warmup) as usize;
    let rest = &samples[skip.min(samples.len())..];
    if rest.len() < 5 {
        return (false, format!("too few samples ({})", samples.len()));
    }
    let fifth = (rest.len() / 5).max(1);
    let mean = |s: &[Sample], f: fn(&Sample) -> f64| s.iter().map(f).sum::<f64>() / s.len() as f64;
    let (a, b) = (&rest[..fifth], &rest[rest.len() - fifth..]);
    let rss = mean(b, |s| s.rss_mib) - mean(a, |s| s.rss_mib);
    let chats = (mean(b, |s| s.chats) - mean(a, |s| s.chats)).max(0.0);
    let sockets = (mean(b, |s| s.sockets) - mean(a, |s| s.sockets)).max(0.0);
    let allowed = args.max_growth_mib as f64
        + chats * args.per_chat_kib as f64 / 1024.0
        + sockets * 64.0 / 1024.0;
    let detail = format!(
        "RSS {:+.1} MiB after the warm-up (allowed {allowed:.1} MiB: {} MiB + {chats:.0} chats held more + {sockets:.0} sockets more)",
        rss, args.max_growth_mib
    );
    (rss <= allowed, detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        a: SoakArgs,
    }

    fn samples(rss: impl Fn(f64) -> f64, chats: impl Fn(f64) -> f64) -> Vec<Sample> {
        (0..100)
            .map(|i| {
                let x = i as f64;
                Sample {
                    at_s: x,
                    rss_mib: rss(x),
                    sockets: 300.0,
                    chats: chats(x),
                }
            })
            .collect()
    }

    #[test]
    fn soak_flat_memory_passes() {
        let a = P::parse_from(["x"]).a;
        assert!(judge(&samples(|_| 40.0, |_| 10.0), &a).0);
    }

    #[test]
    fn soak_growth_without_live_set_growth_fails() {
        let a = P::parse_from(["x"]).a;
        let (ok, detail) = judge(&samples(|x| 40.0 + x, |_| 10.0), &a);
        assert!(!ok, "{detail}");
    }

    #[test]
    fn soak_growth_explained_by_chats_held_passes() {
        let a = P::parse_from(["x"]).a;
        // 100 chats more per sample, 0.5 MiB more per sample: 5 KiB a chat.
        assert!(judge(&samples(|x| 40.0 + x * 0.5, |x| x * 100.0), &a).0);
    }
}

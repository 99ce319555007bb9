//! `slowread`: W operators watch a chat and stop reading while another operator sends large
//! whispers in it as fast as they are acknowledged, until the hub has closed every watcher
//! as a slow consumer (1008). Repeated for R rounds. Samples the hub's RSS: the peak during
//! the rounds and what stays once every watcher is gone, which must come back near the
//! start (memory bounded by what is live: the chat's kept history).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{frame_type, on_target, parse_duration};
use crate::{
    Common,
    client::{self, Connector, Ws},
    hub::{Target, TargetKind, mint_token},
    report::{Report, Run},
};

#[derive(Args, Debug, Clone)]
pub struct SlowreadArgs {
    /// Watchers that stop reading, per round.
    #[arg(long, default_value_t = 4)]
    pub watchers: usize,
    /// Bytes of each whisper's text (the hub's `limits.max_text_bytes` must allow it: a
    /// spawned hub is given 65000).
    #[arg(long, default_value_t = 64_000)]
    pub text_bytes: usize,
    /// Rounds.
    #[arg(long, default_value_t = 9)]
    pub rounds: usize,
    /// Longest time one round may take.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub round_timeout: Duration,
    /// Wait this long after the last round before reading what stays (an allocator may
    /// give memory back with a delay: jemalloc's decay is 10 s).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub settle: Duration,
    /// RSS that may stay after the last round above the first sample, MiB.
    #[arg(long, default_value_t = 64)]
    pub max_growth_mib: u64,
}

pub async fn run(common: &Common, args: &SlowreadArgs) -> Result<Report> {
    let mut report = Report::new(
        "slowread",
        json!({"watchers": args.watchers, "text_bytes": args.text_bytes, "rounds": args.rounds}),
    );
    let mut target_args = common.target.clone();
    if target_args.hub_url.is_empty() {
        target_args
            .hub_env
            .push("PRESENCE_HUB_LIMITS_MAX_TEXT_BYTES=65000".into());
        target_args
            .hub_env
            .push("PRESENCE_HUB_LIMITS_RATE=0".into());
    }
    let run = on_target(TargetKind::Hub, &target_args, async |t| {
        measure(t, common, args, &mut report).await
    })
    .await?;
    report.runs.push(run);
    Ok(report)
}

/// The hub's counter of slow consumers closed.
async fn dropped(t: &Target) -> Result<f64> {
    let totals = t.api()?.metric_totals().await?;
    Ok(totals
        .get("presence_hub_slow_consumers_dropped_total")
        .copied()
        .unwrap_or(0.0))
}

async fn request(ws: &mut Ws, v: Value) -> Result<Value> {
    let r = v["ref"].clone();
    ws.send(Message::text(v.to_string())).await?;
    loop {
        let m = client::next_json(ws)
            .await?
            .context("closed while waiting for an ack")?;
        if m["ref"] == r {
            return Ok(m);
        }
    }
}

async fn measure(
    t: &mut Target,
    common: &Common,
    args: &SlowreadArgs,
    report: &mut Report,
) -> Result<Run> {
    let mut run = Run::new("hub");
    let api = t.api()?.clone();
    let base = common.target.id_base();
    let dept = base;
    let writer_id = base;
    let watcher_ids: Vec<u64> = (1..=args.watchers as u64).map(|i| base + i).collect();
    for id in std::iter::once(writer_id).chain(watcher_ids.iter().copied()) {
        let body =
            json!({"name": format!("op{id}"), "departments": [dept], "permissions": ["open_all"]});
        api.call(
            reqwest::Method::PUT,
            &format!("/api/v1/operators/{id}"),
            Some(body),
        )
        .await?;
    }
    let chat = api.create_chat(dept).await?;
    let connector = Connector::new(&t.urls, 0).await?;
    let token = |id| mint_token(&t.jwt_secret, id, Duration::from_secs(3600));
    let mut writer = connector
        .connect(&format!("/ws/operator?token={}", token(writer_id)?))
        .await?;
    client::first_frames(&mut writer, 1, Duration::from_secs(10)).await?;
    let ack = request(
        &mut writer,
        json!({"type":"open_chat","chat":chat,"ref":"open"}),
    )
    .await?;
    if frame_type(&ack) != "ack" {
        bail!("writer open_chat: {ack}");
    }

    // RSS sampled every 50 ms for the whole run.
    let peak = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let pids = t.pids.clone();
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Relaxed) {
                let rss: u64 = pids
                    .iter()
                    .filter_map(|p| crate::hub::proc_rss_kib(*p))
                    .sum();
                peak.fetch_max(rss, Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let start_rss = t.rss_kib().unwrap_or(0);
    let text = "w".repeat(args.text_bytes);
    let mut whispers = 0u64;
    let mut next_ref = 0u64;
    for round in 0..args.rounds {
        let before = dropped(t).await?;
        // The watchers open the chat, then are never read again.
        let mut watchers = Vec::new();
        for id in &watcher_ids {
            let mut ws = connector
                .connect(&format!("/ws/operator?token={}", token(*id)?))
                .await?;
            client::first_frames(&mut ws, 1, Duration::from_secs(10)).await?;
            let ack = request(
                &mut ws,
                json!({"type":"open_chat","chat":chat,"ref":"open"}),
            )
            .await?;
            if frame_type(&ack) != "ack" {
                bail!("watcher open_chat: {ack}");
            }
            watchers.push(ws);
        }
        let t0 = Instant::now();
        loop {
            next_ref += 1;
            let ack = request(
                &mut writer,
                json!({"type":"send_message","chat":chat,"text":text,"whisper":true,"ref":next_ref}),
            )
            .await?;
            if frame_type(&ack) != "ack" {
                bail!("whisper: {ack}");
            }
            whispers += 1;
            if whispers.is_multiple_of(8) && dropped(t).await? - before >= args.watchers as f64 {
                break;
            }
            if t0.elapsed() > args.round_timeout {
                bail!(
                    "round {round}: the watchers were not all closed within {:?}",
                    args.round_timeout
                );
            }
        }
        drop(watchers);
        eprintln!(
            "round {}: {} watchers closed after {:.1}s, hub RSS {} MiB (peak so far {} MiB)",
            round + 1,
            args.watchers,
            t0.elapsed().as_secs_f64(),
            t.rss_kib().unwrap_or(0) / 1024,
            peak.load(Relaxed) / 1024
        );
    }
    client::close(writer).await;
    // Let the hub see the sockets end, then read what stays.
    tokio::time::sleep(args.settle).await;
    stop.store(true, Relaxed);
    let _ = sampler.await;
    let after = t.rss_kib().unwrap_or(0);
    let peak = peak.load(Relaxed);
    run.add("rss_start", start_rss as f64 / 1024.0, "MiB");
    run.add("rss_peak", peak as f64 / 1024.0, "MiB");
    run.add("rss_after", after as f64 / 1024.0, "MiB");
    run.add("whispers_sent", whispers as f64, "");
    let growth = after.saturating_sub(start_rss) / 1024;
    report.check(
        "hub",
        "memory_given_back",
        growth <= args.max_growth_mib,
        format!(
            "RSS {} → peak {} → {} MiB after {} rounds (allowed growth {} MiB)",
            start_rss / 1024,
            peak / 1024,
            after / 1024,
            args.rounds,
            args.max_growth_mib
        ),
    );
    Ok(run)
}

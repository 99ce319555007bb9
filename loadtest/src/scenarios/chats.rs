//! `chats`: creates and closes N chats through the HTTP API (C requests in flight) and
//! samples the hub's RSS before, at the peak and after. Closed chats leave the hub's live
//! state at once (the store keeps them for `chats.retention`), so memory must come back to
//! where it started: the check fails when RSS after the run exceeds RSS before by more than
//! `--max-growth`. Hub only.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::{concurrently, on_target};
use crate::{
    Common,
    hub::{Target, TargetKind},
    report::{Report, Run},
};

#[derive(Args, Debug, Clone)]
pub struct ChatsArgs {
    /// Chats created and closed.
    #[arg(long, default_value_t = 100_000)]
    pub chats: usize,
    /// Requests in flight at once.
    #[arg(short = 'c', long, default_value_t = 32)]
    pub concurrency: usize,
    /// Departments the chats are spread over (assignment off: nobody takes them).
    #[arg(long, default_value_t = 10)]
    pub departments: u64,
    /// Largest growth of RSS over the run that still passes, in MiB. The embedded store's
    /// page cache (bounded at 8 MiB) fills up as the file grows with the closed chats it keeps.
    #[arg(long, default_value_t = 12.0)]
    pub max_growth: f64,
}

pub async fn run(common: &Common, args: &ChatsArgs) -> Result<Report> {
    let mut report = Report::new(
        "chats",
        json!({
            "chats": args.chats,
            "concurrency": args.concurrency,
            "departments": args.departments,
        }),
    );
    let run = on_target(TargetKind::Hub, &common.target, async |t: &mut Target| {
        scenario(t, args).await
    })
    .await?;
    let growth = run
        .metrics
        .iter()
        .find(|m| m.name == "rss_growth")
        .map_or(f64::INFINITY, |m| m.value);
    report.check(
        "hub",
        "memory comes back after the chats closed",
        growth <= args.max_growth,
        format!("RSS grew {growth:.1} MiB (limit {} MiB)", args.max_growth),
    );
    report.runs.push(run);
    Ok(report)
}

async fn scenario(target: &mut Target, args: &ChatsArgs) -> Result<Run> {
    let mut run = Run::new("hub");
    let api = target.api()?;
    for d in 1..=args.departments {
        api.call(
            reqwest::Method::PUT,
            &format!("/api/v1/departments/{d}"),
            Some(json!({"assignment": "off"})),
        )
        .await?;
    }
    // A first round warms the allocator and the store up, so "before" is a steady state.
    let warm = args.chats.min(5_000);
    churn(api, warm, args).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = target.rss_kib();
    let peak = Arc::new(AtomicU64::new(before.unwrap_or(0)));
    let pid_rss = {
        let peak = peak.clone();
        let pids = target.pids.clone();
        tokio::spawn(async move {
            loop {
                let rss: Option<u64> = pids.iter().map(|p| crate::hub::proc_rss_kib(*p)).sum();
                if let Some(k) = rss {
                    peak.fetch_max(k, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let t0 = Instant::now();
    churn(api, args.chats, args).await?;
    let took = t0.elapsed();
    pid_rss.abort();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = target.rss_kib();
    let live = api.all_chats().await?;
    let open = live.iter().filter(|c| c["status"] != "closed").count();
    run.add("chats", args.chats as f64, "");
    run.add_rate("created_and_closed", args.chats as u64, took);
    run.add("open_chats_after", open as f64, "");
    if let (Some(b), Some(a)) = (before, after) {
        run.add("rss_before", b as f64 / 1024.0, "MiB");
        run.add(
            "rss_peak",
            peak.load(Ordering::Relaxed).max(a) as f64 / 1024.0,
            "MiB",
        );
        run.add("rss_after", a as f64 / 1024.0, "MiB");
        run.add("rss_growth", (a as f64 - b as f64) / 1024.0, "MiB");
    }
    Ok(run)
}

/// Creates and closes `n` chats, `args.concurrency` at a time.
async fn churn(api: &crate::hub::Api, n: usize, args: &ChatsArgs) -> Result<()> {
    let departments = args.departments.max(1);
    concurrently(n, args.concurrency, |i| async move {
        let id = api.create_chat(1 + i as u64 % departments).await?;
        api.close_chat(id).await
    })
    .await?;
    Ok(())
}

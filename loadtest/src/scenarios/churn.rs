//! `churn`: a connect/disconnect storm of operator WebSockets. C workers each loop: connect
//! with the operator's JWT (verified by the hub on every upgrade), wait for `hello`, close.
//! Reports upgrades per second and handshake latency. Afterwards every operator must go
//! offline (after `presence.disconnect_grace`) and stay there: polled through
//! GET /api/v1/operators, and a widget on their department must end offline too.
//!
//! Against the baseline the storm uses widget sockets (no auth), for the upgrade-rate floor.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{Value, json};

use super::{frame_type, on_target, parse_duration, put_operators};
use crate::{
    Common,
    client::{self, Connector},
    hub::{Target, TargetKind, mint_token, own_cpu_secs},
    report::{Report, Run},
};

#[derive(Args, Debug, Clone)]
pub struct ChurnArgs {
    /// Operators the storm cycles through.
    #[arg(long, default_value_t = 200)]
    pub operators: usize,
    /// Spread the operators over this many departments (operator i in department
    /// D + i mod K). 1: all in one department, so every connect is told to every connected
    /// colleague; e.g. 2000 operators over 200 departments is ~10 colleagues each.
    #[arg(long, default_value_t = 1)]
    pub departments: usize,
    /// Workers connecting and disconnecting in parallel.
    #[arg(long, short = 'c', default_value_t = 64)]
    pub concurrency: usize,
    /// How long the storm lasts.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// After the storm, wait at most this long for every operator to be offline.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub settle: Duration,
    /// Drop the TCP connection instead of a WebSocket close handshake.
    #[arg(long)]
    pub abrupt: bool,
}

pub async fn run(common: &Common, args: &ChurnArgs) -> Result<Report> {
    let mut report = Report::new(
        "churn",
        json!({
            "operators": args.operators,
            "departments": args.departments,
            "concurrency": args.concurrency,
            "duration_s": args.duration.as_secs_f64(),
            "abrupt": args.abrupt,
            "grace": common.target.grace,
        }),
    );
    for kind in common.target.kinds() {
        let run = on_target(kind, &common.target, async |t| {
            measure(t, common, args, &mut report).await
        })
        .await?;
        report.runs.push(run);
    }
    if !common.target.compare.is_empty() {
        report.note("the peer runs churn widget sockets (no JWT): they are the upgrade-rate floor");
    }
    Ok(report)
}

async fn measure(
    target: &mut Target,
    common: &Common,
    args: &ChurnArgs,
    report: &mut Report,
) -> Result<Run> {
    let mut run = Run::new(target.kind.name());
    let kind = target.kind;
    let is_hub = kind == TargetKind::Hub;
    let base = common.target.id_base();
    let department = if is_hub { base } else { 1 };
    let operators = args.operators.max(1);
    let k = args.departments.clamp(1, operators) as u64;
    let departments: Vec<u64> = (0..k).map(|j| department + j).collect();
    let ids: Vec<u64> = (0..operators as u64).map(|i| base + i).collect();
    let connector = Connector::new(&target.urls, common.target.sources).await?;

    let mut paths = Vec::new();
    let mut watcher = None;
    if is_hub {
        put_operators(target, &ids, |i| department + i as u64 % k, 4).await?;
        for id in &ids {
            let token = mint_token(&target.jwt_secret, *id, Duration::from_secs(3600))?;
            paths.push(format!("/ws/operator?token={token}"));
        }
        // Widgets on the departments (up to 64 per socket) record every change of their
        // state.
        let events: Arc<Mutex<Vec<(Instant, Value)>>> = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for chunk in departments.chunks(64) {
            let query: Vec<String> = chunk.iter().map(|d| format!("department={d}")).collect();
            let mut ws = connector
                .connect_to(0, &format!("/ws/widget?{}", query.join("&")))
                .await?;
            let first = client::first_frames(&mut ws, chunk.len(), Duration::from_secs(10)).await?;
            let now = Instant::now();
            events
                .lock()
                .unwrap()
                .extend(first.into_iter().map(|v| (now, v)));
            let ev = events.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok(Some(v)) = client::next_json(&mut ws).await {
                    if frame_type(&v) == "widget_status" {
                        ev.lock().unwrap().push((Instant::now(), v));
                    }
                }
            }));
        }
        let task = tokio::spawn(async move {
            for t in tasks {
                let _ = t.await;
            }
        });
        watcher = Some((events, task));
    } else {
        paths.push("/ws/widget?department=1".to_string());
    }

    // The storm.
    let cpu_before = target.cpu_secs();
    let own_cpu_before = own_cpu_secs();
    let next = Arc::new(AtomicUsize::new(0));
    let paths = Arc::new(paths);
    let connector = Arc::new(connector);
    let start = Instant::now();
    let deadline = start + args.duration;
    eprintln!(
        "churning for {:?} with {} workers…",
        args.duration, args.concurrency
    );
    let workers: Vec<_> = (0..args.concurrency.max(1))
        .map(|_| {
            let (next, paths, connector, abrupt) =
                (next.clone(), paths.clone(), connector.clone(), args.abrupt);
            // The uWS peer sends nothing on open: its upgrade is the whole handshake.
            let expect = match kind {
                TargetKind::Hub => Some("\"hello\""),
                TargetKind::Baseline => Some("\"widget_status\""),
                TargetKind::Uws => None,
            };
            tokio::spawn(async move {
                let mut hist = client::new_histogram();
                let mut errors = client::ErrorCounts::new();
                while Instant::now() < deadline {
                    let i = next.fetch_add(1, Relaxed);
                    let t0 = Instant::now();
                    let attempt = async {
                        let mut ws = connector.connect(&paths[i % paths.len()]).await?;
                        let Some(expect) = expect else {
                            return anyhow::Ok(ws);
                        };
                        let greeting = client::first_text(&mut ws, Duration::from_secs(10)).await?;
                        if !greeting.contains(expect) {
                            anyhow::bail!(
                                "greeting is no {expect}: {}",
                                &greeting[..greeting.len().min(80)]
                            );
                        }
                        anyhow::Ok(ws)
                    };
                    match tokio::time::timeout(Duration::from_secs(15), attempt).await {
                        Ok(Ok(ws)) => {
                            client::record(&mut hist, t0.elapsed());
                            if abrupt {
                                drop(ws)
                            } else {
                                client::close(ws).await
                            }
                        }
                        Ok(Err(e)) => {
                            client::count_error(&mut errors, &e);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(e) => client::count_error(&mut errors, &anyhow::Error::new(e)),
                    }
                }
                (hist, errors)
            })
        })
        .collect();
    let mut hist = client::new_histogram();
    for w in workers {
        let (h, errs) = w.await?;
        hist.add(&h)?;
        for (k, v) in errs {
            *run.errors.entry(k).or_default() += v;
        }
    }
    let storm = start.elapsed();
    let storm_end = Instant::now();
    let cpu = target.cpu_secs().zip(cpu_before).map(|(a, b)| a - b);
    let upgrades = hist.len();
    let failed: u64 = run.errors.values().sum();
    run.add("upgrades", upgrades as f64, "");
    run.add("failed", failed as f64, "");
    run.add_rate("upgrade_rate", upgrades, storm);
    run.add_latency("handshake", &hist);
    if let Some(cpu) = cpu {
        run.add("target_cpu", cpu, "s");
        if upgrades > 0 {
            run.add("target_cpu_per_upgrade", cpu * 1e6 / upgrades as f64, "us");
        }
    }
    run.add("loadtest_cpu", own_cpu_secs() - own_cpu_before, "s");
    target.check_alive()?;
    report.check(
        target.kind.name(),
        "no failed upgrade",
        failed == 0,
        format!("{failed} failed: {:?}", run.errors),
    );

    if let Some((events, task)) = watcher {
        settle(
            target,
            args,
            &ids,
            &departments,
            storm_end,
            start,
            &events,
            &mut run,
            report,
        )
        .await?;
        task.abort();
    }
    Ok(run)
}

/// After the storm: every operator offline with no connection left, and every department's
/// widget back to offline.
#[allow(clippy::too_many_arguments)]
async fn settle(
    target: &Target,
    args: &ChurnArgs,
    ids: &[u64],
    departments: &[u64],
    storm_end: Instant,
    storm_start: Instant,
    events: &Mutex<Vec<(Instant, Value)>>,
    run: &mut Run,
    report: &mut Report,
) -> Result<()> {
    let api = target.api()?;
    let until = storm_end + args.settle;
    let query = match departments {
        [d] => format!("department={d}"),
        _ => String::new(),
    };
    // The last widget_status of each department.
    let last_of = |events: &[(Instant, Value)]| {
        let mut last: std::collections::BTreeMap<u64, Value> = Default::default();
        for (_, v) in events {
            if let Some(d) = v["department"].as_u64() {
                last.insert(d, v.clone());
            }
        }
        last
    };
    let (still_online, still_connected, views) = loop {
        let all = api.operators(&query).await.context("polling operators")?;
        let ours: Vec<&Value> = all
            .iter()
            .filter(|v| v["id"].as_u64().is_some_and(|id| ids.contains(&id)))
            .collect();
        let still_online = ours.iter().filter(|v| v["status"] != "offline").count();
        let still_connected = ours
            .iter()
            .filter(|v| v["connections"].as_u64().unwrap_or(0) > 0)
            .count();
        let views: Vec<Value> = ours
            .iter()
            .filter(|v| v["status"] != "offline")
            .take(3)
            .map(|v| (*v).clone())
            .collect();
        let last = last_of(&events.lock().unwrap());
        let widget_offline = departments
            .iter()
            .all(|d| last.get(d).is_some_and(|v| v["online"] == false));
        if (still_online == 0 && still_connected == 0 && widget_offline) || Instant::now() > until {
            if ours.len() != ids.len() {
                report.check(
                    "hub",
                    "every operator listed",
                    false,
                    format!(
                        "GET /api/v1/operators?{query} lists {} of {}",
                        ours.len(),
                        ids.len()
                    ),
                );
            }
            break (still_online, still_connected, views);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let settled = storm_end.elapsed();
    run.add("time_to_all_offline", settled.as_secs_f64() * 1000.0, "ms");
    run.add("left_online", still_online as f64, "");
    run.add("left_connected", still_connected as f64, "");
    report.check(
        "hub",
        "no operator left online",
        still_online == 0,
        format!("{still_online} still online {settled:?} after the storm; e.g. {views:?}"),
    );
    report.check(
        "hub",
        "no connection left counted",
        still_connected == 0,
        format!("{still_connected} operators with connections > 0"),
    );

    let events = events.lock().unwrap();
    let mut during: std::collections::BTreeMap<u64, usize> = Default::default();
    for (_, v) in events
        .iter()
        .filter(|(t, _)| *t > storm_start && *t <= storm_end)
    {
        *during
            .entry(v["department"].as_u64().unwrap_or(0))
            .or_default() += 1;
    }
    let changes: usize = during.values().sum();
    let flapped: Vec<_> = during.iter().filter(|(_, n)| **n > 1).take(5).collect();
    let last = last_of(&events);
    let not_offline: Vec<_> = departments
        .iter()
        .filter(|d| last.get(d).is_none_or(|v| v["online"] != false))
        .take(5)
        .map(|d| (d, last.get(d).cloned().unwrap_or(Value::Null)))
        .collect();
    run.add("widget_changes_during_storm", changes as f64, "");
    report.check(
        "hub",
        "no department widget flapped during the storm",
        flapped.is_empty(),
        format!(
            "{changes} widget_status changes during the storm over {} departments (at most 1 each expected: online); department → changes: {flapped:?}",
            departments.len()
        ),
    );
    report.check(
        "hub",
        "every department widget ends offline",
        not_offline.is_empty(),
        format!("departments whose last widget_status is not offline: {not_offline:?}"),
    );
    Ok(())
}

//! `idle`: open N operator or widget connections and hold them. Reports the target's RSS per
//! connection (VmRSS delta / N), the connect rate and handshake latency.

use std::{collections::HashSet, time::Duration};

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use serde_json::json;
use tokio::sync::watch;

use super::{on_target, parse_duration, put_operators};
use crate::{
    Common,
    client::{self, Connector},
    hub::{Target, TargetKind, mint_token, own_cpu_secs},
    report::{Report, Run},
    workers,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConnKind {
    /// /ws/operator with a JWT (the baseline, which has no auth, uses widget sockets).
    Operator,
    /// /ws/widget?department=…
    Widget,
}

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    /// Connections to open and hold.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: usize,
    /// Kind of connection.
    #[arg(long, value_enum, default_value = "widget")]
    pub kind: ConnKind,
    /// Operators the operator connections are spread over [default: one per connection].
    #[arg(long)]
    pub operators: Option<usize>,
    /// Operators per department (operators sharing a department get each other's status events).
    #[arg(long, default_value_t = 1)]
    pub operators_per_department: usize,
    /// How long to hold the connections once all are open.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub hold: Duration,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Hold the connections in this many worker processes (needed past ~19k connections:
    /// a process may have 20,000 open files). 1 = in this process.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
}

/// Who holds the open connections.
enum Holders {
    Here(
        Vec<tokio::task::JoinHandle<client::HoldStats>>,
        watch::Sender<bool>,
    ),
    Workers(workers::Pool),
}

impl Holders {
    /// Close everything; frames seen while holding, connections lost before the close.
    async fn close(self) -> Result<(u64, client::ErrorCounts)> {
        match self {
            Holders::Here(handles, stop) => {
                let _ = stop.send(true);
                let (mut frames, mut lost) = (0, client::ErrorCounts::new());
                for h in handles {
                    if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(10), h).await {
                        frames += st.frames;
                        if let Some(why) = st.lost {
                            *lost.entry(why).or_default() += 1;
                        }
                    }
                }
                Ok((frames, lost))
            }
            Holders::Workers(pool) => {
                let closed = pool.close().await?;
                Ok((closed.frames, closed.lost))
            }
        }
    }
}

pub async fn run(common: &Common, args: &IdleArgs) -> Result<Report> {
    let limit = crate::fd_limit() as usize;
    if args.connections.div_ceil(args.workers.max(1)) + 200 > limit {
        bail!(
            "{} connections need more open files than one process may have ({limit}): use --workers",
            args.connections
        );
    }
    let operators = args
        .operators
        .unwrap_or(args.connections)
        .clamp(1, args.connections.max(1));
    let mut report = Report::new(
        "idle",
        json!({
            "connections": args.connections,
            "kind": format!("{:?}", args.kind).to_lowercase(),
            "operators": if args.kind == ConnKind::Operator { json!(operators) } else { json!(null) },
            "operators_per_department": args.operators_per_department,
            "hold_s": args.hold.as_secs_f64(),
            "workers": args.workers,
        }),
    );
    for kind in common.target.kinds() {
        let run = on_target(kind, &common.target, async |t| {
            measure(t, common, args, operators, &mut report).await
        })
        .await?;
        report.runs.push(run);
    }
    if !common.target.compare.is_empty() && args.kind == ConnKind::Operator {
        report.note("the peer servers have no auth: their runs used widget sockets");
    }
    Ok(report)
}

async fn measure(
    target: &mut Target,
    common: &Common,
    args: &IdleArgs,
    operators: usize,
    report: &mut Report,
) -> Result<Run> {
    let mut run = Run::new(target.kind.name());
    let n = args.connections;
    let base = common.target.id_base();
    let as_operator = args.kind == ConnKind::Operator && target.kind == TargetKind::Hub;

    // Setup: operator records (one department per `operators_per_department` operators).
    let mut tokens = Vec::new();
    let ids: Vec<u64> = (0..operators as u64).map(|i| base + i).collect();
    if as_operator {
        let opd = args.operators_per_department.max(1);
        let took = put_operators(target, &ids, |i| base + (i / opd) as u64, 4).await?;
        run.add("setup_operators_s", took.as_secs_f64(), "s");
        for id in &ids {
            tokens.push(mint_token(
                &target.jwt_secret,
                *id,
                Duration::from_secs(3600),
            )?);
        }
    }
    let target_kind = target.kind;
    // The uWS peer greets nobody: its sockets are established once upgraded.
    let greeting = if as_operator {
        1
    } else {
        target_kind.widget_greeting()
    };
    let path = |i: usize| {
        if as_operator {
            format!("/ws/operator?token={}", tokens[i % operators])
        } else {
            let d = if target_kind == TargetKind::Hub {
                base
            } else {
                1
            };
            format!("/ws/widget?department={d}")
        }
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = target.rss_kib();
    let cpu_before = target.cpu_secs();
    let own_cpu_before = own_cpu_secs();

    eprintln!("opening {n} connections…");
    let (holders, connected) = if args.workers > 1 {
        let paths = (0..n).map(path).collect();
        let (pool, connected) = workers::open(
            &target.urls,
            common.target.sources,
            args.connect_concurrency,
            greeting,
            paths,
            args.workers,
        )
        .await?;
        (Holders::Workers(pool), connected)
    } else {
        let connector = Connector::new(&target.urls, common.target.sources).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connected = client::connect_many(
            &connector,
            n,
            args.connect_concurrency,
            greeting,
            path,
            |_, ws, _| tokio::spawn(client::hold(ws, stop_rx.clone())),
        )
        .await;
        let handles = std::mem::take(&mut connected.items);
        let ok = handles.len();
        let connected = client::Connected {
            items: vec![(); ok],
            errors: connected.errors,
            elapsed: connected.elapsed,
            handshake: connected.handshake,
        };
        (Holders::Here(handles, stop_tx), connected)
    };
    let ok = connected.items.len();
    let cpu_connect = target.cpu_secs().zip(cpu_before).map(|(a, b)| a - b);
    run.errors = connected.errors.clone();
    run.add("connections_ok", ok as f64, "");
    run.add("connect_errors", (n - ok) as f64, "");
    run.add("connect_time", connected.elapsed.as_secs_f64(), "s");
    run.add_rate("connect_rate", ok as u64, connected.elapsed);
    run.add_latency("handshake", &connected.handshake);
    run.add_opt("target_cpu_connect", cpu_connect, "s");
    report.check(
        target.kind.name(),
        "all connections opened",
        ok == n,
        format!("{ok}/{n}"),
    );

    eprintln!("holding {ok} connections for {:?}…", args.hold);
    tokio::time::sleep(args.hold).await;
    target.check_alive()?;
    let rss_after = target.rss_kib();
    if let (Some(a), Some(b)) = (rss_after, rss_before) {
        run.add("rss_before", b as f64 / 1024.0, "MiB");
        run.add("rss_after", a as f64 / 1024.0, "MiB");
        if ok > 0 {
            run.add("rss_per_conn", (a as f64 - b as f64) / ok as f64, "KiB");
        }
    }

    if as_operator {
        let online = target.api()?.operators("status=online").await?;
        let ours: HashSet<u64> = ids.iter().copied().collect();
        let count = online
            .iter()
            .filter(|v| v["id"].as_u64().is_some_and(|id| ours.contains(&id)))
            .count();
        let expected = operators.min(ok);
        run.add("operators_online", count as f64, "");
        report.check(
            "hub",
            "connected operators are online",
            count == expected,
            format!("{count} online via GET /api/v1/operators?status=online, {expected} connected"),
        );
    }

    // Release everything, then see what the target gives back.
    let (frames, lost) = holders.close().await?;
    let lost_total: u64 = lost.values().sum();
    run.add("frames_during_hold", frames as f64, "");
    run.add("connections_lost", lost_total as f64, "");
    report.check(
        target.kind.name(),
        "no connection dropped while held",
        lost_total == 0,
        format!("{lost:?}"),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    run.add_opt(
        "rss_after_close",
        target.rss_kib().map(|k| k as f64 / 1024.0),
        "MiB",
    );
    run.add("loadtest_cpu", own_cpu_secs() - own_cpu_before, "s");
    Ok(run)
}

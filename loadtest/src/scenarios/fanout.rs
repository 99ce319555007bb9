//! `fanout`: N widgets watch department(s); one operator of the flipping department toggles
//! its `online` setting at a fixed rate (open loop: flip k is due at t0 + k/R whatever
//! happened before). Every flip changes the department's widget state, so every widget of
//! that department receives one `widget_status` per flip. Reports the latency from a flip's
//! due instant to each widget's receipt, and the delivery ratio received / expected.
//!
//! `--departments K` spreads the widgets over K departments (only the first flips);
//! `--other-departments` puts all N widgets on departments that never change (plus one
//! sentinel widget on the flipping one): the target's CPU per flip then shows whether a
//! change costs O(subscribers) or O(connections).
//!
//! Against the baseline the "operator" is a `/pub?department=…` connection publishing the same
//! `widget_status` frames; against the uWS peer, `POST /publish` requests with the same body
//! (sent in order, one at a time), which uWS's pub/sub fans out as one text frame.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::{frame_type, on_target, parse_duration};
use crate::{
    Common,
    client::{self, Connector, Ws},
    hub::{Target, TargetKind, UwsPublisher, mint_token, own_cpu_secs},
    report::{Report, Run},
};

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Widget connections.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub widgets: usize,
    /// Spread the widgets over this many departments; only the first one flips.
    #[arg(long, default_value_t = 1)]
    pub departments: usize,
    /// Widgets watch departments other than the flipping one (plus one sentinel widget on it).
    #[arg(long)]
    pub other_departments: bool,
    /// Status flips per second (open loop).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// How long to flip.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// After the last flip, wait at most this long for outstanding deliveries.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
}

pub async fn run(common: &Common, args: &FanoutArgs) -> Result<Report> {
    if args.rate <= 0.0 || args.departments == 0 {
        bail!("--rate and --departments must be positive");
    }
    let mut report = Report::new(
        "fanout",
        json!({
            "widgets": args.widgets,
            "departments": args.departments,
            "other_departments": args.other_departments,
            "rate": args.rate,
            "duration_s": args.duration.as_secs_f64(),
        }),
    );
    for kind in common.target.kinds() {
        let run = on_target(kind, &common.target, async |t| {
            measure(t, common, args, &mut report).await
        })
        .await?;
        report.runs.push(run);
    }
    Ok(report)
}

/// What flips the department's state: a WebSocket (the hub's operator, the baseline's
/// publisher) or the uWS peer's `POST /publish`.
enum Flipper {
    Ws(Box<Ws>),
    Http(UwsPublisher),
}

/// State shared by the flipper and every widget task.
struct Shared {
    base: Instant,
    /// Flip k was due at `base + sends[k] - 1` ns (0: not sent yet).
    sends: Vec<AtomicU64>,
    /// Latency shards (µs), so thousands of tasks do not queue on one lock.
    hist: Vec<Mutex<Histogram<u64>>>,
    received: AtomicU64,
    /// A message whose `online` skipped a flip (the change was coalesced or lost).
    skipped: AtomicU64,
    /// Frames that are no update of the flipping department.
    unexpected: AtomicU64,
    flip_department: u64,
}

impl Shared {
    fn due(&self, k: usize) -> Option<Instant> {
        let ns = self.sends.get(k)?.load(Relaxed);
        (ns > 0).then(|| self.base + Duration::from_nanos(ns - 1))
    }
}

async fn measure(
    target: &mut Target,
    common: &Common,
    args: &FanoutArgs,
    report: &mut Report,
) -> Result<Run> {
    let mut run = Run::new(target.kind.name());
    let is_hub = target.kind == TargetKind::Hub;
    let base = if is_hub { common.target.id_base() } else { 1 };
    let flip_department = base;
    let k = args.departments as u64;
    // Widget i's department; with --other-departments widget N is the sentinel on the flipping one.
    let n_conns = args.widgets + usize::from(args.other_departments);
    let department_of = |i: usize| -> u64 {
        match (args.other_departments, i == args.widgets) {
            (true, true) => flip_department,
            (true, false) => flip_department + 1 + (i as u64 % k),
            (false, _) => flip_department + (i as u64 % k),
        }
    };
    if n_conns + 200 > crate::fd_limit() as usize {
        bail!("{n_conns} connections need more open files than this process may have");
    }

    // The flipper: an operator of the flipping department (hub), a publisher socket
    // (baseline) or an HTTP publisher (uWS).
    let connector = Connector::new(&target.urls, common.target.sources).await?;
    let greeting = target.kind.widget_greeting();
    let flipper: Flipper = if target.kind == TargetKind::Uws {
        Flipper::Http(UwsPublisher::new(&target.urls[0])?)
    } else if is_hub {
        let api = target.api()?;
        api.put_department(flip_department, 4).await?;
        api.put_operator(base, &[flip_department], 4).await?;
        let token = mint_token(&target.jwt_secret, base, Duration::from_secs(3600))?;
        let mut ws = connector
            .connect_to(0, &format!("/ws/operator?token={token}"))
            .await
            .context("operator connect")?;
        let hello = client::first_frames(&mut ws, 1, Duration::from_secs(10))
            .await?
            .remove(0);
        if frame_type(&hello) != "hello" {
            bail!("operator's first frame is not a hello: {hello}");
        }
        if hello["operator"]["status"] != "online" {
            bail!(
                "operator not online right after connecting (fan-out needs it online): hello.operator = {}",
                hello["operator"]
            );
        }
        Flipper::Ws(Box::new(ws))
    } else {
        Flipper::Ws(Box::new(
            connector
                .connect_to(0, &format!("/pub?department={flip_department}"))
                .await?,
        ))
    };

    // Widgets.
    let flips = (args.rate * args.duration.as_secs_f64()).ceil().max(1.0) as usize;
    let shared = Arc::new(Shared {
        base: Instant::now(),
        sends: (0..flips).map(|_| AtomicU64::new(0)).collect(),
        hist: (0..16)
            .map(|_| Mutex::new(client::new_histogram()))
            .collect(),
        received: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        flip_department,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    eprintln!("opening {n_conns} widget connections…");
    let mut bad_initial = Vec::new();
    let connected = client::connect_many(
        &connector,
        n_conns,
        args.connect_concurrency,
        greeting,
        |i| format!("/ws/widget?department={}", department_of(i)),
        |i, ws, greeting| {
            let on_flipping = department_of(i) == flip_department;
            if is_hub && on_flipping && greeting[0]["online"] != true && bad_initial.len() < 3 {
                bad_initial.push(greeting[0].clone());
            }
            (
                on_flipping,
                tokio::spawn(widget(ws, i % 16, shared.clone(), stop_rx.clone())),
            )
        },
    )
    .await;
    run.errors = connected.errors.clone();
    let on_flipping = connected.items.iter().filter(|(f, _)| *f).count() as u64;
    run.add("widgets_connected", connected.items.len() as f64, "");
    run.add("widgets_on_flipping_dept", on_flipping as f64, "");
    run.add_rate(
        "connect_rate",
        connected.items.len() as u64,
        connected.elapsed,
    );
    run.add_latency("handshake", &connected.handshake);
    report.check(
        target.kind.name(),
        "all widgets connected",
        connected.items.len() == n_conns,
        format!("{}/{n_conns}", connected.items.len()),
    );
    if !bad_initial.is_empty() {
        bail!("widgets of the flipping department did not start online: {bad_initial:?}");
    }
    run.add_opt(
        "rss_with_widgets",
        target.rss_kib().map(|k| k as f64 / 1024.0),
        "MiB",
    );

    // Flip, open loop.
    let acks = Arc::new(Mutex::new(client::new_histogram()));
    let ack_errors = Arc::new(AtomicU64::new(0));
    let (mut sink, publisher, mut stream) = match flipper {
        Flipper::Ws(ws) => {
            let (sink, stream) = (*ws).split();
            (Some(sink), None, Some(stream))
        }
        Flipper::Http(p) => (None, Some(p), None),
    };
    let reader = stream.take().map(|mut stream| {
        let (shared, acks, ack_errors) = (shared.clone(), acks.clone(), ack_errors.clone());
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(t) = msg else { continue };
                let now = Instant::now();
                let Ok(v) = serde_json::from_str::<Value>(&t) else {
                    continue;
                };
                match frame_type(&v) {
                    "ack" => {
                        let due = v["ref"].as_u64().and_then(|r| shared.due(r as usize - 1));
                        if let Some(due) = due {
                            client::record(
                                &mut acks.lock().unwrap(),
                                now.saturating_duration_since(due),
                            );
                        }
                    }
                    "error" => {
                        let seen = ack_errors.fetch_add(1, Relaxed);
                        if seen < 3 {
                            eprintln!("operator got an error: {v}");
                        }
                    }
                    _ => {}
                }
            }
        })
    });
    let cpu_before = target.cpu_secs();
    let own_cpu_before = own_cpu_secs();
    eprintln!("flipping {flips} times at {}/s…", args.rate);
    let t0 = Instant::now();
    let mut max_lag = Duration::ZERO;
    for k in 0..flips {
        let due = t0 + Duration::from_secs_f64(k as f64 / args.rate);
        tokio::time::sleep_until(due.into()).await;
        max_lag = max_lag.max(due.elapsed());
        shared.sends[k].store((due - shared.base).as_nanos() as u64 + 1, Relaxed);
        let online = k % 2 == 1;
        let frame = if is_hub {
            json!({"type": "set_status", "online": online, "ref": k + 1})
        } else {
            let reason = if online { "operators" } else { "none" };
            json!({"type": "widget_status", "department": flip_department, "online": online, "reason": reason})
        };
        match (&mut sink, &publisher) {
            (Some(sink), _) => sink
                .send(Message::text(frame.to_string()))
                .await
                .context("sending a flip")?,
            (None, Some(p)) => p.publish(frame)?,
            (None, None) => unreachable!("a flipper is a socket or a publisher"),
        }
    }
    let last_flip = t0.elapsed();

    // Drain.
    let expected = flips as u64 * on_flipping;
    let drain_until = Instant::now() + args.drain;
    while shared.received.load(Relaxed) + shared.skipped.load(Relaxed) < expected
        && Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = target.cpu_secs().zip(cpu_before).map(|(a, b)| a - b);
    let received = shared.received.load(Relaxed);
    target.check_alive()?;
    if let Some(p) = publisher {
        // Publishes go one at a time: a peer slower than the asked rate (20/s to 10,000
        // sockets on a busy machine) finishes late, which the figures below show.
        tokio::time::timeout(
            Duration::from_secs(10) + args.duration + args.drain,
            p.finish(),
        )
        .await
        .context("the uWS publishes did not finish")?
        .context("publishing to the uWS peer")?;
    }

    let mut hist = client::new_histogram();
    for h in &shared.hist {
        hist.add(&*h.lock().unwrap())?;
    }
    run.add("flips_sent", flips as f64, "");
    // Flips 0..n-1 are due at 0, 1/R, …, (n-1)/R.
    run.add_rate(
        "flip_rate_achieved",
        flips.saturating_sub(1) as u64,
        last_flip,
    );
    run.add("sender_max_lag", max_lag.as_secs_f64() * 1000.0, "ms");
    run.add("expected", expected as f64, "");
    run.add("received", received as f64, "");
    let ratio = if expected > 0 {
        received as f64 / expected as f64
    } else {
        1.0
    };
    run.add("delivery_ratio", ratio, "");
    run.add_latency("latency", &hist);
    run.add("skipped_flips", shared.skipped.load(Relaxed) as f64, "");
    run.add(
        "unexpected_frames",
        shared.unexpected.load(Relaxed) as f64,
        "",
    );
    if is_hub {
        run.add_latency("ack", &acks.lock().unwrap());
        run.add("ack_errors", ack_errors.load(Relaxed) as f64, "");
    }
    if let Some(cpu) = cpu {
        run.add("target_cpu", cpu, "s");
        run.add("target_cpu_per_flip", cpu * 1000.0 / flips as f64, "ms");
        if received > 0 {
            run.add("target_cpu_per_delivery", cpu * 1e6 / received as f64, "us");
        }
    }
    run.add("loadtest_cpu", own_cpu_secs() - own_cpu_before, "s");
    report.check(
        target.kind.name(),
        "every flip reached every widget",
        received == expected,
        format!("{received}/{expected} (ratio {ratio:.4})"),
    );
    report.check(
        target.kind.name(),
        "no frame for unchanged departments",
        shared.unexpected.load(Relaxed) == 0,
        format!("{} unexpected frames", shared.unexpected.load(Relaxed)),
    );

    // Tear down.
    let _ = stop_tx.send(true);
    if let Some(mut sink) = sink {
        let _ = sink.close().await;
    }
    if let Some(reader) = reader {
        reader.abort();
    }
    let mut lost = 0;
    for (_, h) in connected.items {
        if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(10), h).await {
            lost += 1;
        }
    }
    run.add("widgets_lost", lost as f64, "");
    report.check(
        target.kind.name(),
        "no widget dropped",
        lost == 0,
        format!("{lost} widget connections closed by the target"),
    );
    Ok(run)
}

/// A widget: match the k-th update of the flipping department to flip k. Returns whether the
/// connection was lost before the stop signal.
async fn widget(
    mut ws: Ws,
    shard: usize,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let mut k = 0usize;
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => break,
            msg = ws.next() => msg,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return true,
            Some(Ok(_)) => continue,
        };
        let now = Instant::now();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if frame_type(&v) != "widget_status"
            || v["department"].as_u64() != Some(shared.flip_department)
        {
            shared.unexpected.fetch_add(1, Relaxed);
            continue;
        }
        // Flip k sets online = (k is odd); a mismatch means flip k produced no message.
        if v["online"].as_bool() != Some(k % 2 == 1) {
            shared.skipped.fetch_add(1, Relaxed);
            k += 1;
        }
        match shared.due(k) {
            Some(due) => {
                client::record(
                    &mut shared.hist[shard].lock().unwrap(),
                    now.saturating_duration_since(due),
                );
                shared.received.fetch_add(1, Relaxed);
            }
            None => {
                shared.unexpected.fetch_add(1, Relaxed);
            }
        }
        k += 1;
    }
    client::close(ws).await;
    false
}

//! `assign`: C chats queue up in a department whose O operators are all set offline; then
//! every operator, connected over WebSocket, flips online with `set_status` at the same
//! moment and the hub assigns the queue in a burst. Reports decisions per second and the
//! latency from the flip to each `chat_assigned`, then checks the invariants through the HTTP
//! API: no chat with two owners, no operator beyond `max_chats`. Hub only (no baseline).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::{concurrently, frame_type, on_target, parse_duration, put_operators};
use crate::{
    Common,
    client::{self, Connector, Ws},
    hub::{Target, TargetKind, mint_token, own_cpu_secs},
    report::{Report, Run},
};

#[derive(Args, Debug, Clone)]
pub struct AssignArgs {
    /// Chats queued before the operators come online.
    #[arg(long, default_value_t = 1000)]
    pub chats: usize,
    /// Operators of the department.
    #[arg(long, default_value_t = 50)]
    pub operators: usize,
    /// Capacity per operator [default: chats / operators, rounded up].
    #[arg(long)]
    pub max_chats: Option<u32>,
    /// Wait at most this long for the decisions after the flip.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub wait: Duration,
    /// POST /api/v1/chats requests in flight at once.
    #[arg(long, default_value_t = 16)]
    pub create_concurrency: usize,
}

/// One `chat_assigned` as received.
struct Decision {
    chat: u64,
    recipient: u64,
    owner: Option<u64>,
    at: Instant,
}

pub async fn run(common: &Common, args: &AssignArgs) -> Result<Report> {
    if common.target.compare || common.target.target == TargetKind::Baseline {
        bail!("assign runs against the hub only (the baseline server has no chats)");
    }
    let operators = args.operators.max(1);
    let max_chats = args
        .max_chats
        .unwrap_or(args.chats.div_ceil(operators).max(1) as u32);
    let mut report = Report::new(
        "assign",
        json!({ "chats": args.chats, "operators": operators, "max_chats": max_chats }),
    );
    if (operators as u64) * (max_chats as u64) < args.chats as u64 {
        report.note(format!(
            "operators × max_chats = {} < chats: some chats stay queued",
            operators as u64 * max_chats as u64
        ));
    }
    let run = on_target(TargetKind::Hub, &common.target, async |t| {
        measure(t, common, args, operators, max_chats, &mut report).await
    })
    .await?;
    report.runs.push(run);
    Ok(report)
}

async fn measure(
    target: &mut Target,
    common: &Common,
    args: &AssignArgs,
    operators: usize,
    max_chats: u32,
    report: &mut Report,
) -> Result<Run> {
    let mut run = Run::new("hub");
    let base = common.target.id_base();
    let department = base;
    let ids: Vec<u64> = (0..operators as u64).map(|i| base + i).collect();
    let api = target.api()?.clone();

    // Operators, all set offline, then the queue.
    api.put_department(department, max_chats).await?;
    put_operators(target, &ids, |_| department, max_chats).await?;
    concurrently(ids.len(), 32, |i| {
        let api = &api;
        let id = ids[i];
        async move { api.set_online(id, false).await }
    })
    .await
    .context("setting operators offline")?;
    eprintln!("creating {} chats…", args.chats);
    let t_create = Instant::now();
    let chat_ids: Vec<u64> = concurrently(args.chats, args.create_concurrency, |_| {
        let api = &api;
        async move { api.create_chat(department).await }
    })
    .await
    .context("creating chats")?;
    run.add("chats_created", chat_ids.len() as f64, "");
    run.add_rate(
        "chat_create_rate",
        chat_ids.len() as u64,
        t_create.elapsed(),
    );
    let ours: HashSet<u64> = chat_ids.iter().copied().collect();
    if ours.len() != chat_ids.len() {
        report.check(
            "hub",
            "chat ids unique",
            false,
            format!("{} ids for {} chats", ours.len(), chat_ids.len()),
        );
    }
    let assigned_early = api
        .chats(department)
        .await?
        .iter()
        .filter(|c| c["owner"].as_u64().is_some())
        .count();
    report.check(
        "hub",
        "no chat assigned while everyone is offline",
        assigned_early == 0,
        format!("{assigned_early} chats had an owner before the flip"),
    );

    // Connect every operator, still offline.
    let connector = Connector::new(&target.urls, common.target.sources).await?;
    let tokens: Vec<String> = ids
        .iter()
        .map(|id| mint_token(&target.jwt_secret, *id, Duration::from_secs(3600)))
        .collect::<Result<_>>()?;
    let decisions = Arc::new(Mutex::new(Vec::<Decision>::new()));
    let acks = Arc::new(Mutex::new(client::new_histogram()));
    let errors = Arc::new(Mutex::new(Vec::<Value>::new()));
    let (go_tx, go_rx) = watch::channel(None::<Instant>);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut not_offline = Vec::new();
    let connected = client::connect_many(
        &connector,
        operators,
        64,
        1,
        |i| format!("/ws/operator?token={}", tokens[i]),
        |i, ws, hello| {
            if hello[0]["operator"]["status"] != "offline" && not_offline.len() < 3 {
                not_offline.push(hello[0]["operator"].clone());
            }
            let ctx = OpCtx {
                id: ids[i],
                decisions: decisions.clone(),
                acks: acks.clone(),
                errors: errors.clone(),
            };
            tokio::spawn(operator(ws, ctx, go_rx.clone(), stop_rx.clone()))
        },
    )
    .await;
    run.errors = connected.errors.clone();
    if connected.items.len() != operators {
        bail!(
            "only {}/{operators} operators connected: {:?}",
            connected.items.len(),
            connected.errors
        );
    }
    report.check(
        "hub",
        "operators connect offline (setting kept)",
        not_offline.is_empty(),
        format!("{not_offline:?}"),
    );

    // Flip everyone online at once.
    let expected = args.chats.min(operators * max_chats as usize);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu_before = target.cpu_secs();
    let own_cpu_before = own_cpu_secs();
    let t0 = Instant::now();
    go_tx.send(Some(t0))?;
    eprintln!("{operators} operators flip online; waiting for {expected} decisions…");
    let deadline = t0 + args.wait;
    while decisions.lock().unwrap().len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A little longer, to catch duplicate or late decisions.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = target.cpu_secs().zip(cpu_before).map(|(a, b)| a - b);
    let _ = stop_tx.send(true);
    let mut lost = client::ErrorCounts::new();
    for h in connected.items {
        if let Ok(Ok(Some(why))) = tokio::time::timeout(Duration::from_secs(10), h).await {
            *lost.entry(why).or_default() += 1;
        }
    }
    target.check_alive()?;
    let lost_total: u64 = lost.values().sum();
    run.add("operators_dropped", lost_total as f64, "");
    report.check(
        "hub",
        "no operator connection dropped",
        lost_total == 0,
        format!("{lost:?}"),
    );

    // Figures from what the operators received.
    let decisions = std::mem::take(&mut *decisions.lock().unwrap());
    let mut latency = client::new_histogram();
    for d in &decisions {
        client::record(&mut latency, d.at - t0);
    }
    let last = decisions.iter().map(|d| d.at).max().unwrap_or(t0);
    run.add("decisions", decisions.len() as f64, "");
    run.add("expected", expected as f64, "");
    run.add("burst", (last - t0).as_secs_f64() * 1000.0, "ms");
    run.add_rate("decision_rate", decisions.len() as u64, last - t0);
    run.add_latency("decision_latency", &latency);
    run.add_latency("set_status_ack", &acks.lock().unwrap());
    if let Some(cpu) = cpu {
        run.add("target_cpu", cpu, "s");
    }
    run.add("loadtest_cpu", own_cpu_secs() - own_cpu_before, "s");
    let errs = errors.lock().unwrap().clone();
    report.check(
        "hub",
        "no error frame",
        errs.is_empty(),
        format!(
            "{} errors, e.g. {:?}",
            errs.len(),
            errs.iter().take(3).collect::<Vec<_>>()
        ),
    );

    let mut per_chat: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut owner_mismatch = 0;
    let mut foreign = 0;
    for d in &decisions {
        if !ours.contains(&d.chat) {
            foreign += 1;
        }
        if d.owner != Some(d.recipient) {
            owner_mismatch += 1;
        }
        per_chat.entry(d.chat).or_default().push(d.recipient);
    }
    let twice: Vec<_> = per_chat
        .iter()
        .filter(|(_, r)| r.len() > 1)
        .take(5)
        .collect();
    report.check(
        "hub",
        "every queued chat assigned",
        per_chat.len() == expected,
        format!(
            "{} distinct chats assigned, {expected} expected",
            per_chat.len()
        ),
    );
    report.check(
        "hub",
        "no chat_assigned twice",
        twice.is_empty(),
        format!("chat → recipients: {twice:?}"),
    );
    report.check(
        "hub",
        "chat_assigned goes to the owner",
        owner_mismatch == 0,
        format!("{owner_mismatch} chat_assigned whose chat.owner is not the recipient"),
    );
    report.check(
        "hub",
        "chat_assigned only for our chats",
        foreign == 0,
        format!("{foreign} foreign chat ids"),
    );

    // The hub's own view.
    let chats = api.chats(department).await?;
    let mut owners: BTreeMap<u64, usize> = BTreeMap::new();
    let (mut unowned, mut disagree) = (0, 0);
    for c in chats
        .iter()
        .filter(|c| c["id"].as_u64().is_some_and(|id| ours.contains(&id)))
    {
        match c["owner"].as_u64() {
            Some(o) => {
                *owners.entry(o).or_default() += 1;
                let id = c["id"].as_u64().unwrap();
                if per_chat.get(&id).is_some_and(|r| r.last() != Some(&o)) {
                    disagree += 1;
                }
            }
            None => unowned += 1,
        }
    }
    let over: Vec<_> = owners
        .iter()
        .filter(|(_, n)| **n > max_chats as usize)
        .collect();
    let listed: usize = owners.values().sum::<usize>() + unowned;
    report.check(
        "hub",
        "GET /api/v1/chats lists every chat",
        listed == chat_ids.len(),
        format!("{listed} of {} listed", chat_ids.len()),
    );
    report.check(
        "hub",
        "owners per GET /api/v1/chats within capacity",
        over.is_empty(),
        format!("operators over {max_chats}: {over:?}"),
    );
    report.check("hub", "owners per GET /api/v1/chats match chat_assigned", disagree == 0, format!("{disagree} chats whose owner differs from the chat_assigned recipient; {unowned} unowned"));
    if let (Some(min), Some(max)) = (owners.values().min(), owners.values().max()) {
        run.add("chats_per_operator_min", *min as f64, "");
        run.add("chats_per_operator_max", *max as f64, "");
    }
    let views = api.operators(&format!("department={department}")).await?;
    let mut over_cap = Vec::new();
    for v in views
        .iter()
        .filter(|v| v["id"].as_u64().is_some_and(|id| ids.contains(&id)))
    {
        let load =
            v["active_chats"].as_u64().unwrap_or(0) + v["pending_chats"].as_u64().unwrap_or(0);
        if load > v["max_chats"].as_u64().unwrap_or(max_chats as u64).max(1)
            || load > max_chats as u64
        {
            over_cap.push(json!({"id": v["id"], "active": v["active_chats"], "pending": v["pending_chats"], "max": v["max_chats"]}));
        }
    }
    report.check(
        "hub",
        "operator views within capacity",
        over_cap.is_empty(),
        format!("{over_cap:?}"),
    );

    Ok(run)
}

struct OpCtx {
    id: u64,
    decisions: Arc<Mutex<Vec<Decision>>>,
    acks: Arc<Mutex<hdrhistogram::Histogram<u64>>>,
    errors: Arc<Mutex<Vec<Value>>>,
}

/// An operator connection: on `go`, `set_status online`; record every `chat_assigned`.
async fn operator(
    ws: Ws,
    ctx: OpCtx,
    mut go: watch::Receiver<Option<Instant>>,
    mut stop: watch::Receiver<bool>,
) -> Option<String> {
    let (mut sink, mut stream) = ws.split();
    let mut lost = None;
    let mut flipped_at = None;
    loop {
        tokio::select! {
            r = go.changed(), if flipped_at.is_none() => {
                if r.is_err() { break }
                let frame = json!({"type": "set_status", "online": true, "ref": 1});
                flipped_at = Some(Instant::now());
                if sink.send(Message::text(frame.to_string())).await.is_err() { break }
            }
            _ = stop.changed() => break,
            msg = stream.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(f))) => {
                        lost = Some(f.map_or("closed".into(), |f| format!("closed {} {}", u16::from(f.code), f.reason)));
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        lost = Some(client::classify(&e.into()));
                        break;
                    }
                    None => {
                        lost = Some("eof".into());
                        break;
                    }
                };
                let now = Instant::now();
                let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                match frame_type(&v) {
                    "chat_assigned" => {
                        let chat = v.get("chat").unwrap_or(&Value::Null);
                        let d = Decision { chat: chat["id"].as_u64().unwrap_or(0), recipient: ctx.id, owner: chat["owner"].as_u64(), at: now };
                        ctx.decisions.lock().unwrap().push(d);
                    }
                    "ack" if v["ref"] == 1 => {
                        if let Some(t) = flipped_at {
                            client::record(&mut ctx.acks.lock().unwrap(), now - t);
                        }
                    }
                    "error" => ctx.errors.lock().unwrap().push(v),
                    _ => {}
                }
            }
        }
    }
    let _ = sink.close().await;
    lost
}

//! `assign`: C chats queue up in a department whose O operators are all set offline; then
//! every operator, connected over WebSocket, flips online with `set_status` at the same
//! moment and the hub assigns the queue in a burst (`--departments K` spreads operators and
//! chats over K departments). Reports decisions per second and the
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

use super::{concurrently, frame_type, on_target, parse_duration, peek_type, put_operators};
use crate::{
    Common,
    client::{self, Connector, Ws},
    hub::{Api, Target, TargetKind, mint_token, own_cpu_secs},
    report::{Report, Run},
};

#[derive(Args, Debug, Clone)]
pub struct AssignArgs {
    /// Chats queued before the operators come online.
    #[arg(long, default_value_t = 1000)]
    pub chats: usize,
    /// Operators (over all departments).
    #[arg(long, default_value_t = 50)]
    pub operators: usize,
    /// Spread operators and chats over this many departments (operator i and chat j in
    /// department D + i mod K, D + j mod K). Every decision is sent as a `chat` event to
    /// every operator of its department, so with 1 department the event fan-out per
    /// decision grows with O; with K departments it is ~O/K.
    #[arg(long, default_value_t = 1)]
    pub departments: usize,
    /// Capacity per operator [default: chats / operators, rounded up].
    #[arg(long)]
    pub max_chats: Option<u32>,
    /// Wait at most this long for the decisions after the flip.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub wait: Duration,
    /// Add one observer per department: an operator of it who stays offline (never a
    /// candidate) and records every `chat` event, i.e. when each decision was made and
    /// pushed by the hub. The owner's `chat_assigned` can only be as early as its socket
    /// writes, which the hub holds back until the owner's own `set_status` is durable.
    #[arg(long)]
    pub observers: bool,
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
    if common.target.has_peer() {
        bail!("assign runs against the hub only (the peer servers have no chats)");
    }
    let operators = args.operators.max(1);
    let k = args.departments.clamp(1, operators);
    let max_chats = args
        .max_chats
        .unwrap_or(args.chats.div_ceil(operators).max(1) as u32);
    let mut report = Report::new(
        "assign",
        json!({ "chats": args.chats, "operators": operators, "departments": k, "max_chats": max_chats, "observers": args.observers }),
    );
    if expected_decisions(args.chats, operators, k, max_chats) < args.chats {
        report.note(format!(
            "some departments have more chats than operators × max_chats ({max_chats}): some chats stay queued"
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
    let k = args.departments.clamp(1, operators);
    let department = |i: usize| base + (i % k) as u64;
    let ids: Vec<u64> = (0..operators as u64).map(|i| base + i).collect();
    let api = target.api()?.clone();

    // Operators, all set offline, then the queue.
    concurrently(k, 32, |j| {
        let api = &api;
        async move { api.put_department(department(j), max_chats).await }
    })
    .await
    .context("creating departments")?;
    put_operators(target, &ids, department, max_chats).await?;
    // Observers (ids after the operators): operator `operators + j` in department j.
    let observer_ids: Vec<u64> = if args.observers {
        (0..k as u64).map(|j| base + operators as u64 + j).collect()
    } else {
        Vec::new()
    };
    put_operators(target, &observer_ids, department, max_chats).await?;
    let all_ids: Vec<u64> = ids.iter().chain(&observer_ids).copied().collect();
    concurrently(all_ids.len(), 32, |i| {
        let api = &api;
        let id = all_ids[i];
        async move { api.set_online(id, false).await }
    })
    .await
    .context("setting operators offline")?;
    eprintln!("creating {} chats…", args.chats);
    let t_create = Instant::now();
    let chat_ids: Vec<u64> = concurrently(args.chats, args.create_concurrency, |j| {
        let api = &api;
        async move { api.create_chat(department(j)).await }
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
    let assigned_early = our_chats(&api, k, base, &ours)
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
    let tokens: Vec<String> = all_ids
        .iter()
        .map(|id| mint_token(&target.jwt_secret, *id, Duration::from_secs(3600)))
        .collect::<Result<_>>()?;
    let decisions = Arc::new(Mutex::new(Vec::<Decision>::new()));
    let seen = Arc::new(Mutex::new(HashMap::<u64, Instant>::new()));
    let acks = Arc::new(Mutex::new(client::new_histogram()));
    let errors = Arc::new(Mutex::new(Vec::<Value>::new()));
    let (go_tx, go_rx) = watch::channel(None::<Instant>);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut not_offline = Vec::new();
    let connected = client::connect_many(
        &connector,
        all_ids.len(),
        64,
        1,
        |i| format!("/ws/operator?token={}", tokens[i]),
        |i, ws, hello| {
            if hello[0]["operator"]["status"] != "offline" && not_offline.len() < 3 {
                not_offline.push(hello[0]["operator"].clone());
            }
            let ctx = OpCtx {
                id: all_ids[i],
                flips: i < operators,
                seen: seen.clone(),
                decisions: decisions.clone(),
                acks: acks.clone(),
                errors: errors.clone(),
            };
            tokio::spawn(operator(ws, ctx, go_rx.clone(), stop_rx.clone()))
        },
    )
    .await;
    run.errors = connected.errors.clone();
    if connected.items.len() != all_ids.len() {
        bail!(
            "only {}/{} operators connected: {:?}",
            connected.items.len(),
            all_ids.len(),
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
    let expected = expected_decisions(args.chats, operators, k, max_chats);
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
    if args.observers {
        // When the hub made and pushed each decision, as the department's observer saw it.
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        let mut made = client::new_histogram();
        let mut last_made = t0;
        let mut n = 0u64;
        for (_, at) in seen.iter().filter(|(c, _)| ours.contains(c)) {
            client::record(&mut made, *at - t0);
            last_made = last_made.max(*at);
            n += 1;
        }
        run.add("decisions_made", n as f64, "");
        run.add("burst_made", (last_made - t0).as_secs_f64() * 1000.0, "ms");
        run.add_rate("decision_made_rate", n, last_made - t0);
        run.add_latency("decision_made_latency", &made);
        report.check(
            "hub",
            "observers saw every decision",
            n as usize == expected,
            format!("{n} of {expected} chats seen with an owner by the department observers"),
        );
    }
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
    let chats = our_chats(&api, k, base, &ours).await?;
    let mut owners: BTreeMap<u64, usize> = BTreeMap::new();
    let (mut unowned, mut disagree) = (0, 0);
    for c in &chats {
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
    let views = if k == 1 {
        api.operators(&format!("department={base}")).await?
    } else {
        api.operators("").await?
    };
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

/// Decisions possible: per department, its chats up to its operators' capacity.
fn expected_decisions(chats: usize, operators: usize, k: usize, max_chats: u32) -> usize {
    (0..k)
        .map(|d| {
            let c = chats / k + usize::from(d < chats % k);
            let o = operators / k + usize::from(d < operators % k);
            c.min(o * max_chats as usize)
        })
        .sum()
}

/// Our chats as the hub lists them (per department when there is one, else all at once).
async fn our_chats(api: &Api, k: usize, base: u64, ours: &HashSet<u64>) -> Result<Vec<Value>> {
    let all = if k == 1 {
        api.chats(base).await?
    } else {
        api.all_chats().await?
    };
    Ok(all
        .into_iter()
        .filter(|c| c["id"].as_u64().is_some_and(|id| ours.contains(&id)))
        .collect())
}

struct OpCtx {
    id: u64,
    /// Flips online on `go` (false: an observer).
    flips: bool,
    /// Observers: chat → when it was first seen with an owner.
    seen: Arc<Mutex<HashMap<u64, Instant>>>,
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
            r = go.changed(), if flipped_at.is_none() && ctx.flips => {
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
                // Most frames are the department's `chat` events, which only observers use:
                // skipped unparsed.
                let wanted = |ty: &str| {
                    matches!(ty, "chat_assigned" | "ack" | "error") || (ty == "chat" && !ctx.flips)
                };
                if peek_type(&text).is_some_and(|ty| !wanted(ty)) {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                match frame_type(&v) {
                    "chat_assigned" => {
                        let chat = v.get("chat").unwrap_or(&Value::Null);
                        let d = Decision { chat: chat["id"].as_u64().unwrap_or(0), recipient: ctx.id, owner: chat["owner"].as_u64(), at: now };
                        ctx.decisions.lock().unwrap().push(d);
                    }
                    "chat" if !ctx.flips => {
                        let chat = v.get("chat").unwrap_or(&Value::Null);
                        if let (Some(id), Some(_)) = (chat["id"].as_u64(), chat["owner"].as_u64()) {
                            ctx.seen.lock().unwrap().entry(id).or_insert(now);
                        }
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

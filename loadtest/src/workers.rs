//! Worker processes for more connections than one process may hold (~19k open files each):
//! the parent spawns K copies of itself (`presence-loadtest hold-worker`), hands each a job
//! on stdin (one JSON line: targets, paths to open), and reads one JSON line back once the
//! worker's connections are open. A line "stop" (or EOF) on stdin makes the worker close
//! them and answer with a last line.

use std::{process::Stdio, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
    sync::watch,
};

use crate::client::{self, Connected, Connector, ErrorCounts};

#[derive(Serialize, Deserialize)]
struct Job {
    urls: Vec<String>,
    sources: usize,
    /// This worker binds to source addresses after those of workers 0..index.
    index: usize,
    concurrency: usize,
    /// Text frames that establish a connection (1: the hub's greeting; 0: the uWS peer).
    greeting: usize,
    paths: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Opened {
    ok: usize,
    errors: ErrorCounts,
    elapsed_s: f64,
    handshake_us: Vec<u64>,
}

#[derive(Serialize, Deserialize, Default)]
pub struct Closed {
    pub frames: u64,
    pub lost: ErrorCounts,
}

/// The `hold-worker` subcommand.
pub async fn worker_main() -> Result<()> {
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let line = stdin
        .next_line()
        .await?
        .ok_or_else(|| anyhow!("no job on stdin"))?;
    let job: Job = serde_json::from_str(&line).context("bad job")?;
    let mut connector = Connector::new(&job.urls, job.sources).await?;
    connector.offset_sources(job.index);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut handshake_us = Vec::new();
    let connected = client::connect_many(
        &connector,
        job.paths.len(),
        job.concurrency,
        job.greeting,
        |i| job.paths[i].clone(),
        |_, ws, _| tokio::spawn(client::hold(ws, stop_rx.clone())),
    )
    .await;
    for v in connected.handshake.iter_recorded() {
        for _ in 0..v.count_at_value() {
            handshake_us.push(v.value_iterated_to());
        }
    }
    let opened = Opened {
        ok: connected.items.len(),
        errors: connected.errors,
        elapsed_s: connected.elapsed.as_secs_f64(),
        handshake_us,
    };
    let mut out = tokio::io::stdout();
    out.write_all(format!("{}\n", serde_json::to_string(&opened)?).as_bytes())
        .await?;
    out.flush().await?;

    let _ = stdin.next_line().await; // "stop" or EOF
    let _ = stop_tx.send(true);
    let mut closed = Closed::default();
    for h in connected.items {
        if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(10), h).await {
            closed.frames += st.frames;
            if let Some(why) = st.lost {
                *closed.lost.entry(why).or_default() += 1;
            }
        }
    }
    out.write_all(format!("{}\n", serde_json::to_string(&closed)?).as_bytes())
        .await?;
    out.flush().await?;
    Ok(())
}

/// Running workers holding their connections.
pub struct Pool {
    workers: Vec<(Child, ChildStdin, Lines<BufReader<ChildStdout>>)>,
}

/// Spread `paths` over `k` worker processes; returns once every worker has opened its share.
pub async fn open(
    urls: &[String],
    sources: usize,
    concurrency: usize,
    greeting: usize,
    paths: Vec<String>,
    k: usize,
) -> Result<(Pool, Connected<()>)> {
    let exe = std::env::current_exe()?;
    let per = paths.len().div_ceil(k.max(1));
    let mut workers = Vec::new();
    for (index, chunk) in paths.chunks(per.max(1)).enumerate() {
        let mut cmd = Command::new(&exe);
        cmd.arg("hold-worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // SAFETY: prctl only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("spawning a worker")?;
        let mut stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let job = Job {
            urls: urls.to_vec(),
            sources,
            index,
            concurrency: concurrency.div_ceil(k).max(1),
            greeting,
            paths: chunk.to_vec(),
        };
        stdin
            .write_all(format!("{}\n", serde_json::to_string(&job)?).as_bytes())
            .await?;
        stdin.flush().await?;
        workers.push((child, stdin, stdout));
    }
    let mut connected = Connected {
        items: Vec::new(),
        errors: ErrorCounts::new(),
        elapsed: Duration::ZERO,
        handshake: client::new_histogram(),
    };
    for (_, _, stdout) in &mut workers {
        let line = stdout
            .next_line()
            .await?
            .ok_or_else(|| anyhow!("a worker exited before reporting"))?;
        let opened: Opened = serde_json::from_str(&line)?;
        connected.items.extend(std::iter::repeat_n((), opened.ok));
        for (e, n) in opened.errors {
            *connected.errors.entry(e).or_default() += n;
        }
        connected.elapsed = connected
            .elapsed
            .max(Duration::from_secs_f64(opened.elapsed_s));
        for us in opened.handshake_us {
            let _ = connected.handshake.record(us);
        }
    }
    Ok((Pool { workers }, connected))
}

impl Pool {
    /// Tell every worker to close its connections; what they saw while holding.
    pub async fn close(self) -> Result<Closed> {
        let mut total = Closed::default();
        for (mut child, mut stdin, mut stdout) in self.workers {
            stdin.write_all(b"stop\n").await?;
            drop(stdin);
            let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line()).await??;
            let Some(line) = line else {
                bail!("a worker exited before closing")
            };
            let closed: Closed = serde_json::from_str(&line)?;
            total.frames += closed.frames;
            for (e, n) in closed.lost {
                *total.lost.entry(e).or_default() += n;
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        }
        Ok(total)
    }
}

//! presence-loadtest: load scenarios for presence-hub, each also runnable against a bare
//! tokio-tungstenite broadcast server (the baseline) so every hub figure has a floor to be
//! compared with. See README.md for the scenarios and their flags.

mod baseline;
mod client;
mod hub;
mod plot;
mod report;
mod scenarios;
mod workers;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::{hub::TargetArgs, report::Report, scenarios::parse_duration};

#[derive(Parser, Debug)]
#[command(name = "presence-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the bare baseline server: every connection on /ws/widget?department=N receives
    /// every text frame a connection on /pub?department=N sends.
    BaselineServer {
        #[arg(long, default_value = "127.0.0.1:9300")]
        listen: SocketAddr,
    },
    /// (internal) A worker process of `idle --workers K`: job on stdin, results on stdout.
    #[command(hide = true)]
    HoldWorker,
    /// Open N operator or widget connections, hold them: RSS per connection, connect rate.
    Idle {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::idle::IdleArgs,
    },
    /// Widgets watch department(s); one operator flips status at a fixed rate (open loop):
    /// delivery latency and ratio.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::fanout::FanoutArgs,
    },
    /// Connect/disconnect storm of operator WebSockets (JWT checked on every upgrade);
    /// afterwards every operator must go offline.
    Churn {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::churn::ChurnArgs,
    },
    /// Create and close N chats over HTTP: RSS before, at the peak and after (closed chats
    /// leave live state, so memory must come back).
    Chats {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::chats::ChatsArgs,
    },
    /// C queued chats, O operators flipping online at once: decision rate and latency,
    /// no double owner, no operator over capacity.
    Assign {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::assign::AssignArgs,
    },
    /// For N minutes a mix of everything (operators churning, widgets, chats created and
    /// closed, slow readers, malformed frames): RSS over time against the live set.
    Soak {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::soak::SoakArgs,
    },
    /// W operators watch a chat and stop reading while another sends large whispers, for R
    /// rounds: the hub's RSS peak and what stays after (memory given back).
    Slowread {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::slowread::SlowreadArgs,
    },
}

/// Options every scenario takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Overall time limit of the run; everything is torn down when it passes.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    // Errors print as a cause chain, without a backtrace: they are findings, not crashes.
    let code = rt.block_on(run(cli)).unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        2
    });
    // Do not wait for connection tasks still lingering in the runtime.
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<i32> {
    let (common, fut): (
        Common,
        std::pin::Pin<Box<dyn Future<Output = Result<Report>>>>,
    ) = match cli.command {
        Command::BaselineServer { listen } => {
            baseline::serve(listen).await?;
            return Ok(0);
        }
        Command::HoldWorker => {
            workers::worker_main().await?;
            return Ok(0);
        }
        Command::Idle { common, args } => {
            let c = common.clone();
            (
                common,
                Box::pin(async move { scenarios::idle::run(&c, &args).await }),
            )
        }
        Command::Fanout { common, args } => {
            let c = common.clone();
            (
                common,
                Box::pin(async move { scenarios::fanout::run(&c, &args).await }),
            )
        }
        Command::Churn { common, args } => {
            let c = common.clone();
            (
                common,
                Box::pin(async move { scenarios::churn::run(&c, &args).await }),
            )
        }
        Command::Chats { common, args } => {
            let c = common.clone();
            (
                common,
                Box::pin(async move { scenarios::chats::run(&c, &args).await }),
            )
        }
        Command::Soak { common, args } => {
            let c = common.clone();
            (
                common,
                Box::pin(async move { scenarios::soak::run(&c, &args).await }),
            )
        }
        Command::Slowread { common, args } => {
            let c = common.clone();
            (
                common,
                Box::pin(async move { scenarios::slowread::run(&c, &args).await }),
            )
        }
        Command::Assign { common, args } => {
            let c = common.clone();
            (
                common,
                Box::pin(async move { scenarios::assign::run(&c, &args).await }),
            )
        }
    };
    let mut report = tokio::select! {
        r = tokio::time::timeout(common.timeout, fut) => match r {
            Ok(r) => r?,
            Err(_) => anyhow::bail!("overall --timeout of {:?} passed; run aborted", common.timeout),
        },
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
    };
    report.finish();
    report.print();
    if let Some(path) = &common.json {
        report.write_json(path)?;
        eprintln!("JSON report written to {}", path.display());
    }
    Ok(if report.all_checks_passed() { 0 } else { 1 })
}

/// Raise the soft open-files limit to the hard one: every client socket is a file.
fn raise_fd_limit() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The open-files limit in force (soft).
pub fn fd_limit() -> u64 {
    // SAFETY: as above.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur
        } else {
            1024
        }
    }
}

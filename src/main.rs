//! The `presence-hub` binary: parses the CLI, loads the config, sets up logging, binds and
//! calls `server::run`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use presence_hub::auth::{Secrets, Tokens};
use presence_hub::config::{Config, LogFormat, parse_duration};

#[derive(Parser)]
#[command(
    name = "presence-hub",
    version,
    about = "Real-time presence and routing hub for live-chat platforms"
)]
struct Cli {
    /// Config file (TOML); every key can be overridden by PRESENCE_HUB_<SECTION>_<KEY>.
    #[arg(long, global = true, default_value = "config/default.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub (the default).
    Serve,
    /// Print an operator token signed with the configured (or generated) secret.
    Token {
        #[arg(long)]
        operator: u64,
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Validate the config and exit (non-zero with a message when it is wrong).
    CheckConfig,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("presence-hub: {e}");
            std::process::exit(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            println!("{}", checked(&cli.config, &cfg));
            Ok(())
        }
        Command::Token { operator, ttl } => {
            let ttl: Duration = parse_duration(&ttl).map_err(anyhow::Error::msg)?;
            let secrets = Secrets::resolve(&cfg).context("reading the secrets")?;
            println!("{}", Tokens::new(&secrets.jwt_secret).mint(operator, ttl));
            Ok(())
        }
        Command::Serve => serve(cfg),
    }
}

/// What `check-config` checked: the file, the environment overrides applied on top of it,
/// and the validation of the result.
fn checked(path: &std::path::Path, cfg: &Config) -> String {
    let mut vars: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(presence_hub::config::ENV_PREFIX))
        .collect();
    vars.sort();
    let overrides = if vars.is_empty() {
        "no PRESENCE_HUB_* environment overrides".to_string()
    } else {
        format!("environment overrides {}", vars.join(", "))
    };
    format!(
        "{}: ok (file read, {overrides}, validated; listen {}, store {})",
        path.display(),
        cfg.server.listen,
        format!("{:?}", cfg.store.backend).to_lowercase()
    )
}

fn serve(cfg: Config) -> anyhow::Result<()> {
    // Before any thread (the runtime's workers) allocates.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    presence_hub::trim::limit_arenas(cores);
    init_tracing(&cfg);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = presence_hub::server::bind(cfg.server.listen)
            .with_context(|| format!("binding {}", cfg.server.listen))?;
        let generated = cfg.auth.api_key.is_empty() || cfg.auth.jwt_secret.is_empty();
        let data_dir = cfg.store.data_dir.clone();
        let hub = presence_hub::server::build(cfg).await?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "presence-hub listening (HTTP and WebSocket)");
        if generated {
            tracing::info!(
                api_key = %data_dir.join("api_key").display(),
                jwt_secret = %data_dir.join("jwt_secret").display(),
                "secrets are in the data dir (generated on first start); mint an operator token with `presence-hub token --operator 1`"
            );
        }
        presence_hub::server::run(listener, hub, shutdown_signal()).await;
        Ok(())
    })
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn init_tracing(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log.level));
    // Colour codes only for a person at a terminal: a file or a log collector gets plain text.
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

//! The binary as a newcomer meets it: plain logs when written to a file, environment
//! overrides whose errors name the variable, `check-config` saying what it checked.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_presence-hub");

/// The binary without the caller's `PRESENCE_HUB_*`, `RUST_LOG` and `NO_COLOR` variables.
fn command(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("PRESENCE_HUB_") || k == "RUST_LOG" || k == "NO_COLOR" {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn default_config() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/default.toml")
        .display()
        .to_string()
}

fn output(cmd: &mut std::process::Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("exited"), text)
}

#[test]
fn logs_have_no_colour_codes_when_written_to_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("hub.toml");
    let data = tmp.path().join("data");
    std::fs::write(
        &config,
        format!("[server]\nlisten = \"127.0.0.1:0\"\n[store]\ndata_dir = {data:?}\n"),
    )
    .unwrap();
    let log = tmp.path().join("hub.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = command(&["--config", config.to_str().unwrap()])
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap();
    // Another process: its log file is polled, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("listening") {
            break text;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("the hub did not log its address:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escape codes in a log file:\n{text:?}"
    );
    assert!(text.contains("INFO"), "{text}");
}

#[test]
fn env_override_unknown_key_error_names_the_variable() {
    let (code, out) = output(
        command(&["check-config", "--config", &default_config()])
            .env("PRESENCE_HUB_SERVER_LISEN", "0.0.0.0:8080"),
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("PRESENCE_HUB_SERVER_LISEN"),
        "names the variable: {out}"
    );
    assert!(out.contains("lisen"), "names the key: {out}");
    let (code, out) = output(
        command(&["check-config", "--config", &default_config()])
            .env("PRESENCE_HUB_PRESENCE_DISCONNECT_GRACE", "5 parsecs"),
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("PRESENCE_HUB_PRESENCE_DISCONNECT_GRACE"),
        "{out}"
    );
}

#[test]
fn check_config_says_what_it_checked() {
    let (code, out) = output(&mut command(&[
        "check-config",
        "--config",
        &default_config(),
    ]));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("default.toml: ok"), "{out}");
    assert!(
        out.contains("no PRESENCE_HUB_* environment overrides"),
        "{out}"
    );
    let (code, out) = output(
        command(&["check-config", "--config", &default_config()])
            .env("PRESENCE_HUB_PRESENCE_DISCONNECT_GRACE", "1s")
            .env("PRESENCE_HUB_SERVER_LISTEN", "127.0.0.1:9000"),
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("environment overrides PRESENCE_HUB_PRESENCE_DISCONNECT_GRACE, PRESENCE_HUB_SERVER_LISTEN"),
        "{out}"
    );
    assert!(
        out.contains("listen 127.0.0.1:9000"),
        "the override is what was checked: {out}"
    );
}

#[test]
fn cluster_sample_configs_are_two_valid_nodes_of_one_cluster() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut listens = Vec::new();
    for node in ["cluster-a.toml", "cluster-b.toml"] {
        let path = dir.join(node);
        let (code, out) = output(&mut command(&[
            "check-config",
            "--config",
            path.to_str().unwrap(),
        ]));
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("store redis"), "{out}");
        let cfg = presence_hub::config::Config::from_toml_and_env(
            &std::fs::read_to_string(&path).unwrap(),
            [],
        )
        .unwrap();
        listens.push((
            cfg.server.listen,
            cfg.server.node_id,
            cfg.auth.jwt_secret.0,
            cfg.auth.api_key.0,
            cfg.store.redis_url.0,
        ));
    }
    let (a, b) = (&listens[0], &listens[1]);
    assert_ne!(a.0, b.0, "own ports");
    assert_ne!(a.1, b.1, "own node ids");
    assert_eq!(
        (&a.2, &a.3, &a.4),
        (&b.2, &b.3, &b.4),
        "same secrets and Redis"
    );
}

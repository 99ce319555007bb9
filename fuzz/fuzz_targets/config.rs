//! The config loader: TOML text, then environment overrides (`KEY=VALUE` lines after a NUL
//! byte), then validation. Any input is a config or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use presence_hub::config::Config;

fuzz_target!(|data: &[u8]| {
    let (toml, env) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let toml = String::from_utf8_lossy(toml);
    let env: Vec<(String, String)> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("PRESENCE_HUB_{k}"), v.to_string()))
        .collect();
    if let Ok(cfg) = Config::from_toml_and_env(&toml, env) {
        // What validation let through keeps its promises.
        assert!(cfg.limits.max_widget_connections() < cfg.limits.max_connections);
        assert!(cfg.limits.outbound_bytes >= cfg.limits.max_message_bytes);
        let _ = cfg.presence.pong_timeout();
    }
});

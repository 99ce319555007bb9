//! Configuration: the TOML file of SPEC.md section 7, environment overrides
//! (`PRESENCE_HUB_<SECTION>_<KEY>`) and validation. Unknown keys are refused.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "PRESENCE_HUB_";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: Server,
    pub auth: Auth,
    pub store: Store,
    pub presence: Presence,
    pub assignment: Assignment,
    pub chats: Chats,
    pub cluster: Cluster,
    pub limits: Limits,
    pub events: Events,
    pub webhooks: Webhooks,
    pub log: Log,
    pub audit: Audit,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Address for HTTP and every WebSocket endpoint.
    pub listen: SocketAddr,
    /// Name of this node in a cluster; empty = generated at start.
    pub node_id: String,
    /// Origins allowed for browser upgrades and CORS; `"*"` allows any.
    pub allowed_origins: Vec<String>,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: "127.0.0.1:8080".parse().expect("valid default address"),
            node_id: String::new(),
            allowed_origins: vec!["*".into()],
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// HS256 secret of operator tokens; empty = generated into the data dir.
    pub jwt_secret: Masked,
    /// Bearer key of the back-end API; empty = generated into the data dir.
    pub api_key: Masked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Embedded,
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Store {
    pub backend: Backend,
    pub data_dir: PathBuf,
    pub redis_url: Masked,
    pub key_prefix: String,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            backend: Backend::Embedded,
            data_dir: "data".into(),
            redis_url: Masked("redis://127.0.0.1:6379".into()),
            key_prefix: "hub:".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Presence {
    #[serde(deserialize_with = "duration")]
    pub disconnect_grace: Duration,
    #[serde(deserialize_with = "duration")]
    pub ping_interval: Duration,
    /// Silence after which a connection is dead; unset = 2 × `ping_interval`.
    #[serde(deserialize_with = "opt_duration")]
    pub pong_timeout: Option<Duration>,
    /// A connection without `activity` for this long counts as idle; 0 = off.
    #[serde(deserialize_with = "duration")]
    pub inactivity_timeout: Duration,
}

impl Default for Presence {
    fn default() -> Self {
        Presence {
            disconnect_grace: Duration::from_secs(5),
            ping_interval: Duration::from_secs(20),
            pong_timeout: None,
            inactivity_timeout: Duration::ZERO,
        }
    }
}

impl Presence {
    pub fn pong_timeout(&self) -> Duration {
        self.pong_timeout.unwrap_or(self.ping_interval * 2)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    LeastLoaded,
    RoundRobin,
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Assignment {
    pub strategy: Strategy,
    pub default_max_chats: u32,
    #[serde(deserialize_with = "duration")]
    pub accept_timeout: Duration,
}

impl Default for Assignment {
    fn default() -> Self {
        Assignment {
            strategy: Strategy::LeastLoaded,
            default_max_chats: 4,
            accept_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Chats {
    /// Messages kept per chat.
    pub history: usize,
    /// How long the store keeps a closed chat (and its messages) before deleting it.
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
}

impl Default for Chats {
    fn default() -> Self {
        Chats {
            history: 100,
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// The event feed of the back end (`GET /api/v1/events`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Events {
    /// Events older than this are dropped.
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
    /// At most this many events are kept, oldest dropped first.
    pub max_events: u64,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            retention: Duration::from_secs(24 * 3600),
            max_events: 1_000_000,
        }
    }
}

/// Webhook delivery of the event feed; off while `url` is empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Webhooks {
    pub url: String,
    /// Key of the `X-Presence-Hub-Signature` HMAC.
    pub secret: Masked,
    /// Event types delivered; empty = all.
    pub types: Vec<crate::event_type::EventType>,
    /// Events per POST at most.
    pub batch: usize,
    /// A POST not answered within this is a failed attempt.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Longest wait between two attempts of one batch.
    #[serde(deserialize_with = "duration")]
    pub max_backoff: Duration,
}

impl Default for Webhooks {
    fn default() -> Self {
        Webhooks {
            url: String::new(),
            secret: Masked::default(),
            types: Vec::new(),
            batch: 100,
            timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    #[serde(deserialize_with = "duration")]
    pub node_lease: Duration,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            node_lease: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted WebSocket frame or message; larger ones close with 1009.
    pub max_message_bytes: usize,
    /// Frames queued for one connection before it counts as a slow consumer (1008).
    pub outbound_queue: usize,
    /// Bytes queued for one connection before it counts as a slow consumer (1008): a frame
    /// count alone lets a few large frames (64 KiB whispers) pile up hundreds of MiB.
    pub outbound_bytes: usize,
    /// The kernel's send buffer of each accepted connection (`SO_SNDBUF`), in bytes; 0 = the
    /// system's (autotuned on Linux, up to `net.ipv4.tcp_wmem`'s maximum, several MiB). A
    /// bound caps the kernel memory one slow reader holds, and such a reader's frames then
    /// wait in its queue, where the slow-consumer limits see them.
    pub send_buffer: usize,
    /// TCP connections held at once (HTTP and WebSocket); more are refused with 503.
    pub max_connections: usize,
    /// Anonymous widget sockets held at once, inside `max_connections`; unset = 90 % of it
    /// (at least one place left),
    /// so that widgets can never take the places operators and visitors need.
    pub max_widget_connections: Option<usize>,
    /// Time a client has to send its HTTP request head (and so its upgrade).
    #[serde(deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// Time a client has to send a request body once its head is in.
    #[serde(deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// Requests per second one socket may send (token bucket refill); 0 = unlimited.
    pub rate: u32,
    /// Requests one socket may send at once (token bucket size).
    pub rate_burst: u32,
    /// Requests per second on the back-end API with one API key; 0 = unlimited.
    pub api_rate: u32,
    /// Back-end API requests at once (token bucket size).
    pub api_burst: u32,
    /// Departments (and, apart, watched departments) of one operator record.
    pub max_departments: usize,
    /// Bytes of a chat's `visitor` object, as JSON.
    pub max_visitor_bytes: usize,
    /// Bytes (UTF-8) of a message's text.
    pub max_text_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 65536,
            outbound_queue: 1024,
            outbound_bytes: 4 << 20,
            send_buffer: 0,
            max_connections: 18_000,
            max_widget_connections: None,
            handshake_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            rate: 100,
            rate_burst: 200,
            api_rate: 10_000,
            api_burst: 20_000,
            max_departments: 1000,
            max_visitor_bytes: 16 * 1024,
            max_text_bytes: 16 * 1024,
        }
    }
}

impl Limits {
    /// The widget socket limit in force.
    pub fn max_widget_connections(&self) -> usize {
        self.max_widget_connections
            .unwrap_or(self.max_connections - (self.max_connections / 10).max(1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `presence_hub=debug`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Online sessions and the status log (`[audit]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Audit {
    /// Sessions that ended, and log entries, older than this are deleted.
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            retention: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// A secret that prints as `***` (rathole's `MaskedString`).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Masked(pub String);

impl fmt::Debug for Masked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"***\"")
        }
    }
}

impl Masked {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid environment override {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads `path` (a missing file is an error), applies the environment and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_and_env(&text, std::env::vars())
    }

    /// Parses TOML text, applies overrides from `env` and validates.
    pub fn from_toml_and_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        // The file alone first, then each override on top of it: an error names its source
        // (a key of the file, or the variable that brought a bad key or value).
        let mut config = typed(&doc).map_err(ConfigError::Parse)?;
        for (var, raw) in env {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            apply_env(&mut doc, &var, rest, &raw)?;
            config = typed(&doc).map_err(|reason| ConfigError::Env {
                var: var.clone(),
                reason,
            })?;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        let year = Duration::from_secs(365 * 24 * 3600);
        let durations = [
            self.presence.disconnect_grace,
            self.presence.ping_interval,
            self.presence.pong_timeout(),
            self.presence.inactivity_timeout,
            self.assignment.accept_timeout,
            self.cluster.node_lease,
            self.limits.handshake_timeout,
            self.events.retention,
            self.chats.retention,
            self.webhooks.timeout,
            self.webhooks.max_backoff,
            self.limits.body_timeout,
        ];
        if durations.iter().any(|d| *d > year) {
            return bad("durations must be at most 365 days");
        }
        if self.audit.retention < Duration::from_secs(1)
            || self.audit.retention > Duration::from_secs(100 * year.as_secs())
        {
            return bad("audit.retention must be between 1s and 100 years");
        }
        if self.presence.ping_interval.is_zero() {
            return bad("presence.ping_interval must be greater than 0");
        }
        if self.presence.pong_timeout() < self.presence.ping_interval {
            return bad("presence.pong_timeout must be at least presence.ping_interval");
        }
        if self.limits.max_message_bytes < 128 {
            return bad("limits.max_message_bytes must be at least 128");
        }
        if self.limits.outbound_queue == 0 || self.limits.max_connections == 0 {
            return bad("limits.outbound_queue and limits.max_connections must be greater than 0");
        }
        if self.limits.outbound_bytes < self.limits.max_message_bytes {
            return bad("limits.outbound_bytes must be at least limits.max_message_bytes");
        }
        if self.limits.max_widget_connections() >= self.limits.max_connections {
            return bad(
                "limits.max_widget_connections must be below limits.max_connections (room for operators)",
            );
        }
        if self.limits.body_timeout.is_zero() {
            return bad("limits.body_timeout must be greater than 0");
        }
        if (self.limits.rate > 0 && self.limits.rate_burst == 0)
            || (self.limits.api_rate > 0 && self.limits.api_burst == 0)
        {
            return bad(
                "limits.rate_burst and limits.api_burst must be greater than 0 when their rate is set",
            );
        }
        if self.limits.max_departments == 0
            || self.limits.max_visitor_bytes < 2
            || self.limits.max_text_bytes == 0
        {
            return bad(
                "limits.max_departments, max_visitor_bytes (≥ 2) and max_text_bytes must be greater than 0",
            );
        }
        if self.events.max_events == 0 {
            return bad("events.max_events must be greater than 0");
        }
        if !self.webhooks.url.is_empty() {
            if !self.webhooks.url.starts_with("http://") {
                return bad(
                    "webhooks.url must start with http:// (put TLS in front of the receiver)",
                );
            }
            if !(1..=1000).contains(&self.webhooks.batch) {
                return bad("webhooks.batch must be between 1 and 1000");
            }
            if self.webhooks.timeout.is_zero() {
                return bad("webhooks.timeout must be greater than 0");
            }
        }
        if self.store.key_prefix.is_empty() {
            return bad("store.key_prefix must not be empty");
        }
        if self.store.backend == Backend::Redis {
            if self.auth.jwt_secret.is_empty() || self.auth.api_key.is_empty() {
                return bad(
                    "store.backend = \"redis\" (cluster) needs auth.jwt_secret and auth.api_key set explicitly: every node must share them",
                );
            }
            if self.cluster.node_lease < Duration::from_millis(100) {
                return bad("cluster.node_lease must be at least 100ms");
            }
            if !self.webhooks.url.is_empty() && self.webhooks.timeout * 2 > self.cluster.node_lease
            {
                return bad(
                    "webhooks.timeout must be at most half of cluster.node_lease (the delivering node's role outlives every POST)",
                );
            }
        }
        for origin in &self.server.allowed_origins {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return bad(
                    "server.allowed_origins entries must be \"*\" or start with http:// or https://",
                );
            }
        }
        Ok(())
    }

    /// True when `origin` (an `Origin` header) may use the widget endpoints.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.server
            .allowed_origins
            .iter()
            .any(|o| o == "*" || o.trim_end_matches('/') == origin)
    }
}

const SECTIONS: [&str; 12] = [
    "server",
    "auth",
    "store",
    "presence",
    "assignment",
    "chats",
    "cluster",
    "limits",
    "events",
    "webhooks",
    "log",
    "audit",
];

/// Keys whose value is a string even when it looks like a number (`node_id=1`, `"0"`).
const STRING_KEYS: [&str; 24] = [
    "retention",
    "url",
    "secret",
    "timeout",
    "max_backoff",
    "listen",
    "node_id",
    "jwt_secret",
    "api_key",
    "backend",
    "data_dir",
    "redis_url",
    "key_prefix",
    "disconnect_grace",
    "ping_interval",
    "pong_timeout",
    "inactivity_timeout",
    "accept_timeout",
    "node_lease",
    "handshake_timeout",
    "body_timeout",
    "strategy",
    "format",
    "level",
];

/// Keys whose value is a list: an environment value `a,b` becomes `["a","b"]`.
const LIST_KEYS: [&str; 2] = ["allowed_origins", "types"];

fn apply_env(doc: &mut toml::Table, var: &str, rest: &str, raw: &str) -> Result<(), ConfigError> {
    let lower = rest.to_ascii_lowercase();
    let err = |reason: &str| ConfigError::Env {
        var: var.to_string(),
        reason: reason.to_string(),
    };
    let (section, key) = SECTIONS
        .iter()
        .find_map(|s| {
            lower
                .strip_prefix(s)
                .and_then(|k| k.strip_prefix('_'))
                .map(|k| (*s, k))
        })
        .ok_or_else(|| err("unknown section"))?;
    let value = if LIST_KEYS.contains(&key) && !raw.trim_start().starts_with('[') {
        toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| s.into())
                .collect(),
        )
    } else if STRING_KEYS.contains(&key) {
        toml::Value::String(raw.to_string())
    } else {
        // A TOML literal (number, bool, array) when it parses as one, else a plain string.
        match format!("v = {raw}").parse::<toml::Table>() {
            Ok(mut t) => t.remove("v").unwrap_or_else(|| raw.into()),
            Err(_) => toml::Value::String(raw.to_string()),
        }
    };
    let table = doc
        .entry(section)
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .ok_or_else(|| err("section is not a table"))?;
    table.insert(key.to_string(), value);
    Ok(())
}

/// The typed config of a TOML document, or the deserializer's message.
fn typed(doc: &toml::Table) -> Result<Config, String> {
    toml::Value::Table(doc.clone())
        .try_into()
        .map_err(|e: toml::de::Error| e.to_string())
}

/// Parses `"5s"`, `"250ms"`, `"1h"`; a bare `0` is accepted as zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("bad duration {s:?}: {e} (use e.g. \"5s\", \"250ms\")"))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        Ok(None)
    } else {
        parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_and_env(
            text,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn config_defaults_match_spec() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.presence.disconnect_grace, Duration::from_secs(5));
        assert_eq!(c.presence.pong_timeout(), Duration::from_secs(40));
        assert_eq!(c.assignment.default_max_chats, 4);
        assert_eq!(c.chats.history, 100);
        assert_eq!(c.limits.max_message_bytes, 65536);
        assert_eq!(c.store.key_prefix, "hub:");
    }

    #[test]
    fn config_refuses_unknown_key() {
        let e = load("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n", &[]).unwrap_err();
        assert!(e.to_string().contains("lisen"), "{e}");
        let e = load("[nope]\n", &[]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn config_refuses_bad_duration_and_address() {
        let e = load("[presence]\ndisconnect_grace = \"5 parsecs\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("bad duration"), "{e}");
        let e = load("[server]\nlisten = \"localhost\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("address"), "{e}");
    }

    #[test]
    fn config_env_overrides() {
        let c = load(
            "[presence]\ndisconnect_grace = \"5s\"\n",
            &[
                ("PRESENCE_HUB_PRESENCE_DISCONNECT_GRACE", "250ms"),
                ("PRESENCE_HUB_LIMITS_MAX_CONNECTIONS", "7"),
                (
                    "PRESENCE_HUB_SERVER_ALLOWED_ORIGINS",
                    "https://a.example,https://b.example",
                ),
                ("PRESENCE_HUB_AUTH_API_KEY", "1234"),
                ("PRESENCE_HUB_SERVER_NODE_ID", "7"),
                ("PRESENCE_HUB_PRESENCE_INACTIVITY_TIMEOUT", "0"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.presence.disconnect_grace, Duration::from_millis(250));
        assert_eq!(c.limits.max_connections, 7);
        assert_eq!(
            c.server.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
        assert_eq!(c.auth.api_key.as_str(), "1234");
        assert_eq!(c.server.node_id, "7");
        assert_eq!(c.presence.inactivity_timeout, Duration::ZERO);
        let e = load("", &[("PRESENCE_HUB_LIMITS_NOPE", "1")]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = load("", &[("PRESENCE_HUB_BOGUS_X", "1")]).unwrap_err();
        assert!(e.to_string().contains("PRESENCE_HUB_BOGUS_X"), "{e}");
    }

    #[test]
    fn config_env_override_errors_name_the_variable() {
        let e = load("", &[("PRESENCE_HUB_SERVER_LISEN", "0.0.0.0:1")]).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Env { .. }), "{msg}");
        assert!(
            msg.contains("PRESENCE_HUB_SERVER_LISEN") && msg.contains("lisen"),
            "{msg}"
        );
        let e = load("", &[("PRESENCE_HUB_SERVER_LISTEN", "127.0.0.1:99999")]).unwrap_err();
        assert!(e.to_string().contains("PRESENCE_HUB_SERVER_LISTEN"), "{e}");
        // A bad key of the file is the file's error, whatever the environment says.
        let e = load(
            "[server]\nlisen = 1\n",
            &[("PRESENCE_HUB_SERVER_LISTEN", "127.0.0.1:1")],
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::Parse(_)), "{e}");
        assert!(!e.to_string().contains("PRESENCE_HUB"), "{e}");
    }

    #[test]
    fn config_audit_retention_default_env_and_bounds() {
        assert_eq!(
            load("", &[]).unwrap().audit.retention,
            Duration::from_secs(90 * 24 * 3600)
        );
        let c = load("[audit]\nretention = \"7d\"\n", &[]).unwrap();
        assert_eq!(c.audit.retention, Duration::from_secs(7 * 24 * 3600));
        let c = load("", &[("PRESENCE_HUB_AUDIT_RETENTION", "2h")]).unwrap();
        assert_eq!(c.audit.retention, Duration::from_secs(7200));
        let e = load("[audit]\nretention = \"10ms\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("audit.retention"), "{e}");
    }

    #[test]
    fn config_secrets_are_masked_in_debug() {
        let c = load("[auth]\napi_key = \"supersecret\"\n", &[]).unwrap();
        assert!(!format!("{c:?}").contains("supersecret"));
    }

    #[test]
    fn config_cluster_needs_explicit_secrets() {
        let e = load("[store]\nbackend = \"redis\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("jwt_secret"), "{e}");
    }
}

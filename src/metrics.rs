//! Prometheus metrics: connections by kind, operators online, events sent, slow consumers
//! dropped, HTTP request latency. Gauges are read from the hub when scraped (`Hub::gauges`).

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // A second hub in the same process (tests) shares the first one's recorder.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Installs the recorder; call once at start so early events are counted.
pub fn init() {
    handle();
}

/// Frames queued to peers, and peers closed because their queue was full.
pub fn events(sent: u64, dropped: u64) {
    if sent > 0 {
        counter!("presence_hub_events_sent_total").increment(sent);
    }
    if dropped > 0 {
        counter!("presence_hub_slow_consumers_dropped_total").increment(dropped);
    }
}

pub fn request(method: &str, status: u16, took: Duration) {
    // Labels of the usual answers are static strings: no allocation per request (an upgrade
    // storm records one per socket).
    let method: metrics::SharedString = match method {
        "GET" => "GET".into(),
        "POST" => "POST".into(),
        "PUT" => "PUT".into(),
        "PATCH" => "PATCH".into(),
        "DELETE" => "DELETE".into(),
        other => other.to_string().into(),
    };
    let status: metrics::SharedString = match status {
        101 => "101".into(),
        200 => "200".into(),
        201 => "201".into(),
        204 => "204".into(),
        other => other.to_string().into(),
    };
    histogram!("presence_hub_http_request_duration_seconds", "method" => method, "status" => status)
        .record(took.as_secs_f64());
}

/// The gauges read at a scrape (see `Hub::gauges`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub operators: usize,
    pub widgets: usize,
    pub visitors: usize,
    /// Open HTTP connections (the scrape's own among them): they count in max_connections.
    pub http: usize,
    pub online: usize,
}

/// The Prometheus text of this process.
pub fn render(g: &Gauges) -> String {
    gauge!("presence_hub_connections", "kind" => "operator").set(g.operators as f64);
    gauge!("presence_hub_connections", "kind" => "widget").set(g.widgets as f64);
    gauge!("presence_hub_connections", "kind" => "visitor").set(g.visitors as f64);
    gauge!("presence_hub_connections", "kind" => "http").set(g.http as f64);
    gauge!("presence_hub_operators_online").set(g.online as f64);
    handle().render()
}

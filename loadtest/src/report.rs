//! Results: one run per target (hub, baseline, uws), a human table with a hub/peer ratio
//! column for every peer that ran, pass/fail checks, and the same as JSON.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Result;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    /// The scenario's parameters as given.
    pub params: Map<String, Value>,
    pub runs: Vec<Run>,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
    /// hub value / baseline value for every metric both runs have (with --compare).
    pub ratios: BTreeMap<String, f64>,
    /// hub value / uWS value for every metric both runs have (with --compare uws).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ratios_uws: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize)]
pub struct Run {
    pub target: String,
    pub metrics: Vec<Metric>,
    /// Connection or request errors by kind ("http 401", "io ConnectionRefused", …).
    pub errors: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub unit: String,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub target: String,
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Report {
    pub fn new(scenario: &str, params: Value) -> Report {
        Report {
            scenario: scenario.to_string(),
            params: match params {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            runs: Vec::new(),
            checks: Vec::new(),
            notes: Vec::new(),
            ratios: BTreeMap::new(),
            ratios_uws: BTreeMap::new(),
        }
    }

    pub fn check(&mut self, target: &str, name: &str, ok: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            target: target.into(),
            name: name.into(),
            ok,
            detail: detail.into(),
        });
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub fn all_checks_passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// Compute the hub/baseline and hub/uws ratios; call once all runs are in.
    pub fn finish(&mut self) {
        self.ratios = self.ratios_to("baseline");
        self.ratios_uws = self.ratios_to("uws");
    }

    /// hub / `peer` for every metric both runs have (empty if either did not run).
    fn ratios_to(&self, peer: &str) -> BTreeMap<String, f64> {
        let mut ratios = BTreeMap::new();
        let (Some(hub), Some(base)) = (self.run("hub"), self.run(peer)) else {
            return ratios;
        };
        for m in &hub.metrics {
            if let Some(b) = base.metrics.iter().find(|b| b.name == m.name)
                && b.value != 0.0
                && m.value.is_finite()
            {
                ratios.insert(m.name.clone(), m.value / b.value);
            }
        }
        ratios
    }

    fn run(&self, target: &str) -> Option<&Run> {
        self.runs.iter().find(|r| r.target == target)
    }

    pub fn print(&self) {
        println!();
        println!(
            "== {} ==  {}",
            self.scenario,
            Value::Object(self.params.clone())
        );
        // Metric names in first-seen order across runs.
        let mut names: Vec<(&str, &str)> = Vec::new();
        for r in &self.runs {
            for m in &r.metrics {
                if !names.iter().any(|(n, _)| *n == m.name) {
                    names.push((&m.name, &m.unit));
                }
            }
        }
        let ratio_columns: Vec<(&str, &BTreeMap<String, f64>)> = [
            ("hub/baseline", &self.ratios),
            ("hub/uws", &self.ratios_uws),
        ]
        .into_iter()
        .filter(|(_, r)| !r.is_empty())
        .collect();
        let w0 = names.iter().map(|(n, _)| n.len()).max().unwrap_or(6).max(6);
        let mut header = format!("{:<w0$}  {:<6}", "metric", "unit");
        for r in &self.runs {
            header += &format!("  {:>14}", r.target);
        }
        for (title, _) in &ratio_columns {
            header += &format!("  {title:>12}");
        }
        println!("{header}");
        println!("{}", "-".repeat(header.chars().count()));
        for (name, unit) in &names {
            let mut line = format!("{name:<w0$}  {unit:<6}");
            for r in &self.runs {
                let cell = r
                    .metrics
                    .iter()
                    .find(|m| m.name == *name)
                    .map(|m| fmt_num(m.value))
                    .unwrap_or_else(|| "-".into());
                line += &format!("  {cell:>14}");
            }
            for (_, ratios) in &ratio_columns {
                let cell = ratios
                    .get(*name)
                    .map(|v| format!("{v:.2}x"))
                    .unwrap_or_else(|| "-".into());
                line += &format!("  {cell:>12}");
            }
            println!("{line}");
        }
        for r in &self.runs {
            if !r.errors.is_empty() {
                let list: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                println!("errors ({}): {}", r.target, list.join(", "));
            }
        }
        if !self.checks.is_empty() {
            println!();
            for c in &self.checks {
                println!(
                    "[{}] {} ({}): {}",
                    if c.ok { "PASS" } else { "FAIL" },
                    c.name,
                    c.target,
                    c.detail
                );
            }
        }
        for n in &self.notes {
            println!("note: {n}");
        }
        println!();
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)?)?;
        Ok(())
    }
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

impl Run {
    pub fn new(target: &str) -> Run {
        Run {
            target: target.into(),
            metrics: Vec::new(),
            errors: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, name: &str, value: f64, unit: &str) {
        self.metrics.push(Metric {
            name: name.into(),
            value,
            unit: unit.into(),
        });
    }

    pub fn add_opt(&mut self, name: &str, value: Option<f64>, unit: &str) {
        if let Some(v) = value {
            self.add(name, v, unit);
        }
    }

    /// `<prefix>_p50/p99/p999/max/mean` in milliseconds from a µs histogram.
    pub fn add_latency(&mut self, prefix: &str, h: &Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        self.add(&format!("{prefix}_p50"), ms(h.value_at_quantile(0.5)), "ms");
        self.add(
            &format!("{prefix}_p99"),
            ms(h.value_at_quantile(0.99)),
            "ms",
        );
        self.add(
            &format!("{prefix}_p999"),
            ms(h.value_at_quantile(0.999)),
            "ms",
        );
        self.add(&format!("{prefix}_max"), ms(h.max()), "ms");
        self.add(&format!("{prefix}_mean"), h.mean() / 1000.0, "ms");
    }

    pub fn add_rate(&mut self, name: &str, count: u64, over: Duration) {
        let secs = over.as_secs_f64();
        self.add(
            name,
            if secs > 0.0 { count as f64 / secs } else { 0.0 },
            "/s",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(target: &str, value: f64) -> Run {
        let mut r = Run::new(target);
        r.add("rss_per_conn", value, "KiB");
        r
    }

    #[test]
    fn ratios_are_hub_over_each_peer() {
        let mut report = Report::new("idle", serde_json::json!({}));
        report.runs = vec![run("hub", 4.0), run("baseline", 2.0), run("uws", 1.0)];
        report.finish();
        assert_eq!(report.ratios.get("rss_per_conn"), Some(&2.0));
        assert_eq!(report.ratios_uws.get("rss_per_conn"), Some(&4.0));

        let mut hub_only = Report::new("idle", serde_json::json!({}));
        hub_only.runs = vec![run("hub", 4.0), run("uws", 0.0)];
        hub_only.finish();
        assert!(hub_only.ratios.is_empty(), "no baseline run");
        assert!(
            hub_only.ratios_uws.is_empty(),
            "a zero peer value gives no ratio"
        );
    }
}

//! What a run measured, as JSON and as a table.

use std::time::Duration;

use serde::Serialize;

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

impl Latency {
    pub(crate) fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |p: f64| {
            if samples.is_empty() {
                return 0.0;
            }
            let i = ((samples.len() - 1) as f64 * p).round() as usize;
            samples[i.min(samples.len() - 1)].as_secs_f64() * 1e3
        };
        Latency {
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            p99_ms: at(0.99),
        }
    }
}

/// The outcome of one scenario run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Its seed.
    pub seed: u64,
    /// Nodes run.
    pub nodes: usize,
    /// Seconds to start every node.
    pub startup_secs: f64,
    /// Lookups that found every node serving the skill.
    pub discovery_success: f64,
    /// Lookup time.
    pub discovery: Latency,
    /// Calls answered successfully.
    pub call_success: f64,
    /// Call latency.
    pub calls: Latency,
    /// Deliveries received / deliveries expected (every event at every other node).
    pub gossip_delivery: f64,
    /// Publication to delivery.
    pub gossip: Latency,
    /// Events delivered twice to one node.
    pub gossip_duplicates: u64,
    /// Resident memory of the whole process, MiB.
    pub rss_mib: f64,
    /// Per node.
    pub rss_per_node_mib: f64,
    /// Seconds from start to report.
    pub wall_secs: f64,
}

impl Report {
    /// The report as a terminal table.
    pub fn table(&self) -> String {
        let pct = |x: f64| format!("{:.2} %", x * 100.0);
        let lat = |l: &Latency| {
            format!(
                "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
                l.p50_ms, l.p90_ms, l.p99_ms
            )
        };
        let rows = [
            (
                "scenario",
                format!("{} (seed {})", self.scenario, self.seed),
            ),
            ("nodes", self.nodes.to_string()),
            ("start-up", format!("{:.1} s", self.startup_secs)),
            ("discovery success", pct(self.discovery_success)),
            ("discovery time", lat(&self.discovery)),
            ("call success", pct(self.call_success)),
            ("call latency", lat(&self.calls)),
            ("gossip delivery", pct(self.gossip_delivery)),
            ("gossip latency", lat(&self.gossip)),
            ("gossip duplicates", self.gossip_duplicates.to_string()),
            (
                "memory",
                format!(
                    "{:.0} MiB RSS, {:.1} MiB per node",
                    self.rss_mib, self.rss_per_node_mib
                ),
            ),
            ("wall time", format!("{:.1} s", self.wall_secs)),
        ];
        rows.iter().map(|(k, v)| format!("{k:<20} {v}\n")).collect()
    }
}

/// Resident memory of this process, MiB (Linux; 0 elsewhere).
pub(crate) fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

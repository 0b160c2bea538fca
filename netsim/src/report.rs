//! What a run measured: a table for the terminal, JSON, and an SVG plot of the latency CDFs.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::net::DialStats;

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

impl Latency {
    pub(crate) fn of(samples: &[Duration]) -> Self {
        let mut samples = samples.to_vec();
        samples.sort();
        let at = |p: f64| {
            if samples.is_empty() {
                return 0.0;
            }
            let i = ((samples.len() - 1) as f64 * p).round() as usize;
            samples[i.min(samples.len() - 1)].as_secs_f64() * 1e3
        };
        Latency {
            n: samples.len(),
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            p99_ms: at(0.99),
        }
    }
}

/// Connections open after the calls, counted at both ends.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Connections {
    /// Direct connections.
    pub direct: u64,
    /// Connections through a relay circuit.
    pub relayed: u64,
    /// Relay reservations held by nodes behind NAT.
    pub reservations: u64,
    /// Relayed connections that hole punching (DCUtR) turned direct.
    pub hole_punches_ok: u64,
    /// Hole punches that failed.
    pub hole_punches_failed: u64,
    /// Connected pairs with a node behind NAT, by the kinds of the two ends.
    pub by_nat_pair: Vec<PairDirect>,
}

/// Connected pairs of one kind of NAT pair, and how many have a direct connection.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PairDirect {
    /// The two ends' kinds: `public`, `EIM` (endpoint-independent mapping) or `EDM`
    /// (endpoint-dependent).
    pub kinds: String,
    /// Pairs with a connection.
    pub pairs: u64,
    /// Of them, pairs with a direct one.
    pub direct: u64,
    /// Of those, pairs whose direct connection was hole-punched.
    pub punched: u64,
}

/// What a partition did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PartitionOutcome {
    /// Groups the network split into.
    pub groups: u32,
    /// Events that reached a node in another group while the partition lasted: must be 0.
    pub cross_deliveries: u64,
    /// Delivery inside the publisher's group during the partition.
    pub inside_delivery: f64,
    /// Calls made to a server in another group while the partition lasted.
    pub cross_calls: u64,
    /// Of those, answered: must be 0.
    pub cross_calls_answered: u64,
    /// Delivery to every node after the heal.
    pub after_heal_delivery: f64,
    /// Seconds from the heal to the end of that measurement.
    pub heal_to_measure_secs: f64,
}

/// Mail to nodes that were offline.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MailOutcome {
    /// Messages sent.
    pub sent: u64,
    /// Taken by at least one mailbox.
    pub deposited: u64,
    /// Refused everywhere (the sender got an error).
    pub failed_to_send: u64,
    /// Read by their recipient after it came back.
    pub delivered: u64,
    /// `delivered / sent`.
    pub delivery: f64,
    /// From the recipient's return to reading a message.
    pub after_return: Latency,
}

/// Raw latencies in milliseconds, for plots.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Samples {
    /// Successful lookups.
    pub discovery_ms: Vec<f64>,
    /// Successful calls.
    pub calls_ms: Vec<f64>,
    /// Gossip deliveries with no faults.
    pub gossip_ms: Vec<f64>,
    /// Mail, from the recipient's return to reading it.
    pub mail_ms: Vec<f64>,
}

/// The run: which scenario, how big, how long.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RunInfo {
    /// Scenario name.
    pub scenario: String,
    /// Its seed.
    pub seed: u64,
    /// Nodes run.
    pub nodes: usize,
    /// Of them behind NAT.
    pub behind_nat: usize,
    /// Seconds to start every node.
    pub startup_secs: f64,
    /// Seconds from start to report.
    pub wall_secs: f64,
}

/// Lookups, and the announcements they find.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LookupOutcome {
    /// Lookups that found every node serving the skill.
    pub discovery_success: f64,
    /// Lookup time.
    pub discovery: Latency,
    /// DHT requests per provider lookup, on average. (libp2p's Kademlia does not report hops;
    /// with α = 3 requests in parallel, requests / 3 bounds the sequential rounds from below.)
    pub lookup_requests: f64,
    /// Of those, requests that failed or timed out.
    pub lookup_failures: f64,
    /// The most common reasons lookups failed, with counts.
    pub lookup_errors: Vec<(String, usize)>,
    /// Servers whose first announcements did not all reach another node (the node retries).
    pub publish_incomplete: usize,
    /// Of those, servers whose announcements were still incomplete after every attempt.
    pub publish_failed: usize,
}

/// Skill calls.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CallOutcome {
    /// Calls answered successfully.
    pub call_success: f64,
    /// Call latency.
    pub calls: Latency,
    /// The most common reasons calls failed, with counts.
    pub call_errors: Vec<(String, usize)>,
}

/// Gossip events, with and without churn.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EventOutcome {
    /// Deliveries received / deliveries expected (every event at every other node).
    pub gossip_delivery: f64,
    /// Publication to delivery.
    pub gossip: Latency,
    /// Events delivered twice to one node.
    pub gossip_duplicates: u64,
    /// Delivery to the nodes online while a share of the others churned.
    pub churn_delivery: Option<f64>,
    /// Gossip latency under churn.
    pub churn_gossip: Option<Latency>,
}

/// What the run cost: bytes sent and memory.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Cost {
    /// Bytes all nodes sent, MiB.
    pub bytes_sent_mib: f64,
    /// Per node, KiB.
    pub bytes_sent_per_node_kib: f64,
    /// Resident memory of the whole process, MiB.
    pub rss_mib: f64,
    /// Per node.
    pub rss_per_node_mib: f64,
}

/// The outcome of one scenario run. Its parts are flattened in JSON: one object, as before.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// The run.
    #[serde(flatten)]
    pub run: RunInfo,
    /// Lookups.
    #[serde(flatten)]
    pub lookups: LookupOutcome,
    /// Calls.
    #[serde(flatten)]
    pub calling: CallOutcome,
    /// Gossip events.
    #[serde(flatten)]
    pub events: EventOutcome,
    /// Direct and relayed connections after the calls.
    pub connections: Connections,
    /// The partition phase.
    pub partition: Option<PartitionOutcome>,
    /// The mail phase.
    pub mail: Option<MailOutcome>,
    /// How dials went, network-wide.
    pub dials: DialStats,
    /// Bytes sent and memory.
    #[serde(flatten)]
    pub cost: Cost,
    /// The latencies behind the percentiles.
    pub samples: Samples,
}

impl Report {
    /// The report as a terminal table.
    pub fn table(&self) -> String {
        let pct = |x: f64| format!("{:.2} %", x * 100.0);
        let lat = |l: &Latency| {
            format!(
                "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms (n = {})",
                l.p50_ms, l.p90_ms, l.p99_ms, l.n
            )
        };
        let c = &self.connections;
        let d = &self.dials;
        let mut rows = vec![
            (
                "scenario",
                format!("{} (seed {})", self.run.scenario, self.run.seed),
            ),
            (
                "nodes",
                format!("{} ({} behind NAT)", self.run.nodes, self.run.behind_nat),
            ),
            ("start-up", format!("{:.1} s", self.run.startup_secs)),
            ("discovery success", pct(self.lookups.discovery_success)),
            ("discovery time", lat(&self.lookups.discovery)),
        ];
        for (e, n) in &self.lookups.lookup_errors {
            rows.push(("  lookup failure", format!("{n} x {e}")));
        }
        if self.lookups.publish_incomplete > 0 {
            rows.push((
                "  announcements",
                format!(
                    "{} servers' first announcements timed out somewhere, {} still after retries",
                    self.lookups.publish_incomplete, self.lookups.publish_failed
                ),
            ));
        }
        rows.extend([
            (
                "lookup cost",
                format!(
                    "{:.1} DHT requests per lookup, {:.1} of them failed",
                    self.lookups.lookup_requests, self.lookups.lookup_failures
                ),
            ),
            ("call success", pct(self.calling.call_success)),
            ("call latency", lat(&self.calling.calls)),
        ]);
        for (e, n) in &self.calling.call_errors {
            rows.push(("  call failure", format!("{n} x {e}")));
        }
        rows.extend([(
            "connections",
            format!(
                "{} direct, {} relayed, {} reservations; hole punches {} ok / {} failed",
                c.direct, c.relayed, c.reservations, c.hole_punches_ok, c.hole_punches_failed
            ),
        )]);
        for p in &c.by_nat_pair {
            rows.push((
                "  direct by NAT pair",
                format!(
                    "{}: {} of {} connected pairs ({}), {} hole-punched",
                    p.kinds,
                    p.direct,
                    p.pairs,
                    pct(if p.pairs == 0 {
                        0.0
                    } else {
                        p.direct as f64 / p.pairs as f64
                    }),
                    p.punched
                ),
            ));
        }
        rows.extend([
            ("gossip delivery", pct(self.events.gossip_delivery)),
            ("gossip latency", lat(&self.events.gossip)),
            (
                "gossip duplicates",
                self.events.gossip_duplicates.to_string(),
            ),
        ]);
        if let Some(x) = self.events.churn_delivery {
            rows.push(("churn delivery", pct(x)));
        }
        if let Some(l) = &self.events.churn_gossip {
            rows.push(("churn gossip latency", lat(l)));
        }
        if let Some(p) = &self.partition {
            rows.push((
                "partition",
                format!(
                    "{} groups: {} cross-partition deliveries, {} of {} calls across answered, {} inside, {} after heal",
                    p.groups,
                    p.cross_deliveries,
                    p.cross_calls_answered,
                    p.cross_calls,
                    pct(p.inside_delivery),
                    pct(p.after_heal_delivery)
                ),
            ));
        }
        if let Some(m) = &self.mail {
            rows.push((
                "mail",
                format!(
                    "{} sent, {} held by mailboxes, {} refused, {} read after return ({})",
                    m.sent,
                    m.deposited,
                    m.failed_to_send,
                    m.delivered,
                    pct(m.delivery)
                ),
            ));
            rows.push(("mail after return", lat(&m.after_return)));
        }
        rows.extend([
            (
                "dials",
                format!(
                    "{} connected, {} refused, {} partitioned, {} blocked by NAT, {} through NAT, {} lost",
                    d.connected, d.refused, d.partitioned, d.nat_blocked, d.nat_punched, d.lost
                ),
            ),
            (
                "bytes sent",
                format!(
                    "{:.1} MiB, {:.0} KiB per node",
                    self.cost.bytes_sent_mib, self.cost.bytes_sent_per_node_kib
                ),
            ),
            (
                "memory",
                format!(
                    "{:.0} MiB RSS, {:.1} MiB per node",
                    self.cost.rss_mib, self.cost.rss_per_node_mib
                ),
            ),
            ("wall time", format!("{:.1} s", self.run.wall_secs)),
        ]);
        rows.iter().map(|(k, v)| format!("{k:<21} {v}\n")).collect()
    }

    /// The latency CDFs as an SVG image: one line per measurement, log-scaled time.
    pub fn svg(&self) -> String {
        const W: f64 = 720.0;
        const H: f64 = 420.0;
        const L: f64 = 60.0;
        const R: f64 = 170.0;
        const T: f64 = 40.0;
        const B: f64 = 50.0;
        let series = [
            ("discovery", "#1f77b4", &self.samples.discovery_ms),
            ("calls", "#d62728", &self.samples.calls_ms),
            ("gossip", "#2ca02c", &self.samples.gossip_ms),
            ("mail after return", "#9467bd", &self.samples.mail_ms),
        ];
        let all = series.iter().flat_map(|s| s.2.iter().copied());
        let max = all.clone().fold(1.0f64, f64::max);
        let min = all.fold(max, f64::min).max(0.1);
        let (lo, hi) = (
            min.log10().floor(),
            max.log10().ceil().max(min.log10().floor() + 1.0),
        );
        let x = |ms: f64| L + (ms.max(0.1).log10() - lo) / (hi - lo) * (W - L - R);
        let y = |p: f64| T + (1.0 - p) * (H - T - B);
        let mut svg = String::new();
        let _ = write!(
            svg,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{L}" y="22" font-size="14">{} ({} nodes, seed {}): latency CDFs</text>
"##,
            escape(&self.run.scenario),
            self.run.nodes,
            self.run.seed
        );
        for d in (lo as i32)..=(hi as i32) {
            let ms = 10f64.powi(d);
            let _ = writeln!(
                svg,
                r##"<line x1="{0:.1}" y1="{T}" x2="{0:.1}" y2="{1:.1}" stroke="#ddd"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{3}</text>"##,
                x(ms),
                H - B,
                H - B + 16.0,
                if ms >= 1.0 {
                    format!("{ms:.0} ms")
                } else {
                    format!("{ms} ms")
                }
            );
        }
        for p in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let _ = writeln!(
                svg,
                r##"<line x1="{L}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{2:.1}" y="{3:.1}" text-anchor="end">{4:.0} %</text>"##,
                y(p),
                W - R,
                L - 6.0,
                y(p) + 4.0,
                p * 100.0
            );
        }
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">latency (log scale)</text>"##,
            (L + W - R) / 2.0,
            H - 12.0
        );
        for (k, (name, color, data)) in series.iter().enumerate() {
            let ly = T + 20.0 * k as f64 + 10.0;
            let _ = writeln!(
                svg,
                r##"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="{color}" stroke-width="2"/><text x="{3:.1}" y="{4:.1}">{name} (n = {5})</text>"##,
                W - R + 10.0,
                ly,
                W - R + 30.0,
                W - R + 36.0,
                ly + 4.0,
                data.len()
            );
            if data.is_empty() {
                continue;
            }
            let mut v = (*data).clone();
            v.sort_by(f64::total_cmp);
            let n = v.len() as f64;
            let mut points = format!("{:.1},{:.1}", x(v[0]), y(0.0));
            for (i, ms) in v.iter().enumerate() {
                let _ = write!(
                    points,
                    " {:.1},{:.1} {:.1},{:.1}",
                    x(*ms),
                    y(i as f64 / n),
                    x(*ms),
                    y((i + 1) as f64 / n)
                );
            }
            let _ = writeln!(
                svg,
                r##"<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>"##
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_plot() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(&ms);
        assert_eq!((l.n, l.p50_ms.round(), l.p99_ms.round()), (100, 51.0, 99.0));
        let r = Report {
            run: RunInfo {
                scenario: "a<b".into(),
                ..RunInfo::default()
            },
            samples: Samples {
                calls_ms: vec![1.0, 2.0, 40.0],
                ..Samples::default()
            },
            ..Report::default()
        };
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a&lt;b") && svg.contains("calls (n = 3)"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        // One flat JSON object, the parts' fields side by side.
        let json = serde_json::to_value(&r).expect("json");
        for key in [
            "scenario",
            "discovery_success",
            "calls",
            "gossip",
            "rss_mib",
            "dials",
        ] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
    }
}

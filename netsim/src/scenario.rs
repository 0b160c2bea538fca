//! Scenarios: what to run, as data. The same seed gives the same roles and workload.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::SimError;

/// Largest network a scenario may ask for; the machine's memory is the real bound.
pub const MAX_NODES: usize = 5_000;

/// A scenario file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name, for the report.
    pub name: String,
    /// Seed of every random choice: placement, roles, workload, faults.
    pub seed: u64,
    /// Nodes in all, bootstrap nodes and relays included.
    pub nodes: usize,
    /// Nodes the others bootstrap from (public, started first).
    #[serde(default = "one")]
    pub bootstrap: usize,
    /// Public nodes that run a relay and a mailbox (the first nodes; they may be bootstrap
    /// nodes too).
    #[serde(default)]
    pub relays: usize,
    /// Distinct skills served.
    pub skills: usize,
    /// Nodes serving each skill.
    #[serde(default = "one")]
    pub servers_per_skill: usize,
    /// `find_skill` lookups, each by a random node for a random skill.
    pub lookups: usize,
    /// Calls, each by a random node to a provider it found.
    pub calls: usize,
    /// Events published on one topic every node subscribes to, with no faults.
    pub events: usize,
    /// Wait after start-up before the workload, so the DHT and gossip meshes settle.
    #[serde(with = "humantime_serde", default = "settle")]
    pub settle: Duration,
    /// Deadline of each operation.
    #[serde(with = "humantime_serde", default = "timeout")]
    pub timeout: Duration,
    /// The network under the nodes.
    #[serde(default)]
    pub network: Network,
    /// Nodes leaving and coming back while events are published.
    pub churn: Option<Churn>,
    /// A partition that heals.
    pub partition: Option<Partition>,
    /// Mail to nodes that are offline.
    pub mail: Option<Mail>,
    /// Node settings that bound each node's memory.
    #[serde(default)]
    pub limits: Limits,
}

/// `[limits]`: the connection watermarks of nodes that are not bootstrap nodes or relays
/// (those serve everyone and keep the node defaults). Each connection holds buffers; at a
/// thousand nodes in one process, lower caps are what fits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Trimming stops here (`network.min_connections`).
    pub min_connections: u32,
    /// Above it the least useful connections close (`network.max_connections`).
    pub max_connections: u32,
}

impl Default for Limits {
    fn default() -> Self {
        let n = skillmesh::config::NetworkConfig::default();
        Limits {
            min_connections: n.min_connections,
            max_connections: n.max_connections,
        }
    }
}

/// `[network]`: the model links follow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Network {
    /// One-way latency between any two nodes when there are no regions.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Region names; nodes are spread over them evenly (seeded).
    pub regions: Vec<String>,
    /// One-way latency in milliseconds from region `i` to region `j`.
    pub region_latency_ms: Vec<Vec<u64>>,
    /// Megabits per second per link direction (0: unlimited).
    pub bandwidth_mbit: u64,
    /// Chance that a dial fails.
    pub dial_failure: f64,
    /// Share of the non-public nodes behind NAT: they accept no inbound dials but hole
    /// punches, and are reached through relays until then.
    pub nat: f64,
    /// Of the nodes behind NAT, the share whose NAT maps endpoint-dependently (a port per
    /// destination): nobody can hole-punch to them. The others map endpoint-independently.
    pub nat_dependent: f64,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            latency: Duration::from_millis(5),
            regions: Vec::new(),
            region_latency_ms: Vec::new(),
            bandwidth_mbit: 100,
            dial_failure: 0.0,
            nat: 0.0,
            nat_dependent: 0.2,
        }
    }
}

/// `[churn]`: rounds in which a share of the nodes stops, events go out, and they come back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Churn {
    /// Share of the nodes (bootstrap nodes and relays excepted) that leave each round.
    pub fraction: f64,
    /// How long they stay away; they come back with their data.
    #[serde(with = "humantime_serde")]
    pub offline: Duration,
    /// Rounds.
    #[serde(default = "one_u32")]
    pub rounds: u32,
    /// Events published each round while they are away.
    pub events: usize,
}

/// `[partition]`: the network splits into groups, events go out, then it heals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// Groups (at least 2).
    pub groups: u32,
    /// How long the partition lasts.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Events published during the partition, and again after it heals.
    pub events: usize,
}

/// `[mail]`: recipients go offline, others mail them, they come back and read it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mail {
    /// Recipients (relays excepted).
    pub recipients: usize,
    /// Messages to each, from random senders.
    pub messages: usize,
}

fn one_u32() -> u32 {
    1
}

fn one() -> usize {
    1
}

fn settle() -> Duration {
    Duration::from_secs(2)
}

fn timeout() -> Duration {
    Duration::from_secs(10)
}

impl Scenario {
    /// Parses and checks a scenario.
    pub fn from_toml(text: &str) -> Result<Self, SimError> {
        let s: Scenario = toml::from_str(text).map_err(|e| SimError::Scenario(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    /// Reads a scenario file.
    pub fn from_file(path: &Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SimError::Scenario(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    fn validate(&self) -> Result<(), SimError> {
        let bad = |m: String| Err(SimError::Scenario(m));
        if self.nodes < 2 || self.nodes > MAX_NODES {
            return bad(format!("nodes = {}: must be 2 to {MAX_NODES}", self.nodes));
        }
        if self.bootstrap == 0 || self.bootstrap >= self.nodes {
            return bad(format!(
                "bootstrap = {}: must be 1 to nodes - 1",
                self.bootstrap
            ));
        }
        if self.skills == 0 || self.servers_per_skill == 0 || self.servers_per_skill > self.nodes {
            return bad(
                "skills and servers_per_skill must be at least 1, and servers at most nodes".into(),
            );
        }
        if self.relays > self.nodes / 2 {
            return bad(format!("relays = {}: at most half the nodes", self.relays));
        }
        let n = &self.network;
        for (what, p) in [
            ("network.dial_failure", n.dial_failure),
            ("network.nat", n.nat),
            ("network.nat_dependent", n.nat_dependent),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{what} = {p}: must be 0 to 1"));
            }
        }
        if n.dial_failure > 0.5 {
            return bad("network.dial_failure above 0.5 leaves no network to measure".into());
        }
        if n.nat > 0.0 && self.relays == 0 {
            return bad(
                "network.nat needs relays: nodes behind NAT reach others through them".into(),
            );
        }
        if !n.regions.is_empty()
            && (n.region_latency_ms.len() != n.regions.len()
                || n.region_latency_ms
                    .iter()
                    .any(|r| r.len() != n.regions.len()))
        {
            return bad(format!(
                "network.region_latency_ms must be a {0} x {0} matrix (one row per region)",
                n.regions.len()
            ));
        }
        let l = &self.limits;
        if l.min_connections == 0 || l.min_connections > l.max_connections {
            return bad(format!(
                "limits.min_connections = {}: must be 1 to limits.max_connections ({})",
                l.min_connections, l.max_connections
            ));
        }
        if let Some(c) = &self.churn
            && !(c.fraction > 0.0 && c.fraction < 1.0 && c.rounds > 0)
        {
            return bad("churn.fraction must be between 0 and 1, churn.rounds at least 1".into());
        }
        if let Some(p) = &self.partition
            && (p.groups < 2 || p.groups as usize > self.nodes)
        {
            return bad("partition.groups must be 2 to nodes".into());
        }
        if let Some(m) = &self.mail {
            if self.relays == 0 {
                return bad("mail needs relays: they hold the mail of offline nodes".into());
            }
            if m.recipients == 0 || m.recipients > self.nodes - self.relays.max(self.bootstrap) {
                return bad("mail.recipients must be 1 to the nodes that are not relays".into());
            }
        }
        Ok(())
    }

    /// Nodes with a public address: the bootstrap nodes and the relays, which come first.
    pub fn public_nodes(&self) -> usize {
        self.bootstrap.max(self.relays)
    }
}

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
    /// Seed of every random choice (roles, callers, publishers).
    pub seed: u64,
    /// Nodes in all, bootstrap nodes included.
    pub nodes: usize,
    /// Nodes the others bootstrap from.
    #[serde(default = "one")]
    pub bootstrap: usize,
    /// Distinct skills served.
    pub skills: usize,
    /// Nodes serving each skill.
    #[serde(default = "one")]
    pub servers_per_skill: usize,
    /// `find_skill` lookups, each by a random node for a random skill.
    pub lookups: usize,
    /// Calls, each by a random node to a provider it found.
    pub calls: usize,
    /// Events published on one topic every node subscribes to.
    pub events: usize,
    /// Wait after start-up before the workload, so the DHT and gossip meshes settle.
    #[serde(with = "humantime_serde", default = "settle")]
    pub settle: Duration,
    /// Deadline of each operation.
    #[serde(with = "humantime_serde", default = "timeout")]
    pub timeout: Duration,
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
        Ok(())
    }
}

//! Node configuration: defaults, then a TOML file, then environment variables, then flags.
//!
//! Every setting has a key `section.name` (`network.listen`, `calls.rate_per_peer`). The same key
//! is spelled `SKILLMESH_NETWORK_LISTEN` in the environment and `--set network.listen=...` on the
//! command line; lists are comma-separated there. Every layer goes through [`Config::set`], and
//! [`Config::validate`] names the key and the bad value of the first problem it finds.
//!
//! ```
//! use skillmesh::config::Config;
//!
//! let mut config = Config::from_toml("[network]\nmax_connections = 128\n").unwrap();
//! config.set("calls.rate_per_peer", "20").unwrap();
//! assert_eq!(config.network.max_connections, 128);
//! assert_eq!(config.calls.rate_per_peer, 20);
//!
//! let err = Config::from_toml("[network]\nmax_connections = 0\n").unwrap_err();
//! assert_eq!(err.to_string(), "invalid network.max_connections = 0: must be at least 1");
//! ```

mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};
use skillmesh_protocol::MeshName;

use crate::backing::SkillDecl;
use crate::store::StoreLimits;

/// Environment variable prefix of config keys.
pub const ENV_PREFIX: &str = "SKILLMESH_";
/// Environment variables with the prefix that are not config keys (read by the CLI).
const ENV_NOT_KEYS: &[&str] = &["SKILLMESH_DATA_DIR", "SKILLMESH_CONFIG", "SKILLMESH_LOG"];
/// File name of the config inside the data dir.
pub const CONFIG_FILE: &str = "config.toml";
/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// A configuration problem, naming where it is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML of the expected shape.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and key.
        message: String,
    },
    /// No such setting.
    #[error("unknown config key {key:?} (from {source_name})")]
    UnknownKey {
        /// The key.
        key: String,
        /// Where it came from: a file, `env SKILLMESH_...` or `flag`.
        source_name: String,
    },
    /// A setting has a bad value.
    #[error("invalid {key} = {value}: {reason}")]
    Invalid {
        /// The key, `section.name`.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(key: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Whether the DHT answers queries from others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KadMode {
    /// Server when AutoNAT or a listen address says we are reachable, client otherwise.
    #[default]
    Auto,
    /// Always answer.
    Server,
    /// Never answer (behind NAT, on battery).
    Client,
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This agent.
    pub node: NodeConfig,
    /// Transports and connections.
    pub network: NetworkConfig,
    /// The private mesh.
    pub mesh: MeshConfig,
    /// Kademlia.
    pub dht: DhtConfig,
    /// Skill calls.
    pub calls: CallsConfig,
    /// Gossipsub.
    pub gossip: GossipConfig,
    /// Table bounds.
    pub store: StoreLimits,
    /// Serving as a relay (and mailbox) for others.
    pub relay: RelayConfig,
    /// Reachability and relayed addresses of this node.
    pub nat: NatConfig,
    /// Sending and receiving end-to-end encrypted mail.
    pub mail: MailConfig,
    /// The local control API.
    pub api: ApiConfig,
    /// Skills the daemon serves, backed by a command or a local HTTP endpoint.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skills: Vec<SkillDecl>,
}

/// `[api]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Loopback address of the control API (port 0: any free port, written to the data dir).
    pub listen: std::net::SocketAddr,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

/// `[node]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Display name in the agent card.
    pub name: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: "skillmesh-agent".to_owned(),
        }
    }
}

/// `[network]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to connect to first (with `/p2p/<peer id>`).
    pub bootstrap: Vec<Multiaddr>,
    /// Find peers on the local network with mDNS.
    pub mdns: bool,
    /// Low watermark: trimming stops here.
    pub min_connections: u32,
    /// High watermark: above it the least useful connections are closed, down to
    /// `min_connections` (sparing those younger than `trim_grace`); inbound connections are
    /// refused at twice it (at least 8 above it), and this node's own dials at twice that.
    pub max_connections: u32,
    /// Connections being set up at once, incoming and outgoing each. A stalled DHT lookup has
    /// up to twenty requests out at once, and a node's neighbours all dial it as they join.
    pub max_pending: u32,
    /// Connections to one peer.
    pub max_per_peer: u32,
    /// Stop accepting connections above this much process memory, in MiB (0 = no limit).
    pub max_memory_mib: u64,
    /// Close a connection idle for this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections younger than this are not trimmed: they were opened for a lookup or a call,
    /// and closing them only makes someone dial again.
    #[serde(with = "humantime_serde")]
    pub trim_grace: Duration,
    /// How often each connection is pinged (0 = never): a TCP connection whose peer vanished
    /// (a laptop closed, a NAT mapping dropped) is found dead by the ping that goes unanswered.
    /// Every ping wakes both ends of a connection, and each new connection is pinged at once; a
    /// node holding hundreds of connections may ping less often.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            listen: vec![
                "/ip4/0.0.0.0/tcp/0"
                    .parse()
                    .unwrap_or_else(|_| unreachable!()),
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .unwrap_or_else(|_| unreachable!()),
            ],
            bootstrap: Vec::new(),
            mdns: true,
            // A DHT server meets a burst of new peers whenever someone bootstraps (a bucket
            // refresh asks peers all over the key space): at 32 / 64, with the hard cap at 128,
            // a 200-node netsim run refused 20,000 connections after their handshakes in its
            // first three minutes, each one a lookup retried elsewhere (go-libp2p's defaults
            // are 100 / 400).
            min_connections: 64,
            max_connections: 192,
            max_pending: 128,
            max_per_peer: 2,
            max_memory_mib: 0,
            idle_timeout: Duration::from_secs(60),
            trim_grace: Duration::from_secs(30),
            ping_interval: Duration::from_secs(15),
        }
    }
}

/// `[mesh]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// The mesh's name: the namespace of its topics.
    pub name: String,
    /// The mesh's pre-shared key, 64 hex digits (libp2p pnet). Empty: an open mesh.
    pub psk: String,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            name: MeshName::default().as_str().to_owned(),
            psk: String::new(),
        }
    }
}

impl MeshConfig {
    /// The pre-shared key as bytes, if set (valid after [`Config::validate`]).
    pub fn psk_bytes(&self) -> Option<[u8; 32]> {
        let bytes = hex::decode(&self.psk).ok()?;
        bytes.try_into().ok()
    }
}

/// `[dht]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DhtConfig {
    /// Server or client mode.
    pub mode: KadMode,
    /// How long our records and provider entries live in others' stores.
    #[serde(with = "humantime_serde")]
    pub record_ttl: Duration,
    /// How often we re-publish them; well under `record_ttl`.
    #[serde(with = "humantime_serde")]
    pub republish_interval: Duration,
    /// How long a lookup may take.
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// How often the routing table is walked again (one lookup per bucket, about ten in a
    /// network of a few hundred nodes; each reaches twenty or more peers). Connections it opens
    /// close once idle, so every refresh dials again.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// Records and provider keys held for others.
    pub max_records: u32,
}

impl Default for DhtConfig {
    fn default() -> Self {
        DhtConfig {
            mode: KadMode::Auto,
            record_ttl: Duration::from_secs(2 * 3600),
            republish_interval: Duration::from_secs(30 * 60),
            query_timeout: Duration::from_secs(10),
            refresh_interval: Duration::from_secs(5 * 60),
            max_records: 4096,
        }
    }
}

/// `[calls]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallsConfig {
    /// Inbound calls running at once, all peers together.
    pub max_inbound: u32,
    /// Inbound calls running at once from one peer.
    pub max_inbound_per_peer: u32,
    /// Calls one peer may start per second (sustained).
    pub rate_per_peer: u32,
    /// Calls one peer may start in a burst.
    pub burst_per_peer: u32,
    /// How long an outbound call waits for its result by default.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Clock difference tolerated in a call's time window.
    #[serde(with = "humantime_serde")]
    pub max_skew: Duration,
    /// Finished async calls whose results are kept (both sides, for `calls show` and for a
    /// caller that asks again); the oldest go first.
    pub keep_results: u64,
    /// How long a finished async call's result is kept at most.
    #[serde(with = "humantime_serde")]
    pub keep_results_for: Duration,
}

impl Default for CallsConfig {
    fn default() -> Self {
        CallsConfig {
            max_inbound: 256,
            max_inbound_per_peer: 32,
            rate_per_peer: 100,
            burst_per_peer: 200,
            timeout: Duration::from_secs(30),
            max_skew: skillmesh_protocol::MAX_CLOCK_SKEW,
            keep_results: 1000,
            keep_results_for: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// `[relay]`: circuit relay v2 server and mailbox, for nodes others can reach.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Run a relay and advertise it under `skillmesh/relay` in the DHT.
    pub enabled: bool,
    /// Also hold end-to-end encrypted mail for offline agents (needs `enabled`).
    pub mailbox: bool,
    /// Reservations held at once, all peers together.
    pub max_reservations: u32,
    /// Reservations of one peer.
    pub max_reservations_per_peer: u32,
    /// How long a reservation lasts before the peer renews it.
    #[serde(with = "humantime_serde")]
    pub reservation_duration: Duration,
    /// Relayed connections at once.
    pub max_circuits: u32,
    /// Relayed connections of one peer at once.
    pub max_circuits_per_peer: u32,
    /// How long one relayed connection may last (libp2p's default, 2 min, is too short for
    /// agents that call each other all day).
    #[serde(with = "humantime_serde")]
    pub max_circuit_duration: Duration,
    /// Bytes one relayed connection may carry (libp2p's default is 128 KiB).
    pub max_circuit_bytes: u64,
    /// The longest time a deposit is kept, whatever the sender asks.
    #[serde(with = "humantime_serde")]
    pub max_mail_ttl: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            enabled: false,
            mailbox: true,
            max_reservations: 256,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(3600),
            max_circuits: 512,
            max_circuits_per_peer: 16,
            max_circuit_duration: Duration::from_secs(3600),
            max_circuit_bytes: 256 * 1024 * 1024,
            max_mail_ttl: Duration::from_secs(72 * 3600),
        }
    }
}

/// Whether others can dial this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    /// Ask AutoNAT.
    Auto,
    /// Reachable: never reserve relay slots.
    Public,
    /// Not reachable: reserve relay slots right away.
    Private,
}

/// `[nat]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatConfig {
    /// `auto` (AutoNAT decides), `public` or `private`.
    pub reachability: Reachability,
    /// Relays to reserve on when private (with `/p2p/<peer id>`); empty: found in the DHT.
    pub relays: Vec<Multiaddr>,
    /// Relays to hold reservations on at once.
    pub max_reservations: u32,
    /// Try to turn relayed connections into direct ones (DCUtR hole punching).
    pub hole_punching: bool,
    /// How often `auto` reachability, once decided, is checked again (docs/reachability.md).
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            reachability: Reachability::Auto,
            relays: Vec::new(),
            max_reservations: 2,
            hole_punching: true,
            probe_interval: Duration::from_secs(300),
        }
    }
}

/// `[mail]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailConfig {
    /// Mailbox relays that hold this node's mail (with `/p2p/<peer id>`); empty: found in the
    /// DHT.
    pub mailboxes: Vec<Multiaddr>,
    /// Mailboxes to advertise and fetch from at once (at most 4). 0: none; mail reaches this
    /// node only while it is online, and it never searches the DHT for mailboxes.
    pub max_mailboxes: u32,
    /// How long mail this node sends is kept for an offline recipient.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How often to fetch from the mailboxes (also on every connection to one).
    #[serde(with = "humantime_serde")]
    pub fetch_interval: Duration,
    /// How long a message waits for an earlier one of the same sender before it is delivered
    /// anyway.
    #[serde(with = "humantime_serde")]
    pub reorder_wait: Duration,
    /// How long a direct delivery may take before the mail goes to the mailboxes instead.
    #[serde(with = "humantime_serde")]
    pub direct_timeout: Duration,
    /// Received messages held for the application.
    pub max_inbox: u64,
}

impl Default for MailConfig {
    fn default() -> Self {
        MailConfig {
            mailboxes: Vec::new(),
            max_mailboxes: 2,
            ttl: Duration::from_secs(72 * 3600),
            fetch_interval: Duration::from_secs(30),
            reorder_wait: Duration::from_secs(10),
            direct_timeout: Duration::from_secs(5),
            max_inbox: 10_000,
        }
    }
}

/// `[gossip]`: defaults are libp2p's, which suit 3 nodes and thousands alike.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GossipConfig {
    /// Target mesh degree (D).
    pub mesh_n: u32,
    /// Below this, add peers (D_low).
    pub mesh_n_low: u32,
    /// Above this, prune peers (D_high).
    pub mesh_n_high: u32,
    /// Peers to gossip to outside the mesh (D_lazy).
    pub gossip_lazy: u32,
    /// Heartbeat interval.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Events received per second per topic before the rest are dropped.
    pub max_events_per_sec: u32,
    /// How often this node announces its presence (and card) to the mesh.
    #[serde(with = "humantime_serde")]
    pub presence_interval: Duration,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            mesh_n: 6,
            mesh_n_low: 4,
            mesh_n_high: 12,
            gossip_lazy: 6,
            heartbeat: Duration::from_secs(1),
            max_events_per_sec: 1000,
            presence_interval: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Parses TOML and validates it.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, Path::new("<inline>"))
    }

    fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a config file. A missing file is an error when `required`, else the defaults.
    pub fn from_file(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default());
            }
            r => r.map_err(read_err)?,
        };
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: format!("larger than {MAX_CONFIG_BYTES} bytes"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Self::parse(&text, path)
    }

    /// Applies `SKILLMESH_<SECTION>_<NAME>` variables from `vars` (pass `std::env::vars()`).
    /// Variables of unknown sections are ignored (they may belong to a newer version or to the
    /// CLI); an unknown name in a known section is an error.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let sections = self.sections();
        let mut vars: Vec<_> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !ENV_NOT_KEYS.contains(&k.as_str()))
            .collect();
        vars.sort();
        for (var, value) in vars {
            let rest = var[ENV_PREFIX.len()..].to_ascii_lowercase();
            let Some((section, name)) = rest.split_once('_') else {
                continue;
            };
            if !sections.iter().any(|s| s == section) {
                continue;
            }
            let key = format!("{section}.{name}");
            self.set_from(&key, &value, &format!("env {var}"))?;
        }
        Ok(())
    }

    /// Sets one key from text, as a flag would: `set("network.max_connections", "128")`. Lists are
    /// comma-separated; durations are like `30s` or `2h`. Validates the result.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        self.set_from(key, value, "flag")
    }

    fn set_from(&mut self, key: &str, value: &str, source_name: &str) -> Result<(), ConfigError> {
        let unknown = || ConfigError::UnknownKey {
            key: key.to_owned(),
            source_name: source_name.to_owned(),
        };
        let (section, name) = key.split_once('.').ok_or_else(unknown)?;
        let mut doc =
            toml::Value::try_from(&*self).map_err(|e| invalid(key, value, e.to_string()))?;
        let slot = doc
            .get_mut(section)
            .and_then(|s| s.get_mut(name))
            .ok_or_else(unknown)?;
        *slot = parse_like(slot, key, value)?;
        let updated: Config = doc
            .try_into()
            .map_err(|e: toml::de::Error| invalid(key, value, e.message().trim_end().to_owned()))?;
        updated.validate()?;
        *self = updated;
        Ok(())
    }

    fn sections(&self) -> Vec<String> {
        match toml::Value::try_from(self) {
            Ok(toml::Value::Table(t)) => t.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// The mesh name (valid after [`Config::validate`]).
    pub fn mesh_name(&self) -> MeshName {
        MeshName::new(self.mesh.name.clone()).unwrap_or_default()
    }

    /// The defaults as a commented TOML file, for `skillmesh init`.
    pub fn default_file() -> String {
        let body = toml::to_string_pretty(&Config::default()).unwrap_or_default();
        format!(
            "# skillmesh node configuration. Every key can also be set with an environment\n\
             # variable SKILLMESH_<SECTION>_<KEY> (e.g. SKILLMESH_NETWORK_MAX_CONNECTIONS=128)\n\
             # or on the command line (--set network.max_connections=128).\n\n{body}\n\
             # Skills this node serves, each backed by a command or a local HTTP endpoint:\n\
             #\n\
             # [[skills]]\n\
             # name = \"upper\"\n\
             # version = \"1.0.0\"\n\
             # tags = [\"text\"]\n\
             # command = [\"sh\", \"-c\", \"tr a-z A-Z\"]   # or: http = \"http://127.0.0.1:8080/upper\"\n"
        )
    }
}

/// Parses `value` into the TOML type of the setting it replaces.
fn parse_like(current: &toml::Value, key: &str, value: &str) -> Result<toml::Value, ConfigError> {
    Ok(match current {
        toml::Value::String(_) => toml::Value::String(value.to_owned()),
        toml::Value::Integer(_) => toml::Value::Integer(
            value
                .trim()
                .parse()
                .map_err(|_| invalid(key, value, "must be a whole number"))?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(match value.trim() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err(invalid(key, value, "must be true or false")),
        }),
        toml::Value::Array(_) => toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        toml::Value::Float(_) => toml::Value::Float(
            value
                .trim()
                .parse()
                .map_err(|_| invalid(key, value, "must be a number"))?,
        ),
        other => {
            return Err(invalid(
                key,
                value,
                format!("cannot be set from text ({})", other.type_str()),
            ));
        }
    })
}

/// The per-user data dir (`~/.local/share/skillmesh` on Linux).
pub fn default_data_dir() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "skillmesh").map(|d| d.data_dir().to_owned())
}

#[cfg(test)]
mod tests;

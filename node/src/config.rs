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

    /// Checks every rule; the error names the first bad key and its value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.node;
        if n.name.is_empty()
            || n.name.len() > skillmesh_protocol::MAX_DISPLAY_NAME_LEN
            || n.name.chars().any(char::is_control)
        {
            return Err(invalid(
                "node.name",
                format!("{:?}", n.name),
                format!(
                    "must be 1 to {} printable bytes",
                    skillmesh_protocol::MAX_DISPLAY_NAME_LEN
                ),
            ));
        }

        let net = &self.network;
        for (i, a) in net.bootstrap.iter().enumerate() {
            if !a
                .iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
            {
                return Err(invalid(
                    &format!("network.bootstrap[{i}]"),
                    a,
                    "must end with /p2p/<peer id>",
                ));
            }
        }
        at_least("network.max_connections", net.max_connections, 1)?;
        at_least("network.max_pending", net.max_pending, 1)?;
        at_least("network.max_per_peer", net.max_per_peer, 1)?;
        if net.min_connections > net.max_connections {
            return Err(invalid(
                "network.min_connections",
                net.min_connections,
                format!(
                    "must not exceed network.max_connections ({})",
                    net.max_connections
                ),
            ));
        }
        duration_at_least(
            "network.idle_timeout",
            net.idle_timeout,
            Duration::from_secs(1),
        )?;
        if !net.ping_interval.is_zero() {
            duration_at_least(
                "network.ping_interval",
                net.ping_interval,
                Duration::from_secs(1),
            )?;
        }

        MeshName::new(self.mesh.name.clone())
            .map_err(|e| invalid("mesh.name", format!("{:?}", self.mesh.name), e.reason))?;
        if !self.mesh.psk.is_empty() && self.mesh.psk_bytes().is_none() {
            return Err(invalid(
                "mesh.psk",
                "<hidden>",
                format!(
                    "must be 64 hex digits, got {} characters",
                    self.mesh.psk.len()
                ),
            ));
        }

        let d = &self.dht;
        duration_at_least("dht.record_ttl", d.record_ttl, Duration::from_secs(60))?;
        if d.record_ttl > skillmesh_protocol::MAX_CARD_LIFETIME {
            return Err(invalid(
                "dht.record_ttl",
                humantime::format_duration(d.record_ttl),
                format!(
                    "must be at most {}",
                    humantime::format_duration(skillmesh_protocol::MAX_CARD_LIFETIME)
                ),
            ));
        }
        if d.republish_interval.is_zero() || d.republish_interval * 2 > d.record_ttl {
            return Err(invalid(
                "dht.republish_interval",
                humantime::format_duration(d.republish_interval),
                "must be above zero and at most half of dht.record_ttl, so records are renewed before they expire",
            ));
        }
        duration_at_least(
            "dht.query_timeout",
            d.query_timeout,
            Duration::from_millis(100),
        )?;
        duration_at_least(
            "dht.refresh_interval",
            d.refresh_interval,
            Duration::from_secs(10),
        )?;
        at_least("dht.max_records", d.max_records, 16)?;

        let c = &self.calls;
        at_least("calls.max_inbound", c.max_inbound, 1)?;
        at_least("calls.max_inbound_per_peer", c.max_inbound_per_peer, 1)?;
        at_least("calls.rate_per_peer", c.rate_per_peer, 1)?;
        if c.burst_per_peer < c.rate_per_peer {
            return Err(invalid(
                "calls.burst_per_peer",
                c.burst_per_peer,
                format!("must be at least calls.rate_per_peer ({})", c.rate_per_peer),
            ));
        }
        duration_at_least("calls.timeout", c.timeout, Duration::from_millis(10))?;
        if c.timeout > skillmesh_protocol::MAX_CALL_WINDOW {
            return Err(invalid(
                "calls.timeout",
                humantime::format_duration(c.timeout),
                format!(
                    "must be at most {}",
                    humantime::format_duration(skillmesh_protocol::MAX_CALL_WINDOW)
                ),
            ));
        }
        if c.max_skew > Duration::from_secs(600) {
            return Err(invalid(
                "calls.max_skew",
                humantime::format_duration(c.max_skew),
                "must be at most 10m",
            ));
        }

        let g = &self.gossip;
        at_least("gossip.mesh_n_low", g.mesh_n_low, 1)?;
        if !(g.mesh_n_low <= g.mesh_n && g.mesh_n <= g.mesh_n_high) {
            return Err(invalid(
                "gossip.mesh_n",
                g.mesh_n,
                format!(
                    "must satisfy mesh_n_low ({}) <= mesh_n <= mesh_n_high ({})",
                    g.mesh_n_low, g.mesh_n_high
                ),
            ));
        }
        duration_at_least("gossip.heartbeat", g.heartbeat, Duration::from_millis(10))?;
        at_least("gossip.max_events_per_sec", g.max_events_per_sec, 1)?;
        duration_at_least(
            "gossip.presence_interval",
            g.presence_interval,
            Duration::from_secs(1),
        )?;

        let r = &self.relay;
        if r.enabled {
            at_least("relay.max_reservations", r.max_reservations, 1)?;
            at_least("relay.max_circuits", r.max_circuits, 1)?;
            at_least("relay.max_circuit_bytes", r.max_circuit_bytes, 64 * 1024)?;
            duration_at_least(
                "relay.max_circuit_duration",
                r.max_circuit_duration,
                Duration::from_secs(10),
            )?;
        }
        mail_ttl("relay.max_mail_ttl", r.max_mail_ttl)?;
        duration_at_least(
            "nat.probe_interval",
            self.nat.probe_interval,
            Duration::from_secs(10),
        )?;
        for (key, list) in [
            ("nat.relays", &self.nat.relays),
            ("mail.mailboxes", &self.mail.mailboxes),
        ] {
            for (i, a) in list.iter().enumerate() {
                if !matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
                    return Err(invalid(
                        &format!("{key}[{i}]"),
                        a,
                        "must end with /p2p/<peer id>",
                    ));
                }
            }
        }
        let m = &self.mail;
        if m.max_mailboxes == 0 && !m.mailboxes.is_empty() {
            return Err(invalid(
                "mail.max_mailboxes",
                m.max_mailboxes,
                "must be at least 1 when mail.mailboxes lists any",
            ));
        }
        if m.max_mailboxes as usize > skillmesh_protocol::MAX_CARD_MAILBOXES {
            return Err(invalid(
                "mail.max_mailboxes",
                m.max_mailboxes,
                format!("must be at most {}", skillmesh_protocol::MAX_CARD_MAILBOXES),
            ));
        }
        mail_ttl("mail.ttl", m.ttl)?;
        duration_at_least(
            "mail.fetch_interval",
            m.fetch_interval,
            Duration::from_millis(100),
        )?;
        duration_at_least(
            "mail.direct_timeout",
            m.direct_timeout,
            Duration::from_millis(100),
        )?;
        at_least("mail.max_inbox", m.max_inbox, 1)?;

        let s = &self.store;
        for (k, v) in [
            ("store.max_peers", s.max_peers),
            ("store.max_cards", s.max_cards),
            ("store.max_skills", s.max_skills),
            ("store.max_call_log", s.max_call_log),
            ("store.mail_per_recipient", s.mail_per_recipient),
            ("store.mail_bytes_per_recipient", s.mail_bytes_per_recipient),
            ("store.mail_per_sender", s.mail_per_sender),
            ("store.mail_bytes_per_sender", s.mail_bytes_per_sender),
            ("store.mail_bytes_total", s.mail_bytes_total),
        ] {
            at_least(k, v, 1)?;
        }
        if !self.api.listen.ip().is_loopback() {
            return Err(invalid(
                "api.listen",
                self.api.listen,
                "must be a loopback address: the control API is for this machine only",
            ));
        }
        for (i, decl) in self.skills.iter().enumerate() {
            if let Err(e) = decl.resolve() {
                return Err(invalid(
                    &format!("skills[{i}].{}", e.field),
                    &decl.name,
                    e.reason,
                ));
            }
            if self.skills[..i].iter().any(|d| d.name == decl.name) {
                return Err(invalid(
                    &format!("skills[{i}].name"),
                    &decl.name,
                    "declared twice",
                ));
            }
        }
        if s.max_skills > skillmesh_protocol::MAX_SKILLS_PER_CARD as u64 {
            return Err(invalid(
                "store.max_skills",
                s.max_skills,
                format!(
                    "must be at most {} (skills per card)",
                    skillmesh_protocol::MAX_SKILLS_PER_CARD
                ),
            ));
        }
        Ok(())
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

fn at_least<T: PartialOrd + std::fmt::Display>(key: &str, v: T, min: T) -> Result<(), ConfigError> {
    if v < min {
        return Err(invalid(key, &v, format!("must be at least {min}")));
    }
    Ok(())
}

fn duration_at_least(key: &str, v: Duration, min: Duration) -> Result<(), ConfigError> {
    if v < min {
        return Err(invalid(
            key,
            humantime::format_duration(v),
            format!("must be at least {}", humantime::format_duration(min)),
        ));
    }
    Ok(())
}

/// A mail TTL: at least a minute, at most the protocol's [`skillmesh_protocol::MAX_MAIL_TTL`].
fn mail_ttl(key: &str, v: Duration) -> Result<(), ConfigError> {
    duration_at_least(key, v, Duration::from_secs(60))?;
    let max = skillmesh_protocol::MAX_MAIL_TTL;
    if v > max {
        return Err(invalid(
            key,
            humantime::format_duration(v),
            format!("must be at most {}", humantime::format_duration(max)),
        ));
    }
    Ok(())
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
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_the_default_file() {
        Config::default().validate().expect("defaults valid");
        let parsed = Config::from_toml(&Config::default_file()).expect("default file parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn file_errors_name_the_key() {
        let e = Config::from_toml("[network]\nmax_conections = 3\n").expect_err("unknown key");
        assert!(e.to_string().contains("max_conections"), "{e}");
        let e = Config::from_toml("[network]\nmax_connections = \"many\"\n").expect_err("type");
        assert!(e.to_string().contains("max_connections"), "{e}");
        let e = Config::from_toml("[network]\nlisten = [\"/ip9/x\"]\n").expect_err("multiaddr");
        assert!(e.to_string().contains("listen"), "{e}");
        let e = Config::from_toml("[dht]\nrecord_ttl = \"soon\"\n").expect_err("duration");
        assert!(e.to_string().contains("record_ttl"), "{e}");
        let e = Config::from_toml("network = [").expect_err("syntax");
        assert!(matches!(e, ConfigError::Parse { .. }));
    }

    #[test]
    fn validation_names_key_and_value() {
        let cases = [
            (
                "[network]\nmax_connections = 0",
                "invalid network.max_connections = 0: must be at least 1",
            ),
            (
                "[network]\nmin_connections = 300",
                "invalid network.min_connections = 300: must not exceed network.max_connections (192)",
            ),
            (
                "[mesh]\nname = \"Bad Mesh\"",
                "invalid mesh.name = \"Bad Mesh\"",
            ),
            (
                "[mesh]\npsk = \"abcd\"",
                "invalid mesh.psk = <hidden>: must be 64 hex digits, got 4 characters",
            ),
            (
                "[dht]\nrepublish_interval = \"2h\"",
                "invalid dht.republish_interval = 2h",
            ),
            (
                "[dht]\nrefresh_interval = \"1s\"",
                "invalid dht.refresh_interval = 1s",
            ),
            (
                "[calls]\nburst_per_peer = 1",
                "invalid calls.burst_per_peer = 1",
            ),
            ("[gossip]\nmesh_n = 20", "invalid gossip.mesh_n = 20"),
            (
                "[store]\nmax_call_log = 0",
                "invalid store.max_call_log = 0",
            ),
            (
                "[network]\nping_interval = \"500ms\"",
                "invalid network.ping_interval = 500ms: must be at least 1s",
            ),
            (
                "[network]\nbootstrap = [\"/ip4/1.2.3.4/tcp/1\"]",
                "invalid network.bootstrap[0] = /ip4/1.2.3.4/tcp/1: must end with /p2p/<peer id>",
            ),
            (
                "[mail]\nmax_mailboxes = 5",
                "invalid mail.max_mailboxes = 5: must be at most 4",
            ),
        ];
        // No mailboxes at all is a choice (mail only while online), unless some are listed.
        assert!(Config::from_toml("[mail]\nmax_mailboxes = 0").is_ok());
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let listed =
            format!("[mail]\nmax_mailboxes = 0\nmailboxes = [\"/ip4/1.2.3.4/tcp/1/p2p/{peer}\"]");
        assert_eq!(
            Config::from_toml(&listed).expect_err("listed").to_string(),
            "invalid mail.max_mailboxes = 0: must be at least 1 when mail.mailboxes lists any"
        );
        for (text, want) in cases {
            let e = Config::from_toml(text).expect_err(text).to_string();
            assert!(e.starts_with(want), "{text}: got {e:?}, want {want:?}");
        }
    }

    #[test]
    fn zero_ping_interval_is_accepted() {
        let c = Config::from_toml("[network]\nping_interval = \"0s\"").expect("valid");
        assert!(c.network.ping_interval.is_zero());
    }

    #[test]
    fn env_and_flags_override_in_order() {
        let mut c =
            Config::from_toml("[calls]\nrate_per_peer = 5\nburst_per_peer = 10").expect("ok");
        c.apply_env([
            ("SKILLMESH_CALLS_RATE_PER_PEER".to_owned(), "7".to_owned()),
            (
                "SKILLMESH_NETWORK_LISTEN".to_owned(),
                "/ip4/127.0.0.1/tcp/0, /ip4/127.0.0.1/udp/0/quic-v1".to_owned(),
            ),
            ("SKILLMESH_NETWORK_MDNS".to_owned(), "off".to_owned()),
            ("SKILLMESH_DHT_QUERY_TIMEOUT".to_owned(), "3s".to_owned()),
            ("SKILLMESH_DATA_DIR".to_owned(), "/somewhere".to_owned()),
            ("SKILLMESH_FUTURE_THING".to_owned(), "x".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
        ])
        .expect("env");
        assert_eq!(c.calls.rate_per_peer, 7);
        assert_eq!(c.network.listen.len(), 2);
        assert!(!c.network.mdns);
        assert_eq!(c.dht.query_timeout, Duration::from_secs(3));
        c.set("calls.rate_per_peer", "9").expect("flag");
        assert_eq!(c.calls.rate_per_peer, 9);
    }

    #[test]
    fn bad_env_and_flags_name_key_and_value_and_change_nothing() {
        let mut c = Config::default();
        let before = c.clone();
        let e = c
            .apply_env([(
                "SKILLMESH_CALLS_RATE_PER_PEER".to_owned(),
                "fast".to_owned(),
            )])
            .expect_err("not a number");
        assert_eq!(
            e.to_string(),
            "invalid calls.rate_per_peer = fast: must be a whole number"
        );
        let e = c
            .apply_env([("SKILLMESH_NETWORK_LISTN".to_owned(), "x".to_owned())])
            .expect_err("unknown");
        assert!(
            e.to_string().contains("network.listn")
                && e.to_string().contains("SKILLMESH_NETWORK_LISTN"),
            "{e}"
        );
        let e = c.set("network.max_connections", "0").expect_err("invalid");
        assert_eq!(
            e.to_string(),
            "invalid network.max_connections = 0: must be at least 1"
        );
        let e = c
            .set("network.listen", "/ip4/1.2.3.4/tcp/x")
            .expect_err("bad addr");
        assert!(
            e.to_string()
                .starts_with("invalid network.listen = /ip4/1.2.3.4/tcp/x"),
            "{e}"
        );
        let e = c
            .set("dht.record_ttl", "forever")
            .expect_err("bad duration");
        assert!(
            e.to_string()
                .starts_with("invalid dht.record_ttl = forever"),
            "{e}"
        );
        assert!(matches!(
            c.set("nosuch", "1"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert_eq!(c, before);
    }

    #[test]
    fn missing_file_is_defaults_unless_required() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("none.toml");
        assert_eq!(
            Config::from_file(&p, false).expect("defaults"),
            Config::default()
        );
        assert!(matches!(
            Config::from_file(&p, true),
            Err(ConfigError::Read { .. })
        ));
        std::fs::write(&p, "[node]\nname = \"ada\"\n").expect("write");
        assert_eq!(Config::from_file(&p, true).expect("file").node.name, "ada");
    }
}

//! The composed libp2p behaviour and the swarm that runs it.
//!
//! Transports: TCP and QUIC with Noise and Yamux, behind DNS. In a private mesh (a pre-shared
//! key) connections go over TCP with libp2p pnet under Noise, and QUIC is off: it has no byte
//! stream for pnet to wrap.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::gossipsub::{self, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::kad::{self, StoreInserts};
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, SwarmBuilder, Transport, connection_limits, identify, mdns,
    memory_connection_limits, noise, ping, relay, tcp, yamux,
};
use sha2::{Digest, Sha256};
use skillmesh_protocol::Kind;
use skillmesh_protocol::keys::{
    CARD_PROTOCOL, IDENTIFY_PROTOCOL_VERSION, KAD_PROTOCOL, MAILBOX_PROTOCOL,
};
use skillmesh_protocol::{MAX_MAILBOX_REQUEST_BYTES, MAX_MAILBOX_RESPONSE_BYTES};

use crate::config::{Config, KadMode, NetworkConfig, Reachability};
use crate::deferred::Deferred;
use crate::error::Error;
use crate::wire::FrameCodec;

/// Providers kept per DHT key; more than a lookup returns.
const MAX_PROVIDERS_PER_KEY: usize = 64;
/// Keys this node provides itself: its skills and tags.
const MAX_PROVIDED_KEYS: usize = 1024;
/// Gossip frames: one event envelope and the gossipsub framing around it.
const MAX_GOSSIP_BYTES: usize = 100 * 1024;
/// How long a direct card request may take before the DHT is asked instead.
const CARD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) memory: Toggle<memory_connection_limits::Behaviour>,
    /// Reachability probes both ways, and the per-peer connection limit with room for them.
    pub(crate) reach: crate::reach::Behaviour,
    /// Which connections stay open; connecting to a peer a call waits for.
    pub(crate) conns: crate::connections::Behaviour,
    pub(crate) identify: Deferred<identify::Behaviour>,
    pub(crate) ping: Toggle<Deferred<ping::Behaviour>>,
    pub(crate) kad: kad::Behaviour<MemoryStore>,
    /// Its streams leave keeping a connection open to its meshes (`gossip.rs`).
    pub(crate) gossipsub: Deferred<crate::gossip::Gossip>,
    /// Call pipes: streams handed straight to the calling and serving tasks.
    pub(crate) streams: crate::pipe::Streams,
    pub(crate) mailbox: request_response::Behaviour<FrameCodec>,
    /// Cards asked of their agents directly: one request instead of a DHT walk per agent found.
    pub(crate) cards: request_response::Behaviour<FrameCodec>,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(crate) relay: Toggle<relay::Behaviour>,
    pub(crate) relay_client: relay::client::Behaviour,
    pub(crate) dcutr: Toggle<crate::punch::Punch>,
}

/// How long a new connection waits for the streams identify, ping and gossipsub open
/// (`deferred.rs`). Each opens a stream each way the moment a connection is made, on both
/// nodes, with their negotiations and first messages (identify's info, gossipsub's
/// subscriptions and grafts), in the very milliseconds the call or request the connection was
/// made for needs the CPU. A cold call over loopback TCP (`cargo bench --bench calls -- --only
/// cold --net tcp`, 300 samples a run) took 1.56-1.57x plain libp2p with none held, 1.42-1.49x
/// with ping and the dialer's identify held, 1.34-1.37x with all three held on both sides
/// (2026-12-07). What the 10 ms cost: a listener learns where a dialer listens (for its DHT
/// routing table) 10 ms later, and a new peer hears of our subscriptions 10 ms later, so an
/// event published in a connection's first 10 ms may miss it (gossip never promised those).
/// netsim's 20-node smoke run still finds all 40 lookups (p50 47-62 ms, 55 ms before). Held
/// for 50 ms, that run missed 12-18 % of its lookups.
const SETTLE: Duration = Duration::from_millis(10);

/// How outbound streams negotiate their protocol. Lazily: a stream's first bytes go out with
/// the proposal instead of a round trip after it (go-libp2p does the same for every stream). A
/// peer that does not speak the protocol says so on the first read, not at the open; call pipes
/// turn that into "does not serve skill calls" (`pipe/caller.rs`), and every other protocol here fails
/// the request as it did. Streams are not nested, so V1Lazy's caveat (a listener missing an
/// intermediate protocol) does not arise. Measured on loopback TCP (`cargo bench --bench calls
/// -- --only cold`): a cold call took 10-12 % less.
const STREAMS: Version = Version::V1Lazy;

/// Inbound connections at most; our own dials may open as many again. The hard cap sits well
/// above the high watermark: connections opened by lookups are young and spared from trimming
/// for a while, and a node at its cap turns away the lookups and calls of others (netsim at
/// 100 nodes: a quarter above left callees refusing callers). Our own dials have room of their
/// own because a DHT walk that others' connections had crowded out lost the key's nearest
/// peers: libp2p-kad counts a dial our cap refuses as a failed peer, and the nearest are dialed
/// last. In a 1,000-node netsim run's announcements, 12,100 dials were refused so; 20 of 300
/// skill records reached under three in four of the key's 20 nearest peers, and lookups that
/// asked those peers missed 12 of 900 servers. With this room: none refused, every record at
/// 18 or more of the 20, no server missed (2026-12-03).
pub(crate) fn hard_cap(net: &NetworkConfig) -> u32 {
    net.max_connections
        .saturating_mul(2)
        .max(net.max_connections.saturating_add(8))
}

fn behaviour(
    key: &Keypair,
    config: &Config,
    relay_client: relay::client::Behaviour,
) -> Result<Behaviour, Error> {
    let peer_id = key.public().to_peer_id();
    let net = &config.network;
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established_incoming(Some(hard_cap(net)))
        .with_max_established(Some(hard_cap(net).saturating_mul(2)))
        // Per peer: `reach` enforces it, with room for reachability probes' dial-backs.
        .with_max_pending_incoming(Some(net.max_pending))
        .with_max_pending_outgoing(Some(net.max_pending));
    let memory = (net.max_memory_mib > 0).then(|| {
        memory_connection_limits::Behaviour::with_max_bytes(
            usize::try_from(net.max_memory_mib.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX),
        )
    });

    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_owned(), key.public())
            .with_agent_version(format!("skillmesh/{}", env!("CARGO_PKG_VERSION"))),
    );

    let dht = &config.dht;
    let mut kcfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kcfg.set_query_timeout(dht.query_timeout)
        .set_periodic_bootstrap_interval(Some(dht.refresh_interval))
        // The event loop walks once when it joins. Kademlia's own automatic walk re-arms on
        // every peer a walk adds while the table is small, so it walked every join a second
        // time (vendor/libp2p-kad/VENDORED.md).
        .set_automatic_bootstrap_throttle(None)
        .set_record_ttl(Some(dht.record_ttl))
        // Cards are re-signed with a new expiry and republished by the node itself; kad would
        // republish the old signed bytes.
        .set_publication_interval(None)
        .set_provider_record_ttl(Some(dht.record_ttl))
        .set_provider_publication_interval(Some(dht.republish_interval))
        // Every inbound record is checked by the event loop before it is stored.
        .set_record_filtering(StoreInserts::FilterBoth);
    let store = MemoryStore::with_config(
        peer_id,
        MemoryStoreConfig {
            max_records: dht.max_records as usize,
            max_value_bytes: Kind::Card.max_envelope(),
            max_providers_per_key: MAX_PROVIDERS_PER_KEY,
            max_provided_keys: MAX_PROVIDED_KEYS,
        },
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, kcfg);
    kad.set_mode(Some(match dht.mode {
        // AutoNAT decides once it runs; until then a node answers queries, which is right on
        // a LAN and for servers, and harmless behind NAT (nobody can reach it to ask).
        KadMode::Auto | KadMode::Server => kad::Mode::Server,
        KadMode::Client => kad::Mode::Client,
    }));

    let g = &config.gossip;
    // Every message is an event envelope signed by its publisher and verified by the event
    // loop before it is accepted and forwarded. Gossipsub's own signature said the same thing
    // again, and gossipsub checks it on every copy that arrives, duplicates included (about
    // `mesh_n` per event): unsigned messages carry nothing the envelope does not.
    let gcfg = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Anonymous)
        .validate_messages()
        // Content-addressed ids: each event envelope carries its publisher, seq and time, so
        // equal bytes are the same event and are delivered once.
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::from(Sha256::digest(&m.data).to_vec())
        })
        .mesh_n(g.mesh_n as usize)
        .mesh_n_low(g.mesh_n_low as usize)
        .mesh_n_high(g.mesh_n_high as usize)
        .mesh_outbound_min((g.mesh_n_low as usize / 2).min(g.mesh_n as usize / 2))
        .gossip_lazy(g.gossip_lazy as usize)
        .heartbeat_interval(g.heartbeat)
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .build()
        .map_err(|e| Error::Transport(format!("gossipsub config: {e}")))?;
    let mut gossipsub = gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, gcfg)
        .map_err(|e| Error::Transport(format!("gossipsub: {e}")))?;
    gossipsub
        .with_peer_score(
            gossipsub::PeerScoreParams::default(),
            gossipsub::PeerScoreThresholds::default(),
        )
        .map_err(|e| Error::Transport(format!("gossipsub scoring: {e}")))?;

    let mailbox = request_response::Behaviour::with_codec(
        FrameCodec::new(MAX_MAILBOX_REQUEST_BYTES, MAX_MAILBOX_RESPONSE_BYTES),
        [(StreamProtocol::new(MAILBOX_PROTOCOL), ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(60))
            .with_max_concurrent_streams(256),
    );

    // The request is empty; the answer is one card envelope.
    let cards = request_response::Behaviour::with_codec(
        FrameCodec::new(0, Kind::Card.max_envelope()),
        [(StreamProtocol::new(CARD_PROTOCOL), ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(CARD_REQUEST_TIMEOUT)
            .with_max_concurrent_streams(64),
    );

    let mdns = if net.mdns {
        Some(
            mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                .map_err(|e| Error::Transport(format!("mdns: {e}")))?,
        )
    } else {
        None
    };

    let r = &config.relay;
    let relay = r.enabled.then(|| {
        let defaults = relay::Config::default();
        relay::Behaviour::new(
            peer_id,
            relay::Config {
                max_reservations: r.max_reservations as usize,
                max_reservations_per_peer: r.max_reservations_per_peer as usize,
                reservation_duration: r.reservation_duration,
                max_circuits: r.max_circuits as usize,
                max_circuits_per_peer: r.max_circuits_per_peer as usize,
                max_circuit_duration: r.max_circuit_duration,
                max_circuit_bytes: r.max_circuit_bytes,
                ..defaults
            },
        )
    });
    let dcutr = config
        .nat
        .hole_punching
        .then(|| crate::punch::Punch::new(peer_id));
    // A configured reachability needs no probes; every node answers others' probes.
    let reach = crate::reach::Behaviour::new(
        config.nat.reachability == Reachability::Auto,
        config.nat.probe_interval,
        net.max_per_peer,
    );

    Ok(Behaviour {
        limits: connection_limits::Behaviour::new(limits),
        memory: memory.into(),
        reach,
        conns: crate::connections::Behaviour::new(net.clone()),
        identify: Deferred::new(identify, SETTLE),
        // A zero interval would ping without pause: zero means no pings.
        ping: (!config.network.ping_interval.is_zero())
            .then(|| {
                Deferred::new(
                    ping::Behaviour::new(
                        ping::Config::new().with_interval(config.network.ping_interval),
                    ),
                    SETTLE,
                )
            })
            .into(),
        kad,
        gossipsub: Deferred::new(crate::gossip::Gossip::new(gossipsub), SETTLE),
        streams: crate::pipe::Streams::new(),
        mailbox,
        cards,
        mdns: mdns.into(),
        relay: relay.into(),
        relay_client,
        dcutr: dcutr.into(),
    })
}

/// Which transports a node uses.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum TransportKind {
    /// TCP and QUIC (or TCP with pnet in a private mesh), behind DNS.
    #[default]
    Network,
    /// libp2p's in-process memory transport (`/memory/<port>` addresses), with the same Noise
    /// and Yamux upgrades: many real nodes in one process.
    Memory,
    /// A byte-stream transport supplied by the embedder, e.g. netsim's simulated network; the
    /// node runs Noise and Yamux over it as over TCP.
    Raw(RawTransport),
}

/// One byte stream of a [`RawTransport`].
pub trait RawStream: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static {}

impl<T: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static> RawStream for T {}

/// A factory of raw byte-stream transports, called once per node start: the node's swarm owns
/// the transport it gets.
#[derive(Clone)]
pub struct RawTransport(Arc<dyn Fn() -> Boxed<Box<dyn RawStream>> + Send + Sync>);

impl RawTransport {
    /// Wraps a factory.
    pub fn new(make: impl Fn() -> Boxed<Box<dyn RawStream>> + Send + Sync + 'static) -> Self {
        RawTransport(Arc::new(make))
    }
}

impl std::fmt::Debug for RawTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawTransport")
    }
}

/// Builds the swarm for `config` with the node's key.
pub(crate) fn build_swarm(
    key: Keypair,
    config: &Config,
    kind: TransportKind,
) -> Result<Swarm<Behaviour>, Error> {
    let transport_err = |e: &dyn std::fmt::Display| Error::Transport(e.to_string());
    let idle = config.network.idle_timeout;
    // The same swarm settings whatever the transport: netsim and the memory-transport tests
    // run what the daemon runs. (They had drifted: only the TCP/QUIC swarm set the buffers.)
    let settings = |c: libp2p::swarm::Config| {
        c.with_idle_connection_timeout(idle)
            .with_substream_upgrade_protocol_override(STREAMS)
            .with_per_connection_event_buffer_size(64)
            .with_notify_handler_buffer_size(NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN))
    };
    let tcp_config = tcp::Config::default().nodelay(true);
    let raw: Option<Boxed<Box<dyn RawStream>>> = match kind {
        TransportKind::Network => None,
        TransportKind::Memory => Some(
            libp2p::core::transport::MemoryTransport::default()
                .map(|s, _| Box::new(s) as Box<dyn RawStream>)
                .boxed(),
        ),
        TransportKind::Raw(make) => Some((make.0)()),
    };
    if let Some(raw) = raw {
        return Ok(SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_other_transport(|key| {
                let noise = noise::Config::new(key)?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    raw.upgrade(Version::V1Lazy)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default())
                        .timeout(Duration::from_secs(20)),
                )
            })
            .map_err(|e| transport_err(&e))?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| transport_err(&e))?
            .with_behaviour(|key, relay| behaviour(key, config, relay).map_err(Box::from))
            .map_err(|e| transport_err(&e))?
            .with_swarm_config(settings)
            .build());
    }
    let swarm = match config.mesh.psk_bytes() {
        None => SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(tcp_config, noise::Config::new, yamux::Config::default)
            .map_err(|e| transport_err(&e))?
            .with_quic()
            .with_dns()
            .map_err(|e| transport_err(&e))?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| transport_err(&e))?
            .with_behaviour(|key, relay| behaviour(key, config, relay).map_err(Box::from))
            .map_err(|e| transport_err(&e))?
            .with_swarm_config(settings)
            .build(),
        Some(psk) => {
            let psk = PreSharedKey::new(psk);
            SwarmBuilder::with_existing_identity(key)
                .with_tokio()
                .with_other_transport(move |key| {
                    let noise = noise::Config::new(key)?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                        tcp::tokio::Transport::new(tcp_config)
                            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                            .upgrade(Version::V1Lazy)
                            .authenticate(noise)
                            .multiplex(yamux::Config::default())
                            .timeout(Duration::from_secs(20)),
                    )
                })
                .map_err(|e| transport_err(&e))?
                .with_dns()
                .map_err(|e| transport_err(&e))?
                .with_relay_client(noise::Config::new, yamux::Config::default)
                .map_err(|e| transport_err(&e))?
                .with_behaviour(|key, relay| behaviour(key, config, relay).map_err(Box::from))
                .map_err(|e| transport_err(&e))?
                .with_swarm_config(settings)
                .build()
        }
    };
    Ok(swarm)
}

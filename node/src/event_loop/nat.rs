//! Reachability and relays: what the node does with the verdict of its probes
//! (`crate::reach`), reservations on relays for a node others cannot dial, and hole punching.
//! docs/reachability.md describes the whole of it.
//!
//! A private node reserves slots on up to `nat.max_reservations` relays (the configured ones,
//! else relays found under `skillmesh/relay` in the DHT); so does a node whose probes have
//! decided nothing after [`UNDECIDED_LIMIT`] (a NAT that drops the TCP dial-backs of every
//! probe leaves it undecided for good), and `status` says why. Each reservation gives it a
//! circuit address, which goes into its card so others can reach it through the relay; DCUtR
//! then tries to turn each relayed connection into a direct one. A node found public gives its
//! reservations up.
//!
//! [`Nat`] owns this state and works on the swarm it is handed: reservations are listeners,
//! reversals are dials, and the DHT mode follows the verdict. What it needs of the rest of the
//! node comes as arguments (a peer's card addresses, whether a peer is busy, where this node
//! listens), and what the rest must do comes back: a card to republish, relays to search for,
//! a relay's circuit addresses to forget.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::kad;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId, dcutr, relay};
use serde::Serialize;

use super::Swarm;
use crate::behaviour::Behaviour;
use crate::config::Config;
use crate::config::{KadMode, Reachability};
pub use crate::reach::Reach;
use crate::reach::ReachStatus;

/// How often the reservation state is checked.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How long to wait between DHT searches for relays.
const SEARCH_INTERVAL: Duration = Duration::from_secs(30);
/// How long a reservation waits for a connected relay's identify, to learn its QUIC address.
const IDENTIFY_WAIT: Duration = Duration::from_secs(3);
/// How long a node with relays known waits for a verdict before it reserves anyway.
pub(crate) const UNDECIDED_LIMIT: Duration = Duration::from_secs(30);
/// Reversal dials tracked at once (each ends within a dial timeout).
const MAX_REVERSALS: usize = 256;
/// Relays remembered from DHT searches.
const MAX_CANDIDATES: usize = 32;

/// How a connection came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// Direct: this node dialed the peer.
    Dialed,
    /// Direct: the peer dialed this node.
    Accepted,
    /// Through a relay circuit.
    Relayed,
    /// Direct: hole punched (DCUtR) from a relayed connection.
    HolePunched,
    /// Direct: this node dialed a peer that had reached it through a relay (a connection
    /// reversal: the peer is dialable, this node is not).
    Reversed,
}

/// One connection, direct or through a relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConnectionInfo {
    /// The peer.
    pub peer: PeerId,
    /// The remote address.
    pub addr: Multiaddr,
    /// Whether it runs through a relay circuit.
    pub relayed: bool,
    /// Whether this node dialed it (then `addr` is one the peer listens on).
    pub outbound: bool,
    /// How it came to be.
    pub path: Path,
    /// How long it is open, in milliseconds.
    pub open_ms: u64,
    /// For a hole-punched one: milliseconds from the first relayed connection to the peer
    /// (this time) to this direct one.
    pub punched_after_ms: Option<u64>,
}

/// Why a node holds (or seeks) relay reservations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Relaying {
    /// Probes found it private, or it is configured so.
    Private,
    /// Probes decided nothing in [`UNDECIDED_LIMIT`], and relays are known: it reserves rather
    /// than stay unreachable.
    Undecided,
}

/// A snapshot of reachability, reservations and connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NatStatus {
    /// The verdict (or the configured reachability).
    pub reachability: Reach,
    /// Why it reserves on relays, when it does.
    pub relaying: Option<Relaying>,
    /// What the probes found, address by address (`auto` reachability).
    pub probes: ReachStatus,
    /// Whether this node serves as a relay.
    pub relay_server: bool,
    /// Relays holding a reservation for this node, with the circuit addresses they give.
    pub reservations: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Open connections.
    pub connections: Vec<ConnectionInfo>,
    /// Relayed connections turned direct by hole punching, and attempts that failed.
    pub hole_punches: (u64, u64),
}

/// A connection as the node tracks it.
pub(super) struct Conn {
    info: ConnectionInfo,
    since: Instant,
}

/// Relays: those known, the reservations asked for and held.
#[derive(Default)]
struct Relays {
    /// Listen addresses of relays, as identify told them.
    listen: HashMap<PeerId, Vec<Multiaddr>>,
    /// Relays asked for a reservation, by listener.
    pending: HashMap<ListenerId, PeerId>,
    /// Confirmed reservations and their circuit addresses.
    reservations: HashMap<PeerId, Vec<Multiaddr>>,
    /// Relays found in the DHT.
    candidates: Vec<PeerId>,
    searching: bool,
    last_search: Option<Instant>,
}

/// Open connections and how each came to be.
#[derive(Default)]
struct Links {
    open: HashMap<ConnectionId, Conn>,
    /// When the first relayed connection to each peer with one opened: how long hole
    /// punching took is measured from there.
    relayed_since: HashMap<PeerId, Instant>,
    /// Dials that reverse a relayed connection, until they connect or fail.
    reversals: HashSet<ConnectionId>,
    /// Relayed connections turned direct, and attempts that failed.
    punched: u64,
    punch_failed: u64,
}

pub(super) struct Nat {
    config: Arc<Config>,
    me: PeerId,
    reach: Reach,
    /// When the node first connected to anyone: the undecided wait counts from there.
    first_connected: Option<Instant>,
    relaying: Option<Relaying>,
    relays: Relays,
    links: Links,
    last_check: Instant,
    /// Circuits this node relays now (as a relay server).
    circuits: usize,
}

impl Nat {
    pub(super) fn new(config: Arc<Config>, me: PeerId) -> Self {
        let configured = config.nat.reachability;
        Nat {
            config,
            me,
            reach: match configured {
                Reachability::Auto => Reach::Unknown,
                Reachability::Public => Reach::Public,
                Reachability::Private => Reach::Private,
            },
            first_connected: None,
            relaying: (configured == Reachability::Private).then_some(Relaying::Private),
            relays: Relays::default(),
            links: Links::default(),
            last_check: Instant::now() - CHECK_INTERVAL,
            circuits: 0,
        }
    }
}

fn quic(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::QuicV1))
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// The relay a circuit address goes through.
pub(super) fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
    let mut last = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(peer) => last = Some(peer),
            Protocol::P2pCircuit => return last,
            _ => {}
        }
    }
    None
}

impl Nat {
    /// The snapshot `status` shows; `probes` is what the reachability behaviour found.
    pub(super) fn status(&self, probes: ReachStatus) -> NatStatus {
        let mut reservations: Vec<_> = self
            .relays
            .reservations
            .iter()
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        reservations.sort_by_key(|(p, _)| p.to_bytes());
        let mut connections: Vec<ConnectionInfo> = self
            .links
            .open
            .values()
            .map(|c| ConnectionInfo {
                open_ms: u64::try_from(c.since.elapsed().as_millis()).unwrap_or(u64::MAX),
                ..c.info.clone()
            })
            .collect();
        connections.sort_by_key(|c| (c.peer.to_bytes(), c.open_ms));
        NatStatus {
            reachability: self.reach,
            relaying: self.relaying,
            probes,
            relay_server: self.config.relay.enabled,
            reservations,
            connections,
            hole_punches: (self.links.punched, self.links.punch_failed),
        }
    }

    /// A connection opened. `peer`'s card addresses, if its card is known, are where a
    /// reversal may dial; `busy` says whether a peer has a call or request in flight.
    pub(super) fn connection(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        (id, peer, endpoint): (ConnectionId, PeerId, &ConnectedPoint),
        card_addrs: Vec<Multiaddr>,
        busy: impl Fn(&PeerId) -> bool,
    ) {
        let addr = endpoint.get_remote_address().clone();
        let relayed = endpoint.is_relayed();
        let outbound = endpoint.is_dialer();
        self.first_connected.get_or_insert_with(Instant::now);
        if relayed {
            self.links
                .relayed_since
                .entry(peer)
                .or_insert_with(Instant::now);
        }
        let reversed = self.links.reversals.remove(&id);
        let path = match (relayed, outbound) {
            (true, _) => Path::Relayed,
            (false, true) if reversed => Path::Reversed,
            (false, true) => Path::Dialed,
            (false, false) => Path::Accepted,
        };
        self.links.open.insert(
            id,
            Conn {
                info: ConnectionInfo {
                    peer,
                    addr,
                    relayed,
                    outbound,
                    path,
                    open_ms: 0,
                    punched_after_ms: None,
                },
                since: Instant::now(),
            },
        );
        if relayed && !outbound {
            self.reverse(swarm, peer, card_addrs);
        } else if reversed {
            tracing::debug!(%peer, "connection reversed: direct");
            self.close_relayed(swarm, peer, busy);
        }
    }

    /// A peer reached this node through a relay: if it has addresses of its own that are not
    /// circuits (a public node calling one behind NAT), dial it directly. Hole punching cannot
    /// make that connection when this node's NAT maps a port per destination: its dial then
    /// reaches the peer as a plain inbound connection while DCUtR has both ends act as the
    /// listener, and the handshake never completes (netsim: no public-EDM pair was ever
    /// punched).
    fn reverse(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, card_addrs: Vec<Multiaddr>) {
        let mut addrs = card_addrs;
        if let Some(bucket) = swarm.behaviour_mut().kad.kbucket(peer)
            && let Some(entry) = bucket.iter().find(|e| e.node.key.preimage() == &peer)
        {
            addrs.extend(entry.node.value.iter().cloned());
        }
        addrs.retain(|a| !is_relayed(a) && crate::punch::has_transport(a));
        addrs.dedup();
        if addrs.is_empty() {
            return;
        }
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(libp2p::swarm::dial_opts::PeerCondition::NotDialing)
            .build();
        let id = opts.connection_id();
        if swarm.dial(opts).is_ok() {
            if self.links.reversals.len() >= MAX_REVERSALS {
                self.links.reversals.clear();
            }
            self.links.reversals.insert(id);
        }
    }

    /// A dial failed: if it was a reversal, it is over.
    pub(super) fn dial_failed(&mut self, id: ConnectionId) {
        self.links.reversals.remove(&id);
    }

    pub(super) fn connection_closed(&mut self, id: ConnectionId) {
        if let Some(c) = self.links.open.remove(&id) {
            let peer = c.info.peer;
            if !self.links.open.values().any(|c| c.info.peer == peer) {
                self.links.relayed_since.remove(&peer);
            }
        }
    }

    /// The node's verdict changed (or the configured reachability stands): the DHT mode
    /// follows it. Only a verdict turns a node into a DHT client, and a verdict takes
    /// agreeing answers from more than one probe (`crate::reach`).
    fn set_reach(&mut self, swarm: &mut Swarm<Behaviour>, reach: Reach) {
        if self.reach == reach {
            return;
        }
        tracing::info!(?reach, "reachability changed");
        self.reach = reach;
        if self.config.dht.mode == KadMode::Auto {
            // Behind NAT nobody can ask us; answering would only waste others' lookups.
            let mode = match reach {
                Reach::Private => kad::Mode::Client,
                _ => kad::Mode::Server,
            };
            swarm.behaviour_mut().kad.set_mode(Some(mode));
        }
        self.last_check = Instant::now() - CHECK_INTERVAL;
    }

    pub(super) fn on_reach(&mut self, swarm: &mut Swarm<Behaviour>, event: crate::reach::Event) {
        match event {
            crate::reach::Event::Changed(reach) => {
                if self.config.nat.reachability == Reachability::Auto {
                    self.set_reach(swarm, reach);
                }
            }
            crate::reach::Event::Served { client } => {
                tracing::trace!(%client, "answered a reachability probe");
            }
        }
    }

    pub(super) fn on_relay_client(&mut self, event: relay::client::Event) {
        match event {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            } => {
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
                }
                self.relays.reservations.entry(relay_peer_id).or_default();
            }
            relay::client::Event::InboundCircuitEstablished { src_peer_id, .. } => {
                tracing::debug!(peer = %src_peer_id, "inbound relayed connection");
            }
            relay::client::Event::OutboundCircuitEstablished { .. } => {}
        }
    }

    /// As a relay: counts circuits, and says why one was refused (libp2p's status for every
    /// limit is the same "resource limit exceeded").
    pub(super) fn on_relay(&mut self, event: relay::Event) {
        match event {
            relay::Event::CircuitReqAccepted { .. } => self.circuits += 1,
            relay::Event::CircuitClosed { .. } => {
                self.circuits = self.circuits.saturating_sub(1);
            }
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status,
            } => {
                tracing::debug!(
                    src = %src_peer_id,
                    dst = %dst_peer_id,
                    ?status,
                    circuits = self.circuits,
                    max = self.config.relay.max_circuits,
                    "circuit refused"
                );
            }
            _ => {}
        }
    }

    pub(super) fn on_dcutr(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        event: dcutr::Event,
        busy: impl Fn(&PeerId) -> bool,
    ) {
        match event.result {
            Ok(id) => {
                self.links.punched += 1;
                let peer = event.remote_peer_id;
                let after = self.links.relayed_since.get(&peer).map(|t| t.elapsed());
                if let Some(c) = self.links.open.get_mut(&id) {
                    c.info.path = Path::HolePunched;
                    c.info.punched_after_ms =
                        after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                }
                tracing::info!(%peer, ?after, "hole punched: direct connection");
                self.close_relayed(swarm, peer, busy);
            }
            Err(e) => {
                self.links.punch_failed += 1;
                tracing::debug!(peer = %event.remote_peer_id, "hole punching failed: {e}");
            }
        }
    }

    /// Closes the relayed connections to `peer`, which now has a direct one: each holds a
    /// circuit at its relay for as long as it lives (gossip keeps it from going idle), and a
    /// relay's circuits run out (nat-relay-200's four relays refused thousands at 512). Not
    /// while a call or request is in flight: it may be on the relayed connection.
    fn close_relayed(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        busy: impl Fn(&PeerId) -> bool,
    ) {
        if busy(&peer) {
            return;
        }
        let relayed: Vec<ConnectionId> = self
            .links
            .open
            .iter()
            .filter(|(_, c)| c.info.peer == peer && c.info.relayed)
            .map(|(id, _)| *id)
            .collect();
        for id in relayed {
            tracing::debug!(%peer, "closing the relayed connection beside a direct one");
            swarm.close_connection(id);
        }
    }

    /// A listener came up; a circuit address means a reservation is in place. Whether the card
    /// should go out again soon (others must learn the circuit address).
    pub(super) fn new_listen_addr(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        listener: ListenerId,
        addr: &Multiaddr,
    ) -> bool {
        if !is_relayed(addr) {
            // A relay operator, or a node configured as public, declares its listen addresses
            // reachable. libp2p's relay refuses reservations until it has a confirmed
            // external address, and Kademlia puts only external addresses in this node's
            // provider records: a holder answers a record without addresses only if the
            // provider is in its own routing table, so lookups kept missing some providers
            // (netsim, 100 nodes: 13-22 % of lookups found one of a skill's two servers
            // although both records sat at the 20 closest peers).
            if self.config.relay.enabled || self.config.nat.reachability == Reachability::Public {
                swarm.add_external_address(addr.clone());
            }
            return false;
        }
        let relay = self
            .relays
            .pending
            .get(&listener)
            .copied()
            .or_else(|| relay_of(addr));
        if let Some(relay) = relay {
            let addrs = self.relays.reservations.entry(relay).or_default();
            if !addrs.contains(addr) {
                addrs.push(addr.clone());
            }
        }
        relay.is_some()
    }

    /// A listener ended: if it was a reservation, try again later (maybe elsewhere). The relay
    /// whose circuit addresses this node no longer listens on, if it was one.
    pub(super) fn listener_closed(&mut self, listener: ListenerId) -> Option<PeerId> {
        let relay = self.relays.pending.remove(&listener)?;
        tracing::debug!(%relay, "relay reservation ended");
        self.relays.reservations.remove(&relay);
        self.relays.candidates.retain(|c| *c != relay);
        Some(relay)
    }

    pub(super) fn found_relays(&mut self, found: HashSet<PeerId>) {
        self.relays.searching = false;
        let me = self.me;
        for p in found {
            if p != me
                && !self.relays.candidates.contains(&p)
                && self.relays.candidates.len() < MAX_CANDIDATES
            {
                self.relays.candidates.push(p);
            }
        }
    }

    /// A relay's listen addresses, from identify: a QUIC one, where it has one beside the
    /// address a reservation would use, is used instead.
    pub(super) fn identified(&mut self, peer: PeerId, listen: &[Multiaddr]) {
        let is_relay = self.relays.candidates.contains(&peer)
            || self
                .config
                .nat
                .relays
                .iter()
                .any(|a| a.iter().last() == Some(Protocol::P2p(peer)));
        if is_relay {
            self.relays.listen.insert(peer, listen.to_vec());
        }
    }

    /// The address to reserve on `relay` through: QUIC where both sides have it (a
    /// reservation's connection carries every relayed connection to this node, and QUIC is
    /// what hole punching through NATs works best with: one socket, no TCP simultaneous open,
    /// and a dial-back a NAT drops fails in the handshake's 5 s instead of a TCP timeout).
    fn reservation_addr(&self, relay: PeerId, given: Multiaddr, we_quic: bool) -> Multiaddr {
        if !we_quic || quic(&given) {
            return given;
        }
        let ip = given
            .iter()
            .find(|p| matches!(p, Protocol::Ip4(_) | Protocol::Ip6(_)));
        let found = self.relays.listen.get(&relay).and_then(|addrs| {
            addrs
                .iter()
                .find(|a| quic(a) && ip.is_some() && a.iter().next() == ip)
                .cloned()
        });
        match found {
            Some(a) => match a.iter().last() {
                Some(Protocol::P2p(_)) => a,
                _ => a.with(Protocol::P2p(relay)),
            },
            None => given,
        }
    }

    /// Called from housekeeping: keeps reservations while private, or while undecided past
    /// [`UNDECIDED_LIMIT`]; gives them up once public. `listen` is where this node listens.
    /// Whether it wants relays searched for in the DHT ([`Self::found_relays`] answers).
    pub(super) fn check(&mut self, swarm: &mut Swarm<Behaviour>, listen: &[Multiaddr]) -> bool {
        if self.last_check.elapsed() < CHECK_INTERVAL {
            return false;
        }
        self.last_check = Instant::now();
        let undecided_for = self.first_connected.map(|t| t.elapsed());
        let relaying = match self.reach {
            Reach::Private => Some(Relaying::Private),
            Reach::Unknown if undecided_for.is_some_and(|d| d >= UNDECIDED_LIMIT) => {
                Some(Relaying::Undecided)
            }
            _ => None,
        };
        if relaying != self.relaying {
            match relaying {
                Some(Relaying::Undecided) => tracing::info!(
                    "reachability still unknown after {}s: reserving on relays anyway",
                    UNDECIDED_LIMIT.as_secs()
                ),
                Some(Relaying::Private) => tracing::info!("private: reserving on relays"),
                None => {}
            }
            self.relaying = relaying;
        }
        if relaying.is_none() {
            if self.reach == Reach::Public && !self.relays.pending.is_empty() {
                tracing::info!("public: giving up relay reservations");
                for id in self.relays.pending.keys() {
                    swarm.remove_listener(*id);
                }
            }
            return false;
        }
        let want = self.config.nat.max_reservations as usize;
        let mut held: HashSet<PeerId> = self.relays.pending.values().copied().collect();
        if held.len() >= want {
            return false;
        }
        let we_quic = listen.iter().any(quic);
        let me = self.me;
        // Configured relays first, with the addresses given; then those found in the DHT.
        let mut choices: Vec<(PeerId, Multiaddr)> = Vec::new();
        for a in &self.config.nat.relays {
            if let Some(Protocol::P2p(p)) = a.iter().last() {
                choices.push((p, a.clone()));
            }
        }
        // A relay found in the DHT is reserved on through an address it was dialed at; until
        // there is one, dial it (kad knows where it is).
        for p in self.relays.candidates.clone() {
            let dialed = self
                .links
                .open
                .values()
                .find(|c| c.info.peer == p && c.info.outbound && !c.info.relayed)
                .map(|c| c.info.addr.clone());
            match dialed {
                Some(a) => {
                    let a = match a.iter().last() {
                        Some(Protocol::P2p(_)) => a,
                        _ => a.with(Protocol::P2p(p)),
                    };
                    choices.push((p, a));
                }
                None if !held.contains(&p) => {
                    // Even when it dialed us: a reservation needs an address it listens on.
                    let _ = swarm.dial(
                        libp2p::swarm::dial_opts::DialOpts::peer_id(p)
                            .condition(libp2p::swarm::dial_opts::PeerCondition::NotDialing)
                            .build(),
                    );
                }
                None => {}
            }
        }
        for (relay, addr) in choices {
            if held.len() >= want {
                break;
            }
            if relay == me || held.contains(&relay) {
                continue;
            }
            // Where both could use QUIC, wait a moment for the relay's identify to say whether
            // it has it (a connected relay answers within milliseconds).
            let connected_for = self
                .links
                .open
                .values()
                .filter(|c| c.info.peer == relay)
                .map(|c| c.since.elapsed())
                .max();
            if we_quic
                && !self.relays.listen.contains_key(&relay)
                && connected_for.is_some_and(|d| d < IDENTIFY_WAIT)
            {
                continue;
            }
            let addr = self.reservation_addr(relay, addr, we_quic);
            match swarm.listen_on(addr.clone().with(Protocol::P2pCircuit)) {
                Ok(id) => {
                    tracing::debug!(%relay, %addr, "asking for a relay reservation");
                    self.relays.pending.insert(id, relay);
                    held.insert(relay);
                }
                Err(e) => tracing::debug!(%addr, "cannot reserve on relay: {e}"),
            }
        }
        let searched_lately = self
            .relays
            .last_search
            .is_some_and(|t| t.elapsed() < SEARCH_INTERVAL);
        if held.len() < want && !self.relays.searching && !searched_lately {
            self.relays.searching = true;
            self.relays.last_search = Some(Instant::now());
            return true;
        }
        false
    }
}

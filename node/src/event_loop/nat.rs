//! Reachability and relays: AutoNAT's verdicts, reservations on relays for a node others
//! cannot dial, and hole punching (DESIGN §7).
//!
//! A private node reserves slots on up to `nat.max_reservations` relays (the configured ones,
//! else relays found under `skillmesh/relay` in the DHT). Each reservation gives it a circuit
//! address, which goes into its card so others can reach it through the relay; DCUtR then tries
//! to turn each relayed connection into a direct one.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::kad::{self, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId, autonat, dcutr, relay};
use serde::Serialize;
use skillmesh_protocol::keys::relay_key;

use super::{EventLoop, Pending};
use crate::config::{KadMode, Reachability};

/// How often the reservation state is checked.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How long to wait between DHT searches for relays.
const SEARCH_INTERVAL: Duration = Duration::from_secs(30);
/// Failed AutoNAT tests, without one success, before a node counts itself private. AutoNAT v2
/// tests each (address, server) pair once, so with a single server in reach one failure is
/// all the evidence there will be; a later success makes the node public again.
const PRIVATE_AFTER: u32 = 1;
/// Relays remembered from DHT searches.
const MAX_CANDIDATES: usize = 32;

/// What this node knows of its reachability (`status` shows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reach {
    /// No verdict yet.
    Unknown,
    /// Others can dial it.
    Public,
    /// Others cannot dial it: it uses relays.
    Private,
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
}

/// A snapshot of reachability, reservations and connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NatStatus {
    /// The verdict.
    pub reachability: Reach,
    /// Whether this node serves as a relay.
    pub relay_server: bool,
    /// Relays holding a reservation for this node, with the circuit addresses they give.
    pub reservations: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Open connections.
    pub connections: Vec<ConnectionInfo>,
    /// Relayed connections turned direct by hole punching, and attempts that failed.
    pub hole_punches: (u64, u64),
}

pub(super) struct Nat {
    reach: Reach,
    failures: u32,
    /// Relays asked for a reservation, by listener.
    pending: HashMap<ListenerId, PeerId>,
    /// Confirmed reservations and their circuit addresses.
    reservations: HashMap<PeerId, Vec<Multiaddr>>,
    candidates: Vec<PeerId>,
    searching: bool,
    last_search: Option<Instant>,
    last_check: Instant,
    connections: HashMap<ConnectionId, ConnectionInfo>,
    punched: u64,
    punch_failed: u64,
    /// Circuits this node relays now (as a relay server).
    circuits: usize,
}

impl Nat {
    pub(super) fn new(configured: Reachability) -> Self {
        Nat {
            reach: match configured {
                Reachability::Auto => Reach::Unknown,
                Reachability::Public => Reach::Public,
                Reachability::Private => Reach::Private,
            },
            failures: 0,
            pending: HashMap::new(),
            reservations: HashMap::new(),
            candidates: Vec::new(),
            searching: false,
            last_search: None,
            last_check: Instant::now() - CHECK_INTERVAL,
            connections: HashMap::new(),
            punched: 0,
            punch_failed: 0,
            circuits: 0,
        }
    }
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// The relay a circuit address goes through.
fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
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

impl EventLoop {
    pub(super) fn nat_status(&self) -> NatStatus {
        let mut reservations: Vec<_> = self
            .nat
            .reservations
            .iter()
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        reservations.sort_by_key(|(p, _)| p.to_bytes());
        let mut connections: Vec<_> = self.nat.connections.values().cloned().collect();
        connections.sort_by_key(|c| c.peer.to_bytes());
        NatStatus {
            reachability: self.nat.reach,
            relay_server: self.config.relay.enabled,
            reservations,
            connections,
            hole_punches: (self.nat.punched, self.nat.punch_failed),
        }
    }

    pub(super) fn nat_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        endpoint: &ConnectedPoint,
    ) {
        let addr = endpoint.get_remote_address().clone();
        let relayed = endpoint.is_relayed();
        let outbound = endpoint.is_dialer();
        self.nat.connections.insert(
            id,
            ConnectionInfo {
                peer,
                addr,
                relayed,
                outbound,
            },
        );
    }

    pub(super) fn nat_connection_closed(&mut self, id: ConnectionId) {
        self.nat.connections.remove(&id);
    }

    fn set_reach(&mut self, reach: Reach) {
        if self.nat.reach == reach {
            return;
        }
        tracing::info!(?reach, "reachability changed");
        self.nat.reach = reach;
        if self.config.dht.mode == KadMode::Auto {
            // Behind NAT nobody can ask us; answering would only waste others' lookups.
            let mode = match reach {
                Reach::Private => kad::Mode::Client,
                _ => kad::Mode::Server,
            };
            self.swarm.behaviour_mut().kad.set_mode(Some(mode));
        }
        self.nat.last_check = Instant::now() - CHECK_INTERVAL;
    }

    pub(super) fn on_autonat(&mut self, event: autonat::v2::client::Event) {
        match event.result {
            Ok(()) => {
                tracing::debug!(addr = %event.tested_addr, server = %event.server, "reachable");
                self.nat.failures = 0;
                self.set_reach(Reach::Public);
            }
            Err(e) => {
                tracing::debug!(addr = %event.tested_addr, server = %event.server, "not reachable: {e}");
                self.nat.failures += 1;
                if self.nat.failures >= PRIVATE_AFTER && self.nat.reach != Reach::Public {
                    self.set_reach(Reach::Private);
                }
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
                self.nat.reservations.entry(relay_peer_id).or_default();
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
            relay::Event::CircuitReqAccepted { .. } => self.nat.circuits += 1,
            relay::Event::CircuitClosed { .. } => {
                self.nat.circuits = self.nat.circuits.saturating_sub(1);
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
                    circuits = self.nat.circuits,
                    max = self.config.relay.max_circuits,
                    "circuit refused"
                );
            }
            _ => {}
        }
    }

    pub(super) fn on_dcutr(&mut self, event: dcutr::Event) {
        match event.result {
            Ok(_) => {
                self.nat.punched += 1;
                let peer = event.remote_peer_id;
                tracing::info!(%peer, "hole punched: direct connection");
                self.close_relayed(peer);
            }
            Err(e) => {
                self.nat.punch_failed += 1;
                tracing::debug!(peer = %event.remote_peer_id, "hole punching failed: {e}");
            }
        }
    }

    /// Closes the relayed connections to `peer`, which now has a direct one: each holds a
    /// circuit at its relay for as long as it lives (gossip keeps it from going idle), and a
    /// relay's circuits run out (nat-relay-200's four relays refused thousands at 512). Not
    /// while a call or request is in flight: it may be on the relayed connection.
    fn close_relayed(&mut self, peer: PeerId) {
        if self.activity.busy().contains(&peer) || self.requests.values().any(|r| r.peer == peer) {
            return;
        }
        let relayed: Vec<ConnectionId> = self
            .nat
            .connections
            .iter()
            .filter(|(_, c)| c.peer == peer && c.relayed)
            .map(|(id, _)| *id)
            .collect();
        for id in relayed {
            tracing::debug!(%peer, "closing the relayed connection beside a direct one");
            self.swarm.close_connection(id);
        }
    }

    /// A listener came up; a circuit address means a reservation is in place.
    pub(super) fn nat_new_listen_addr(&mut self, listener: ListenerId, addr: &Multiaddr) {
        if !is_relayed(addr) {
            // A relay operator, or a node configured as public, declares its listen addresses
            // reachable. libp2p's relay refuses reservations until it has a confirmed
            // external address, and Kademlia puts only external addresses in this node's
            // provider records: a holder answers a record without addresses only if the
            // provider is in its own routing table, so lookups kept missing some providers
            // (netsim, 100 nodes: 13-22 % of lookups found one of a skill's two servers
            // although both records sat at the 20 closest peers).
            if self.config.relay.enabled || self.config.nat.reachability == Reachability::Public {
                self.swarm.add_external_address(addr.clone());
            }
            return;
        }
        let relay = self
            .nat
            .pending
            .get(&listener)
            .copied()
            .or_else(|| relay_of(addr));
        if let Some(relay) = relay {
            let addrs = self.nat.reservations.entry(relay).or_default();
            if !addrs.contains(addr) {
                addrs.push(addr.clone());
            }
            // Others must learn the circuit address: a new card soon.
            let soon = Instant::now() + Duration::from_millis(200);
            self.republish_due = Some(self.republish_due.map_or(soon, |t| t.min(soon)));
        }
    }

    /// A listener ended: if it was a reservation, try again later (maybe elsewhere).
    pub(super) fn nat_listener_closed(&mut self, listener: ListenerId) {
        if let Some(relay) = self.nat.pending.remove(&listener) {
            tracing::debug!(%relay, "relay reservation ended");
            self.nat.reservations.remove(&relay);
            self.listen_addrs.retain(|a| relay_of(a) != Some(relay));
            self.nat.candidates.retain(|c| *c != relay);
        }
    }

    pub(super) fn nat_found_relays(&mut self, found: HashSet<PeerId>) {
        self.nat.searching = false;
        let me = self.signing.peer_id();
        for p in found {
            if p != me
                && !self.nat.candidates.contains(&p)
                && self.nat.candidates.len() < MAX_CANDIDATES
            {
                self.nat.candidates.push(p);
            }
        }
    }

    /// Called from housekeeping: keeps reservations while private.
    pub(super) fn nat_check(&mut self) {
        if self.nat.last_check.elapsed() < CHECK_INTERVAL {
            return;
        }
        self.nat.last_check = Instant::now();
        if self.nat.reach != Reach::Private {
            return;
        }
        let want = self.config.nat.max_reservations as usize;
        let mut held: HashSet<PeerId> = self.nat.pending.values().copied().collect();
        if held.len() >= want {
            return;
        }
        let me = self.signing.peer_id();
        // Configured relays first, with the addresses given; then those found in the DHT.
        let mut choices: Vec<(PeerId, Multiaddr)> = Vec::new();
        for a in &self.config.nat.relays {
            if let Some(Protocol::P2p(p)) = a.iter().last() {
                choices.push((p, a.clone()));
            }
        }
        // A relay found in the DHT is reserved on through an address it was dialed at; until
        // there is one, dial it (kad knows where it is).
        for p in self.nat.candidates.clone() {
            let dialed = self
                .nat
                .connections
                .values()
                .find(|c| c.peer == p && c.outbound && !c.relayed)
                .map(|c| c.addr.clone());
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
                    let _ = self.swarm.dial(
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
            match self
                .swarm
                .listen_on(addr.clone().with(Protocol::P2pCircuit))
            {
                Ok(id) => {
                    tracing::debug!(%relay, "asking for a relay reservation");
                    self.nat.pending.insert(id, relay);
                    held.insert(relay);
                }
                Err(e) => tracing::debug!(%addr, "cannot reserve on relay: {e}"),
            }
        }
        let searched_lately = self
            .nat
            .last_search
            .is_some_and(|t| t.elapsed() < SEARCH_INTERVAL);
        if held.len() < want && !self.nat.searching && !searched_lately {
            self.nat.searching = true;
            self.nat.last_search = Some(Instant::now());
            let id = self
                .swarm
                .behaviour_mut()
                .kad
                .get_providers(RecordKey::new(&relay_key()));
            self.queries.insert(id, Pending::Relays(HashSet::new()));
        }
    }
}

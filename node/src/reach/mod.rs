//! Reachability: whether others can dial this node, found out by asking peers to dial it back
//! (AutoNAT v2), and the room those dial-backs need under the per-peer connection limit.
//!
//! [`Behaviour`] is the AutoNAT v2 client of our own (`handler.rs`, `messages.rs`) and
//! libp2p's AutoNAT v2 server, so every node both asks and answers. Our own client because
//! the node needs what libp2p's does not give: a probe that could not be made is told apart
//! from an address that could not be reached, an address is asked about again (by another
//! server, and again later), and a verdict takes more than one answer (`verdict.rs`).
//!
//! A dial-back is a new connection between two peers that usually have one already, so it
//! would count against `network.max_per_peer` on both sides; one refused was enough to make a
//! public node private. This behaviour enforces that limit itself and lets a dial-back in
//! above it: on the client, an inbound connection from a server with a probe of ours in
//! flight; on the server, the connection its own dial-back made. The dial-back's connection
//! is closed when its probe is done, if the peer is still above the limit. docs/reachability.md says how
//! the verdict drives the rest of the node.

mod handler;
mod messages;
mod verdict;

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use either::Either;
use futures::FutureExt;
use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::ConnectionEstablished;
use libp2p::swarm::handler::ConnectionHandlerSelect;
use libp2p::swarm::{
    CloseConnection, ConnectionClosed, ConnectionDenied, ConnectionHandler, ConnectionId,
    FromSwarm, ListenError, ListenFailure, NetworkBehaviour, NewExternalAddrCandidate,
    NotifyHandler, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, autonat};
use serde::Serialize;

pub use verdict::{AddrReach, Reach};

use handler::{Answer, FromBehaviour, ToBehaviour};
use verdict::{Change, Verdicts};

/// Probes in flight at once, over all servers (one per server).
const MAX_PROBES: usize = 4;
/// How often due probes are looked for.
const TICK: Duration = Duration::from_secs(1);
/// A connection let in above the per-peer limit for a probe is closed this long after at the
/// latest, if its peer is still above the limit.
const EXTRA_FOR: Duration = Duration::from_secs(30);

/// The per-peer connection limit refused a connection.
#[derive(Debug, thiserror::Error)]
#[error("at most {0} connections to one peer are allowed (network.max_per_peer)")]
pub(crate) struct PerPeerLimit(u32);

/// What probes have said so far (`status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Probes {
    /// Probes sent.
    pub sent: u64,
    /// Answers: a server reached this node.
    pub reached: u64,
    /// Answers: a server could not connect.
    pub not_reached: u64,
    /// Probes that could not be made or said nothing.
    pub inconclusive: u64,
    /// Why the last inconclusive one was.
    pub last_inconclusive: Option<String>,
    /// AutoNAT servers connected now.
    pub servers: usize,
}

/// Reachability as probes found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReachStatus {
    /// The node's verdict.
    pub reach: Reach,
    /// Each address probed, with its state.
    pub addrs: Vec<AddrReach>,
    /// The probes.
    pub probes: Probes,
}

/// What the behaviour tells the node.
#[derive(Debug)]
pub(crate) enum Event {
    /// The verdict changed.
    Changed(Reach),
    /// This node answered a peer's probe.
    Served {
        /// The peer.
        client: PeerId,
    },
}

/// A connection let in above the per-peer limit.
struct Extra {
    peer: PeerId,
    since: Instant,
    kind: ExtraKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ExtraKind {
    /// Came in from a server while our probe was in flight: maybe its dial-back.
    Inbound,
    /// A server's dial-back came on it: closed once our probe is answered.
    TheirDialBack,
    /// Our server's dial-back: closed once we have answered the probe.
    OurDialBack,
}

struct Probe {
    server: PeerId,
    connection: ConnectionId,
    addr: Multiaddr,
    /// The server's nonce arrived on a connection it dialed.
    dialed_back: bool,
    /// This node refused an inbound connection while the probe was in flight: perhaps the
    /// dial-back.
    refused_here: bool,
}

/// AutoNAT v2 client and server, and the per-peer connection limit.
pub(crate) struct Behaviour {
    /// Whether this node probes (reachability `auto`); it always serves.
    probing: bool,
    server: autonat::v2::server::Behaviour,
    verdicts: Verdicts,
    reach: Reach,
    /// How often a decided address is checked again.
    recheck: Duration,
    /// Connections to peers that serve AutoNAT v2.
    servers: HashMap<PeerId, Vec<ConnectionId>>,
    probes: HashMap<u64, Probe>,
    stats: Probes,
    max_per_peer: u32,
    /// Open connections per peer, and whether each is relayed.
    established: HashMap<PeerId, Vec<(ConnectionId, bool)>>,
    /// Connections let in above the per-peer limit.
    extra: HashMap<ConnectionId, Extra>,
    /// The server's dial-backs while they are being dialed.
    dialing_back: HashMap<ConnectionId, Instant>,
    tick: Pin<Box<tokio::time::Sleep>>,
    events: VecDeque<ToSwarm<Event, THandlerInEvent<Self>>>,
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

impl Behaviour {
    pub(crate) fn new(probing: bool, recheck: Duration, max_per_peer: u32) -> Self {
        Behaviour {
            probing,
            server: autonat::v2::server::Behaviour::default(),
            verdicts: Verdicts::default(),
            reach: Reach::Unknown,
            recheck,
            servers: HashMap::new(),
            probes: HashMap::new(),
            stats: Probes::default(),
            max_per_peer,
            established: HashMap::new(),
            extra: HashMap::new(),
            dialing_back: HashMap::new(),
            tick: Box::pin(tokio::time::sleep(TICK)),
            events: VecDeque::new(),
        }
    }

    /// Reachability as probes found it.
    pub(crate) fn status(&self) -> ReachStatus {
        ReachStatus {
            reach: self.reach,
            addrs: self.verdicts.addrs(),
            probes: Probes {
                servers: self.servers.len(),
                ..self.stats.clone()
            },
        }
    }

    fn over_limit(&self, peer: &PeerId) -> bool {
        self.established.get(peer).map_or(0, Vec::len) >= self.max_per_peer as usize
    }

    /// Closes the dial-back connections of `kind` to `peer` (all of them, or those older than
    /// [`EXTRA_FOR`]) while the peer is above the limit, and forgets the rest of its extra
    /// connections that are done with: a connection that merely came in during a probe stays.
    fn close_extra(&mut self, peer: PeerId, kind: ExtraKind, all: bool) {
        let now = Instant::now();
        let mut ids: Vec<(ConnectionId, ExtraKind)> = self
            .extra
            .iter()
            .filter(|(_, e)| {
                e.peer == peer
                    && (all || now.duration_since(e.since) >= EXTRA_FOR)
                    && (e.kind == kind
                        || (kind == ExtraKind::TheirDialBack && e.kind == ExtraKind::Inbound))
            })
            .map(|(id, e)| (*id, e.kind))
            .collect();
        ids.sort_unstable_by_key(|(id, _)| *id);
        let mut count = self.established.get(&peer).map_or(0, Vec::len);
        for (id, k) in ids.into_iter().rev() {
            self.extra.remove(&id);
            if k != ExtraKind::Inbound && count > self.max_per_peer as usize {
                count -= 1;
                self.events.push_back(ToSwarm::CloseConnection {
                    peer_id: peer,
                    connection: CloseConnection::One(id),
                });
            }
        }
    }

    /// Sends the probes that are due.
    fn issue(&mut self) {
        if !self.probing || self.servers.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut busy: HashSet<PeerId> = self.probes.values().map(|p| p.server).collect();
        for due in self.verdicts.due(now, self.recheck) {
            for _ in 0..due.probes {
                if self.probes.len() >= MAX_PROBES {
                    return;
                }
                let free = |p: &&PeerId| !busy.contains(*p) && !due.busy.contains(*p);
                let fresh: Vec<&PeerId> = self
                    .servers
                    .keys()
                    .filter(free)
                    .filter(|p| !due.avoid.contains(*p))
                    .collect();
                let pool: Vec<&PeerId> = if fresh.is_empty() {
                    self.servers.keys().filter(free).collect()
                } else {
                    fresh
                };
                if pool.is_empty() {
                    break;
                }
                let server = *pool[rand::random_range(0..pool.len())];
                // Not over a connection let in for a probe: it closes when that probe is done.
                let Some(&connection) = self
                    .servers
                    .get(&server)
                    .and_then(|c| c.iter().find(|id| !self.extra.contains_key(id)))
                else {
                    break;
                };
                let nonce: u64 = rand::random();
                tracing::debug!(addr = %due.addr, %server, "probing reachability");
                self.events.push_back(ToSwarm::NotifyHandler {
                    peer_id: server,
                    handler: NotifyHandler::One(connection),
                    event: Either::Left(FromBehaviour::Probe {
                        nonce,
                        addr: due.addr.clone(),
                    }),
                });
                self.probes.insert(
                    nonce,
                    Probe {
                        server,
                        connection,
                        addr: due.addr.clone(),
                        dialed_back: false,
                        refused_here: false,
                    },
                );
                self.verdicts.started(&due.addr, server);
                self.stats.sent += 1;
                busy.insert(server);
            }
        }
    }

    fn answered(&mut self, nonce: u64, answer: Answer) {
        let Some(probe) = self.probes.remove(&nonce) else {
            return;
        };
        let result = match answer {
            Answer::Reached if probe.dialed_back => Ok(true),
            Answer::Reached => {
                Err("the server says it reached us, but no dial-back arrived".into())
            }
            Answer::NotReached if probe.refused_here => {
                Err("this node refused an inbound connection during the probe".into())
            }
            Answer::NotReached => Ok(false),
            Answer::Inconclusive(why) => Err(why),
        };
        match &result {
            Ok(true) => self.stats.reached += 1,
            Ok(false) => self.stats.not_reached += 1,
            Err(why) => {
                self.stats.inconclusive += 1;
                self.stats.last_inconclusive = Some(why.clone());
            }
        }
        tracing::debug!(addr = %probe.addr, server = %probe.server, ?result, "probe answered");
        let change = self.verdicts.record(
            &probe.addr,
            probe.server,
            result.ok(),
            self.servers.len(),
            Instant::now(),
        );
        match change {
            Some(Change::Confirmed(a)) => self.events.push_back(ToSwarm::ExternalAddrConfirmed(a)),
            Some(Change::Expired(a)) => self.events.push_back(ToSwarm::ExternalAddrExpired(a)),
            None => {}
        }
        let reach = self.verdicts.reach();
        if reach != self.reach {
            self.reach = reach;
            self.events
                .push_back(ToSwarm::GenerateEvent(Event::Changed(reach)));
        }
        self.close_extra(probe.server, ExtraKind::TheirDialBack, true);
        // The next probe of an undecided address goes at once.
        self.tick.as_mut().reset(tokio::time::Instant::now());
    }

    /// Lets a connection in, or refuses it for the per-peer limit. `dial_back`: it is a probe's
    /// dial-back, which may go above the limit for as long as the probe lasts. A direct
    /// connection to a peer reached only through relays is let in too: it is what hole
    /// punching makes, and the relayed ones close once it is there (`event_loop/nat.rs`).
    fn admit(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        dial_back: bool,
        relayed: bool,
    ) -> Result<(), ConnectionDenied> {
        if !self.over_limit(&peer) {
            return Ok(());
        }
        if dial_back {
            self.extra.insert(
                id,
                Extra {
                    peer,
                    since: Instant::now(),
                    kind: ExtraKind::Inbound,
                },
            );
            return Ok(());
        }
        let only_relayed = self
            .established
            .get(&peer)
            .is_some_and(|c| c.iter().all(|(_, r)| *r));
        if !relayed && only_relayed {
            return Ok(());
        }
        Err(ConnectionDenied::new(PerPeerLimit(self.max_per_peer)))
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler =
        ConnectionHandlerSelect<handler::Handler, THandler<autonat::v2::server::Behaviour>>;
    type ToSwarm = Event;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.server
            .handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        // From a server we asked to dial us back: likely that dial-back.
        let probing_us = self.probes.values().any(|p| p.server == peer);
        self.admit(id, peer, probing_us, is_relayed(remote))?;
        let server = self
            .server
            .handle_established_inbound_connection(id, peer, local, remote)?;
        Ok(handler::Handler::new().select(server))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addrs: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.server
            .handle_pending_outbound_connection(id, peer, addrs, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let dial_back = self.dialing_back.remove(&id).is_some();
        self.admit(id, peer, dial_back, is_relayed(addr))?;
        if dial_back && let Some(e) = self.extra.get_mut(&id) {
            e.kind = ExtraKind::OurDialBack;
        }
        // libp2p's server answers probes only on connections the client dialed, so a node
        // that had only been dialed by its peers could never probe (the README walkthrough's
        // first node, when the second dialed it twice: undecided for a minute, until those
        // connections closed). We answer on the connections we dialed too; there the address
        // we dialed is the one the client is seen at. Our own dial-backs keep their handler.
        let server = if dial_back {
            self.server
                .handle_established_outbound_connection(id, peer, addr, role, port_use)?
        } else {
            self.server
                .handle_established_inbound_connection(id, peer, addr, addr)?
        };
        Ok(handler::Handler::new().select(server))
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match event {
            FromSwarm::NewExternalAddrCandidate(NewExternalAddrCandidate { addr })
                if self.probing && crate::punch::has_transport(addr) =>
            {
                self.verdicts.seen(addr, Instant::now());
            }
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            }) => {
                self.established
                    .entry(peer_id)
                    .or_default()
                    .push((connection_id, endpoint.is_relayed()));
            }
            FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id,
                connection_id,
                ..
            }) => {
                if let Some(c) = self.established.get_mut(&peer_id) {
                    c.retain(|(id, _)| *id != connection_id);
                    if c.is_empty() {
                        self.established.remove(&peer_id);
                    }
                }
                self.extra.remove(&connection_id);
                if let Some(c) = self.servers.get_mut(&peer_id) {
                    c.retain(|id| *id != connection_id);
                    if c.is_empty() {
                        self.servers.remove(&peer_id);
                    }
                }
                let lost: Vec<u64> = self
                    .probes
                    .iter()
                    .filter(|(_, p)| p.connection == connection_id)
                    .map(|(n, _)| *n)
                    .collect();
                for nonce in lost {
                    self.answered(
                        nonce,
                        Answer::Inconclusive("the connection to the server closed".into()),
                    );
                }
                if !self.servers.contains_key(&peer_id) {
                    self.verdicts.server_gone(peer_id);
                }
            }
            FromSwarm::ListenFailure(ListenFailure {
                error: ListenError::Denied { .. },
                peer_id,
                ..
            }) => {
                for p in self.probes.values_mut() {
                    if peer_id.is_none_or(|peer| peer == p.server) {
                        p.refused_here = true;
                    }
                }
            }
            _ => {}
        }
        self.server.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {
            Either::Left(ToBehaviour::Server(true)) => {
                let c = self.servers.entry(peer).or_default();
                if !c.contains(&connection) {
                    c.push(connection);
                }
                self.tick.as_mut().reset(tokio::time::Instant::now());
            }
            Either::Left(ToBehaviour::Server(false)) => {
                if let Some(c) = self.servers.get_mut(&peer) {
                    c.retain(|id| *id != connection);
                    if c.is_empty() {
                        self.servers.remove(&peer);
                    }
                }
            }
            Either::Left(ToBehaviour::Answer { nonce, answer }) => {
                if self.probes.get(&nonce).is_some_and(|p| p.server == peer) {
                    self.answered(nonce, answer);
                }
            }
            Either::Left(ToBehaviour::DialBack { nonce }) => {
                if let Some(e) = self.extra.get_mut(&connection) {
                    e.kind = ExtraKind::TheirDialBack;
                }
                match self.probes.get_mut(&nonce) {
                    Some(p) if p.server == peer => p.dialed_back = true,
                    _ => tracing::debug!(%peer, "a dial-back with a nonce of no probe of ours"),
                }
            }
            Either::Right(e) => self.server.on_connection_handler_event(peer, connection, e),
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Poll::Ready(e);
            }
            if let Poll::Ready(e) = self.server.poll(cx) {
                match &e {
                    ToSwarm::Dial { opts } => {
                        self.dialing_back
                            .insert(opts.connection_id(), Instant::now());
                    }
                    ToSwarm::GenerateEvent(served) => {
                        tracing::debug!(
                            client = %served.client,
                            addr = %served.tested_addr,
                            result = ?served.result,
                            "answered a reachability probe"
                        );
                        self.close_extra(served.client, ExtraKind::OurDialBack, true);
                    }
                    _ => {}
                }
                return Poll::Ready(e.map_in(Either::Right).map_out(|served| Event::Served {
                    client: served.client,
                }));
            }
            if self.tick.poll_unpin(cx).is_ready() {
                self.tick.as_mut().reset(tokio::time::Instant::now() + TICK);
                self.issue();
                let now = Instant::now();
                self.dialing_back
                    .retain(|_, t| now.duration_since(*t) < EXTRA_FOR);
                let stale: HashSet<PeerId> = self
                    .extra
                    .values()
                    .filter(|e| now.duration_since(e.since) >= EXTRA_FOR)
                    .map(|e| e.peer)
                    .collect();
                for peer in stale {
                    self.close_extra(peer, ExtraKind::TheirDialBack, false);
                    self.close_extra(peer, ExtraKind::OurDialBack, false);
                }
                continue;
            }
            return Poll::Pending;
        }
    }
}

//! The event loop: the one task that owns the libp2p Swarm (STYLE 1).
//!
//! Everything else talks to it through [`Command`]s carrying a oneshot reply. Pending work sits
//! in maps keyed by kad query ids and request ids. Skill calls do not pass through here: they
//! ride call pipes ([`crate::pipe`]), streams between the calling task and the connection; the
//! loop only connects to a callee first. Inbound mailbox requests run in their own tasks and
//! their answers come back on a bounded channel to be sent on the swarm.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::futures::StreamExt;
use libp2p::gossipsub;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{
    self, GetClosestPeersOk, GetProvidersOk, GetRecordOk, QueryId, QueryResult, RecordKey,
};
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{DialError, ListenError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, mdns};
use skillmesh_protocol::envelope::{self, Checks};
use skillmesh_protocol::keys::{KAD_PROTOCOL, card_key, mailbox_key, relay_key};
use skillmesh_protocol::{AgentCard, PrekeyBundle, SigningKey, Timestamp};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::config::Config;
use crate::discovery::{CardExtras, build_card, provider_keys, verify_card_record};
use crate::error::{Error, Result};
use crate::events::{Delivered, PeerInfo};
use crate::mail::service::MailService;
use crate::metrics::NodeMetrics;
use crate::pipe::Activity;
use crate::skills::{self, Registry};

mod nat;
mod topics;
pub use nat::{ConnectionInfo, NatStatus, Path, Reach, Relaying};
use topics::Topics;

/// An answer to an inbound mailbox request, ready to send.
struct Response {
    peer: PeerId,
    channel: ResponseChannel<Vec<u8>>,
    response: Vec<u8>,
}

/// Commands waiting for the loop; senders wait (backpressure) when it is full.
pub(crate) const COMMAND_BUFFER: usize = 1024;
/// Answers of inbound mailbox requests waiting to be sent.
const RESPONSE_BUFFER: usize = 1024;
/// Providers one lookup collects before it stops.
pub(crate) const MAX_PROVIDERS_PER_LOOKUP: usize = 20;
/// Addresses taken from a provider record, per provider, at most.
const ADDRS_PER_PROVIDER: usize = 8;
/// Answers with providers a lookup waits for before it stops. Providers are stored at the
/// peers nearest to the key as each provider's own walk saw them, and those walks do not all
/// end at the same 20 peers: on a loaded 1,000-node netsim run, stopping at two answers missed
/// one of a skill's three servers in 6 % of lookups, though every server's announcements had
/// been stored. The walk's own end waits for all 20 nearest to answer, which took most of a
/// lookup's second at 200 nodes and over 30 s on a loaded 1,000. At four answers, with every
/// card fetched, 0-4 of 300 lookups there still missed a server in three runs (2026-12-03):
/// each time the DHT's answers had named only two of three, a server whose announcement walk,
/// run under load, had stored its record at few of the key's true nearest peers. A fourth run
/// missed 5, though every record of the missed servers went to all 20 peers their walks found:
/// those were not the 20 the lookups met first. Eight answers were tried and not kept: one
/// miss, but lookups took 18 s at p50 instead of 1.5 (answers with providers thin out past the
/// nearest few), 30 DHT requests instead of 16, and 6 timed out.
const PROVIDER_ANSWERS: u8 = 4;
/// Connections a dial refused by our own cap may close to make room: while it waits for a
/// close, others' connections may take the room (a node at its cap is one many dial).
const ROOM_ATTEMPTS: u8 = 3;
/// How long shutdown waits for calls in flight to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The first wait before announcements that reached nobody go out again; it doubles up to
/// `dht.republish_interval`.
const PUBLISH_RETRY: Duration = Duration::from_secs(30);
/// How often the connection count is checked against the watermarks.
const TRIM_INTERVAL: Duration = Duration::from_secs(2);
/// How often a node with some connections, but fewer than a gossip mesh's worth, dials more.
const TOP_UP_SPACING: Duration = Duration::from_secs(60);
/// How soon a node with no connection at all tries again.
const RECONNECT_SPACING: Duration = Duration::from_secs(5);
/// How long a node without bootstrap peers waits after meeting its first peer before it walks
/// the DHT: the call or request it connected for goes first, and more peers may arrive
/// (libp2p-kad's own automatic walk waits 500 ms for the same reasons).
const JOIN_DELAY: Duration = Duration::from_millis(500);

/// A request to the event loop.
pub(crate) enum Command {
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<()>>,
    },
    AddAddresses {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    Republish {
        reply: Option<oneshot::Sender<PublishReport>>,
    },
    FindProviders {
        key: RecordKey,
        /// Counted in the lookup metrics: a skill or tag lookup, not the node's own upkeep.
        counted: bool,
        /// Each provider with the addresses the answers gave for it.
        reply: oneshot::Sender<Vec<(PeerId, Vec<Multiaddr>)>>,
    },
    GetCard {
        peer: PeerId,
        /// Where the card request may dial, besides the addresses the node knows: hints from
        /// a provider lookup, used for this request only (a third party gave them).
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Option<(AgentCard, Vec<u8>)>>,
    },
    /// Replies once connected to `peer`, looking it up in the DHT if its known addresses fail.
    Connect {
        peer: PeerId,
        reply: oneshot::Sender<Result<()>>,
    },
    Mailbox {
        peer: PeerId,
        request: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>>>,
    },
    /// New prekeys or mailboxes for this node's card; republished shortly after.
    SetCard {
        prekeys: Option<PrekeyBundle>,
        mailboxes: Option<Vec<PeerId>>,
    },
    Subscribe {
        topic: String,
        reply: oneshot::Sender<Result<broadcast::Receiver<Delivered>>>,
    },
    Publish {
        topic: String,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<()>>,
    },
    Subscribers {
        topic: String,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    WaitConnected {
        reply: oneshot::Sender<()>,
    },
    NatStatus {
        reply: oneshot::Sender<NatStatus>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// How a (re)publication of this node's card and provider records went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Whether at least one other peer stored the card.
    pub card_replicated: bool,
    /// Provider keys (skills and tags) announced.
    pub keys: usize,
    /// Of those, how many reached most of the closest peers their walk found
    /// ([`provider_placed`]).
    pub keys_replicated: usize,
}

impl PublishReport {
    /// Whether the card reached another peer and every key most of its closest peers.
    pub fn complete(&self) -> bool {
        self.card_replicated && self.keys_replicated == self.keys
    }
}

/// Whether a provider record went where lookups will look: its walk ended (one that timed out
/// may not have reached the key's nearest peers), and at least three in four of the closest
/// peers it found were sent the record (vendor/libp2p-kad, `AddProviderOk::sent`). A lookup
/// stops after [`PROVIDER_ANSWERS`] answers from peers near the key, so a record held by a
/// quarter of them is missed by one lookup in three; by three quarters, by one in 250.
fn provider_placed(r: &kad::AddProviderResult) -> bool {
    match r {
        Ok(ok) => {
            // Its own target, to watch placement in a large netsim run without the rest.
            tracing::debug!(
                target: "skillmesh::announce",
                peers = ok.peers,
                sent = ok.sent,
                "provider record sent"
            );
            ok.sent >= 1 && ok.sent * 4 >= ok.peers * 3
        }
        Err(_) => false,
    }
}

/// Why a dial failed, in words. libp2p says only "Dial error" when one of our own behaviours
/// refused it; the refusal itself (which limit) is in its source.
fn dial_error(e: &DialError) -> String {
    match e {
        DialError::Denied { cause } => match std::error::Error::source(cause) {
            Some(why) => format!("refused by this node: {why}"),
            None => format!("refused by this node: {cause}"),
        },
        other => other.to_string(),
    }
}

/// Whether two cards say the same, apart from their sequence number and lifetime.
fn same_content(a: &AgentCard, b: &AgentCard) -> bool {
    a.name == b.name
        && a.skills == b.skills
        && a.addrs == b.addrs
        && a.mailboxes == b.mailboxes
        && a.prekeys == b.prekeys
}

/// Where a card lookup's answer goes: the verified card and its signed bytes.
type CardReply = oneshot::Sender<Option<(AgentCard, Vec<u8>)>>;

/// `bytes` as `peer`'s card, if they are a valid card envelope signed by it and about it.
fn card_of(peer: PeerId, bytes: Vec<u8>) -> Option<(AgentCard, Vec<u8>)> {
    let opened = envelope::open::<AgentCard>(&bytes, &Checks::now().signed_by(peer)).ok()?;
    (opened.value.peer_id == peer).then_some((opened.value, bytes))
}

/// A mailbox request on its way.
struct PendingRequest {
    peer: PeerId,
    request: Vec<u8>,
    reply: oneshot::Sender<Result<Vec<u8>>>,
    looked_up: bool,
}

/// Calls waiting for a connection to their callee.
struct Connecting {
    waiters: Vec<oneshot::Sender<Result<()>>>,
    /// Whether the DHT was asked already: a second failure is final.
    looked_up: bool,
    /// Connections closed to make room for this one so far.
    rooms_made: u8,
}

struct PublishGroup {
    remaining: usize,
    report: PublishReport,
    reply: Option<oneshot::Sender<PublishReport>>,
}

enum Pending {
    /// Providers found so far, how many answers carried some, and whether the lookup counts
    /// in the metrics.
    Providers(
        HashMap<PeerId, Vec<Multiaddr>>,
        u8,
        bool,
        oneshot::Sender<Vec<(PeerId, Vec<Multiaddr>)>>,
    ),
    Card(PeerId, Option<Box<(AgentCard, Vec<u8>)>>, CardReply),
    /// Where the peer is, then requests to retry (and connections to make) with it.
    PeerLookup(PeerId, Vec<PendingRequest>),
    /// Addresses from the peer's card, then requests to retry (and connections to make).
    PeerCard(PeerId, Vec<Multiaddr>, Vec<PendingRequest>),
    Relays(HashSet<PeerId>),
    Publish(u64, bool),
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    responses_tx: mpsc::Sender<Response>,
    responses_rx: mpsc::Receiver<Response>,
    mail: Arc<MailService>,
    /// Inbound mailbox requests being served, per peer: their connections are not trimmed.
    serving: HashMap<PeerId, u32>,
    /// Calls on pipes, both ways: their peers' connections are not trimmed either.
    activity: Arc<Activity>,
    /// Tells the call pipe server to stop taking calls.
    stop_serving: watch::Sender<bool>,
    /// Calls waiting to be connected to their callee.
    connecting: HashMap<PeerId, Connecting>,
    /// Connections closing to make room, and whom for (if one of our calls waits): dialed
    /// when the close is done.
    room_for: HashMap<PeerId, Option<PeerId>>,
    last_trim: Instant,
    /// When each connected peer last connected, called, answered or sent gossip: trimming
    /// closes the longest idle first and spares those active within `trim_grace`.
    last_active: HashMap<PeerId, Instant>,
    /// When this loop last walked to join or dialed for want of connections.
    last_reconnect: Option<Instant>,
    /// Whether a join walk has started (a node with an empty routing table cannot).
    joined: bool,
    /// When a node without bootstrap peers walks to join, once it has met someone.
    join_due: Option<Instant>,
    inflight: JoinSet<()>,
    metrics: NodeMetrics,
    p2p_metrics: libp2p::metrics::Metrics,
    signing: SigningKey,
    registry: Registry,
    config: Arc<Config>,
    bootstrap: HashSet<PeerId>,

    card_seq: u64,
    /// The card last signed, and its signed bytes.
    own_card: Option<(AgentCard, Vec<u8>)>,
    provided: HashSet<RecordKey>,
    listen_addrs: Vec<Multiaddr>,
    listen_waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    connected_waiters: Vec<oneshot::Sender<()>>,

    requests: HashMap<OutboundRequestId, PendingRequest>,
    /// Cards asked of their agents; on no answer the DHT is asked.
    card_requests: HashMap<OutboundRequestId, (PeerId, CardReply)>,
    prekeys: Option<PrekeyBundle>,
    mailboxes: Vec<PeerId>,
    republish_due: Option<Instant>,
    /// Wait before the next retry of an announcement that did not replicate.
    publish_retry: Duration,
    nat: nat::Nat,
    queries: HashMap<QueryId, Pending>,
    groups: HashMap<u64, PublishGroup>,
    next_group: u64,

    /// Subscriptions, events and presence.
    topics: Topics,
}

impl EventLoop {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        (activity, stop_serving): (Arc<Activity>, watch::Sender<bool>),
        signing: SigningKey,
        registry: Registry,
        config: Arc<Config>,
        bootstrap: HashSet<PeerId>,
        metrics: NodeMetrics,
        p2p_metrics: libp2p::metrics::Metrics,
        mail: Arc<MailService>,
        prekeys: PrekeyBundle,
    ) -> Self {
        let (responses_tx, responses_rx) = mpsc::channel(RESPONSE_BUFFER);
        let topics = Topics::new(config.mesh_name(), &config.gossip, metrics.clone());
        EventLoop {
            swarm,
            commands,
            responses_tx,
            responses_rx,
            mail,
            prekeys: Some(prekeys),
            mailboxes: Vec::new(),
            republish_due: None,
            publish_retry: PUBLISH_RETRY,
            nat: nat::Nat::new(config.nat.reachability),
            activity,
            stop_serving,
            connecting: HashMap::new(),
            room_for: HashMap::new(),
            inflight: JoinSet::new(),
            metrics,
            p2p_metrics,
            serving: HashMap::new(),
            last_trim: Instant::now(),
            last_active: HashMap::new(),
            last_reconnect: None,
            joined: false,
            join_due: None,
            signing,
            registry,
            config,
            bootstrap,
            card_seq: 0,
            own_card: None,
            provided: HashSet::new(),
            listen_addrs: Vec::new(),
            listen_waiters: Vec::new(),
            connected_waiters: Vec::new(),
            requests: HashMap::new(),
            card_requests: HashMap::new(),
            queries: HashMap::new(),
            groups: HashMap::new(),
            next_group: 0,
            topics,
        }
    }

    pub(crate) async fn run(mut self) {
        self.topics
            .join_presence(&mut self.swarm.behaviour_mut().gossipsub);
        // `Node::build` publishes first, once it has met its bootstrap peers; a tick now
        // would publish into a routing table that holds only their addresses.
        let every = self.config.dht.republish_interval;
        let mut republish = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut presence = tokio::time::interval(self.config.gossip.presence_interval);
        let mut housekeeping = tokio::time::interval(Duration::from_millis(250));
        let shutdown_reply = loop {
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Shutdown { reply }) => break Some(reply),
                    Some(cmd) => self.on_command(cmd),
                    // Every handle is gone.
                    None => break None,
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(r) = self.responses_rx.recv() => self.respond(r),
                Some(_) = self.inflight.join_next(), if !self.inflight.is_empty() => {}
                _ = republish.tick() => self.republish(None),
                _ = presence.tick() => self.topics.announce_soon(),
                _ = housekeeping.tick() => self.housekeeping(),
            }
        };
        self.shut_down().await;
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(());
        }
    }

    /// Stops taking new work, lets calls in flight answer, then drops the swarm.
    async fn shut_down(&mut self) {
        let listeners: Vec<_> = self.swarm.listeners().cloned().collect();
        tracing::debug!(
            calls = self.inflight.len(),
            listeners = listeners.len(),
            "shutting down"
        );
        let _ = self.stop_serving.send(true);
        let deadline = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(deadline);
        let activity = self.activity.clone();
        let piped = activity.served();
        tokio::pin!(piped);
        let mut piped_done = activity.serving() == 0;
        while !self.inflight.is_empty() || !piped_done {
            tokio::select! {
                _ = &mut deadline => break,
                _ = &mut piped, if !piped_done => piped_done = true,
                Some(_) = self.inflight.join_next() => {}
                Some(r) = self.responses_rx.recv() => self.respond(r),
                _ = self.swarm.select_next_some() => {}
            }
        }
        // Flush answers that finished last.
        while let Ok(r) = self.responses_rx.try_recv() {
            self.respond(r);
        }
        self.inflight.abort_all();
        // Aborted tasks still hold the store until they are polled out.
        while self.inflight.join_next().await.is_some() {}
        for (_, r) in self.requests.drain() {
            let _ = r.reply.send(Err(Error::ShutDown));
        }
        for (_, c) in self.connecting.drain() {
            for w in c.waiters {
                let _ = w.send(Err(Error::ShutDown));
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial { addr, reply } => {
                let r = self
                    .swarm
                    .dial(addr.clone())
                    .map_err(|e| Error::Transport(format!("cannot dial {addr}: {e}")));
                let _ = reply.send(r);
            }
            Command::AddAddresses { peer, addrs } => {
                for a in addrs {
                    self.swarm.add_peer_address(peer, a.clone());
                    self.swarm.behaviour_mut().kad.add_address(&peer, a);
                }
            }
            Command::Republish { reply } => self.republish(reply),
            Command::FindProviders {
                key,
                counted,
                reply,
            } => {
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                self.queries
                    .insert(id, Pending::Providers(HashMap::new(), 0, counted, reply));
            }
            Command::GetCard { peer, addrs, reply } => {
                if peer == self.signing.peer_id() {
                    let _ = reply.send(self.own_card.clone());
                    return;
                }
                // The agent itself has its newest card, and a lookup found it through a
                // provider record that came with its addresses: one request, where the DHT
                // would take a walk of twenty or more. The DHT answers if the agent does not.
                let id = self
                    .swarm
                    .behaviour_mut()
                    .cards
                    .send_request_with_addresses(&peer, Vec::new(), addrs);
                self.card_requests.insert(id, (peer, reply));
            }
            Command::Connect { peer, reply } => self.connect(peer, reply),
            Command::Mailbox {
                peer,
                request,
                reply,
            } => {
                self.send_request(PendingRequest {
                    peer,
                    request,
                    reply,
                    looked_up: false,
                });
            }
            Command::SetCard { prekeys, mailboxes } => {
                if let Some(p) = prekeys {
                    self.prekeys = Some(p);
                }
                if let Some(m) = mailboxes {
                    self.mailboxes = m;
                }
                // Debounced: a burst of used one-time keys makes one new card.
                let soon = Instant::now() + Duration::from_millis(200);
                self.republish_due = Some(self.republish_due.map_or(soon, |t| t.min(soon)));
            }
            Command::Subscribe { topic, reply } => {
                let gossipsub = &mut self.swarm.behaviour_mut().gossipsub;
                let _ = reply.send(self.topics.subscribe(gossipsub, topic));
            }
            Command::Publish { topic, data, reply } => {
                let gossipsub = &mut self.swarm.behaviour_mut().gossipsub;
                let _ = reply.send(Topics::publish(gossipsub, topic, data));
            }
            Command::Subscribers { topic, reply } => {
                let gossipsub = &self.swarm.behaviour().gossipsub;
                let _ = reply.send(Topics::subscribers(gossipsub, topic));
            }
            Command::Peers { reply } => {
                let _ = reply.send(self.peers());
            }
            Command::ListenAddrs { reply } => {
                if self.listen_addrs.is_empty() {
                    self.listen_waiters.push(reply);
                } else {
                    let _ = reply.send(self.listen_addrs.clone());
                }
            }
            Command::WaitConnected { reply } => {
                if self.swarm.connected_peers().next().is_some() {
                    let _ = reply.send(());
                } else {
                    self.connected_waiters.push(reply);
                }
            }
            Command::NatStatus { reply } => {
                let _ = reply.send(self.nat_status());
            }
            Command::Shutdown { .. } => unreachable!("handled by run"),
        }
    }

    fn respond(&mut self, r: Response) {
        let Response {
            peer,
            channel,
            response,
        } = r;
        if let Some(n) = self.serving.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                self.serving.remove(&peer);
            }
        }
        let _ = self
            .swarm
            .behaviour_mut()
            .mailbox
            .send_response(channel, response);
    }

    /// A node whose connections all closed (idle timeouts, peers trimming it, a partition)
    /// would stay alone: nothing else dials. Below a gossip mesh's worth of peers, it dials
    /// peers its routing table knows (quickly when it has nobody, else now and then), and its
    /// bootstrap peers when it has nobody or no one to dial. Dialing known peers, not walking
    /// the DHT, makes connections that last: every node is subscribed to presence, so a new
    /// peer is grafted into that mesh and kept, whereas a walk dials dozens of peers that all
    /// go idle and close. It walks only when the table has nobody left to dial.
    fn keep_connected(&mut self) {
        let have = self.swarm.connected_peers().count();
        let want = (self.config.gossip.mesh_n_low as usize).max(1);
        if have >= want {
            return;
        }
        let spacing = if have == 0 {
            RECONNECT_SPACING
        } else {
            TOP_UP_SPACING
        };
        if self.last_reconnect.is_some_and(|t| t.elapsed() < spacing) {
            return;
        }
        self.last_reconnect = Some(Instant::now());
        let mut known: Vec<PeerId> = Vec::new();
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            known.extend(bucket.iter().map(|e| *e.node.key.preimage()));
        }
        known.retain(|p| !self.swarm.is_connected(p));
        let picks = want - have;
        tracing::debug!(have, want, known = known.len(), "few connections");
        // Bootstrap peers only when alone or out of peers to dial: everyone connects to them,
        // their gossip meshes are full, so a connection to one is pruned and closes when idle.
        // Dialed every minute by every node a little short of peers, they took 10,500 dials in
        // discovery-1000's 210 s calls phase, when 21,200 connections were made in all.
        if have == 0 || known.is_empty() {
            for addr in &self.config.network.bootstrap {
                let Some(libp2p::multiaddr::Protocol::P2p(peer)) = addr.iter().last() else {
                    continue;
                };
                if !self.swarm.is_connected(&peer) {
                    let _ = self.swarm.dial(addr.clone());
                }
            }
        }
        if known.is_empty() {
            self.walk();
            return;
        }
        for _ in 0..picks.min(known.len()) {
            let peer = known.swap_remove(rand::random_range(0..known.len()));
            let opts = DialOpts::peer_id(peer)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            let _ = self.swarm.dial(opts);
        }
    }

    /// Walks the DHT toward this node's own key: Kademlia's join. The peers nearest to it
    /// learn of it and it of them, and the peers met on the way fill some farther buckets.
    /// libp2p's bootstrap goes on to refresh every bucket farther than the nearest neighbour:
    /// ten more walks in a thousand nodes, ~300 dials per node (66,000 in 200 nodes' start).
    /// Those buckets fill from inbound requests and the periodic refresh
    /// (`dht.refresh_interval`) instead. It counts as the join once it starts: a node with an
    /// empty routing table cannot.
    fn walk(&mut self) {
        self.last_reconnect = Some(Instant::now());
        let me = self.signing.peer_id();
        let kad = &mut self.swarm.behaviour_mut().kad;
        if kad.kbuckets().any(|b| b.num_entries() > 0) {
            kad.get_closest_peers(me);
            self.joined = true;
        }
    }

    /// Above the high watermark, closes the least useful connections down to the low one.
    /// Useful: peers in a gossip mesh (events flow through them), and peers with a call in
    /// flight either way. Without this, gossipsub keeps every connection alive and Kademlia
    /// dials nearly everyone (DESIGN §4).
    fn trim_connections(&mut self) {
        let net = &self.config.network;
        let connected = self.swarm.connected_peers().count();
        if connected <= net.max_connections as usize {
            return;
        }
        let excess = connected - net.min_connections as usize;
        // New connections get a grace period: they were opened for a reason (a lookup, a call
        // about to be made), and closing them only makes someone dial again.
        let mut spare = self.spare_peers(net.trim_grace);
        spare.truncate(excess);
        tracing::debug!(closing = spare.len(), "above the connection high watermark");
        for peer in spare {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Connected peers we could close on, the longest idle first: none in our gossip mesh,
    /// with a call or request in flight, or active within `grace`.
    fn spare_peers(&self, grace: Duration) -> Vec<PeerId> {
        let mesh: HashSet<PeerId> = self
            .swarm
            .behaviour()
            .gossipsub
            .all_mesh_peers()
            .copied()
            .collect();
        let mut calling: HashSet<PeerId> = self.requests.values().map(|c| c.peer).collect();
        calling.extend(self.activity.busy());
        let active = |p: &PeerId| self.last_active.get(p).copied().max(self.activity.last(p));
        let mut spare: Vec<PeerId> = self
            .swarm
            .connected_peers()
            .filter(|p| {
                !mesh.contains(p)
                    && !calling.contains(p)
                    && !self.serving.contains_key(p)
                    && active(p).is_none_or(|t| t.elapsed() >= grace)
            })
            .copied()
            .collect();
        // A peer that was just busy is likely to be busy again (a request of its may be on
        // the way), and closing on it fails that request.
        spare.sort_by_key(|p| active(p));
        spare
    }

    /// Our own cap on connections refused a connection: close the longest idle spare one. If
    /// one of our calls or requests waits for it (`for_peer`), dial that peer again once the
    /// close is done; a refused caller tries again by itself. The caps are twice the high
    /// watermark for inbound connections and twice that in all (`behaviour::hard_cap`), and
    /// trimming spares young connections, so a node that answered many lookups can sit at a
    /// cap for a while; neither its own calls nor its callers should fail for that, while an
    /// idle connection stays open. Whether it made room.
    fn make_room(&mut self, for_peer: Option<PeerId>) -> bool {
        let established = self
            .swarm
            .network_info()
            .connection_counters()
            .num_established();
        if established < crate::behaviour::hard_cap(&self.config.network) {
            return false;
        }
        let Some(victim) = self
            .spare_peers(Duration::ZERO)
            .into_iter()
            .find(|v| !self.room_for.contains_key(v))
        else {
            return false;
        };
        tracing::debug!(?for_peer, %victim, "at the connection cap: closing an idle connection");
        if self.swarm.disconnect_peer_id(victim).is_err() {
            return false;
        }
        self.room_for.insert(victim, for_peer);
        true
    }

    fn send_request(&mut self, r: PendingRequest) {
        if let Some(t) = self.last_active.get_mut(&r.peer) {
            *t = Instant::now();
        }
        let id = self
            .swarm
            .behaviour_mut()
            .mailbox
            .send_request(&r.peer, r.request.clone());
        self.requests.insert(id, r);
    }

    /// Replies once connected to `peer`: at once if we are, else after dialing the addresses we
    /// know, else after asking the DHT where it is and dialing that.
    fn connect(&mut self, peer: PeerId, reply: oneshot::Sender<Result<()>>) {
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        if let Some(c) = self.connecting.get_mut(&peer) {
            c.waiters.push(reply);
            return;
        }
        self.connecting.insert(
            peer,
            Connecting {
                waiters: vec![reply],
                looked_up: false,
                rooms_made: 0,
            },
        );
        self.dial_peer(peer);
    }

    fn dial_peer(&mut self, peer: PeerId) {
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match self.swarm.dial(opts) {
            // A dial of someone else's is under way: its outcome answers ours.
            Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {}
            Err(e) => self.dial_failed(peer, &e),
        }
    }

    /// A dial to `peer` failed: make room if our own cap refused it, else see
    /// [`Self::connect_failed`].
    fn dial_failed(&mut self, peer: PeerId, error: &DialError) {
        if let DialError::Denied { .. } = error
            && let Some(c) = self.connecting.get_mut(&peer)
            && c.rooms_made < ROOM_ATTEMPTS
        {
            c.rooms_made += 1;
            if self.make_room(Some(peer)) {
                return;
            }
        }
        self.connect_failed(peer, dial_error(error));
    }

    /// Connecting to `peer` failed: look it up once, else give up on its waiters.
    fn connect_failed(&mut self, peer: PeerId, reason: String) {
        let Some(c) = self.connecting.get_mut(&peer) else {
            return;
        };
        if !c.looked_up {
            c.looked_up = true;
            self.look_up_peer(peer, Vec::new());
            return;
        }
        if let Some(c) = self.connecting.remove(&peer) {
            for w in c.waiters {
                let _ = w.send(Err(Error::Unreachable {
                    peer: Box::new(peer),
                    reason: reason.clone(),
                }));
            }
        }
    }

    /// Asks the DHT for `peer`'s card (it lists relay circuit addresses, which the routing table
    /// never has for a node behind NAT: it runs kad as a client), then for the peer itself.
    fn look_up_peer(&mut self, peer: PeerId, requests: Vec<PendingRequest>) {
        let id = self
            .swarm
            .behaviour_mut()
            .kad
            .get_record(RecordKey::new(&card_key(&peer)));
        self.queries
            .insert(id, Pending::PeerCard(peer, Vec::new(), requests));
    }

    /// A lookup of `peer` ended with these addresses: retry its requests and connections.
    fn peer_found(&mut self, peer: PeerId, addrs: &[Multiaddr], requests: Vec<PendingRequest>) {
        for a in addrs {
            self.swarm.add_peer_address(peer, a.clone());
        }
        for mut r in requests {
            if addrs.is_empty() {
                let _ = r.reply.send(Err(Error::Unreachable {
                    peer: Box::new(peer),
                    reason: "no address known, and the DHT has none".to_owned(),
                }));
            } else {
                r.looked_up = true;
                self.send_request(r);
            }
        }
        if self.connecting.contains_key(&peer) {
            if addrs.is_empty() {
                self.connect_failed(peer, "no address known, and the DHT has none".to_owned());
            } else {
                self.dial_peer(peer);
            }
        }
    }

    /// Re-signs this node's card and announces it and every provider key.
    fn republish(&mut self, reply: Option<oneshot::Sender<PublishReport>>) {
        // Whatever was due (a retry, a changed card) goes out with this one.
        self.republish_due = None;
        let specs = skills::specs(&self.registry);
        self.card_seq = (self.card_seq + 1).max(Timestamp::now().as_millis());
        let mut addrs: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
        addrs.extend(self.listen_addrs.iter().cloned());
        let ttl = self.config.dht.record_ttl;
        let bytes = match build_card(
            &self.signing,
            &self.config.node.name,
            &specs,
            &addrs,
            CardExtras {
                mailboxes: &self.mailboxes,
                prekeys: self.prekeys.as_ref(),
            },
            self.card_seq,
            ttl,
        ) {
            Ok((card, bytes)) => {
                // Presence tells the whole mesh at once; a card that only got a new sequence
                // number (a retry, the periodic refresh) waits for the presence timer. In a
                // thousand nodes, every retry's broadcast cost a thousand receivers two
                // signature checks each.
                if self
                    .own_card
                    .as_ref()
                    .is_none_or(|(c, _)| !same_content(c, &card))
                {
                    self.topics.announce_soon();
                }
                self.own_card = Some((card, bytes.clone()));
                bytes
            }
            Err(e) => {
                tracing::error!("cannot sign this node's card: {e}");
                if let Some(r) = reply {
                    let _ = r.send(PublishReport::default());
                }
                return;
            }
        };
        let group = self.next_group;
        self.next_group += 1;
        let mut pending = PublishGroup {
            remaining: 0,
            report: PublishReport::default(),
            reply,
        };
        let kad = &mut self.swarm.behaviour_mut().kad;
        let record = kad::Record::new(RecordKey::new(&card_key(&self.signing.peer_id())), bytes);
        match kad.put_record(record, kad::Quorum::One) {
            Ok(id) => {
                self.queries.insert(id, Pending::Publish(group, true));
                pending.remaining += 1;
            }
            Err(e) => tracing::warn!("cannot store own card: {e}"),
        }
        let mut keys = provider_keys(&specs);
        if self.config.relay.enabled {
            keys.insert(RecordKey::new(&relay_key()));
        }
        if self.mail.is_mailbox() {
            keys.insert(RecordKey::new(&mailbox_key()));
        }
        for old in self.provided.difference(&keys) {
            kad.stop_providing(old);
        }
        pending.report.keys = keys.len();
        for key in &keys {
            tracing::debug!(key = %hex::encode(key.as_ref()), "announcing");
            match kad.start_providing(key.clone()) {
                Ok(id) => {
                    self.queries.insert(id, Pending::Publish(group, false));
                    pending.remaining += 1;
                }
                Err(e) => tracing::warn!("cannot provide a key: {e}"),
            }
        }
        self.provided = keys;
        if pending.remaining == 0 {
            if let Some(r) = pending.reply.take() {
                let _ = r.send(pending.report);
            }
        } else {
            self.groups.insert(group, pending);
        }
    }

    /// A key whose publication walk timed out was stored only at the closest peers that walk
    /// reached (vendor/libp2p-kad), which may be few and not the nearest to the key: on a
    /// 1,000-node netsim run, a server whose walk timed out was held by 5 peers of ranks 5 to
    /// 26, and lookups that stopped after asking ranks 0-4 missed it. Go again soon instead of
    /// at the next republish, 30 min away by default, backing off while it keeps failing.
    fn after_publish(&mut self, group: u64, report: &PublishReport) {
        // A later publication went out since: it carries everything this one did.
        if group + 1 != self.next_group {
            return;
        }
        if report.complete() {
            self.publish_retry = PUBLISH_RETRY;
            return;
        }
        let retry = Instant::now() + self.publish_retry;
        tracing::debug!(
            ?report,
            retry_in = ?self.publish_retry,
            "announcements did not all replicate"
        );
        self.republish_due = Some(self.republish_due.map_or(retry, |t| t.min(retry)));
        self.publish_retry = (self.publish_retry * 2).min(self.config.dht.republish_interval);
    }

    fn housekeeping(&mut self) {
        if self.join_due.is_some_and(|t| t <= Instant::now()) {
            self.join_due = None;
            if !self.joined {
                self.walk();
            }
        }
        self.keep_connected();
        if self.republish_due.is_some_and(|t| t <= Instant::now()) {
            self.republish_due = None;
            self.republish(None);
        }
        self.nat_check();
        if self.last_trim.elapsed() >= TRIM_INTERVAL {
            self.last_trim = Instant::now();
            self.trim_connections();
            self.forget_departed();
        }
        let card = self.own_card.as_ref().map(|(_, bytes)| bytes.as_slice());
        let gossipsub = &mut self.swarm.behaviour_mut().gossipsub;
        self.topics.announce_if_due(gossipsub, &self.signing, card);
        self.topics.drop_unused(gossipsub);
        // Callers that gave up (their timeouts ran out) wait no more.
        self.connecting.retain(|_, c| {
            c.waiters.retain(|w| !w.is_closed());
            !c.waiters.is_empty()
        });
    }

    /// Drops presence not renewed for three intervals, and call activity of peers gone.
    /// Not on every housekeeping tick: the presence map holds every agent of the mesh (a
    /// thousand in netsim), and reading the clock for each one four times a second was 7 % of
    /// a 1,000-node run's CPU.
    fn forget_departed(&mut self) {
        self.topics.forget_departed();
        let swarm = &self.swarm;
        self.activity.prune(|p| swarm.is_connected(p));
    }

    fn peers(&self) -> Vec<PeerInfo> {
        let mut out: HashMap<PeerId, PeerInfo> = HashMap::new();
        for (peer, p) in self.topics.presence() {
            out.insert(
                *peer,
                PeerInfo {
                    peer: *peer,
                    name: Some(p.card.name.clone()),
                    skills: p.card.skills.clone(),
                    connected: self.swarm.is_connected(peer),
                },
            );
        }
        for peer in self.swarm.connected_peers() {
            out.entry(*peer).or_insert_with(|| PeerInfo {
                peer: *peer,
                name: None,
                skills: Vec::new(),
                connected: true,
            });
        }
        let mut v: Vec<PeerInfo> = out.into_values().collect();
        v.sort_by_key(|p| p.peer.to_bytes());
        v
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        use libp2p::metrics::Recorder;
        self.p2p_metrics.record(&event);
        match &event {
            SwarmEvent::OutgoingConnectionError { connection_id, .. } => {
                self.nat_dial_failed(*connection_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.p2p_metrics.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.p2p_metrics.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => {
                self.p2p_metrics.record(e);
                if let identify::Event::Received { peer_id, info, .. } = e {
                    self.nat_identified(*peer_id, &info.listen_addrs);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => self.p2p_metrics.record(e),
            SwarmEvent::ConnectionEstablished { .. } | SwarmEvent::ConnectionClosed { .. } => {
                self.metrics
                    .peers
                    .set(i64::try_from(self.swarm.connected_peers().count()).unwrap_or(i64::MAX));
            }
            _ => {}
        }
        match event {
            SwarmEvent::NewListenAddr {
                address,
                listener_id,
            } => {
                self.nat_new_listen_addr(listener_id, &address);
                tracing::info!(%address, "listening");
                self.listen_addrs.push(address);
                for w in self.listen_waiters.drain(..) {
                    let _ = w.send(self.listen_addrs.clone());
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                tracing::debug!(?listener_id, ?reason, "listener closed");
                self.nat_listener_closed(listener_id);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
            }
            SwarmEvent::IncomingConnectionError {
                error: ListenError::Denied { cause },
                peer_id,
                ..
            } => {
                // The swarm reports these silently; a node at its limits should say so.
                tracing::debug!(?peer_id, "inbound connection refused: {cause}");
                self.make_room(None);
            }
            SwarmEvent::ConnectionClosed {
                connection_id,
                peer_id,
                num_established,
                ..
            } => {
                self.nat_connection_closed(connection_id);
                if num_established == 0 {
                    self.last_active.remove(&peer_id);
                    if let Some(Some(waiting)) = self.room_for.remove(&peer_id)
                        && self.connecting.contains_key(&waiting)
                    {
                        self.dial_peer(waiting);
                    }
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                self.nat_connection(connection_id, peer_id, &endpoint);
                self.last_active.insert(peer_id, Instant::now());
                if let Some(c) = self.connecting.remove(&peer_id) {
                    for w in c.waiters {
                        let _ = w.send(Ok(()));
                    }
                }
                self.mail.messenger().connected(&peer_id);
                for w in self.connected_waiters.drain(..) {
                    let _ = w.send(());
                }
                // Join: walk to our own key now that we know someone. Once: bootstrap peers
                // connect again and again (every walk meets them), and a walk per reconnection
                // was a third of all DHT traffic in a 200-node netsim run. The table is
                // refreshed every `dht.refresh_interval`, and `keep_connected` dials known peers
                // (walking only when it knows none) when a node is left with too few.
                if self.bootstrap.contains(&peer_id) && !self.joined {
                    self.walk();
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL) => {
                // A newcomer to a full bucket makes Kademlia dial the bucket's oldest
                // disconnected entry (to see whether it should make room), whether or not a
                // dial is under way. Every identified connection did that, and every such dial
                // identified another peer: with idle connections closing, 200 netsim nodes kept
                // dialing each other at ~200/s while nothing else happened. The entries there
                // stay; peers whose own connections we made are still added by Kademlia itself.
                let kad = &mut self.swarm.behaviour_mut().kad;
                let room = kad.kbucket(peer_id).is_none_or(|b| {
                    b.num_entries() < kad::K_VALUE.get()
                        || b.iter().any(|e| e.node.key.preimage() == &peer_id)
                });
                if room {
                    // Not its loopback or LAN addresses, unless we share its host or network.
                    for addr in info.listen_addrs {
                        if crate::addrs::usable_from(&addr, &info.observed_addr) {
                            kad.add_address(&peer_id, addr);
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(BehaviourEvent::Reach(e)) => self.on_reach(e),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => self.on_relay_client(e),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => self.on_dcutr(e),
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => self.on_relay(e),
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } if self.connecting.contains_key(&peer) && !self.swarm.is_connected(&peer) => {
                self.dial_failed(peer, &error);
            }
            // A DHT walk's dial: the walk has counted the peer as failed and goes on to the
            // next, but its next dials should find room.
            SwarmEvent::OutgoingConnectionError {
                error: DialError::Denied { .. },
                ..
            } => {
                self.make_room(None);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mailbox(e)) => self.on_requests(e),
            SwarmEvent::Behaviour(BehaviourEvent::Cards(e)) => self.on_cards(e),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.on_gossip(e),
            _ => {}
        }
    }

    fn on_requests(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        if let request_response::Event::Message { peer, .. } = &event
            && let Some(t) = self.last_active.get_mut(peer)
        {
            *t = Instant::now();
        }
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let mail = self.mail.clone();
                    let tx = self.responses_tx.clone();
                    *self.serving.entry(peer).or_insert(0) += 1;
                    self.inflight.spawn(async move {
                        let response = mail.handle(peer, request).await;
                        let _ = tx
                            .send(Response {
                                peer,
                                channel,
                                response,
                            })
                            .await;
                    });
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(r) = self.requests.remove(&request_id) {
                        let _ = r.reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                let Some(call) = self.requests.remove(&request_id) else {
                    return;
                };
                match error {
                    // We may only know stale addresses: ask the DHT where the peer is now.
                    OutboundFailure::DialFailure if !call.looked_up => {
                        self.look_up_peer(call.peer, vec![call]);
                    }
                    OutboundFailure::Timeout => {
                        let _ = call
                            .reply
                            .send(Err(Error::Timeout(skillmesh_protocol::MAX_CALL_WINDOW)));
                    }
                    other => {
                        let _ = call.reply.send(Err(Error::Unreachable {
                            peer: Box::new(call.peer),
                            reason: other.to_string(),
                        }));
                    }
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "inbound mailbox request failed: {error}");
            }
            _ => {}
        }
    }

    /// Card requests: answer ours with our card; take the answers to our own requests if the
    /// card verifies as the asked peer's, else ask the DHT.
    fn on_cards(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { channel, .. } => {
                    // No card yet (just started): an empty answer sends the asker to the DHT.
                    let card = self
                        .own_card
                        .as_ref()
                        .map(|(_, b)| b.clone())
                        .unwrap_or_default();
                    if self
                        .swarm
                        .behaviour_mut()
                        .cards
                        .send_response(channel, card)
                        .is_err()
                    {
                        tracing::debug!(%peer, "card request gone before its answer");
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    let Some((peer, reply)) = self.card_requests.remove(&request_id) else {
                        return;
                    };
                    match card_of(peer, response) {
                        Some(card) => {
                            let _ = reply.send(Some(card));
                        }
                        None => {
                            tracing::debug!(%peer, "no valid card from the agent; asking the DHT");
                            self.card_from_dht(peer, reply);
                        }
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some((peer, reply)) = self.card_requests.remove(&request_id) {
                    tracing::debug!(%peer, "card request failed ({error}); asking the DHT");
                    self.card_from_dht(peer, reply);
                }
            }
            _ => {}
        }
    }

    fn card_from_dht(&mut self, peer: PeerId, reply: CardReply) {
        let id = self
            .swarm
            .behaviour_mut()
            .kad
            .get_record(RecordKey::new(&card_key(&peer)));
        self.queries.insert(id, Pending::Card(peer, None, reply));
    }

    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest { request } => match request {
                kad::InboundRequest::PutRecord {
                    record: Some(record),
                    source,
                    ..
                } => {
                    self.store_card_record(record, source);
                }
                kad::InboundRequest::AddProvider {
                    record: Some(record),
                } => {
                    // kad has checked that the provider is the peer that sent it.
                    let (key, provider) = (record.key.clone(), record.provider);
                    match self
                        .swarm
                        .behaviour_mut()
                        .kad
                        .store_mut()
                        .add_provider(record)
                    {
                        Ok(()) => tracing::debug!(
                            key = %hex::encode(key.as_ref()),
                            %provider,
                            at = %self.signing.peer_id(),
                            "provider record stored"
                        ),
                        Err(e) => tracing::debug!("provider record not stored: {e}"),
                    }
                }
                _ => {}
            },
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => {
                let lookup = matches!(
                    self.queries.get(&id),
                    Some(Pending::Providers(_, _, true, _))
                );
                // Which walks a node makes, and their cost: how netsim's DHT traffic is
                // attributed (RUST_LOG=skillmesh_node=debug).
                if step.last {
                    let kind = match &result {
                        kad::QueryResult::Bootstrap(_) => "bootstrap",
                        kad::QueryResult::GetClosestPeers(_) => "closest",
                        kad::QueryResult::GetProviders(_) => "providers",
                        kad::QueryResult::StartProviding(_) => "start_providing",
                        kad::QueryResult::RepublishProvider(_) => "republish_provider",
                        kad::QueryResult::GetRecord(_) => "get_record",
                        kad::QueryResult::PutRecord(_) => "put_record",
                        kad::QueryResult::RepublishRecord(_) => "republish_record",
                    };
                    tracing::debug!(kind, requests = stats.num_requests(), "DHT query finished");
                }
                self.on_query(id, result, step.last);
                if lookup && !self.queries.contains_key(&id) {
                    self.metrics.lookups.inc();
                    self.metrics
                        .lookup_requests
                        .inc_by(u64::from(stats.num_requests()));
                    self.metrics
                        .lookup_failures
                        .inc_by(u64::from(stats.num_failures()));
                }
            }
            // A node without bootstrap peers joins through whoever it meets first: someone
            // dialed it, or it dialed someone (`Node::dial`, mDNS).
            kad::Event::RoutingUpdated { .. } if !self.joined && self.bootstrap.is_empty() => {
                self.join_due
                    .get_or_insert_with(|| Instant::now() + JOIN_DELAY);
            }
            _ => {}
        }
    }

    /// Stores a card record from another peer only if it verifies and is newer than ours.
    fn store_card_record(&mut self, record: kad::Record, source: PeerId) {
        let card = match verify_card_record(&record) {
            Ok(card) => card,
            Err(e) => {
                tracing::debug!(%source, "refused a DHT record: {e}");
                return;
            }
        };
        let store = self.swarm.behaviour_mut().kad.store_mut();
        if let Some(existing) = store.get(&record.key)
            && let Ok(have) = verify_card_record(&existing)
            && have.seq >= card.seq
        {
            return;
        }
        if let Err(e) = store.put(record) {
            tracing::debug!("card record not stored: {e}");
        }
    }

    fn on_query(&mut self, id: QueryId, result: QueryResult, last: bool) {
        let Some(pending) = self.queries.remove(&id) else {
            return;
        };
        match (pending, result) {
            (
                Pending::Providers(mut found, mut answers, counted, reply),
                QueryResult::GetProviders(r),
            ) => {
                if let Ok(GetProvidersOk::FoundProviders {
                    providers,
                    addresses,
                    ..
                }) = r
                    && !providers.is_empty()
                {
                    // The card requests that follow dial these: the query that carried them
                    // is finished by then, and its addresses gone with it. Only those requests:
                    // the addresses come from a third party and may be stale (a NAT'd agent's
                    // from before it knew), and a call that dialed them would wait out a TCP
                    // timeout before it asked the DHT for the agent's card.
                    for peer in providers {
                        found.entry(peer).or_default();
                    }
                    for (peer, more) in addresses {
                        let Some(addrs) = found.get_mut(&peer) else {
                            continue;
                        };
                        for a in more {
                            if addrs.len() < ADDRS_PER_PROVIDER && !addrs.contains(&a) {
                                addrs.push(a);
                            }
                        }
                    }
                    answers = answers.saturating_add(1);
                }
                if last || found.len() >= MAX_PROVIDERS_PER_LOOKUP || answers >= PROVIDER_ANSWERS {
                    if !last && let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                    let _ = reply.send(found.into_iter().take(MAX_PROVIDERS_PER_LOOKUP).collect());
                } else {
                    self.queries
                        .insert(id, Pending::Providers(found, answers, counted, reply));
                }
            }
            (Pending::Card(peer, mut best, reply), QueryResult::GetRecord(r)) => {
                // A valid card from another peer ends the walk: one copy is enough, and going on
                // to ask all twenty of the key's nearest peers only keeps the lookup waiting.
                // Our own stored copy may be old: after that one the walk goes on.
                let mut remote = false;
                if let Ok(GetRecordOk::FoundRecord(found)) = r {
                    match verify_card_record(&found.record) {
                        Ok(card) if card.peer_id == peer => {
                            remote = found.peer.is_some();
                            if best.as_ref().is_none_or(|b| b.0.seq < card.seq) {
                                best = Some(Box::new((card, found.record.value)));
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(%peer, "ignored a bad card record: {e}"),
                    }
                }
                if last || remote {
                    if !last && let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                    let _ = reply.send(best.map(|b| *b));
                } else {
                    self.queries.insert(id, Pending::Card(peer, best, reply));
                }
            }
            (Pending::Relays(mut found), QueryResult::GetProviders(r)) => {
                if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = r {
                    found.extend(providers);
                }
                if last {
                    self.nat_found_relays(found);
                } else {
                    self.queries.insert(id, Pending::Relays(found));
                }
            }
            (Pending::PeerCard(peer, mut addrs, requests), QueryResult::GetRecord(r)) => {
                // As for `Pending::Card`: another peer's copy of the card ends the walk.
                let mut remote = false;
                if let Ok(GetRecordOk::FoundRecord(found)) = r
                    && let Ok(card) = verify_card_record(&found.record)
                    && card.peer_id == peer
                {
                    remote = found.peer.is_some() && !card.addrs.is_empty();
                    addrs.extend(card.addrs);
                }
                if !last {
                    if !remote {
                        self.queries
                            .insert(id, Pending::PeerCard(peer, addrs, requests));
                        return;
                    }
                    if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                }
                if addrs.is_empty() {
                    let id = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                    self.queries.insert(id, Pending::PeerLookup(peer, requests));
                    return;
                }
                self.peer_found(peer, &addrs, requests);
            }
            (Pending::PeerLookup(peer, requests), QueryResult::GetClosestPeers(r)) => {
                let addrs: Vec<Multiaddr> = match &r {
                    Ok(GetClosestPeersOk { peers, .. }) => peers
                        .iter()
                        .filter(|p| p.peer_id == peer)
                        .flat_map(|p| p.addrs.clone())
                        .collect(),
                    Err(_) => Vec::new(),
                };
                if !last && addrs.is_empty() {
                    self.queries.insert(id, Pending::PeerLookup(peer, requests));
                    return;
                }
                self.peer_found(peer, &addrs, requests);
            }
            (Pending::Publish(group, is_card), r) => {
                let replicated = match r {
                    QueryResult::PutRecord(r) => r.is_ok(),
                    QueryResult::StartProviding(r) => provider_placed(&r),
                    _ => false,
                };
                if !last {
                    self.queries.insert(id, Pending::Publish(group, is_card));
                    return;
                }
                if let Some(g) = self.groups.get_mut(&group) {
                    g.remaining -= 1;
                    if is_card {
                        g.report.card_replicated = replicated;
                    } else if replicated {
                        g.report.keys_replicated += 1;
                    }
                    if g.remaining == 0
                        && let Some(g) = self.groups.remove(&group)
                    {
                        self.after_publish(group, &g.report);
                        if let Some(reply) = g.reply {
                            let _ = reply.send(g.report);
                        }
                    }
                }
            }
            (pending, _) => {
                // A result of another kind than the query: keep waiting for the right one.
                self.queries.insert(id, pending);
            }
        }
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        let heard = self
            .topics
            .on_event(&mut self.swarm.behaviour_mut().gossipsub, event);
        if let Some(peer) = heard.active
            && let Some(t) = self.last_active.get_mut(&peer)
        {
            *t = Instant::now();
        }
        if let Some((peer, addrs)) = heard.addresses {
            for a in addrs {
                self.swarm.add_peer_address(peer, a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use libp2p::swarm::ConnectionDenied;

    use super::*;

    #[test]
    fn a_dial_we_refused_says_which_limit() {
        let denied = DialError::Denied {
            cause: ConnectionDenied::new(std::io::Error::other(
                "connection limit exceeded: at most 128 established connections are allowed",
            )),
        };
        assert_eq!(
            dial_error(&denied),
            "refused by this node: connection limit exceeded: at most 128 established connections are allowed"
        );
        assert_eq!(
            dial_error(&DialError::NoAddresses),
            DialError::NoAddresses.to_string()
        );
    }
}

//! The event loop: the one task that owns the libp2p Swarm, and routes.
//!
//! Everything else talks to it through [`Command`]s carrying a oneshot reply; it hands each
//! command and swarm event to the component that owns the state: connection management
//! (`crate::connections`, a behaviour), discovery (`discovery/`), the mail transport
//! (`mailbox.rs`), gossip and presence (`topics.rs`), reachability and relays (`nat.rs`). What
//! a component cannot do alone it returns, and the loop passes it on. Skill calls do not pass
//! through here: they ride call pipes ([`crate::pipe`]), streams between the calling task and
//! the connection. docs/architecture.md draws the components and how data flows.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use libp2p::futures::StreamExt;
use libp2p::kad::RecordKey;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub, identify, kad, mdns};
use skillmesh_protocol::keys::KAD_PROTOCOL;
use skillmesh_protocol::{AgentCard, PrekeyBundle, SigningKey};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::config::Config;
use crate::connections;
use crate::error::Result;
use crate::events::{Delivered, PeerInfo};
use crate::mail::service::MailService;
use crate::metrics::NodeMetrics;
use crate::pipe::Activity;
use crate::skills::Registry;

mod discovery;
mod mailbox;
mod nat;
mod topics;
pub use discovery::PublishReport;
use discovery::{Discovery, Found};
use mailbox::{MailTransport, Needs};
pub use nat::{ConnectionInfo, NatStatus, Path, Reach, Relaying};
use topics::Topics;

/// Commands waiting for the loop; senders wait (backpressure) when it is full.
pub(crate) const COMMAND_BUFFER: usize = 1024;
/// How long shutdown waits for calls in flight to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often the connection count is checked against the watermarks.
const TRIM_INTERVAL: Duration = Duration::from_secs(2);

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

/// Whether `peer` has a call on a pipe or a mail request in flight, either way: a connection
/// it may be using stays.
fn busy_with(activity: &Activity, mail: &MailTransport, peer: &PeerId) -> bool {
    activity.busy().contains(peer) || mail.busy().any(|p| p == *peer)
}

/// This node's listen addresses, and who waits for the first.
#[derive(Default)]
struct Listening {
    addrs: Vec<Multiaddr>,
    waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
}

/// What the loop is built from, besides the swarm and its commands.
pub(crate) struct Parts {
    pub(crate) activity: Arc<Activity>,
    /// Tells the call pipe server to stop taking calls.
    pub(crate) stop_serving: watch::Sender<bool>,
    pub(crate) signing: SigningKey,
    pub(crate) registry: Registry,
    pub(crate) config: Arc<Config>,
    pub(crate) bootstrap: HashSet<PeerId>,
    pub(crate) metrics: NodeMetrics,
    pub(crate) p2p_metrics: libp2p::metrics::Metrics,
    pub(crate) mail: Arc<MailService>,
    pub(crate) prekeys: PrekeyBundle,
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    /// Calls on pipes, both ways: their peers' connections are not trimmed.
    activity: Arc<Activity>,
    stop_serving: watch::Sender<bool>,
    metrics: NodeMetrics,
    p2p_metrics: libp2p::metrics::Metrics,
    signing: SigningKey,
    config: Arc<Config>,
    listening: Listening,
    /// Publishing, lookups, cards, joining the DHT.
    discovery: Discovery,
    mail: MailTransport,
    nat: nat::Nat,
    /// Subscriptions, events and presence.
    topics: Topics,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        p: Parts,
    ) -> Self {
        let topics = Topics::new(p.config.mesh_name(), &p.config.gossip, p.metrics.clone());
        let discovery = Discovery::new(
            p.signing.clone(),
            p.registry,
            p.config.clone(),
            p.prekeys,
            p.metrics.clone(),
            p.bootstrap,
        );
        let nat = nat::Nat::new(p.config.clone(), p.signing.peer_id());
        EventLoop {
            swarm,
            commands,
            nat,
            activity: p.activity,
            stop_serving: p.stop_serving,
            metrics: p.metrics,
            p2p_metrics: p.p2p_metrics,
            signing: p.signing,
            config: p.config,
            listening: Listening::default(),
            discovery,
            mail: MailTransport::new(p.mail),
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
        let mut trim = tokio::time::interval(TRIM_INTERVAL);
        let shutdown_reply = loop {
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Shutdown { reply }) => break Some(reply),
                    Some(cmd) => self.on_command(cmd),
                    // Every handle is gone.
                    None => break None,
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                r = self.mail.next() => if let Some(r) = r { self.respond(r) },
                _ = republish.tick() => self.republish(None),
                _ = presence.tick() => self.topics.announce_soon(),
                _ = housekeeping.tick() => self.housekeeping(),
                _ = trim.tick() => self.trim(),
            }
        };
        self.shut_down().await;
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(());
        }
    }

    /// Stops taking new work, lets calls in flight answer, then drops the swarm.
    async fn shut_down(&mut self) {
        tracing::debug!(
            serving_mail = !self.mail.idle(),
            listeners = self.swarm.listeners().count(),
            "shutting down"
        );
        let _ = self.stop_serving.send(true);
        let deadline = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(deadline);
        let activity = self.activity.clone();
        let piped = activity.served();
        tokio::pin!(piped);
        let mut piped_done = activity.serving() == 0;
        while !self.mail.idle() || !piped_done {
            tokio::select! {
                _ = &mut deadline => break,
                _ = &mut piped, if !piped_done => piped_done = true,
                r = self.mail.next() => if let Some(r) = r { self.respond(r) },
                _ = self.swarm.select_next_some() => {}
            }
        }
        let b = self.swarm.behaviour_mut();
        self.mail.shut_down(&mut b.mailbox).await;
        b.conns.shut_down();
    }

    fn on_command(&mut self, cmd: Command) {
        let b = self.swarm.behaviour_mut();
        match cmd {
            Command::Dial { addr, reply } => {
                let r = self.swarm.dial(addr.clone()).map_err(|e| {
                    crate::error::Error::Transport(format!("cannot dial {addr}: {e}"))
                });
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
            } => self
                .discovery
                .find_providers(&mut b.kad, key, counted, reply),
            Command::GetCard { peer, addrs, reply } => {
                self.discovery.get_card(&mut b.cards, peer, addrs, reply);
            }
            Command::Connect { peer, reply } => b.conns.connect(peer, reply),
            Command::Mailbox {
                peer,
                request,
                reply,
            } => {
                b.conns.touch(&peer);
                self.mail.send(&mut b.mailbox, peer, request, reply);
            }
            Command::SetCard { prekeys, mailboxes } => self.discovery.set_card(prekeys, mailboxes),
            Command::Subscribe { topic, reply } => {
                let _ = reply.send(self.topics.subscribe(&mut b.gossipsub, topic));
            }
            Command::Publish { topic, data, reply } => {
                let _ = reply.send(Topics::publish(&mut b.gossipsub, topic, data));
            }
            Command::Subscribers { topic, reply } => {
                let _ = reply.send(Topics::subscribers(&b.gossipsub, topic));
            }
            Command::Peers { reply } => {
                let _ = reply.send(self.peers());
            }
            Command::ListenAddrs { reply } => {
                if self.listening.addrs.is_empty() {
                    self.listening.waiters.push(reply);
                } else {
                    let _ = reply.send(self.listening.addrs.clone());
                }
            }
            Command::WaitConnected { reply } => b.conns.wait_connected(reply),
            Command::NatStatus { reply } => {
                let probes = self.swarm.behaviour().reach.status();
                let _ = reply.send(self.nat.status(probes));
            }
            Command::Shutdown { .. } => unreachable!("handled by run"),
        }
    }

    fn respond(&mut self, r: mailbox::Response) {
        self.mail
            .respond(&mut self.swarm.behaviour_mut().mailbox, r);
    }

    /// Peers whose connections must stay: in a gossip mesh (events flow through them), or
    /// with a call or mail request in flight either way.
    fn busy(&self) -> HashSet<PeerId> {
        let mut busy: HashSet<PeerId> = self
            .swarm
            .behaviour()
            .gossipsub
            .all_mesh_peers()
            .copied()
            .collect();
        busy.extend(self.mail.busy());
        busy.extend(self.activity.busy());
        busy
    }

    /// A node whose connections all closed (idle timeouts, peers trimming it, a partition)
    /// would stay alone: nothing else dials. Below a gossip mesh's worth of peers, it dials
    /// peers its routing table knows, and its bootstrap peers when it has nobody or no one to
    /// dial (`connections::Behaviour::top_up`). Dialing known peers, not walking the DHT,
    /// makes connections that last: every node is subscribed to presence, so a new peer is
    /// grafted into that mesh and kept, whereas a walk dials dozens of peers that all go idle
    /// and close. It walks only when the table has nobody left to dial.
    fn keep_connected(&mut self) {
        let want = self.config.gossip.mesh_n_low as usize;
        let b = self.swarm.behaviour_mut();
        let Some(picks) = b.conns.top_up_due(want) else {
            return;
        };
        let mut known: Vec<PeerId> = Vec::new();
        for bucket in b.kad.kbuckets() {
            known.extend(bucket.iter().map(|e| *e.node.key.preimage()));
        }
        if b.conns.top_up(picks, known) {
            self.walk();
        }
    }

    /// Walks the DHT to this node's own key ([`Discovery::walk`]).
    fn walk(&mut self) {
        let b = self.swarm.behaviour_mut();
        self.discovery.walk(&mut b.kad);
        b.conns.walked();
    }

    /// Re-signs this node's card with its current addresses and announces it and every
    /// provider key; a card that says something new is told to the mesh by presence.
    fn republish(&mut self, reply: Option<oneshot::Sender<PublishReport>>) {
        let mut addrs: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
        addrs.extend(self.listening.addrs.iter().cloned());
        let mailbox = self.mail.service().is_mailbox();
        let kad = &mut self.swarm.behaviour_mut().kad;
        if self.discovery.republish(kad, &addrs, mailbox, reply) {
            self.topics.announce_soon();
        }
    }

    fn housekeeping(&mut self) {
        if self.discovery.join_due() {
            self.walk();
        }
        self.keep_connected();
        if self.discovery.publish_due() {
            self.republish(None);
        }
        if self.nat.check(&mut self.swarm, &self.listening.addrs) {
            self.discovery
                .search_relays(&mut self.swarm.behaviour_mut().kad);
        }
        let card = self.discovery.own_card().map(|(_, bytes)| bytes.as_slice());
        let b = self.swarm.behaviour_mut();
        self.topics
            .announce_if_due(&mut b.gossipsub, &self.signing, card);
        self.topics.drop_unused(&mut b.gossipsub);
        b.conns.forget_abandoned();
    }

    /// Closes connections above the high watermark, then forgets peers gone: presence not
    /// renewed for three intervals, and call activity of peers no longer connected. Not on
    /// every housekeeping tick: the presence map holds every agent of the mesh (a thousand in
    /// netsim), and reading the clock for each one four times a second was 7 % of a
    /// 1,000-node run's CPU.
    fn trim(&mut self) {
        let busy = self.busy();
        let activity = self.activity.clone();
        let conns = &mut self.swarm.behaviour_mut().conns;
        conns.trim(&busy, |p| activity.last(p));
        self.topics.forget_departed();
        let conns = &self.swarm.behaviour().conns;
        self.activity.prune(|p| conns.is_connected(p));
    }

    fn peers(&self) -> Vec<PeerInfo> {
        let mut out: std::collections::HashMap<PeerId, PeerInfo> = Default::default();
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
                self.nat.dial_failed(*connection_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.p2p_metrics.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.p2p_metrics.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => {
                self.p2p_metrics.record(e);
                if let identify::Event::Received { peer_id, info, .. } = e {
                    self.nat.identified(*peer_id, &info.listen_addrs);
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
                if self
                    .nat
                    .new_listen_addr(&mut self.swarm, listener_id, &address)
                {
                    // Others must learn a circuit address: a new card soon.
                    self.discovery.publish_soon();
                }
                tracing::info!(%address, "listening");
                self.listening.addrs.push(address);
                for w in self.listening.waiters.drain(..) {
                    let _ = w.send(self.listening.addrs.clone());
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                tracing::debug!(?listener_id, ?reason, "listener closed");
                if let Some(relay) = self.nat.listener_closed(listener_id) {
                    self.listening
                        .addrs
                        .retain(|a| nat::relay_of(a) != Some(relay));
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listening.addrs.retain(|a| *a != address);
            }
            SwarmEvent::ConnectionClosed { connection_id, .. } => {
                self.nat.connection_closed(connection_id);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let card_addrs = self
                    .topics
                    .card(&peer_id)
                    .map(|c| c.addrs.clone())
                    .unwrap_or_default();
                let (activity, mail) = (&self.activity, &self.mail);
                self.nat.connection(
                    &mut self.swarm,
                    (connection_id, peer_id, &endpoint),
                    card_addrs,
                    |p| busy_with(activity, mail, p),
                );
                self.mail.service().messenger().connected(&peer_id);
                let kad = &mut self.swarm.behaviour_mut().kad;
                if self.discovery.connected(kad, &peer_id) {
                    self.swarm.behaviour_mut().conns.walked();
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL) => {
                self.identified(peer_id, info);
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
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => {
                let kad = &mut self.swarm.behaviour_mut().kad;
                if let Some(found) = self.discovery.on_kad(kad, e) {
                    self.on_found(found);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Conns(e)) => self.on_conns(e),
            SwarmEvent::Behaviour(BehaviourEvent::Reach(e)) => {
                self.nat.on_reach(&mut self.swarm, e)
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => self.nat.on_relay_client(e),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => {
                let (activity, mail) = (&self.activity, &self.mail);
                self.nat
                    .on_dcutr(&mut self.swarm, e, |p| busy_with(activity, mail, p));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => self.nat.on_relay(e),
            SwarmEvent::Behaviour(BehaviourEvent::Mailbox(e)) => match self.mail.on_event(e) {
                Needs::Nothing => {}
                Needs::Active(peer) => self.swarm.behaviour_mut().conns.touch(&peer),
                Needs::Locate(peer) => {
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    self.discovery.locate(kad, peer);
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Cards(e)) => {
                let b = self.swarm.behaviour_mut();
                self.discovery.on_cards(&mut b.kad, &mut b.cards, e);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.on_gossip(e),
            _ => {}
        }
    }

    /// A peer that serves the DHT told us where it listens. A newcomer to a full bucket makes
    /// Kademlia dial the bucket's oldest disconnected entry (to see whether it should make
    /// room), whether or not a dial is under way. Every identified connection did that, and
    /// every such dial identified another peer: with idle connections closing, 200 netsim
    /// nodes kept dialing each other at ~200/s while nothing else happened. The entries there
    /// stay; peers whose own connections we made are still added by Kademlia itself.
    fn identified(&mut self, peer: PeerId, info: identify::Info) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        let room = kad.kbucket(peer).is_none_or(|b| {
            b.num_entries() < kad::K_VALUE.get() || b.iter().any(|e| e.node.key.preimage() == &peer)
        });
        if room {
            // Not its loopback or LAN addresses, unless we share its host or network.
            for addr in info.listen_addrs {
                if crate::addrs::usable_from(&addr, &info.observed_addr) {
                    kad.add_address(&peer, addr);
                }
            }
        }
    }

    fn on_conns(&mut self, event: connections::Event) {
        match event {
            connections::Event::Locate(peer) => {
                let kad = &mut self.swarm.behaviour_mut().kad;
                self.discovery.locate(kad, peer);
            }
            connections::Event::Full { waiting } => {
                let busy = self.busy();
                let activity = self.activity.clone();
                let conns = &mut self.swarm.behaviour_mut().conns;
                conns.make_room(waiting, &busy, |p| activity.last(p));
            }
        }
    }

    fn on_found(&mut self, found: Found) {
        match found {
            Found::Located { peer, addrs } => {
                for a in &addrs {
                    self.swarm.add_peer_address(peer, a.clone());
                }
                let b = self.swarm.behaviour_mut();
                b.conns.located(peer, &addrs);
                self.mail.located(&mut b.mailbox, peer, &addrs);
            }
            Found::Relays(relays) => self.nat.found_relays(relays),
        }
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        let b = self.swarm.behaviour_mut();
        let heard = self.topics.on_event(&mut b.gossipsub, event);
        if let Some(peer) = heard.active {
            b.conns.touch(&peer);
        }
        if let Some((peer, addrs)) = heard.addresses {
            for a in addrs {
                self.swarm.add_peer_address(peer, a);
            }
        }
    }
}

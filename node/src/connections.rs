//! Connection management, a behaviour in the manner of libp2p's `connection_limits`: which
//! connections stay open, and connecting to a peer that a call or request waits for.
//!
//! It owns what it needs to decide (connected peers and when each was last active, the
//! connects waiting, the connections closing to make room) and nothing else: what makes a peer
//! busy (a gossip mesh, a call or mail request in flight) is the event loop's to say, passed
//! in when it trims or makes room. Where a peer is, when the addresses known fail, is asked
//! of the event loop with [`Event::Locate`] and answered with [`Behaviour::located`].
//! docs/architecture.md places it among the components.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{
    CloseConnection, ConnectionDenied, ConnectionId, DialError, FromSwarm, ListenError,
    NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::oneshot;

use crate::config::NetworkConfig;
use crate::error::{Error, Result};

/// Connections a dial refused by our own cap may close to make room: while it waits for a
/// close, others' connections may take the room (a node at its cap is one many dial).
const ROOM_ATTEMPTS: u8 = 3;
/// How often a node with some connections, but fewer than a gossip mesh's worth, dials more.
const TOP_UP_SPACING: Duration = Duration::from_secs(60);
/// How soon a node with no connection at all tries again.
const RECONNECT_SPACING: Duration = Duration::from_secs(5);
/// Events waiting for the swarm to take them; one per dial or close at most, so this only
/// fills if the swarm stops polling.
const MAX_EVENTS: usize = 4096;

/// What the behaviour asks of the event loop.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// Connecting to this peer failed at every address known: find where it is now and answer
    /// with [`Behaviour::located`].
    Locate(PeerId),
    /// Our own cap refused a connection: answer with [`Behaviour::make_room`], naming the peers
    /// that must stay. `waiting` is the peer a connect of ours waits for, if any.
    Full { waiting: Option<PeerId> },
}

/// Connects waiting for one peer.
struct Connecting {
    waiters: Vec<oneshot::Sender<Result<()>>>,
    /// Whether the peer was looked up already: a second failure is final.
    located: bool,
    /// Connections closed to make room for this one so far.
    rooms_made: u8,
    /// Why the last dial failed, for the waiters if no room can be made.
    last_error: String,
}

pub(crate) struct Behaviour {
    config: NetworkConfig,
    /// Established connections per connected peer.
    connected: HashMap<PeerId, u32>,
    established: u32,
    /// When each connected peer last connected, called, answered or sent gossip ([`Self::touch`]):
    /// trimming closes the longest idle first and spares those active within `trim_grace`.
    last_active: HashMap<PeerId, Instant>,
    connecting: HashMap<PeerId, Connecting>,
    /// Peers whose connections close to make room, and whom for (if a connect of ours waits):
    /// dialed when the close is done.
    room_for: HashMap<PeerId, Option<PeerId>>,
    /// Waiting for any connection at all.
    any_waiters: Vec<oneshot::Sender<()>>,
    /// When this node last dialed for want of connections, or walked the DHT to join.
    last_reconnect: Option<Instant>,
    events: VecDeque<ToSwarm<Event, Infallible>>,
}

impl Behaviour {
    pub(crate) fn new(config: NetworkConfig) -> Self {
        Behaviour {
            config,
            connected: HashMap::new(),
            established: 0,
            last_active: HashMap::new(),
            connecting: HashMap::new(),
            room_for: HashMap::new(),
            any_waiters: Vec::new(),
            last_reconnect: None,
            events: VecDeque::new(),
        }
    }

    pub(crate) fn is_connected(&self, peer: &PeerId) -> bool {
        self.connected.contains_key(peer)
    }

    /// `peer` was active (a call, a request, gossip): it is closed on last.
    pub(crate) fn touch(&mut self, peer: &PeerId) {
        if let Some(t) = self.last_active.get_mut(peer) {
            *t = Instant::now();
        }
    }

    /// Replies once connected to `peer`: at once if it is, else after dialing the addresses
    /// known, else after it was located ([`Event::Locate`]) and those addresses dialed.
    pub(crate) fn connect(&mut self, peer: PeerId, reply: oneshot::Sender<Result<()>>) {
        if self.is_connected(&peer) {
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
                located: false,
                rooms_made: 0,
                last_error: String::new(),
            },
        );
        self.dial(peer, Vec::new());
    }

    /// Replies once any peer is connected.
    pub(crate) fn wait_connected(&mut self, reply: oneshot::Sender<()>) {
        if self.connected.is_empty() {
            self.any_waiters.push(reply);
        } else {
            let _ = reply.send(());
        }
    }

    /// The answer to [`Event::Locate`]: where `peer` is, or nowhere known.
    pub(crate) fn located(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        if !self.connecting.contains_key(&peer) {
            return;
        }
        if addrs.is_empty() {
            self.connect_failed(peer, "no address known, and the DHT has none".to_owned());
        } else {
            self.dial(peer, addrs.to_vec());
        }
    }

    /// Drops connects whose callers gave up (their timeouts ran out).
    pub(crate) fn forget_abandoned(&mut self) {
        self.connecting.retain(|_, c| {
            c.waiters.retain(|w| !w.is_closed());
            !c.waiters.is_empty()
        });
    }

    /// Fails every connect waiting: the node is shutting down.
    pub(crate) fn shut_down(&mut self) {
        for (_, c) in self.connecting.drain() {
            for w in c.waiters {
                let _ = w.send(Err(Error::ShutDown));
            }
        }
    }

    /// How many peers a node short of connections should dial now, if it should: below a
    /// gossip mesh's worth (`want`), quickly when it has nobody, else now and then. Counts as
    /// the attempt.
    pub(crate) fn top_up_due(&mut self, want: usize) -> Option<usize> {
        let have = self.connected.len();
        let want = want.max(1);
        if have >= want {
            return None;
        }
        let spacing = if have == 0 {
            RECONNECT_SPACING
        } else {
            TOP_UP_SPACING
        };
        if self.last_reconnect.is_some_and(|t| t.elapsed() < spacing) {
            return None;
        }
        self.last_reconnect = Some(Instant::now());
        Some(want - have)
    }

    /// A DHT walk went out to join: it counts as a reconnect attempt.
    pub(crate) fn walked(&mut self) {
        self.last_reconnect = Some(Instant::now());
    }

    /// Dials up to `picks` of the `known` peers (a routing table's, not connected), at random.
    /// Bootstrap peers only when alone or out of peers to dial: everyone connects to them,
    /// their gossip meshes are full, so a connection to one is pruned and closes when idle.
    /// Dialed every minute by every node a little short of peers, they took 10,500 dials in
    /// discovery-1000's 210 s calls phase, when 21,200 connections were made in all. Whether
    /// the caller should walk the DHT instead: it knows nobody to dial.
    pub(crate) fn top_up(&mut self, picks: usize, mut known: Vec<PeerId>) -> bool {
        known.retain(|p| !self.is_connected(p));
        tracing::debug!(
            have = self.connected.len(),
            known = known.len(),
            "few connections"
        );
        if self.connected.is_empty() || known.is_empty() {
            let dials: Vec<Multiaddr> = self
                .config
                .bootstrap
                .iter()
                .filter(|addr| match addr.iter().last() {
                    Some(libp2p::multiaddr::Protocol::P2p(peer)) => !self.is_connected(&peer),
                    _ => false,
                })
                .cloned()
                .collect();
            for addr in dials {
                self.push(ToSwarm::Dial {
                    opts: DialOpts::unknown_peer_id().address(addr).build(),
                });
            }
        }
        if known.is_empty() {
            return true;
        }
        for _ in 0..picks.min(known.len()) {
            let peer = known.swap_remove(rand::random_range(0..known.len()));
            let opts = DialOpts::peer_id(peer)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            self.push(ToSwarm::Dial { opts });
        }
        false
    }

    /// Above the high watermark, closes the least useful connections down to the low one:
    /// never those of `busy` peers (in a gossip mesh, with a call or request in flight), and
    /// not those active within `trim_grace`. `recent` says when a peer last had a call,
    /// besides what [`Self::touch`] saw. Without this, gossipsub keeps every connection alive
    /// and Kademlia dials nearly everyone.
    pub(crate) fn trim(
        &mut self,
        busy: &HashSet<PeerId>,
        recent: impl Fn(&PeerId) -> Option<Instant>,
    ) {
        let connected = self.connected.len();
        if connected <= self.config.max_connections as usize {
            return;
        }
        let excess = connected - self.config.min_connections as usize;
        // New connections get a grace period: they were opened for a reason (a lookup, a call
        // about to be made), and closing them only makes someone dial again.
        let mut spare = self.spare_peers(self.config.trim_grace, busy, &recent);
        spare.truncate(excess);
        tracing::debug!(closing = spare.len(), "above the connection high watermark");
        for peer in spare {
            self.close(peer);
        }
    }

    /// The answer to [`Event::Full`]: closes the longest idle spare connection, if the node is
    /// still at its cap. If a connect of ours waits (`waiting`), that peer is dialed again once
    /// the close is done, and fails if no room can be made; a refused caller tries again by
    /// itself. The caps are twice the high watermark for inbound connections and twice that in
    /// all (`behaviour::hard_cap`), and trimming spares young connections, so a node that
    /// answered many lookups can sit at a cap for a while; neither its own calls nor its
    /// callers should fail for that, while an idle connection stays open.
    pub(crate) fn make_room(
        &mut self,
        waiting: Option<PeerId>,
        busy: &HashSet<PeerId>,
        recent: impl Fn(&PeerId) -> Option<Instant>,
    ) {
        let made = self.established >= crate::behaviour::hard_cap(&self.config)
            && match self
                .spare_peers(Duration::ZERO, busy, &recent)
                .into_iter()
                .find(|v| !self.room_for.contains_key(v))
            {
                Some(victim) => {
                    tracing::debug!(?waiting, %victim, "at the connection cap: closing an idle connection");
                    self.close(victim);
                    self.room_for.insert(victim, waiting);
                    true
                }
                None => false,
            };
        if !made
            && let Some(peer) = waiting
            && let Some(c) = self.connecting.get(&peer)
        {
            let reason = c.last_error.clone();
            self.connect_failed(peer, reason);
        }
    }

    /// Connected peers we could close on, the longest idle first: none `busy`, and none active
    /// within `grace`.
    fn spare_peers(
        &self,
        grace: Duration,
        busy: &HashSet<PeerId>,
        recent: &impl Fn(&PeerId) -> Option<Instant>,
    ) -> Vec<PeerId> {
        let active = |p: &PeerId| self.last_active.get(p).copied().max(recent(p));
        let mut spare: Vec<PeerId> = self
            .connected
            .keys()
            .filter(|p| !busy.contains(p) && active(p).is_none_or(|t| t.elapsed() >= grace))
            .copied()
            .collect();
        // A peer that was just busy is likely to be busy again (a request of its may be on
        // the way), and closing on it fails that request.
        spare.sort_by_key(|p| active(p));
        spare
    }

    fn close(&mut self, peer: PeerId) {
        self.push(ToSwarm::CloseConnection {
            peer_id: peer,
            connection: CloseConnection::All,
        });
    }

    fn dial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .addresses(addrs)
            .extend_addresses_through_behaviour()
            .build();
        self.push(ToSwarm::Dial { opts });
    }

    fn push(&mut self, event: ToSwarm<Event, Infallible>) {
        if self.events.len() < MAX_EVENTS {
            self.events.push_back(event);
        }
    }

    /// A dial to `peer`, which a connect waits for, failed: have room made if our own cap
    /// refused it, else see [`Self::connect_failed`].
    fn dial_failed(&mut self, peer: PeerId, error: &DialError) {
        let reason = dial_error(error);
        let Some(c) = self.connecting.get_mut(&peer) else {
            return;
        };
        if let DialError::Denied { .. } = error
            && c.rooms_made < ROOM_ATTEMPTS
        {
            c.rooms_made += 1;
            c.last_error = reason;
            self.push(ToSwarm::GenerateEvent(Event::Full {
                waiting: Some(peer),
            }));
            return;
        }
        self.connect_failed(peer, reason);
    }

    /// Connecting to `peer` failed: have it located once, else give up on its waiters.
    fn connect_failed(&mut self, peer: PeerId, reason: String) {
        let Some(c) = self.connecting.get_mut(&peer) else {
            return;
        };
        if !c.located {
            c.located = true;
            self.push(ToSwarm::GenerateEvent(Event::Locate(peer)));
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

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> std::result::Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> std::result::Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                *self.connected.entry(e.peer_id).or_default() += 1;
                self.established += 1;
                self.last_active.insert(e.peer_id, Instant::now());
                if let Some(c) = self.connecting.remove(&e.peer_id) {
                    for w in c.waiters {
                        let _ = w.send(Ok(()));
                    }
                }
                for w in self.any_waiters.drain(..) {
                    let _ = w.send(());
                }
            }
            FromSwarm::ConnectionClosed(e) => {
                self.established = self.established.saturating_sub(1);
                if e.remaining_established == 0 {
                    self.connected.remove(&e.peer_id);
                    self.last_active.remove(&e.peer_id);
                    if let Some(Some(waiting)) = self.room_for.remove(&e.peer_id)
                        && self.connecting.contains_key(&waiting)
                    {
                        self.dial(waiting, Vec::new());
                    }
                } else if let Some(n) = self.connected.get_mut(&e.peer_id) {
                    *n = n.saturating_sub(1);
                }
            }
            FromSwarm::DialFailure(e) => match (e.peer_id, e.error) {
                // Someone else's dial is under way: its outcome answers ours.
                (_, DialError::DialPeerConditionFalse(_)) => {}
                (Some(peer), error)
                    if self.connecting.contains_key(&peer) && !self.is_connected(&peer) =>
                {
                    self.dial_failed(peer, error);
                }
                // A DHT walk's dial: the walk has counted the peer as failed and goes on to
                // the next, but its next dials should find room.
                (_, DialError::Denied { .. }) => {
                    self.push(ToSwarm::GenerateEvent(Event::Full { waiting: None }));
                }
                _ => {}
            },
            FromSwarm::ListenFailure(e) => {
                if let ListenError::Denied { cause } = e.error {
                    // The swarm reports these silently; a node at its limits should say so.
                    tracing::debug!(peer = ?e.peer_id, "inbound connection refused: {cause}");
                    self.push(ToSwarm::GenerateEvent(Event::Full { waiting: None }));
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        libp2p::core::util::unreachable(event)
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        match self.events.pop_front() {
            Some(e) => Poll::Ready(e),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use libp2p::swarm::{Swarm, SwarmEvent};
    use libp2p_swarm_test::SwarmExt;

    use super::*;

    fn config(max: u32, min: u32) -> NetworkConfig {
        NetworkConfig {
            max_connections: max,
            min_connections: min,
            trim_grace: Duration::ZERO,
            ..NetworkConfig::default()
        }
    }

    fn swarm(max: u32, min: u32) -> Swarm<Behaviour> {
        Swarm::new_ephemeral_tokio(|_| Behaviour::new(config(max, min)))
    }

    /// Drives `others` in the background and `swarm` until `done` says stop.
    async fn drive_until<T>(
        swarm: &mut Swarm<Behaviour>,
        mut done: impl FnMut(&mut Swarm<Behaviour>, Option<Event>) -> Option<T>,
    ) -> T {
        tokio::time::timeout(Duration::from_secs(10), async {
            if let Some(t) = done(swarm, None) {
                return t;
            }
            loop {
                let event = match swarm.next_swarm_event().await {
                    SwarmEvent::Behaviour(e) => Some(e),
                    _ => None,
                };
                if let Some(t) = done(swarm, event) {
                    return t;
                }
            }
        })
        .await
        .expect("within 10 s")
    }

    #[tokio::test]
    async fn connect_locates_a_peer_with_no_address_then_answers() {
        let mut a = swarm(8, 4);
        let mut b = swarm(8, 4);
        let (addr, _) = b.listen().with_memory_addr_external().await;
        let b_id = *b.local_peer_id();
        tokio::spawn(b.loop_on_next());

        let (tx, mut rx) = oneshot::channel();
        a.behaviour_mut().connect(b_id, tx);
        // No address anywhere: the behaviour asks where the peer is.
        let asked = drive_until(&mut a, |_, e| match e {
            Some(Event::Locate(p)) => Some(p),
            _ => None,
        })
        .await;
        assert_eq!(asked, b_id);
        a.behaviour_mut().located(b_id, &[addr]);
        let answer = drive_until(&mut a, |_, _| rx.try_recv().ok()).await;
        assert!(answer.is_ok(), "not connected: {answer:?}");
        assert!(a.behaviour().is_connected(&b_id));
        // Connected now: a second connect answers at once.
        let (tx, rx) = oneshot::channel();
        a.behaviour_mut().connect(b_id, tx);
        assert!(rx.await.expect("answered").is_ok());
    }

    #[tokio::test]
    async fn a_peer_located_nowhere_is_unreachable() {
        let mut a = swarm(8, 4);
        let b_id = PeerId::random();
        let (tx, mut rx) = oneshot::channel();
        a.behaviour_mut().connect(b_id, tx);
        drive_until(&mut a, |_, e| {
            (e == Some(Event::Locate(b_id))).then_some(())
        })
        .await;
        a.behaviour_mut().located(b_id, &[]);
        let err = rx
            .try_recv()
            .expect("answered")
            .expect_err("nowhere to dial");
        assert!(
            err.to_string().contains("the DHT has none"),
            "unexpected error: {err}"
        );
    }

    #[tokio::test]
    async fn trimming_closes_the_idle_and_spares_the_busy() {
        // High watermark 1, low 1: of two peers, one goes.
        let mut a = swarm(1, 1);
        let mut busy_peer = swarm(8, 4);
        let mut idle_peer = swarm(8, 4);
        for other in [&mut busy_peer, &mut idle_peer] {
            other.listen().with_memory_addr_external().await;
            a.connect(other).await;
        }
        let (busy_id, idle_id) = (*busy_peer.local_peer_id(), *idle_peer.local_peer_id());
        tokio::spawn(busy_peer.loop_on_next());
        tokio::spawn(idle_peer.loop_on_next());
        assert_eq!(a.behaviour().connected.len(), 2);

        a.behaviour_mut().trim(&HashSet::from([busy_id]), |_| None);
        drive_until(&mut a, |s, _| {
            (!s.behaviour().is_connected(&idle_id)).then_some(())
        })
        .await;
        assert!(a.behaviour().is_connected(&busy_id));
        assert!(!a.behaviour().last_active.contains_key(&idle_id));

        // At the low watermark nothing more closes, busy or not.
        a.behaviour_mut().trim(&HashSet::new(), |_| None);
        assert!(a.behaviour().events.is_empty());
    }

    #[tokio::test]
    async fn trimming_spares_a_peer_active_within_the_grace() {
        let mut a = Swarm::new_ephemeral_tokio(|_| {
            Behaviour::new(NetworkConfig {
                trim_grace: Duration::from_secs(60),
                ..config(1, 1)
            })
        });
        let mut b = swarm(8, 4);
        let mut c = swarm(8, 4);
        for other in [&mut b, &mut c] {
            other.listen().with_memory_addr_external().await;
            a.connect(other).await;
        }
        tokio::spawn(b.loop_on_next());
        tokio::spawn(c.loop_on_next());
        // Both connected just now: inside the grace, nobody is closed.
        a.behaviour_mut().trim(&HashSet::new(), |_| None);
        assert!(a.behaviour().events.is_empty());
    }

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

//! The call pipe protocol as a libp2p behaviour: streams opened on a connection we hold, and
//! streams peers open, handed straight to the calling and serving tasks.
//!
//! [`Streams`] gives each connection a [`Handler`] and keeps, per connection, the sending end
//! of a channel to it. [`Control::open`] picks a connection to the peer (a direct one over a
//! relayed one, then the oldest: a new one is often a probe's dial-back, closed a moment
//! later) and sends its handler the request, so opening a stream does
//! not go through the swarm's task; the handler opens it and answers on a oneshot. Inbound
//! streams go from the handler into one bounded queue that the serving task reads
//! ([`Streams::incoming`]). Nothing dials: the caller connects through the event loop first
//! (it knows addresses, the DHT and relays), and `open` fails at once when no connection is
//! there.
//!
//! Each stream comes with a [`Gone`] that resolves when its connection has closed. A
//! connection closed gracefully (idle, trimmed, a probe's dial-back done) leaves its yamux
//! streams' reads waiting for ever (yamux 0.14 wakes them only when the connection fails), so
//! a call on a pipe whose connection closed so waited out its whole timeout. Pipes wait on
//! both.
//!
//! Bounds: [`ACCEPT_QUEUE`] inbound streams wait for the serving task (one arriving while the
//! queue is full is dropped; its opener sees the pipe close unread and tries a new one), and
//! [`OPEN_QUEUE`] open requests wait per connection (a caller waits for room).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::handler::{
    ConnectionEvent, ConnectionHandlerEvent, DialUpgradeError, FullyNegotiatedInbound,
    FullyNegotiatedOutbound, SubstreamProtocol,
};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionId, FromSwarm, NetworkBehaviour,
    StreamUpgradeError, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, Stream};
use tokio::sync::{mpsc, oneshot, watch};

use super::PROTOCOL;

/// Inbound call pipes waiting for the serving task.
pub(crate) const ACCEPT_QUEUE: usize = 256;
/// Requests to open a stream waiting for one connection's handler.
const OPEN_QUEUE: usize = 16;

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    #[error("not connected")]
    NotConnected,
    /// The connection closed (or its handler went away) before the stream opened.
    #[error("the connection closed before the stream opened")]
    Closed,
    /// The peer does not speak the protocol (only with eager negotiation).
    #[error("the peer does not support the protocol")]
    Unsupported,
    #[error("{0}")]
    Io(String),
}

type Reply = oneshot::Sender<Result<(Stream, Gone), OpenError>>;
/// Streams peers opened: who, the stream, and its connection's end.
pub(crate) type Incoming = mpsc::Receiver<(PeerId, Stream, Gone)>;

/// Resolves once a stream's connection has closed (its handler was dropped).
#[derive(Debug)]
pub(crate) struct Gone(watch::Receiver<()>);

impl Gone {
    pub(crate) async fn wait(&mut self) {
        // Nothing is ever sent: only the sender's drop ends this.
        while self.0.changed().await.is_ok() {}
    }
}

/// One connection's handler, as the opening side sees it.
struct Entry {
    peer: PeerId,
    relayed: bool,
    /// Made later than every entry with a lower value.
    order: u64,
    requests: mpsc::Sender<Reply>,
}

#[derive(Default)]
struct Connections {
    by_id: HashMap<ConnectionId, Entry>,
    made: u64,
}

/// Opens call pipe streams; cheap to clone.
#[derive(Clone)]
pub(crate) struct Control {
    connections: Arc<Mutex<Connections>>,
}

impl Control {
    /// Opens a stream to `peer` on a connection we hold. The caller bounds the time.
    pub(crate) async fn open(&self, peer: PeerId) -> Result<(Stream, Gone), OpenError> {
        let requests = {
            let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
            connections
                .by_id
                .iter()
                .filter(|(_, e)| e.peer == peer && !e.requests.is_closed())
                .min_by_key(|(_, e)| (e.relayed, e.order))
                .map(|(id, e)| {
                    tracing::debug!(%peer, connection = %id, "opening a call pipe");
                    e.requests.clone()
                })
        };
        let requests = requests.ok_or(OpenError::NotConnected)?;
        let (reply, answer) = oneshot::channel();
        requests.send(reply).await.map_err(|_| OpenError::Closed)?;
        answer.await.map_err(|_| OpenError::Closed)?
    }
}

/// The behaviour: a handler per connection, and the queue of inbound streams.
pub(crate) struct Streams {
    connections: Arc<Mutex<Connections>>,
    accepted: mpsc::Sender<(PeerId, Stream, Gone)>,
    incoming: Option<Incoming>,
}

impl Streams {
    pub(crate) fn new() -> Self {
        let (accepted, incoming) = mpsc::channel(ACCEPT_QUEUE);
        Streams {
            connections: Arc::default(),
            accepted,
            incoming: Some(incoming),
        }
    }

    pub(crate) fn control(&self) -> Control {
        Control {
            connections: self.connections.clone(),
        }
    }

    /// The streams peers open, with who opened them; there is one such queue, given once.
    pub(crate) fn incoming(&mut self) -> Option<Incoming> {
        self.incoming.take()
    }

    fn handler(&mut self, id: ConnectionId, peer: PeerId, addr: &Multiaddr) -> Handler {
        let (requests, pending) = mpsc::channel(OPEN_QUEUE);
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.made += 1;
        let order = connections.made;
        connections.by_id.insert(
            id,
            Entry {
                peer,
                relayed: addr.iter().any(|p| p == Protocol::P2pCircuit),
                order,
                requests,
            },
        );
        Handler {
            peer,
            pending,
            accepted: self.accepted.clone(),
            alive: watch::channel(()).0,
        }
    }

    fn forget(&mut self, id: ConnectionId) {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.by_id.remove(&id);
    }
}

impl NetworkBehaviour for Streams {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(id, peer, remote_addr))
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(id, peer, addr))
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match event {
            FromSwarm::ConnectionClosed(c) => self.forget(c.connection_id),
            // Another behaviour denied a connection we had made a handler for.
            FromSwarm::ListenFailure(f) => self.forget(f.connection_id),
            FromSwarm::DialFailure(f) => self.forget(f.connection_id),
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// Opens the streams asked of its connection, and queues those the peer opens.
pub(crate) struct Handler {
    peer: PeerId,
    pending: mpsc::Receiver<Reply>,
    accepted: mpsc::Sender<(PeerId, Stream, Gone)>,
    /// Dropped with the handler, when the connection has closed.
    alive: watch::Sender<()>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = ReadyUpgrade<libp2p::StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<libp2p::StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Reply;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, ()> {
        SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL), ())
    }

    // The streams themselves keep the connection open while they are.
    fn connection_keep_alive(&self) -> bool {
        false
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Reply, Infallible>> {
        match self.pending.poll_recv(cx) {
            Poll::Ready(Some(reply)) => {
                Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                    protocol: SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL), reply),
                })
            }
            _ => Poll::Pending,
        }
    }

    fn on_behaviour_event(&mut self, event: Infallible) {
        match event {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<'_, Self::InboundProtocol, Self::OutboundProtocol, (), Reply>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: stream,
                ..
            }) => {
                let gone = Gone(self.alive.subscribe());
                if let Err(e) = self.accepted.try_send((self.peer, stream, gone)) {
                    tracing::debug!(peer = %self.peer, "call pipe dropped: {e}");
                }
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                info: reply,
            }) => {
                let _ = reply.send(Ok((stream, Gone(self.alive.subscribe()))));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { info: reply, error }) => {
                let _ = reply.send(Err(match error {
                    StreamUpgradeError::NegotiationFailed => OpenError::Unsupported,
                    StreamUpgradeError::Timeout => OpenError::Io("timed out opening".to_owned()),
                    StreamUpgradeError::Io(e) => OpenError::Io(e.to_string()),
                    StreamUpgradeError::Apply(v) => match v {},
                }));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use libp2p::Swarm;
    use libp2p::futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    use libp2p::swarm::SwarmEvent;

    use super::*;

    const BOUND: Duration = Duration::from_secs(10);

    fn swarm() -> Swarm<Streams> {
        crate::test_swarm::tcp(None, |_| Streams::new())
    }

    /// Two swarms connected, each driven by its own task.
    async fn connected() -> (Streams2, Streams2) {
        let (a, b) = connected_swarms().await;
        (Streams2::run(a), Streams2::run(b))
    }

    async fn connected_swarms() -> (Swarm<Streams>, Swarm<Streams>) {
        let mut a = swarm();
        let mut b = swarm();
        a.listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
            .expect("listen");
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = a.select_next_some().await {
                break address;
            }
        };
        b.dial(addr).expect("dial");
        let (mut a_up, mut b_up) = (false, false);
        while !(a_up && b_up) {
            tokio::select! {
                e = a.select_next_some() => a_up |= matches!(e, SwarmEvent::ConnectionEstablished { .. }),
                e = b.select_next_some() => b_up |= matches!(e, SwarmEvent::ConnectionEstablished { .. }),
            }
        }
        (a, b)
    }

    struct Streams2 {
        peer: PeerId,
        control: Control,
        incoming: Incoming,
        _task: tokio::task::JoinHandle<()>,
    }

    impl Streams2 {
        fn run(mut swarm: Swarm<Streams>) -> Self {
            let peer = *swarm.local_peer_id();
            let control = swarm.behaviour().control();
            let incoming = swarm.behaviour_mut().incoming().expect("first taker");
            let task = tokio::spawn(async move {
                loop {
                    swarm.select_next_some().await;
                }
            });
            Streams2 {
                peer,
                control,
                incoming,
                _task: task,
            }
        }
    }

    /// A stream opened on one side arrives on the other, named by its opener, and carries
    /// bytes both ways.
    #[tokio::test]
    async fn a_stream_opened_arrives_at_the_peer_and_carries_bytes() {
        let (a, mut b) = tokio::time::timeout(BOUND, connected())
            .await
            .expect("connected");
        let (mut out, _) = tokio::time::timeout(BOUND, a.control.open(b.peer))
            .await
            .expect("in time")
            .expect("opened");
        out.write_all(b"ping").await.expect("write");
        out.flush().await.expect("flush");
        let (from, mut inbound, _) = tokio::time::timeout(BOUND, b.incoming.recv())
            .await
            .expect("in time")
            .expect("a stream");
        assert_eq!(from, a.peer);
        let mut buf = [0u8; 4];
        inbound.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        inbound.write_all(b"pong").await.expect("write");
        inbound.flush().await.expect("flush");
        out.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"pong");
    }

    /// Opening to a peer we hold no connection to fails at once: nothing dials.
    #[tokio::test]
    async fn opening_without_a_connection_fails_at_once() {
        let a = Streams2::run(swarm());
        let stranger = PeerId::random();
        let result = tokio::time::timeout(BOUND, a.control.open(stranger))
            .await
            .expect("at once");
        assert!(matches!(result, Err(OpenError::NotConnected)), "{result:?}");
    }

    /// Streams that arrive faster than the serving task takes them wait in the queue: none is
    /// dropped below its bound.
    #[tokio::test]
    async fn a_burst_of_streams_waits_for_the_serving_task() {
        let (a, mut b) = tokio::time::timeout(BOUND, connected())
            .await
            .expect("connected");
        let burst = 64;
        let mut opened = Vec::new();
        for i in 0..burst {
            let (mut s, _) = tokio::time::timeout(BOUND, a.control.open(b.peer))
                .await
                .expect("in time")
                .expect("opened");
            s.write_all(&[i as u8]).await.expect("write");
            s.flush().await.expect("flush");
            opened.push(s);
        }
        let mut seen = Vec::new();
        for _ in 0..burst {
            let (_, mut s, _) = tokio::time::timeout(BOUND, b.incoming.recv())
                .await
                .expect("in time")
                .expect("a stream");
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).await.expect("read");
            seen.push(byte[0]);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..burst as u8).collect::<Vec<_>>());
    }

    /// A connection closed gracefully (as idle and trimmed ones, and probes' dial-backs, are)
    /// ends the streams' `Gone`, on both sides.
    #[tokio::test]
    async fn gone_resolves_when_the_connection_closes_gracefully() {
        let (mut a, b) = tokio::time::timeout(BOUND, connected_swarms())
            .await
            .expect("connected");
        let control = a.behaviour().control();
        let mut b = Streams2::run(b);
        let open = control.open(b.peer);
        tokio::pin!(open);
        let (_out, mut gone) = tokio::time::timeout(BOUND, async {
            loop {
                tokio::select! {
                    r = &mut open => break r.expect("opened"),
                    _ = a.select_next_some() => {}
                }
            }
        })
        .await
        .expect("in time");
        let (_, _inbound, mut their_gone) = tokio::time::timeout(BOUND, b.incoming.recv())
            .await
            .expect("in time")
            .expect("a stream");
        assert!(a.disconnect_peer_id(b.peer).is_ok());
        tokio::time::timeout(BOUND, async {
            loop {
                tokio::select! {
                    _ = gone.wait() => break,
                    _ = a.select_next_some() => {}
                }
            }
        })
        .await
        .expect("our side saw the connection close");
        tokio::time::timeout(BOUND, their_gone.wait())
            .await
            .expect("their side saw the connection close");
    }
}

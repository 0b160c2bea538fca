//! Gossipsub, with connections kept open only for the peers in its meshes.
//!
//! libp2p's gossipsub handler keeps a connection open while the peer is in one of our meshes
//! (`connection_keep_alive`), but the swarm also keeps open every connection with a stream
//! that counts as active, and gossipsub's two long-lived streams (one each way, opened on every
//! connection to exchange subscriptions) always count (rust-libp2p issue #5190). So every
//! connection that ever exchanged subscriptions stays open: a DHT walk reaches most of a
//! network, and in netsim's 200-node start-up every node ended up connected to every other
//! (18,400 connections, each polled, pinged and gossiped to) while the idle timeout never fired.
//!
//! [`Gossip`] wraps the behaviour's handler (`wrap.rs`), and marks those two streams
//! [`ignore_for_keep_alive`](libp2p::swarm::Stream::ignore_for_keep_alive) as they are
//! handed over, so gossipsub's own keep-alive (the peer is in a mesh) decides. Nothing else
//! changes: the calls, events and messages are the behaviour's own.

use std::task::{Context, Poll};

use futures::future::Either;
use libp2p::gossipsub;
use libp2p::swarm::handler::{
    ConnectionEvent, ConnectionHandlerEvent, FullyNegotiatedInbound, FullyNegotiatedOutbound,
    SubstreamProtocol,
};
use libp2p::swarm::{ConnectionHandler, THandler};

use crate::wrap::{Wrap, Wrapped};

/// [`gossipsub::Behaviour`] whose streams leave the connection's keep-alive to its mesh.
pub(crate) type Gossip = Wrapped<gossipsub::Behaviour, MeshKeepAlive>;

/// Gossipsub's handler with its streams marked.
pub(crate) struct MeshKeepAlive;

impl Gossip {
    pub(crate) fn new(inner: gossipsub::Behaviour) -> Self {
        Wrapped::with(inner, MeshKeepAlive)
    }
}

type Inner = THandler<gossipsub::Behaviour>;

impl Wrap<Inner> for MeshKeepAlive {
    type Handler = Handler;

    fn wrap(&self, inner: Inner) -> Handler {
        Handler(inner)
    }
}

/// Gossipsub's connection handler; its streams do not keep the connection open.
pub(crate) struct Handler(Inner);

impl ConnectionHandler for Handler {
    type FromBehaviour = <Inner as ConnectionHandler>::FromBehaviour;
    type ToBehaviour = <Inner as ConnectionHandler>::ToBehaviour;
    type InboundProtocol = <Inner as ConnectionHandler>::InboundProtocol;
    type OutboundProtocol = <Inner as ConnectionHandler>::OutboundProtocol;
    type InboundOpenInfo = <Inner as ConnectionHandler>::InboundOpenInfo;
    type OutboundOpenInfo = <Inner as ConnectionHandler>::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.0.listen_protocol()
    }

    fn connection_keep_alive(&self) -> bool {
        self.0.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        self.0.poll(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.0.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.0.on_behaviour_event(event);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            '_,
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        let event = match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                mut protocol,
                info,
            }) => {
                if let Either::Left((framed, _)) = &mut protocol {
                    framed.ignore_for_keep_alive();
                }
                ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol, info })
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                mut protocol,
                info,
            }) => {
                protocol.0.ignore_for_keep_alive();
                ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound { protocol, info })
            }
            other => other,
        };
        self.0.on_connection_event(event);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use libp2p::Swarm;
    use libp2p::futures::StreamExt;
    use libp2p::gossipsub::{IdentTopic, MessageAuthenticity};
    use libp2p::swarm::SwarmEvent;

    use super::*;

    const IDLE: Duration = Duration::from_secs(1);
    const BOUND: Duration = Duration::from_secs(20);

    fn swarm() -> Swarm<Gossip> {
        crate::test_swarm::tcp(Some(IDLE), |key| {
            let config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(100))
                .build()
                .expect("config");
            Gossip::new(
                gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), config)
                    .expect("behaviour"),
            )
        })
    }

    /// Two connected swarms, subscribed to the given topics, once each has heard the other's
    /// subscriptions (the long-lived streams are open both ways).
    async fn pair(a_topic: &str, b_topic: &str) -> (Swarm<Gossip>, Swarm<Gossip>) {
        let mut a = swarm();
        let mut b = swarm();
        a.behaviour_mut()
            .subscribe(&IdentTopic::new(a_topic))
            .expect("subscribe");
        b.behaviour_mut()
            .subscribe(&IdentTopic::new(b_topic))
            .expect("subscribe");
        a.listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
            .expect("listen");
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = a.select_next_some().await {
                break address;
            }
        };
        b.dial(addr).expect("dial");
        let (mut a_heard, mut b_heard) = (false, false);
        while !(a_heard && b_heard) {
            tokio::select! {
                event = a.select_next_some() => if let SwarmEvent::Behaviour(gossipsub::Event::Subscribed { .. }) = event { a_heard = true },
                event = b.select_next_some() => if let SwarmEvent::Behaviour(gossipsub::Event::Subscribed { .. }) = event { b_heard = true },
            }
        }
        (a, b)
    }

    /// Peers that share no topic have no mesh between them: their connection closes once idle,
    /// though both of gossipsub's streams are open on it.
    #[tokio::test]
    async fn a_connection_outside_every_mesh_closes_when_idle() {
        let (mut a, mut b) = tokio::time::timeout(BOUND, pair("left", "right"))
            .await
            .expect("subscriptions exchanged");
        let closed = tokio::time::timeout(BOUND, async {
            loop {
                tokio::select! {
                    event = a.select_next_some() => if let SwarmEvent::ConnectionClosed { .. } = event { return },
                    _ = b.select_next_some() => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the idle connection stayed open");
    }

    /// Peers in one mesh keep their connection: a message published well after the idle
    /// timeout arrives over the connection made at the start.
    #[tokio::test]
    async fn a_connection_in_a_mesh_stays_open() {
        let (mut a, mut b) = tokio::time::timeout(BOUND, pair("shared", "shared"))
            .await
            .expect("subscriptions exchanged");
        let topic = IdentTopic::new("shared");
        let mut publish = tokio::time::interval_at(
            tokio::time::Instant::now() + IDLE * 4,
            Duration::from_millis(500),
        );
        let received = tokio::time::timeout(BOUND, async {
            loop {
                tokio::select! {
                    event = a.select_next_some() => match event {
                        SwarmEvent::ConnectionClosed { .. } => return false,
                        SwarmEvent::Behaviour(gossipsub::Event::Message { .. }) => return true,
                        _ => {}
                    },
                    event = b.select_next_some() => if let SwarmEvent::ConnectionClosed { .. } = event { return false },
                    // Published once the connection has been idle for longer than its timeout;
                    // again until it arrives (the first may come before the mesh is grafted).
                    _ = publish.tick() => {
                        let _ = b.behaviour_mut().publish(topic.clone(), b"hello".to_vec());
                    }
                }
            }
        })
        .await;
        assert_eq!(
            received,
            Ok(true),
            "the mesh's connection closed or the message never came"
        );
    }
}

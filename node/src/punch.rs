//! Hole punching (DCUtR) with the addresses worth punching to.
//!
//! libp2p's DCUtR offers the peer the addresses identify reported others seeing this node at,
//! the most recent first, and nothing else. Two things go wrong with that alone: an address
//! probes confirmed (or a public node's listen addresses, confirmed at start) is never
//! reported again, since identify stays quiet about addresses already confirmed, so a public
//! node offered nothing that works; and what a peer sees across a relayed connection
//! (`/p2p/<id>`, no transport at all) was offered, and in netsim it was all a public node
//! offered. [`Punch`] wraps the behaviour: only addresses with a transport reach it, confirmed
//! ones are offered as well, and QUIC addresses are offered first (QUIC punches with one UDP
//! socket and no TCP simultaneous open).

use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::{ExternalAddrConfirmed, ExternalAddrExpired};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NewExternalAddrCandidate,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, dcutr};

/// Addresses kept to offer again, at most (DCUtR keeps 20).
const MAX_KEPT: usize = 8;

/// DCUtR, offering confirmed and QUIC addresses first and nothing without a transport.
pub(crate) struct Punch {
    inner: dcutr::Behaviour,
    /// Confirmed addresses, offered after every new candidate so they stay first.
    confirmed: Vec<Multiaddr>,
    /// QUIC candidates, likewise, ahead of the rest.
    quic: Vec<Multiaddr>,
}

/// Whether a peer can dial `addr`: it starts with a network or memory address.
pub(crate) fn has_transport(addr: &Multiaddr) -> bool {
    matches!(
        addr.iter().next(),
        Some(
            Protocol::Ip4(_)
                | Protocol::Ip6(_)
                | Protocol::Dns(_)
                | Protocol::Dns4(_)
                | Protocol::Dns6(_)
                | Protocol::Memory(_)
        )
    ) && !addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::QuicV1))
}

fn remember(list: &mut Vec<Multiaddr>, addr: &Multiaddr) {
    if let Some(i) = list.iter().position(|a| a == addr) {
        list.remove(i);
    }
    if list.len() >= MAX_KEPT {
        list.remove(0);
    }
    list.push(addr.clone());
}

impl Punch {
    pub(crate) fn new(me: PeerId) -> Self {
        Punch {
            inner: dcutr::Behaviour::new(me),
            confirmed: Vec::new(),
            quic: Vec::new(),
        }
    }

    /// Offers `addr` to DCUtR, then the kept addresses again so they stay in front: QUIC
    /// candidates, then confirmed addresses (QUIC ones last, so first of all).
    fn offer(&mut self, addr: &Multiaddr) {
        self.inner
            .on_swarm_event(FromSwarm::NewExternalAddrCandidate(
                NewExternalAddrCandidate { addr },
            ));
        let mut again: Vec<&Multiaddr> = self.quic.iter().collect();
        again.extend(self.confirmed.iter().filter(|a| !is_quic(a)));
        again.extend(self.confirmed.iter().filter(|a| is_quic(a)));
        for a in again {
            if a != addr {
                self.inner
                    .on_swarm_event(FromSwarm::NewExternalAddrCandidate(
                        NewExternalAddrCandidate { addr: a },
                    ));
            }
        }
    }
}

impl NetworkBehaviour for Punch {
    type ConnectionHandler = THandler<dcutr::Behaviour>;
    type ToSwarm = dcutr::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner
            .handle_established_inbound_connection(id, peer, local, remote)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addrs: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
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
        self.inner
            .handle_established_outbound_connection(id, peer, addr, role, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match event {
            FromSwarm::NewExternalAddrCandidate(NewExternalAddrCandidate { addr }) => {
                if has_transport(addr) {
                    if is_quic(addr) {
                        remember(&mut self.quic, addr);
                    }
                    self.offer(addr);
                }
            }
            FromSwarm::ExternalAddrConfirmed(ExternalAddrConfirmed { addr }) => {
                self.inner.on_swarm_event(event);
                if has_transport(addr) {
                    remember(&mut self.confirmed, addr);
                    self.offer(addr);
                }
            }
            FromSwarm::ExternalAddrExpired(ExternalAddrExpired { addr }) => {
                self.confirmed.retain(|a| a != addr);
                self.inner.on_swarm_event(event);
            }
            other => self.inner.on_swarm_event(other),
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner.on_connection_handler_event(peer, id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_with_a_transport_are_punched_to() {
        let a = |s: &str| -> Multiaddr { s.parse().expect("addr") };
        assert!(has_transport(&a("/ip4/198.18.0.2/tcp/4001")));
        assert!(has_transport(&a("/ip6/2001:db8::1/udp/4001/quic-v1")));
        assert!(has_transport(&a("/memory/10058")));
        assert!(!has_transport(&a(
            "/p2p/12D3KooWB9cbkD7Ny95zj1cgxp9pkhyaPU5185UZf25HvpQKSZ1K"
        )));
        assert!(!has_transport(&a(
            "/ip4/198.18.0.1/tcp/4001/p2p/12D3KooWB9cbkD7Ny95zj1cgxp9pkhyaPU5185UZf25HvpQKSZ1K/p2p-circuit"
        )));
    }
}

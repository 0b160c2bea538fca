//! A libp2p behaviour with its connection handlers wrapped: everything is the inner behaviour's
//! but the handler each connection gets, which a [`Wrap`] makes from the inner one. How
//! `deferred.rs` holds back a handler's first streams and `gossip.rs` takes gossipsub's streams
//! out of the keep-alive, without a vendored copy of either behaviour.

use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Makes the handler a connection gets from the inner behaviour's handler `H`. The events
/// between handler and behaviour stay the inner ones.
pub(crate) trait Wrap<H: ConnectionHandler> {
    type Handler: ConnectionHandler<FromBehaviour = H::FromBehaviour, ToBehaviour = H::ToBehaviour>;

    fn wrap(&self, inner: H) -> Self::Handler;
}

/// `inner`, with every connection's handler passed through `wrap`.
pub(crate) struct Wrapped<B, W> {
    inner: B,
    wrap: W,
}

impl<B, W> Wrapped<B, W> {
    pub(crate) fn with(inner: B, wrap: W) -> Self {
        Wrapped { inner, wrap }
    }
}

impl<B, W> std::ops::Deref for Wrapped<B, W> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.inner
    }
}

impl<B, W> std::ops::DerefMut for Wrapped<B, W> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B, W> NetworkBehaviour for Wrapped<B, W>
where
    B: NetworkBehaviour,
    W: Wrap<THandler<B>> + 'static,
{
    type ConnectionHandler = W::Handler;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let inner = self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )?;
        Ok(self.wrap.wrap(inner))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let inner = self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )?;
        Ok(self.wrap.wrap(inner))
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner
            .on_connection_handler_event(peer_id, connection_id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}

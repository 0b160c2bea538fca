//! Holds back the streams a behaviour opens on a new connection, for a moment.
//!
//! Every new connection makes identify, ping and gossipsub open a stream each way at once:
//! their negotiations and messages, on both nodes, in the very milliseconds the stream the
//! connection was made for (a skill call, a DHT request) needs the CPU. [`Deferred`] wraps such
//! a behaviour: until a connection is `delay` old, the streams its handler asks to open wait
//! (in order, then all go). Everything else runs as before: the handler answers what the peer
//! opens at once, and its events reach the behaviour at once.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::swarm::ConnectionHandler;
use libp2p::swarm::handler::{ConnectionEvent, ConnectionHandlerEvent, SubstreamProtocol};

use crate::wrap::{Wrap, Wrapped};

/// A behaviour whose handlers open no stream of their own until their connection is `delay`
/// old.
pub(crate) type Deferred<B> = Wrapped<B, Delay>;

/// How long a connection's handler holds back the streams it opens.
pub(crate) struct Delay(Duration);

impl<B> Deferred<B> {
    /// Holds back the streams `inner`'s handlers open, on every connection.
    pub(crate) fn new(inner: B, delay: Duration) -> Self {
        Wrapped::with(inner, Delay(delay))
    }
}

impl<H: ConnectionHandler> Wrap<H> for Delay {
    type Handler = Handler<H>;

    fn wrap(&self, inner: H) -> Handler<H> {
        Handler::new(inner, self.0)
    }
}

/// Streams a handler asked to open while its connection was young, at most. Identify and ping
/// ask for one each.
const MAX_HELD: usize = 8;

/// A connection handler whose requests to open streams wait until its delay has passed.
pub(crate) struct Handler<H: ConnectionHandler> {
    inner: H,
    wait: Wait,
    held: VecDeque<SubstreamProtocol<H::OutboundProtocol, H::OutboundOpenInfo>>,
}

enum Wait {
    /// No timer yet. It is made on the first poll, which runs on the connection's task; the
    /// handler itself is made on the swarm's.
    Until(Instant),
    Timer(Pin<Box<tokio::time::Sleep>>),
    Over,
}

impl<H: ConnectionHandler> Handler<H> {
    fn new(inner: H, delay: Duration) -> Self {
        Handler {
            inner,
            wait: match delay.is_zero() {
                true => Wait::Over,
                false => Wait::Until(Instant::now() + delay),
            },
            held: VecDeque::new(),
        }
    }

    /// Whether the delay has passed; if not, the task is woken when it does.
    fn over(&mut self, cx: &mut Context<'_>) -> bool {
        if let Wait::Until(at) = self.wait {
            self.wait = Wait::Timer(Box::pin(tokio::time::sleep_until(at.into())));
        }
        if let Wait::Timer(timer) = &mut self.wait {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            self.wait = Wait::Over;
        }
        true
    }
}

impl<H: ConnectionHandler> ConnectionHandler for Handler<H> {
    type FromBehaviour = H::FromBehaviour;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = H::InboundProtocol;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.inner.listen_protocol()
    }

    fn connection_keep_alive(&self) -> bool {
        self.inner.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        loop {
            if !self.held.is_empty()
                && self.over(cx)
                && let Some(protocol) = self.held.pop_front()
            {
                return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { protocol });
            }
            match self.inner.poll(cx) {
                // Past the bound the stream opens now: late, never lost.
                Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { protocol })
                    if self.held.len() < MAX_HELD && !self.over(cx) =>
                {
                    self.held.push_back(protocol);
                }
                other => return other,
            }
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.inner.on_behaviour_event(event);
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
        self.inner.on_connection_event(event);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use libp2p::futures::StreamExt;
    use libp2p::swarm::SwarmEvent;
    use libp2p::{Swarm, ping};

    use super::*;

    const DELAY: Duration = Duration::from_secs(1);

    fn swarm(behaviour: Deferred<ping::Behaviour>) -> Swarm<Deferred<ping::Behaviour>> {
        crate::test_swarm::tcp(None, |_| behaviour)
    }

    /// How long after its connection each side's first ping succeeded: the listener's, the
    /// dialer's. A side's ping goes out on a stream it opens itself, and is answered by the
    /// other side's handler.
    async fn first_pings(listener_delay: Duration, dialer_delay: Duration) -> (Duration, Duration) {
        let deferred = |delay| Deferred::new(ping::Behaviour::default(), delay);
        let mut listener = swarm(deferred(listener_delay));
        listener
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
            .expect("listen");
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = listener.select_next_some().await {
                break address;
            }
        };
        let mut dialer = swarm(deferred(dialer_delay));
        dialer.dial(addr).expect("dial");
        let first_ping = |mut swarm: Swarm<Deferred<ping::Behaviour>>| async move {
            let mut connected = None;
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { .. } => connected = Some(Instant::now()),
                    SwarmEvent::Behaviour(ping::Event { result: Ok(_), .. }) => {
                        let at = connected.expect("a ping comes after its connection");
                        // Keep answering the other side until it has its ping too.
                        tokio::spawn(async move {
                            loop {
                                swarm.select_next_some().await;
                            }
                        });
                        return at.elapsed();
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(
            Duration::from_secs(10),
            futures::future::join(first_ping(listener), first_ping(dialer)),
        )
        .await
        .expect("both sides pinged within 10 s")
    }

    /// Ping opens its stream and pings the moment a connection is made; deferred, neither side
    /// pings before the delay has passed, and both do after it.
    #[tokio::test]
    async fn streams_a_handler_opens_wait_for_the_delay() {
        let (listener, dialer) = first_pings(DELAY, DELAY).await;
        assert!(listener >= DELAY, "the listener pinged after {listener:?}");
        assert!(dialer >= DELAY, "the dialer pinged after {dialer:?}");
    }

    /// A handler whose own streams wait still answers at once what the peer opens: the
    /// listener, not deferred, pings at once, and the deferred dialer answers it.
    #[tokio::test]
    async fn a_deferred_handler_answers_at_once_while_its_own_streams_wait() {
        let (listener, dialer) = first_pings(Duration::ZERO, DELAY).await;
        assert!(listener < DELAY, "the listener pinged after {listener:?}");
        assert!(dialer >= DELAY, "the dialer pinged after {dialer:?}");
    }
}

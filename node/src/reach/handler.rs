//! One connection's side of AutoNAT v2 probes: dial requests to a server on this connection,
//! and the dial-back a server makes on the connection it dialed to us.

use std::collections::VecDeque;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{AsyncWriteExt, FutureExt, StreamExt};
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
    ProtocolsChange,
};
use libp2p::swarm::{
    ConnectionHandler, ConnectionHandlerEvent, Stream, StreamUpgradeError, SubstreamProtocol,
};
use libp2p::{Multiaddr, StreamProtocol};

use super::messages::{self, DIAL_BACK, DIAL_REQUEST, Message, Msg};

/// How long a probe may take, from asking for the stream to the server's answer. The server
/// gives its dial 10 s (libp2p's server) and answers then; a server that never answers, as
/// when its TCP dial into a NAT that drops packets outlasts its own timeout, makes the probe
/// inconclusive.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a server may take to send the nonce on a dial-back stream.
const DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Probes in flight on one connection, and dial-back streams read at once.
const MAX_PROBES: usize = 4;
const MAX_DIAL_BACKS: usize = 4;

/// What a server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// It dialed the address and reached this node (the behaviour still checks the nonce).
    Reached,
    /// It dialed the address and could not connect.
    NotReached,
    /// Nothing can be concluded: the probe could not be made, or the answer says nothing of
    /// the address.
    Inconclusive(String),
}

#[derive(Debug)]
pub(crate) enum FromBehaviour {
    /// Ask the server on this connection to dial `addr` and send `nonce` there.
    Probe { nonce: u64, addr: Multiaddr },
}

#[derive(Debug)]
pub(crate) enum ToBehaviour {
    /// Whether the peer serves AutoNAT v2 dial requests (identify told us its protocols).
    Server(bool),
    /// A server's answer to one of our probes.
    Answer { nonce: u64, answer: Answer },
    /// A server sent this nonce on a connection it dialed.
    DialBack { nonce: u64 },
}

type Outbound = BoxFuture<'static, (u64, Answer)>;

pub(crate) struct Handler {
    /// Probes asked for, waiting for the swarm to open their streams.
    to_open: VecDeque<(u64, Multiaddr)>,
    probes: FuturesUnordered<Outbound>,
    /// Probes that are open or being opened, to bound them.
    in_flight: usize,
    dial_backs: FuturesUnordered<BoxFuture<'static, Option<(u64, Stream)>>>,
    answering: FuturesUnordered<BoxFuture<'static, ()>>,
    events: VecDeque<ToBehaviour>,
}

impl Handler {
    pub(crate) fn new() -> Self {
        Handler {
            to_open: VecDeque::new(),
            probes: FuturesUnordered::new(),
            in_flight: 0,
            dial_backs: FuturesUnordered::new(),
            answering: FuturesUnordered::new(),
            events: VecDeque::new(),
        }
    }

    fn answer(&mut self, nonce: u64, answer: Answer) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.events.push_back(ToBehaviour::Answer { nonce, answer });
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = FromBehaviour;
    type ToBehaviour = ToBehaviour;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = (u64, Multiaddr);

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(DIAL_BACK), ())
    }

    fn connection_keep_alive(&self) -> bool {
        self.in_flight > 0 || !self.dial_backs.is_empty() || !self.answering.is_empty()
    }

    fn on_behaviour_event(&mut self, event: FromBehaviour) {
        let FromBehaviour::Probe { nonce, addr } = event;
        if self.in_flight >= MAX_PROBES {
            self.events.push_back(ToBehaviour::Answer {
                nonce,
                answer: Answer::Inconclusive("too many probes on one connection".into()),
            });
            return;
        }
        self.in_flight += 1;
        self.to_open.push_back((nonce, addr));
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            '_,
            Self::InboundProtocol,
            Self::OutboundProtocol,
            (),
            (u64, Multiaddr),
        >,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                info: (nonce, addr),
            }) => {
                self.probes.push(
                    async move {
                        let answer =
                            tokio::time::timeout(PROBE_TIMEOUT, probe(stream, nonce, addr))
                                .await
                                .unwrap_or_else(|_| {
                                    Answer::Inconclusive("the server did not answer in time".into())
                                });
                        (nonce, answer)
                    }
                    .boxed(),
                );
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError {
                info: (nonce, _),
                error,
            }) => {
                let why = match error {
                    StreamUpgradeError::NegotiationFailed => {
                        self.events.push_back(ToBehaviour::Server(false));
                        "the peer does not serve AutoNAT v2".to_owned()
                    }
                    StreamUpgradeError::Timeout => "opening the stream timed out".to_owned(),
                    StreamUpgradeError::Io(e) => format!("stream: {e}"),
                    StreamUpgradeError::Apply(v) => libp2p::core::util::unreachable(v),
                };
                self.answer(nonce, Answer::Inconclusive(why));
            }
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: mut stream,
                ..
            }) => {
                if self.dial_backs.len() >= MAX_DIAL_BACKS {
                    return;
                }
                self.dial_backs.push(
                    async move {
                        let nonce = tokio::time::timeout(
                            DIAL_BACK_TIMEOUT,
                            messages::read_dial_back(&mut stream),
                        )
                        .await
                        .ok()?
                        .ok()?;
                        Some((nonce, stream))
                    }
                    .boxed(),
                );
            }
            ConnectionEvent::RemoteProtocolsChange(change) => {
                let (added, mut protocols): (bool, Box<dyn Iterator<Item = &StreamProtocol>>) =
                    match change {
                        ProtocolsChange::Added(p) => (true, Box::new(p)),
                        ProtocolsChange::Removed(p) => (false, Box::new(p)),
                    };
                if protocols.any(|p| *p == DIAL_REQUEST) {
                    self.events.push_back(ToBehaviour::Server(added));
                }
            }
            _ => {}
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (u64, Multiaddr), ToBehaviour>> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(e));
            }
            if let Some(info) = self.to_open.pop_front() {
                return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                    protocol: SubstreamProtocol::new(ReadyUpgrade::new(DIAL_REQUEST), info)
                        .with_timeout(PROBE_TIMEOUT),
                });
            }
            if let Poll::Ready(Some((nonce, answer))) = self.probes.poll_next_unpin(cx) {
                self.answer(nonce, answer);
                continue;
            }
            // The behaviour hears of the nonce before the server can: the answer that lets
            // the server report success goes out only after this event.
            if let Poll::Ready(Some(read)) = self.dial_backs.poll_next_unpin(cx) {
                if let Some((nonce, mut stream)) = read {
                    self.answering.push(
                        async move {
                            let _ = tokio::time::timeout(
                                DIAL_BACK_TIMEOUT,
                                messages::answer_dial_back(&mut stream),
                            )
                            .await;
                            let _ = stream.close().await;
                        }
                        .boxed(),
                    );
                    self.events.push_back(ToBehaviour::DialBack { nonce });
                }
                continue;
            }
            if let Poll::Ready(Some(())) = self.answering.poll_next_unpin(cx) {
                continue;
            }
            return Poll::Pending;
        }
    }
}

/// One probe on an open dial-request stream: asks the server to dial `addr`, sends the data it
/// may ask for first, and reads its answer.
async fn probe(mut stream: Stream, nonce: u64, addr: Multiaddr) -> Answer {
    let inconclusive = |what: &str, e: std::io::Error| Answer::Inconclusive(format!("{what}: {e}"));
    let request = Message {
        msg: Some(Msg::DialRequest(messages::DialRequest {
            addrs: vec![addr.to_vec()],
            nonce,
        })),
    };
    if let Err(e) = messages::write(&mut stream, &request).await {
        return inconclusive("sending the request", e);
    }
    let mut sent_data = false;
    let response = loop {
        let msg: Message = match messages::read(&mut stream, messages::MAX_MESSAGE).await {
            Ok(m) => m,
            Err(e) => return inconclusive("reading the answer", e),
        };
        match msg.msg {
            Some(Msg::DialDataRequest(r))
                if !sent_data
                    && r.addr_idx == 0
                    && (messages::DATA_MIN..=messages::DATA_MAX).contains(&r.num_bytes) =>
            {
                sent_data = true;
                if let Err(e) = messages::send_data(&mut stream, r.num_bytes).await {
                    return inconclusive("sending the data the server asked for", e);
                }
            }
            Some(Msg::DialDataRequest(r)) => {
                return Answer::Inconclusive(format!(
                    "the server asked for {} bytes of data, outside the protocol's bounds",
                    r.num_bytes
                ));
            }
            Some(Msg::DialResponse(r)) => break r,
            _ => return Answer::Inconclusive("unexpected message from the server".into()),
        }
    };
    let _ = stream.close().await;
    match (response.status, response.dial_status) {
        (messages::RESPONSE_OK, messages::DIAL_OK) if response.addr_idx == 0 => Answer::Reached,
        (messages::RESPONSE_OK, messages::DIAL_ERROR) => Answer::NotReached,
        // It connected, so the address leads somewhere; the stream failing says nothing more.
        (messages::RESPONSE_OK, messages::DIAL_BACK_ERROR) => {
            Answer::Inconclusive("the server connected, but its dial-back stream failed".into())
        }
        (messages::REQUEST_REJECTED, _) => {
            Answer::Inconclusive("the server rejected the request".into())
        }
        (messages::DIAL_REFUSED, _) => {
            Answer::Inconclusive("the server refused to dial the address".into())
        }
        (status, dial) => Answer::Inconclusive(format!(
            "the server answered status {status}, dial status {dial}"
        )),
    }
}

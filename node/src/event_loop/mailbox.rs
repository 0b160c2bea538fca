//! The mail transport: mailbox requests out (retried once at the peer's current addresses
//! when its known ones fail), and inbound ones served by the mail service in tasks of their
//! own, whose answers come back on a bounded channel to be sent.

use std::collections::HashMap;
use std::sync::Arc;

use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ResponseChannel};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::mail::service::MailService;
use crate::wire::FrameCodec;

/// Answers of inbound mailbox requests waiting to be sent.
const RESPONSE_BUFFER: usize = 1024;
/// Requests waiting for their peer to be located, per peer.
const MAX_WAITING_PER_PEER: usize = 256;

type Mailbox = request_response::Behaviour<FrameCodec>;

/// An answer to an inbound mailbox request, ready to send.
pub(super) struct Response {
    peer: PeerId,
    channel: ResponseChannel<Vec<u8>>,
    response: Vec<u8>,
}

/// A mailbox request on its way.
struct Request {
    peer: PeerId,
    request: Vec<u8>,
    reply: oneshot::Sender<Result<Vec<u8>>>,
    /// Whether the peer was located for it already: a second failure is final.
    located: bool,
}

/// What the event loop must do for the transport.
pub(super) enum Needs {
    /// Nothing.
    Nothing,
    /// `peer` was active: it is closed on last.
    Active(PeerId),
    /// Find where `peer` is and answer with [`MailTransport::located`].
    Locate(PeerId),
}

pub(super) struct MailTransport {
    mail: Arc<MailService>,
    requests: HashMap<OutboundRequestId, Request>,
    /// Requests whose peer is being located.
    waiting: HashMap<PeerId, Vec<Request>>,
    /// Inbound requests being served, per peer: their connections are not trimmed.
    serving: HashMap<PeerId, u32>,
    responses_tx: mpsc::Sender<Response>,
    responses_rx: mpsc::Receiver<Response>,
    inflight: JoinSet<()>,
}

impl MailTransport {
    pub(super) fn new(mail: Arc<MailService>) -> Self {
        let (responses_tx, responses_rx) = mpsc::channel(RESPONSE_BUFFER);
        MailTransport {
            mail,
            requests: HashMap::new(),
            waiting: HashMap::new(),
            serving: HashMap::new(),
            responses_tx,
            responses_rx,
            inflight: JoinSet::new(),
        }
    }

    pub(super) fn service(&self) -> &MailService {
        &self.mail
    }

    /// Peers with a request in flight either way: their connections stay.
    pub(super) fn busy(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.requests
            .values()
            .map(|r| r.peer)
            .chain(self.serving.keys().copied())
    }

    pub(super) fn send(
        &mut self,
        mailbox: &mut Mailbox,
        peer: PeerId,
        request: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>>>,
    ) {
        self.send_request(
            mailbox,
            Request {
                peer,
                request,
                reply,
                located: false,
            },
        );
    }

    fn send_request(&mut self, mailbox: &mut Mailbox, r: Request) {
        let id = mailbox.send_request(&r.peer, r.request.clone());
        self.requests.insert(id, r);
    }

    /// Where `peer` is now, after [`Needs::Locate`]: its waiting requests go again, or fail.
    pub(super) fn located(&mut self, mailbox: &mut Mailbox, peer: PeerId, addrs: &[Multiaddr]) {
        for mut r in self.waiting.remove(&peer).unwrap_or_default() {
            if addrs.is_empty() {
                let _ = r.reply.send(Err(Error::Unreachable {
                    peer: Box::new(peer),
                    reason: "no address known, and the DHT has none".to_owned(),
                }));
            } else {
                r.located = true;
                self.send_request(mailbox, r);
            }
        }
    }

    /// The next answer of an inbound request, ready to send with [`Self::respond`], or `None`
    /// when a task serving one ended.
    pub(super) async fn next(&mut self) -> Option<Response> {
        tokio::select! {
            Some(r) = self.responses_rx.recv() => Some(r),
            Some(_) = self.inflight.join_next(), if !self.inflight.is_empty() => None,
        }
    }

    /// Whether no inbound request is being served.
    pub(super) fn idle(&self) -> bool {
        self.inflight.is_empty()
    }

    pub(super) fn respond(&mut self, mailbox: &mut Mailbox, r: Response) {
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
        let _ = mailbox.send_response(channel, response);
    }

    pub(super) fn on_event(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) -> Needs {
        match event {
            request_response::Event::Message { peer, message, .. } => {
                match message {
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
                }
                Needs::Active(peer)
            }
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                let Some(r) = self.requests.remove(&request_id) else {
                    return Needs::Nothing;
                };
                match error {
                    // We may only know stale addresses: ask the DHT where the peer is now.
                    OutboundFailure::DialFailure if !r.located => {
                        let peer = r.peer;
                        let waiting = self.waiting.entry(peer).or_default();
                        if waiting.len() < MAX_WAITING_PER_PEER {
                            waiting.push(r);
                        } else {
                            let _ = r.reply.send(Err(Error::Unreachable {
                                peer: Box::new(peer),
                                reason: "too many requests waiting for it to be found".to_owned(),
                            }));
                        }
                        return Needs::Locate(peer);
                    }
                    OutboundFailure::Timeout => {
                        let _ = r
                            .reply
                            .send(Err(Error::Timeout(skillmesh_protocol::MAX_CALL_WINDOW)));
                    }
                    other => {
                        let _ = r.reply.send(Err(Error::Unreachable {
                            peer: Box::new(r.peer),
                            reason: other.to_string(),
                        }));
                    }
                }
                Needs::Nothing
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "inbound mailbox request failed: {error}");
                Needs::Nothing
            }
            _ => Needs::Nothing,
        }
    }

    /// Stops: answers that finished last are sent, the rest aborted, and requests of ours
    /// fail.
    pub(super) async fn shut_down(&mut self, mailbox: &mut Mailbox) {
        while let Ok(r) = self.responses_rx.try_recv() {
            self.respond(mailbox, r);
        }
        self.inflight.abort_all();
        // Aborted tasks still hold the store until they are polled out.
        while self.inflight.join_next().await.is_some() {}
        let waiting = self.waiting.drain().flat_map(|(_, v)| v);
        for r in self.requests.drain().map(|(_, r)| r).chain(waiting) {
            let _ = r.reply.send(Err(Error::ShutDown));
        }
    }
}

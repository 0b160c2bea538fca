//! End-to-end encrypted messages between agents, delivered directly or through mailboxes
//! (protocol/README.md §6).
//!
//! [`Messenger`] is the node's side of it: `send` seals a message (Olm, then a signed
//! `sealed-message` envelope) and hands it to the recipient itself over `/skillmesh/mailbox/1`
//! when it answers, else deposits it at the mailboxes in the recipient's card. It also fetches
//! this node's own mail from its mailboxes, on every connection to one and periodically, and
//! keeps received messages durably until the application takes them from [`Inbox`].
//!
//! [`service`] is the other side: it answers mailbox requests, storing deposits for others when
//! this node runs a mailbox and taking messages addressed to itself.

pub(crate) mod olm;
pub(crate) mod service;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Future, Stream};
use libp2p::PeerId;
use libp2p::kad::RecordKey;
use serde_bytes::ByteBuf;
use skillmesh_protocol::envelope::{self, Checks};
use skillmesh_protocol::keys::mailbox_key;
use skillmesh_protocol::{
    AgentCard, ControlMessage, Deposit, Fetch, MAX_CIPHERTEXT_BYTES, MAX_FETCH_BATCH,
    MailboxErrorCode, MailboxRequest, MailboxResponse, MessageId, PrekeyBundle, SealedMessage,
    SigningKey, Timestamp, from_cbor, to_cbor,
};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::Config;
use crate::discovery::remember_card;
use crate::error::{Error, Result};
use crate::event_loop::Command;
use crate::store::{Accepted, InboxEntry, Store};
use olm::{Crypto, CryptoError};

/// Largest message `send` takes: the ciphertext limit less Olm's framing and padding.
pub const MAX_MESSAGE_BYTES: usize = MAX_CIPHERTEXT_BYTES - 1024;

/// How long a choice of mailboxes found in the DHT stands before it is searched again.
const MAILBOX_SEARCH_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// The first wait after a search that found nothing (or `mail.fetch_interval` if longer). A
/// search is a DHT walk: in a network without mailbox relays, searching every few fetch rounds
/// made mailbox searches 40 % of all DHT requests in a 200-node netsim run.
const MAILBOX_SEARCH_MIN_BACKOFF: Duration = Duration::from_secs(60);
/// The longest wait between searches that found nothing (the wait doubles).
const MAILBOX_SEARCH_MAX_BACKOFF: Duration = Duration::from_secs(30 * 60);

/// When the DHT was last searched for mailboxes, and the wait before the next search.
#[derive(Debug, Default)]
struct MailboxSearch {
    last: Option<Instant>,
    wait: Duration,
}

/// A received message, as the application gets it.
pub type Message = InboxEntry;

/// How a message was delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// The recipient took it directly.
    Direct,
    /// The recipient was unreachable; these mailboxes hold it for it.
    Deposited(Vec<PeerId>),
}

/// The outcome of [`crate::Node::send`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendReport {
    /// The sealed message's id.
    pub id: MessageId,
    /// Its sequence number towards this recipient.
    pub seq: u64,
    /// Where it went.
    pub delivery: Delivery,
}

/// Why a received message was not taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReceiveError {
    #[error("bad envelope: {0}")]
    Envelope(#[from] skillmesh_protocol::EnvelopeError),
    #[error("addressed to {0}, not this node")]
    NotForMe(PeerId),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("control message refused: {0}")]
    Control(String),
}

struct State {
    crypto: Crypto,
    out_seq: HashMap<PeerId, u64>,
}

/// The node's messaging: Olm state, sending, fetching, and the inbox.
pub(crate) struct Messenger {
    me: PeerId,
    signing: SigningKey,
    store: Store,
    config: Arc<Config>,
    /// Weak, so that the node still stops when the application drops its last handle.
    commands: mpsc::WeakSender<Command>,
    state: tokio::sync::Mutex<State>,
    /// This node's mailboxes, as advertised in its card.
    mailboxes: Mutex<Vec<PeerId>>,
    /// Wakes the inbox when a message arrives.
    arrived: Notify,
    /// Wakes the fetcher (a connection to a mailbox, or a request).
    fetch_now: Notify,
    /// Where control messages (async call results) go.
    calls: Arc<crate::async_calls::AsyncCalls>,
    /// Mailbox searches are a DHT walk each: a node searches again when its choice is old or a
    /// mailbox failed, not on every fetch (a 200-node netsim run, every node fetching each 5 s,
    /// spent most of its dials on them).
    search: Mutex<MailboxSearch>,
}

impl Messenger {
    /// Loads (or creates) the Olm account and sessions.
    pub(crate) async fn load(
        signing: SigningKey,
        identity_secret: &[u8],
        store: Store,
        config: Arc<Config>,
        commands: mpsc::WeakSender<Command>,
        calls: Arc<crate::async_calls::AsyncCalls>,
    ) -> Result<(Arc<Self>, PrekeyBundle)> {
        let saved = store.olm_state().await?;
        let (crypto, save) = Crypto::load(&saved, olm::pickle_key(identity_secret))
            .map_err(|e| Error::Transport(format!("mail keys: {e}")))?;
        if save {
            let (a, p) = crypto.account_blobs();
            store.save_olm_account(a, p).await?;
        }
        let bundle = crypto.bundle();
        let messenger = Arc::new(Messenger {
            me: signing.peer_id(),
            signing,
            store,
            config,
            commands,
            state: tokio::sync::Mutex::new(State {
                crypto,
                out_seq: saved.out_seq.into_iter().collect(),
            }),
            mailboxes: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            fetch_now: Notify::new(),
            calls,
            search: Mutex::default(),
        });
        messenger.calls.set_messenger(&messenger);
        Ok((messenger, bundle))
    }

    fn commands(&self) -> Result<mpsc::Sender<Command>> {
        self.commands.upgrade().ok_or(Error::ShutDown)
    }

    async fn request<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.commands()?
            .send(make(tx))
            .await
            .map_err(|_| Error::ShutDown)?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Sends one mailbox request and decodes the answer.
    async fn mailbox_request(
        &self,
        peer: PeerId,
        request: &MailboxRequest,
        timeout: Duration,
    ) -> Result<MailboxResponse> {
        let bytes = to_cbor(request);
        let answer = tokio::time::timeout(
            timeout,
            self.request(|reply| Command::Mailbox {
                peer,
                request: bytes,
                reply,
            }),
        )
        .await
        .map_err(|_| Error::Timeout(timeout))???;
        from_cbor(&answer, skillmesh_protocol::MAX_MAILBOX_RESPONSE_BYTES).map_err(|e| {
            Error::BadResponse {
                peer: Box::new(peer),
                reason: e.to_string(),
            }
        })
    }

    /// This node's mailboxes.
    pub(crate) fn mailboxes(&self) -> Vec<PeerId> {
        self.mailboxes.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Wakes the fetcher if `peer` is one of this node's mailboxes.
    pub(crate) fn connected(&self, peer: &PeerId) {
        if self.mailboxes().contains(peer) {
            self.fetch_now.notify_one();
        }
    }

    /// Encrypts and signs message `seq` for `peer` (0: a control message), persisting the
    /// ratchet first.
    async fn seal(
        &self,
        state: &mut State,
        peer: PeerId,
        seq: u64,
        bundle: Option<&PrekeyBundle>,
        one_time: bool,
        data: &[u8],
    ) -> Result<(Vec<u8>, MessageId, Option<String>)> {
        // A control message is outside the application's sequence: the counter stays.
        let counter = match seq {
            0 => state.out_seq.get(&peer).copied().unwrap_or(0),
            n => n,
        };
        let (sealed, evicted) =
            state
                .crypto
                .encrypt(peer, bundle, one_time, data)
                .map_err(|e| Error::Undelivered {
                    peer: Box::new(peer),
                    reason: e.to_string(),
                })?;
        if !evicted.is_empty() {
            self.store.remove_sessions(evicted).await?;
        }
        let session_id = sealed
            .unconfirmed_one_time
            .then(|| sealed.session.id.clone());
        self.store
            .save_outbound(peer, counter, sealed.session)
            .await?;
        let message = SealedMessage {
            sender: self.me,
            recipient: peer,
            seq,
            created_at: Timestamp::now(),
            cipher: sealed.cipher,
            ciphertext: ByteBuf::from(sealed.bytes),
        };
        let bytes = envelope::seal(&self.signing, &message)?;
        let id = envelope::verify(&bytes)?.id();
        Ok((bytes, id, session_id))
    }

    /// Sends `data` to `peer`: directly when it answers, else to its mailboxes.
    pub(crate) async fn send(&self, peer: PeerId, data: &[u8]) -> Result<SendReport> {
        self.send_on(peer, data, false).await
    }

    /// Sends a control message ([`ControlMessage`], CBOR) to `peer`, as [`Messenger::send`]
    /// does; it goes to the node, not to the application's inbox.
    pub(crate) async fn send_control(&self, peer: PeerId, data: &[u8]) -> Result<SendReport> {
        self.send_on(peer, data, true).await
    }

    async fn send_on(&self, peer: PeerId, data: &[u8], control: bool) -> Result<SendReport> {
        if data.len() > MAX_MESSAGE_BYTES {
            return Err(Error::Invalid(skillmesh_protocol::ValidationError::new(
                "data",
                format!("{} bytes, at most {MAX_MESSAGE_BYTES}", data.len()),
            )));
        }
        if peer == self.me {
            return Err(Error::Invalid(skillmesh_protocol::ValidationError::new(
                "peer",
                "is this node",
            )));
        }
        // Also hands the card's addresses to the swarm.
        let card = self.card_of(peer).await?;
        let bundle = card.as_ref().and_then(|c| c.prekeys.clone());
        let ttl = u32::try_from(self.config.mail.ttl.as_secs()).unwrap_or(u32::MAX);
        let direct_timeout = self.config.mail.direct_timeout;

        // The state lock orders sequence numbers as the ratchet advances. It is never held
        // across the network: two agents sending to each other at once would each wait for
        // the other's lock in `receive` until the direct attempt timed out.
        let (seq, mut bytes, mut id, mut fresh) = {
            let mut state = self.state.lock().await;
            if !state.crypto.has_session(&peer) && bundle.is_none() {
                return Err(Error::NotFound(format!(
                    "no card with prekeys for {peer} in the DHT; it must have been online once"
                )));
            }
            let seq = if control {
                0
            } else {
                let seq = state.out_seq.get(&peer).copied().unwrap_or(0) + 1;
                state.out_seq.insert(peer, seq);
                seq
            };
            let (bytes, id, fresh) = self
                .seal(&mut state, peer, seq, bundle.as_ref(), true, data)
                .await?;
            (seq, bytes, id, fresh)
        };
        let mut reasons = Vec::new();
        for attempt in 0..2 {
            let request = MailboxRequest::Deposit(Deposit {
                message: ByteBuf::from(bytes.clone()),
                ttl_secs: ttl,
            });
            match self.mailbox_request(peer, &request, direct_timeout).await {
                Ok(MailboxResponse::Deposited { .. }) => {
                    return Ok(SendReport {
                        id,
                        seq,
                        delivery: Delivery::Direct,
                    });
                }
                Ok(MailboxResponse::Error {
                    code: MailboxErrorCode::BadMessage,
                    message,
                }) if attempt == 0 && fresh.is_some() => {
                    // Most likely another sender used the same one-time key first.
                    tracing::debug!(%peer, "direct delivery refused ({message}); retrying with the fallback key");
                }
                Ok(MailboxResponse::Error { code, message }) => {
                    reasons.push(format!("{peer} (direct): {code:?}: {message}"));
                    break;
                }
                Ok(_) => {
                    reasons.push(format!("{peer} (direct): unexpected answer"));
                    break;
                }
                Err(e) => {
                    reasons.push(format!("{peer} (direct): {e}"));
                    break;
                }
            }
            if let Some(sid) = fresh.take() {
                let mut state = self.state.lock().await;
                state.crypto.forget(&peer, &sid);
                (bytes, id, fresh) = self
                    .seal(&mut state, peer, seq, bundle.as_ref(), false, data)
                    .await?;
            }
        }
        // Mail waits at a relay for any time: it must not depend on a one-time key that
        // another sender may take first.
        if let Some(sid) = fresh.take() {
            let mut state = self.state.lock().await;
            state.crypto.forget(&peer, &sid);
            (bytes, id, _) = self
                .seal(&mut state, peer, seq, bundle.as_ref(), false, data)
                .await?;
        }

        let mailboxes: Vec<PeerId> = card
            .map(|c| c.mailboxes)
            .unwrap_or_default()
            .into_iter()
            .filter(|m| *m != self.me)
            .collect();
        if mailboxes.is_empty() {
            reasons.push("its card names no mailbox".to_owned());
            return Err(Error::Undelivered {
                peer: Box::new(peer),
                reason: reasons.join("; "),
            });
        }
        let request = MailboxRequest::Deposit(Deposit {
            message: ByteBuf::from(bytes),
            ttl_secs: ttl,
        });
        let timeout = self.config.calls.timeout;
        let answers = futures::future::join_all(
            mailboxes
                .iter()
                .map(|m| self.mailbox_request(*m, &request, timeout)),
        )
        .await;
        let mut held = Vec::new();
        for (m, answer) in mailboxes.iter().zip(answers) {
            match answer {
                Ok(MailboxResponse::Deposited { .. }) => held.push(*m),
                Ok(MailboxResponse::Error { code, message }) => {
                    reasons.push(format!("mailbox {m}: {code:?}: {message}"));
                }
                Ok(_) => reasons.push(format!("mailbox {m}: unexpected answer")),
                Err(e) => reasons.push(format!("mailbox {m}: {e}")),
            }
        }
        if held.is_empty() {
            return Err(Error::Undelivered {
                peer: Box::new(peer),
                reason: reasons.join("; "),
            });
        }
        Ok(SendReport {
            id,
            seq,
            delivery: Delivery::Deposited(held),
        })
    }

    /// `peer`'s newest card: from the DHT (then remembered), else the one in the store. Either
    /// way its addresses go to the swarm.
    pub(crate) async fn card_of(&self, peer: PeerId) -> Result<Option<AgentCard>> {
        let timeout = self.config.dht.query_timeout;
        let found = tokio::time::timeout(
            timeout,
            self.request(|reply| Command::GetCard {
                peer,
                addrs: Vec::new(),
                reply,
            }),
        )
        .await
        .ok()
        .transpose()?
        .flatten();
        if let Some((card, bytes)) = &found {
            remember_card(&self.commands()?, &self.store, card, bytes.clone()).await;
        }
        let stored = self
            .store
            .card(peer, Timestamp::now())
            .await?
            .and_then(|stored| {
                envelope::open::<AgentCard>(&stored.envelope, &Checks::now())
                    .ok()
                    .map(|o| o.value)
                    .filter(|c| c.peer_id == peer)
            });
        // A DHT lookup may answer with an older card than one we hold (a node that missed the
        // newer record): the newest wins, or mail goes to mailboxes the peer has left, or to
        // none ("its card names no mailbox" while the newer card names two).
        let card = match (found, stored) {
            (Some((found, _)), Some(stored)) if stored.seq > found.seq => Some(stored),
            (Some((found, _)), _) => return Ok(Some(found)),
            (None, stored) => stored,
        };
        if let Some(c) = &card {
            self.commands()?
                .send(Command::AddAddresses {
                    peer,
                    addrs: c.addrs.clone(),
                })
                .await
                .map_err(|_| Error::ShutDown)?;
        }
        Ok(card)
    }

    /// Takes a sealed message addressed to this node: verifies, dedupes, decrypts and stores it.
    pub(crate) async fn receive(
        &self,
        bytes: &[u8],
    ) -> Result<(MessageId, Accepted), ReceiveError> {
        let opened = envelope::open::<SealedMessage>(bytes, &Checks::now())?;
        self.accept(opened).await
    }

    /// [`Messenger::receive`] for a message whose envelope is already verified and decoded.
    async fn accept(
        &self,
        opened: envelope::Opened<SealedMessage>,
    ) -> Result<(MessageId, Accepted), ReceiveError> {
        let m = opened.value;
        if m.recipient != self.me {
            return Err(ReceiveError::NotForMe(m.recipient));
        }
        if m.seq == 0 {
            return self.accept_control(opened.id, m).await;
        }
        let mut state = self.state.lock().await;
        // Checked before decrypting: a message key works once, and a full inbox must leave the
        // ratchet untouched so the message can be fetched again later.
        match self
            .store
            .check_message(m.sender, m.seq, self.config.mail.max_inbox)
            .await?
        {
            Accepted::Stored => {}
            other => return Ok((opened.id, other)),
        }
        let (plain, evicted) = state.crypto.decrypt(m.sender, m.cipher, &m.ciphertext)?;
        if !evicted.is_empty() {
            self.store.remove_sessions(evicted).await?;
        }
        let account_changed = plain.account.is_some();
        let entry = InboxEntry {
            id: opened.id,
            from: m.sender,
            seq: m.seq,
            sent_at: m.created_at,
            received_at: Timestamp::now(),
            data: ByteBuf::from(plain.plaintext),
        };
        let accepted = self
            .store
            .accept_message(
                entry,
                plain.session,
                plain.account,
                self.config.mail.max_inbox,
            )
            .await?;
        if account_changed {
            // A one-time key was used: publish the replenished bundle.
            let bundle = state.crypto.bundle();
            if let Ok(tx) = self.commands() {
                let _ = tx.try_send(Command::SetCard {
                    prekeys: Some(bundle),
                    mailboxes: None,
                });
            }
        }
        drop(state);
        if accepted == Accepted::Stored {
            self.arrived.notify_waiters();
        }
        Ok((opened.id, accepted))
    }

    /// A control message: decrypted (a second copy of one fails here: its message key is
    /// spent), checked, and kept with the ratchet's new state in one transaction.
    async fn accept_control(
        &self,
        id: MessageId,
        m: SealedMessage,
    ) -> Result<(MessageId, Accepted), ReceiveError> {
        let mut state = self.state.lock().await;
        let (plain, evicted) = state.crypto.decrypt(m.sender, m.cipher, &m.ciphertext)?;
        if !evicted.is_empty() {
            self.store.remove_sessions(evicted).await?;
        }
        let control: ControlMessage = from_cbor(&plain.plaintext, MAX_CIPHERTEXT_BYTES)
            .map_err(|e| ReceiveError::Control(format!("not a control message: {e}")))?;
        let bytes = control.call_result.ok_or_else(|| {
            ReceiveError::Control("a control message with nothing in it".to_owned())
        })?;
        let result = self
            .calls
            .check(m.sender, &bytes)
            .map_err(ReceiveError::Control)?;
        let record = crate::store::AsyncRecord {
            peer: m.sender,
            stored_at: Timestamp::now(),
            result: bytes,
            delivered: true,
        };
        let fresh = self
            .store
            .accept_call_result(
                plain.session,
                plain.account,
                result.call_id,
                record,
                self.calls.keep(),
            )
            .await?;
        drop(state);
        if !fresh {
            return Ok((id, Accepted::Duplicate));
        }
        let (calls, from) = (self.calls.clone(), m.sender);
        tokio::spawn(async move { calls.arrived(from, &result).await });
        Ok((id, Accepted::Stored))
    }

    /// Chooses this node's mailboxes: the configured ones, else mailbox relays from the DHT.
    async fn choose_mailboxes(&self) -> Vec<PeerId> {
        let configured: Vec<PeerId> = self
            .config
            .mail
            .mailboxes
            .iter()
            .filter_map(|a| match a.iter().last() {
                Some(libp2p::multiaddr::Protocol::P2p(p)) => Some(p),
                _ => None,
            })
            .collect();
        let max = self.config.mail.max_mailboxes as usize;
        if max == 0 {
            return Vec::new();
        }
        if !configured.is_empty() {
            return configured.into_iter().take(max).collect();
        }
        let current = self.mailboxes();
        {
            let search = self.search.lock().unwrap_or_else(|e| e.into_inner());
            if search.last.is_some_and(|t| t.elapsed() < search.wait) {
                return current;
            }
        }
        let mut found = self
            .request(|reply| Command::FindProviders {
                key: RecordKey::new(&mailbox_key()),
                counted: false,
                reply,
            })
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|(p, _)| p)
            .collect::<Vec<_>>();
        found.retain(|p| *p != self.me);
        // Keep mailboxes that are still offered, so mail already waiting is still fetched.
        let mut chosen: Vec<PeerId> = current.into_iter().filter(|p| found.contains(p)).collect();
        found.sort_by_key(|p| p.to_bytes());
        for p in found {
            if chosen.len() >= max {
                break;
            }
            if !chosen.contains(&p) {
                chosen.push(p);
            }
        }
        let mut search = self.search.lock().unwrap_or_else(|e| e.into_inner());
        search.last = Some(Instant::now());
        search.wait = if chosen.is_empty() {
            (search.wait * 2)
                .max(self.config.mail.fetch_interval)
                .max(MAILBOX_SEARCH_MIN_BACKOFF)
                .min(MAILBOX_SEARCH_MAX_BACKOFF)
        } else {
            MAILBOX_SEARCH_INTERVAL
        };
        chosen
    }

    /// Fetches and acks everything waiting at one mailbox. Returns messages taken.
    async fn fetch_from(&self, mailbox: PeerId) -> Result<usize> {
        let mut taken = 0;
        let timeout = self.config.calls.timeout;
        loop {
            let answer = self
                .mailbox_request(
                    mailbox,
                    &MailboxRequest::Fetch(Fetch {
                        limit: MAX_FETCH_BATCH,
                    }),
                    timeout,
                )
                .await?;
            let (messages, more) = match answer {
                MailboxResponse::Messages { messages, more } => (messages, more),
                MailboxResponse::Error { code, message } => {
                    return Err(Error::BadResponse {
                        peer: Box::new(mailbox),
                        reason: format!("{code:?}: {message}"),
                    });
                }
                _ => {
                    return Err(Error::BadResponse {
                        peer: Box::new(mailbox),
                        reason: "unexpected answer to fetch".to_owned(),
                    });
                }
            };
            let mut ack = Vec::new();
            let mut full = false;
            // The signatures are checked as a batch, and the messages decrypted in each
            // sender's order: the mailbox keeps arrival order, concurrent sends may arrive out
            // of it, and a ratchet keeps only 40 skipped message keys per chain.
            let slices: Vec<&[u8]> = messages.iter().map(|m| m.as_slice()).collect();
            let checks = Checks::now();
            let mut opened = Vec::with_capacity(messages.len());
            for (m, verified) in slices.iter().zip(envelope::verify_batch(&slices)) {
                // `verify_batch` checks each envelope's size for its kind, `decode` the kind.
                match verified.and_then(|v| v.decode::<SealedMessage>(&checks)) {
                    Ok(o) => opened.push(o),
                    Err(e) => {
                        // Forged or malformed: nothing will change that; drop it.
                        tracing::warn!(%mailbox, "dropped a bad message: {e}");
                        if let Ok(v) = envelope::verify(m) {
                            ack.push(v.id());
                        }
                    }
                }
            }
            opened.sort_by_key(|o| (o.value.sender.to_bytes(), o.value.seq));
            for o in opened {
                let id = o.id;
                match self.accept(o).await {
                    Ok((id, Accepted::Stored)) => {
                        taken += 1;
                        ack.push(id);
                    }
                    Ok((id, Accepted::Duplicate)) => ack.push(id),
                    Ok((_, Accepted::Full)) => {
                        full = true;
                        break;
                    }
                    Err(ReceiveError::Store(e)) => return Err(e.into()),
                    Err(e) => {
                        // Undecryptable: nothing will change that; drop it.
                        tracing::warn!(%mailbox, "dropped a bad message: {e}");
                        ack.push(id);
                    }
                }
            }
            if !ack.is_empty() {
                for chunk in ack.chunks(skillmesh_protocol::MAX_ACK_IDS) {
                    self.mailbox_request(
                        mailbox,
                        &MailboxRequest::Ack(skillmesh_protocol::Ack {
                            ids: chunk.to_vec(),
                        }),
                        timeout,
                    )
                    .await?;
                }
            }
            if full {
                tracing::warn!(
                    "inbox full ({}); mail stays at the mailbox",
                    self.config.mail.max_inbox
                );
                return Ok(taken);
            }
            if !more || messages.is_empty() {
                return Ok(taken);
            }
        }
    }

    /// One round: refresh the mailbox choice (republishing the card when it changed), then
    /// fetch from each.
    pub(crate) async fn fetch_round(&self) -> usize {
        let chosen = self.choose_mailboxes().await;
        let changed = {
            let mut m = match self.mailboxes.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            let changed = *m != chosen;
            *m = chosen.clone();
            changed
        };
        if changed {
            let Ok(tx) = self.commands() else { return 0 };
            let _ = tx
                .send(Command::SetCard {
                    prekeys: None,
                    mailboxes: Some(chosen.clone()),
                })
                .await;
        }
        let mut total = 0;
        for m in chosen {
            match self.fetch_from(m).await {
                Ok(n) => total += n,
                Err(e) => {
                    tracing::debug!(mailbox = %m, "fetch failed: {e}");
                    // The mailbox may be gone: look for others soon, but not every round
                    // while it stays down.
                    let mut search = self.search.lock().unwrap_or_else(|e| e.into_inner());
                    search.wait = search.wait.min(self.config.mail.fetch_interval * 4);
                }
            }
        }
        total
    }

    /// Fetches at start, on every connection to a mailbox, and every `mail.fetch_interval`.
    pub(crate) async fn run_fetcher(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.mail.fetch_interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.fetch_now.notified() => {}
            }
            if self.commands.upgrade().is_none() {
                return;
            }
            self.fetch_round().await;
        }
    }

    /// The next message for the application, waiting for one.
    pub(crate) async fn next_message(&self) -> Result<Message> {
        loop {
            // Registered before looking, so an arrival in between is not missed.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let (taken, wake) = self
                .store
                .take_inbox(Timestamp::now(), self.config.mail.reorder_wait)
                .await?;
            if let Some(m) = taken {
                return Ok(m);
            }
            let wait = wake
                .map(|w| {
                    Duration::from_millis(
                        w.as_millis().saturating_sub(Timestamp::now().as_millis()),
                    )
                })
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = arrived => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// A message if one is ready now.
    pub(crate) async fn try_next_message(&self) -> Result<Option<Message>> {
        Ok(self
            .store
            .take_inbox(Timestamp::now(), self.config.mail.reorder_wait)
            .await?
            .0)
    }
}

/// Received messages, in order per sender; each is handed out once (see [`crate::Node::inbox`]).
///
/// Taking a message runs in its own task, so a `next()` cut short (a timeout around it) loses
/// nothing: the next poll gets the message that task took.
pub struct Inbox {
    messenger: Arc<Messenger>,
    taking: Option<tokio::task::JoinHandle<Result<Message>>>,
}

impl Inbox {
    pub(crate) fn new(messenger: Arc<Messenger>) -> Self {
        Inbox {
            messenger,
            taking: None,
        }
    }
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        if let Some(t) = self.taking.take() {
            t.abort();
        }
    }
}

impl Stream for Inbox {
    type Item = Result<Message>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let task = this.taking.get_or_insert_with(|| {
            let m = this.messenger.clone();
            tokio::spawn(async move { m.next_message().await })
        });
        match Pin::new(task).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                this.taking = None;
                Poll::Ready(Some(r.unwrap_or(Err(Error::ShutDown))))
            }
        }
    }
}

//! The answering side of `/skillmesh/mailbox/1`.
//!
//! Every node takes mail addressed to itself (direct delivery). A node with `relay.mailbox`
//! also holds mail for others: a deposit is answered only after its redb commit (fsync), and
//! deposits that arrive while a commit runs share the next one, so the fsync rate, not the
//! deposit rate, bounds throughput under load.

use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use skillmesh_protocol::envelope::{self, Checks};
use skillmesh_protocol::{
    MAX_MAILBOX_REQUEST_BYTES, MAX_MAILBOX_RESPONSE_BYTES, MailboxErrorCode, MailboxRequest,
    MailboxResponse, SealedMessage, Timestamp, from_cbor, to_cbor,
};
use tokio::sync::{mpsc, oneshot};

use super::{Messenger, ReceiveError};
use crate::store::{Accepted, Deposited, MailQuota, MailRecord, Store};

/// Deposits waiting for the writer; senders wait (backpressure) when it is full.
const DEPOSIT_QUEUE: usize = 1024;
/// Deposits committed together at most.
const MAX_BATCH: usize = 256;
/// How often expired mail is deleted.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// Room in a fetch answer for its framing.
const RESPONSE_SLACK: usize = 16 * 1024;

type Waiting = (MailRecord, oneshot::Sender<Result<Deposited, DepositError>>);

#[derive(Debug, Clone)]
enum DepositError {
    Quota(MailQuota),
    Store(String),
}

/// Answers mailbox requests.
pub(crate) struct MailService {
    me: PeerId,
    store: Store,
    messenger: Arc<Messenger>,
    /// `None` when this node holds no mail for others.
    deposits: Option<mpsc::Sender<Waiting>>,
    max_ttl: Duration,
}

impl MailService {
    /// Starts the service; with `mailbox`, also its writer and purge tasks.
    pub(crate) fn start(
        store: Store,
        messenger: Arc<Messenger>,
        mailbox: bool,
        max_ttl: Duration,
    ) -> Arc<Self> {
        let deposits = mailbox.then(|| {
            let (tx, rx) = mpsc::channel(DEPOSIT_QUEUE);
            tokio::spawn(run_mailbox(store.clone(), rx));
            tx
        });
        Arc::new(MailService {
            me: messenger.me,
            store,
            messenger,
            deposits,
            max_ttl,
        })
    }

    /// The node's messenger.
    pub(crate) fn messenger(&self) -> &Arc<Messenger> {
        &self.messenger
    }

    /// Whether this node holds mail for others.
    pub(crate) fn is_mailbox(&self) -> bool {
        self.deposits.is_some()
    }

    /// Answers one request from `peer` (the connection's authenticated peer).
    pub(crate) async fn handle(&self, peer: PeerId, request: Vec<u8>) -> Vec<u8> {
        let response = match from_cbor::<MailboxRequest>(&request, MAX_MAILBOX_REQUEST_BYTES) {
            Err(e) => error(
                MailboxErrorCode::BadRequest,
                format!("undecodable request: {e}"),
            ),
            Ok(r) => match r.validate() {
                Err(e) => error(MailboxErrorCode::BadRequest, e.to_string()),
                Ok(()) => self.answer(peer, r).await,
            },
        };
        to_cbor(&response)
    }

    async fn answer(&self, peer: PeerId, request: MailboxRequest) -> MailboxResponse {
        match request {
            MailboxRequest::Deposit(d) => {
                let opened = match envelope::open::<SealedMessage>(&d.message, &Checks::now()) {
                    Ok(o) => o,
                    Err(e) => return error(MailboxErrorCode::BadMessage, e.to_string()),
                };
                if opened.value.sender != peer {
                    return error(
                        MailboxErrorCode::BadMessage,
                        "the sender must deposit its own mail".to_owned(),
                    );
                }
                if opened.value.recipient == self.me {
                    return self.deliver(&d.message).await;
                }
                let Some(deposits) = &self.deposits else {
                    return error(
                        MailboxErrorCode::NoMailbox,
                        "this node holds no mail for others".to_owned(),
                    );
                };
                let now = Timestamp::now();
                let expires_at = now.saturating_add(d.ttl().min(self.max_ttl));
                let record = MailRecord {
                    id: opened.id,
                    sender: opened.value.sender,
                    recipient: opened.value.recipient,
                    deposited_at: now,
                    expires_at,
                    envelope: d.message,
                };
                let (tx, rx) = oneshot::channel();
                if deposits.send((record, tx)).await.is_err() {
                    return error(
                        MailboxErrorCode::Internal,
                        "the mailbox is shutting down".to_owned(),
                    );
                }
                match rx.await {
                    Ok(Ok(_)) => MailboxResponse::Deposited {
                        id: opened.id,
                        expires_at,
                    },
                    Ok(Err(DepositError::Quota(q))) => {
                        let code = match q {
                            MailQuota::SenderCount | MailQuota::SenderBytes => {
                                MailboxErrorCode::SenderQuota
                            }
                            _ => MailboxErrorCode::RecipientFull,
                        };
                        error(code, q.to_string())
                    }
                    Ok(Err(DepositError::Store(e))) => error(MailboxErrorCode::Internal, e),
                    Err(_) => error(
                        MailboxErrorCode::Internal,
                        "the mailbox writer stopped".to_owned(),
                    ),
                }
            }
            MailboxRequest::Fetch(f) => {
                if !self.is_mailbox() {
                    return error(
                        MailboxErrorCode::NoMailbox,
                        "this node holds no mail for others".to_owned(),
                    );
                }
                match self
                    .store
                    .fetch_mail(peer, usize::from(f.limit), Timestamp::now())
                    .await
                {
                    Ok((records, mut more)) => {
                        let mut size = 0;
                        let mut messages = Vec::with_capacity(records.len());
                        for r in records {
                            size += r.envelope.len() + 8;
                            if size > MAX_MAILBOX_RESPONSE_BYTES - RESPONSE_SLACK {
                                more = true;
                                break;
                            }
                            messages.push(r.envelope);
                        }
                        MailboxResponse::Messages { messages, more }
                    }
                    Err(e) => error(MailboxErrorCode::Internal, e.to_string()),
                }
            }
            MailboxRequest::Ack(a) => {
                if !self.is_mailbox() {
                    return error(
                        MailboxErrorCode::NoMailbox,
                        "this node holds no mail for others".to_owned(),
                    );
                }
                match self.store.ack_mail(peer, a.ids).await {
                    Ok(n) => MailboxResponse::Acked {
                        removed: u32::try_from(n).unwrap_or(u32::MAX),
                    },
                    Err(e) => error(MailboxErrorCode::Internal, e.to_string()),
                }
            }
        }
    }

    /// Mail for this node itself, handed over directly.
    async fn deliver(&self, message: &[u8]) -> MailboxResponse {
        match self.messenger.receive(message).await {
            Ok((id, Accepted::Stored | Accepted::Duplicate)) => MailboxResponse::Deposited {
                id,
                expires_at: Timestamp::now(),
            },
            Ok((_, Accepted::Full)) => error(
                MailboxErrorCode::RecipientFull,
                "the recipient's inbox is full".to_owned(),
            ),
            Err(ReceiveError::Store(e)) => error(MailboxErrorCode::Internal, e.to_string()),
            Err(e) => error(MailboxErrorCode::BadMessage, e.to_string()),
        }
    }
}

fn error(code: MailboxErrorCode, message: String) -> MailboxResponse {
    MailboxResponse::Error { code, message }
}

/// Commits deposits in batches (whatever queued up while the last commit ran) and deletes
/// expired mail every [`PURGE_INTERVAL`]. Ends when the service is dropped.
async fn run_mailbox(store: Store, mut rx: mpsc::Receiver<Waiting>) {
    let mut batch: Vec<Waiting> = Vec::with_capacity(MAX_BATCH);
    let mut purge = tokio::time::interval(PURGE_INTERVAL);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, MAX_BATCH) => {
                if n == 0 {
                    return;
                }
                commit(&store, &mut batch).await;
            }
            _ = purge.tick() => match store.purge_expired_mail(Timestamp::now()).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(purged = n, "expired mail deleted"),
                Err(e) => tracing::warn!("cannot purge expired mail: {e}"),
            },
        }
    }
}

async fn commit(store: &Store, batch: &mut Vec<Waiting>) {
    let (records, replies): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
    match store.deposit_mail(records).await {
        Ok(results) => {
            for (r, reply) in results.into_iter().zip(replies) {
                let _ = reply.send(r.map_err(DepositError::Quota));
            }
        }
        Err(e) => {
            tracing::error!("mailbox write failed: {e}");
            let e = DepositError::Store(e.to_string());
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

//! Store-and-forward mail (`/skillmesh/mailbox/1`, README.md §6).
//!
//! A sender seals a message for an offline recipient (end-to-end encrypted; the relay sees only
//! ciphertext and the metadata below) and deposits it at the recipient's mailbox relays. The
//! recipient fetches, then acks what it has stored. Requests ride a connection authenticated as
//! the requesting peer, so `Fetch` and `Ack` act on the mail of the connection's peer.

use std::time::Duration;

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::envelope::{Kind, MessageId, Payload};
use crate::error::ValidationError;
use crate::limits::*;
use crate::time::Timestamp;

/// Which kind of Olm message the ciphertext is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CipherKind {
    /// Opens a session from the recipient's prekeys.
    PreKey,
    /// Continues an established session.
    Normal,
}

/// An end-to-end encrypted message, signed by its sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedMessage {
    /// Who sent it; must be the signer.
    pub sender: PeerId,
    /// Who may fetch it.
    pub recipient: PeerId,
    /// Sender's counter per recipient: the order to deliver in.
    pub seq: u64,
    /// When sealed.
    pub created_at: Timestamp,
    /// The Olm message type.
    pub cipher: CipherKind,
    /// The ciphertext.
    pub ciphertext: ByteBuf,
}

impl Payload for SealedMessage {
    const KIND: Kind = Kind::SealedMessage;

    fn author(&self) -> PeerId {
        self.sender
    }

    fn validate(&self) -> Result<(), ValidationError> {
        if self.ciphertext.is_empty() || self.ciphertext.len() > MAX_CIPHERTEXT_BYTES {
            return Err(ValidationError::new(
                "ciphertext",
                format!(
                    "{} bytes, must be 1 to {MAX_CIPHERTEXT_BYTES}",
                    self.ciphertext.len()
                ),
            ));
        }
        if self.sender == self.recipient {
            return Err(ValidationError::new("recipient", "is the sender"));
        }
        Ok(())
    }
}

/// A request to a mailbox relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailboxRequest {
    /// Hold a message for its recipient.
    Deposit(Deposit),
    /// Return my mail, oldest first.
    Fetch(Fetch),
    /// Delete these messages of mine.
    Ack(Ack),
}

/// Hold `message` (a `sealed-message` envelope) for `ttl_secs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deposit {
    /// The sealed message envelope.
    pub message: ByteBuf,
    /// Seconds to keep it; at most [`MAX_MAIL_TTL`], the relay may cut it shorter.
    pub ttl_secs: u32,
}

impl Deposit {
    /// How long the sender asks to keep it.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.ttl_secs))
    }
}

/// Ask for up to `limit` messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetch {
    /// At most [`MAX_FETCH_BATCH`].
    pub limit: u16,
}

/// Delete delivered messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Message ids (of the sealed envelopes' payloads); at most [`MAX_ACK_IDS`].
    pub ids: Vec<MessageId>,
}

impl MailboxRequest {
    /// Checks counts and sizes; the deposit's envelope is verified by the relay separately.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            MailboxRequest::Deposit(d) => {
                if d.message.len() > Kind::SealedMessage.max_envelope() {
                    return Err(ValidationError::new("deposit.message", "oversize envelope"));
                }
                if d.ttl_secs == 0 || d.ttl() > MAX_MAIL_TTL {
                    return Err(ValidationError::new(
                        "deposit.ttl_secs",
                        format!("{} must be 1 to {}", d.ttl_secs, MAX_MAIL_TTL.as_secs()),
                    ));
                }
            }
            MailboxRequest::Fetch(f) => {
                if f.limit == 0 || f.limit > MAX_FETCH_BATCH {
                    return Err(ValidationError::new(
                        "fetch.limit",
                        format!("{} must be 1 to {MAX_FETCH_BATCH}", f.limit),
                    ));
                }
            }
            MailboxRequest::Ack(a) => {
                if a.ids.is_empty() || a.ids.len() > MAX_ACK_IDS {
                    return Err(ValidationError::new(
                        "ack.ids",
                        format!("{} ids, must be 1 to {MAX_ACK_IDS}", a.ids.len()),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A mailbox relay's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailboxResponse {
    /// Stored durably, under this id, until `expires_at`.
    Deposited {
        /// The message id.
        id: MessageId,
        /// When the relay will drop it.
        expires_at: Timestamp,
    },
    /// Sealed message envelopes, oldest first.
    Messages {
        /// The envelopes.
        messages: Vec<ByteBuf>,
        /// More are waiting.
        more: bool,
    },
    /// This many messages were deleted.
    Acked {
        /// Count deleted (unknown ids are ignored).
        removed: u32,
    },
    /// Refused.
    Error {
        /// Stable code.
        code: MailboxErrorCode,
        /// Human detail.
        message: String,
    },
}

/// Why a mailbox refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MailboxErrorCode {
    /// This node runs no mailbox.
    NoMailbox,
    /// The recipient's mailbox is full (count or bytes).
    RecipientFull,
    /// This sender has too much mail waiting here.
    SenderQuota,
    /// The message is malformed, badly signed, or not from the connection's peer.
    BadMessage,
    /// The request breaks a limit.
    BadRequest,
    /// The relay failed to store or read.
    Internal,
}

/// The plaintext of a control message: a sealed message with `seq` 0, which a node handles
/// itself instead of putting in the application's inbox (README.md §6).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlMessage {
    /// The callee's signed `call-result` for an async call of the recipient.
    pub call_result: Option<ByteBuf>,
}

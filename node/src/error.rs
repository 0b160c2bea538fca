//! The node's error type.

use std::time::Duration;

use libp2p::PeerId;
use skillmesh_protocol::{CallError, EnvelopeError, ValidationError};

use crate::config::ConfigError;
use crate::identity::IdentityError;
use crate::store::StoreError;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The callee refused or failed the call; the code is stable.
    #[error("the callee answered {0}")]
    Remote(CallError),
    /// No connection to the peer could be made.
    #[error("peer {peer} is unreachable: {reason}")]
    Unreachable {
        /// The peer.
        peer: Box<PeerId>,
        /// Why.
        reason: String,
    },
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A lookup found nothing.
    #[error("none found: {0}")]
    NotFound(String),
    /// A peer answered with something that does not check out.
    #[error("bad response from {peer}: {reason}")]
    BadResponse {
        /// The peer.
        peer: Box<PeerId>,
        /// What is wrong with it.
        reason: String,
    },
    /// An argument breaks a rule; the field is named.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A signed envelope failed a check.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The identity could not be loaded.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The network stack could not be set up (e.g. an address already in use).
    #[error("network: {0}")]
    Transport(String),
    /// A gossip publish failed.
    #[error("publish failed: {0}")]
    Publish(String),
    /// Too many requests are pending in the node; try again.
    #[error("the node is overloaded: {0}")]
    Overloaded(&'static str),
    /// No mailbox took the message and the recipient is not reachable.
    #[error("mail to {peer} not delivered: {reason}")]
    Undelivered {
        /// The recipient.
        peer: Box<PeerId>,
        /// What each place said.
        reason: String,
    },

    /// The node has shut down.
    #[error("the node is shut down")]
    ShutDown,
}

/// `Result` with the node's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

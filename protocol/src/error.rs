//! Errors of decoding, validation and envelope verification.

use libp2p_identity::PeerId;

use crate::envelope::Kind;
use crate::time::Timestamp;

/// A payload could not be decoded from CBOR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// More bytes than the type allows; nothing was decoded.
    #[error("{len} bytes is over the limit of {max}")]
    TooLarge {
        /// Bytes received.
        len: usize,
        /// Bytes allowed.
        max: usize,
    },
    /// CBOR nested deeper than allowed.
    #[error("CBOR nested deeper than {max} levels")]
    TooDeep {
        /// Levels allowed.
        max: usize,
    },
    /// Bytes left over after the value.
    #[error("trailing bytes after the CBOR value")]
    TrailingBytes,
    /// Not CBOR of the expected shape.
    #[error("malformed CBOR: {0}")]
    Cbor(String),
}

/// A value is well-formed but breaks a rule; `field` names where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ValidationError {
    /// The field at fault, as it is named on the wire (`skills[2].tags[0]`, `expires_at`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ValidationError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error about a field nested in `parent`.
    pub fn within(self, parent: &str) -> Self {
        ValidationError {
            field: format!("{parent}.{}", self.field),
            reason: self.reason,
        }
    }
}

/// A signed envelope was rejected. Checked in this order: size, header, signature, payload
/// decoding, signer and claims, time window.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Shorter than the fixed header: a truncated envelope.
    #[error("truncated envelope: {len} bytes, the header alone is {min}")]
    Truncated {
        /// Bytes received.
        len: usize,
        /// Header size.
        min: usize,
    },
    /// Larger than the limit of its kind; not verified.
    #[error("oversize envelope{}: {len} bytes, limit {max}", kind.map(|k| format!(" of kind {k}")).unwrap_or_default())]
    Oversize {
        /// The kind expected or claimed by the header, when known.
        kind: Option<Kind>,
        /// Bytes received.
        len: usize,
        /// Bytes allowed.
        max: usize,
    },
    /// Does not start with the skillmesh magic bytes: not an envelope at all.
    #[error("not a skillmesh envelope (bad magic bytes)")]
    BadMagic,
    /// A protocol version this implementation does not speak.
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u8),
    /// An unknown kind code.
    #[error("unknown envelope kind {0}")]
    UnknownKind(u8),
    /// A batch-signed envelope (version 2) whose inclusion proof is malformed.
    #[error("malformed batch proof: {0}")]
    BadProof(&'static str),
    /// A valid envelope of another kind than the one expected here.
    #[error("expected a {expected} envelope, got {found}")]
    WrongKind {
        /// The kind wanted.
        expected: Kind,
        /// The kind received.
        found: Kind,
    },
    /// The signer field is not a valid Ed25519 public key.
    #[error("signer is not a valid Ed25519 public key")]
    InvalidSignerKey,
    /// The signature does not verify over the payload under the signer's key.
    #[error("bad signature")]
    BadSignature,
    /// The signature is good but the payload is not a valid encoding of its kind.
    #[error("payload does not decode: {0}")]
    Decode(#[from] DecodeError),
    /// The payload names another author than the key that signed it.
    #[error("signed by {signer} but claims to be from {claimed}")]
    SignerMismatch {
        /// Who signed.
        signer: Box<PeerId>,
        /// Who the payload says it is from.
        claimed: Box<PeerId>,
    },
    /// Signed by someone other than the peer it had to come from (e.g. the connection's peer).
    #[error("signed by {found}, expected {expected}")]
    UnexpectedSigner {
        /// The required signer.
        expected: Box<PeerId>,
        /// The actual signer.
        found: Box<PeerId>,
    },
    /// Past its expiry (beyond the allowed clock skew).
    #[error("expired at {expires_at}, now {now}")]
    Expired {
        /// Expiry claimed.
        expires_at: Timestamp,
        /// The verifier's clock.
        now: Timestamp,
    },
    /// Issued in the future beyond the allowed clock skew.
    #[error("not valid before {issued_at}, now {now}")]
    NotYetValid {
        /// Issue time claimed.
        issued_at: Timestamp,
        /// The verifier's clock.
        now: Timestamp,
    },
    /// Decoded, but breaks a rule of its type.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

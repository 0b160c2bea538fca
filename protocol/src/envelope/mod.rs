//! Signed envelopes (README.md §2): the one way signed data travels.
//!
//! Wire layout, fixed header then payload:
//!
//! ```text
//! offset  size  field
//! 0       2     magic "SM" (0x53 0x4d)
//! 2       1     version = 1
//! 3       1     kind code (see [`Kind`])
//! 4       32    signer: Ed25519 public key
//! 36      64    signature: Ed25519(domain_tag(kind) || payload)
//! 100     n     payload: CBOR of the kind's type, n <= the kind's limit
//! ```
//!
//! `domain_tag(kind)` is the ASCII text `skillmesh/v1/<kind name>` followed by one zero byte, so
//! a signature over one kind can never be replayed as another. The signature covers the exact
//! payload bytes: nothing is re-encoded to verify. The message id is `sha256(payload)`.
//!
//! Because the header is fixed, a receiver checks size and signature before it parses any CBOR.
//!
//! **Batch-signed envelopes** (version 2) let one signature cover up to [`MAX_SIGN_BATCH`]
//! payloads, as a call pipe sends them when several calls (or results) queue up together. The
//! signer builds a Merkle tree over the payloads and signs its root; each envelope carries the
//! signature and its payload's path to the root:
//!
//! ```text
//! offset  size  field
//! 0       2     magic "SM"
//! 2       1     version = 2
//! 3       1     kind code
//! 4       32    signer: Ed25519 public key
//! 36      64    signature: Ed25519("skillmesh/v1/batch" 0x00 || root)
//! 100     1     depth d, 1..=6: sibling hashes that follow
//! 101     1     sides: bit i set = the i-th sibling is the left one
//! 102     32*d  sibling hashes, leaf level first
//! 102+32d n     payload, as in version 1
//! ```
//!
//! `leaf = sha256(0x00 || domain_tag(kind) || payload)`, `node = sha256(0x01 || left || right)`:
//! the prefixes keep a leaf from passing as a node, and the domain tag keeps the kinds apart as
//! in version 1. The root is recomputed from the exact payload bytes, so the rules above hold:
//! the envelope proves on its own that the signer signed this payload. The message id is still
//! `sha256(payload)`. A single payload is always sealed as version 1.

use std::fmt;
use std::time::Duration;

use ed25519_dalek::Signer as _;
use libp2p_identity::{Keypair, PeerId};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::codec::{from_cbor, to_cbor};
use crate::error::{EnvelopeError, ValidationError};
use crate::limits::*;
use crate::time::Timestamp;

/// First two bytes of every envelope.
pub const MAGIC: [u8; 2] = *b"SM";
/// The envelope version of one payload, one signature.
pub const VERSION: u8 = 1;
/// The envelope version of a payload in a signed batch (a Merkle proof before the payload).
pub const BATCH_VERSION: u8 = 2;
/// Signing domain of a batch root. No [`Kind`] is named `batch`, so it is apart from them all.
const BATCH_TAG: &[u8] = b"skillmesh/v1/batch\0";

/// What an envelope carries. The code is on the wire; the name is in the signing domain tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// [`AgentCard`](crate::AgentCard)
    Card,
    /// [`Call`](crate::Call)
    Call,
    /// [`CallResult`](crate::CallResult)
    CallResult,
    /// [`StreamChunk`](crate::StreamChunk)
    StreamChunk,
    /// [`Cancel`](crate::Cancel)
    Cancel,
    /// [`Event`](crate::Event)
    Event,
    /// [`Grant`](crate::Grant)
    Grant,
    /// [`SealedMessage`](crate::SealedMessage)
    SealedMessage,
}

impl Kind {
    /// Every kind, in code order.
    pub const ALL: [Kind; 8] = [
        Kind::Card,
        Kind::Call,
        Kind::CallResult,
        Kind::StreamChunk,
        Kind::Cancel,
        Kind::Event,
        Kind::Grant,
        Kind::SealedMessage,
    ];

    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Kind::Card => 1,
            Kind::Call => 2,
            Kind::CallResult => 3,
            Kind::StreamChunk => 4,
            Kind::Cancel => 5,
            Kind::Event => 6,
            Kind::Grant => 7,
            Kind::SealedMessage => 8,
        }
    }

    /// The kind of a wire code.
    pub fn from_code(code: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The name used in the signing domain tag.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Card => "card",
            Kind::Call => "call",
            Kind::CallResult => "call-result",
            Kind::StreamChunk => "stream-chunk",
            Kind::Cancel => "cancel",
            Kind::Event => "event",
            Kind::Grant => "grant",
            Kind::SealedMessage => "sealed-message",
        }
    }

    /// The largest payload of this kind.
    pub fn max_payload(self) -> usize {
        match self {
            Kind::Card => MAX_CARD_PAYLOAD_BYTES,
            Kind::Call => MAX_CALL_PAYLOAD_BYTES,
            Kind::CallResult => MAX_CALL_RESULT_PAYLOAD_BYTES,
            Kind::StreamChunk => MAX_CHUNK_PAYLOAD_BYTES,
            Kind::Cancel => MAX_CANCEL_PAYLOAD_BYTES,
            Kind::Event => MAX_EVENT_PAYLOAD_BYTES,
            Kind::Grant => MAX_GRANT_PAYLOAD_BYTES,
            Kind::SealedMessage => MAX_SEALED_PAYLOAD_BYTES,
        }
    }

    /// The largest envelope of this kind, header and batch proof included.
    pub fn max_envelope(self) -> usize {
        ENVELOPE_HEADER_BYTES + MAX_PROOF_BYTES + self.max_payload()
    }

    fn domain_tag(self) -> Vec<u8> {
        let mut tag = Vec::with_capacity(24);
        tag.extend_from_slice(b"skillmesh/v1/");
        tag.extend_from_slice(self.name().as_bytes());
        tag.push(0);
        tag
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `sha256(payload)`: names a signed object independently of its signature.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct MessageId(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl MessageId {
    /// The id of a payload.
    pub fn of(payload: &[u8]) -> Self {
        MessageId(Sha256::digest(payload).into())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// The node's Ed25519 signing key, for sealing envelopes.
#[derive(Clone)]
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    peer_id: PeerId,
}

impl SigningKey {
    /// The signing key of a libp2p keypair; only Ed25519 keypairs can sign envelopes.
    pub fn from_keypair(keypair: &Keypair) -> Result<Self, NotEd25519> {
        let ed = keypair.clone().try_into_ed25519().map_err(|_| NotEd25519)?;
        let bytes = ed.to_bytes();
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&bytes[..32]);
        Ok(SigningKey {
            key: ed25519_dalek::SigningKey::from_bytes(&secret),
            peer_id: keypair.public().to_peer_id(),
        })
    }

    /// The PeerId of this key: the agent's address.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The 32-byte Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    fn sign(&self, kind: Kind, payload: &[u8]) -> [u8; 64] {
        self.key.sign(&signing_input(kind, payload)).to_bytes()
    }

    fn sign_root(&self, root: &[u8; 32]) -> [u8; 64] {
        self.key.sign(&batch_input(root)).to_bytes()
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

/// The keypair is not Ed25519.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("only Ed25519 keys can sign skillmesh envelopes")]
pub struct NotEd25519;

fn signing_input(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut input = kind.domain_tag();
    input.reserve_exact(payload.len());
    input.extend_from_slice(payload);
    input
}

fn batch_input(root: &[u8; 32]) -> Vec<u8> {
    [BATCH_TAG, root.as_slice()].concat()
}

/// A batch tree's leaf: the payload under its kind's domain tag.
fn leaf_hash(kind: Kind, payload: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update([0u8])
        .chain_update(kind.domain_tag())
        .chain_update(payload)
        .finalize()
        .into()
}

fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update([1u8])
        .chain_update(left)
        .chain_update(right)
        .finalize()
        .into()
}

/// A type that travels inside a signed envelope.
pub trait Payload: Serialize + DeserializeOwned {
    /// Its envelope kind.
    const KIND: Kind;

    /// The peer this payload says wrote it; the envelope's signer must be that peer.
    fn author(&self) -> PeerId;

    /// When this payload is valid, if it says; checked against the verifier's clock.
    fn validity(&self) -> Option<Validity> {
        None
    }

    /// Checks every rule of the type that needs no clock and no outside state.
    fn validate(&self) -> Result<(), ValidationError>;
}

/// A payload's validity window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before (less the allowed skew).
    pub issued_at: Timestamp,
    /// Not valid after (plus the allowed skew).
    pub expires_at: Timestamp,
}

/// What the verifier knows: its clock, the skew it tolerates, and who must have signed.
#[derive(Clone, Copy, Debug)]
pub struct Checks {
    /// The verifier's current time.
    pub now: Timestamp,
    /// Clock difference tolerated on both ends of a validity window.
    pub max_skew: Duration,
    /// The peer that must have signed (for calls: the connection's remote peer).
    pub expected_signer: Option<PeerId>,
}

impl Checks {
    /// Checks at `now` with the protocol's skew and no required signer.
    pub fn at(now: Timestamp) -> Self {
        Checks {
            now,
            max_skew: MAX_CLOCK_SKEW,
            expected_signer: None,
        }
    }

    /// Checks now, by this machine's clock.
    pub fn now() -> Self {
        Self::at(Timestamp::now())
    }

    /// Requires the envelope to be signed by `peer`.
    pub fn signed_by(mut self, peer: PeerId) -> Self {
        self.expected_signer = Some(peer);
        self
    }
}

/// Encodes, validates and signs `value`, returning the envelope's wire bytes.
pub fn seal<T: Payload>(key: &SigningKey, value: &T) -> Result<Vec<u8>, EnvelopeError> {
    Ok(prepare(key, value)?.sign(key))
}

/// A payload encoded and checked by [`prepare`], to be signed alone ([`Unsigned::sign`]) or
/// with others under one signature ([`sign_batch`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsigned {
    kind: Kind,
    payload: Vec<u8>,
}

impl Unsigned {
    /// The kind it will be sealed as.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The payload bytes that will be signed.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Signs it alone: the envelope [`seal`] makes. `key` must be the key that prepared it,
    /// or receivers refuse the envelope (its author is another).
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        let sig = key.sign(self.kind, &self.payload);
        let mut out = Vec::with_capacity(ENVELOPE_HEADER_BYTES + self.payload.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.kind.code());
        out.extend_from_slice(&key.public_key());
        out.extend_from_slice(&sig);
        out.extend_from_slice(&self.payload);
        out
    }
}

/// The checks of [`seal`] without the signature: `value` is valid, `key` is its author, and
/// it fits its kind's limit.
pub fn prepare<T: Payload>(key: &SigningKey, value: &T) -> Result<Unsigned, EnvelopeError> {
    value.validate()?;
    if value.author() != key.peer_id() {
        return Err(EnvelopeError::SignerMismatch {
            signer: Box::new(key.peer_id()),
            claimed: Box::new(value.author()),
        });
    }
    let payload = to_cbor(value);
    if payload.len() > T::KIND.max_payload() {
        return Err(EnvelopeError::Oversize {
            kind: Some(T::KIND),
            len: payload.len() + ENVELOPE_HEADER_BYTES,
            max: T::KIND.max_envelope(),
        });
    }
    Ok(Unsigned {
        kind: T::KIND,
        payload,
    })
}

/// An envelope whose size, header and signature have been checked; its payload is not decoded.
#[derive(Clone, Debug)]
pub struct Verified<'a> {
    kind: Kind,
    signer: PeerId,
    payload: &'a [u8],
}

impl<'a> Verified<'a> {
    /// The kind from the header.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Who signed.
    pub fn signer(&self) -> PeerId {
        self.signer
    }

    /// The signed payload bytes.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// `sha256(payload)`.
    pub fn id(&self) -> MessageId {
        MessageId::of(self.payload)
    }

    /// Decodes the payload as `T` and checks its kind, author, rules and time window.
    pub fn decode<T: Payload>(&self, checks: &Checks) -> Result<Opened<T>, EnvelopeError> {
        if self.kind != T::KIND {
            return Err(EnvelopeError::WrongKind {
                expected: T::KIND,
                found: self.kind,
            });
        }
        if let Some(expected) = checks.expected_signer
            && expected != self.signer
        {
            return Err(EnvelopeError::UnexpectedSigner {
                expected: Box::new(expected),
                found: Box::new(self.signer),
            });
        }
        let value: T = from_cbor(self.payload, T::KIND.max_payload())?;
        if value.author() != self.signer {
            return Err(EnvelopeError::SignerMismatch {
                signer: Box::new(self.signer),
                claimed: Box::new(value.author()),
            });
        }
        value.validate()?;
        if let Some(v) = value.validity() {
            if checks.now.saturating_add(checks.max_skew) < v.issued_at {
                return Err(EnvelopeError::NotYetValid {
                    issued_at: v.issued_at,
                    now: checks.now,
                });
            }
            if checks.now.saturating_sub(checks.max_skew) > v.expires_at {
                return Err(EnvelopeError::Expired {
                    expires_at: v.expires_at,
                    now: checks.now,
                });
            }
        }
        Ok(Opened {
            value,
            signer: self.signer,
            id: self.id(),
        })
    }
}

/// Checks an envelope's size, header and signature, in that order, without decoding the payload.
pub fn verify(bytes: &[u8]) -> Result<Verified<'_>, EnvelopeError> {
    let h = header(bytes)?;
    // verify_strict rejects small-order keys and non-canonical signatures, so one payload has
    // exactly one valid signature per key and batch root (no malleability).
    h.key
        .verify_strict(&h.message(), &h.signature)
        .map_err(|_| EnvelopeError::BadSignature)?;
    Ok(h.verified)
}

/// An envelope's header, checked, and what its signature check needs.
struct Header<'a> {
    kind: Kind,
    key: ed25519_dalek::VerifyingKey,
    signature: ed25519_dalek::Signature,
    payload: &'a [u8],
    /// The batch root the signature covers (version 2), recomputed from the payload.
    root: Option<[u8; 32]>,
    verified: Verified<'a>,
}

impl Header<'_> {
    /// What the signature signs.
    fn message(&self) -> Vec<u8> {
        match &self.root {
            Some(root) => batch_input(root),
            None => signing_input(self.kind, self.payload),
        }
    }
}

/// Every check of [`verify`] but the signature's.
fn header(bytes: &[u8]) -> Result<Header<'_>, EnvelopeError> {
    let parts = parts(bytes)?;
    let mut signer = [0u8; 32];
    signer.copy_from_slice(&bytes[4..36]);
    let mut sig = [0u8; 64];
    sig.copy_from_slice(&bytes[36..100]);
    let (key, signer) = signer_key(&signer)?;
    let root = parts.proof.map(|proof| {
        let mut at = leaf_hash(parts.kind, parts.payload);
        for (i, sibling) in proof.siblings.chunks_exact(32).enumerate() {
            let mut s = [0u8; 32];
            s.copy_from_slice(sibling);
            at = if proof.sides & (1 << i) != 0 {
                node_hash(&s, &at)
            } else {
                node_hash(&at, &s)
            };
        }
        at
    });
    Ok(Header {
        kind: parts.kind,
        key,
        signature: ed25519_dalek::Signature::from_bytes(&sig),
        payload: parts.payload,
        root,
        verified: Verified {
            kind: parts.kind,
            signer,
            payload: parts.payload,
        },
    })
}

/// An envelope split by its layout, sizes checked, nothing verified.
struct Parts<'a> {
    kind: Kind,
    proof: Option<Proof<'a>>,
    payload: &'a [u8],
}

/// A version 2 envelope's path to its batch root.
struct Proof<'a> {
    sides: u8,
    siblings: &'a [u8],
}

fn parts(bytes: &[u8]) -> Result<Parts<'_>, EnvelopeError> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::Oversize {
            kind: None,
            len: bytes.len(),
            max: MAX_ENVELOPE_BYTES,
        });
    }
    if bytes.len() < ENVELOPE_HEADER_BYTES {
        return Err(EnvelopeError::Truncated {
            len: bytes.len(),
            min: ENVELOPE_HEADER_BYTES,
        });
    }
    let (header, rest) = bytes.split_at(ENVELOPE_HEADER_BYTES);
    if header[0..2] != MAGIC {
        return Err(EnvelopeError::BadMagic);
    }
    if header[2] != VERSION && header[2] != BATCH_VERSION {
        return Err(EnvelopeError::UnsupportedVersion(header[2]));
    }
    let kind = Kind::from_code(header[3]).ok_or(EnvelopeError::UnknownKind(header[3]))?;
    let (proof, payload) = if header[2] == BATCH_VERSION {
        let [depth, sides, ..] = *rest else {
            return Err(EnvelopeError::Truncated {
                len: bytes.len(),
                min: ENVELOPE_HEADER_BYTES + 2,
            });
        };
        let depth = usize::from(depth);
        if depth == 0 || depth > MAX_PROOF_DEPTH {
            return Err(EnvelopeError::BadProof("depth not in 1..=6"));
        }
        // One encoding per path: no side bits past its depth.
        if u16::from(sides) >> depth != 0 {
            return Err(EnvelopeError::BadProof("side bits past the proof's depth"));
        }
        let end = 2 + 32 * depth;
        if rest.len() < end {
            return Err(EnvelopeError::Truncated {
                len: bytes.len(),
                min: ENVELOPE_HEADER_BYTES + end,
            });
        }
        let siblings = &rest[2..end];
        (Some(Proof { sides, siblings }), &rest[end..])
    } else {
        (None, rest)
    };
    if payload.len() > kind.max_payload() {
        return Err(EnvelopeError::Oversize {
            kind: Some(kind),
            len: bytes.len(),
            max: kind.max_envelope(),
        });
    }
    Ok(Parts {
        kind,
        proof,
        payload,
    })
}

/// The kind and payload of an envelope by its layout alone, its signature unchecked: for
/// naming what a refused envelope was about, never for trusting it.
pub fn peek_payload(bytes: &[u8]) -> Option<(Kind, &[u8])> {
    parts(bytes).ok().map(|p| (p.kind, p.payload))
}

/// Signer keys already decompressed, per thread. Decompressing a point (a field square root)
/// is a large share of verification; agents talk to the same few peers again and again. Only
/// valid keys enter, and the cache is emptied when full, so it stays bounded.
const SIGNER_CACHE: usize = 4096;

thread_local! {
    static SIGNERS: std::cell::RefCell<std::collections::HashMap<[u8; 32], (ed25519_dalek::VerifyingKey, PeerId)>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

fn signer_key(bytes: &[u8; 32]) -> Result<(ed25519_dalek::VerifyingKey, PeerId), EnvelopeError> {
    if let Some(hit) = SIGNERS.with(|c| c.borrow().get(bytes).copied()) {
        return Ok(hit);
    }
    let key = ed25519_dalek::VerifyingKey::from_bytes(bytes)
        .ok()
        // A small-order key verifies anything under a cofactored equation (batches use one):
        // no such key signs here. verify_strict refused them too.
        .filter(|k| !k.is_weak())
        .ok_or(EnvelopeError::InvalidSignerKey)?;
    let peer = peer_id_of(bytes)?;
    SIGNERS.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= SIGNER_CACHE {
            c.clear();
        }
        c.insert(*bytes, (key, peer));
    });
    Ok((key, peer))
}

/// The PeerId of an Ed25519 public key: the identity multihash (`0x00`, length 36) of the
/// protobuf-encoded key (`0x08 0x01` type Ed25519, `0x12 0x20` 32 bytes of key). No curve math.
fn peer_id_of(key: &[u8; 32]) -> Result<PeerId, EnvelopeError> {
    let mut mh = [0u8; 38];
    mh[..6].copy_from_slice(&[0x00, 0x24, 0x08, 0x01, 0x12, 0x20]);
    mh[6..].copy_from_slice(key);
    PeerId::from_bytes(&mh).map_err(|_| EnvelopeError::InvalidSignerKey)
}

/// Verifies an envelope and decodes it as `T`: every check, in order.
pub fn open<T: Payload>(bytes: &[u8], checks: &Checks) -> Result<Opened<T>, EnvelopeError> {
    // Reject an oversize envelope of the expected kind before spending a signature check.
    if bytes.len() > T::KIND.max_envelope() {
        return Err(EnvelopeError::Oversize {
            kind: Some(T::KIND),
            len: bytes.len(),
            max: T::KIND.max_envelope(),
        });
    }
    verify(bytes)?.decode(checks)
}

/// A verified, decoded, validated payload.
#[derive(Clone, Debug, PartialEq)]
pub struct Opened<T> {
    /// The payload.
    pub value: T,
    /// Who signed it.
    pub signer: PeerId,
    /// `sha256(payload)`.
    pub id: MessageId,
}

mod batch;
pub use batch::{MAX_BATCH, sign_batch, verify_batch};

#[cfg(test)]
mod tests;

//! Signed envelopes (DESIGN §3): the one way signed data travels.
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

/// Signs `items` with one signature per [`MAX_SIGN_BATCH`] of them: the envelopes, in input
/// order. A batch of one is a plain (version 1) envelope; larger ones are version 2, each
/// envelope with its payload's Merkle path (module docs). A signature costs far more than the
/// hashes of a path (the `sign` rows of `cargo bench --bench calls`), so a pipe that signs what
/// queued together pays for one signature per write instead of one per call. `key` must be the key that
/// prepared them.
pub fn sign_batch(key: &SigningKey, items: &[&Unsigned]) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(MAX_SIGN_BATCH) {
        if let [one] = chunk {
            out.push(one.sign(key));
            continue;
        }
        let leaves: Vec<[u8; 32]> = chunk
            .iter()
            .map(|u| leaf_hash(u.kind, &u.payload))
            .collect();
        let (root, proofs) = merkle(&leaves);
        let sig = key.sign_root(&root);
        let public = key.public_key();
        for (u, proof) in chunk.iter().zip(proofs) {
            let mut e =
                Vec::with_capacity(ENVELOPE_HEADER_BYTES + 2 + 32 * proof.len() + u.payload.len());
            e.extend_from_slice(&MAGIC);
            e.push(BATCH_VERSION);
            e.push(u.kind.code());
            e.extend_from_slice(&public);
            e.extend_from_slice(&sig);
            // At most 6 levels for 64 leaves: both fit a byte.
            e.push(proof.len() as u8);
            e.push(
                proof
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, left))| *left)
                    .fold(0u8, |sides, (i, _)| sides | (1 << i)),
            );
            for (sibling, _) in &proof {
                e.extend_from_slice(sibling);
            }
            e.extend_from_slice(&u.payload);
            out.push(e);
        }
    }
    out
}

/// A leaf's siblings on the way to the root, each with whether it is the left one.
type Path = Vec<([u8; 32], bool)>;

/// The root of a Merkle tree over `leaves` (2..=64 of them) and each leaf's path to it: the
/// siblings, leaf level first, each with whether it is the left one. Pairs are hashed level by
/// level; an odd last node rises to the next level as it is.
fn merkle(leaves: &[[u8; 32]]) -> ([u8; 32], Vec<Path>) {
    let mut proofs: Vec<Path> = vec![Vec::new(); leaves.len()];
    let mut level = leaves.to_vec();
    let mut at: Vec<usize> = (0..leaves.len()).collect();
    while level.len() > 1 {
        for (proof, i) in proofs.iter_mut().zip(&mut at) {
            if let Some(sibling) = level.get(*i ^ 1) {
                proof.push((*sibling, *i % 2 == 1));
            }
            *i /= 2;
        }
        level = level
            .chunks(2)
            .map(|pair| pair.get(1).map_or(pair[0], |r| node_hash(&pair[0], r)))
            .collect();
    }
    (level[0], proofs)
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

/// Envelopes at most per batch multiplication in [`verify_batch`]; larger inputs are split.
/// Past a few dozen the saving per signature hardly grows, and a bad signature sends its
/// whole batch to one-by-one checks.
pub const MAX_BATCH: usize = 64;

/// [`verify`] for many envelopes at once: each gets the same size and header checks, and the
/// signatures of those that pass are checked together, as one multiscalar multiplication, at
/// a fraction of the cost per signature (the `verify` rows of `cargo bench --bench calls`).
/// Envelopes of one signed batch (version 2, same signer, signature and root) share one
/// check. If a batch fails, its signatures are checked one by one, so every envelope gets its
/// own verdict, the same as [`verify`] would give it. Results are in input order.
///
/// The batch equation is ed25519-dalek's (with weights derived from every input, and
/// canonical `s` required); when one key signed them all, as on a call pipe, that key's terms
/// are summed first (see `verify_one_signer`). It can differ from one-by-one `verify_strict`
/// only on a signature its own signer built with a small-order component, which no one else
/// can make: what a third party cannot forge stays unforgeable. Small-order signer keys, under
/// which forgeries can pass a batch equation, never get this far (see `signer_key`).
pub fn verify_batch<'a>(envelopes: &[&'a [u8]]) -> Vec<Result<Verified<'a>, EnvelopeError>> {
    let mut out = Vec::with_capacity(envelopes.len());
    for chunk in envelopes.chunks(MAX_BATCH) {
        let headers: Vec<Result<Header<'a>, EnvelopeError>> =
            chunk.iter().map(|b| header(b)).collect();
        // The distinct signatures to check, and which one each envelope needs. The key is part
        // of what makes two the same: a batch signature copied under another key is not its.
        let mut distinct: Vec<&Header<'a>> = Vec::new();
        // (key, signature, root) of each batch signature seen: its index in `distinct`.
        type Signed = ([u8; 32], [u8; 64], [u8; 32]);
        let mut seen: std::collections::HashMap<Signed, usize> = std::collections::HashMap::new();
        let needs: Vec<Option<usize>> = headers
            .iter()
            .map(|h| {
                let h = h.as_ref().ok()?;
                let mut add = || {
                    distinct.push(h);
                    distinct.len() - 1
                };
                Some(match h.root {
                    Some(root) => *seen
                        .entry((h.key.to_bytes(), h.signature.to_bytes(), root))
                        .or_insert_with(add),
                    None => add(),
                })
            })
            .collect();
        let together = distinct.len() > 1 && {
            let inputs: Vec<Vec<u8>> = distinct.iter().map(|h| h.message()).collect();
            let messages: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
            let signatures: Vec<ed25519_dalek::Signature> =
                distinct.iter().map(|h| h.signature).collect();
            if distinct.iter().all(|h| h.key == distinct[0].key) {
                verify_one_signer(&distinct[0].key, &messages, &signatures)
            } else {
                let keys: Vec<ed25519_dalek::VerifyingKey> =
                    distinct.iter().map(|h| h.key).collect();
                ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()
            }
        };
        let good: Vec<bool> = distinct
            .iter()
            .map(|h| together || h.key.verify_strict(&h.message(), &h.signature).is_ok())
            .collect();
        out.extend(headers.into_iter().zip(needs).map(|(h, need)| {
            let h = h?;
            if need.is_some_and(|i| !good[i]) {
                return Err(EnvelopeError::BadSignature);
            }
            Ok(h.verified)
        }));
    }
    out
}

/// ed25519-dalek's batch equation for signatures that one key made (a call pipe's are all its
/// peer's), with that key's terms summed: `[-sum z_i s_i]B + sum [z_i]R_i + [sum z_i h_i]A`
/// must be the identity. It is ed25519-dalek's equation with `A`'s n terms added up, so a
/// batch passes or fails as it would there (weights aside), but the multiplication has n + 2
/// points instead of 2n + 1: each point costs a lookup table and its additions, so a
/// signature costs about a third less (the `verify` rows of `cargo bench --bench calls`).
/// The weights `z_i` are 128-bit, derived like ed25519-dalek's (from its own transcript) from
/// every signature and message in the batch, so no signer can choose inputs that cancel out.
#[allow(non_snake_case)] // the equation's names
fn verify_one_signer(
    key: &ed25519_dalek::VerifyingKey,
    messages: &[&[u8]],
    signatures: &[ed25519_dalek::Signature],
) -> bool {
    use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
    use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
    use curve25519_dalek::scalar::Scalar;
    use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
    use sha2::Sha512;

    let mut transcript = Sha512::new();
    transcript.update(b"skillmesh one-signer batch v1");
    transcript.update(key.as_bytes());
    let mut terms = Vec::with_capacity(signatures.len());
    for (message, signature) in messages.iter().zip(signatures) {
        // A non-canonical s is refused, as verify_strict and ed25519-dalek's batch refuse it.
        let Some(s) = Option::<Scalar>::from(Scalar::from_canonical_bytes(*signature.s_bytes()))
        else {
            return false;
        };
        let hram: [u8; 64] = Sha512::new()
            .chain_update(signature.r_bytes())
            .chain_update(key.as_bytes())
            .chain_update(message)
            .finalize()
            .into();
        transcript.update(hram);
        transcript.update(signature.s_bytes());
        terms.push((
            CompressedEdwardsY(*signature.r_bytes()),
            s,
            Scalar::from_bytes_mod_order_wide(&hram),
        ));
    }
    let seed = transcript.finalize();
    let zs: Vec<Scalar> = (0..terms.len() as u64)
        .map(|i| {
            let d = Sha512::new()
                .chain_update(seed)
                .chain_update(i.to_le_bytes())
                .finalize();
            let mut z = [0u8; 16];
            z.copy_from_slice(&d[..16]);
            Scalar::from(u128::from_le_bytes(z))
        })
        .collect();
    let B_coefficient: Scalar = terms.iter().zip(&zs).map(|((_, s, _), z)| z * s).sum();
    let A_coefficient: Scalar = terms.iter().zip(&zs).map(|((_, _, h), z)| z * h).sum();
    let Rs = terms.iter().map(|(r, _, _)| r.decompress());
    EdwardsPoint::optional_multiscalar_mul(
        [-B_coefficient, A_coefficient].into_iter().chain(zs),
        [Some(ED25519_BASEPOINT_POINT), Some(key.to_edwards())]
            .into_iter()
            .chain(Rs),
    )
    .is_some_and(|p| p.is_identity())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_derivation_matches_libp2p() {
        for _ in 0..8 {
            let kp = Keypair::generate_ed25519();
            let key = SigningKey::from_keypair(&kp).expect("ed25519");
            assert_eq!(
                peer_id_of(&key.public_key()).expect("peer id"),
                kp.public().to_peer_id()
            );
        }
    }

    #[test]
    fn one_signer_equation_accepts_good_batches_and_refuses_bad_ones() {
        let key = SigningKey::from_keypair(&Keypair::generate_ed25519()).expect("ed25519");
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&key.public_key()).expect("key");
        let messages: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 40]).collect();
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        let signatures: Vec<ed25519_dalek::Signature> =
            refs.iter().map(|m| key.key.sign(m)).collect();
        assert!(verify_one_signer(&vk, &refs, &signatures));
        assert!(verify_one_signer(&vk, &refs[..1], &signatures[..1]));
        // Two signatures swapped: each is valid, for the other message.
        let mut swapped = signatures.clone();
        swapped.swap(1, 2);
        assert!(!verify_one_signer(&vk, &refs, &swapped));
        // Another key's view of the same batch.
        let other = SigningKey::from_keypair(&Keypair::generate_ed25519()).expect("ed25519");
        let other = ed25519_dalek::VerifyingKey::from_bytes(&other.public_key()).expect("key");
        assert!(!verify_one_signer(&other, &refs, &signatures));
    }

    #[test]
    fn invalid_keys_never_enter_the_cache() {
        let mut bad = [0u8; 32];
        bad[0] = 2;
        assert!(signer_key(&bad).is_err());
        assert!(SIGNERS.with(|c| !c.borrow().contains_key(&bad)));
    }
}

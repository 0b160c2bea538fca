//! # skillmesh-protocol
//!
//! The wire protocol of skillmesh, a peer-to-peer network for AI agents: the types nodes
//! exchange, how they are encoded (CBOR), how they are signed (Ed25519 envelopes), how DHT keys
//! and topics are named, and every limit. No I/O: the node crate moves these bytes around.
//!
//! Everything signed travels as an envelope: a fixed 100-byte header (magic, version, kind,
//! signer key, signature) and a CBOR payload. The signature covers a per-kind domain tag and the
//! exact payload bytes, so a receiver checks size and signature before it parses anything, and
//! never re-encodes to verify. `protocol/README.md` is the full specification.
//!
//! ```
//! use libp2p_identity::Keypair;
//! use serde_bytes::ByteBuf;
//! use skillmesh_protocol::{
//!     envelope, Call, CallId, Checks, Mode, SigningKey, SkillName, Timestamp, MAX_CALL_WINDOW,
//! };
//!
//! let caller = SigningKey::from_keypair(&Keypair::generate_ed25519()).unwrap();
//! let callee = Keypair::generate_ed25519().public().to_peer_id();
//!
//! let now = Timestamp::now();
//! let call = Call {
//!     call_id: CallId([7; 16]),
//!     caller: caller.peer_id(),
//!     target: callee,
//!     skill: SkillName::new("translate").unwrap(),
//!     version_req: "^1".parse().unwrap(),
//!     args: ByteBuf::from(skillmesh_protocol::to_cbor(&"bonjour")),
//!     issued_at: now,
//!     expires_at: now.saturating_add(MAX_CALL_WINDOW),
//!     mode: Mode::Sync,
//!     grant: None,
//! };
//! let bytes = envelope::seal(&caller, &call).unwrap();
//!
//! // The callee checks size, signature, signer (the connection's peer), rules, time window.
//! let opened = envelope::open::<Call>(&bytes, &Checks::now().signed_by(caller.peer_id())).unwrap();
//! assert_eq!(opened.value, call);
//!
//! // One flipped bit anywhere and it is refused.
//! let mut tampered = bytes.clone();
//! *tampered.last_mut().unwrap() ^= 1;
//! assert!(envelope::open::<Call>(&tampered, &Checks::now()).is_err());
//! ```

pub mod call;
pub mod card;
mod codec;
pub mod envelope;
mod error;
pub mod event;
pub mod grant;
pub mod keys;
pub mod limits;
pub mod mailbox;
pub mod skill;
pub mod stream;
mod time;

pub use call::{
    Call, CallError, CallId, CallResult, CallStatus, Cancel, ErrorCode, StreamChunk, Timings,
};
pub use card::{AgentCard, OneTimeKey, PrekeyBundle};
pub use codec::{from_cbor, to_cbor};
pub use envelope::{
    Checks, Kind, MessageId, NotEd25519, Opened, Payload, SigningKey, Unsigned, Validity, Verified,
};
pub use error::{DecodeError, EnvelopeError, ValidationError};
pub use event::Event;
pub use grant::Grant;
pub use keys::MeshName;
pub use limits::*;
pub use mailbox::{
    Ack, CipherKind, ControlMessage, Deposit, Fetch, MailboxErrorCode, MailboxRequest,
    MailboxResponse, SealedMessage,
};
pub use skill::{
    Mode, Schema, ShareMode, SkillLimits, SkillName, SkillSpec, SkillSpecBuilder, Tag,
};
pub use stream::{ChainError, ChainReader, ChainWriter, verify_transcript};
pub use time::Timestamp;

/// The libp2p identity types used in this crate's API.
pub use libp2p_identity::{Keypair, PeerId};
pub use multiaddr::Multiaddr;

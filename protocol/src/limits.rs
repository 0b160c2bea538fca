//! Every size, count and time bound of the wire protocol, by name.
//!
//! A peer that sends more than these is misbehaving; receivers reject before they allocate or
//! verify. Section "Limits" of `protocol/README.md` lists the same numbers.

use std::time::Duration;

/// Bytes before the payload in a signed envelope: magic (2), version (1), kind (1), signer (32),
/// signature (64).
pub const ENVELOPE_HEADER_BYTES: usize = 2 + 1 + 1 + 32 + 64;

/// Envelopes one batch signature covers at most (a version 2 envelope's proof has at most
/// [`MAX_PROOF_DEPTH`] sibling hashes).
pub const MAX_SIGN_BATCH: usize = 64;
/// Sibling hashes in a batch proof at most: `log2(MAX_SIGN_BATCH)`.
pub const MAX_PROOF_DEPTH: usize = 6;
/// A batch proof at most: depth (1), sides (1), then 32 bytes per sibling.
pub const MAX_PROOF_BYTES: usize = 2 + 32 * MAX_PROOF_DEPTH;

/// The largest envelope of any kind, header and batch proof included. Per-kind limits are lower.
pub const MAX_ENVELOPE_BYTES: usize =
    ENVELOPE_HEADER_BYTES + MAX_PROOF_BYTES + MAX_CALL_RESULT_PAYLOAD_BYTES;

/// Room for the fields around a variable-size blob (ids, peer ids, timestamps, codes).
const FIELD_OVERHEAD_BYTES: usize = 4 * 1024;

/// An agent card payload. Cards travel in DHT records, which must stay small.
pub const MAX_CARD_PAYLOAD_BYTES: usize = 8 * 1024;
/// Call arguments (CBOR) as sent; a skill may set a lower limit in its [`SkillLimits`](crate::SkillLimits).
pub const MAX_CALL_ARGS_BYTES: usize = 512 * 1024;
/// A `Call` payload.
pub const MAX_CALL_PAYLOAD_BYTES: usize =
    MAX_CALL_ARGS_BYTES + MAX_GRANT_ENVELOPE_BYTES + FIELD_OVERHEAD_BYTES;
/// A `grant` envelope, as a call carries it.
const MAX_GRANT_ENVELOPE_BYTES: usize =
    ENVELOPE_HEADER_BYTES + MAX_PROOF_BYTES + MAX_GRANT_PAYLOAD_BYTES;
/// A call's output (CBOR).
pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;
/// A `CallResult` payload.
pub const MAX_CALL_RESULT_PAYLOAD_BYTES: usize = MAX_OUTPUT_BYTES + FIELD_OVERHEAD_BYTES;
/// Data in one stream chunk.
pub const MAX_CHUNK_DATA_BYTES: usize = 256 * 1024;
/// A `StreamChunk` payload.
pub const MAX_CHUNK_PAYLOAD_BYTES: usize = MAX_CHUNK_DATA_BYTES + FIELD_OVERHEAD_BYTES;
/// A `Cancel` payload.
pub const MAX_CANCEL_PAYLOAD_BYTES: usize = 1024;
/// Event data.
pub const MAX_EVENT_DATA_BYTES: usize = 64 * 1024;
/// An `Event` payload.
pub const MAX_EVENT_PAYLOAD_BYTES: usize = MAX_EVENT_DATA_BYTES + FIELD_OVERHEAD_BYTES;
/// A `Grant` payload.
pub const MAX_GRANT_PAYLOAD_BYTES: usize = 4 * 1024;
/// Ciphertext in one sealed message.
pub const MAX_CIPHERTEXT_BYTES: usize = 256 * 1024;
/// A `SealedMessage` payload.
pub const MAX_SEALED_PAYLOAD_BYTES: usize = MAX_CIPHERTEXT_BYTES + FIELD_OVERHEAD_BYTES;

/// Messages a mailbox returns for one fetch.
pub const MAX_FETCH_BATCH: u16 = 64;
/// Message ids in one ack.
pub const MAX_ACK_IDS: usize = 256;
/// A mailbox request (a deposit carries one sealed message envelope).
pub const MAX_MAILBOX_REQUEST_BYTES: usize =
    ENVELOPE_HEADER_BYTES + MAX_SEALED_PAYLOAD_BYTES + FIELD_OVERHEAD_BYTES;
/// A mailbox response. A fetch batch is cut short (with `more: true`) to fit.
pub const MAX_MAILBOX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// Default lifetime of a deposited message.
pub const DEFAULT_MAIL_TTL: Duration = Duration::from_secs(72 * 3600);
/// Longest lifetime a sender may ask for; a relay may allow less.
pub const MAX_MAIL_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Skill names: 1..=64 characters.
pub const MAX_SKILL_NAME_LEN: usize = 64;
/// Tags: 1..=32 characters.
pub const MAX_TAG_LEN: usize = 32;
/// Tags on one skill.
pub const MAX_TAGS: usize = 16;
/// A skill's description.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// One inline JSON Schema. Cards carry schema hashes instead (see `SkillSpec::compact`).
pub const MAX_SCHEMA_BYTES: usize = 16 * 1024;
/// Skills on one card.
pub const MAX_SKILLS_PER_CARD: usize = 32;
/// Addresses on one card.
pub const MAX_CARD_ADDRS: usize = 16;
/// One multiaddr, in bytes.
pub const MAX_ADDR_BYTES: usize = 256;
/// Mailbox relays on one card.
pub const MAX_CARD_MAILBOXES: usize = 4;
/// One-time prekeys on one card.
pub const MAX_ONE_TIME_KEYS: usize = 16;
/// A card's display name.
pub const MAX_DISPLAY_NAME_LEN: usize = 64;
/// The longest a card may claim to be valid: cards expire in hours, not days.
pub const MAX_CARD_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Skills a grant names (none = every skill of the issuer).
pub const MAX_GRANT_SKILLS: usize = 32;
/// The longest a grant may claim to be valid.
pub const MAX_GRANT_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

/// The longest a signed call may be valid (`expires_at - issued_at`).
pub const MAX_CALL_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Clock difference tolerated between caller and callee.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// A sync skill's handler timeout; it must fit in a call's window.
pub const MAX_SKILL_TIMEOUT: Duration = MAX_CALL_WINDOW;
/// A stream or async skill's timeout: such a call only has to arrive within its window, and
/// then runs (a research skill, a long generation) for up to this long.
pub const MAX_LONG_SKILL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Concurrent calls one skill may declare.
pub const MAX_SKILL_CONCURRENCY: u16 = 1024;
/// An error message in a call result; longer messages are cut.
pub const MAX_ERROR_MESSAGE_LEN: usize = 1024;

/// Gossipsub topic names (the whole namespaced string).
pub const MAX_TOPIC_LEN: usize = 128;
/// Mesh names.
pub const MAX_MESH_NAME_LEN: usize = 32;

/// CBOR nesting depth accepted when decoding anything from the network.
pub const MAX_CBOR_DEPTH: usize = 64;

//! Events published on gossipsub topics (README.md §5), signed by their publisher.

use std::time::Duration;

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::envelope::{Kind, Payload, Validity};
use crate::error::ValidationError;
use crate::limits::*;
use crate::time::Timestamp;

/// How long after publication an event is still accepted: gossip is for live news, and a bound
/// keeps old events from being replayed into the mesh.
pub const MAX_EVENT_AGE: Duration = Duration::from_secs(10 * 60);

/// An event on a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The full topic name (`skillmesh/<mesh>/...`); must match the gossipsub topic.
    pub topic: String,
    /// Who published; must be the signer.
    pub publisher: PeerId,
    /// Publisher's counter, so that equal data published twice are two events.
    pub seq: u64,
    /// When published.
    pub issued_at: Timestamp,
    /// The data, as the application chose (JSON or CBOR).
    pub data: ByteBuf,
}

impl Payload for Event {
    const KIND: Kind = Kind::Event;

    fn author(&self) -> PeerId {
        self.publisher
    }

    fn validity(&self) -> Option<Validity> {
        Some(Validity {
            issued_at: self.issued_at,
            expires_at: self.issued_at.saturating_add(MAX_EVENT_AGE),
        })
    }

    fn validate(&self) -> Result<(), ValidationError> {
        crate::keys::check_topic(&self.topic)?;
        if self.data.len() > MAX_EVENT_DATA_BYTES {
            return Err(ValidationError::new(
                "data",
                format!("{} bytes, at most {MAX_EVENT_DATA_BYTES}", self.data.len()),
            ));
        }
        Ok(())
    }
}

//! The agent card: a node's signed self-description, stored in the DHT under
//! `skillmesh/card/<peer-id>` and refreshed before it expires.

use libp2p_identity::PeerId;
use multiaddr::Multiaddr;
use serde::{Deserialize, Serialize};

use crate::envelope::{Kind, Payload, Validity};
use crate::error::ValidationError;
use crate::grant::check_window;
use crate::limits::*;
use crate::skill::{SkillName, SkillSpec};
use crate::time::Timestamp;

/// Keys others use to open an end-to-end encrypted session with this agent while it is offline
/// (X3DH-style, as vodozemac's Olm expects). They are bound to the agent's Ed25519 identity by
/// the card's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrekeyBundle {
    /// The long-term Curve25519 identity key.
    #[serde(with = "serde_bytes")]
    pub identity_key: [u8; 32],
    /// One-time Curve25519 keys; each is used for at most one session.
    pub one_time_keys: Vec<OneTimeKey>,
    /// A key to fall back on when one-time keys run out.
    pub fallback_key: Option<OneTimeKey>,
}

/// One Curve25519 prekey.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneTimeKey {
    /// The key's id, to say which key a session used.
    #[serde(with = "serde_bytes")]
    pub id: Vec<u8>,
    /// The public key.
    #[serde(with = "serde_bytes")]
    pub key: [u8; 32],
}

/// What an agent says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCard {
    /// The agent; must be the card's signer.
    pub peer_id: PeerId,
    /// A display name.
    pub name: String,
    /// The skills offered (schemas as hashes, see [`SkillSpec::compact`]).
    pub skills: Vec<SkillSpec>,
    /// Where to reach the agent, relay circuit addresses included.
    pub addrs: Vec<Multiaddr>,
    /// Relays that hold mail for this agent while it is offline.
    pub mailboxes: Vec<PeerId>,
    /// Keys to start an encrypted session.
    pub prekeys: Option<PrekeyBundle>,
    /// Increases with every new card of this agent; a store keeps the highest.
    pub seq: u64,
    /// Valid from.
    pub issued_at: Timestamp,
    /// Valid until: hours, not days.
    pub expires_at: Timestamp,
}

impl AgentCard {
    /// The skill of that name, if offered.
    pub fn skill(&self, name: &SkillName) -> Option<&SkillSpec> {
        self.skills.iter().find(|s| &s.name == name)
    }
}

impl Payload for AgentCard {
    const KIND: Kind = Kind::Card;

    fn author(&self) -> PeerId {
        self.peer_id
    }

    fn validity(&self) -> Option<Validity> {
        Some(Validity {
            issued_at: self.issued_at,
            expires_at: self.expires_at,
        })
    }

    fn validate(&self) -> Result<(), ValidationError> {
        if self.name.len() > MAX_DISPLAY_NAME_LEN || self.name.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "name",
                format!("at most {MAX_DISPLAY_NAME_LEN} bytes of printable text"),
            ));
        }
        if self.skills.len() > MAX_SKILLS_PER_CARD {
            return Err(ValidationError::new(
                "skills",
                format!(
                    "{} skills, at most {MAX_SKILLS_PER_CARD}",
                    self.skills.len()
                ),
            ));
        }
        for (i, s) in self.skills.iter().enumerate() {
            s.validate()
                .map_err(|e| e.within(&format!("skills[{i}]")))?;
            if self.skills[..i].iter().any(|o| o.name == s.name) {
                return Err(ValidationError::new(
                    format!("skills[{i}].name"),
                    format!("{} appears twice", s.name),
                ));
            }
        }
        if self.addrs.len() > MAX_CARD_ADDRS {
            return Err(ValidationError::new(
                "addrs",
                format!("{} addresses, at most {MAX_CARD_ADDRS}", self.addrs.len()),
            ));
        }
        if let Some(i) = self.addrs.iter().position(|a| a.len() > MAX_ADDR_BYTES) {
            return Err(ValidationError::new(
                format!("addrs[{i}]"),
                format!("over {MAX_ADDR_BYTES} bytes"),
            ));
        }
        if self.mailboxes.len() > MAX_CARD_MAILBOXES {
            return Err(ValidationError::new(
                "mailboxes",
                format!(
                    "{} mailboxes, at most {MAX_CARD_MAILBOXES}",
                    self.mailboxes.len()
                ),
            ));
        }
        if let Some(p) = &self.prekeys
            && p.one_time_keys.len() > MAX_ONE_TIME_KEYS
        {
            return Err(ValidationError::new(
                "prekeys.one_time_keys",
                format!(
                    "{} keys, at most {MAX_ONE_TIME_KEYS}",
                    p.one_time_keys.len()
                ),
            ));
        }
        if let Some(p) = &self.prekeys {
            let ids = p.one_time_keys.iter().chain(&p.fallback_key);
            if let Some(k) = ids.into_iter().find(|k| k.id.len() > 32) {
                return Err(ValidationError::new(
                    "prekeys",
                    format!("key id of {} bytes, at most 32", k.id.len()),
                ));
            }
        }
        check_window(self.issued_at, self.expires_at, MAX_CARD_LIFETIME)
    }
}

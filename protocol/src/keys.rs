//! Names on the network: protocol ids, DHT keys and gossipsub topics.

use libp2p_identity::PeerId;
use sha2::{Digest, Sha256};

use crate::error::ValidationError;
use crate::limits::{MAX_MESH_NAME_LEN, MAX_TOPIC_LEN};
use crate::skill::{SkillName, Tag};

/// Kademlia protocol of skillmesh meshes; never the public IPFS DHT.
pub const KAD_PROTOCOL: &str = "/skillmesh/kad/1.0.0";
/// Skill calls: long-lived streams of tagged frames (call pipes).
pub const CALL_PROTOCOL: &str = "/skillmesh/call/4";
/// Store-and-forward mail (request-response).
pub const MAILBOX_PROTOCOL: &str = "/skillmesh/mailbox/1";
/// An agent's own signed card, asked of the agent itself (request-response).
pub const CARD_PROTOCOL: &str = "/skillmesh/card/1";
/// The `protocol_version` skillmesh nodes announce in identify.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "skillmesh/1";

/// A DHT key: the sha2-256 multihash (`0x12 0x20 || sha256(text)`) of `text`, so that any libp2p
/// implementation can query it.
pub fn dht_key(text: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(34);
    key.extend_from_slice(&[0x12, 0x20]);
    key.extend_from_slice(&Sha256::digest(text.as_bytes()));
    key
}

/// Provider key of a skill: `skillmesh/skill/<name>`.
pub fn skill_key(name: &SkillName) -> Vec<u8> {
    dht_key(&format!("skillmesh/skill/{name}"))
}

/// Provider key of a tag: `skillmesh/tag/<tag>`.
pub fn tag_key(tag: &Tag) -> Vec<u8> {
    dht_key(&format!("skillmesh/tag/{tag}"))
}

/// Record key of an agent's card: `skillmesh/card/<peer id in base58>`.
pub fn card_key(peer: &PeerId) -> Vec<u8> {
    dht_key(&format!("skillmesh/card/{}", peer.to_base58()))
}

/// Provider key under which relays advertise themselves: `skillmesh/relay`.
pub fn relay_key() -> Vec<u8> {
    dht_key("skillmesh/relay")
}

/// Provider key under which mailbox relays advertise themselves: `skillmesh/mailbox`.
pub fn mailbox_key() -> Vec<u8> {
    dht_key("skillmesh/mailbox")
}

/// The name of a mesh, the namespace of its topics (`default` when none is configured).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MeshName(String);

impl MeshName {
    /// Validates a mesh name: 1 to 32 of `a-z 0-9 . _ -`.
    pub fn new(name: impl Into<String>) -> Result<Self, ValidationError> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= MAX_MESH_NAME_LEN
            && name.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            });
        if !ok {
            return Err(ValidationError::new(
                "mesh",
                format!("{name:?} must be 1 to {MAX_MESH_NAME_LEN} of a-z, 0-9, '.', '_', '-'"),
            ));
        }
        Ok(MeshName(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Where agents announce they are online: `skillmesh/<mesh>/presence`.
    pub fn presence_topic(&self) -> String {
        format!("skillmesh/{}/presence", self.0)
    }

    /// Where agents announce skill changes: `skillmesh/<mesh>/skills`.
    pub fn skills_topic(&self) -> String {
        format!("skillmesh/{}/skills", self.0)
    }

    /// An application topic: `skillmesh/<mesh>/app/<name>`, where `name` is 1 or more of
    /// `a-z A-Z 0-9 . _ - /`.
    pub fn app_topic(&self, name: &str) -> Result<String, ValidationError> {
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !ok {
            return Err(ValidationError::new(
                "topic",
                format!("{name:?} may hold only a-z, A-Z, 0-9, '.', '_', '-', '/'"),
            ));
        }
        let topic = format!("skillmesh/{}/app/{name}", self.0);
        check_topic(&topic)?;
        Ok(topic)
    }
}

impl Default for MeshName {
    fn default() -> Self {
        MeshName("default".to_owned())
    }
}

impl std::fmt::Display for MeshName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a full topic name: the `skillmesh/` namespace and the length limit.
pub fn check_topic(topic: &str) -> Result<(), ValidationError> {
    if !topic.starts_with("skillmesh/") || topic.len() > MAX_TOPIC_LEN {
        return Err(ValidationError::new(
            "topic",
            format!("{topic:?} must start with skillmesh/ and be at most {MAX_TOPIC_LEN} bytes"),
        ));
    }
    Ok(())
}

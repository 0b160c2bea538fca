//! Discovery through the private Kademlia DHT (protocol/README.md §5).
//!
//! An agent is a *provider* of `skillmesh/skill/<name>` for each skill it serves and of
//! `skillmesh/tag/<tag>` for each tag, and stores its signed card under
//! `skillmesh/card/<peer id>`. A lookup finds providers, then asks each for its card
//! (`/skillmesh/card/1`; the DHT record only when the agent does not answer with one), and keeps
//! only cards that verify as that agent's. Records from other peers are verified before this
//! node stores them.

use std::collections::HashSet;
use std::time::Duration;

use libp2p::kad::{self, RecordKey};
use libp2p::{Multiaddr, PeerId};
use serde_bytes::ByteBuf;
use skillmesh_protocol::envelope::{self, Checks};
use skillmesh_protocol::keys::{card_key, skill_key, tag_key};
use skillmesh_protocol::{
    AgentCard, MAX_CARD_ADDRS, PrekeyBundle, SigningKey, SkillName, SkillSpec, Tag, Timestamp,
};
use tokio::sync::mpsc;

use crate::event_loop::Command;
use crate::store::{Store, StoreError, StoredCard};

/// What to look for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// Agents serving a skill of this name.
    Skill(SkillName),
    /// Agents serving a skill with this tag.
    Tag(Tag),
}

impl Query {
    pub(crate) fn key(&self) -> RecordKey {
        RecordKey::new(&match self {
            Query::Skill(n) => skill_key(n),
            Query::Tag(t) => tag_key(t),
        })
    }

    /// Whether `spec` answers this query.
    pub fn matches(&self, spec: &SkillSpec) -> bool {
        match self {
            Query::Skill(n) => &spec.name == n,
            Query::Tag(t) => spec.tags.contains(t),
        }
    }
}

impl std::fmt::Display for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Query::Skill(n) => write!(f, "skill {n}"),
            Query::Tag(t) => write!(f, "tag {t}"),
        }
    }
}

/// An agent found by a lookup, with its verified card.
#[derive(Clone, Debug, PartialEq)]
pub struct Found {
    /// The agent.
    pub peer: PeerId,
    /// Its verified card.
    pub card: AgentCard,
    /// Its skills that answer the query.
    pub skills: Vec<SkillSpec>,
}

/// The provider keys for a set of skills.
pub(crate) fn provider_keys(specs: &[SkillSpec]) -> HashSet<RecordKey> {
    let mut keys = HashSet::new();
    for s in specs {
        keys.insert(RecordKey::new(&skill_key(&s.name)));
        for t in &s.tags {
            keys.insert(RecordKey::new(&tag_key(t)));
        }
    }
    keys
}

/// Keeps a verified card of another agent: its addresses for the swarm (so it can be dialed)
/// and its signed bytes in the store (so it is known after a restart, when the DHT is silent).
pub(crate) async fn remember_card(
    commands: &mpsc::Sender<Command>,
    store: &Store,
    card: &AgentCard,
    envelope: Vec<u8>,
) {
    let _ = commands
        .send(Command::AddAddresses {
            peer: card.peer_id,
            addrs: card.addrs.clone(),
        })
        .await;
    let stored = StoredCard {
        seq: card.seq,
        expires_at: card.expires_at,
        envelope: ByteBuf::from(envelope),
    };
    match store.put_card(card.peer_id, stored, Timestamp::now()).await {
        Ok(()) | Err(StoreError::StaleCard { .. }) => {}
        Err(e) => tracing::warn!("cannot cache a card: {e}"),
    }
}

/// What a card carries besides skills and addresses.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CardExtras<'a> {
    pub(crate) mailboxes: &'a [PeerId],
    pub(crate) prekeys: Option<&'a PrekeyBundle>,
}

/// Signs this node's card.
pub(crate) fn build_card(
    signing: &SigningKey,
    name: &str,
    specs: &[SkillSpec],
    addrs: &[Multiaddr],
    extras: CardExtras<'_>,
    seq: u64,
    ttl: Duration,
) -> Result<(AgentCard, Vec<u8>), skillmesh_protocol::EnvelopeError> {
    let now = Timestamp::now();
    // What a peer elsewhere can use (`addrs.rs`).
    let addrs = crate::addrs::for_card(addrs, MAX_CARD_ADDRS);
    let card = AgentCard {
        peer_id: signing.peer_id(),
        name: name.to_owned(),
        skills: specs.iter().map(SkillSpec::compact).collect(),
        addrs,
        mailboxes: extras.mailboxes.to_vec(),
        prekeys: extras.prekeys.cloned(),
        seq,
        issued_at: now,
        expires_at: now.saturating_add(ttl),
    };
    let bytes = envelope::seal(signing, &card)?;
    Ok((card, bytes))
}

/// Checks a card record: a valid, unexpired card envelope stored under its own agent's key.
pub(crate) fn verify_card_record(record: &kad::Record) -> Result<AgentCard, String> {
    let card = envelope::open::<AgentCard>(&record.value, &Checks::now())
        .map_err(|e| e.to_string())?
        .value;
    if record.key.as_ref() != card_key(&card.peer_id).as_slice() {
        return Err(format!("card of {} stored under another key", card.peer_id));
    }
    Ok(card)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skillmesh_protocol::Keypair;

    #[test]
    fn card_records_are_checked_against_their_key() {
        let k = SigningKey::from_keypair(&Keypair::generate_ed25519()).expect("key");
        let addrs = [
            "/ip4/0.0.0.0/tcp/1".parse().expect("a"),
            "/ip4/127.0.0.1/tcp/1".parse().expect("a"),
        ];
        let (card, bytes) = build_card(
            &k,
            "a",
            &[],
            &addrs,
            CardExtras::default(),
            1,
            Duration::from_secs(60),
        )
        .expect("card");
        assert_eq!(card.addrs.len(), 1, "unspecified address dropped");
        let good = kad::Record::new(RecordKey::new(&card_key(&k.peer_id())), bytes.clone());
        assert!(verify_card_record(&good).is_ok());
        // Someone else's key: a valid card misfiled to hijack another agent's card slot.
        let misfiled = kad::Record::new(RecordKey::new(&card_key(&PeerId::random())), bytes);
        assert!(verify_card_record(&misfiled).is_err());
        let junk = kad::Record::new(RecordKey::new(&card_key(&k.peer_id())), vec![1, 2, 3]);
        assert!(verify_card_record(&junk).is_err());
    }
}

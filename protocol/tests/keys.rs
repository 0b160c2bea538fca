//! DHT keys and topic names, against vectors computed independently (Python hashlib).

use libp2p_identity::PeerId;
use skillmesh_protocol::keys::*;
use skillmesh_protocol::{MeshName, SkillName, Tag};

#[test]
fn dht_keys_are_sha256_multihashes() {
    assert_eq!(
        hex::encode(skill_key(&SkillName::new("translate").expect("n"))),
        "1220716b3a80af7f83844acec20a64ae77d69b12ac8d2e6975ad2eb86924abebda73"
    );
    assert_eq!(
        hex::encode(tag_key(&Tag::new("nlp").expect("t"))),
        "12200431391beda9cabe71d78cacf154de6ca78e00a55b4e1d79aeff2971950ee89c"
    );
    assert_eq!(
        hex::encode(relay_key()),
        "12202324cacc2365acfee7ee0b65530f669edf281d21355607265ba4e21a4267c8ec"
    );
    let p = PeerId::random();
    assert_eq!(card_key(&p), dht_key(&format!("skillmesh/card/{p}")));
    assert_ne!(card_key(&p), card_key(&PeerId::random()));
}

#[test]
fn topics_are_namespaced_and_checked() {
    let m = MeshName::new("lab").expect("mesh");
    assert_eq!(m.presence_topic(), "skillmesh/lab/presence");
    assert_eq!(m.skills_topic(), "skillmesh/lab/skills");
    assert_eq!(
        m.app_topic("news/eu").expect("topic"),
        "skillmesh/lab/app/news/eu"
    );
    assert!(m.app_topic("").is_err());
    assert!(m.app_topic("has space").is_err());
    assert!(m.app_topic(&"x".repeat(200)).is_err());
    assert!(MeshName::new("Lab").is_err());
    assert!(check_topic("other/ns").is_err());
}

use super::batch::verify_one_signer;
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
    let signatures: Vec<ed25519_dalek::Signature> = refs.iter().map(|m| key.key.sign(m)).collect();
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

//! Signed envelopes: round trips, tampering, and one distinct error per rejection reason.

use std::time::Duration;

use libp2p_identity::{Keypair, PeerId};
use proptest::prelude::*;
use serde_bytes::ByteBuf;
use skillmesh_protocol::envelope::{self, Checks, Kind};
use skillmesh_protocol::*;

fn key() -> SigningKey {
    SigningKey::from_keypair(&Keypair::generate_ed25519()).expect("ed25519")
}

fn peer() -> PeerId {
    Keypair::generate_ed25519().public().to_peer_id()
}

const T0: Timestamp = Timestamp(1_800_000_000_000);

fn call(caller: &SigningKey, args: Vec<u8>) -> Call {
    Call {
        call_id: CallId([1; 16]),
        caller: caller.peer_id(),
        target: peer(),
        skill: SkillName::new("translate").expect("name"),
        version_req: "^1.2".parse().expect("req"),
        args: ByteBuf::from(args),
        issued_at: T0,
        expires_at: T0.saturating_add(Duration::from_secs(60)),
        mode: Mode::Sync,
        grant: None,
    }
}

#[test]
fn sealed_call_opens_with_signer_and_id() {
    let k = key();
    let c = call(&k, to_cbor(&"hello"));
    let bytes = envelope::seal(&k, &c).expect("seal");
    let opened =
        envelope::open::<Call>(&bytes, &Checks::at(T0).signed_by(k.peer_id())).expect("open");
    assert_eq!(opened.value, c);
    assert_eq!(opened.signer, k.peer_id());
    assert_eq!(opened.id, MessageId::of(&bytes[ENVELOPE_HEADER_BYTES..]));
}

#[test]
fn header_layout_is_as_specified() {
    let k = key();
    let bytes = envelope::seal(&k, &call(&k, vec![])).expect("seal");
    assert_eq!(&bytes[0..2], b"SM");
    assert_eq!(bytes[2], 1);
    assert_eq!(bytes[3], Kind::Call.code());
    assert_eq!(&bytes[4..36], &k.public_key());
}

#[test]
fn wrong_signer_is_rejected() {
    let k = forging_key();
    let mut c = call(&k, vec![]);
    let honest = envelope::seal(&k, &c).expect("seal");
    // The forging helper makes the same bytes as seal for an honest payload.
    assert_eq!(resign(&k, Kind::Call, &to_cbor(&c)), honest);

    // A payload that claims another author than the key that signed it: seal refuses to make
    // it, and a hand-forged one is refused on open.
    c.caller = peer();
    assert!(matches!(
        envelope::seal(&k, &c),
        Err(EnvelopeError::SignerMismatch { .. })
    ));
    let forged = resign(&k, Kind::Call, &to_cbor(&c));
    assert!(matches!(
        envelope::open::<Call>(&forged, &Checks::at(T0)),
        Err(EnvelopeError::SignerMismatch { .. })
    ));

    // Honestly signed by k, but the connection's peer is someone else.
    let other = peer();
    match envelope::open::<Call>(&honest, &Checks::at(T0).signed_by(other)) {
        Err(EnvelopeError::UnexpectedSigner { expected, found }) => {
            assert_eq!(*expected, other);
            assert_eq!(*found, k.peer_id());
        }
        r => panic!("expected UnexpectedSigner, got {r:?}"),
    }
}

/// Builds an envelope as the spec says, without `seal`'s checks, to forge bad payloads. It is
/// also an independent implementation of the layout: see `wrong_signer_is_rejected`.
fn resign(k: &SigningKey, kind: Kind, payload: &[u8]) -> Vec<u8> {
    use ed25519_dalek::Signer;
    let secret = SECRETS
        .with(|s| s.borrow().get(&k.peer_id()).copied())
        .expect("a key made by forging_key");
    let sk = ed25519_dalek::SigningKey::from_bytes(&secret);
    let mut input = format!("skillmesh/v1/{}", kind.name()).into_bytes();
    input.push(0);
    input.extend_from_slice(payload);
    let mut out = b"SM".to_vec();
    out.push(1);
    out.push(kind.code());
    out.extend_from_slice(&sk.verifying_key().to_bytes());
    out.extend_from_slice(&sk.sign(&input).to_bytes());
    out.extend_from_slice(payload);
    out
}

thread_local! {
    static SECRETS: std::cell::RefCell<std::collections::HashMap<PeerId, [u8; 32]>> =
        Default::default();
}

/// A key whose secret this test keeps, to forge envelopes that `seal` would refuse to make.
fn forging_key() -> SigningKey {
    let kp = Keypair::generate_ed25519();
    let ed = kp.clone().try_into_ed25519().expect("ed25519");
    let mut secret = [0u8; 32];
    secret.copy_from_slice(&ed.to_bytes()[..32]);
    let k = SigningKey::from_keypair(&kp).expect("ed25519");
    SECRETS.with(|s| s.borrow_mut().insert(k.peer_id(), secret));
    k
}

#[test]
fn expired_is_rejected_beyond_skew_only() {
    let k = key();
    let c = call(&k, vec![]);
    let bytes = envelope::seal(&k, &c).expect("seal");
    let just_inside = c.expires_at.saturating_add(MAX_CLOCK_SKEW);
    assert!(envelope::open::<Call>(&bytes, &Checks::at(just_inside)).is_ok());
    let past = just_inside.saturating_add(Duration::from_millis(1));
    assert!(matches!(
        envelope::open::<Call>(&bytes, &Checks::at(past)),
        Err(EnvelopeError::Expired { .. })
    ));
}

#[test]
fn not_yet_valid_beyond_skew_is_rejected() {
    let k = key();
    let c = call(&k, vec![]);
    let bytes = envelope::seal(&k, &c).expect("seal");
    let early_within_skew = c.issued_at.saturating_sub(MAX_CLOCK_SKEW);
    assert!(envelope::open::<Call>(&bytes, &Checks::at(early_within_skew)).is_ok());
    let too_early = early_within_skew.saturating_sub(Duration::from_millis(1));
    assert!(matches!(
        envelope::open::<Call>(&bytes, &Checks::at(too_early)),
        Err(EnvelopeError::NotYetValid { .. })
    ));
}

#[test]
fn call_window_longer_than_allowed_is_invalid() {
    let k = key();
    let mut c = call(&k, vec![]);
    c.expires_at = c
        .issued_at
        .saturating_add(MAX_CALL_WINDOW + Duration::from_millis(1));
    assert!(matches!(
        envelope::seal(&k, &c),
        Err(EnvelopeError::Invalid(ValidationError { field, .. })) if field == "expires_at"
    ));
}

#[test]
fn oversize_is_rejected_before_verification() {
    let k = key();
    let bytes = envelope::seal(&k, &call(&k, vec![])).expect("seal");
    let mut big = bytes.clone();
    big.resize(Kind::Call.max_envelope() + 1, 0);
    assert!(matches!(
        envelope::open::<Call>(&big, &Checks::at(T0)),
        Err(EnvelopeError::Oversize {
            kind: Some(Kind::Call),
            ..
        })
    ));
    // A kind's own limit applies even when the envelope is under the global one.
    let mut cancel = bytes;
    cancel[3] = Kind::Cancel.code();
    cancel.resize(Kind::Cancel.max_envelope() + 1, 0);
    assert!(matches!(
        envelope::verify(&cancel),
        Err(EnvelopeError::Oversize {
            kind: Some(Kind::Cancel),
            ..
        })
    ));
    let huge = vec![0u8; MAX_ENVELOPE_BYTES + 1];
    assert!(matches!(
        envelope::verify(&huge),
        Err(EnvelopeError::Oversize { kind: None, .. })
    ));
    // Sealing refuses too: arguments over the protocol limit.
    assert!(matches!(
        envelope::seal(&k, &call(&k, vec![0; MAX_CALL_ARGS_BYTES + 1])),
        Err(EnvelopeError::Invalid(ValidationError { field, .. })) if field == "args"
    ));
}

#[test]
fn truncated_is_rejected() {
    let k = key();
    let bytes = envelope::seal(&k, &call(&k, vec![])).expect("seal");
    assert!(matches!(
        envelope::open::<Call>(&bytes[..ENVELOPE_HEADER_BYTES - 1], &Checks::at(T0)),
        Err(EnvelopeError::Truncated { .. })
    ));
    // Cut inside the payload: the signature no longer covers what is left.
    assert!(matches!(
        envelope::open::<Call>(&bytes[..bytes.len() - 1], &Checks::at(T0)),
        Err(EnvelopeError::BadSignature)
    ));
}

#[test]
fn garbage_is_rejected() {
    assert!(matches!(
        envelope::verify(&[0x42; 300]),
        Err(EnvelopeError::BadMagic)
    ));
    let k = key();
    let good = envelope::seal(&k, &call(&k, vec![])).expect("seal");
    let mut v = good.clone();
    v[2] = 9;
    assert!(matches!(
        envelope::verify(&v),
        Err(EnvelopeError::UnsupportedVersion(9))
    ));
    let mut u = good.clone();
    u[3] = 200;
    assert!(matches!(
        envelope::verify(&u),
        Err(EnvelopeError::UnknownKind(200))
    ));
    // A validly signed payload that is not CBOR of the kind: decoding fails after verification.
    let kf = forging_key();
    let junk = resign(&kf, Kind::Call, &[0xff, 0x00, 0x13]);
    assert!(envelope::verify(&junk).is_ok());
    assert!(matches!(
        envelope::open::<Call>(&junk, &Checks::at(T0)),
        Err(EnvelopeError::Decode(_))
    ));
    // Trailing bytes after a valid payload are not ignored.
    let mut payload = to_cbor(&call(&kf, vec![]));
    payload.push(0);
    let trailing = resign(&kf, Kind::Call, &payload);
    assert!(matches!(
        envelope::open::<Call>(&trailing, &Checks::at(T0)),
        Err(EnvelopeError::Decode(DecodeError::TrailingBytes))
    ));
}

#[test]
fn invalid_signer_key_is_rejected() {
    let k = key();
    let mut bytes = envelope::seal(&k, &call(&k, vec![])).expect("seal");
    // y = 2 does not decode to a curve point.
    let mut bad = [0u8; 32];
    bad[0] = 2;
    bytes[4..36].copy_from_slice(&bad);
    assert!(matches!(
        envelope::verify(&bytes),
        Err(EnvelopeError::InvalidSignerKey | EnvelopeError::BadSignature)
    ));
}

#[test]
fn kind_confusion_is_rejected() {
    let k = key();
    let bytes = envelope::seal(&k, &call(&k, vec![])).expect("seal");
    // Asking for another kind of a valid envelope.
    assert!(matches!(
        envelope::open::<Cancel>(&bytes, &Checks::at(T0)),
        Err(EnvelopeError::WrongKind {
            expected: Kind::Cancel,
            found: Kind::Call
        })
    ));
    // Relabelling the kind byte breaks the signature: the domain tag differs.
    let mut relabelled = bytes.clone();
    relabelled[3] = Kind::Event.code();
    assert!(matches!(
        envelope::verify(&relabelled),
        Err(EnvelopeError::BadSignature)
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_flipped_bit_after_the_header_kind_is_rejected(
        args in proptest::collection::vec(any::<u8>(), 0..512),
        pos in any::<proptest::sample::Index>(),
        bit in 0u8..8,
    ) {
        let k = key();
        let bytes = envelope::seal(&k, &call(&k, args)).expect("seal");
        // Every byte of signer, signature and payload (offset 4 on); magic/version/kind have
        // their own errors above.
        let i = 4 + pos.index(bytes.len() - 4);
        let mut t = bytes.clone();
        t[i] ^= 1 << bit;
        prop_assert!(envelope::open::<Call>(&t, &Checks::at(T0)).is_err(), "flip at {} accepted", i);
    }

    #[test]
    fn call_round_trips(
        args in proptest::collection::vec(any::<u8>(), 0..2048),
        id in any::<[u8; 16]>(),
        window_ms in 1u64..300_000,
        mode in prop_oneof![Just(Mode::Sync), Just(Mode::Async), Just(Mode::Stream)],
        name in "[a-z0-9][a-z0-9._-]{0,63}",
    ) {
        let k = key();
        let mut c = call(&k, args);
        c.call_id = CallId(id);
        c.expires_at = c.issued_at.saturating_add(Duration::from_millis(window_ms));
        c.mode = mode;
        c.skill = SkillName::new(name).expect("valid by construction");
        let bytes = envelope::seal(&k, &c).expect("seal");
        let opened = envelope::open::<Call>(&bytes, &Checks::at(T0)).expect("open");
        prop_assert_eq!(opened.value, c);
    }

    #[test]
    fn call_result_round_trips(
        output in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..1024)),
        code in 1u16..40,
        msg in ".{0,100}",
        queued in any::<u32>(),
        run in any::<u32>(),
    ) {
        let k = key();
        let (status, output, error) = match output {
            Some(o) => (CallStatus::Completed, Some(ByteBuf::from(o)), None),
            None => (CallStatus::Failed, None, Some(CallError::new(ErrorCode::from(code), msg))),
        };
        let r = CallResult {
            call_id: CallId([3; 16]),
            callee: k.peer_id(),
            caller: peer(),
            status,
            output,
            error,
            timings: Timings { queued_ms: queued, run_ms: run },
        };
        let bytes = envelope::seal(&k, &r).expect("seal");
        prop_assert_eq!(envelope::open::<CallResult>(&bytes, &Checks::at(T0)).expect("open").value, r);
    }

    #[test]
    fn event_and_grant_and_sealed_round_trip(
        data in proptest::collection::vec(any::<u8>(), 1..1024),
        seq in any::<u64>(),
        topic in "[a-z]{1,20}",
    ) {
        let k = key();
        let e = Event {
            topic: MeshName::default().app_topic(&topic).expect("topic"),
            publisher: k.peer_id(),
            seq,
            issued_at: T0,
            data: ByteBuf::from(data.clone()),
        };
        let bytes = envelope::seal(&k, &e).expect("seal");
        prop_assert_eq!(envelope::open::<Event>(&bytes, &Checks::at(T0)).expect("open").value, e);

        let g = Grant {
            issuer: k.peer_id(),
            grantee: peer(),
            skills: vec![SkillName::new(topic.clone()).expect("name")],
            issued_at: T0,
            expires_at: T0.saturating_add(Duration::from_secs(3600)),
        };
        let bytes = envelope::seal(&k, &g).expect("seal");
        prop_assert_eq!(envelope::open::<Grant>(&bytes, &Checks::at(T0)).expect("open").value, g);

        let m = SealedMessage {
            sender: k.peer_id(),
            recipient: peer(),
            seq,
            created_at: T0,
            cipher: CipherKind::Normal,
            ciphertext: ByteBuf::from(data),
        };
        let bytes = envelope::seal(&k, &m).expect("seal");
        prop_assert_eq!(envelope::open::<SealedMessage>(&bytes, &Checks::at(T0)).expect("open").value, m);
    }
}

#[test]
fn unknown_error_codes_survive_a_round_trip() {
    assert_eq!(ErrorCode::from(11), ErrorCode::RateLimited);
    assert_eq!(ErrorCode::from(999), ErrorCode::Other(999));
    let bytes = to_cbor(&ErrorCode::Other(999));
    assert_eq!(
        from_cbor::<ErrorCode>(&bytes, 16).expect("decode"),
        ErrorCode::Other(999)
    );
    // Codes are distinct and stable.
    let mut codes: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.code()).collect();
    codes.dedup();
    assert_eq!(codes.len(), ErrorCode::ALL.len());
    assert_eq!(ErrorCode::Replayed.code(), 7);
    assert_eq!(ErrorCode::InvalidArgs.name(), "invalid_args");
}

#[test]
fn batch_verdicts_match_one_by_one() {
    let keys: Vec<SigningKey> = (0..3).map(|_| key()).collect();
    // More than one batch's worth, so the split is covered too.
    let mut envelopes: Vec<Vec<u8>> = (0..envelope::MAX_BATCH + 6)
        .map(|i| {
            let k = &keys[i % keys.len()];
            envelope::seal(k, &call(k, to_cbor(&i))).expect("seal")
        })
        .collect();
    // A flipped payload byte, a signature from another key, a truncated header, an invalid key.
    envelopes[3][ENVELOPE_HEADER_BYTES + 2] ^= 1;
    let other = envelopes[1][36..100].to_vec();
    envelopes[7][36..100].copy_from_slice(&other);
    envelopes[9].truncate(50);
    envelopes[envelope::MAX_BATCH + 2][4] = 2;
    envelopes[envelope::MAX_BATCH + 2][5..36].fill(0);
    let refs: Vec<&[u8]> = envelopes.iter().map(Vec::as_slice).collect();
    let batch = envelope::verify_batch(&refs);
    assert_eq!(batch.len(), refs.len());
    for (i, (got, bytes)) in batch.iter().zip(&refs).enumerate() {
        let alone = envelope::verify(bytes);
        match (got, &alone) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.signer(), b.signer(), "envelope {i}");
                assert_eq!(a.payload(), b.payload(), "envelope {i}");
            }
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "envelope {i}"),
            _ => panic!("envelope {i}: batch {got:?}, alone {alone:?}"),
        }
    }
    let refused: Vec<usize> = (0..batch.len()).filter(|&i| batch[i].is_err()).collect();
    assert_eq!(refused, vec![3, 7, 9, envelope::MAX_BATCH + 2]);
    // All good: one multiplication, every envelope accepted.
    let good: Vec<&[u8]> = refs
        .iter()
        .enumerate()
        .filter(|(i, _)| !refused.contains(i))
        .map(|(_, b)| *b)
        .collect();
    assert!(envelope::verify_batch(&good).iter().all(Result::is_ok));
    assert!(envelope::verify_batch(&[]).is_empty());
}

/// Envelopes signed by one key, as a call pipe reads them: the batch sums that key's terms.
#[test]
fn one_signer_batch_verdicts_match_one_by_one() {
    let k = key();
    let mut envelopes: Vec<Vec<u8>> = (0..12)
        .map(|i| envelope::seal(&k, &call(&k, to_cbor(&i))).expect("seal"))
        .collect();
    let good: Vec<&[u8]> = envelopes.iter().map(Vec::as_slice).collect();
    assert!(envelope::verify_batch(&good).iter().all(Result::is_ok));
    // Each kind of damage alone, then all at once: a flipped payload byte, the same key's
    // signature of another envelope, s made non-canonical, R replaced by other bytes.
    let other = envelopes[1][36..100].to_vec();
    let damage = |kind: usize, e: &mut Vec<u8>| match kind {
        0 => e[ENVELOPE_HEADER_BYTES + 2] ^= 1,
        1 => e[36..100].copy_from_slice(&other),
        2 => e[99] |= 0xf0,
        _ => {
            e[36..68].fill(0xff);
            e[67] = 0x7f;
        }
    };
    let bad = [3, 7, 9, 11];
    for (kind, &at) in bad.iter().enumerate() {
        let mut one = envelopes.clone();
        damage(kind, &mut one[at]);
        let refs: Vec<&[u8]> = one.iter().map(Vec::as_slice).collect();
        let batch = envelope::verify_batch(&refs);
        for (i, got) in batch.iter().enumerate() {
            assert_eq!(got.is_ok(), i != at, "envelope {i} with {at} damaged");
        }
        assert!(envelope::verify(refs[at]).is_err());
    }
    for (kind, &at) in bad.iter().enumerate() {
        damage(kind, &mut envelopes[at]);
    }
    let refs: Vec<&[u8]> = envelopes.iter().map(Vec::as_slice).collect();
    let refused: Vec<usize> = envelope::verify_batch(&refs)
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_err())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(refused, vec![3, 7, 9, 11]);
}

#[test]
fn small_order_signer_cannot_pass_a_batch() {
    // The identity point as the key, the identity as R and s = 0: under a cofactored equation
    // this "signs" anything. Such keys are refused before any signature is checked.
    let k = key();
    let good = envelope::seal(&k, &call(&k, vec![])).expect("seal");
    let mut forged = good.clone();
    let mut identity = [0u8; 32];
    identity[0] = 1;
    forged[4..36].copy_from_slice(&identity);
    forged[36..68].copy_from_slice(&identity);
    forged[68..100].fill(0);
    let batch = envelope::verify_batch(&[&good, &forged, &good]);
    assert!(batch[0].is_ok() && batch[2].is_ok());
    assert!(matches!(batch[1], Err(EnvelopeError::InvalidSignerKey)));
    assert!(matches!(
        envelope::verify(&forged),
        Err(EnvelopeError::InvalidSignerKey)
    ));
}

fn prepared(k: &SigningKey, n: usize) -> Vec<envelope::Unsigned> {
    (0..n)
        .map(|i| envelope::prepare(k, &call(k, to_cbor(&i))).expect("prepare"))
        .collect()
}

/// The depth byte of a batch-signed envelope, and where its payload starts.
fn proof_depth(e: &[u8]) -> usize {
    usize::from(e[ENVELOPE_HEADER_BYTES])
}

#[test]
fn batch_signed_envelopes_open_alone_and_together() {
    let k = key();
    for n in [1, 2, 3, 5, 17, 64, 65, 130] {
        let items = prepared(&k, n);
        let refs: Vec<&envelope::Unsigned> = items.iter().collect();
        let sealed = envelope::sign_batch(&k, &refs);
        assert_eq!(sealed.len(), n);
        for (i, (e, u)) in sealed.iter().zip(&items).enumerate() {
            // A batch of one (also the 65th of 65) is a plain envelope; the rest carry paths.
            let alone = n == 1 || (n % 64 == 1 && i == n - 1);
            assert_eq!(e[2], if alone { 1 } else { 2 }, "n {n} envelope {i}");
            let opened: Opened<Call> = envelope::open(e, &Checks::at(T0)).expect("open");
            assert_eq!(opened.signer, k.peer_id());
            assert_eq!(opened.id, MessageId::of(u.payload()));
            assert_eq!(envelope::verify(e).expect("verify").payload(), u.payload());
            assert_eq!(
                envelope::peek_payload(e),
                Some((Kind::Call, u.payload())),
                "n {n} envelope {i}"
            );
        }
        let all: Vec<&[u8]> = sealed.iter().map(Vec::as_slice).collect();
        assert!(
            envelope::verify_batch(&all).iter().all(Result::is_ok),
            "n {n}"
        );
        // A batch of 64 signs once: every envelope carries the same signature.
        if n >= 64 {
            assert!(
                sealed[..64]
                    .iter()
                    .all(|e| e[36..100] == sealed[0][36..100])
            );
            assert!(sealed[..64].iter().all(|e| proof_depth(e) == 6));
        }
    }
    // The single-envelope path and a batch of one agree byte for byte.
    let one = prepared(&k, 1);
    assert_eq!(envelope::sign_batch(&k, &[&one[0]])[0], one[0].sign(&k));
}

#[test]
fn tampered_batch_envelopes_are_refused() {
    let k = key();
    let items = prepared(&k, 5);
    let refs: Vec<&envelope::Unsigned> = items.iter().collect();
    let sealed = envelope::sign_batch(&k, &refs);
    let e = &sealed[2];
    let depth = proof_depth(e);
    assert_eq!(depth, 3);
    let payload_at = ENVELOPE_HEADER_BYTES + 2 + 32 * depth;
    let bad_signature = |bytes: &[u8]| {
        assert!(matches!(
            envelope::verify(bytes),
            Err(EnvelopeError::BadSignature)
        ));
    };
    let mut t = e.clone();
    t[payload_at + 3] ^= 1;
    bad_signature(&t);
    let mut t = e.clone();
    t[ENVELOPE_HEADER_BYTES + 2 + 40] ^= 1;
    bad_signature(&t);
    let mut t = e.clone();
    t[ENVELOPE_HEADER_BYTES + 1] ^= 1;
    bad_signature(&t);
    let mut t = e.clone();
    t[40] ^= 1;
    bad_signature(&t);
    // Another envelope's path with this payload.
    let mut t = sealed[3][..payload_at].to_vec();
    t.extend_from_slice(&e[payload_at..]);
    bad_signature(&t);
    // Layout damage is refused before any signature work, each with its own reason.
    let mut t = e.clone();
    t[ENVELOPE_HEADER_BYTES] = 0;
    assert!(matches!(
        envelope::verify(&t),
        Err(EnvelopeError::BadProof(_))
    ));
    let mut t = e.clone();
    t[ENVELOPE_HEADER_BYTES] = 7;
    assert!(matches!(
        envelope::verify(&t),
        Err(EnvelopeError::BadProof(_))
    ));
    let mut t = e.clone();
    t[ENVELOPE_HEADER_BYTES + 1] |= 0x80;
    assert!(matches!(
        envelope::verify(&t),
        Err(EnvelopeError::BadProof(_))
    ));
    let t = &e[..ENVELOPE_HEADER_BYTES + 2 + 32 * depth - 1];
    assert!(matches!(
        envelope::verify(t),
        Err(EnvelopeError::Truncated { .. })
    ));
    let t = &e[..ENVELOPE_HEADER_BYTES + 1];
    assert!(matches!(
        envelope::verify(t),
        Err(EnvelopeError::Truncated { .. })
    ));
    assert!(envelope::peek_payload(t).is_none());
    // The same proof under another kind's code: the leaf's domain tag differs.
    let mut t = e.clone();
    t[3] = Kind::CallResult.code();
    bad_signature(&t);
}

#[test]
fn a_batch_signature_is_bound_to_its_key() {
    let k = key();
    let thief = key();
    let items = prepared(&k, 4);
    let refs: Vec<&envelope::Unsigned> = items.iter().collect();
    let sealed = envelope::sign_batch(&k, &refs);
    // The thief's own batch, then k's signature and paths copied under the thief's key.
    let mine = prepared(&thief, 4);
    let mine: Vec<&envelope::Unsigned> = mine.iter().collect();
    let mut mixed = envelope::sign_batch(&thief, &mine);
    let mut stolen = sealed[1].clone();
    stolen[4..36].copy_from_slice(&thief.public_key());
    mixed.push(stolen.clone());
    let refs: Vec<&[u8]> = mixed.iter().map(Vec::as_slice).collect();
    let verdicts = envelope::verify_batch(&refs);
    assert!(verdicts[..4].iter().all(Result::is_ok));
    assert!(matches!(verdicts[4], Err(EnvelopeError::BadSignature)));
    assert!(matches!(
        envelope::verify(&stolen),
        Err(EnvelopeError::BadSignature)
    ));
}

#[test]
fn batch_verdicts_match_one_by_one_for_batch_envelopes() {
    let k = key();
    let other = key();
    let items = prepared(&k, 9);
    let refs: Vec<&envelope::Unsigned> = items.iter().collect();
    let mut sealed = envelope::sign_batch(&k, &refs);
    let theirs = prepared(&other, 3);
    let theirs: Vec<&envelope::Unsigned> = theirs.iter().collect();
    sealed.extend(envelope::sign_batch(&other, &theirs));
    sealed.push(envelope::seal(&k, &call(&k, vec![1])).expect("seal"));
    // One batch envelope's payload flipped: its siblings share the signature and must still pass.
    let at = ENVELOPE_HEADER_BYTES + 2 + 32 * proof_depth(&sealed[4]) + 2;
    sealed[4][at] ^= 1;
    let r: Vec<&[u8]> = sealed.iter().map(Vec::as_slice).collect();
    let batch = envelope::verify_batch(&r);
    for (i, got) in batch.iter().enumerate() {
        assert_eq!(got.is_ok(), envelope::verify(r[i]).is_ok(), "envelope {i}");
        assert_eq!(got.is_ok(), i != 4, "envelope {i}");
    }
}

//! Agent cards and skill specs: validation names the field; round trips; card size limits.

use std::time::Duration;

use libp2p_identity::Keypair;
use proptest::prelude::*;
use skillmesh_protocol::envelope::{self, Checks};
use skillmesh_protocol::*;

const T0: Timestamp = Timestamp(1_800_000_000_000);

fn spec(name: &str) -> SkillSpec {
    SkillSpec::builder(name, "1.2.3")
        .description("translates text")
        .mode(Mode::Sync)
        .share(ShareMode::Public)
        .input_schema(
            serde_json::json!({"type": "object", "properties": {"text": {"type": "string"}}}),
        )
        .tag("nlp")
        .tag("text")
        .timeout(Duration::from_secs(10))
        .build()
        .expect("valid spec")
}

fn card(key: &SigningKey, skills: Vec<SkillSpec>) -> AgentCard {
    AgentCard {
        peer_id: key.peer_id(),
        name: "agent".into(),
        skills,
        addrs: vec!["/ip4/127.0.0.1/tcp/4001".parse().expect("addr")],
        mailboxes: vec![],
        prekeys: Some(PrekeyBundle {
            identity_key: [9; 32],
            one_time_keys: vec![OneTimeKey {
                id: vec![1],
                key: [2; 32],
            }],
            fallback_key: None,
        }),
        seq: 1,
        issued_at: T0,
        expires_at: T0.saturating_add(Duration::from_secs(3600)),
    }
}

#[test]
fn builder_names_the_bad_field() {
    let err = |b: SkillSpecBuilder| b.build().expect_err("must fail").field;
    assert_eq!(err(SkillSpec::builder("Translate", "1.0.0")), "name");
    assert_eq!(err(SkillSpec::builder("", "1.0.0")), "name");
    assert_eq!(err(SkillSpec::builder("a".repeat(65), "1.0.0")), "name");
    assert_eq!(err(SkillSpec::builder("ok", "one")), "version");
    assert_eq!(
        err(SkillSpec::builder("ok", "1.0.0").tag("nlp").tag("NLP")),
        "tags[1]"
    );
    assert_eq!(
        err(SkillSpec::builder("ok", "1.0.0").tag("a").tag("a")),
        "tags[1]"
    );
    assert_eq!(
        err(SkillSpec::builder("ok", "1.0.0").timeout(Duration::ZERO)),
        "limits.timeout_ms"
    );
    assert_eq!(
        err(SkillSpec::builder("ok", "1.0.0").timeout(MAX_SKILL_TIMEOUT + Duration::from_secs(1))),
        "limits.timeout_ms"
    );
    // Stream and async skills may run for up to a day; a sync one fits a call's window.
    for mode in [Mode::Stream, Mode::Async] {
        let long = SkillSpec::builder("ok", "1.0.0")
            .mode(mode)
            .timeout(MAX_LONG_SKILL_TIMEOUT)
            .build();
        assert!(long.is_ok(), "{mode}: {long:?}");
        assert_eq!(
            err(SkillSpec::builder("ok", "1.0.0")
                .mode(mode)
                .timeout(MAX_LONG_SKILL_TIMEOUT + Duration::from_secs(1))),
            "limits.timeout_ms"
        );
    }
    assert_eq!(
        err(SkillSpec::builder("ok", "1.0.0").max_concurrency(0)),
        "limits.max_concurrency"
    );
    assert_eq!(
        err(SkillSpec::builder("ok", "1.0.0").max_arg_bytes(MAX_CALL_ARGS_BYTES as u32 + 1)),
        "limits.max_arg_bytes"
    );
    assert_eq!(
        err(SkillSpec::builder("ok", "1.0.0").input_schema(serde_json::json!(3))),
        "input"
    );
    let mut b = SkillSpec::builder("ok", "1.0.0");
    for i in 0..=MAX_TAGS {
        b = b.tag(format!("t{i}"));
    }
    assert_eq!(err(b), "tags");
}

#[test]
fn names_decode_only_when_valid() {
    // Validation runs during decoding too, so a peer cannot slip in a bad name.
    let bytes = to_cbor(&"Bad Name");
    assert!(from_cbor::<SkillName>(&bytes, 64).is_err());
    let bytes = to_cbor(&"good-name.v2");
    assert_eq!(
        from_cbor::<SkillName>(&bytes, 64).expect("ok").as_str(),
        "good-name.v2"
    );
}

#[test]
fn card_round_trips_and_validates() {
    let k = SigningKey::from_keypair(&Keypair::generate_ed25519()).expect("key");
    let c = card(
        &k,
        vec![spec("translate").compact(), spec("summarize").compact()],
    );
    let bytes = envelope::seal(&k, &c).expect("seal");
    assert!(bytes.len() < MAX_CARD_PAYLOAD_BYTES);
    let opened = envelope::open::<AgentCard>(&bytes, &Checks::at(T0)).expect("open");
    assert_eq!(opened.value, c);
    assert!(
        opened
            .value
            .skill(&SkillName::new("summarize").expect("n"))
            .is_some()
    );
}

#[test]
fn card_rules_name_the_field() {
    let k = SigningKey::from_keypair(&Keypair::generate_ed25519()).expect("key");
    let field = |c: AgentCard| match envelope::seal(&k, &c) {
        Err(EnvelopeError::Invalid(e)) => e.field,
        r => panic!("expected a validation error, got {r:?}"),
    };
    let mut c = card(&k, vec![spec("a"), spec("a")]);
    assert_eq!(field(c.clone()), "skills[1].name");
    c.skills = vec![];
    c.expires_at = c
        .issued_at
        .saturating_add(MAX_CARD_LIFETIME + Duration::from_secs(1));
    assert_eq!(field(c.clone()), "expires_at");
    c.expires_at = c.issued_at;
    assert_eq!(field(c.clone()), "expires_at");
    let mut c = card(&k, vec![]);
    c.addrs = vec!["/ip4/1.2.3.4/tcp/1".parse().expect("addr"); MAX_CARD_ADDRS + 1];
    assert_eq!(field(c), "addrs");
    let mut c = card(&k, vec![]);
    c.name = "line\nbreak".into();
    assert_eq!(field(c), "name");
}

#[test]
fn card_over_8_kib_is_refused() {
    // Inline schemas are large; a card with many of them does not fit, its compact form does.
    let k = SigningKey::from_keypair(&Keypair::generate_ed25519()).expect("key");
    let big_schema = serde_json::json!({"description": "x".repeat(1000), "type": "object"});
    let skills: Vec<SkillSpec> = (0..10)
        .map(|i| {
            SkillSpec::builder(format!("skill{i}"), "1.0.0")
                .input_schema(big_schema.clone())
                .build()
                .expect("spec")
        })
        .collect();
    let full = card(&k, skills.clone());
    assert!(matches!(
        envelope::seal(&k, &full),
        Err(EnvelopeError::Oversize {
            kind: Some(Kind::Card),
            ..
        })
    ));
    let compact = card(&k, skills.iter().map(SkillSpec::compact).collect());
    let bytes = envelope::seal(&k, &compact).expect("compact card fits");
    assert!(bytes.len() <= Kind::Card.max_envelope());
    // The hash in the compact spec is the hash of the inline schema text.
    let Some(Schema::Sha256(h)) = &compact.skills[0].input else {
        panic!("compact spec has a hash")
    };
    assert_eq!(*h, skills[0].input.as_ref().expect("inline").hash());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn skill_specs_round_trip(
        name in "[a-z0-9][a-z0-9._-]{0,63}",
        major in 0u64..100, minor in 0u64..100, patch in 0u64..100,
        tags in proptest::collection::btree_set("[a-z][a-z0-9-]{0,31}", 0..MAX_TAGS),
        mode in prop_oneof![Just(Mode::Sync), Just(Mode::Async), Just(Mode::Stream)],
        share in prop_oneof![Just(ShareMode::Public), Just(ShareMode::Mesh), Just(ShareMode::Grants), Just(ShareMode::Private)],
        timeout_ms in 1u64..300_000,
        conc in 1u16..=MAX_SKILL_CONCURRENCY,
    ) {
        let mut b = SkillSpec::builder(name, format!("{major}.{minor}.{patch}"))
            .mode(mode).share(share)
            .timeout(Duration::from_millis(timeout_ms))
            .max_concurrency(conc)
            .output_schema(serde_json::json!({"type": "string"}));
        for t in tags {
            b = b.tag(t);
        }
        let s = b.build().expect("valid by construction");
        let back: SkillSpec = from_cbor(&to_cbor(&s), 64 * 1024).expect("decode");
        prop_assert_eq!(back, s);
    }
}

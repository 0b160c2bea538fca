//! Prints sample payloads as hex CBOR, one per line (`name hex`), for anyone writing a
//! compatible client: decode them with any CBOR tool and compare with protocol/README.md.
//!
//! `cargo run -p skillmesh-protocol --example dump_wire`
use serde_bytes::ByteBuf;
use skillmesh_protocol::*;

fn main() {
    let k = SigningKey::from_keypair(&Keypair::generate_ed25519()).expect("key");
    let t = Timestamp(1_800_000_000_000);
    let call = Call {
        call_id: CallId([1; 16]),
        caller: k.peer_id(),
        target: k.peer_id(),
        skill: SkillName::new("translate").expect("n"),
        version_req: "^1".parse().expect("r"),
        args: ByteBuf::from(to_cbor(&"hi")),
        issued_at: t,
        expires_at: Timestamp(t.0 + 1000),
        mode: Mode::Sync,
        grant: None,
    };
    println!("call {}", hex::encode(to_cbor(&call)));
    let spec = SkillSpec::builder("translate", "1.0.0")
        .tag("nlp")
        .input_schema(serde_json::json!({"type":"object"}))
        .build()
        .expect("s");
    println!("spec {}", hex::encode(to_cbor(&spec)));
    let card = AgentCard {
        peer_id: k.peer_id(),
        name: "a".into(),
        skills: vec![spec.compact()],
        addrs: vec!["/ip4/127.0.0.1/tcp/1".parse().expect("a")],
        mailboxes: vec![],
        prekeys: None,
        seq: 1,
        issued_at: t,
        expires_at: Timestamp(t.0 + 1),
    };
    println!("card {}", hex::encode(to_cbor(&card)));
    let res = CallResult {
        call_id: CallId([1; 16]),
        callee: k.peer_id(),
        caller: k.peer_id(),
        status: CallStatus::Failed,
        output: None,
        error: Some(CallError::new(ErrorCode::RateLimited, "slow down")),
        timings: Timings::default(),
    };
    println!("result {}", hex::encode(to_cbor(&res)));
    println!(
        "mreq {}",
        hex::encode(to_cbor(&MailboxRequest::Fetch(Fetch { limit: 5 })))
    );
    println!(
        "mresp {}",
        hex::encode(to_cbor(&MailboxResponse::Acked { removed: 2 }))
    );
}

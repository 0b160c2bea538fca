//! Several real nodes over loopback: discovery, calls and every refusal code, events, restart.

mod common;

use std::time::Duration;

use common::{NodeTestExt, eventually, mesh};
use libp2p::futures::StreamExt;
use serde_bytes::ByteBuf;
use serde_json::{Value, json};
use skillmesh::protocol::envelope;
use skillmesh::protocol::{
    Call, CallId, CallStatus, ErrorCode, Mode, ShareMode, SkillSpec, Timestamp,
};
use skillmesh::store::{CallState, Direction};
use skillmesh::{CallContext, Error, HandlerError, Node};

fn translate_spec() -> SkillSpec {
    SkillSpec::builder("translate", "1.2.0")
        .description("English to French, badly")
        .share(ShareMode::Public)
        .tag("nlp")
        .tag("text")
        .input_schema(json!({
            "type": "object",
            "required": ["text"],
            "properties": {"text": {"type": "string"}}
        }))
        .max_arg_bytes(1024)
        .build()
        .expect("spec")
}

async fn translate(_ctx: CallContext, args: Value) -> Result<Value, HandlerError> {
    let text = args["text"].as_str().ok_or("text must be a string")?;
    Ok(json!({ "text": text.replace("hello", "bonjour") }))
}

async fn good_call(caller: &Node, callee: libp2p::PeerId) {
    let out = caller
        .call(callee, "translate", json!({"text": "hello world"}))
        .await
        .expect("a good call succeeds");
    assert_eq!(out, json!({"text": "bonjour world"}));
}

/// `callee` serves `translate`; `caller` has found it there and made a good call.
async fn serving(caller: &Node, callee: &Node) {
    callee
        .register_skill(translate_spec(), translate)
        .await
        .expect("register");
    caller.find_served_by("translate", callee.peer_id()).await;
    good_call(caller, callee.peer_id()).await;
}

fn remote_code(r: Result<Value, Error>) -> ErrorCode {
    match r {
        Err(Error::Remote(e)) => e.code,
        other => panic!("expected a refusal from the callee, got {other:?}"),
    }
}

#[tokio::test]
async fn skills_are_found_by_name_and_tag_and_called() {
    let nodes = mesh(2, |_| {}).await;
    let (b, c) = (&nodes[1], &nodes[2]);
    let report = c
        .register_skill(translate_spec(), translate)
        .await
        .expect("register");
    assert_eq!(report.keys, 3, "name and two tags");
    // Each key's record was written to the closest peers found (both others), and the card
    // stored: an announcement that reached too few is reported so, and goes out again.
    assert!(report.complete(), "{report:?}");

    let found = b.find_served_by("translate", c.peer_id()).await;
    assert_eq!(found.skills[0].version.to_string(), "1.2.0");
    assert_eq!(found.card.peer_id, c.peer_id());

    let by_tag = eventually(Duration::from_secs(10), || b.find_tag("nlp")).await;
    assert!(by_tag.iter().any(|f| f.peer == c.peer_id()));
    assert!(matches!(
        b.find_tag("no-such-tag").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        b.find_skill("no-such-skill").await,
        Err(Error::NotFound(_))
    ));

    good_call(b, c.peer_id()).await;
    // A node calling its own skill (found by discovery) is served locally, signed and checked.
    good_call(c, c.peer_id()).await;
    assert_eq!(
        remote_code(b.call(c.peer_id(), "no-such-skill", json!({})).await),
        ErrorCode::UnknownSkill
    );
    good_call(b, c.peer_id()).await;

    // Both sides log the calls: the callee its three, the caller its three.
    let expect_log = |node: &Node, direction| {
        let node = node.clone();
        async move {
            let log = node.recent_calls(10).await.map_err(|e| e.to_string())?;
            let mine: Vec<_> = log
                .into_iter()
                .filter(|e| e.direction == direction)
                .collect();
            if mine.len() < 3 {
                return Err(format!("{} entries", mine.len()));
            }
            Ok(mine)
        }
    };
    let served = eventually(Duration::from_secs(5), || expect_log(c, Direction::Inbound)).await;
    assert_eq!(served[0].state, CallState::Completed, "newest first");
    assert_eq!(served[1].state, CallState::Rejected);
    assert_eq!(served[1].error, Some(ErrorCode::UnknownSkill));
    assert_eq!(served[1].peer, b.peer_id());
    let made = eventually(Duration::from_secs(5), || {
        expect_log(b, Direction::Outbound)
    })
    .await;
    assert_eq!(made[0].skill.as_str(), "translate");
    assert_eq!(made[0].peer, c.peer_id());

    // Withdrawn skills are refused at once, and no longer advertised in the card.
    assert!(c.unregister_skill("translate").await.expect("unregister"));
    assert_eq!(
        remote_code(b.call(c.peer_id(), "translate", json!({"text": "x"})).await),
        ErrorCode::UnknownSkill
    );
}

/// A call from `b`'s key, signed by the test, to reach the callee's checks directly.
fn signed_call(
    b: &common::TestNode,
    target: libp2p::PeerId,
    args: Value,
    issued_at: Timestamp,
    window: Duration,
) -> (Call, Vec<u8>) {
    let call = Call {
        call_id: CallId(rand_id()),
        caller: b.peer_id(),
        target,
        skill: "translate".parse().expect("name"),
        version_req: "^1".parse().expect("req"),
        args: ByteBuf::from(skillmesh::protocol::to_cbor(&args)),
        issued_at,
        expires_at: issued_at.saturating_add(window),
        mode: Mode::Sync,
        grant: None,
    };
    let bytes = envelope::seal(b.identity.signing_key(), &call).expect("seal");
    (call, bytes)
}

fn rand_id() -> [u8; 16] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&N.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    id[8..].copy_from_slice(&Timestamp::now().as_millis().to_be_bytes());
    id
}

async fn raw_code(b: &common::TestNode, c: libp2p::PeerId, bytes: Vec<u8>) -> ErrorCode {
    let r = b.call_raw(c, bytes).await.expect("a signed answer");
    assert_eq!(r.status, CallStatus::Failed, "{r:?}");
    r.error.expect("an error").code
}

#[tokio::test]
async fn every_refusal_has_its_code_and_the_node_keeps_serving() {
    let nodes = mesh(2, |c| {
        c.calls.rate_per_peer = 10;
        c.calls.burst_per_peer = 20;
    })
    .await;
    let (b, c) = (&nodes[1], &nodes[2]);
    serving(b, c).await;
    let now = Timestamp::now;
    let minute = Duration::from_secs(60);

    // Bad signature: one bit of the signature flipped.
    let (_, mut bytes) = signed_call(b, c.peer_id(), json!({"text": "hi"}), now(), minute);
    bytes[40] ^= 1;
    assert_eq!(
        raw_code(b, c.peer_id(), bytes).await,
        ErrorCode::BadSignature
    );
    good_call(b, c.peer_id()).await;

    // Replay: the same signed call twice.
    let (_, bytes) = signed_call(b, c.peer_id(), json!({"text": "hi"}), now(), minute);
    let first = b.call_raw(c.peer_id(), bytes.clone()).await.expect("first");
    assert_eq!(first.status, CallStatus::Completed);
    assert_eq!(raw_code(b, c.peer_id(), bytes).await, ErrorCode::Replayed);
    good_call(b, c.peer_id()).await;

    // Expired: signed ten minutes ago for four minutes.
    let old = now().saturating_sub(Duration::from_secs(600));
    let (_, bytes) = signed_call(
        b,
        c.peer_id(),
        json!({"text": "hi"}),
        old,
        Duration::from_secs(240),
    );
    assert_eq!(raw_code(b, c.peer_id(), bytes).await, ErrorCode::Expired);
    good_call(b, c.peer_id()).await;

    // Not yet valid: dated five minutes ahead.
    let future = now().saturating_add(Duration::from_secs(300));
    let (_, bytes) = signed_call(b, c.peer_id(), json!({"text": "hi"}), future, minute);
    assert_eq!(
        raw_code(b, c.peer_id(), bytes).await,
        ErrorCode::NotYetValid
    );

    // Validly signed, but by another node's key than the connection's peer (b).
    let a = &nodes[0];
    let mut forged = signed_call(b, c.peer_id(), json!({"text": "hi"}), now(), minute).0;
    forged.caller = a.peer_id();
    let bytes = envelope::seal(a.identity.signing_key(), &forged).expect("seal");
    assert_eq!(
        raw_code(b, c.peer_id(), bytes).await,
        ErrorCode::SignerMismatch
    );
    good_call(b, c.peer_id()).await;

    // Addressed to someone else.
    let (_, bytes) = signed_call(b, nodes[0].peer_id(), json!({"text": "hi"}), now(), minute);
    assert_eq!(
        raw_code(b, c.peer_id(), bytes).await,
        ErrorCode::WrongTarget
    );

    // Arguments over the skill's 1 KiB limit.
    let big = json!({"text": "x".repeat(2000)});
    assert_eq!(
        remote_code(b.call(c.peer_id(), "translate", big).await),
        ErrorCode::ArgsTooLarge
    );
    good_call(b, c.peer_id()).await;

    // Arguments that fail the schema.
    assert_eq!(
        remote_code(b.call(c.peer_id(), "translate", json!({"txt": 1})).await),
        ErrorCode::InvalidArgs
    );
    good_call(b, c.peer_id()).await;

    // A version the callee does not have.
    let opts = skillmesh::CallOptions {
        version_req: "^2".parse().expect("req"),
        ..Default::default()
    };
    assert_eq!(
        remote_code(
            b.call_with(c.peer_id(), "translate", json!({"text": "hi"}), opts)
                .await
        ),
        ErrorCode::VersionMismatch
    );

    // A flood past the rate limit: 60 calls at once against a burst of 20.
    let flood = (0..60).map(|_| b.call(c.peer_id(), "translate", json!({"text": "hi"})));
    let results = libp2p::futures::future::join_all(flood).await;
    let limited = results
        .iter()
        .filter(|r| matches!(r, Err(Error::Remote(e)) if e.code == ErrorCode::RateLimited))
        .count();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert!(limited > 0, "no call was rate limited");
    assert_eq!(
        limited + ok,
        60,
        "only successes and rate_limited: {results:?}"
    );
    // The bucket refills: good calls are served again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    good_call(b, c.peer_id()).await;
}

#[tokio::test]
async fn events_reach_every_subscriber_and_presence_lists_skills() {
    let nodes = mesh(2, |_| {}).await;
    nodes[2]
        .register_skill(translate_spec(), translate)
        .await
        .expect("register");
    let mut subs = Vec::new();
    for n in &nodes {
        subs.push(n.subscribe("news").await.expect("subscribe"));
    }
    // An event reaches the subscribers its publisher knows of: wait until node 0 knows both
    // (each tells its subscriptions a moment after connecting).
    eventually(Duration::from_secs(10), || async {
        let known = nodes[0]
            .subscribers("news")
            .await
            .map_err(|e| e.to_string())?;
        match known.len() {
            2 => Ok(()),
            n => Err(format!("{n} subscribers known")),
        }
    })
    .await;
    nodes[0]
        .publish_json("news", &json!({"n": 1}))
        .await
        .expect("publish");
    for sub in subs.iter_mut().skip(1) {
        let got = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("delivered in time")
            .expect("stream open");
        assert_eq!(got.topic, "news");
        assert_eq!(got.publisher, nodes[0].peer_id());
        assert_eq!(got.json(), Some(json!({"n": 1})));
    }
    // Every node hears a second event from another publisher, exactly once.
    eventually(Duration::from_secs(10), || {
        nodes[1].publish("news", b"two".to_vec())
    })
    .await;
    for (i, sub) in subs.iter_mut().enumerate() {
        if i == 1 {
            continue;
        }
        let got = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("delivered")
            .expect("open");
        assert_eq!(got.data, b"two");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), subs[2].next())
            .await
            .is_err(),
        "no duplicate delivery"
    );

    // Presence: node 1 learns node 2 is online and what it serves.
    let c = nodes[2].peer_id();
    let info = eventually(Duration::from_secs(10), || async {
        let peers = nodes[1].peers().await.map_err(|e| e.to_string())?;
        peers
            .into_iter()
            .find(|p| p.peer == c && !p.skills.is_empty())
            .ok_or_else(|| "not yet".to_owned())
    })
    .await;
    assert_eq!(info.skills[0].name.as_str(), "translate");
}

#[tokio::test]
async fn a_restarted_node_keeps_its_peer_id_and_is_found_again() {
    let mut nodes = mesh(2, |_| {}).await;
    let c = nodes.pop().expect("c");
    let b = &nodes[1];
    c.register_skill(translate_spec(), translate)
        .await
        .expect("register");
    let before = b.find_served_by("translate", c.peer_id()).await;
    good_call(b, c.peer_id()).await;

    let peer_id = c.peer_id();
    let common::TestNode { node, dir, .. } = c;
    node.shutdown().await.expect("shutdown");
    drop(node);

    let boot = nodes[0].listen_addrs().await.expect("addrs");
    let c = common::start_in(common::config(&boot), dir).await;
    assert_eq!(c.peer_id(), peer_id, "same identity from the same data dir");
    // The skill's spec was kept; the handler is code, so the agent registers it again.
    let kept = c.store().skills().await.expect("stored skills");
    assert_eq!(kept, vec![translate_spec()]);
    c.register_skill(kept[0].clone(), translate)
        .await
        .expect("register again");

    let after = eventually(Duration::from_secs(15), || async {
        let f = b.find_served_by("translate", peer_id).await;
        if f.card.seq > before.card.seq {
            Ok(f)
        } else {
            Err("old card")
        }
    })
    .await;
    assert!(after.card.seq > before.card.seq);
    eventually(Duration::from_secs(10), || {
        b.call(peer_id, "translate", json!({"text": "hello"}))
    })
    .await;
}

#[tokio::test]
async fn discovery_and_calls_work_over_quic() {
    let nodes = mesh(2, |c| {
        c.network.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr")];
    })
    .await;
    let boot = nodes[0].listen_addrs().await.expect("addrs");
    assert!(boot.iter().all(|a| a.to_string().contains("quic-v1")));
    let (b, c) = (&nodes[1], &nodes[2]);
    serving(b, c).await;
}

#[tokio::test]
async fn connections_are_trimmed_back_to_the_watermarks() {
    let small = |c: &mut skillmesh::config::Config| {
        c.network.min_connections = 2;
        c.network.max_connections = 3;
        c.network.trim_grace = Duration::ZERO;
        c.gossip.mesh_n_low = 1;
        c.gossip.mesh_n = 2;
        c.gossip.mesh_n_high = 3;
    };
    let nodes = mesh(7, small).await;
    let hub = &nodes[0];
    let connected = || async {
        let peers = hub.peers().await.expect("peers");
        peers.iter().filter(|p| p.connected).count()
    };
    // All seven spokes dialled the hub; the hard cap (twice high, at least high + 8) let them in.
    let peak = eventually(Duration::from_secs(5), || async {
        let n = connected().await;
        if n > 3 { Ok(n) } else { Err(n) }
    })
    .await;
    assert!(peak > 3);
    eventually(Duration::from_secs(10), || async {
        let n = connected().await;
        if n <= 3 { Ok(()) } else { Err(n) }
    })
    .await;
}

/// A node whose inbound cap is max(2 x 1, 1 + 8) = 9 established connections, one per peer,
/// and nine others connected to it: young connections, which trimming spares. Returns the hub
/// and its spokes. `setup` adjusts the hub's config.
async fn hub_at_its_cap(
    setup: impl FnOnce(&mut skillmesh::config::Config),
) -> (common::TestNode, Vec<common::TestNode>) {
    let mut small = common::config(&[]);
    setup(&mut small);
    small.network.min_connections = 1;
    small.network.max_connections = 1;
    small.network.max_per_peer = 1;
    small.gossip.mesh_n_low = 1;
    small.gossip.mesh_n = 2;
    small.gossip.mesh_n_high = 3;
    let hub = common::start(small).await;
    let boot = hub.listen_addrs().await.expect("addrs");
    let mut spokes = Vec::new();
    for _ in 0..9 {
        spokes.push(common::start(common::config(&boot)).await);
    }
    eventually(Duration::from_secs(10), || async {
        let peers = hub.peers().await.expect("peers");
        let n = peers.iter().filter(|p| p.connected).count();
        if n >= 9 { Ok(()) } else { Err(n) }
    })
    .await;
    (hub, spokes)
}

#[tokio::test]
async fn a_node_whose_inbound_room_is_full_still_dials_out() {
    // A DHT client: the spokes do not hand it out, so nobody else dials it and makes it close a
    // spoke for room; only its own dials could.
    let (hub, spokes) = hub_at_its_cap(|c| c.dht.mode = skillmesh::config::KadMode::Client).await;
    // A callee the hub has no connection to: it joins through a spoke.
    let via = spokes[0].listen_addrs().await.expect("addrs");
    let callee = common::start(common::config(&via)).await;
    serving(&hub, &callee).await;
    // Its own dials (the lookup's walk, the call) had room of their own: no spoke was closed
    // to make it. Trimming spares them all for `trim_grace` (30 s).
    let peers = hub.peers().await.expect("peers");
    for spoke in &spokes {
        let id = spoke.peer_id();
        assert!(
            peers.iter().any(|p| p.peer == id && p.connected),
            "spoke {id} was disconnected"
        );
    }
}

#[tokio::test]
async fn a_node_at_its_connection_cap_makes_room_for_a_caller() {
    let (hub, spokes) = hub_at_its_cap(|_| {}).await;
    let via = spokes[0].listen_addrs().await.expect("addrs");
    let caller = common::start(common::config(&via)).await;
    serving(&caller, &hub).await;
}

#[tokio::test]
async fn event_floods_are_cut_at_the_topic_rate() {
    let nodes = mesh(1, |c| c.gossip.max_events_per_sec = 3).await;
    let mut sub = nodes[1].subscribe("flood").await.expect("subscribe");
    let _keep = nodes[0].subscribe("flood").await.expect("subscribe");
    eventually(Duration::from_secs(10), || {
        nodes[0].publish("flood", b"0".to_vec())
    })
    .await;
    for i in 1..30u8 {
        nodes[0].publish("flood", vec![i]).await.expect("publish");
    }
    let mut got = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(700), sub.next()).await {
        got += 1;
    }
    // 30 events within about a second: at most two seconds' budgets of 3 get through.
    assert!((1..=6).contains(&got), "{got} events delivered");
}

#[tokio::test]
async fn a_private_mesh_admits_only_nodes_with_its_key() {
    let key_a = "11".repeat(32);
    let nodes = mesh(1, |c| c.mesh.psk = key_a.clone()).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    serving(b, a).await;

    // Another mesh's node cannot even connect to a member.
    let boot = a.listen_addrs().await.expect("addrs");
    let mut other = common::config(&[]);
    other.mesh.psk = "22".repeat(32);
    let outsider = common::start(other).await;
    outsider.dial(boot[0].clone()).await.expect("dial starts");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let peers = outsider.peers().await.expect("peers");
    assert!(
        peers.iter().all(|p| !p.connected),
        "connected across meshes: {peers:?}"
    );
    // A wrong key garbles the handshake; the outsider's call cannot get through.
    let quick = skillmesh::CallOptions {
        timeout: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let r = outsider
        .call_with(a.peer_id(), "translate", json!({"text": "hi"}), quick)
        .await;
    assert!(
        matches!(r, Err(Error::Unreachable { .. } | Error::Timeout(_))),
        "{r:?}"
    );
}

#[tokio::test]
async fn discovery_and_calls_work_over_the_memory_transport() {
    let nodes = mesh(2, |c| {
        c.network.listen = vec!["/memory/0".parse().expect("addr")];
    })
    .await;
    let boot = nodes[0].listen_addrs().await.expect("addrs");
    assert!(boot.iter().all(|a| a.to_string().starts_with("/memory/")));
    serving(&nodes[1], &nodes[2]).await;
}

/// Calls to one peer share a pipe: they run at once, answer in any order, and the late answer
/// of a call that timed out is never taken for another call's.
#[tokio::test]
async fn calls_to_one_peer_run_at_once_and_answer_out_of_order() {
    let nodes = mesh(1, |_| {}).await;
    let (caller, callee) = (&nodes[1], &nodes[0]);
    let spec = SkillSpec::builder("nap", "1.0.0")
        .share(ShareMode::Public)
        .max_concurrency(64)
        .build()
        .expect("spec");
    callee
        .register_skill(spec, |_ctx: CallContext, args: Value| async move {
            let ms = args["ms"].as_u64().ok_or("ms must be a number")?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, HandlerError>(json!({ "slept": ms, "id": args["id"] }))
        })
        .await
        .expect("register");
    let to = callee.peer_id();
    let nap = |ms: u64, id: u64| caller.call(to, "nap", json!({"ms": ms, "id": id}));

    // A slow call first, then quick ones: the quick ones do not wait behind it.
    let started = std::time::Instant::now();
    let slow = nap(800, 0);
    let quick = libp2p::futures::future::join_all((1..=20).map(|i| nap(10, i)));
    let (slow, quick) = tokio::join!(
        async {
            let r = slow.await;
            (r, started.elapsed())
        },
        async {
            let r = quick.await;
            (r, started.elapsed())
        }
    );
    for (i, r) in quick.0.into_iter().enumerate() {
        let out = r.expect("quick call");
        assert_eq!(
            out["id"],
            json!(i as u64 + 1),
            "each answer goes to its own call"
        );
    }
    assert!(slow.0.expect("slow call")["slept"] == json!(800));
    assert!(
        quick.1 < slow.1,
        "quick calls answered in {:?}, after the slow one ({:?})",
        quick.1,
        slow.1
    );

    // A call that gives up before its answer: the answer comes later and must go nowhere.
    let gave_up = caller
        .call_with(
            to,
            "nap",
            json!({"ms": 300, "id": 99}),
            skillmesh::CallOptions {
                timeout: Some(Duration::from_millis(100)),
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(gave_up, Err(Error::Timeout(_))), "{gave_up:?}");
    for id in 100..105 {
        let out = nap(100, id).await.expect("call after a timeout");
        assert_eq!(out["id"], json!(id));
    }
}

/// An agent answers `/skillmesh/card/1` with its own signed card, the one frame a lookup reads
/// instead of walking the DHT; a request that is not empty gets no card.
#[tokio::test]
async fn an_agent_hands_out_its_own_card() {
    use libp2p::futures::{AsyncReadExt, AsyncWriteExt};
    use libp2p::multiaddr::Protocol;
    use libp2p::swarm::SwarmEvent;
    use skillmesh::protocol::AgentCard;
    use skillmesh::protocol::envelope::Checks;
    use skillmesh::protocol::keys::CARD_PROTOCOL;

    let nodes = mesh(1, |_| {}).await;
    let agent = &nodes[1];
    agent
        .register_skill(translate_spec(), translate)
        .await
        .expect("register");
    let addr = agent.listen_addrs().await.expect("addrs")[0]
        .clone()
        .with(Protocol::P2p(agent.peer_id()));

    // A bare libp2p peer: only streams, no skillmesh code.
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            Default::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build();
    let mut control = swarm.behaviour().new_control();
    swarm.dial(addr).expect("dial");
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(
            swarm.select_next_some().await,
            SwarmEvent::ConnectionEstablished { .. }
        ) {}
    })
    .await
    .expect("connected");
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let protocol = libp2p::StreamProtocol::new(CARD_PROTOCOL);

    let mut stream = control
        .open_stream(agent.peer_id(), protocol.clone())
        .await
        .expect("stream");
    stream.write_all(&0u32.to_be_bytes()).await.expect("ask");
    stream.flush().await.expect("flush");
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.expect("answer length");
    let mut card = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut card).await.expect("answer");
    let opened = envelope::open::<AgentCard>(&card, &Checks::now().signed_by(agent.peer_id()))
        .expect("the agent's own signed card");
    assert_eq!(opened.value.peer_id, agent.peer_id());
    assert!(
        opened
            .value
            .skills
            .iter()
            .any(|s| s.name.as_str() == "translate"),
        "the newest card, with the skill just registered"
    );

    // A request with a body is over the limit (an empty frame): no card comes back.
    let mut stream = control
        .open_stream(agent.peer_id(), protocol)
        .await
        .expect("stream");
    stream.write_all(&1u32.to_be_bytes()).await.expect("ask");
    stream.write_all(&[0]).await.expect("body");
    stream.flush().await.expect("flush");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "no answer to a malformed request");
}

/// Call pipes negotiate lazily: the call goes out with the protocol proposal. A peer that is
/// not a skillmesh node refuses the protocol on the first read, and the call says so at once
/// instead of retrying or waiting for its timeout.
#[tokio::test]
async fn a_call_to_a_peer_without_call_pipes_says_it_serves_none() {
    use libp2p::swarm::SwarmEvent;
    use libp2p::{SwarmBuilder, noise, ping, tcp, yamux};

    // A bare libp2p peer: ping over TCP, nothing else.
    let mut other = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| ping::Behaviour::default())
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build();
    other
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
        .expect("listen");
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = other.select_next_some().await {
            break address;
        }
    };
    let peer = *other.local_peer_id();
    let served = tokio::spawn(async move {
        loop {
            other.select_next_some().await;
        }
    });

    let node = common::start(common::config(&[])).await;
    node.dial(addr.with(libp2p::multiaddr::Protocol::P2p(peer)))
        .await
        .expect("dial");
    let started = std::time::Instant::now();
    let r = node.call(peer, "translate", json!({"text": "hi"})).await;
    match r {
        Err(Error::Unreachable { reason, .. }) => assert!(
            reason.contains("does not serve skill calls"),
            "reason: {reason}"
        ),
        other => panic!("expected 'does not serve skill calls', got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the refusal took {:?}",
        started.elapsed()
    );
    served.abort();
}

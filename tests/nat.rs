//! Relays on loopback: a node that cannot be dialed (it listens nowhere) reserves a slot on a
//! relay, is found through the DHT at its circuit address, and serves calls and mail through
//! the relay.

mod common;

use std::time::Duration;

use common::{NodeTestExt, config, eventually, relay_config, start};
use futures::StreamExt;
use serde_json::json;
use skillmesh::config::Reachability;
use skillmesh::{Delivery, Reach};

async fn echo(
    _ctx: skillmesh::CallContext,
    args: serde_json::Value,
) -> Result<serde_json::Value, skillmesh::HandlerError> {
    Ok(args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undialable_node_is_reached_through_its_relay() {
    let relay = start(relay_config()).await;
    let relay_addrs = relay.listen_addrs().await.expect("addrs");

    // Listens nowhere: only the relay's circuit can bring connections in.
    let mut hc = config(&relay_addrs);
    hc.network.listen = Vec::new();
    hc.nat.reachability = Reachability::Private;
    hc.nat.relays = relay_addrs.clone();
    hc.mail.mailboxes = relay_addrs.clone();
    let hidden = start(hc).await;
    hidden
        .register_skill(
            skillmesh_protocol::SkillSpec::builder("echo", "1.0.0")
                .build()
                .expect("spec"),
            echo,
        )
        .await
        .expect("register");
    hidden
        .register_skill(
            skillmesh_protocol::SkillSpec::builder("later", "1.0.0")
                .mode(skillmesh_protocol::Mode::Async)
                .build()
                .expect("spec"),
            echo,
        )
        .await
        .expect("register");
    hidden
        .register_stream(
            skillmesh_protocol::SkillSpec::builder("count", "1.0.0")
                .mode(skillmesh_protocol::Mode::Stream)
                .build()
                .expect("spec"),
            |_ctx: skillmesh::CallContext, _args: serde_json::Value| {
                futures::stream::iter(
                    (0..50).map(|i| {
                        Ok::<_, skillmesh::HandlerError>(skillmesh::Chunk::Json(json!(i)))
                    }),
                )
            },
        )
        .await
        .expect("register");
    let status = eventually(Duration::from_secs(10), || async {
        let s = hidden.nat_status().await.map_err(|e| e.to_string())?;
        if s.reservations
            .iter()
            .any(|(r, a)| *r == relay.peer_id() && !a.is_empty())
        {
            Ok(s)
        } else {
            Err(format!("no reservation yet: {s:?}"))
        }
    })
    .await;
    assert_eq!(status.reachability, Reach::Private);

    let caller = start(config(&relay_addrs)).await;
    let found = caller.find_served_by("echo", hidden.peer_id()).await;
    assert!(
        found
            .card
            .addrs
            .iter()
            .any(|a| a.to_string().contains("p2p-circuit")),
        "card without a circuit address: {:?}",
        found.card.addrs
    );
    let out = caller
        .call(hidden.peer_id(), "echo", json!({"via": "relay"}))
        .await
        .expect("call through the relay");
    assert_eq!(out, json!({"via": "relay"}));
    let s = caller.nat_status().await.expect("status");
    assert!(
        s.connections
            .iter()
            .any(|c| c.peer == hidden.peer_id() && c.relayed),
        "{s:?}"
    );

    // A stream and an async call through the circuit.
    let chunks: Vec<_> = caller
        .call_stream(hidden.peer_id(), "count", json!({}))
        .await
        .expect("stream through the relay")
        .map(|c| match c.expect("chunk") {
            skillmesh::Chunk::Json(v) => v,
            other => panic!("{other:?}"),
        })
        .collect()
        .await;
    assert_eq!(chunks, (0..50).map(|i| json!(i)).collect::<Vec<_>>());
    let id = caller
        .call_async(
            hidden.peer_id(),
            "later",
            json!({"via": "relay"}),
            Default::default(),
        )
        .await
        .expect("accepted through the relay");
    let out = caller
        .wait_call(id, Duration::from_secs(15))
        .await
        .expect("async result");
    assert_eq!(out, json!({"via": "relay"}));

    // Mail through the relay circuit too, directly to the recipient.
    let report = caller
        .send(hidden.peer_id(), b"through the circuit")
        .await
        .expect("sent");
    assert_eq!(report.delivery, Delivery::Direct);
    let m = tokio::time::timeout(Duration::from_secs(10), hidden.inbox().next())
        .await
        .expect("in time")
        .expect("open")
        .expect("message");
    assert_eq!(m.data.as_ref(), b"through the circuit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_and_mailboxes_are_found_in_the_dht_when_none_is_configured() {
    let relay = start(relay_config()).await;
    let relay_addrs = relay.listen_addrs().await.expect("addrs");

    // Nothing configured but a bootstrap peer: relay and mailbox come from the DHT.
    let mut hc = config(&relay_addrs);
    hc.network.listen = Vec::new();
    hc.nat.reachability = Reachability::Private;
    let hidden = start(hc).await;
    eventually(Duration::from_secs(15), || async {
        let s = hidden.nat_status().await.map_err(|e| e.to_string())?;
        if s.reservations.iter().any(|(r, _)| *r == relay.peer_id()) {
            Ok(())
        } else {
            Err(format!("no reservation yet: {s:?}"))
        }
    })
    .await;
    hidden.fetch_mail().await;
    assert_eq!(hidden.mailboxes(), vec![relay.peer_id()]);
}

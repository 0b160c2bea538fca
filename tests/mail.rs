//! Store-and-forward mail between real nodes on loopback: an offline recipient, a mailbox relay
//! restarted on its data dir, end-to-end encryption, quotas and expiry.

mod common;

use std::time::Duration;

use common::{config, relay_config, start, start_in};
use futures::StreamExt;
use libp2p::Multiaddr;
use skillmesh::config::Config;
use skillmesh::{Delivery, Error, Node};
use skillmesh_protocol::Timestamp;

/// Messages the relay holds for `peer`.
async fn held(relay: &Node, peer: libp2p::PeerId) -> u64 {
    relay.store().mail_usage(peer).await.expect("usage").0
}

/// Waits until the relay has deleted all of `peer`'s mail (after the acks).
async fn drained(relay: &Node, peer: libp2p::PeerId) {
    common::eventually(Duration::from_secs(5), || async {
        match relay.store().mail_usage(peer).await {
            Ok((0, 0)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

fn agent_config(relay: &[Multiaddr]) -> Config {
    let mut c = config(relay);
    c.mail.mailboxes = relay.to_vec();
    c.mail.direct_timeout = Duration::from_millis(700);
    c.mail.fetch_interval = Duration::from_secs(1);
    c
}

/// Waits until `node`'s card (with prekeys and mailboxes) is visible to `from`.
async fn card_visible(from: &Node, node: &Node) {
    let peer = node.peer_id();
    common::eventually(Duration::from_secs(10), || async {
        let card = from.card(peer).await.map_err(|e| e.to_string())?;
        match card {
            Some(c) if c.prekeys.is_some() && !c.mailboxes.is_empty() => Ok(()),
            _ => Err("card without prekeys or mailboxes".to_owned()),
        }
    })
    .await;
}

async fn next(inbox: &mut skillmesh::Inbox) -> skillmesh::Message {
    tokio::time::timeout(Duration::from_secs(10), inbox.next())
        .await
        .expect("a message within 10 s")
        .expect("inbox open")
        .expect("message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_gets_every_message_once_in_order_across_a_relay_restart() {
    let relay_dir = tempfile::tempdir().expect("dir");
    let relay_path = relay_dir.path().to_owned();
    let relay = start_in(relay_config(), relay_dir).await;
    let relay_addrs = relay.listen_addrs().await.expect("addrs");

    let sender = start(agent_config(&relay_addrs)).await;
    let recipient_dir = tempfile::tempdir().expect("dir");
    let recipient_path = recipient_dir.path().to_owned();
    let recipient = start_in(agent_config(&relay_addrs), recipient_dir).await;
    recipient.fetch_mail().await; // chooses its mailbox and republishes its card
    card_visible(&sender, &recipient).await;
    let recipient_id = recipient.peer_id();
    // Keep the data dir: the recipient comes back later with the same identity.
    let recipient_dir = recipient.stop().await;
    assert!(recipient_path.exists());

    let texts: Vec<String> = (1..=5)
        .map(|i| format!("plaintext-marker-{i}-zq"))
        .collect();
    for t in &texts {
        let report = sender
            .send(recipient_id, t.as_bytes())
            .await
            .expect("deposited");
        match report.delivery {
            Delivery::Deposited(held) => assert_eq!(held, vec![relay.peer_id()]),
            other => panic!("recipient is offline, yet {other:?}"),
        }
    }
    assert_eq!(held(&relay, recipient_id).await, 5);

    // The relay holds ciphertext only.
    let relay_file = std::fs::read(relay_path.join(skillmesh::store::STORE_FILE)).expect("read");
    for t in &texts {
        assert!(
            !relay_file.windows(t.len()).any(|w| w == t.as_bytes()),
            "plaintext {t} found in the relay's store"
        );
    }

    // The relay restarts on the same data dir (new port), the mail survives.
    let relay_dir = relay.stop().await;
    let relay = start_in(relay_config(), relay_dir).await;
    let relay_addrs = relay.listen_addrs().await.expect("addrs");
    assert_eq!(held(&relay, recipient_id).await, 5);

    // The recipient comes back and fetches on connect.
    let recipient = start_in(agent_config(&relay_addrs), recipient_dir).await;
    assert_eq!(recipient.peer_id(), recipient_id);
    let mut inbox = recipient.inbox();
    for (i, t) in texts.iter().enumerate() {
        let m = next(&mut inbox).await;
        assert_eq!(m.from, sender.peer_id());
        assert_eq!(m.seq, i as u64 + 1);
        assert_eq!(m.data.as_ref(), t.as_bytes());
    }
    // Exactly once: fetching again brings nothing, and the relay has deleted the acked mail.
    assert_eq!(recipient.fetch_mail().await, 0);
    assert!(recipient.try_next_message().await.expect("inbox").is_none());
    drained(&relay, recipient_id).await;

    // Now that the recipient is online, mail goes directly, and the ratchet goes on.
    sender
        .dial(recipient.listen_addrs().await.expect("addrs")[0].clone())
        .await
        .expect("dial");
    let report = sender
        .send(recipient_id, b"direct one")
        .await
        .expect("sent");
    assert_eq!(report.delivery, Delivery::Direct);
    assert_eq!(report.seq, 6);
    assert_eq!(next(&mut inbox).await.data.as_ref(), b"direct one");

    // And the reply opens the other direction.
    let back = recipient
        .send(sender.peer_id(), b"reply")
        .await
        .expect("reply");
    assert_eq!(back.delivery, Delivery::Direct);
    let m = next(&mut sender.inbox()).await;
    assert_eq!(
        (m.from, m.data.as_ref()),
        (recipient_id, b"reply".as_slice())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_is_an_error_to_the_sender_and_mail_expires() {
    let relay = start({
        let mut c = relay_config();
        c.store.mail_per_recipient = 2;
        c
    })
    .await;
    let relay_addrs = relay.listen_addrs().await.expect("addrs");
    let sender = start(agent_config(&relay_addrs)).await;
    let recipient = start(agent_config(&relay_addrs)).await;
    recipient.fetch_mail().await;
    card_visible(&sender, &recipient).await;
    let recipient_id = recipient.peer_id();
    recipient.shutdown().await.expect("shutdown");

    for i in 0..2 {
        let r = sender.send(recipient_id, format!("m{i}").as_bytes()).await;
        assert!(
            matches!(r, Ok(ref r) if matches!(r.delivery, Delivery::Deposited(_))),
            "{r:?}"
        );
    }
    match sender.send(recipient_id, b"one too many").await {
        Err(Error::Undelivered { reason, .. }) => {
            assert!(reason.contains("RecipientFull"), "{reason}");
        }
        other => panic!("expected a full mailbox, got {other:?}"),
    }

    // Expiry: the sender asked for 72 h (the default); after that the relay neither serves nor
    // keeps the mail.
    let store = relay.store();
    let later = Timestamp::now().saturating_add(Duration::from_secs(73 * 3600));
    let (held, _) = store
        .fetch_mail(recipient_id, 10, later)
        .await
        .expect("fetch");
    assert!(held.is_empty());
    assert_eq!(store.purge_expired_mail(later).await.expect("purge"), 2);
    assert_eq!(store.mail_usage(recipient_id).await.expect("usage"), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_mailbox_refuses_to_hold_mail_for_others() {
    // The "relay" here runs no mailbox: deposits for a third party are refused.
    let plain = start(config(&[])).await;
    let plain_addrs = plain.listen_addrs().await.expect("addrs");
    let sender = start(agent_config(&plain_addrs)).await;
    let recipient = start(agent_config(&plain_addrs)).await;
    recipient.fetch_mail().await;
    card_visible(&sender, &recipient).await;
    let recipient_id = recipient.peer_id();
    recipient.shutdown().await.expect("shutdown");
    match sender.send(recipient_id, b"hello").await {
        Err(Error::Undelivered { reason, .. }) => assert!(reason.contains("NoMailbox"), "{reason}"),
        other => panic!("expected NoMailbox, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_goes_to_both_mailboxes_and_arrives_once() {
    let r1 = start(relay_config()).await;
    let r1_addrs = r1.listen_addrs().await.expect("addrs");
    let mut c = relay_config();
    c.network.bootstrap = r1_addrs.clone();
    let r2 = start(c).await;
    let r2_addrs = r2.listen_addrs().await.expect("addrs");
    let both: Vec<Multiaddr> = [r1_addrs[0].clone(), r2_addrs[0].clone()].to_vec();

    let sender = start(agent_config(&r1_addrs)).await;
    let mut rc = agent_config(&r1_addrs);
    rc.mail.mailboxes = both.clone();
    let recipient_dir = tempfile::tempdir().expect("dir");
    let recipient = start_in(rc.clone(), recipient_dir).await;
    recipient.fetch_mail().await;
    assert_eq!(recipient.mailboxes(), vec![r1.peer_id(), r2.peer_id()]);
    card_visible(&sender, &recipient).await;
    let recipient_id = recipient.peer_id();
    let dir = recipient.stop().await;

    for i in 0..3 {
        let r = sender
            .send(recipient_id, format!("x{i}").as_bytes())
            .await
            .expect("sent");
        assert_eq!(
            r.delivery,
            Delivery::Deposited(vec![r1.peer_id(), r2.peer_id()])
        );
    }
    let recipient = start_in(rc, dir).await;
    let mut inbox = recipient.inbox();
    for i in 0..3 {
        assert_eq!(
            next(&mut inbox).await.data.as_ref(),
            format!("x{i}").as_bytes()
        );
    }
    recipient.fetch_mail().await;
    assert!(recipient.try_next_message().await.expect("inbox").is_none());
    for r in [&r1, &r2] {
        drained(r, recipient_id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_sending_to_each_other_at_once_both_deliver_directly() {
    let relay = start(relay_config()).await;
    let relay_addrs = relay.listen_addrs().await.expect("addrs");
    let a = start(agent_config(&relay_addrs)).await;
    let b = start(agent_config(&relay_addrs)).await;
    for n in [&a, &b] {
        n.fetch_mail().await;
    }
    card_visible(&a, &b).await;
    card_visible(&b, &a).await;
    let burst = |from: &Node, to: libp2p::PeerId| {
        let from = from.clone();
        async move {
            let mut out = Vec::new();
            for i in 0..5 {
                out.push(
                    from.send(to, format!("{i}").as_bytes())
                        .await
                        .expect("sent"),
                );
            }
            out
        }
    };
    let (ra, rb) = tokio::join!(burst(&a, b.peer_id()), burst(&b, a.peer_id()));
    for r in ra.iter().chain(rb.iter()) {
        assert_eq!(r.delivery, Delivery::Direct, "{r:?}");
    }
    for (node, from) in [(&a, b.peer_id()), (&b, a.peer_id())] {
        let mut inbox = node.inbox();
        for i in 0..5 {
            let m = next(&mut inbox).await;
            assert_eq!((m.from, m.data.as_ref()), (from, format!("{i}").as_bytes()));
        }
    }
}

/// Many sends at once to an offline peer share its sessions; none may leave the recipient
/// a message it cannot open (a spent one-time key lost up to 2 % of such mail once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_to_an_offline_recipient_all_arrive_once_in_order() {
    const N: u64 = 300;
    let relay = start(relay_config()).await;
    let relay_addrs = relay.listen_addrs().await.expect("addrs");
    let sender = start(agent_config(&relay_addrs)).await;
    let recipient = start(agent_config(&relay_addrs)).await;
    recipient.fetch_mail().await;
    card_visible(&sender, &recipient).await;
    let recipient_id = recipient.peer_id();
    let recipient_dir = recipient.stop().await;

    let node = sender.node.clone();
    let sends = (0..N).map(|i| {
        let node = node.clone();
        async move { node.send(recipient_id, format!("m{i}").as_bytes()).await }
    });
    let reports = futures::future::join_all(sends).await;
    let mut seqs = Vec::new();
    for r in reports {
        let r = r.expect("deposited");
        assert!(
            matches!(r.delivery, Delivery::Deposited(_)),
            "recipient is offline, yet {:?}",
            r.delivery
        );
        seqs.push(r.seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
    assert_eq!(held(&relay, recipient_id).await, N);

    let recipient = start_in(agent_config(&relay_addrs), recipient_dir).await;
    let mut inbox = recipient.inbox();
    for seq in 1..=N {
        let m = next(&mut inbox).await;
        assert_eq!((m.from, m.seq), (sender.peer_id(), seq));
    }
    assert_eq!(recipient.fetch_mail().await, 0);
    assert!(recipient.try_next_message().await.expect("inbox").is_none());
    drained(&relay, recipient_id).await;
}

//! The redb store: durability across reopen, schema versioning, and every table's bound.

use std::time::Duration;

use libp2p::PeerId;
use serde_bytes::ByteBuf;
use skillmesh::store::*;
use skillmesh_protocol::{CallId, ErrorCode, MessageId, SkillName, SkillSpec, Timestamp};

const T0: Timestamp = Timestamp(1_800_000_000_000);

async fn open(dir: &tempfile::TempDir, limits: StoreLimits) -> Store {
    Store::open(&dir.path().join(STORE_FILE), limits)
        .await
        .expect("open store")
}

fn mail(sender: PeerId, recipient: PeerId, n: u8, size: usize) -> MailRecord {
    let mut body = vec![n; size];
    body[0] = n;
    MailRecord {
        id: MessageId::of(&[&[n], sender.to_bytes().as_slice()].concat()),
        sender,
        recipient,
        deposited_at: T0,
        expires_at: T0.saturating_add(Duration::from_secs(3600)),
        envelope: ByteBuf::from(body),
    }
}

#[tokio::test]
async fn data_survives_reopen_and_schema_is_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, StoreLimits::default()).await;
    assert_eq!(store.schema_version().await.expect("v"), SCHEMA_VERSION);
    let spec = SkillSpec::builder("translate", "1.0.0")
        .build()
        .expect("spec");
    store.put_skill(spec.clone()).await.expect("skill");
    let (a, b) = (PeerId::random(), PeerId::random());
    store
        .deposit_mail(vec![mail(a, b, 1, 100)])
        .await
        .expect("deposit");
    drop(store);

    let store = open(&dir, StoreLimits::default()).await;
    assert_eq!(store.skills().await.expect("skills"), vec![spec]);
    let (got, more) = store.fetch_mail(b, 10, T0).await.expect("fetch");
    assert_eq!(got.len(), 1);
    assert!(!more);
}

#[tokio::test]
async fn a_second_open_of_the_same_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = open(&dir, StoreLimits::default()).await;
    let err = Store::open(&dir.path().join(STORE_FILE), StoreLimits::default())
        .await
        .expect_err("locked");
    assert!(err.to_string().contains("another skillmesh node"), "{err}");
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(STORE_FILE);
    drop(open(&dir, StoreLimits::default()).await);
    {
        let db = redb::Database::open(&path).expect("db");
        let tx = db.begin_write().expect("tx");
        {
            let def: redb::TableDefinition<'_, &str, u64> = redb::TableDefinition::new("meta");
            let mut t = tx.open_table(def).expect("meta");
            t.insert("schema_version", SCHEMA_VERSION + 1)
                .expect("insert");
        }
        tx.commit().expect("commit");
    }
    let err = Store::open(&path, StoreLimits::default())
        .await
        .expect_err("newer");
    assert!(matches!(err, StoreError::NewerSchema { .. }), "{err}");
}

#[tokio::test]
async fn cards_keep_seq_monotonic_expire_and_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = StoreLimits {
        max_cards: 2,
        ..Default::default()
    };
    let store = open(&dir, limits).await;
    let card = |seq, expires_ms| StoredCard {
        seq,
        expires_at: Timestamp(T0.0 + expires_ms),
        envelope: ByteBuf::from(vec![seq as u8; 10]),
    };
    let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
    store.put_card(a, card(2, 1000), T0).await.expect("a2");
    assert!(matches!(
        store.put_card(a, card(2, 5000), T0).await,
        Err(StoreError::StaleCard { have: 2, got: 2 })
    ));
    assert!(matches!(
        store.put_card(a, card(1, 5000), T0).await,
        Err(StoreError::StaleCard { .. })
    ));
    store.put_card(a, card(3, 1000), T0).await.expect("a3");
    assert_eq!(
        store.card(a, T0).await.expect("get").map(|c| c.seq),
        Some(3)
    );
    // Expired cards are not returned.
    assert!(
        store
            .card(a, Timestamp(T0.0 + 1001))
            .await
            .expect("get")
            .is_none()
    );

    store.put_card(b, card(1, 9000), T0).await.expect("b");
    // Full: the card that expires soonest (a) makes room for c.
    store.put_card(c, card(1, 8000), T0).await.expect("c");
    assert!(store.card(a, T0).await.expect("get").is_none());
    assert!(store.card(b, T0).await.expect("get").is_some());
    // Expired, c is not handed out, and makes room for the next card.
    assert!(
        store
            .card(c, Timestamp(T0.0 + 8500))
            .await
            .expect("get")
            .is_none()
    );
    store
        .put_card(a, card(2, 9500), Timestamp(T0.0 + 8500))
        .await
        .expect("a again");
    assert!(store.card(c, T0).await.expect("get").is_none());
    assert!(store.card(b, T0).await.expect("get").is_some());
}

#[tokio::test]
async fn skills_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = StoreLimits {
        max_skills: 2,
        ..Default::default()
    };
    let store = open(&dir, limits).await;
    for name in ["a", "b"] {
        store
            .put_skill(SkillSpec::builder(name, "1.0.0").build().expect("spec"))
            .await
            .expect("put");
    }
    // Replacing an existing skill is fine at the limit; a third is not.
    store
        .put_skill(SkillSpec::builder("a", "1.1.0").build().expect("spec"))
        .await
        .expect("replace");
    assert!(matches!(
        store
            .put_skill(SkillSpec::builder("c", "1.0.0").build().expect("spec"))
            .await,
        Err(StoreError::Full {
            table: "skills",
            ..
        })
    ));
    assert!(
        store
            .remove_skill(SkillName::new("a").expect("n"))
            .await
            .expect("remove")
    );
    assert!(
        !store
            .remove_skill(SkillName::new("a").expect("n"))
            .await
            .expect("remove")
    );
    assert_eq!(store.skills().await.expect("list").len(), 1);
}

#[tokio::test]
async fn mail_is_fetched_in_order_acked_by_its_recipient_only_and_deduped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, StoreLimits::default()).await;
    let (s, r, other) = (PeerId::random(), PeerId::random(), PeerId::random());
    let msgs: Vec<MailRecord> = (1..=5).map(|n| mail(s, r, n, 50)).collect();
    let res = store.deposit_mail(msgs.clone()).await.expect("deposit");
    assert!(res.iter().all(|r| *r == Ok(Deposited::Stored)));
    // The same message again is a no-op.
    let res = store
        .deposit_mail(vec![msgs[0].clone()])
        .await
        .expect("again");
    assert_eq!(res, vec![Ok(Deposited::Duplicate)]);

    let (first, more) = store.fetch_mail(r, 3, T0).await.expect("fetch");
    assert!(more);
    assert_eq!(
        first.iter().map(|m| m.id).collect::<Vec<_>>(),
        msgs[..3].iter().map(|m| m.id).collect::<Vec<_>>()
    );
    assert!(
        store
            .fetch_mail(other, 10, T0)
            .await
            .expect("fetch")
            .0
            .is_empty()
    );

    // Another peer cannot delete r's mail by naming its ids.
    let ids: Vec<MessageId> = first.iter().map(|m| m.id).collect();
    assert_eq!(store.ack_mail(other, ids.clone()).await.expect("ack"), 0);
    assert_eq!(store.ack_mail(r, ids).await.expect("ack"), 3);
    let (rest, more) = store.fetch_mail(r, 10, T0).await.expect("fetch");
    assert!(!more);
    assert_eq!(rest.len(), 2);
    assert_eq!(store.mail_usage(r).await.expect("usage"), (2, 100));
}

#[tokio::test]
async fn mail_quotas_each_refuse_with_their_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = StoreLimits {
        mail_per_recipient: 2,
        mail_bytes_per_recipient: 250,
        mail_per_sender: 3,
        mail_bytes_per_sender: 10_000,
        mail_bytes_total: 400,
        ..Default::default()
    };
    let store = open(&dir, limits).await;
    let (s, s2, r1, r2, r3, r4) = (
        PeerId::random(),
        PeerId::random(),
        PeerId::random(),
        PeerId::random(),
        PeerId::random(),
        PeerId::random(),
    );
    let res = store
        .deposit_mail(vec![
            mail(s, r1, 1, 100),
            mail(s, r1, 2, 100),
            mail(s, r1, 3, 10),   // third for r1
            mail(s2, r2, 4, 300), // over r2's bytes
            mail(s, r2, 5, 100),
            mail(s, r3, 6, 10),   // fourth from s
            mail(s2, r4, 7, 150), // over the total (300 held + 150 > 400)
        ])
        .await
        .expect("deposit");
    assert_eq!(
        res,
        vec![
            Ok(Deposited::Stored),
            Ok(Deposited::Stored),
            Err(MailQuota::RecipientCount),
            Err(MailQuota::RecipientBytes),
            Ok(Deposited::Stored),
            Err(MailQuota::SenderCount),
            Err(MailQuota::Total),
        ]
    );
    // A refused deposit loses nothing that was stored.
    assert_eq!(store.fetch_mail(r1, 10, T0).await.expect("f").0.len(), 2);
}

#[tokio::test]
async fn expired_mail_is_hidden_then_purged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, StoreLimits::default()).await;
    let (s, r) = (PeerId::random(), PeerId::random());
    let mut short = mail(s, r, 1, 10);
    short.expires_at = Timestamp(T0.0 + 10);
    let long = mail(s, r, 2, 10);
    store
        .deposit_mail(vec![short, long.clone()])
        .await
        .expect("deposit");
    let later = Timestamp(T0.0 + 11);
    let (got, _) = store.fetch_mail(r, 10, later).await.expect("fetch");
    assert_eq!(got.iter().map(|m| m.id).collect::<Vec<_>>(), vec![long.id]);
    assert_eq!(store.purge_expired_mail(later).await.expect("purge"), 1);
    assert_eq!(store.purge_expired_mail(later).await.expect("purge"), 0);
    assert_eq!(store.mail_usage(r).await.expect("usage"), (1, 10));
}

/// Call `i` (its id all `i`, started `i` ms after T0) as the log holds it.
fn call_entry(peer: PeerId, i: u8, direction: Direction, state: CallState) -> CallLogEntry {
    CallLogEntry {
        call_id: CallId([i; 16]),
        direction,
        peer,
        skill: SkillName::new("translate").expect("n"),
        state,
        error: None,
        started_at: Timestamp(T0.0 + u64::from(i)),
        updated_at: Timestamp(T0.0 + u64::from(i)),
        mode: Default::default(),
        history: Vec::new(),
    }
}

#[tokio::test]
async fn call_log_updates_in_place_and_drops_the_oldest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = StoreLimits {
        max_call_log: 3,
        ..Default::default()
    };
    let store = open(&dir, limits).await;
    let peer = PeerId::random();
    let entry = |i: u8, state| call_entry(peer, i, Direction::Inbound, state);
    store
        .log_calls(vec![entry(1, CallState::Working)], true)
        .await
        .expect("log");
    let mut done = entry(1, CallState::Failed);
    done.error = Some(ErrorCode::Timeout);
    store
        .log_calls(vec![done.clone()], true)
        .await
        .expect("update");
    assert_eq!(store.recent_calls(10).await.expect("recent"), vec![done]);
    for i in 2..=4 {
        store
            .log_calls(vec![entry(i, CallState::Completed)], true)
            .await
            .expect("log");
    }
    let recent = store.recent_calls(10).await.expect("recent");
    assert_eq!(
        recent.iter().map(|e| e.call_id.0[0]).collect::<Vec<_>>(),
        vec![4, 3, 2]
    );
    // The dropped call's index went with it: logging it again starts a new entry.
    store
        .log_calls(vec![entry(1, CallState::Completed)], true)
        .await
        .expect("log");
    assert_eq!(store.recent_calls(10).await.expect("recent").len(), 3);
}

#[tokio::test]
async fn call_log_updates_in_place_after_a_reopen_and_keeps_its_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = StoreLimits {
        max_call_log: 4,
        ..Default::default()
    };
    let peer = PeerId::random();
    let entry = |i: u8, direction, state| call_entry(peer, i, direction, state);
    {
        let store = open(&dir, limits.clone()).await;
        // One batch may start and finish a call; each direction of a call is its own entry.
        store
            .log_calls(
                vec![
                    entry(1, Direction::Outbound, CallState::Working),
                    entry(1, Direction::Inbound, CallState::Working),
                    entry(2, Direction::Outbound, CallState::Working),
                    entry(1, Direction::Outbound, CallState::Completed),
                ],
                true,
            )
            .await
            .expect("log");
        assert_eq!(store.recent_calls(10).await.expect("recent").len(), 3);
    }
    // Reopened, the store still finds its entries: an update replaces, in place.
    let store = open(&dir, limits).await;
    store
        .log_calls(
            vec![entry(2, Direction::Outbound, CallState::Completed)],
            true,
        )
        .await
        .expect("update");
    store
        .log_calls(
            vec![entry(3, Direction::Inbound, CallState::Completed)],
            true,
        )
        .await
        .expect("log");
    let recent = store.recent_calls(10).await.expect("recent");
    assert_eq!(
        recent
            .iter()
            .map(|e| (e.call_id.0[0], e.direction, e.state))
            .collect::<Vec<_>>(),
        vec![
            (3, Direction::Inbound, CallState::Completed),
            (2, Direction::Outbound, CallState::Completed),
            (1, Direction::Inbound, CallState::Working),
            (1, Direction::Outbound, CallState::Completed),
        ]
    );
    // Full: the oldest goes, and its call logged again is a new entry, not an update of it.
    store
        .log_calls(
            vec![entry(4, Direction::Inbound, CallState::Completed)],
            true,
        )
        .await
        .expect("log");
    store
        .log_calls(vec![entry(1, Direction::Outbound, CallState::Failed)], true)
        .await
        .expect("log");
    let recent = store.recent_calls(10).await.expect("recent");
    assert_eq!(
        recent
            .iter()
            .map(|e| (e.call_id.0[0], e.direction))
            .collect::<Vec<_>>(),
        vec![
            (1, Direction::Outbound),
            (4, Direction::Inbound),
            (3, Direction::Inbound),
            (2, Direction::Outbound),
        ]
    );
}

#[tokio::test]
async fn async_results_are_kept_once_bounded_and_redelivered_until_taken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, StoreLimits::default()).await;
    let keep = KeepResults {
        count: 3,
        max_age: Duration::from_secs(3600),
    };
    let peer = PeerId::random();
    let record = |i: u8| AsyncRecord {
        peer,
        stored_at: Timestamp::now(),
        result: ByteBuf::from(vec![i]),
        delivered: false,
    };
    // An open call, taken (once) at the next start.
    let open_call = OpenCall {
        caller: peer,
        skill: SkillName::new("slow").expect("name"),
        accepted_at: Timestamp::now(),
    };
    store
        .open_async(CallId([9; 16]), open_call.clone())
        .await
        .expect("open");
    assert_eq!(
        store.take_open_async().await.expect("take"),
        vec![(CallId([9; 16]), open_call)]
    );
    assert!(store.take_open_async().await.expect("take").is_empty());

    for i in 0..5u8 {
        let fresh = store
            .put_async_result(CallId([i; 16]), Direction::Inbound, record(i), keep)
            .await
            .expect("put");
        assert!(fresh);
    }
    // A second copy of a result is not kept again.
    assert!(
        !store
            .put_async_result(CallId([4; 16]), Direction::Inbound, record(4), keep)
            .await
            .expect("put")
    );
    // At most three, the newest.
    assert!(
        store
            .async_result(CallId([0; 16]), Direction::Inbound)
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        store
            .async_result(CallId([4; 16]), Direction::Inbound)
            .await
            .expect("get")
            .is_some()
    );
    let waiting = store.undelivered_async().await.expect("undelivered");
    assert_eq!(waiting.len(), 3);
    store
        .async_delivered(CallId([3; 16]))
        .await
        .expect("delivered");
    let waiting: Vec<CallId> = store
        .undelivered_async()
        .await
        .expect("undelivered")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(waiting, vec![CallId([2; 16]), CallId([4; 16])]);
}

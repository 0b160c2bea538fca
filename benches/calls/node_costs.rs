//! What a node costs besides calls: mail to an offline agent, start-up, signing and checking
//! envelopes, and an idle daemon's memory.

use super::*;

/// Mail to an offline agent: `n` messages of 1 KiB deposited at a mailbox relay (each
/// encrypted, signed, refused by the absent recipient, committed durably by the relay), then
/// the recipient's return: fetch, verify, decrypt, in order.
pub(super) async fn mailbox(n: usize, rows: &mut Vec<Row>) {
    let relay_dir = tempfile::tempdir().expect("tempdir");
    let mut rc = config(Net::Tcp, vec![]);
    rc.relay.enabled = true;
    rc.relay.mailbox = true;
    let relay = Node::builder(rc)
        .data_dir(relay_dir.path())
        .build()
        .await
        .expect("relay");
    let relay_addrs = relay.listen_addrs().await.expect("addrs");
    let agent = |dir: &std::path::Path| {
        let mut c = config(Net::Tcp, relay_addrs.clone());
        c.mail.mailboxes = relay_addrs.clone();
        c.mail.direct_timeout = Duration::from_millis(500);
        c.mail.max_inbox = n as u64 * 2;
        Node::builder(c).data_dir(dir.to_owned()).build()
    };
    let (sd, rd) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let sender = agent(sd.path()).await.expect("sender");
    let recipient = agent(rd.path()).await.expect("recipient");
    recipient.fetch_mail().await; // picks its mailbox, republishes its card with prekeys
    let to = recipient.peer_id();
    let visible = Instant::now();
    while !sender
        .card(to)
        .await
        .ok()
        .flatten()
        .is_some_and(|c| c.prekeys.is_some() && !c.mailboxes.is_empty())
    {
        assert!(
            visible.elapsed() < Duration::from_secs(10),
            "recipient card not visible"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    recipient.shutdown().await.ok();
    drop(recipient);

    let payload = vec![0x61u8; 1024];
    let t = Instant::now();
    let mut sends: Vec<_> = Vec::new();
    for _ in 0..n {
        let (sender, payload) = (sender.clone(), payload.clone());
        sends.push(tokio::spawn(async move {
            matches!(
                sender.send(to, &payload).await.map(|r| r.delivery),
                Ok(skillmesh::Delivery::Deposited(_))
            )
        }));
    }
    let mut deposited = 0;
    for s in sends {
        deposited += usize::from(s.await.unwrap_or(false));
    }
    let deposit_rate = deposited as f64 / t.elapsed().as_secs_f64();

    let recipient = agent(rd.path()).await.expect("recipient again");
    let t = Instant::now();
    let mut read = 0;
    while read < deposited && t.elapsed() < Duration::from_secs(60) {
        recipient.fetch_mail().await;
        while let Ok(Some(m)) = recipient.try_next_message().await {
            assert_eq!(m.data.len(), 1024);
            read += 1;
        }
    }
    let fetch_rate = read as f64 / t.elapsed().as_secs_f64();
    rows.push(Row {
        what: format!("mail deposits to an offline agent (1 KiB, {n}), /s"),
        skillmesh: format!("{deposit_rate:.0}"),
        plain: String::new(),
        ratio: String::new(),
        target: "",
    });
    rows.push(Row {
        what: "  deposited durably / sent".into(),
        skillmesh: format!("{deposited}/{n}"),
        plain: String::new(),
        ratio: String::new(),
        target: "all",
    });
    rows.push(Row {
        what: "mail fetch + verify + decrypt on return (1 KiB), /s".into(),
        skillmesh: format!("{fetch_rate:.0}"),
        plain: String::new(),
        ratio: String::new(),
        target: "",
    });
    rows.push(Row {
        what: "  read / deposited".into(),
        skillmesh: format!("{read}/{deposited}"),
        plain: String::new(),
        ratio: String::new(),
        target: "all",
    });
    for node in [&sender, &recipient, &relay] {
        node.shutdown().await.ok();
    }
}

pub(super) async fn startup(n: usize, rows: &mut Vec<Row>) {
    let d1 = tempfile::tempdir().expect("tempdir");
    let boot_node = Node::builder(config(Net::Tcp, vec![]))
        .data_dir(d1.path())
        .build()
        .await
        .expect("boot");
    let boot = boot_node.listen_addrs().await.expect("addrs");
    let mut alone = Vec::new();
    let mut joined = Vec::new();
    for i in 0..n * 2 {
        let d = tempfile::tempdir().expect("tempdir");
        let bootstrap = if i % 2 == 0 { vec![] } else { boot.clone() };
        let t = Instant::now();
        let node = Node::builder(config(Net::Tcp, bootstrap))
            .data_dir(d.path())
            .build()
            .await
            .expect("node");
        let took = t.elapsed();
        if i % 2 == 0 {
            alone.push(took)
        } else {
            joined.push(took)
        }
        node.shutdown().await.ok();
    }
    alone.sort();
    joined.sort();
    rows.push(Row {
        what: "start to listening (new data dir), p50".into(),
        skillmesh: ms(percentile(&alone, 0.5)),
        plain: String::new(),
        ratio: String::new(),
        target: "< 200 ms",
    });
    rows.push(Row {
        what: "start to listening + bootstrapped, p50".into(),
        skillmesh: ms(percentile(&joined, 0.5)),
        plain: String::new(),
        ratio: String::new(),
        target: "< 200 ms",
    });
    boot_node.shutdown().await.ok();
}

/// Envelope signing and signature checks, one by one and in batches (as call pipes sign what
/// queued together and check what arrived together): CPU time per 256-byte call envelope.
pub(super) fn verify(n: usize, rows: &mut Vec<Row>) {
    use skillmesh::protocol::envelope;
    use skillmesh::protocol::{Call, CallId, Mode, SigningKey, SkillName, Timestamp};
    let key =
        SigningKey::from_keypair(&libp2p::identity::Keypair::generate_ed25519()).expect("ed25519");
    let now = Timestamp::now();
    let calls: Vec<Call> = (0..n)
        .map(|_| Call {
            call_id: CallId(rand::random()),
            caller: key.peer_id(),
            target: PeerId::random(),
            skill: SkillName::new("echo").expect("name"),
            version_req: "*".parse().expect("req"),
            args: ByteBuf::from(vec![0x78u8; 256]),
            issued_at: now,
            expires_at: now.saturating_add(Duration::from_secs(60)),
            mode: Mode::Sync,
            grant: None,
        })
        .collect();
    let t = Instant::now();
    let envelopes: Vec<Vec<u8>> = calls
        .iter()
        .map(|c| envelope::seal(&key, c).expect("seal"))
        .collect();
    let sealed_alone = t.elapsed() / n as u32;
    // Envelopes signed in batches of 32, checked below as they would arrive: 32 together.
    let mut batch_signed = Vec::new();
    for batch in [8, 32] {
        let t = Instant::now();
        let mut signed = Vec::with_capacity(n);
        for chunk in calls.chunks(batch) {
            let prepared: Vec<_> = chunk
                .iter()
                .map(|c| envelope::prepare(&key, c).expect("prepare"))
                .collect();
            let refs: Vec<_> = prepared.iter().collect();
            signed.extend(envelope::sign_batch(&key, &refs));
        }
        let batched = t.elapsed() / n as u32;
        assert_eq!(signed.len(), n, "every envelope signed");
        batch_signed = signed;
        rows.push(Row {
            what: format!("encode + sign per call envelope, batches of {batch}"),
            skillmesh: format!("{:.1} us", batched.as_secs_f64() * 1e6),
            plain: format!("{:.1} us", sealed_alone.as_secs_f64() * 1e6),
            ratio: format!("{:.2}x", batched.as_secs_f64() / sealed_alone.as_secs_f64()),
            target: "(plain: one by one)",
        });
    }
    let refs: Vec<&[u8]> = envelopes.iter().map(Vec::as_slice).collect();
    let t = Instant::now();
    let alone = refs.iter().filter(|e| envelope::verify(e).is_ok()).count();
    let one_by_one = t.elapsed() / n as u32;
    for batch in [8, 32] {
        let t = Instant::now();
        let ok: usize = refs
            .chunks(batch)
            .map(|c| {
                envelope::verify_batch(c)
                    .iter()
                    .filter(|r| r.is_ok())
                    .count()
            })
            .sum();
        let batched = t.elapsed() / n as u32;
        assert_eq!((alone, ok), (n, n), "every envelope verifies");
        rows.push(Row {
            what: format!("signature check per call envelope, batches of {batch}"),
            skillmesh: format!("{:.1} us", batched.as_secs_f64() * 1e6),
            plain: format!("{:.1} us", one_by_one.as_secs_f64() * 1e6),
            ratio: format!("{:.2}x", batched.as_secs_f64() / one_by_one.as_secs_f64()),
            target: "(plain: one by one)",
        });
    }
    let refs: Vec<&[u8]> = batch_signed.iter().map(Vec::as_slice).collect();
    let t = Instant::now();
    let ok: usize = refs
        .chunks(32)
        .map(|c| {
            envelope::verify_batch(c)
                .iter()
                .filter(|r| r.is_ok())
                .count()
        })
        .sum();
    let shared = t.elapsed() / n as u32;
    assert_eq!(ok, n, "every batch-signed envelope verifies");
    rows.push(Row {
        what: "signature check per envelope signed 32 together".into(),
        skillmesh: format!("{:.1} us", shared.as_secs_f64() * 1e6),
        plain: format!("{:.1} us", one_by_one.as_secs_f64() * 1e6),
        ratio: format!("{:.2}x", shared.as_secs_f64() / one_by_one.as_secs_f64()),
        target: "(plain: one by one)",
    });
}

/// The idle RSS of a daemon: this build's, or `--daemon`'s; and in a run without `--daemon`,
/// the shipped build's too (`target/dist/skillmesh`, the `dist` profile), if there is one.
pub(super) fn idle_rss(daemon: Option<&str>, rows: &mut Vec<Row>) {
    if let Some(binary) = daemon {
        daemon_rss(binary, "--daemon's binary", "< 15 MB (14.3 MiB)", rows);
        return;
    }
    let own = env!("CARGO_BIN_EXE_skillmesh");
    // The memory goal is for the daemon as shipped; a release build's code is laid out for
    // speed, not for the pages an idle daemon touches (`Cargo.toml`, profile.dist).
    daemon_rss(own, "this build", "(goal: dist row)", rows);
    let dist = std::path::Path::new(own)
        .parent()
        .and_then(std::path::Path::parent)
        .map(|t| t.join("dist").join("skillmesh"));
    match dist.filter(|d| d.exists()) {
        Some(d) => {
            let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified());
            let stale = matches!((modified(&d), modified(std::path::Path::new(own))),
                (Ok(a), Ok(b)) if a < b);
            let what = if stale {
                "dist build (older than this)"
            } else {
                "dist build (shipped)"
            };
            daemon_rss(&d.to_string_lossy(), what, "< 15 MB (14.3 MiB)", rows);
        }
        None => rows.push(Row {
            what: "idle daemon RSS, dist build: not built".into(),
            skillmesh: String::new(),
            plain: String::new(),
            ratio: String::new(),
            target: "cargo build --profile dist --bin skillmesh",
        }),
    }
}

/// Starts `binary` as a daemon on a fresh data directory and reads its RSS 3 s later.
fn daemon_rss(binary: &str, label: &str, target: &'static str, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("config.toml"),
        "[network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\n",
    )
    .expect("config");
    let mut child = std::process::Command::new(binary)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["-q", "run"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    std::thread::sleep(Duration::from_secs(3));
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (rss_kb, anon_kb) = (field("VmRSS:"), field("RssAnon:"));
    let _ = child.kill();
    let _ = child.wait();
    rows.push(Row {
        what: format!("idle daemon RSS 3 s after start, {label}"),
        skillmesh: format!("{:.1} MiB", rss_kb as f64 / 1024.0),
        plain: String::new(),
        ratio: String::new(),
        // The goal says "15 MB"; both readings, so that neither is picked to suit a figure.
        target,
    });
    // The rest of RSS is the binary's code pages: shared, clean, reclaimable.
    rows.push(Row {
        what: "  of which anonymous (heap, stacks)".into(),
        skillmesh: format!("{:.1} MiB", anon_kb as f64 / 1024.0),
        plain: String::new(),
        ratio: String::new(),
        target: "",
    });
}

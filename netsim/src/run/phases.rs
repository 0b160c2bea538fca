//! The phases after the calls: the connection census, churn, a partition that heals, and mail
//! to nodes that went offline.

use super::*;

/// Direct and relayed connections, counted at both ends, and hole punches; and for each kind
/// of NAT pair, how many connected pairs have a direct connection.
pub(super) async fn connection_census(sim: &Sim<'_>) -> crate::report::Connections {
    let mut c = crate::report::Connections::default();
    let index: HashMap<PeerId, usize> =
        sim.peers.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    // (lower index, higher index) -> (direct, hole punched)
    let mut pairs: HashMap<(usize, usize), (bool, bool)> = HashMap::new();
    for (i, node) in sim.nodes.iter().enumerate() {
        let Some(node) = node else { continue };
        if let Ok(st) = node.nat_status().await {
            for conn in &st.connections {
                if conn.relayed {
                    c.relayed += 1;
                } else {
                    c.direct += 1;
                }
                if let Some(&j) = index.get(&conn.peer) {
                    let pair = pairs.entry((i.min(j), i.max(j))).or_default();
                    pair.0 |= !conn.relayed;
                    pair.1 |= conn.path == skillmesh::Path::HolePunched;
                }
            }
            c.reservations += st.reservations.len() as u64;
            c.hole_punches_ok += st.hole_punches.0;
            c.hole_punches_failed += st.hole_punches.1;
        }
    }
    let mut by_kind: std::collections::BTreeMap<(Nat, Nat), crate::report::PairDirect> =
        std::collections::BTreeMap::new();
    for ((i, j), (direct, punched)) in pairs {
        let (a, b) = (sim.placements[i].nat, sim.placements[j].nat);
        if !a.behind() && !b.behind() {
            continue;
        }
        let e = by_kind.entry((a.min(b), a.max(b))).or_default();
        e.kinds = format!("{}-{}", a.min(b).label(), a.max(b).label());
        e.pairs += 1;
        e.direct += u64::from(direct);
        e.punched += u64::from(punched);
    }
    c.by_nat_pair = by_kind.into_values().collect();
    c
}

/// Churn rounds: a share of the nodes leaves, events go out, they come back.
pub(super) async fn churn(
    sim: &mut Sim<'_>,
    rng: &mut StdRng,
    c: &crate::scenario::Churn,
) -> Result<(f64, Vec<Duration>), SimError> {
    let s = sim.s;
    let eligible: Vec<usize> = (s.public_nodes()..s.nodes).collect();
    let leave = ((eligible.len() as f64) * c.fraction).round() as usize;
    let mut expected = Vec::new();
    sim.phase("churn", c.rounds as usize * (c.events + 2 * leave));
    for _ in 0..c.rounds {
        let gone: Vec<usize> = eligible.sample(rng, leave).copied().collect();
        for &i in &gone {
            sim.stop(i).await;
            sim.progress.tick();
        }
        let up = sim.up();
        let started = Instant::now();
        let events = sim.publish(rng, &up, c.events).await?;
        let round = expect(&events, &up);
        sim.await_deliveries(&round).await;
        expected.extend(round);
        if let Some(rest) = c.offline.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        for &i in &gone {
            sim.start(i).await?;
            sim.progress.tick();
        }
        tokio::time::sleep(s.settle).await;
    }
    let (delivery, _, lat) = sim.tally(&expected);
    Ok((delivery, lat))
}

/// A partition: events stay inside their group; after it heals they reach everyone.
pub(super) async fn partition(
    sim: &mut Sim<'_>,
    rng: &mut StdRng,
    p: &crate::scenario::Partition,
) -> Result<crate::report::PartitionOutcome, SimError> {
    let s = sim.s;
    let mut order: Vec<usize> = (0..s.nodes).collect();
    order.shuffle(rng);
    let mut groups = vec![0u32; s.nodes];
    for (rank, &i) in order.iter().enumerate() {
        groups[i] = rank as u32 % p.groups;
    }
    sim.phase("partition", 2 * p.events);
    sim.net.partition(groups.clone());
    let groups = &groups;
    let started = Instant::now();
    // Gossip needs a heartbeat or two to route around the cut links.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let up = sim.up();
    let events = sim.publish(rng, &up, p.events).await?;
    let inside: Vec<(usize, u64)> = events
        .iter()
        .flat_map(|&(e, pb)| {
            let g = groups[pb];
            up.iter()
                .filter(move |&&i| i != pb && groups[i] == g)
                .map(move |&i| (i, e))
        })
        .collect();
    sim.await_deliveries(&inside).await;
    // Calls across the cut must not be answered: each goes from a random node to a server in
    // another group, and gives up before the heal (an answer after it would be legitimate).
    let mut cross_calls = 0;
    let mut cross_calls_answered = 0;
    let left = p
        .duration
        .saturating_sub(started.elapsed())
        .saturating_sub(Duration::from_secs(1));
    if !left.is_zero() {
        let wait = left.min(Duration::from_secs(5));
        let pairs: Vec<(Node, PeerId, usize)> = (0..p.events)
            .filter_map(|_| {
                let i = up[rng.random_range(0..up.len())];
                let far: Vec<usize> = up
                    .iter()
                    .copied()
                    .filter(|&j| groups[j] != groups[i] && !sim.serves[j].is_empty())
                    .collect();
                let j = *far.choose(rng)?;
                Some((sim.nodes[i].clone()?, sim.peers[j], sim.serves[j][0]))
            })
            .collect();
        cross_calls = pairs.len() as u64;
        let answered =
            futures::future::join_all(pairs.into_iter().map(|(node, to, k)| async move {
                matches!(
                    tokio::time::timeout(wait, node.call(to, &skill_name(k), json!({}))).await,
                    Ok(Ok(_))
                )
            }))
            .await;
        cross_calls_answered = answered.into_iter().filter(|a| *a).count() as u64;
    }
    if let Some(rest) = p.duration.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let crossed = {
        let d = sim.deliveries.lock().unwrap_or_else(|e| e.into_inner());
        events
            .iter()
            .flat_map(|&(e, pb)| {
                let g = groups[pb];
                up.iter()
                    .filter(move |&&i| groups[i] != g)
                    .map(move |&i| (i, e))
            })
            .filter(|k| d.count.contains_key(k))
            .count() as u64
    };
    let (inside_delivery, _, _) = sim.tally(&inside);
    sim.net.heal();
    let healed = Instant::now();
    // After the heal: nodes find each other again through the DHT (lookups dial across),
    // then gossip meshes span the groups again.
    tokio::time::sleep(s.settle).await;
    let up = sim.up();
    let events = sim.publish(rng, &up, p.events).await?;
    let after = expect(&events, &up);
    sim.await_deliveries(&after).await;
    let (after_delivery, _, _) = sim.tally(&after);
    Ok(crate::report::PartitionOutcome {
        groups: p.groups,
        cross_deliveries: crossed,
        inside_delivery,
        cross_calls,
        cross_calls_answered,
        after_heal_delivery: after_delivery,
        heal_to_measure_secs: healed.elapsed().as_secs_f64(),
    })
}

/// Mail: recipients go offline, senders mail them (held by the relays' mailboxes), the
/// recipients come back and read it.
pub(super) async fn mail(
    sim: &mut Sim<'_>,
    rng: &mut StdRng,
    m: &crate::scenario::Mail,
) -> Result<(crate::report::MailOutcome, Vec<Duration>), SimError> {
    let s = sim.s;
    let eligible: Vec<usize> = (s.public_nodes()..s.nodes).collect();
    let recipients: Vec<usize> = eligible.sample(rng, m.recipients).copied().collect();
    let total = m.recipients * m.messages;
    sim.phase("mail", 2 * total);
    // Recipients publish cards naming their mailboxes; give the cards a moment to land.
    for &r in &recipients {
        let node = sim.node(r)?;
        let deadline = Instant::now() + s.timeout;
        while node.mailboxes().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for &r in &recipients {
        sim.stop(r).await;
    }
    let offline: HashSet<usize> = recipients.iter().copied().collect();
    let senders: Vec<usize> = (0..s.nodes).filter(|i| !offline.contains(i)).collect();
    let mut sent = HashMap::new();
    let (mut deposited, mut failed) = (0u64, 0u64);
    for &r in &recipients {
        for k in 0..m.messages {
            let from = senders[rng.random_range(0..senders.len())];
            let body = format!("mail {r}/{k}");
            match sim.node(from)?.send(sim.peers[r], body.as_bytes()).await {
                Ok(rep) if matches!(rep.delivery, Delivery::Deposited(_)) => {
                    deposited += 1;
                    sent.insert(body, r);
                }
                Ok(_) => {
                    // Delivered directly: the recipient is offline, so this cannot happen.
                    failed += 1;
                }
                Err(_) => failed += 1,
            }
            sim.progress.tick();
        }
    }
    for &r in &recipients {
        sim.start(r).await?;
    }
    let back = Instant::now();
    let mut samples = Vec::new();
    let mut delivered = 0u64;
    let deadline = back + s.timeout * 3;
    for &r in &recipients {
        let node = sim.node(r)?;
        let want = sent.values().filter(|&&x| x == r).count();
        let mut got = 0;
        let mut inbox = node.inbox();
        while got < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, inbox.next()).await {
                Ok(Some(Ok(msg))) => {
                    let body = String::from_utf8_lossy(&msg.data).to_string();
                    if sent.get(&body) == Some(&r) {
                        got += 1;
                        delivered += 1;
                        samples.push(back.elapsed());
                        sim.progress.tick();
                    }
                }
                _ => break,
            }
        }
    }
    Ok((
        crate::report::MailOutcome {
            sent: total as u64,
            deposited,
            failed_to_send: failed,
            delivered,
            delivery: ratio(delivered as usize, total),
            after_return: Latency::of(&samples),
        },
        samples,
    ))
}

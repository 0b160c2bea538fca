//! Running a scenario: start the nodes, give them roles, run the workload, measure.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use skillmesh::config::{Config, KadMode};
use skillmesh::protocol::{Multiaddr, PeerId, ShareMode, SkillSpec, Timestamp};
use skillmesh::{CallContext, HandlerError, Node, TransportKind};

use crate::SimError;
use crate::report::{Latency, Report, rss_mib};
use crate::scenario::Scenario;

/// Times each (receiving node, publisher, seq) was delivered.
type Deliveries = HashMap<(usize, PeerId, u64), u32>;

/// Operations in flight at once during the workload.
const PARALLEL: usize = 32;
/// Nodes started at once.
const START_BATCH: usize = 50;
/// The topic every node subscribes to.
const TOPIC: &str = "netsim";

/// Node settings for many nodes in one process: memory transport, no mDNS, quiet presence.
fn node_config(bootstrap: Vec<Multiaddr>, s: &Scenario) -> Config {
    let mut c = Config::default();
    c.network.listen = vec!["/memory/0".parse().unwrap_or_else(|_| unreachable!())];
    c.network.bootstrap = bootstrap;
    c.network.mdns = false;
    c.dht.mode = KadMode::Server;
    c.dht.query_timeout = s.timeout;
    c.gossip.heartbeat = Duration::from_millis(500);
    c.gossip.presence_interval = Duration::from_secs(60);
    c.calls.rate_per_peer = 100_000;
    c.calls.burst_per_peer = 100_000;
    c.calls.timeout = s.timeout;
    c.store.max_call_log = 1_000;
    c
}

async fn echo(_ctx: CallContext, args: Value) -> Result<Value, HandlerError> {
    Ok(args)
}

fn skill_name(k: usize) -> String {
    format!("sim-skill-{k}")
}

/// Runs a scenario to its report.
pub async fn run(s: &Scenario) -> Result<Report, SimError> {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(s.seed);
    let root = tempfile::tempdir().map_err(|e| SimError::Node(e.to_string()))?;

    let start_node = |i: usize, bootstrap: Vec<Multiaddr>| {
        let dir = root.path().join(format!("node-{i}"));
        let config = node_config(bootstrap, s);
        async move {
            Node::builder(config)
                .data_dir(dir)
                .transport(TransportKind::Memory)
                .build()
                .await
                .map_err(|e| SimError::Node(format!("node {i}: {e}")))
        }
    };
    let mut nodes = vec![start_node(0, vec![]).await?];
    let mut boot = nodes[0]
        .listen_addrs()
        .await
        .map_err(|e| SimError::Node(e.to_string()))?;
    for i in 1..s.bootstrap {
        let n = start_node(i, boot.clone()).await?;
        boot.extend(
            n.listen_addrs()
                .await
                .map_err(|e| SimError::Node(e.to_string()))?,
        );
        nodes.push(n);
    }
    let mut next = s.bootstrap;
    while next < s.nodes {
        let batch: Vec<_> = (next..s.nodes.min(next + START_BATCH))
            .map(|i| start_node(i, boot.clone()))
            .collect();
        next += batch.len();
        for n in futures::future::join_all(batch).await {
            nodes.push(n?);
        }
    }
    let startup_secs = started.elapsed().as_secs_f64();

    // Roles, from the seed: which nodes serve which skill.
    let mut servers: Vec<Vec<usize>> = Vec::new();
    for k in 0..s.skills {
        let mut chosen = HashSet::new();
        while chosen.len() < s.servers_per_skill {
            chosen.insert(rng.random_range(0..s.nodes));
        }
        let mut chosen: Vec<usize> = chosen.into_iter().collect();
        chosen.sort_unstable();
        for &i in &chosen {
            let spec = SkillSpec::builder(skill_name(k), "1.0.0")
                .share(ShareMode::Public)
                .tag("sim")
                .build()
                .map_err(|e| SimError::Node(e.to_string()))?;
            nodes[i]
                .register_skill(spec, echo)
                .await
                .map_err(|e| SimError::Node(e.to_string()))?;
        }
        servers.push(chosen);
    }

    // Every node listens on the topic; deliveries are recorded as they arrive.
    let deliveries: Arc<Mutex<Deliveries>> = Arc::default();
    let gossip_lat: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut listeners = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut sub = node
            .subscribe(TOPIC)
            .await
            .map_err(|e| SimError::Node(e.to_string()))?;
        let (deliveries, lat) = (deliveries.clone(), gossip_lat.clone());
        listeners.push(tokio::spawn(async move {
            while let Some(d) = sub.next().await {
                let age = Timestamp::now().since(d.issued_at);
                *deliveries
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry((i, d.publisher, d.seq))
                    .or_insert(0) += 1;
                lat.lock().unwrap_or_else(|e| e.into_inner()).push(age);
            }
        }));
    }
    tokio::time::sleep(s.settle).await;

    // Lookups: a random node looks for a random skill; success = every server found.
    let lookups: Vec<(usize, usize)> = (0..s.lookups)
        .map(|_| (rng.random_range(0..s.nodes), rng.random_range(0..s.skills)))
        .collect();
    let results: Vec<(bool, Duration)> = stream::iter(lookups)
        .map(|(i, k)| {
            let node = nodes[i].clone();
            let expected: HashSet<PeerId> =
                servers[k].iter().map(|&j| nodes[j].peer_id()).collect();
            let timeout = s.timeout;
            async move {
                let t = Instant::now();
                let found = tokio::time::timeout(timeout, node.find_skill(&skill_name(k))).await;
                let got: HashSet<PeerId> = match found {
                    Ok(Ok(f)) => f.into_iter().map(|f| f.peer).collect(),
                    _ => HashSet::new(),
                };
                (expected.is_subset(&got), t.elapsed())
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let discovery_success = ratio(results.iter().filter(|r| r.0).count(), results.len());
    let discovery = Latency::of(results.iter().filter(|r| r.0).map(|r| r.1).collect());

    // Calls: a random node calls a random server of a random skill.
    let calls: Vec<(usize, usize, usize)> = (0..s.calls)
        .map(|_| {
            let k = rng.random_range(0..s.skills);
            let server = servers[k][rng.random_range(0..servers[k].len())];
            (rng.random_range(0..s.nodes), server, k)
        })
        .collect();
    let results: Vec<(bool, Duration)> = stream::iter(calls)
        .enumerate()
        .map(|(n, (i, j, k))| {
            let (caller, callee) = (nodes[i].clone(), nodes[j].peer_id());
            async move {
                let t = Instant::now();
                let r = caller.call(callee, &skill_name(k), json!({ "n": n })).await;
                (matches!(r, Ok(v) if v == json!({ "n": n })), t.elapsed())
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let call_success = ratio(results.iter().filter(|r| r.0).count(), results.len());
    let call_lat = Latency::of(results.iter().filter(|r| r.0).map(|r| r.1).collect());

    // Events: random publishers; each must reach every other node once.
    for e in 0..s.events {
        let publisher = &nodes[rng.random_range(0..s.nodes)];
        let deadline = Instant::now() + s.timeout;
        while let Err(err) = publisher.publish_json(TOPIC, &json!({ "event": e })).await {
            if Instant::now() > deadline {
                return Err(SimError::Node(format!("event {e} never published: {err}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let expected = s.events * (s.nodes - 1);
    let deadline = Instant::now() + s.timeout;
    loop {
        let got = deliveries.lock().unwrap_or_else(|e| e.into_inner()).len();
        if got >= expected || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (delivered, duplicates) = {
        let d = deliveries.lock().unwrap_or_else(|e| e.into_inner());
        (
            d.len(),
            d.values().map(|&c| u64::from(c.saturating_sub(1))).sum(),
        )
    };
    let gossip = Latency::of(gossip_lat.lock().unwrap_or_else(|e| e.into_inner()).clone());

    let rss = rss_mib();
    let report = Report {
        scenario: s.name.clone(),
        seed: s.seed,
        nodes: s.nodes,
        startup_secs,
        discovery_success,
        discovery,
        call_success,
        calls: call_lat,
        gossip_delivery: ratio(delivered, expected),
        gossip,
        gossip_duplicates: duplicates,
        rss_mib: rss,
        rss_per_node_mib: rss / s.nodes as f64,
        wall_secs: started.elapsed().as_secs_f64(),
    };
    for l in listeners {
        l.abort();
    }
    futures::future::join_all(nodes.iter().map(|n| n.shutdown())).await;
    Ok(report)
}

fn ratio(n: usize, of: usize) -> f64 {
    if of == 0 { 1.0 } else { n as f64 / of as f64 }
}

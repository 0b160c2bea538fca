//! Running a scenario: place and start the nodes, give them roles, run the workload phases
//! (lookups, calls, gossip, churn, a partition, mail to offline nodes), measure.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream;
use libp2p::multiaddr::Protocol;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use skillmesh::config::{Config, KadMode, Reachability};
use skillmesh::protocol::{Multiaddr, PeerId, ShareMode, SkillSpec};
use skillmesh::{CallContext, Delivery, HandlerError, Node, TransportKind};
use tokio::task::JoinHandle;

use crate::SimError;
use crate::net::{Model, Nat, Net, Placement};
use crate::progress::Progress;
use crate::report::{
    CallOutcome, EventOutcome, Latency, LookupOutcome, Report, RunInfo, Samples, rss_mib,
};
use crate::scenario::Scenario;

mod phases;
use phases::{churn, connection_census, mail, partition};

/// Operations in flight at once during the workload.
const PARALLEL: usize = 32;
/// Nodes started at once.
const START_BATCH: usize = 25;
/// Nodes shut down at once at the end of a run.
const SHUTDOWN_PARALLEL: usize = 100;
/// The topic every node subscribes to.
const TOPIC: &str = "netsim";
/// Publications a server makes before the lookups start, if the earlier ones did not land.
const PUBLISH_ATTEMPTS: usize = 3;

/// Each (receiving node, event) delivered, how often, and when.
#[derive(Default)]
struct Deliveries {
    count: HashMap<(usize, u64), u32>,
    at: HashMap<(usize, u64), Instant>,
}

fn node_err(e: impl std::fmt::Display) -> SimError {
    SimError::Node(e.to_string())
}

async fn echo(_ctx: CallContext, args: Value) -> Result<Value, HandlerError> {
    Ok(args)
}

fn skill_name(k: usize) -> String {
    format!("sim-skill-{k}")
}

/// One run: the network, the nodes (a slot is empty while its node is offline), and what
/// they received.
struct Sim<'a> {
    s: &'a Scenario,
    net: Arc<Net>,
    root: tempfile::TempDir,
    placements: Vec<Placement>,
    nodes: Vec<Option<Node>>,
    peers: Vec<PeerId>,
    listeners: Vec<Option<JoinHandle<()>>>,
    bootstrap: Vec<Multiaddr>,
    relays: Vec<Multiaddr>,
    /// Skills each node serves, so a node that comes back serves them again.
    serves: Vec<Vec<usize>>,
    /// Skills are published once every node is up (into the grown DHT, as in a network that
    /// has been running a while); a node that restarts later publishes its own again.
    publishing: bool,
    deliveries: Arc<Mutex<Deliveries>>,
    /// When each event went out.
    published: HashMap<u64, Instant>,
    next_event: u64,
    progress: Progress,
}

impl Sim<'_> {
    fn config(&self, i: usize) -> Config {
        let s = self.s;
        let public = i < s.public_nodes();
        let mut c = Config::default();
        c.network.listen = vec![Net::addr(i)];
        c.network.bootstrap = if i < s.bootstrap {
            self.bootstrap[..i.min(self.bootstrap.len())].to_vec()
        } else {
            self.bootstrap.clone()
        };
        c.network.mdns = false;
        c.network.min_connections = s.limits.min_connections;
        c.network.max_connections = s.limits.max_connections;
        // Bootstrap nodes and relays are servers: everyone connects to them, and a full one
        // would turn newcomers away. Idle connections close sooner than by default, to keep
        // a thousand nodes in one process small.
        if public {
            c.network.min_connections = 64;
            c.network.max_connections = (2 * s.nodes as u32).max(64);
            c.network.max_pending = 256;
        }
        c.network.idle_timeout = Duration::from_secs(30);
        // Links here fail loudly (a partition or a stopped node breaks them at once), so pings
        // find nothing: at 15 s, both ends of 200 nodes' 14,000 connections sent ~1,900 a
        // second.
        c.network.ping_interval = Duration::from_secs(120);
        c.dht.mode = if public || !self.placements[i].nat.behind() {
            KadMode::Server
        } else {
            KadMode::Auto
        };
        c.dht.query_timeout = s.timeout;
        // A routing-table walk reaches most of a few hundred nodes; every node's falls due
        // within the same minutes (they started together), and idle connections have closed by
        // then, so each walk dials again: 66,000 dials in 200 nodes' first walk. Spread over
        // real machines that is nothing; on two cores it stalls the run. Runs are shorter than
        // this, so nodes walk once, when they join.
        c.dht.refresh_interval = Duration::from_secs(3600);
        // Behind NAT a node finds out with AutoNAT, as it would for real; public nodes know.
        c.nat.reachability = if self.placements[i].nat.behind() {
            Reachability::Auto
        } else {
            Reachability::Public
        };
        c.relay.enabled = i < s.relays;
        c.relay.mailbox = i < s.relays;
        if !public {
            c.mail.mailboxes = self.relays.clone();
        }
        // Without relays there is no mailbox to find, and a node that has none searches the
        // DHT again and again (backing off from 1 min to 30): a walk per node every few
        // minutes, which on real machines is nothing and here was a third of a 200-node run's
        // DHT requests.
        if s.relays == 0 {
            c.mail.max_mailboxes = 0;
        }
        c.mail.fetch_interval = Duration::from_secs(5);
        // Presence goes to every node; in one process that is every node's CPU at once.
        c.gossip.presence_interval = Duration::from_secs(3600);
        c.calls.rate_per_peer = 100_000;
        c.calls.burst_per_peer = 100_000;
        c.calls.timeout = s.timeout;
        c.store.max_call_log = 100;
        c
    }

    /// Node `i`'s start-up, owning what it needs, so many can run at once.
    fn build(&self, i: usize) -> impl Future<Output = Result<Node, SimError>> + use<> {
        let builder = Node::builder(self.config(i))
            .data_dir(self.root.path().join(format!("node-{i}")))
            .transport(TransportKind::Raw(self.net.transport(i)));
        async move {
            builder
                .build()
                .await
                .map_err(|e| SimError::Node(format!("node {i}: {e}")))
        }
    }

    async fn start(&mut self, i: usize) -> Result<(), SimError> {
        let node = self.build(i).await?;
        self.attach(i, node).await
    }

    /// Gives a started node its event listener, and its skills once they are published.
    async fn attach(&mut self, i: usize, node: Node) -> Result<(), SimError> {
        if self.publishing {
            self.register(i, &node).await?;
        }
        let mut sub = node.subscribe(TOPIC).await.map_err(node_err)?;
        let deliveries = self.deliveries.clone();
        self.listeners[i] = Some(tokio::spawn(async move {
            while let Some(d) = sub.next().await {
                let Some(e) = d.json().and_then(|v| v.get("e").and_then(Value::as_u64)) else {
                    continue;
                };
                let mut d = deliveries.lock().unwrap_or_else(|e| e.into_inner());
                *d.count.entry((i, e)).or_insert(0) += 1;
                d.at.entry((i, e)).or_insert_with(Instant::now);
            }
        }));
        self.peers[i] = node.peer_id();
        self.nodes[i] = Some(node);
        Ok(())
    }

    /// Registers node `i`'s skills; whether every announcement reached another node (each
    /// registration announces everything again: the last report tells).
    async fn register(&self, i: usize, node: &Node) -> Result<bool, SimError> {
        let mut last = None;
        for &k in &self.serves[i] {
            last = Some(
                node.register_skill(spec(k)?, echo)
                    .await
                    .map_err(node_err)?,
            );
        }
        Ok(last.is_none_or(|r| r.complete()))
    }

    async fn stop(&mut self, i: usize) {
        if let Some(l) = self.listeners[i].take() {
            l.abort();
        }
        if let Some(n) = self.nodes[i].take() {
            let _ = n.shutdown().await;
        }
    }

    /// DHT requests all live nodes' lookups have sent so far, and how many failed.
    fn lookup_requests(&self) -> (u64, u64) {
        self.nodes
            .iter()
            .flatten()
            .map(|n| n.lookup_stats())
            .fold((0, 0), |(r, f), s| (r + s.requests, f + s.failures))
    }

    /// Starts a progress phase; its line says how busy the network is.
    fn phase(&self, name: &str, total: usize) {
        let dials = self.net.dial_stats();
        let (open, min, max) = self.net.open_links();
        let net = format!(
            "{open} connections open, {min}-{max} per node, {} dials so far",
            dials.connected
        );
        self.progress.phase(name, total, &net);
    }

    fn up(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_some())
            .collect()
    }

    fn node(&self, i: usize) -> Result<Node, SimError> {
        self.nodes[i]
            .clone()
            .ok_or_else(|| SimError::Node(format!("node {i} is offline")))
    }

    /// Publishes `count` events from random live nodes in `from`; returns their ids and
    /// publishers.
    async fn publish(
        &mut self,
        rng: &mut StdRng,
        from: &[usize],
        count: usize,
    ) -> Result<Vec<(u64, usize)>, SimError> {
        let mut out = Vec::new();
        for _ in 0..count {
            let p = from[rng.random_range(0..from.len())];
            let node = self.node(p)?;
            let e = self.next_event;
            self.next_event += 1;
            let deadline = Instant::now() + self.s.timeout;
            self.published.insert(e, Instant::now());
            while let Err(err) = node.publish_json(TOPIC, &json!({ "e": e })).await {
                if Instant::now() > deadline {
                    let conns = node
                        .nat_status()
                        .await
                        .map(|s| s.connections.len())
                        .unwrap_or(0);
                    return Err(SimError::Node(format!(
                        "event {e} never published by node {p} ({}, {conns} connections): {err}",
                        self.peers[p]
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out.push((e, p));
            self.progress.tick();
        }
        Ok(out)
    }

    /// Waits until every (receiver, event) pair expected has arrived, or the timeout.
    async fn await_deliveries(&self, expected: &[(usize, u64)]) {
        let deadline = Instant::now() + self.s.timeout;
        loop {
            let got = {
                let d = self.deliveries.lock().unwrap_or_else(|e| e.into_inner());
                expected.iter().filter(|k| d.count.contains_key(k)).count()
            };
            if got >= expected.len() || Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Delivered share, duplicates and latencies of `expected`.
    fn tally(&self, expected: &[(usize, u64)]) -> (f64, u64, Vec<Duration>) {
        let d = self.deliveries.lock().unwrap_or_else(|e| e.into_inner());
        let mut lat = Vec::new();
        let mut dups = 0;
        let mut got = 0;
        for k in expected {
            if let Some(&c) = d.count.get(k) {
                got += 1;
                dups += u64::from(c.saturating_sub(1));
                if let (Some(at), Some(sent)) = (d.at.get(k), self.published.get(&k.1)) {
                    lat.push(at.saturating_duration_since(*sent));
                }
            }
        }
        (ratio(got, expected.len()), dups, lat)
    }
}

fn spec(k: usize) -> Result<SkillSpec, SimError> {
    SkillSpec::builder(skill_name(k), "1.0.0")
        .share(ShareMode::Public)
        .tag("sim")
        .build()
        .map_err(node_err)
}

fn with_peer(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    addr.with(Protocol::P2p(peer))
}

/// Places the nodes: regions spread evenly, NAT on a share of the non-public nodes.
fn place(s: &Scenario, rng: &mut StdRng) -> (Model, Vec<Placement>) {
    let n = &s.network;
    let regions = n.regions.len().max(1);
    let latency = if n.regions.is_empty() {
        vec![vec![n.latency]]
    } else {
        n.region_latency_ms
            .iter()
            .map(|row| row.iter().map(|&ms| Duration::from_millis(ms)).collect())
            .collect()
    };
    let mut order: Vec<usize> = (0..s.nodes).collect();
    order.shuffle(rng);
    let mut placements = vec![
        Placement {
            region: 0,
            nat: Nat::Public,
        };
        s.nodes
    ];
    for (rank, &i) in order.iter().enumerate() {
        placements[i].region = rank % regions;
    }
    let private: Vec<usize> = (s.public_nodes()..s.nodes).collect();
    let behind = ((private.len() as f64) * n.nat).round() as usize;
    let behind: Vec<usize> = private.sample(rng, behind).copied().collect();
    let dependent = ((behind.len() as f64) * n.nat_dependent).round() as usize;
    for (k, &i) in behind.iter().enumerate() {
        placements[i].nat = if k < dependent {
            Nat::Dependent
        } else {
            Nat::Independent
        };
    }
    let model = Model {
        latency,
        bandwidth: n.bandwidth_mbit * 1_000_000 / 8,
        dial_failure: n.dial_failure,
    };
    (model, placements)
}

/// How to run a scenario.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Options {
    /// Keep the nodes' data under this directory (default: a temporary directory).
    pub data_dir: Option<PathBuf>,
    /// Show a progress line on stderr.
    pub progress: bool,
}

/// Runs a scenario to its report, quietly, with the nodes' data in a temporary directory.
pub async fn run(s: &Scenario) -> Result<Report, SimError> {
    run_with(s, Options::default()).await
}

/// [`run`] with options.
pub async fn run_with(s: &Scenario, options: Options) -> Result<Report, SimError> {
    let data_dir = options.data_dir;
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(s.seed);
    let (model, placements) = place(s, &mut rng);
    let net = Net::new(s.seed, model, &placements);
    let root = match data_dir {
        Some(d) => tempfile::Builder::new()
            .prefix("netsim-")
            .tempdir_in(d)
            .map_err(node_err)?,
        None => tempfile::tempdir().map_err(node_err)?,
    };
    let mut sim = Sim {
        s,
        net: net.clone(),
        root,
        placements,
        nodes: vec![None; s.nodes],
        peers: vec![PeerId::random(); s.nodes],
        listeners: (0..s.nodes).map(|_| None).collect(),
        bootstrap: Vec::new(),
        relays: Vec::new(),
        serves: vec![Vec::new(); s.nodes],
        publishing: false,
        deliveries: Arc::default(),
        published: HashMap::new(),
        next_event: 0,
        progress: Progress::new(options.progress),
    };

    // Roles, from the seed: which nodes serve which skill.
    let mut servers: Vec<Vec<usize>> = Vec::new();
    for k in 0..s.skills {
        let mut chosen: Vec<usize> = (0..s.nodes).collect();
        chosen.shuffle(&mut rng);
        chosen.truncate(s.servers_per_skill);
        chosen.sort_unstable();
        for &i in &chosen {
            sim.serves[i].push(k);
        }
        servers.push(chosen);
    }

    // Start: public nodes one by one (each bootstraps from the ones before), then the rest in
    // batches.
    sim.phase("start", s.nodes);
    for i in 0..s.public_nodes() {
        sim.start(i).await?;
        let addr = with_peer(Net::addr(i), sim.peers[i]);
        if i < s.bootstrap {
            sim.bootstrap.push(addr.clone());
        }
        if i < s.relays {
            sim.relays.push(addr);
        }
        sim.progress.tick();
    }
    let mut next = s.public_nodes();
    while next < s.nodes {
        let end = s.nodes.min(next + START_BATCH);
        let built = futures::future::join_all((next..end).map(|i| sim.build(i))).await;
        for (i, node) in (next..end).zip(built) {
            sim.attach(i, node?).await?;
            sim.progress.tick();
        }
        next = end;
    }
    let startup_secs = started.elapsed().as_secs_f64();
    sim.phase(
        "publish",
        sim.serves.iter().filter(|k| !k.is_empty()).count(),
    );
    sim.publishing = true;
    // Servers publish at once, as independent agents would; each waits for its DHT puts and,
    // like an agent that reads its publish report, announces again if they did not all land
    // (the node would on its own, but only 30 s later). Outcome: whether the first landed.
    let sim_ref = &sim;
    let published: Vec<Result<(usize, bool, bool), SimError>> = stream::iter(0..s.nodes)
        .filter(|&i| std::future::ready(!sim_ref.serves[i].is_empty()))
        .map(|i| async move {
            // (server, first attempt complete, last attempt complete)
            let mut outcome: Option<(bool, bool)> = None;
            if let Some(node) = &sim_ref.nodes[i] {
                for _ in 0..PUBLISH_ATTEMPTS {
                    let complete = sim_ref.register(i, node).await?;
                    let first = outcome.map_or(complete, |(f, _)| f);
                    outcome = Some((first, complete));
                    if complete {
                        break;
                    }
                }
            }
            sim_ref.progress.tick();
            let (first, last) = outcome.unwrap_or((true, true));
            Ok((i, first, last))
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let published = published
        .into_iter()
        .collect::<Result<Vec<(usize, bool, bool)>, SimError>>()?;
    let publish_incomplete = published.iter().filter(|(_, first, _)| !first).count();
    // A lookup that misses one of these says so: its failure is the announcement's.
    let unannounced: HashSet<PeerId> = published
        .iter()
        .filter(|(_, _, last)| !last)
        .map(|&(i, _, _)| sim.peers[i])
        .collect();
    let publish_failed = unannounced.len();
    sim.phase("settle", 0);
    tokio::time::sleep(s.settle).await;

    // Lookups: a random node looks for a random skill; success = every server found.
    sim.phase("lookups", s.lookups);
    let before = sim.lookup_requests();
    let lookups: Vec<(usize, usize)> = (0..s.lookups)
        .map(|_| (rng.random_range(0..s.nodes), rng.random_range(0..s.skills)))
        .collect();
    let progress = &sim.progress;
    let unannounced = &unannounced;
    let results: Vec<(Result<(), String>, Duration)> = stream::iter(lookups)
        .map(|(i, k)| {
            let node = sim.nodes[i].clone();
            let expected: HashSet<PeerId> = servers[k].iter().map(|&j| sim.peers[j]).collect();
            async move {
                let t = Instant::now();
                let outcome = match node {
                    Some(node) => {
                        match tokio::time::timeout(s.timeout, node.find_skill(&skill_name(k))).await
                        {
                            Ok(Ok(f)) => {
                                let got: HashSet<PeerId> = f.into_iter().map(|f| f.peer).collect();
                                let missing: Vec<String> =
                                    expected.difference(&got).map(|p| p.to_base58()).collect();
                                if missing.is_empty() {
                                    Ok(())
                                } else {
                                    let unannounced = expected
                                        .difference(&got)
                                        .filter(|p| unannounced.contains(p))
                                        .count();
                                    // Whole ids, to match with the DHT's own logs.
                                    tracing::debug!(looker = %node.peer_id(), skill = %skill_name(k), ?missing, "lookup missed servers");
                                    Err(format!(
                                        "{} of {} servers not found ({unannounced} of them unannounced)",
                                        missing.len(),
                                        expected.len()
                                    ))
                                }
                            }
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err(format!("no answer within {:?}", s.timeout)),
                        }
                    }
                    None => Err("looking node offline".to_owned()),
                };
                progress.tick();
                (outcome, t.elapsed())
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let after = sim.lookup_requests();
    let (discovery_success, discovery_samples, lookup_errors) = tally_outcomes(&results);
    let per_lookup = |after: u64, before: u64| {
        if results.is_empty() {
            0.0
        } else {
            after.saturating_sub(before) as f64 / results.len() as f64
        }
    };
    let lookup_requests = per_lookup(after.0, before.0);
    let lookup_failures = per_lookup(after.1, before.1);

    // Calls: a random node calls a random server of a random skill.
    sim.phase("calls", s.calls);
    let calls: Vec<(usize, usize, usize)> = (0..s.calls)
        .map(|_| {
            let k = rng.random_range(0..s.skills);
            let server = servers[k][rng.random_range(0..servers[k].len())];
            (rng.random_range(0..s.nodes), server, k)
        })
        .collect();
    let progress = &sim.progress;
    let results: Vec<(Result<(), String>, Duration)> = stream::iter(calls)
        .enumerate()
        .map(|(n, (i, j, k))| {
            let (caller, callee) = (sim.nodes[i].clone(), sim.peers[j]);
            async move {
                let t = Instant::now();
                let outcome = match caller {
                    Some(c) => match c.call(callee, &skill_name(k), json!({ "n": n })).await {
                        Ok(v) if v == json!({ "n": n }) => Ok(()),
                        Ok(v) => Err(format!("wrong answer {v}")),
                        Err(e) => Err(e.to_string()),
                    },
                    None => Err("caller offline".to_owned()),
                };
                progress.tick();
                (outcome, t.elapsed())
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let (call_success, call_samples, call_errors) = tally_outcomes(&results);
    let connections = connection_census(&sim).await;

    // Events with no faults: each must reach every other node once.
    sim.phase("gossip", s.events);
    let everyone: Vec<usize> = (0..s.nodes).collect();
    let events = sim.publish(&mut rng, &everyone, s.events).await?;
    let expected = expect(&events, &everyone);
    sim.await_deliveries(&expected).await;
    let (gossip_delivery, gossip_duplicates, gossip_samples) = sim.tally(&expected);

    let mut report = Report {
        run: RunInfo {
            scenario: s.name.clone(),
            seed: s.seed,
            nodes: s.nodes,
            behind_nat: sim.placements.iter().filter(|p| p.nat.behind()).count(),
            startup_secs,
            wall_secs: 0.0,
        },
        lookups: LookupOutcome {
            discovery_success,
            discovery: Latency::of(&discovery_samples),
            lookup_requests,
            lookup_failures,
            lookup_errors,
            publish_incomplete,
            publish_failed,
        },
        calling: CallOutcome {
            call_success,
            calls: Latency::of(&call_samples),
            call_errors,
        },
        events: EventOutcome {
            gossip_delivery,
            gossip: Latency::of(&gossip_samples),
            gossip_duplicates,
            churn_delivery: None,
            churn_gossip: None,
        },
        connections,
        ..Report::default()
    };

    if let Some(c) = &s.churn {
        let (delivery, lat) = churn(&mut sim, &mut rng, c).await?;
        report.events.churn_delivery = Some(delivery);
        report.events.churn_gossip = Some(Latency::of(&lat));
    }
    if let Some(p) = &s.partition {
        let outcome = partition(&mut sim, &mut rng, p).await?;
        report.partition = Some(outcome);
    }
    let mut mail_samples = Vec::new();
    if let Some(m) = &s.mail {
        let (outcome, samples) = mail(&mut sim, &mut rng, m).await?;
        mail_samples = samples;
        report.mail = Some(outcome);
    }

    report.dials = net.dial_stats();
    let sent: Vec<u64> = (0..s.nodes).map(|i| net.bytes_sent(i)).collect();
    report.cost.bytes_sent_mib = sent.iter().sum::<u64>() as f64 / (1024.0 * 1024.0);
    report.cost.bytes_sent_per_node_kib = sent.iter().sum::<u64>() as f64 / 1024.0 / s.nodes as f64;
    report.cost.rss_mib = rss_mib();
    report.cost.rss_per_node_mib = report.cost.rss_mib / s.nodes as f64;
    report.samples = Samples {
        discovery_ms: to_ms(&discovery_samples),
        calls_ms: to_ms(&call_samples),
        gossip_ms: to_ms(&gossip_samples),
        mail_ms: to_ms(&mail_samples),
    };
    // Many at once: one by one, each waited on a thousand still-busy nodes (over 12 minutes
    // at 1,000 nodes).
    sim.phase("shutdown", 0);
    for l in sim.listeners.iter_mut().filter_map(Option::take) {
        l.abort();
    }
    stream::iter(sim.nodes.iter_mut().filter_map(Option::take))
        .for_each_concurrent(SHUTDOWN_PARALLEL, |n| async move {
            let _ = n.shutdown().await;
        })
        .await;
    report.run.wall_secs = started.elapsed().as_secs_f64();
    sim.progress.finish();
    Ok(report)
}

/// The most common errors, with how often each came.
/// Of timed outcomes: the share that succeeded, their times, and the most common errors.
fn tally_outcomes(
    results: &[(Result<(), String>, Duration)],
) -> (f64, Vec<Duration>, Vec<(String, usize)>) {
    let ok: Vec<Duration> = results
        .iter()
        .filter(|r| r.0.is_ok())
        .map(|r| r.1)
        .collect();
    let errors = top_errors(results.iter().filter_map(|r| r.0.as_ref().err()));
    (ratio(ok.len(), results.len()), ok, errors)
}

fn top_errors<'a>(errors: impl Iterator<Item = &'a String>) -> Vec<(String, usize)> {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for e in errors {
        *count.entry(e.as_str()).or_insert(0) += 1;
    }
    let mut v: Vec<(String, usize)> = count.into_iter().map(|(e, n)| (e.to_owned(), n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(5);
    v
}

fn to_ms(d: &[Duration]) -> Vec<f64> {
    d.iter().map(|d| d.as_secs_f64() * 1e3).collect()
}

/// Every (receiver, event) pair: each event to each node in `to` but its publisher.
fn expect(events: &[(u64, usize)], to: &[usize]) -> Vec<(usize, u64)> {
    events
        .iter()
        .flat_map(|&(e, p)| to.iter().filter(move |&&i| i != p).map(move |&i| (i, e)))
        .collect()
}

fn ratio(n: usize, of: usize) -> f64 {
    if of == 0 { 1.0 } else { n as f64 / of as f64 }
}

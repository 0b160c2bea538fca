//! Helpers for multi-node tests: real nodes on loopback, mDNS off, port 0.
#![allow(dead_code, unreachable_pub)]

pub mod daemon;

use std::future::Future;
use std::time::Duration;

use libp2p::Multiaddr;
use skillmesh::config::Config;
use skillmesh::identity::Identity;
use skillmesh::{Found, Node};

/// A config for tests: loopback TCP, no mDNS (tests run in parallel on one host), DHT server
/// mode, quick gossip heartbeats and presence.
pub fn config(bootstrap: &[Multiaddr]) -> Config {
    let mut c = Config::default();
    c.network.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    c.network.bootstrap = bootstrap.to_vec();
    c.network.mdns = false;
    c.dht.mode = skillmesh::config::KadMode::Server;
    c.dht.query_timeout = Duration::from_secs(5);
    c.gossip.heartbeat = Duration::from_millis(200);
    c.gossip.presence_interval = Duration::from_secs(1);
    c.calls.timeout = Duration::from_secs(10);
    c
}

/// A relay that also holds mail, on loopback.
pub fn relay_config() -> Config {
    let mut c = config(&[]);
    c.relay.enabled = true;
    c.relay.mailbox = true;
    c
}

/// A running node with its data dir (removed when dropped).
pub struct TestNode {
    pub node: Node,
    pub identity: Identity,
    pub dir: tempfile::TempDir,
}

impl std::ops::Deref for TestNode {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl TestNode {
    /// Shuts the node down and keeps its data dir, to start it again later.
    pub async fn stop(self) -> tempfile::TempDir {
        let TestNode { node, dir, .. } = self;
        node.shutdown().await.expect("shutdown");
        drop(node);
        dir
    }
}

pub async fn start(config: Config) -> TestNode {
    let dir = tempfile::tempdir().expect("tempdir");
    start_in(config, dir).await
}

pub async fn start_in(config: Config, dir: tempfile::TempDir) -> TestNode {
    let (identity, _) = Identity::load_or_create(dir.path()).expect("identity");
    let memory = config
        .network
        .listen
        .iter()
        .any(|a| a.to_string().starts_with("/memory/"));
    let transport = if memory {
        skillmesh::TransportKind::Memory
    } else {
        skillmesh::TransportKind::Network
    };
    let node = Node::builder(config)
        .transport(transport)
        .data_dir(dir.path())
        .identity(identity.clone())
        .build()
        .await
        .expect("node starts");
    TestNode {
        node,
        identity,
        dir,
    }
}

/// A bootstrap node and `n` nodes that bootstrap from it.
pub async fn mesh(n: usize, tweak: impl Fn(&mut Config)) -> Vec<TestNode> {
    let mut c = config(&[]);
    tweak(&mut c);
    let first = start(c).await;
    let boot = first.listen_addrs().await.expect("addrs");
    let mut nodes = vec![first];
    for _ in 0..n {
        let mut c = config(&boot);
        tweak(&mut c);
        nodes.push(start(c).await);
    }
    nodes
}

/// Retries `f` until it succeeds or `within` passes; returns the last error on timeout.
pub async fn eventually<T, E: std::fmt::Debug, F, Fut>(within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = tokio::time::Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() > within => panic!("not within {within:?}: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Test conveniences over the real node.
pub trait NodeTestExt {
    /// Finds `skill` served by `expected`, retrying while the DHT settles.
    fn find_served_by(&self, skill: &str, expected: libp2p::PeerId) -> impl Future<Output = Found>;
}

impl NodeTestExt for Node {
    async fn find_served_by(&self, skill: &str, expected: libp2p::PeerId) -> Found {
        eventually(Duration::from_secs(10), || async {
            let found = self.find_skill(skill).await.map_err(|e| e.to_string())?;
            found
                .into_iter()
                .find(|f| f.peer == expected)
                .ok_or_else(|| "not yet".to_owned())
        })
        .await
    }
}

//! Three agents on one gossip topic: each publishes, every other one receives.
//!
//! ```sh
//! cargo run --example events
//! ```

use std::time::Duration;

use libp2p::futures::StreamExt;
use serde_json::json;
use skillmesh::Node;
use skillmesh::config::Config;

fn local_config(bootstrap: Vec<skillmesh::protocol::Multiaddr>) -> Config {
    let mut config = Config::default();
    config.network.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid address")];
    config.network.bootstrap = bootstrap;
    config.network.mdns = false;
    config.gossip.heartbeat = Duration::from_millis(200);
    config
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let first = Node::builder(local_config(vec![]))
        .data_dir(dirs[0].path())
        .build()
        .await?;
    let boot = first.listen_addrs().await?;
    let mut nodes = vec![first];
    for dir in &dirs[1..] {
        nodes.push(
            Node::builder(local_config(boot.clone()))
                .data_dir(dir.path())
                .build()
                .await?,
        );
    }

    let mut subscriptions = Vec::new();
    for node in &nodes {
        subscriptions.push(node.subscribe("weather").await?);
    }

    // Publishing right after start may find no subscribed peer yet: the gossip mesh forms
    // within a few heartbeats. Retry until the mesh is there.
    for (i, node) in nodes.iter().enumerate() {
        let event = json!({ "from": i, "sky": "clear" });
        let mut tries = 0;
        while let Err(e) = node.publish_json("weather", &event).await {
            tries += 1;
            if tries > 50 {
                return Err(e.into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    for (i, sub) in subscriptions.iter_mut().enumerate() {
        for _ in 0..nodes.len() - 1 {
            let event = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("subscription closed"))?;
            println!(
                "agent {i} got {} from {}",
                String::from_utf8_lossy(&event.data),
                event.publisher
            );
        }
    }
    for node in &nodes {
        node.shutdown().await?;
    }
    Ok(())
}

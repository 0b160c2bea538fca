//! Two agents in one process: one serves `translate`, the other finds it by name in the DHT and
//! calls it.
//!
//! ```sh
//! cargo run --example two_agents
//! ```

use std::time::Duration;

use serde_json::{Value, json};
use skillmesh::config::Config;
use skillmesh::protocol::{ShareMode, SkillSpec};
use skillmesh::{CallContext, HandlerError, Node};

fn local_config(bootstrap: Vec<skillmesh::protocol::Multiaddr>) -> Config {
    let mut config = Config::default();
    config.network.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid address")];
    config.network.bootstrap = bootstrap;
    config.network.mdns = false;
    config
}

async fn translate(ctx: CallContext, args: Value) -> Result<Value, HandlerError> {
    let text = args["text"].as_str().ok_or("`text` must be a string")?;
    println!("translator: call {} from {}", ctx.call_id, ctx.caller);
    let french = text.replace("hello", "bonjour").replace("world", "monde");
    Ok(json!({ "text": french }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);

    // The translator starts alone; its address is where the other agent bootstraps from.
    let translator = Node::builder(local_config(vec![]))
        .data_dir(dirs.0.path())
        .build()
        .await?;
    let spec = SkillSpec::builder("translate", "1.0.0")
        .description("Translates English to French")
        .share(ShareMode::Public)
        .tag("nlp")
        .input_schema(json!({
            "type": "object",
            "required": ["text"],
            "properties": { "text": { "type": "string" } }
        }))
        .build()?;
    translator.register_skill(spec, translate).await?;
    println!("translator {} serves `translate`", translator.peer_id());

    let bootstrap = translator.listen_addrs().await?;
    let client = Node::builder(local_config(bootstrap))
        .data_dir(dirs.1.path())
        .build()
        .await?;
    println!("client     {} joined", client.peer_id());

    // Provider records travel to the DHT as the mesh forms: retry briefly.
    let mut found = Vec::new();
    for _ in 0..50 {
        match client.find_skill("translate").await {
            Ok(f) => {
                found = f;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let agent = found
        .first()
        .ok_or_else(|| anyhow::anyhow!("nobody serves translate"))?;
    println!(
        "found `translate` {} at {} ({})",
        agent.skills[0].version, agent.peer, agent.card.name
    );

    let out = client
        .call(agent.peer, "translate", json!({ "text": "hello world" }))
        .await?;
    println!("result: {out}");

    match client
        .call(agent.peer, "translate", json!({ "txt": 42 }))
        .await
    {
        Err(skillmesh::Error::Remote(e)) => println!("bad arguments are refused: {e}"),
        other => println!("unexpected: {other:?}"),
    }

    client.shutdown().await?;
    translator.shutdown().await?;
    Ok(())
}

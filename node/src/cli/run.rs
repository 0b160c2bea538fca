//! `skillmesh run`: the node in the foreground, with its control API, until Ctrl-C or SIGTERM.

use std::net::SocketAddr;

use libp2p::Multiaddr;
use skillmesh::Node;
use skillmesh::control::ControlApi;

use super::{CliError, Context, print_json};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Listen on this multiaddr (repeatable; replaces network.listen).
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<Multiaddr>,
    /// Connect to this peer first (repeatable; adds to network.bootstrap).
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<Multiaddr>,
    /// Address of the local control API (loopback; replaces api.listen).
    #[arg(long, value_name = "ADDR")]
    api: Option<SocketAddr>,
    /// Serve as a relay (and mailbox) for nodes behind NAT (sets relay.enabled).
    #[arg(long)]
    relay: bool,
}

pub(crate) async fn run(ctx: &Context, args: Args) -> Result<(), CliError> {
    let mut config = ctx.load_config()?;
    if !args.listen.is_empty() {
        config.network.listen = args.listen;
    }
    config.network.bootstrap.extend(args.bootstrap);
    if args.relay {
        config.relay.enabled = true;
    }
    if let Some(api) = args.api {
        config.api.listen = api;
    }
    config.validate().map_err(CliError::usage)?;
    // A stale address file (a node that crashed) is fine: only a node that answers blocks us.
    if let Ok(api) = super::client::Api::connect(ctx)
        && api.ping().await
    {
        return Err(CliError::failure(format!(
            "a node is already running with data dir {}; stop it first, or use another --data-dir",
            ctx.data_dir.display()
        )));
    }
    let node = Node::builder(config.clone())
        .data_dir(&ctx.data_dir)
        .build()
        .await
        .map_err(CliError::failure)?;
    for decl in &config.skills {
        // Validated with the config: resolve cannot fail here.
        let (spec, backing) = decl.resolve().map_err(CliError::usage)?;
        node.register_handler(spec.clone(), backing.handler(spec.mode))
            .await
            .map_err(CliError::failure)?;
    }
    let api = match ControlApi::start(
        node.clone(),
        config.api.listen,
        &ctx.data_dir,
        config.skills.clone(),
    )
    .await
    {
        Ok(api) => api,
        Err(e) => {
            let _ = node.shutdown().await;
            return Err(CliError::failure(e));
        }
    };
    let addrs = node.listen_addrs().await.map_err(CliError::failure)?;
    if ctx.json {
        print_json(&serde_json::json!({
            "peer_id": node.peer_id().to_string(),
            "listen_addrs": addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "api": api.addr().to_string(),
        }));
    } else {
        println!("skillmesh node {} ({})", node.peer_id(), config.node.name);
        for a in &addrs {
            println!("  listening on {a}");
        }
        println!("  control API on http://{}", api.addr());
        for s in node.skills() {
            println!("  serving {} {}", s.name, s.version);
        }
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    api.stop().await;
    node.shutdown().await.map_err(CliError::failure)?;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

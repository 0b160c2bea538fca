//! `skillmesh-netsim <scenario.toml> [--json FILE]`: run a scenario, print its report.

use std::path::PathBuf;

use clap::Parser;

/// Runs many real skillmesh nodes in one process and reports how the network behaves.
#[derive(Parser)]
#[command(name = "skillmesh-netsim", version)]
struct Args {
    /// The scenario file (netsim/scenarios/*.toml).
    scenario: PathBuf,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also draw the latency CDFs as SVG to this file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Keep the nodes' data under this directory (default: a temporary one).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// No progress line.
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Quiet by default: thousands of nodes log a lot. RUST_LOG=skillmesh=debug to see them.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("error,libp2p_gossipsub=off")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let scenario = skillmesh_netsim::Scenario::from_file(&args.scenario)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    eprintln!(
        "running {} ({} nodes, seed {})",
        scenario.name, scenario.nodes, scenario.seed
    );
    let mut options = skillmesh_netsim::Options::default();
    options.data_dir = args.data_dir;
    options.progress = !args.quiet;
    let report = runtime.block_on(skillmesh_netsim::run_with(&scenario, options))?;
    print!("{}", report.table());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(path) = args.svg {
        std::fs::write(&path, report.svg())?;
    }
    Ok(())
}

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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scenario = skillmesh_netsim::Scenario::from_file(&args.scenario)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    eprintln!(
        "running {} ({} nodes, seed {})",
        scenario.name, scenario.nodes, scenario.seed
    );
    let report = runtime.block_on(skillmesh_netsim::run(&scenario))?;
    print!("{}", report.table());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

//! Command-line interface: global options, and one module per command.

mod call;
mod calls;
mod client;
mod config;
mod events;
mod find;
mod inbox;
mod init;
mod keys;
mod run;
mod send;
mod skills;
mod status;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use skillmesh::config::{CONFIG_FILE, Config};

/// Exit code of a command that failed for a reason other than usage.
pub(crate) const EXIT_FAILURE: u8 = 1;
/// Exit code of bad usage or bad configuration (as clap uses).
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit code when no node is running for the data dir.
pub(crate) const EXIT_NO_DAEMON: u8 = 3;
/// Exit code when nothing serves the skill, or the agent cannot be reached in time.
pub(crate) const EXIT_NOT_FOUND: u8 = 4;
/// Exit code when the callee refused or failed the call.
pub(crate) const EXIT_FAILED_CALL: u8 = 5;

/// skillmesh: a peer-to-peer network for AI agents.
#[derive(Parser, Debug)]
#[command(name = "skillmesh", version, about)]
pub(crate) struct Cli {
    /// Where the node keeps its key, config and store.
    #[arg(long, global = true, env = "SKILLMESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Config file (default: config.toml in the data dir).
    #[arg(long, global = true, env = "SKILLMESH_CONFIG")]
    config: Option<PathBuf>,
    /// Set a config key, e.g. --set network.max_connections=128 (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub(crate) quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the identity and a default config in the data dir; print the PeerId.
    Init(init::Args),
    /// Run the node in the foreground, with its control API, until Ctrl-C.
    Run(run::Args),
    /// What the running node knows about itself.
    Status,
    /// Agents online or connected.
    Peers,
    /// The skills the running node serves.
    #[command(subcommand)]
    Skills(skills::Command),
    /// Find agents serving a skill, by name or --tag.
    Find(find::Args),
    /// Call a skill.
    Call(call::Args),
    /// The call log: list, show, wait for or cancel calls.
    #[command(subcommand)]
    Calls(calls::Command),
    /// Send an end-to-end encrypted message (held by mailboxes while the peer is offline).
    Send(send::Args),
    /// Print received messages, in order per sender.
    Inbox(inbox::Args),
    /// Publish or follow gossip events.
    #[command(subcommand)]
    Events(events::Command),
    /// Show this node's keys.
    #[command(subcommand)]
    Keys(keys::Command),
    /// Show or check the effective configuration.
    #[command(subcommand)]
    Config(config::Command),
}

/// A failure to report: one line, and the process exit code.
#[derive(Debug)]
pub(crate) struct CliError {
    pub(crate) message: String,
    pub(crate) code: u8,
}

impl CliError {
    fn failure(message: impl std::fmt::Display) -> Self {
        CliError {
            message: message.to_string(),
            code: EXIT_FAILURE,
        }
    }

    fn usage(message: impl std::fmt::Display) -> Self {
        CliError {
            message: message.to_string(),
            code: EXIT_USAGE,
        }
    }
}

/// What every command gets: resolved paths and output mode.
pub(crate) struct Context {
    data_dir: PathBuf,
    config_path: PathBuf,
    config_required: bool,
    overrides: Vec<String>,
    json: bool,
}

impl Context {
    /// The configuration: defaults, the file, `SKILLMESH_*` variables, then `--set` flags.
    fn load_config(&self) -> Result<Config, CliError> {
        let mut config =
            Config::from_file(&self.config_path, self.config_required).map_err(CliError::usage)?;
        config
            .apply_env(std::env::vars())
            .map_err(CliError::usage)?;
        for kv in &self.overrides {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| CliError::usage(format!("--set {kv:?}: expected KEY=VALUE")))?;
            config.set(k.trim(), v).map_err(CliError::usage)?;
        }
        Ok(config)
    }
}

pub(crate) async fn run(cli: Cli) -> Result<(), CliError> {
    let data_dir = match cli.data_dir {
        Some(d) => d,
        None => skillmesh::config::default_data_dir().ok_or_else(|| {
            CliError::usage(
                "cannot find a home directory; pass --data-dir or set SKILLMESH_DATA_DIR",
            )
        })?,
    };
    let ctx = Context {
        config_path: cli
            .config
            .clone()
            .unwrap_or_else(|| data_dir.join(CONFIG_FILE)),
        config_required: cli.config.is_some(),
        data_dir,
        overrides: cli.set,
        json: cli.json,
    };
    match cli.command {
        Command::Init(args) => init::run(&ctx, args).await,
        Command::Run(args) => run::run(&ctx, args).await,
        Command::Status => status::status(&ctx).await,
        Command::Peers => status::peers(&ctx).await,
        Command::Skills(cmd) => skills::run(&ctx, cmd).await,
        Command::Find(args) => find::run(&ctx, args).await,
        Command::Call(args) => call::run(&ctx, args).await,
        Command::Calls(cmd) => calls::run(&ctx, cmd).await,
        Command::Events(cmd) => events::run(&ctx, cmd).await,
        Command::Send(args) => send::run(&ctx, args).await,
        Command::Inbox(args) => inbox::run(&ctx, args).await,
        Command::Keys(cmd) => keys::run(&ctx, cmd).await,
        Command::Config(cmd) => config::run(&ctx, cmd).await,
    }
}

/// Logs go to stderr; `RUST_LOG` overrides the level from -v / -q.
pub(crate) fn init_tracing(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The strings of a JSON array (empty for anything else).
fn strings(value: &serde_json::Value) -> Vec<&str> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .collect()
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

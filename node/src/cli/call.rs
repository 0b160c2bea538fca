//! `skillmesh call <skill> --args <json | @file | ->`: call a skill on the network.

use std::io::Read;
use std::time::Duration;

use serde_json::{Value, json};

use super::client::Api;
use super::{CliError, Context, print_json};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The skill.
    skill: String,
    /// Call this agent (default: any that serves the skill).
    #[arg(long)]
    peer: Option<String>,
    /// Arguments: JSON text, @file, or - for stdin.
    #[arg(long, default_value = "{}")]
    args: String,
    /// Versions accepted, e.g. ^1.2.
    #[arg(long)]
    version: Option<String>,
    /// How long to wait, e.g. 30s.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
}

fn read_args(spec: &str) -> Result<Value, CliError> {
    let (text, source) = if spec == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError::usage(format!("cannot read --args from stdin: {e}")))?;
        (s, "stdin".to_owned())
    } else if let Some(path) = spec.strip_prefix('@') {
        let s = std::fs::read_to_string(path)
            .map_err(|e| CliError::usage(format!("cannot read --args file {path}: {e}")))?;
        (s, path.to_owned())
    } else {
        (spec.to_owned(), "--args".to_owned())
    };
    serde_json::from_str(&text)
        .map_err(|e| CliError::usage(format!("{source} is not valid JSON: {e}")))
}

pub(crate) async fn run(ctx: &Context, args: Args) -> Result<(), CliError> {
    let call_args = read_args(&args.args)?;
    let api = Api::connect(ctx)?;
    let body = json!({
        "skill": args.skill,
        "args": call_args,
        "peer": args.peer,
        "version": args.version,
        "timeout_ms": args.timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
    });
    let r: Value = api
        .send(api.request(reqwest::Method::POST, "/v1/call").json(&body))
        .await?;
    if ctx.json {
        print_json(&r);
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&r["output"]).unwrap_or_default()
        );
    }
    Ok(())
}

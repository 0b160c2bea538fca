//! `skillmesh skills list|add|remove`: the skills the running node serves.

use std::time::Duration;

use serde_json::{Value, json};
use skillmesh::protocol::{Mode, ShareMode};

use super::client::Api;
use super::{CliError, Context, print_json};

#[derive(clap::Subcommand, Debug)]
pub(crate) enum Command {
    /// List the skills served.
    List,
    /// Serve a skill backed by a command (after `--`) or a local HTTP endpoint (--http).
    Add(AddArgs),
    /// Stop serving a skill.
    Remove {
        /// The skill's name.
        name: String,
    },
}

#[derive(clap::Args, Debug)]
pub(crate) struct AddArgs {
    /// The skill's name.
    name: String,
    /// Its version.
    #[arg(long, default_value = "1.0.0")]
    version: String,
    /// A description.
    #[arg(long, default_value = "")]
    description: String,
    /// Discovery tag (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Who may call: public, mesh, grants, private.
    #[arg(long, default_value = "public", value_parser = parse_share)]
    share: ShareMode,
    /// sync (one result), stream (a command prints one JSON value per line; an endpoint
    /// answers NDJSON or SSE) or async (accepted at once, the result delivered later).
    #[arg(long, default_value = "sync", value_parser = parse_mode)]
    mode: Mode,
    /// JSON Schema of the arguments (JSON text).
    #[arg(long)]
    input_schema: Option<String>,
    /// Handler deadline, e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// POST calls to this local http:// URL.
    #[arg(long)]
    http: Option<String>,
    /// The command to run per call (arguments JSON on stdin, result JSON on stdout).
    #[arg(last = true)]
    command: Vec<String>,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    serde_json::from_value(json!(s)).map_err(|_| format!("{s:?}: expected sync, stream or async"))
}

fn parse_share(s: &str) -> Result<ShareMode, String> {
    serde_json::from_value(json!(s))
        .map_err(|_| format!("{s:?}: expected public, mesh, grants or private"))
}

pub(crate) async fn run(ctx: &Context, cmd: Command) -> Result<(), CliError> {
    let api = Api::connect(ctx)?;
    match cmd {
        Command::List => {
            let list: Value = api
                .send(api.request(reqwest::Method::GET, "/v1/skills"))
                .await?;
            if ctx.json {
                print_json(&list);
            } else {
                for s in list.as_array().into_iter().flatten() {
                    let spec = &s["spec"];
                    println!(
                        "{} {} [{}] {}",
                        spec["name"].as_str().unwrap_or("?"),
                        spec["version"].as_str().unwrap_or("?"),
                        spec["share"].as_str().unwrap_or("?"),
                        spec["description"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Command::Add(a) => {
            let input_schema: Option<Value> = match &a.input_schema {
                Some(text) => Some(
                    serde_json::from_str(text)
                        .map_err(|e| CliError::usage(format!("--input-schema is not JSON: {e}")))?,
                ),
                None => None,
            };
            if a.command.is_empty() == a.http.is_none() {
                return Err(CliError::usage(
                    "give either --http URL or a command after --",
                ));
            }
            let decl = json!({
                "name": a.name,
                "version": a.version,
                "description": a.description,
                "mode": a.mode,
                "share": a.share,
                "tags": a.tags,
                "input_schema": input_schema,
                "timeout": a.timeout.map(|t| humantime::format_duration(t).to_string()),
                "command": (!a.command.is_empty()).then_some(a.command),
                "http": a.http,
            });
            let r: Value = api
                .send(api.request(reqwest::Method::POST, "/v1/skills").json(&decl))
                .await?;
            if ctx.json {
                print_json(&r);
            } else {
                println!("serving {}", decl["name"].as_str().unwrap_or("?"));
            }
        }
        Command::Remove { name } => {
            let path = format!("/v1/skills/{name}");
            let r: Value = api
                .send(api.request(reqwest::Method::DELETE, &path))
                .await?;
            if ctx.json {
                print_json(&r);
            } else {
                println!("stopped serving {name}");
            }
        }
    }
    Ok(())
}

//! `skillmesh find <name>` / `skillmesh find --tag <tag>`: agents serving a skill.

use serde_json::Value;

use super::client::Api;
use super::{CliError, Context, print_json};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The skill's name.
    #[arg(required_unless_present = "tag", conflicts_with = "tag")]
    name: Option<String>,
    /// Find by tag instead.
    #[arg(long)]
    tag: Option<String>,
}

pub(crate) async fn run(ctx: &Context, args: Args) -> Result<(), CliError> {
    let api = Api::connect(ctx)?;
    let query: Vec<(&str, String)> = match (args.name, args.tag) {
        (Some(n), _) => vec![("skill", n)],
        (None, Some(t)) => vec![("tag", t)],
        (None, None) => return Err(CliError::usage("give a skill name or --tag")),
    };
    let found: Value = api
        .send(api.request(reqwest::Method::GET, "/v1/find").query(&query))
        .await?;
    if ctx.json {
        print_json(&found);
        return Ok(());
    }
    for f in found.as_array().into_iter().flatten() {
        for s in f["skills"].as_array().into_iter().flatten() {
            println!(
                "{} {} on {} ({})",
                s["name"].as_str().unwrap_or("?"),
                s["version"].as_str().unwrap_or("?"),
                f["peer_id"].as_str().unwrap_or("?"),
                f["name"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}

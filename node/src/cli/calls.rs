//! `skillmesh calls list|show|wait|cancel`: the call log, one call, waiting for one to end,
//! cancelling one of ours.

use std::time::Duration;

use serde_json::Value;

use super::client::Api;
use super::{CliError, Context, EXIT_FAILED_CALL, print_json};

#[derive(clap::Subcommand, Debug)]
pub(crate) enum Command {
    /// The newest calls, both sides.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One call: its state on each side this node was on, and every state it went through.
    Show {
        /// The call id (32 hex digits).
        id: String,
    },
    /// Wait for a call to end; exits 5 unless it completed.
    Wait {
        /// The call id.
        id: String,
        /// Give up after this long.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Cancel one of our calls (a stream, or one still waiting for its result).
    Cancel {
        /// The call id.
        id: String,
    },
}

pub(crate) async fn run(ctx: &Context, cmd: Command) -> Result<(), CliError> {
    let api = Api::connect(ctx)?;
    match cmd {
        Command::List { limit } => {
            let req = api
                .request(reqwest::Method::GET, "/v1/calls")
                .query(&[("limit", limit)]);
            let r: Value = api.send(req).await?;
            if ctx.json {
                print_json(&r);
                return Ok(());
            }
            for e in r.as_array().into_iter().flatten() {
                println!("{}", line(e));
            }
        }
        Command::Show { id } => {
            let r: Value = api
                .send(api.request(reqwest::Method::GET, &format!("/v1/calls/{id}")))
                .await?;
            show(ctx, &r);
        }
        Command::Wait { id, timeout } => {
            let wait = humantime::format_duration(timeout).to_string();
            let req = api
                .request(reqwest::Method::GET, &format!("/v1/calls/{id}"))
                .query(&[("wait", wait)])
                .timeout(timeout + Duration::from_secs(5));
            let r: Value = api.send(req).await?;
            show(ctx, &r);
            if r["over"] != Value::Bool(true) {
                return Err(CliError::failure(format!(
                    "call {id} still runs after {}",
                    humantime::format_duration(timeout)
                )));
            }
            let completed = r["sides"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|s| s["state"] == "completed");
            if !completed {
                return Err(CliError {
                    message: format!("call {id} did not complete"),
                    code: EXIT_FAILED_CALL,
                });
            }
        }
        Command::Cancel { id } => {
            let r: Value = api
                .send(api.request(reqwest::Method::POST, &format!("/v1/calls/{id}/cancel")))
                .await?;
            if ctx.json {
                print_json(&r);
            } else {
                println!("cancelled {id}");
            }
        }
    }
    Ok(())
}

/// One call log entry on a line: id, side, state, mode, skill, peer, error.
fn line(e: &Value) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
    format!(
        "{}  {:<8} {:<9} {:<6} {:<20} {}{}",
        s("call_id"),
        s("direction"),
        s("state"),
        s("mode"),
        s("skill"),
        s("peer_id"),
        e["error"]
            .as_str()
            .map(|c| format!("  {c}"))
            .unwrap_or_default()
    )
}

fn show(ctx: &Context, r: &Value) {
    if ctx.json {
        print_json(r);
        return;
    }
    for side in r["sides"].as_array().into_iter().flatten() {
        println!("{}", line(side));
        if let Some(out) = side.get("output") {
            println!(
                "    output: {}",
                serde_json::to_string(out).unwrap_or_default()
            );
        }
        if let Some(m) = side["message"].as_str() {
            println!("    message: {m}");
        }
        let t0 = side["started_at"].as_u64().unwrap_or(0);
        for t in side["history"].as_array().into_iter().flatten() {
            let at = t["at"].as_u64().unwrap_or(0);
            println!(
                "    +{:>7} ms  {}",
                at.saturating_sub(t0),
                t["state"].as_str().unwrap_or("?")
            );
        }
    }
}

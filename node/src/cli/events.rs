//! `skillmesh events pub|sub`: gossip events through the running node.

use libp2p::futures::StreamExt;
use serde_json::Value;

use super::client::Api;
use super::{CliError, Context, print_json};

#[derive(clap::Subcommand, Debug)]
pub(crate) enum Command {
    /// Publish a JSON value on a topic.
    Pub {
        /// The topic.
        topic: String,
        /// The event, as JSON.
        #[arg(value_name = "JSON")]
        event: String,
    },
    /// Print a topic's events as they arrive, until Ctrl-C or --count events.
    Sub {
        /// The topic.
        topic: String,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

pub(crate) async fn run(ctx: &Context, cmd: Command) -> Result<(), CliError> {
    let api = Api::connect(ctx)?;
    match cmd {
        Command::Pub { topic, event } => {
            let value: Value = serde_json::from_str(&event)
                .map_err(|e| CliError::usage(format!("the event is not valid JSON: {e}")))?;
            let req = api
                .request(reqwest::Method::POST, "/v1/events")
                .query(&[("topic", &topic)])
                .json(&value);
            let r: Value = api.send(req).await?;
            if ctx.json {
                print_json(&r);
            } else {
                println!("published on {topic}");
            }
        }
        Command::Sub { topic, count } => {
            let req = api
                .request(reqwest::Method::GET, "/v1/events")
                .query(&[("topic", &topic)]);
            let resp = api.send_raw(req).await?;
            let mut stream = resp.bytes_stream();
            let mut buf = String::new();
            let mut seen = 0u64;
            loop {
                let chunk = tokio::select! {
                    c = stream.next() => c,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                };
                let Some(chunk) = chunk else {
                    return Err(CliError::failure("the node closed the event stream"));
                };
                let chunk =
                    chunk.map_err(|e| CliError::failure(format!("event stream broke: {e}")))?;
                buf.push_str(&String::from_utf8_lossy(&chunk));
                // Server-Sent Events: records end with a blank line; we only use `data:` lines.
                while let Some(end) = buf.find("\n\n") {
                    let record: String = buf.drain(..end + 2).collect();
                    for line in record.lines() {
                        let Some(data) = line.strip_prefix("data:") else {
                            continue;
                        };
                        let event: Value = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
                        if ctx.json {
                            println!("{}", serde_json::to_string(&event).unwrap_or_default());
                        } else {
                            println!(
                                "{} {}",
                                event["publisher"].as_str().unwrap_or("?"),
                                event["data"]
                            );
                        }
                        seen += 1;
                        if count.is_some_and(|c| seen >= c) {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

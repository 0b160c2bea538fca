//! `skillmesh inbox`: messages received by the running node, in order per sender. Each is
//! printed once: taking it removes it from the node.

use serde_json::Value;

use super::client::Api;
use super::{CliError, Context};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Keep waiting for new messages until Ctrl-C.
    #[arg(long)]
    follow: bool,
    /// Wait up to this many seconds for a first message.
    #[arg(long, default_value_t = 0)]
    wait: u64,
}

pub(crate) async fn run(ctx: &Context, args: Args) -> Result<(), CliError> {
    let api = Api::connect(ctx)?;
    loop {
        let wait = if args.follow { 30 } else { args.wait };
        let req = api
            .request(reqwest::Method::GET, "/v1/inbox")
            .query(&[("wait", wait)]);
        let list: Value = tokio::select! {
            r = api.send(req) => r?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let messages = list.as_array().cloned().unwrap_or_default();
        for m in &messages {
            if ctx.json {
                println!("{}", serde_json::to_string(m).unwrap_or_default());
            } else {
                let body = m["text"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("hex:{}", m["hex"].as_str().unwrap_or("")));
                println!(
                    "{} #{}: {}",
                    m["from"].as_str().unwrap_or("?"),
                    m["seq"],
                    body
                );
            }
        }
        if !args.follow {
            if messages.is_empty() && !ctx.json {
                println!("no messages");
            }
            return Ok(());
        }
    }
}

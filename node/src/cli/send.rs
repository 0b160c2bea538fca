//! `skillmesh send`: an end-to-end encrypted message to another agent, delivered directly or
//! through its mailboxes.

use serde_json::{Value, json};

use super::client::Api;
use super::{CliError, Context, print_json, strings};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The recipient's PeerId.
    peer: String,
    /// The message text (or --hex).
    #[arg(required_unless_present = "hex")]
    text: Option<String>,
    /// The message as hex bytes instead of text.
    #[arg(long, conflicts_with = "text")]
    hex: Option<String>,
}

pub(crate) async fn run(ctx: &Context, args: Args) -> Result<(), CliError> {
    let api = Api::connect(ctx)?;
    let body = match (&args.text, &args.hex) {
        (Some(t), _) => json!({"peer": args.peer, "text": t}),
        (None, Some(h)) => json!({"peer": args.peer, "hex": h}),
        (None, None) => return Err(CliError::usage("give the message text or --hex")),
    };
    let r: Value = api
        .send(api.request(reqwest::Method::POST, "/v1/send").json(&body))
        .await?;
    if ctx.json {
        print_json(&r);
        return Ok(());
    }
    match &r["delivery"] {
        Value::String(d) if d == "direct" => println!("delivered directly (seq {})", r["seq"]),
        d => {
            let held = strings(&d["deposited"]);
            println!(
                "recipient offline; held by {} mailbox(es): {} (seq {})",
                held.len(),
                held.join(", "),
                r["seq"]
            );
        }
    }
    Ok(())
}

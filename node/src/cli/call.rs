//! `skillmesh call <skill> --args <json | @file | ->`: call a skill on the network; with
//! `--stream`, print a stream skill's chunks as they arrive.

use std::io::{Read, Write};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use skillmesh::sse::SseParser;

use super::client::{Api, api_error};
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
    /// How long to wait, e.g. 30s (for a stream: for it to start).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Call a stream skill: print each chunk as it arrives (JSON chunks one per line, binary
    /// chunks as raw bytes). Ctrl-C cancels the call.
    #[arg(long, conflicts_with = "async_")]
    stream: bool,
    /// Call an async skill: print the call's id once it is accepted; follow it with
    /// `calls wait ID`, `calls show ID` or `calls cancel ID`.
    #[arg(long = "async", id = "async_")]
    async_: bool,
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
        "stream": args.stream,
        "async": args.async_,
    });
    if args.stream {
        return stream(ctx, &api, body).await;
    }
    let r: Value = api
        .send(api.request(reqwest::Method::POST, "/v1/call").json(&body))
        .await?;
    if ctx.json {
        print_json(&r);
    } else if args.async_ {
        println!("{}", r["call_id"].as_str().unwrap_or_default());
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&r["output"]).unwrap_or_default()
        );
    }
    Ok(())
}

/// Prints a stream's events as they come; the call's error, if it ends with one, is the
/// command's. Dropping the response (Ctrl-C) closes the connection, which cancels the call.
async fn stream(ctx: &Context, api: &Api, body: Value) -> Result<(), CliError> {
    let resp = api
        .send_raw(api.request(reqwest::Method::POST, "/v1/call").json(&body))
        .await?;
    let mut bytes = resp.bytes_stream();
    let mut parser = SseParser::new(4 * 1024 * 1024);
    let mut out = std::io::stdout().lock();
    let broke = |e: String| CliError::failure(format!("the stream broke: {e}"));
    loop {
        let next = tokio::select! {
            b = bytes.next() => b,
            _ = tokio::signal::ctrl_c() => return Err(CliError::failure("cancelled")),
        };
        let Some(b) = next else {
            return Err(broke("the node closed it before its end".to_owned()));
        };
        let b = b.map_err(|e| broke(e.to_string()))?;
        for r in parser.push(&b).map_err(broke)? {
            let data: Value = serde_json::from_str(&r.data).unwrap_or(Value::Null);
            match r.event.as_deref() {
                Some("started") if ctx.json => {
                    let _ = writeln!(out, "{}", json!({"started": data}));
                }
                Some("started") => eprintln!(
                    "call {} on {}",
                    data["call_id"].as_str().unwrap_or("?"),
                    data["peer_id"].as_str().unwrap_or("?")
                ),
                Some("chunk") if ctx.json => {
                    let _ = writeln!(out, "{}", json!({"chunk": data}));
                }
                Some("chunk") => {
                    let _ = writeln!(out, "{}", serde_json::to_string(&data).unwrap_or_default());
                }
                Some("bytes") => {
                    let raw = hex::decode(r.data.trim()).map_err(|e| broke(e.to_string()))?;
                    if ctx.json {
                        let _ = writeln!(out, "{}", json!({"bytes_hex": r.data.trim()}));
                    } else {
                        let _ = out.write_all(&raw);
                    }
                }
                Some("end") => {
                    if ctx.json {
                        let _ = writeln!(out, "{}", json!({"end": data}));
                    }
                    let _ = out.flush();
                    return Ok(());
                }
                Some("error") => {
                    let _ = out.flush();
                    return Err(api_error(&data));
                }
                _ => {}
            }
            let _ = out.flush();
        }
    }
}

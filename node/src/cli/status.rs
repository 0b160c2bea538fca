//! `skillmesh status` and `skillmesh peers`: what the running node knows.

use serde_json::Value;

use super::client::Api;
use super::{CliError, Context, print_json, strings};

pub(crate) async fn status(ctx: &Context) -> Result<(), CliError> {
    let api = Api::connect(ctx)?;
    let s: Value = api
        .send(api.request(reqwest::Method::GET, "/v1/status"))
        .await?;
    if ctx.json {
        print_json(&s);
        return Ok(());
    }
    println!("peer id:   {}", s["peer_id"].as_str().unwrap_or("?"));
    println!("name:      {}", s["name"].as_str().unwrap_or("?"));
    println!("mesh:      {}", s["mesh"].as_str().unwrap_or("?"));
    println!(
        "peers:     {} connected, {} known",
        s["connected_peers"], s["known_peers"]
    );
    for a in s["listen_addrs"].as_array().into_iter().flatten() {
        println!("listening: {}", a.as_str().unwrap_or("?"));
    }
    let nat = &s["nat"];
    let probes = &nat["probes"]["probes"];
    println!(
        "reach:     {}{}{}",
        nat["reachability"].as_str().unwrap_or("?"),
        match probes["sent"].as_u64() {
            Some(n) if n > 0 => format!(
                " ({} probes: {} reached, {} not reached, {} inconclusive)",
                n, probes["reached"], probes["not_reached"], probes["inconclusive"]
            ),
            _ => String::new(),
        },
        if nat["relay_server"].as_bool() == Some(true) {
            " (serving as a relay)"
        } else {
            ""
        }
    );
    for a in nat["probes"]["addrs"].as_array().into_iter().flatten() {
        println!(
            "probed:    {} {}",
            a["addr"].as_str().unwrap_or("?"),
            a["reach"].as_str().unwrap_or("?")
        );
    }
    match nat["relaying"].as_str() {
        Some("undecided") => println!("relaying:  reachability still unknown; reserving anyway"),
        Some(why) => println!("relaying:  {why}"),
        None => {}
    }
    for r in nat["reservations"].as_array().into_iter().flatten() {
        println!("reserved:  relay {}", r[0].as_str().unwrap_or("?"));
        for a in r[1].as_array().into_iter().flatten() {
            println!("           {}", a.as_str().unwrap_or("?"));
        }
    }
    for c in nat["connections"].as_array().into_iter().flatten() {
        let path = c["path"].as_str().unwrap_or("?");
        let how = match (path, c["punched_after_ms"].as_u64()) {
            ("relayed", _) => "relayed".to_owned(),
            ("hole-punched", Some(ms)) => format!("direct, hole-punched {ms} ms after relaying"),
            ("reversed", _) => "direct, dialed back after it came through a relay".to_owned(),
            (path, _) => format!("direct, {path}"),
        };
        println!(
            "conn:      {} {} ({})",
            c["peer"].as_str().unwrap_or("?"),
            c["addr"].as_str().unwrap_or("?"),
            how
        );
    }
    for m in s["mailboxes"].as_array().into_iter().flatten() {
        println!("mailbox:   {}", m.as_str().unwrap_or("?"));
    }
    println!("inbox:     {} waiting", s["inbox"]);
    for sk in s["skills"].as_array().into_iter().flatten() {
        println!(
            "serving:   {} {}",
            sk["name"].as_str().unwrap_or("?"),
            sk["version"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

pub(crate) async fn peers(ctx: &Context) -> Result<(), CliError> {
    let api = Api::connect(ctx)?;
    let peers: Value = api
        .send(api.request(reqwest::Method::GET, "/v1/peers"))
        .await?;
    if ctx.json {
        print_json(&peers);
        return Ok(());
    }
    let list = peers.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no peers yet");
    }
    for p in list {
        let skills = strings(&p["skills"]);
        println!(
            "{} {:<20} {:<10} {}",
            p["peer_id"].as_str().unwrap_or("?"),
            p["name"].as_str().unwrap_or("-"),
            if p["connected"].as_bool() == Some(true) {
                "connected"
            } else {
                "seen"
            },
            skills.join(", ")
        );
    }
    Ok(())
}

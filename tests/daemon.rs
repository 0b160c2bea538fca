//! Two real `skillmesh run` daemons on loopback, driven through the CLI as a user would.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::daemon::{BIN, Daemon, cli, json_out, one_line};

/// Exit codes documented in docs/cli.md.
const EXIT_USAGE: i32 = 2;
const EXIT_NO_DAEMON: i32 = 3;
const EXIT_NOT_FOUND: i32 = 4;
const EXIT_FAILED_CALL: i32 = 5;

const BASE: &str =
    "[network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\n[dht]\nmode = \"server\"\n";

fn serving_config() -> String {
    format!(
        "{BASE}[node]\nname = \"alice\"\n\n[[skills]]\nname = \"upper\"\nversion = \"1.0.0\"\ntags = [\"text\"]\n\
         command = [\"sh\", \"-c\", \"tr a-z A-Z\"]\ninput_schema = {{ type = \"object\", required = [\"text\"] }}\n\n\
         [[skills]]\nname = \"fail\"\nversion = \"1.0.0\"\ncommand = [\"sh\", \"-c\", \"echo broken >&2; exit 1\"]\n"
    )
}

fn retry(mut f: impl FnMut() -> Output) -> Output {
    let start = Instant::now();
    loop {
        let o = f();
        if o.status.success() || start.elapsed() > Duration::from_secs(10) {
            return o;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn two_daemons_find_and_call_through_the_cli() {
    let a = Daemon::start(&serving_config(), &[]);
    let b = Daemon::start(BASE, &["--bootstrap", &a.addr()]);
    let a_id = a.info["peer_id"].as_str().expect("id").to_owned();

    let found = json_out(&retry(|| b.cli(&["--json", "find", "upper"])));
    assert_eq!(found[0]["peer_id"], a_id.as_str());
    assert_eq!(found[0]["name"], "alice");
    let by_tag = json_out(&retry(|| b.cli(&["--json", "find", "--tag", "text"])));
    assert_eq!(by_tag[0]["skills"][0]["name"], "upper");

    // `tr` upper-cases the JSON text it is given.
    let out = json_out(&b.cli(&["--json", "call", "upper", "--args", r#"{"text":"hello"}"#]));
    assert_eq!(out["output"], serde_json::json!({"TEXT": "HELLO"}));
    assert_eq!(out["peer_id"], a_id.as_str());
    let args_file = b.dir.path().join("args.json");
    std::fs::write(&args_file, r#"{"text":"from a file"}"#).expect("write");
    let out = json_out(&b.cli(&[
        "--json",
        "call",
        "upper",
        "--peer",
        &a_id,
        "--args",
        &format!("@{}", args_file.display()),
    ]));
    assert_eq!(out["output"]["TEXT"], "FROM A FILE");

    // Refused by the callee: arguments fail its schema; a failing command.
    let o = b.cli(&["call", "upper", "--peer", &a_id, "--args", r#"{"nope":1}"#]);
    assert_eq!(o.status.code(), Some(EXIT_FAILED_CALL));
    assert!(one_line(&o).contains("invalid_args"));
    let o = b.cli(&["call", "fail", "--peer", &a_id]);
    assert_eq!(o.status.code(), Some(EXIT_FAILED_CALL));
    assert!(one_line(&o).contains("broken"));
    // Nobody serves it.
    let o = b.cli(&["call", "no-such-skill"]);
    assert_eq!(o.status.code(), Some(EXIT_NOT_FOUND));
    one_line(&o);
    // Bad --args JSON never reaches the network.
    let o = b.cli(&["call", "upper", "--args", "{not json"]);
    assert_eq!(o.status.code(), Some(EXIT_USAGE));
    assert!(one_line(&o).contains("not valid JSON"));

    // Skills added at run time are served and found.
    let o = b.cli(&["skills", "add", "echo", "--tag", "misc", "--", "cat"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = json_out(&retry(|| {
        a.cli(&["--json", "call", "echo", "--args", r#"{"x":[1,2]}"#])
    }));
    assert_eq!(out["output"], serde_json::json!({"x": [1, 2]}));
    let o = b.cli(&["skills", "remove", "echo"]);
    assert!(o.status.success());

    // Status and peers.
    let s = json_out(&a.cli(&["--json", "status"]));
    assert_eq!(s["peer_id"], a_id.as_str());
    assert_eq!(s["skills"].as_array().map(Vec::len), Some(2));
    let peers = json_out(&retry(|| b.cli(&["--json", "peers"])));
    assert!(
        peers
            .as_array()
            .expect("list")
            .iter()
            .any(|p| p["peer_id"] == a_id.as_str())
    );

    b.stop();
    a.stop();
}

#[test]
fn events_flow_between_daemons() {
    let a = Daemon::start(BASE, &[]);
    let b = Daemon::start(BASE, &["--bootstrap", &a.addr()]);
    let mut sub = Command::new(BIN)
        .arg("--data-dir")
        .arg(a.dir.path())
        .args(["--json", "events", "sub", "news", "--count", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("sub");
    // B publishes until A's subscriber has its event: the subscription takes a moment to
    // reach B, and an event published before it may go to nobody.
    let start = Instant::now();
    loop {
        let o = b.cli(&["events", "pub", "news", r#"{"headline":"p2p"}"#]);
        if sub.try_wait().expect("sub").is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = sub.kill();
            panic!(
                "no event within 20 s; last publish: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = sub.wait_with_output().expect("sub output");
    let line: Value = serde_json::from_slice(&out.stdout).expect("one event as JSON");
    assert_eq!(line["data"]["headline"], "p2p");
    assert_eq!(line["publisher"], b.info["peer_id"]);
}

#[test]
fn user_errors_are_one_clear_line() {
    // No daemon running for this data dir.
    let dir = tempfile::tempdir().expect("tempdir");
    let o = cli(dir.path(), &["status"]);
    assert_eq!(o.status.code(), Some(EXIT_NO_DAEMON));
    assert!(one_line(&o).contains("skillmesh run"));
    let o = cli(dir.path(), &["call", "upper", "--args", "{}"]);
    assert_eq!(o.status.code(), Some(EXIT_NO_DAEMON));

    // A corrupt config file.
    std::fs::write(dir.path().join("config.toml"), "[network\nlisten = 3").expect("write");
    let o = cli(dir.path(), &["run"]);
    assert_eq!(o.status.code(), Some(EXIT_USAGE));
    assert!(one_line(&o).contains("config.toml"));
    // A skill declared without a backing names its key.
    std::fs::write(
        dir.path().join("config.toml"),
        format!("{BASE}[[skills]]\nname = \"x\"\nversion = \"1.0.0\"\n"),
    )
    .expect("write");
    let o = cli(dir.path(), &["run"]);
    assert_eq!(o.status.code(), Some(EXIT_USAGE));
    assert!(one_line(&o).contains("skills[0].command"));

    // A port already in use.
    let a = Daemon::start(BASE, &[]);
    let port_addr = a.addr().split("/p2p/").next().expect("addr").to_owned();
    std::fs::write(dir.path().join("config.toml"), BASE).expect("write");
    let o = cli(dir.path(), &["-q", "run", "--listen", &port_addr]);
    assert_eq!(o.status.code(), Some(1));
    assert!(one_line(&o).contains("in use"));
    // A second node on a data dir whose node is running is refused in one line.
    let o = cli(a.dir.path(), &["-q", "run"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(one_line(&o).contains("already running"));
    drop(a);
    // A stale address file (a node that crashed) does not stop a new node.
    let stale = tempfile::tempdir().expect("tempdir");
    std::fs::write(stale.path().join("api.addr"), "127.0.0.1:1").expect("write");
    {
        std::fs::write(stale.path().join("config.toml"), BASE).expect("write");
        let mut child = Command::new(BIN)
            .arg("--data-dir")
            .arg(stale.path())
            .args(["-q", "run"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let start = Instant::now();
        while std::fs::read_to_string(stale.path().join("api.addr"))
            .map_or(true, |a| a.trim() == "127.0.0.1:1")
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the new node never wrote its address"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().expect("wait");
    }
    // Usage errors are clap's, exit 2.
    let o = cli(dir.path(), &["call"]);
    assert_eq!(o.status.code(), Some(EXIT_USAGE));
}

#[test]
fn a_skill_backed_by_a_local_http_endpoint_is_served() {
    // A tiny agent written "in another language": an HTTP endpoint on loopback.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(async {
        use axum::{Json, Router, routing::post};
        let app = Router::new()
            .route(
                "/reverse",
                post(|Json(v): Json<Value>| async move {
                    let s: String = v["text"].as_str().unwrap_or("").chars().rev().collect();
                    Json(serde_json::json!({ "text": s }))
                }),
            )
            .route(
                "/broken",
                post(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "db down") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    });
    let a = Daemon::start(BASE, &[]);
    let b = Daemon::start(BASE, &["--bootstrap", &a.addr()]);
    let reverse = format!("{url}/reverse");
    let o = a.cli(&["skills", "add", "reverse", "--http", &reverse]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = json_out(&retry(|| {
        b.cli(&["--json", "call", "reverse", "--args", r#"{"text":"abc"}"#])
    }));
    assert_eq!(out["output"]["text"], "cba");

    let broken = format!("{url}/broken");
    let o = a.cli(&["skills", "add", "broken", "--http", &broken]);
    assert!(o.status.success());
    let a_id = a.info["peer_id"].as_str().expect("id");
    let o = b.cli(&["call", "broken", "--peer", a_id]);
    assert_eq!(o.status.code(), Some(EXIT_FAILED_CALL));
    assert!(one_line(&o).contains("db down"));
    drop(rt);
}

#[test]
fn mail_between_daemons_with_send_and_inbox() {
    let relay = Daemon::start(BASE, &["--relay"]);
    let mailbox = format!("{}\n[mail]\nmailboxes = [\"{}\"]\n", BASE, relay.addr());
    let a = Daemon::start(&mailbox, &["--bootstrap", &relay.addr()]);
    let b = Daemon::start(&mailbox, &["--bootstrap", &relay.addr()]);
    let b_id = b.info["peer_id"].as_str().expect("id").to_owned();

    let s = json_out(&relay.cli(&["--json", "status"]));
    assert_eq!(s["nat"]["relay_server"], true);
    // Direct while b runs.
    let sent = json_out(&retry(|| a.cli(&["--json", "send", &b_id, "hello b"])));
    assert_eq!(sent["delivery"], "direct");
    let got = json_out(&b.cli(&["--json", "inbox", "--wait", "5"]));
    assert_eq!(got["text"], "hello b");
    assert_eq!(got["from"], a.info["peer_id"]);
    // Taken once: a second look finds nothing.
    let o = b.cli(&["inbox"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "no messages");

    // Bad input is a usage error and sends nothing.
    let o = a.cli(&["send", "not-a-peer-id", "x"]);
    assert_eq!(o.status.code(), Some(EXIT_USAGE));
    one_line(&o);
}

/// The README walkthrough as a user runs it: defaults (DHT mode `auto`, two connections per
/// peer) but for mDNS and a quicker recheck of reachability. A public node must stay public
/// through its rechecks, so it keeps serving the DHT, and a node that knows only it and joins
/// late still finds the skill. (Before: one refused dial-back made it private, a DHT client,
/// and `find` failed 20 s in.)
#[test]
fn a_public_node_stays_public_and_a_late_joiner_finds_through_it() {
    let walkthrough = "[network]\nmdns = false\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n[nat]\nprobe_interval = \"10s\"\n";
    let a = Daemon::start(
        &format!(
            "{walkthrough}\n[[skills]]\nname = \"upper\"\nversion = \"1.0.0\"\ncommand = [\"sh\", \"-c\", \"tr a-z A-Z\"]\n"
        ),
        &[],
    );
    let b = Daemon::start(walkthrough, &["--bootstrap", &a.addr()]);
    let status = |d: &Daemon| json_out(&d.cli(&["--json", "status"]));
    // Three rounds: decided, then checked again twice.
    let start = Instant::now();
    let s = loop {
        let s = status(&a);
        if s["nat"]["probes"]["probes"]["reached"].as_u64() >= Some(4) {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "A's probes did not come back: {}",
            s["nat"]
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(s["nat"]["reachability"], "public", "{}", s["nat"]);
    assert_eq!(
        s["nat"]["probes"]["probes"]["not_reached"], 0,
        "{}",
        s["nat"]
    );
    assert!(s["nat"]["relaying"].is_null());
    // Its card carries what others on this host can use, and nothing else.
    let found = json_out(&retry(|| b.cli(&["--json", "find", "upper"])));
    for addr in found[0]["addrs"].as_array().expect("addrs") {
        assert!(
            addr.as_str()
                .is_some_and(|a| a.starts_with("/ip4/127.0.0.1/")),
            "{addr}"
        );
    }
    // A late joiner that knows only A finds the skill through it (A still serves the DHT).
    let c = Daemon::start(walkthrough, &["--bootstrap", &a.addr()]);
    let found = json_out(&retry(|| c.cli(&["--json", "find", "upper"])));
    assert_eq!(found[0]["peer_id"], a.info["peer_id"]);
    let out = json_out(&c.cli(&["--json", "call", "upper", "--args", r#"{"text":"late"}"#]));
    assert_eq!(out["output"]["TEXT"], "LATE");
    assert_eq!(status(&a)["nat"]["reachability"], "public");
}

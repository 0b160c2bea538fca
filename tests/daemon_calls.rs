//! Streamed calls and cancellation between two real `skillmesh run` daemons, through the CLI:
//! chunks printed as they arrive, the call log on both sides, Ctrl-C and `calls cancel`
//! stopping the callee's command.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::daemon::{BIN, Daemon, json_out};

const BASE: &str =
    "[network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\n[dht]\nmode = \"server\"\n";

/// Waits for `f` to hold, up to `within`.
fn until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The newest call log entry of `d` for `skill` on side `direction`.
fn entry(d: &Daemon, skill: &str, direction: &str) -> Option<Value> {
    let log = json_out(&d.cli(&["--json", "calls", "list", "--limit", "50"]));
    log.as_array()?
        .iter()
        .find(|e| e["skill"] == skill && e["direction"] == direction)
        .cloned()
}

fn pid_gone(pidfile: &std::path::Path) -> bool {
    let pid = std::fs::read_to_string(pidfile).expect("pidfile");
    !std::path::Path::new(&format!("/proc/{}", pid.trim())).exists()
}

#[test]
fn a_stream_skill_prints_its_chunks_and_a_cancel_stops_its_command() {
    let work = tempfile::tempdir().expect("tempdir");
    let pids = work.path().display().to_string();
    let config = format!(
        "{BASE}[[skills]]\nname = \"ticks\"\nversion = \"1.0.0\"\nmode = \"stream\"\n\
         command = [\"sh\", \"-c\", \"for i in 1 2 3; do echo \\\"{{\\\\\\\"i\\\\\\\": $i}}\\\"; done\"]\n\n\
         [[skills]]\nname = \"later\"\nversion = \"1.0.0\"\nmode = \"async\"\n\
         command = [\"sh\", \"-c\", \"sleep 0.3; cat\"]\n\n\
         [[skills]]\nname = \"forever\"\nversion = \"1.0.0\"\nmode = \"stream\"\ntimeout = \"120s\"\n\
         command = [\"sh\", \"-c\", \"echo $$ > {pids}/$SKILLMESH_CALL_ID; while :; do echo 1; sleep 0.1; done\"]\n"
    );
    let a = Daemon::start(&config, &[]);
    let b = Daemon::start(BASE, &["--bootstrap", &a.addr()]);
    let a_id = a.info["peer_id"].as_str().expect("id").to_owned();

    // The chunks, one JSON value per line, in order.
    let start = Instant::now();
    let out = loop {
        let o = b.cli(&["call", "ticks", "--stream"]);
        if o.status.success() || start.elapsed() > Duration::from_secs(10) {
            break o;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"i\":1}\n{\"i\":2}\n{\"i\":3}\n"
    );
    for (d, dir) in [(&b, "outbound"), (&a, "inbound")] {
        until(Duration::from_secs(5), "the stream is logged", || {
            entry(d, "ticks", dir).is_some_and(|e| e["state"] == "completed")
        });
        let e = entry(d, "ticks", dir).expect("entry");
        assert_eq!(e["mode"], "stream");
        let states: Vec<_> = e["history"]
            .as_array()
            .expect("history")
            .iter()
            .map(|t| t["state"].as_str().unwrap_or("").to_owned())
            .collect();
        assert_eq!(states, ["submitted", "working", "completed"], "{dir}");
    }

    // Ctrl-C on the caller cancels the call; the callee's command is gone within the grace.
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(b.dir.path())
        .args(["--json", "call", "forever", "--stream", "--peer", &a_id])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let started: Value =
        serde_json::from_str(&lines.next().expect("a line").expect("read")).expect("json");
    let id = started["started"]["call_id"]
        .as_str()
        .expect("call id")
        .to_owned();
    for _ in 0..3 {
        let chunk: Value =
            serde_json::from_str(&lines.next().expect("a chunk").expect("read")).expect("json");
        assert_eq!(chunk["chunk"], 1);
    }
    let pidfile = work.path().join(&id);
    assert!(!pid_gone(&pidfile), "the command runs");
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(
        !child.wait().expect("wait").success(),
        "Ctrl-C is not a success"
    );
    until(Duration::from_secs(7), "the command is gone", || {
        pid_gone(&pidfile)
    });
    for (d, dir) in [(&b, "outbound"), (&a, "inbound")] {
        until(Duration::from_secs(5), "both sides say canceled", || {
            entry(d, "forever", dir).is_some_and(|e| e["state"] == "canceled")
        });
    }

    // `calls cancel` from another process; `calls wait` then reports it.
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(b.dir.path())
        .args(["--json", "call", "forever", "--stream", "--peer", &a_id])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let started: Value =
        serde_json::from_str(&lines.next().expect("a line").expect("read")).expect("json");
    let id = started["started"]["call_id"]
        .as_str()
        .expect("call id")
        .to_owned();
    let cancel = b.cli(&["calls", "cancel", &id]);
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    let status = child.wait().expect("wait");
    assert_eq!(
        status.code(),
        Some(5),
        "the stream ends with the callee's cancelled"
    );
    let wait = b.cli(&["--json", "calls", "wait", &id, "--timeout", "10s"]);
    assert_eq!(wait.status.code(), Some(5), "not completed");
    let shown: Value = serde_json::from_slice(&wait.stdout).expect("json");
    assert_eq!(shown["sides"][0]["state"], "canceled");
    until(Duration::from_secs(7), "the command is gone", || {
        pid_gone(&work.path().join(&id))
    });
    // Async: the id at once, the result through `calls wait`.
    let o = b.cli(&["call", "later", "--async", "--args", r#"{"x":1}"#]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert_eq!(id.len(), 32, "a call id: {id}");
    // Found at once by another process: the call is logged before its id is printed.
    let shown = json_out(&b.cli(&["--json", "calls", "show", &id]));
    assert_eq!(shown["sides"][0]["mode"], "async");
    let waited = json_out(&b.cli(&["--json", "calls", "wait", &id, "--timeout", "20s"]));
    assert_eq!(waited["sides"][0]["state"], "completed");
    assert_eq!(waited["sides"][0]["output"], serde_json::json!({"x": 1}));
    assert_eq!(waited["sides"][0]["mode"], "async");

    // A call id that is not ours: a clear error.
    let o = b.cli(&["calls", "cancel", "00000000000000000000000000000000"]);
    assert_eq!(o.status.code(), Some(4));
    let o = b.cli(&["calls", "show", "nope"]);
    assert_eq!(o.status.code(), Some(2));
}

//! A real NAT topology in Linux network namespaces, made and removed by the test:
//!
//! ```text
//!   nsA 192.168.1.2 ── rA (MASQUERADE) 10.77.0.2 ─┐
//!                                                 inet: bridge 10.77.0.1 = relay
//!   nsB 192.168.2.2 ── rB (MASQUERADE) 10.77.0.3 ─┘
//! ```
//!
//! Two daemons behind their own NAT find each other through the DHT on the relay, call each
//! other's skill and exchange mail; AutoNAT must find them unreachable on its own. The test
//! reports whether DCUtR turned the relayed connection into a direct one.
//!
//! It needs root, `ip` and `iptables` (`.ci/run` installs iptables); without them it says why
//! and skips.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, json_out};
use serde_json::Value;

/// The namespaces of one run, deleted on drop (which removes their links too).
struct Topology {
    names: Vec<String>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v)
}

/// Why this machine cannot run the test, if it cannot.
fn unsupported() -> Option<String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if uid != "0" {
        return Some(format!("not root (uid {uid})"));
    }
    for tool in ["ip", "iptables"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

fn build(tag: &str) -> Result<Topology, String> {
    let ns = |n: &str| format!("sm{tag}{n}");
    let topo = Topology {
        names: ["inet", "ra", "rb", "a", "b"]
            .iter()
            .map(|n| ns(n))
            .collect(),
    };
    for n in &topo.names {
        sh(&["ip", "netns", "add", n])?;
        in_ns(n, &["ip", "link", "set", "lo", "up"])?;
    }
    let (inet, ra, rb, a, b) = (ns("inet"), ns("ra"), ns("rb"), ns("a"), ns("b"));
    in_ns(&inet, &["ip", "link", "add", "br0", "type", "bridge"])?;
    in_ns(&inet, &["ip", "addr", "add", "10.77.0.1/24", "dev", "br0"])?;
    in_ns(&inet, &["ip", "link", "set", "br0", "up"])?;
    for (router, wan_ip, host, lan) in [
        (&ra, "10.77.0.2/24", &a, "1"),
        (&rb, "10.77.0.3/24", &b, "2"),
    ] {
        // WAN: router <-> the bridge in inet.
        sh(&[
            "ip",
            "link",
            "add",
            "wan",
            "netns",
            router,
            "type",
            "veth",
            "peer",
            "name",
            &format!("br{lan}"),
            "netns",
            &inet,
        ])?;
        in_ns(
            &inet,
            &[
                "ip",
                "link",
                "set",
                &format!("br{lan}"),
                "master",
                "br0",
                "up",
            ],
        )?;
        in_ns(router, &["ip", "addr", "add", wan_ip, "dev", "wan"])?;
        in_ns(router, &["ip", "link", "set", "wan", "up"])?;
        // LAN: router <-> host.
        sh(&[
            "ip", "link", "add", "lan", "netns", router, "type", "veth", "peer", "name", "eth0",
            "netns", host,
        ])?;
        in_ns(
            router,
            &[
                "ip",
                "addr",
                "add",
                &format!("192.168.{lan}.1/24"),
                "dev",
                "lan",
            ],
        )?;
        in_ns(router, &["ip", "link", "set", "lan", "up"])?;
        in_ns(
            host,
            &[
                "ip",
                "addr",
                "add",
                &format!("192.168.{lan}.2/24"),
                "dev",
                "eth0",
            ],
        )?;
        in_ns(host, &["ip", "link", "set", "eth0", "up"])?;
        in_ns(
            host,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &format!("192.168.{lan}.1"),
            ],
        )?;
        // The NAT: masquerade outbound, drop unsolicited inbound.
        in_ns(router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        in_ns(
            router,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "wan",
                "-j",
                "MASQUERADE",
            ],
        )?;
        in_ns(
            router,
            &[
                "iptables",
                "-A",
                "FORWARD",
                "-i",
                "wan",
                "-o",
                "lan",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ],
        )?;
        in_ns(
            router,
            &[
                "iptables", "-A", "FORWARD", "-i", "wan", "-o", "lan", "-j", "DROP",
            ],
        )?;
    }
    Ok(topo)
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> Option<Value>) -> Value {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

const BASE: &str = "[network]\nmdns = false\n";

#[test]
fn two_nodes_behind_their_own_nat_meet_through_a_relay() {
    if let Some(why) = unsupported() {
        eprintln!("skipped: the NAT test needs root, ip and iptables ({why})");
        return;
    }
    let tag = format!("{}", std::process::id() % 100_000);
    let _topo = match build(&tag) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipped: cannot build the namespaces ({e})");
            return;
        }
    };
    let ns = |n: &str| format!("sm{tag}{n}");

    let relay = Daemon::start_in(
        Some(&ns("inet")),
        &format!(
            "{BASE}listen = [\"/ip4/10.77.0.1/tcp/4001\", \"/ip4/10.77.0.1/udp/4001/quic-v1\"]\n[dht]\nmode = \"server\"\n[nat]\nreachability = \"public\"\n"
        ),
        &["--relay"],
    );
    let relay_addr = relay.addr();
    let agent = |name: &str, skill: bool| {
        let mut c = format!(
            "[node]\nname = \"{name}\"\n{BASE}listen = [\"/ip4/0.0.0.0/tcp/4001\", \"/ip4/0.0.0.0/udp/4001/quic-v1\"]\n\
             bootstrap = [\"{relay_addr}\"]\n[nat]\nreachability = \"auto\"\nrelays = [\"{relay_addr}\"]\n\
             [mail]\nmailboxes = [\"{relay_addr}\"]\nfetch_interval = \"1s\"\ndirect_timeout = \"3s\"\n"
        );
        if skill {
            c.push_str("\n[[skills]]\nname = \"upper\"\nversion = \"1.0.0\"\ncommand = [\"sh\", \"-c\", \"tr a-z A-Z\"]\n");
        }
        c
    };
    let a = Daemon::start_in(Some(&ns("a")), &agent("alice", true), &[]);
    let b = Daemon::start_in(Some(&ns("b")), &agent("bob", false), &[]);
    let o = b.cli(&["skills", "add", "echo", "--", "cat"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a_id = a.info["peer_id"].as_str().expect("id").to_owned();
    let b_id = b.info["peer_id"].as_str().expect("id").to_owned();

    // AutoNAT finds each unreachable on its own; each then reserves a slot on the relay.
    for (name, d) in [("alice", &a), ("bob", &b)] {
        wait_for(
            &format!("{name} private with a reservation"),
            Duration::from_secs(40),
            || {
                let s = json_out(&d.cli(&["--json", "status"]));
                let ok = s["nat"]["reachability"] == "private"
                    && s["nat"]["reservations"]
                        .as_array()
                        .is_some_and(|r| !r.is_empty());
                ok.then_some(s)
            },
        );
    }

    // Bob finds Alice's skill through the DHT and calls it through the relay (or directly).
    let found = wait_for("bob finds upper", Duration::from_secs(30), || {
        let o = b.cli(&["--json", "find", "upper"]);
        o.status.success().then(|| json_out(&o))
    });
    assert_eq!(found[0]["peer_id"], a_id.as_str());
    // Then calls Alice's skill: through the relay circuit (or directly, once hole punched).
    let out = wait_for("bob calls alice", Duration::from_secs(30), || {
        let o = b.cli(&[
            "--json",
            "call",
            "upper",
            "--peer",
            &a_id,
            "--args",
            r#"{"text":"through the nat"}"#,
        ]);
        o.status.success().then(|| json_out(&o))
    });
    assert_eq!(out["output"]["TEXT"], "THROUGH THE NAT");
    let out = wait_for("alice calls bob's echo", Duration::from_secs(30), || {
        let o = a.cli(&[
            "--json",
            "call",
            "echo",
            "--peer",
            &b_id,
            "--args",
            r#"{"back":true}"#,
        ]);
        o.status.success().then(|| json_out(&o))
    });
    assert_eq!(out["output"]["back"], true);

    // Mail both ways.
    let sent = json_out(&b.cli(&["--json", "send", &a_id, "hello alice"]));
    assert!(sent["delivery"].is_string() || sent["delivery"]["deposited"].is_array());
    let got = json_out(&a.cli(&["--json", "inbox", "--wait", "20"]));
    assert_eq!(got["text"], "hello alice");
    let _ = json_out(&a.cli(&["--json", "send", &b_id, "hello bob"]));
    let got = json_out(&b.cli(&["--json", "inbox", "--wait", "20"]));
    assert_eq!(got["text"], "hello bob");

    // Give DCUtR a moment, then report how each reaches the other.
    std::thread::sleep(Duration::from_secs(5));
    for (name, d, other) in [("bob", &b, &a_id), ("alice", &a, &b_id)] {
        let s = json_out(&d.cli(&["--json", "status"]));
        let conns: Vec<&Value> = s["nat"]["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["peer"] == other.as_str())
            .collect();
        let direct = conns.iter().any(|c| c["relayed"] == false);
        println!(
            "DCUtR: {name} -> {} (hole punches ok/failed: {}); {} connection(s)",
            if direct { "DIRECT" } else { "still relayed" },
            s["nat"]["hole_punches"],
            conns.len()
        );
    }
}

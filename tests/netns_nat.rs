//! NAT traversal between real daemons in Linux network namespaces that the test makes and
//! removes, with routers that behave like home routers: they translate outbound traffic and
//! silently drop what nobody inside asked for (RFC 4787 / RFC 5382 filtering), packets to
//! the router itself included.
//!
//! ```text
//!                       inet: bridge 198.18.0.0/24
//!     relay 198.18.0.1 ──┤
//!      pub  198.18.0.4 ──┤ (a public host, no NAT)
//!  a 192.168.1.2 ── ra ──┤ 198.18.0.2  endpoint-independent mapping (MASQUERADE)
//!  b 192.168.2.2 ── rb ──┤ 198.18.0.3  endpoint-independent mapping
//!  c 192.168.3.2 ── rc ──┤ 198.18.0.5  endpoint-dependent mapping (MASQUERADE --random-fully)
//!  d 192.168.4.2 ── rd ──┘ 198.18.0.6  endpoint-independent, joins late
//! ```
//!
//! What each pair must do, over TCP and over QUIC (one test each, every node on one transport):
//! a public node is reached directly at once; two nodes behind endpoint-independent NATs
//! (a, b; later d and a) turn their relayed connection into a direct one with DCUtR; a node
//! behind an endpoint-dependent NAT (c) stays relayed, and calls, events and mail still work.
//! Reachability: over QUIC a node behind NAT finds itself private (a dial-back into the NAT
//! fails in the server's QUIC handshake); over TCP the server's dial-back outlasts its own
//! timeout, so the node stays undecided and reserves on the relay after 30 s anyway.
//!
//! It needs root, `ip` and `iptables` (`.ci/run` installs them). Without them it says why and
//! is skipped, except under CI (`CI=true`), where that is a failure.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, command, json_out};
use serde_json::Value;

/// The namespaces of one run, deleted on drop (which removes their links too).
struct Topology {
    tag: String,
    names: Vec<String>,
}

impl Topology {
    fn ns(&self, n: &str) -> String {
        format!("sm{}{n}", self.tag)
    }
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

fn in_ns(ns: &str, cmd: &str) -> Result<(), String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend(cmd.split_whitespace());
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

/// Skips the test with a message, or fails it under CI.
fn skip_unless_supported() -> bool {
    let Some(why) = unsupported() else {
        return false;
    };
    let msg = format!("the NAT matrix needs root, ip and iptables: {why}");
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "{msg} (under CI a skipped test is a failure)"
    );
    eprintln!("skipped: {msg}");
    true
}

#[derive(Clone, Copy, PartialEq)]
enum Mapping {
    /// Endpoint-independent: the same outside port for every destination.
    Independent,
    /// Endpoint-dependent: a random outside port per destination.
    Dependent,
}

/// A host on the bridge (`router` none) or behind a NAT router.
fn attach(
    t: &Topology,
    host: &str,
    wan_ip: &str,
    nat: Option<(&str, u8, Mapping)>,
) -> Result<(), String> {
    let inet = t.ns("inet");
    let tag = &t.tag;
    let Some((router, lan, mapping)) = nat else {
        // Straight on the bridge: a public host.
        let (dev, port) = (format!("e{tag}{host}"), format!("p{tag}{host}"));
        sh(&[
            "ip",
            "link",
            "add",
            &dev,
            "netns",
            &t.ns(host),
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &inet,
        ])?;
        in_ns(&inet, &format!("ip link set {port} master br0 up"))?;
        in_ns(&t.ns(host), &format!("ip addr add {wan_ip}/24 dev {dev}"))?;
        in_ns(&t.ns(host), &format!("ip link set {dev} up"))?;
        return Ok(());
    };
    let r = t.ns(router);
    let h = t.ns(host);
    let (wan, port, lan_dev, eth) = (
        format!("w{tag}{router}"),
        format!("p{tag}{router}"),
        format!("l{tag}{router}"),
        format!("e{tag}{router}"),
    );
    sh(&[
        "ip", "link", "add", &wan, "netns", &r, "type", "veth", "peer", "name", &port, "netns",
        &inet,
    ])?;
    in_ns(&inet, &format!("ip link set {port} master br0 up"))?;
    in_ns(&r, &format!("ip addr add {wan_ip}/24 dev {wan}"))?;
    in_ns(&r, &format!("ip link set {wan} up"))?;
    sh(&[
        "ip", "link", "add", &lan_dev, "netns", &r, "type", "veth", "peer", "name", &eth, "netns",
        &h,
    ])?;
    in_ns(&r, &format!("ip addr add 192.168.{lan}.1/24 dev {lan_dev}"))?;
    in_ns(&r, &format!("ip link set {lan_dev} up"))?;
    in_ns(&h, &format!("ip addr add 192.168.{lan}.2/24 dev {eth}"))?;
    in_ns(&h, &format!("ip link set {eth} up"))?;
    in_ns(&h, &format!("ip route add default via 192.168.{lan}.1"))?;
    in_ns(&r, "sysctl -qw net.ipv4.ip_forward=1")?;
    let masquerade = match mapping {
        Mapping::Independent => format!("iptables -t nat -A POSTROUTING -o {wan} -j MASQUERADE"),
        Mapping::Dependent => {
            format!("iptables -t nat -A POSTROUTING -o {wan} -j MASQUERADE --random-fully")
        }
    };
    in_ns(&r, &masquerade)?;
    // Filtering: answers to what went out come in; nothing else, and nothing is answered.
    in_ns(
        &r,
        &format!(
            "iptables -A FORWARD -i {wan} -o {lan_dev} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
        ),
    )?;
    in_ns(
        &r,
        &format!("iptables -A FORWARD -i {wan} -o {lan_dev} -j DROP"),
    )?;
    in_ns(
        &r,
        &format!("iptables -A INPUT -i {wan} -m conntrack --ctstate NEW,INVALID -j DROP"),
    )?;
    Ok(())
}

fn build(tag: &str) -> Result<Topology, String> {
    let t = Topology {
        tag: tag.to_owned(),
        names: ["inet", "pub", "ra", "rb", "rc", "rd", "a", "b", "c", "d"]
            .iter()
            .map(|n| format!("sm{tag}{n}"))
            .collect(),
    };
    for n in &t.names {
        sh(&["ip", "netns", "add", n])?;
        in_ns(n, "ip link set lo up")?;
    }
    let inet = t.ns("inet");
    in_ns(&inet, "ip link add br0 type bridge")?;
    in_ns(&inet, "ip addr add 198.18.0.1/24 dev br0")?;
    in_ns(&inet, "ip link set br0 up")?;
    attach(&t, "pub", "198.18.0.4", None)?;
    attach(&t, "a", "198.18.0.2", Some(("ra", 1, Mapping::Independent)))?;
    attach(&t, "b", "198.18.0.3", Some(("rb", 2, Mapping::Independent)))?;
    attach(&t, "c", "198.18.0.5", Some(("rc", 3, Mapping::Dependent)))?;
    attach(&t, "d", "198.18.0.6", Some(("rd", 4, Mapping::Independent)))?;
    Ok(t)
}

fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if start.elapsed() >= within => panic!("not within {within:?}: {what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Net {
    Tcp,
    Quic,
    /// Both: reservations must use QUIC.
    Both,
}

impl Net {
    fn listen(self, ip: &str) -> String {
        match self {
            Net::Tcp => format!("\"/ip4/{ip}/tcp/4001\""),
            Net::Quic => format!("\"/ip4/{ip}/udp/4001/quic-v1\""),
            Net::Both => format!("\"/ip4/{ip}/tcp/4001\", \"/ip4/{ip}/udp/4001/quic-v1\""),
        }
    }
}

struct Node {
    name: &'static str,
    daemon: Daemon,
    id: String,
}

impl Node {
    fn status(&self) -> Value {
        json_out(&self.daemon.cli(&["--json", "status"]))["nat"].clone()
    }

    /// This node's connections to `peer`.
    fn conns(&self, peer: &Node) -> Vec<Value> {
        self.status()["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["peer"] == peer.id.as_str())
            .cloned()
            .collect()
    }

    /// Finds `skill`, then calls it on `peer`, retrying while the DHT settles.
    fn call(&self, skill: &str, peer: &Node) -> Value {
        wait_for(
            &format!("{} calls {skill} on {}", self.name, peer.name),
            Duration::from_secs(45),
            || {
                let o = self.daemon.cli(&[
                    "--json",
                    "call",
                    skill,
                    "--peer",
                    &peer.id,
                    "--args",
                    r#"{"from":"x"}"#,
                ]);
                if o.status.success() {
                    Ok(json_out(&o))
                } else {
                    Err(String::from_utf8_lossy(&o.stderr).into_owned())
                }
            },
        )
    }
}

fn start(t: &Topology, ns: &str, name: &'static str, config: String, extra: &[&str]) -> Node {
    let daemon = Daemon::start_in(Some(&t.ns(ns)), &config, extra);
    let id = daemon.info["peer_id"].as_str().expect("id").to_owned();
    Node { name, daemon, id }
}

fn agent(name: &str, net: Net, relay: &str) -> String {
    format!(
        "[node]\nname = \"{name}\"\n[network]\nmdns = false\nlisten = [{}]\nbootstrap = [\"{relay}\"]\n\
         [nat]\nreachability = \"auto\"\nrelays = [\"{relay}\"]\n\
         [mail]\nmailboxes = [\"{relay}\"]\nfetch_interval = \"1s\"\ndirect_timeout = \"3s\"\n\
         [[skills]]\nname = \"echo-{name}\"\nversion = \"1.0.0\"\ncommand = [\"cat\"]\n",
        net.listen("0.0.0.0")
    )
}

/// Waits until `n` holds a reservation, and returns why it reserves.
fn reserved(n: &Node) -> String {
    wait_for(
        &format!("{} reserves on the relay", n.name),
        Duration::from_secs(60),
        || {
            let s = n.status();
            let held = s["reservations"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|r| r[1].as_array().is_some_and(|a| !a.is_empty()))
            });
            match s["relaying"].as_str() {
                Some(why) if held => Ok(why.to_owned()),
                _ => Err(format!("{s}")),
            }
        },
    )
}

/// Waits until `a` and `b` hold a direct connection (either side may see the hole punch);
/// returns the milliseconds from relayed to direct, where a side measured them.
fn punched(a: &Node, b: &Node) -> Option<u64> {
    wait_for(
        &format!("{} and {} connect directly", a.name, b.name),
        Duration::from_secs(45),
        || {
            for (x, y) in [(a, b), (b, a)] {
                let conns = x.conns(y);
                if let Some(c) = conns.iter().find(|c| c["path"] == "hole-punched") {
                    return Ok(c["punched_after_ms"].as_u64());
                }
                if let Some(c) = conns.iter().find(|c| c["relayed"] == false) {
                    return Err(format!("direct, but not hole-punched: {c}"));
                }
            }
            Err(format!("{:?}", a.conns(b)))
        },
    )
}

/// Runs `events sub` in the background and returns its output once it exits.
fn subscribe(n: &Node, topic: &str) -> Child {
    command(n.daemon.netns.as_deref())
        .arg("--data-dir")
        .arg(n.daemon.dir.path())
        .args(["--json", "events", "sub", topic, "--count", "1"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("events sub")
}

fn output_within(mut child: Child, within: Duration) -> String {
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            let mut out = String::new();
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            return out;
        }
        if start.elapsed() >= within {
            let _ = child.kill();
            panic!("no event within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn matrix(net: Net) {
    if skip_unless_supported() {
        return;
    }
    let tag = format!(
        "{}{}",
        std::process::id() % 10_000,
        match net {
            Net::Tcp => "t",
            Net::Quic => "q",
            Net::Both => "x",
        }
    );
    let t = build(&tag).unwrap_or_else(|e| panic!("cannot build the namespaces: {e}"));

    let relay = start(
        &t,
        "inet",
        "relay",
        format!(
            "[network]\nmdns = false\nlisten = [{}]\n[dht]\nmode = \"server\"\n[nat]\nreachability = \"public\"\n",
            net.listen("198.18.0.1")
        ),
        &["--relay"],
    );
    // Given by its TCP address where it has one: a reservation must find QUIC by itself.
    let relay_addr = relay.daemon.info["listen_addrs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find(|a| net == Net::Quic || a.contains("/tcp/"))
        .expect("relay address")
        .to_owned();
    let public = start(&t, "pub", "pub", agent("pub", net, &relay_addr), &[]);
    let a = start(&t, "a", "a", agent("a", net, &relay_addr), &[]);
    let b = start(&t, "b", "b", agent("b", net, &relay_addr), &[]);
    let c = start(&t, "c", "c", agent("c", net, &relay_addr), &[]);

    // Reachability: the public host is found public; the others reserve on the relay.
    wait_for("pub found public", Duration::from_secs(60), || {
        let s = public.status();
        (s["reachability"] == "public")
            .then_some(())
            .ok_or(format!("{s}"))
    });
    for n in [&a, &b, &c] {
        let why = reserved(n);
        println!("{net:?}: {} reserves on the relay ({why})", n.name);
        if net == Net::Quic {
            assert_eq!(
                why, "private",
                "{}: a QUIC dial-back into a NAT fails",
                n.name
            );
        }
    }

    // A public node: direct at once, no relay between them.
    let out = a.call("echo-pub", &public);
    assert_eq!(out["output"]["from"], "x");
    let conns = a.conns(&public);
    assert!(
        !conns.is_empty() && conns.iter().all(|c| c["relayed"] == false),
        "a to pub: {conns:?}"
    );

    // Two endpoint-independent NATs: relayed first, then hole punched.
    b.call("echo-a", &a);
    let ab = punched(&a, &b);
    if net == Net::Both {
        // Reservations go over QUIC, though the relay was given by its TCP address.
        let s = a.status();
        let circuits = s["reservations"][0][1].to_string();
        assert!(circuits.contains("/quic-v1"), "{s}");
        let direct: Vec<String> = a
            .conns(&b)
            .into_iter()
            .filter(|c| c["relayed"] == false)
            .filter_map(|c| c["addr"].as_str().map(str::to_owned))
            .collect();
        println!("Both: a <-> b punched over {direct:?}");
    }
    a.call("echo-b", &b);
    b.call("echo-a", &a);
    println!("{net:?}: a <-> b (EIM, EIM) direct, {ab:?} ms after relaying");

    // An endpoint-dependent NAT: calls, events and mail through the relay; no direct path.
    c.call("echo-a", &a);
    a.call("echo-c", &c);
    wait_for(
        "c's hole punching gives up",
        Duration::from_secs(45),
        || {
            let failed = |n: &Node| n.status()["hole_punches"][1].as_u64().unwrap_or(0);
            (failed(&a) + failed(&c) > 0)
                .then_some(())
                .ok_or_else(|| "no failed attempt yet".to_owned())
        },
    );
    for (x, y) in [(&a, &c), (&c, &a)] {
        let conns = x.conns(y);
        assert!(
            conns.iter().all(|c| c["relayed"] == true),
            "{} to {}: an endpoint-dependent NAT cannot be punched, yet: {conns:?}",
            x.name,
            y.name
        );
    }
    let sub = subscribe(&c, "news");
    wait_for("a publishes to c", Duration::from_secs(30), || {
        let o = a
            .daemon
            .cli(&["events", "pub", "news", r#"{"headline":"relayed"}"#]);
        o.status
            .success()
            .then_some(())
            .ok_or_else(|| String::from_utf8_lossy(&o.stderr).into_owned())
    });
    assert!(output_within(sub, Duration::from_secs(20)).contains("relayed"));
    json_out(&c.daemon.cli(&["--json", "send", &a.id, "hello a"]));
    let got = json_out(&a.daemon.cli(&["--json", "inbox", "--wait", "20"]));
    assert_eq!(got["text"], "hello a");
    json_out(&a.daemon.cli(&["--json", "send", &c.id, "hello c"]));
    let got = json_out(&c.daemon.cli(&["--json", "inbox", "--wait", "20"]));
    assert_eq!(got["text"], "hello c");

    // A node that joins late, behind its own endpoint-independent NAT.
    let d = start(&t, "d", "d", agent("d", net, &relay_addr), &[]);
    reserved(&d);
    d.call("echo-a", &a);
    let da = punched(&d, &a);
    println!("{net:?}: d <-> a (EIM, EIM, joined late) direct, {da:?} ms after relaying");

    // Minutes in: everything still answers, the public node is still public.
    b.call("echo-a", &a);
    c.call("echo-b", &b);
    assert_eq!(public.status()["reachability"], "public");
    assert_eq!(relay.status()["reachability"], "public");
}

#[test]
fn nat_matrix_over_tcp() {
    matrix(Net::Tcp);
}

#[test]
fn nat_matrix_over_quic() {
    matrix(Net::Quic);
}

#[test]
fn nat_matrix_over_tcp_and_quic_reserves_over_quic() {
    matrix(Net::Both);
}

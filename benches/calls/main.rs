//! Benchmarks against plain libp2p, printed as one table (docs/performance.md).
//!
//! ```sh
//! cargo bench --bench calls            # full run
//! cargo bench --bench calls -- --quick # fewer samples
//! cargo bench --bench calls -- --only sequential   # one group: sequential, in-flight, cold, stream, async, verify, mail, startup, rss
//! cargo bench --bench calls -- --only cold --net tcp       # and the call groups over one transport
//! cargo bench --bench calls -- --only rss --daemon target/dist/skillmesh   # another build's RSS
//! ```
//!
//! Both sides of each comparison run in this process, over the same transport, with the same
//! 256-byte payload: skillmesh's signed, checked, logged sync calls against a bare libp2p
//! request-response exchange (no signatures, no checks).

use std::future::Future;
use std::time::{Duration, Instant};

use libp2p::futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, noise, tcp, yamux};
use serde_bytes::ByteBuf;
use serde_json::{Value, json};
use skillmesh::config::Config;
use skillmesh::protocol::{ShareMode, SkillSpec};
use skillmesh::{CallContext, HandlerError, Node};
use tokio::sync::{mpsc, oneshot};

#[derive(Clone, Copy, PartialEq)]
enum Net {
    Tcp,
    Quic,
}

impl Net {
    fn listen(self) -> Multiaddr {
        match self {
            Net::Tcp => "/ip4/127.0.0.1/tcp/0",
            Net::Quic => "/ip4/127.0.0.1/udp/0/quic-v1",
        }
        .parse()
        .expect("addr")
    }
    fn name(self) -> &'static str {
        match self {
            Net::Tcp => "tcp",
            Net::Quic => "quic",
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

// ---- skillmesh --------------------------------------------------------------------------------

fn config(net: Net, bootstrap: Vec<Multiaddr>) -> Config {
    let mut c = Config::default();
    c.network.listen = vec![net.listen()];
    c.network.bootstrap = bootstrap;
    c.network.mdns = false;
    c.dht.mode = skillmesh::config::KadMode::Server;
    // The benchmark measures call overhead, not the admission limits.
    c.calls.rate_per_peer = 10_000_000;
    c.calls.burst_per_peer = 10_000_000;
    c.calls.max_inbound = 4096;
    c.calls.max_inbound_per_peer = 4096;
    c
}

async fn echo(_ctx: CallContext, args: Value) -> Result<Value, HandlerError> {
    Ok(args)
}

struct SmPair {
    caller: Node,
    callee: Node,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// A node serving `echo`, with limits far above what the benchmark sends.
async fn echo_callee(net: Net, dir: &std::path::Path) -> Node {
    let callee = Node::builder(config(net, vec![]))
        .data_dir(dir)
        .build()
        .await
        .expect("callee");
    let spec = SkillSpec::builder("echo", "1.0.0")
        .share(ShareMode::Public)
        .max_concurrency(1024)
        .max_arg_bytes(4096)
        .build()
        .expect("spec");
    callee.register_skill(spec, echo).await.expect("register");
    callee
}

async fn skillmesh_pair(net: Net) -> SmPair {
    let d1 = tempfile::tempdir().expect("tempdir");
    let d2 = tempfile::tempdir().expect("tempdir");
    let callee = echo_callee(net, d1.path()).await;
    let boot = callee.listen_addrs().await.expect("addrs");
    let caller = Node::builder(config(net, boot))
        .data_dir(d2.path())
        .build()
        .await
        .expect("caller");
    SmPair {
        caller,
        callee,
        _dirs: (d1, d2),
    }
}

fn args_256() -> Value {
    // {"data": "xxx..."} is 256 bytes of CBOR.
    json!({ "data": "x".repeat(248) })
}

// ---- plain libp2p request-response --------------------------------------------------------------

type Rr = request_response::cbor::Behaviour<ByteBuf, ByteBuf>;

fn plain_swarm(net: Net) -> Swarm<Rr> {
    let behaviour = |_: &libp2p::identity::Keypair| {
        request_response::cbor::Behaviour::<ByteBuf, ByteBuf>::new(
            [(StreamProtocol::new("/bench/echo/1"), ProtocolSupport::Full)],
            request_response::Config::default().with_max_concurrent_streams(4096),
        )
    };
    let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(Duration::from_secs(60));
    match net {
        Net::Tcp => SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .expect("tcp")
            .with_behaviour(behaviour)
            .expect("behaviour")
            .with_swarm_config(idle)
            .build(),
        Net::Quic => SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_quic()
            .with_behaviour(behaviour)
            .expect("behaviour")
            .with_swarm_config(idle)
            .build(),
    }
}

/// A running plain echo server; returns its peer id and address.
async fn plain_server(net: Net) -> (PeerId, Multiaddr) {
    let mut swarm = plain_swarm(net);
    swarm.listen_on(net.listen()).expect("listen");
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    let peer = *swarm.local_peer_id();
    tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(request_response::Event::Message {
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            }) = swarm.select_next_some().await
            {
                let _ = swarm.behaviour_mut().send_response(channel, request);
            }
        }
    });
    (peer, addr)
}

/// A client swarm in its own task, driven by a channel of requests.
#[derive(Clone)]
struct PlainClient {
    tx: mpsc::Sender<(ByteBuf, oneshot::Sender<Result<ByteBuf, String>>)>,
}

fn plain_client(net: Net, server: PeerId, addr: Multiaddr) -> PlainClient {
    let mut swarm = plain_swarm(net);
    swarm.add_peer_address(server, addr);
    let (tx, mut rx) = mpsc::channel::<(ByteBuf, oneshot::Sender<Result<ByteBuf, String>>)>(1024);
    tokio::spawn(async move {
        let mut pending = std::collections::HashMap::new();
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    // Every handle dropped: this client is done, and its connection with it.
                    let Some((req, reply)) = msg else { break };
                    let id = swarm.behaviour_mut().send_request(&server, req);
                    pending.insert(id, reply);
                }
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::Behaviour(request_response::Event::Message {
                        message: request_response::Message::Response { request_id, response }, ..
                    }) => {
                        if let Some(r) = pending.remove(&request_id) { let _ = r.send(Ok(response)); }
                    }
                    SwarmEvent::Behaviour(request_response::Event::OutboundFailure { request_id, error, .. }) => {
                        if let Some(r) = pending.remove(&request_id) { let _ = r.send(Err(error.to_string())); }
                    }
                    _ => {}
                },
            }
        }
    });
    PlainClient { tx }
}

impl PlainClient {
    async fn call(&self, payload: &[u8]) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((ByteBuf::from(payload.to_vec()), tx))
            .await
            .map_err(|e| e.to_string())?;
        rx.await.map_err(|e| e.to_string())?.map(|_| ())
    }
}

// ---- measurements -------------------------------------------------------------------------------

struct Row {
    what: String,
    skillmesh: String,
    plain: String,
    ratio: String,
    target: &'static str,
}

/// Calls of one kind timed in a row before the other's turn: the two alternate in blocks, so
/// that whatever else the machine does in a stretch of the run weighs on both alike. Long
/// against the call log's pace (a batch every 50 ms, `call_log.rs`), so that its commits fall
/// among the calls they log.
const BLOCK: usize = 1_000;
/// The pause after each turn: the call log's last batch of a turn lands in no one's window.
const PAUSE: Duration = Duration::from_millis(100);

/// Times `n` calls one after another, into `samples`.
async fn time_calls<F, Fut>(n: usize, call: &F, samples: &mut Vec<Duration>)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..n {
        let t = Instant::now();
        assert!(call().await, "call failed");
        samples.push(t.elapsed());
    }
}

/// Warms both up with 200 calls, then times `n` sequential calls of each, in turns of
/// [`BLOCK`]; the samples of each, sorted.
async fn timed_pair<F, Fut, G, Gut>(n: usize, a: F, b: G) -> (Vec<Duration>, Vec<Duration>)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
    G: Fn() -> Gut,
    Gut: Future<Output = bool>,
{
    let mut warm = Vec::new();
    time_calls(200, &a, &mut warm).await;
    time_calls(200, &b, &mut warm).await;
    let (mut sa, mut sb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    while sa.len() < n {
        let k = BLOCK.min(n - sa.len());
        time_calls(k, &a, &mut sa).await;
        tokio::time::sleep(PAUSE).await;
        time_calls(k, &b, &mut sb).await;
        tokio::time::sleep(PAUSE).await;
    }
    sa.sort();
    sb.sort();
    (sa, sb)
}

/// `total` calls from 64 concurrent workers: calls made, how long they took, and failures.
async fn hammer<F, Fut>(total: usize, call: F) -> (usize, Duration, usize)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    const WORKERS: usize = 64;
    let per_worker = total / WORKERS;
    let t = Instant::now();
    let tasks: Vec<_> = (0..WORKERS)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut errors = 0usize;
                for _ in 0..per_worker {
                    if !call().await {
                        errors += 1;
                    }
                }
                errors
            })
        })
        .collect();
    let mut errors = 0;
    for task in tasks {
        errors += task.await.unwrap_or(per_worker);
    }
    (per_worker * WORKERS, t.elapsed(), errors)
}

/// Rounds of 64 calls in flight, of each kind in turn, for the reasons of [`BLOCK`].
const ROUNDS: usize = 2;

/// `total` calls of each kind from 64 workers, in [`ROUNDS`] turns: calls per second and
/// failures, of each.
async fn hammer_pair<F, Fut, G, Gut>(total: usize, a: F, b: G) -> ((f64, usize), (f64, usize))
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
    G: Fn() -> Gut + Clone + Send + 'static,
    Gut: Future<Output = bool> + Send,
{
    let (mut a_sum, mut b_sum) = ((0, Duration::ZERO, 0), (0, Duration::ZERO, 0));
    for _ in 0..ROUNDS {
        let (n, t, e) = hammer(total / ROUNDS, a.clone()).await;
        a_sum = (a_sum.0 + n, a_sum.1 + t, a_sum.2 + e);
        tokio::time::sleep(PAUSE).await;
        let (n, t, e) = hammer(total / ROUNDS, b.clone()).await;
        b_sum = (b_sum.0 + n, b_sum.1 + t, b_sum.2 + e);
        tokio::time::sleep(PAUSE).await;
    }
    let rate = |(n, t, e): (usize, Duration, usize)| (n as f64 / t.as_secs_f64(), e);
    (rate(a_sum), rate(b_sum))
}

/// A skillmesh echo call, as a closure the helpers can repeat.
fn sm_call(
    pair: &SmPair,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>> + Clone + Send + 'static {
    let (node, peer, args) = (pair.caller.clone(), pair.callee.peer_id(), args_256());
    move || {
        let (node, args) = (node.clone(), args.clone());
        Box::pin(async move { node.call(peer, "echo", args).await.is_ok() })
    }
}

/// A plain libp2p echo, as a closure the helpers can repeat.
fn plain_call(
    client: &PlainClient,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>> + Clone + Send + 'static {
    let (client, payload) = (client.clone(), vec![0x78u8; 256]);
    move || {
        let (client, payload) = (client.clone(), payload.clone());
        Box::pin(async move { client.call(&payload).await.is_ok() })
    }
}

async fn sequential(net: Net, n: usize, rows: &mut Vec<Row>) {
    let pair = skillmesh_pair(net).await;
    let (server, addr) = plain_server(net).await;
    let client = plain_client(net, server, addr);
    let (sm, pl) = timed_pair(n, sm_call(&pair), plain_call(&client)).await;
    for (p, name, target) in [
        (0.5, "p50", "<= 1.5x"),
        (0.9, "p90", ""),
        (0.99, "p99", "<= 2x"),
    ] {
        let (a, b) = (percentile(&sm, p), percentile(&pl, p));
        rows.push(Row {
            what: format!("sequential 256 B call, {}, {name}", net.name()),
            skillmesh: ms(a),
            plain: ms(b),
            ratio: format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64()),
            target,
        });
    }
    pair.caller.shutdown().await.ok();
    pair.callee.shutdown().await.ok();
}

async fn in_flight(net: Net, total: usize, rows: &mut Vec<Row>) {
    let pair = skillmesh_pair(net).await;
    let (server, addr) = plain_server(net).await;
    let client = plain_client(net, server, addr);
    let mut warm = Vec::new();
    time_calls(200, &sm_call(&pair), &mut warm).await;
    time_calls(200, &plain_call(&client), &mut warm).await;
    let ((sm_rate, sm_errors), (pl_rate, pl_errors)) =
        hammer_pair(total, sm_call(&pair), plain_call(&client)).await;
    rows.push(Row {
        what: format!("64 calls in flight, {}, calls/s", net.name()),
        skillmesh: format!("{sm_rate:.0}"),
        plain: format!("{pl_rate:.0}"),
        ratio: format!("{:.2}x", sm_rate / pl_rate),
        target: ">= 0.7x",
    });
    rows.push(Row {
        what: format!("64 calls in flight, {}, errors", net.name()),
        skillmesh: sm_errors.to_string(),
        plain: pl_errors.to_string(),
        ratio: String::new(),
        target: "0",
    });
    // The call log's writer runs at a lower priority than the calls; this shows whether it
    // kept up with them (an entry it could not take in time is dropped and counted).
    rows.push(Row {
        what: format!(
            "64 calls in flight, {}, call log entries dropped",
            net.name()
        ),
        skillmesh: (pair.caller.call_log_dropped() + pair.callee.call_log_dropped()).to_string(),
        plain: String::new(),
        ratio: String::new(),
        target: "0",
    });
    pair.caller.shutdown().await.ok();
    pair.callee.shutdown().await.ok();
}

/// How long a new caller (either kind) is left before its cold call is timed: longer than the
/// call log's wait before it writes the callee's entry of the call before (50 ms).
const COLD_SETTLE: Duration = Duration::from_millis(100);

/// A new peer: dial, handshake, first call. Samples of the two alternate, so that whatever
/// else the machine does in a stretch of the run weighs on both alike.
async fn cold(net: Net, n: usize, rows: &mut Vec<Row>) {
    let d1 = tempfile::tempdir().expect("tempdir");
    let callee = echo_callee(net, d1.path()).await;
    let addr = callee.listen_addrs().await.expect("addrs")[0].clone();
    let (server, saddr) = plain_server(net).await;
    let args = args_256();
    let payload = vec![0x78u8; 256];
    let (mut sm, mut pl) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let d = tempfile::tempdir().expect("tempdir");
        let caller = Node::builder(config(net, vec![]))
            .data_dir(d.path())
            .build()
            .await
            .expect("caller");
        // A cold call is a new connection, not a new node (start-up has its own row): the
        // node's own start (listeners, store, first timers) finishes before the clock starts.
        tokio::time::sleep(COLD_SETTLE).await;
        let t = Instant::now();
        caller.dial(addr.clone()).await.expect("dial");
        caller
            .call(callee.peer_id(), "echo", args.clone())
            .await
            .expect("cold call");
        sm.push(t.elapsed());
        caller.shutdown().await.ok();

        let client = plain_client(net, server, saddr.clone());
        tokio::time::sleep(COLD_SETTLE).await;
        let t = Instant::now();
        client.call(&payload).await.expect("cold call");
        pl.push(t.elapsed());
    }
    sm.sort();
    pl.sort();
    let (a, b) = (percentile(&sm, 0.5), percentile(&pl, 0.5));
    rows.push(Row {
        what: format!("cold call (dial + handshake + call), {}, p50", net.name()),
        skillmesh: ms(a),
        plain: ms(b),
        ratio: format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64()),
        target: "<= 1.5x",
    });
    callee.shutdown().await.ok();
}

mod node_costs;
mod streams;
use node_costs::{idle_rss, mailbox, startup, verify};

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only NAME` runs one group: sequential, in-flight, cold, stream, async, verify, mail,
    // startup, rss.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    // `--daemon PATH`: the daemon whose idle RSS to measure (default: this build's).
    let daemon = args
        .iter()
        .position(|a| a == "--daemon")
        .and_then(|i| args.get(i + 1))
        .cloned();
    // `--net tcp` or `--net quic`: the call groups over one transport only.
    let nets: Vec<Net> = match args
        .iter()
        .position(|a| a == "--net")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        None => vec![Net::Tcp, Net::Quic],
        Some("tcp") => vec![Net::Tcp],
        Some("quic") => vec![Net::Quic],
        Some(other) => {
            eprintln!("--net {other}: expected tcp or quic");
            std::process::exit(2);
        }
    };
    let (seq, total, cold_n) = if quick {
        (500, 4_000, 5)
    } else {
        (3_000, 20_000, 300)
    };
    let mut rows = Vec::new();
    for net in nets {
        if run("sequential") {
            sequential(net, seq, &mut rows).await;
        }
        if run("in-flight") {
            in_flight(net, total, &mut rows).await;
        }
        if run("cold") {
            cold(net, cold_n, &mut rows).await;
        }
        if run("stream") {
            streams::first_chunk(net, seq, &mut rows).await;
            streams::throughput(net, if quick { 2 } else { 5 }, &mut rows).await;
        }
    }
    if run("async") {
        streams::async_in_flight(1000, &mut rows).await;
    }
    if run("verify") {
        verify(if quick { 2_000 } else { 20_000 }, &mut rows);
    }
    if run("mail") {
        mailbox(if quick { 200 } else { 1000 }, &mut rows).await;
    }
    if run("startup") {
        startup(cold_n, &mut rows).await;
    }
    if run("rss") {
        idle_rss(daemon.as_deref(), &mut rows);
    }

    println!();
    println!(
        "{:<52} {:>14} {:>14} {:>8}  target",
        "measure", "skillmesh", "plain libp2p", "ratio"
    );
    for r in rows {
        println!(
            "{:<52} {:>14} {:>14} {:>8}  {}",
            r.what, r.skillmesh, r.plain, r.ratio, r.target
        );
    }
}

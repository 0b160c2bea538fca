//! Streams and async calls: the first chunk of a stream against a sync call, a 64 MiB stream
//! against a bare libp2p stream moving the same bytes, and 1,000 async calls in flight.

use std::sync::Arc;

use futures::{AsyncReadExt, AsyncWriteExt};
use skillmesh::protocol::Mode;
use skillmesh::{CallOptions, Chunk};

use super::*;

/// Bytes in the throughput rows.
const STREAM_BYTES: usize = 64 * 1024 * 1024;
/// Bytes per chunk: as large as a chunk may be (a byte string's CBOR head takes up to 9).
const PIECE: usize = skillmesh::protocol::MAX_CHUNK_DATA_BYTES - 9;

fn stream_spec(name: &str) -> SkillSpec {
    SkillSpec::builder(name, "1.0.0")
        .mode(Mode::Stream)
        .share(ShareMode::Public)
        .max_concurrency(1024)
        .max_arg_bytes(4096)
        .timeout(Duration::from_secs(300))
        .build()
        .expect("spec")
}

/// The first chunk of a one-chunk stream (its arguments, echoed) against a sync call of the
/// same echo, in alternating blocks as the sequential rows are.
pub(super) async fn first_chunk(net: Net, n: usize, rows: &mut Vec<Row>) {
    let pair = skillmesh_pair(net).await;
    pair.callee
        .register_stream(
            stream_spec("echo-stream"),
            |_ctx: CallContext, args: Value| {
                futures::stream::iter([Ok::<_, HandlerError>(Chunk::Json(args))])
            },
        )
        .await
        .expect("register");
    let peer = pair.callee.peer_id();
    let args = args_256();
    let (mut first, mut sync) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let turn = |stream: bool, k: usize| {
        let (caller, args) = (pair.caller.clone(), args.clone());
        async move {
            let mut samples = Vec::with_capacity(k);
            for _ in 0..k {
                let t = Instant::now();
                if stream {
                    let mut s = caller
                        .call_stream(peer, "echo-stream", args.clone())
                        .await
                        .expect("stream");
                    s.next().await.expect("a chunk").expect("chunk");
                    samples.push(t.elapsed());
                    // Read to its end: no cancel goes out.
                    while s.next().await.is_some() {}
                } else {
                    caller.call(peer, "echo", args.clone()).await.expect("call");
                    samples.push(t.elapsed());
                }
            }
            samples
        }
    };
    // Warm both, then alternate.
    turn(true, 200).await;
    turn(false, 200).await;
    while first.len() < n {
        let k = BLOCK.min(n - first.len());
        first.extend(turn(true, k).await);
        tokio::time::sleep(PAUSE).await;
        sync.extend(turn(false, k).await);
        tokio::time::sleep(PAUSE).await;
    }
    first.sort();
    sync.sort();
    let (a, b) = (percentile(&first, 0.5), percentile(&sync, 0.5));
    rows.push(Row {
        what: format!("stream first chunk vs sync call, {}, p50", net.name()),
        skillmesh: ms(a),
        plain: format!("{} (sync)", ms(b)),
        ratio: format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64()),
        target: "<= 1.2x",
    });
    pair.caller.shutdown().await.ok();
    pair.callee.shutdown().await.ok();
}

/// 64 MiB streamed by a skill (256 KiB chunks, each linked into the transcript, the last one
/// signed, under the caller's window) against a bare libp2p stream writing the same bytes.
pub(super) async fn throughput(net: Net, rounds: usize, rows: &mut Vec<Row>) {
    let pair = skillmesh_pair(net).await;
    pair.callee
        .register_stream(stream_spec("bytes"), |_ctx: CallContext, _args: Value| {
            let piece = Arc::new(vec![0x5au8; PIECE]);
            futures::stream::unfold(0usize, move |sent| {
                let piece = piece.clone();
                async move {
                    if sent >= STREAM_BYTES {
                        return None;
                    }
                    let n = PIECE.min(STREAM_BYTES - sent);
                    Some((
                        Ok::<_, HandlerError>(Chunk::Bytes(piece[..n].to_vec())),
                        sent + n,
                    ))
                }
            })
        })
        .await
        .expect("register");
    let peer = pair.callee.peer_id();
    let (server, addr) = bare_stream_server(net).await;
    let mut bare_client = bare_stream_client(net, server, addr).await;
    let (mut sm, mut bare) = (Vec::new(), Vec::new());
    for round in 0..=rounds {
        let t = Instant::now();
        let mut s = pair
            .caller
            .call_stream(peer, "bytes", json!({}))
            .await
            .expect("stream");
        let mut got = 0usize;
        while let Some(c) = s.next().await {
            if let Chunk::Bytes(b) = c.expect("chunk") {
                got += b.len();
            }
        }
        assert_eq!(got, STREAM_BYTES);
        let sm_t = t.elapsed();
        let t = Instant::now();
        let got = bare_client.read_all().await;
        assert_eq!(got, STREAM_BYTES);
        let bare_t = t.elapsed();
        // Round 0 warms both up.
        if round > 0 {
            sm.push(sm_t);
            bare.push(bare_t);
        }
    }
    sm.sort();
    bare.sort();
    let mb_s = |d: Duration| STREAM_BYTES as f64 / d.as_secs_f64() / (1024.0 * 1024.0);
    let (a, b) = (mb_s(percentile(&sm, 0.5)), mb_s(percentile(&bare, 0.5)));
    rows.push(Row {
        what: format!("64 MiB streamed, {}, MiB/s (median)", net.name()),
        skillmesh: format!("{a:.0}"),
        plain: format!("{b:.0}"),
        ratio: format!("{:.2}x", a / b),
        target: ">= 0.5x",
    });
    pair.caller.shutdown().await.ok();
    pair.callee.shutdown().await.ok();
}

/// A bare libp2p peer that writes [`STREAM_BYTES`] on every stream opened to it, then closes it.
async fn bare_stream_server(net: Net) -> (PeerId, Multiaddr) {
    let mut swarm = bare_swarm(net);
    swarm.listen_on(net.listen()).expect("listen");
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    let peer = *swarm.local_peer_id();
    let mut incoming = swarm
        .behaviour()
        .new_control()
        .accept(BARE_PROTOCOL)
        .expect("accept");
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    tokio::spawn(async move {
        let piece = vec![0x5au8; PIECE];
        while let Some((_, mut stream)) = incoming.next().await {
            let mut left = STREAM_BYTES;
            while left > 0 {
                let n = left.min(PIECE);
                if stream.write_all(&piece[..n]).await.is_err() {
                    break;
                }
                left -= n;
            }
            let _ = stream.close().await;
        }
    });
    (peer, addr)
}

const BARE_PROTOCOL: StreamProtocol = StreamProtocol::new("/bench/bytes/1");

fn bare_swarm(net: Net) -> Swarm<libp2p_stream::Behaviour> {
    let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(Duration::from_secs(60));
    let behaviour = |_: &libp2p::identity::Keypair| libp2p_stream::Behaviour::new();
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

struct BareClient {
    control: libp2p_stream::Control,
    server: PeerId,
}

impl BareClient {
    /// Opens a stream and reads it to its end; the bytes read.
    async fn read_all(&mut self) -> usize {
        let mut stream = self
            .control
            .open_stream(self.server, BARE_PROTOCOL)
            .await
            .expect("open");
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    }
}

async fn bare_stream_client(net: Net, server: PeerId, addr: Multiaddr) -> BareClient {
    let mut swarm = bare_swarm(net);
    swarm.dial(addr).expect("dial");
    let control = swarm.behaviour().new_control();
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    BareClient { control, server }
}

/// This process's resident set, in KiB (Linux).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// 1,000 async calls accepted by one callee and held running, then released: how fast they
/// are accepted, the process's memory while they run, and how fast their results arrive.
pub(super) async fn async_in_flight(n: usize, rows: &mut Vec<Row>) {
    let pair = skillmesh_pair(Net::Tcp).await;
    let release = Arc::new(tokio::sync::Notify::new());
    let gate = release.clone();
    let spec = SkillSpec::builder("hold", "1.0.0")
        .mode(Mode::Async)
        .share(ShareMode::Public)
        .max_concurrency(u16::try_from(n + 16).unwrap_or(u16::MAX))
        .timeout(Duration::from_secs(300))
        .build()
        .expect("spec");
    pair.callee
        .register_skill(spec, move |_ctx: CallContext, args: Value| {
            let gate = gate.clone();
            async move {
                gate.notified().await;
                Ok::<_, HandlerError>(args)
            }
        })
        .await
        .expect("register");
    let peer = pair.callee.peer_id();
    let before = rss_kib();
    let t = Instant::now();
    let ids = futures::future::join_all((0..n).map(|i| {
        let caller = pair.caller.clone();
        async move {
            caller
                .call_async(peer, "hold", json!({ "i": i }), CallOptions::default())
                .await
                .expect("accepted")
        }
    }))
    .await;
    let accepted = t.elapsed();
    let during = rss_kib();
    let t = Instant::now();
    release.notify_waiters();
    for id in &ids {
        pair.caller
            .wait_call(*id, Duration::from_secs(120))
            .await
            .expect("result");
    }
    let delivered = t.elapsed();
    rows.push(Row {
        what: format!("{n} async calls accepted, calls/s"),
        skillmesh: format!("{:.0}", n as f64 / accepted.as_secs_f64()),
        plain: String::new(),
        ratio: String::new(),
        target: "",
    });
    rows.push(Row {
        what: format!("{n} async calls in flight, RSS growth (both nodes)"),
        skillmesh: format!("{:.1} MiB", during.saturating_sub(before) as f64 / 1024.0),
        plain: String::new(),
        ratio: String::new(),
        target: "printed",
    });
    rows.push(Row {
        what: format!("{n} async results delivered, results/s"),
        skillmesh: format!("{:.0}", n as f64 / delivered.as_secs_f64()),
        plain: String::new(),
        ratio: String::new(),
        target: "",
    });
    pair.caller.shutdown().await.ok();
    pair.callee.shutdown().await.ok();
}

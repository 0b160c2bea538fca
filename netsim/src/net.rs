//! The simulated network under the nodes: a libp2p byte-stream transport with a network model.
//!
//! Every node gets a [`SimTransport`] on one shared [`Net`]. Addresses are `/memory/<port>`, one
//! fixed port per node, so a node that restarts is found where it was. The node runs its real
//! Noise, Yamux, relay client and everything above over the links made here. The model:
//!
//! - **Latency**: one-way, by the regions of the two ends; a dial costs one round trip.
//! - **Bandwidth**: each direction of a link sends at most so many bytes a second; bytes queue
//!   behind each other, so a large message delays the small ones after it.
//! - **Loss** as connection failures: a dial fails with a configured chance.
//! - **Partitions**: nodes in different groups cannot dial each other, and links across groups
//!   break when the partition starts.
//! - **NAT**, per node ([`Nat`]), with the two behaviours the namespace test's routers have
//!   (tests/netns_nat.rs): mapping, endpoint-independent (one outside port for every
//!   destination, as Linux MASQUERADE keeps the source port) or endpoint-dependent (a port per
//!   destination, as `--random-fully` and many carrier-grade NATs); and filtering that lets in
//!   only what answers a mapping: a dial from a peer this node dialed within [`NAT_WINDOW`],
//!   from the port this node sent to. So a dial into an endpoint-independent NAT passes when
//!   both ends dial each other from their reused ports (DCUtR's simultaneous dials) and the
//!   dialer's own mapping is endpoint-independent too (else its packets come from a port the
//!   target never sent to); a dial into an endpoint-dependent NAT never passes (the port
//!   others saw it at is not the one it opened towards the dialer). AutoNAT's dial-back comes
//!   from a new port and never passes, so nodes behind NAT find out they are unreachable.
//!
//! Random choices are hashes of the seed and the pair (and the pair's dial count), so a run's
//! faults do not depend on how tasks happen to interleave.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::channel::mpsc;
use futures::future::{BoxFuture, Ready};
use futures::task::AtomicWaker;
use futures::{AsyncRead, AsyncWrite, FutureExt, Stream};
use libp2p::core::transport::{
    DialOpts, ListenerId, PortUse, Transport, TransportError, TransportEvent,
};
use libp2p::multiaddr::Protocol;
use skillmesh::protocol::Multiaddr;
use skillmesh::{RawStream, RawTransport};
use tokio::time::{Instant, Sleep};

/// How long a NAT keeps a mapping open for the peer a node dialed.
pub const NAT_WINDOW: Duration = Duration::from_secs(10);
/// A dial that nobody answers (partition, NAT) fails after this long.
const DROP_DELAY: Duration = Duration::from_millis(800);
/// Chunks in flight per link direction: backpressure instead of unbounded buffers.
const LINK_QUEUE: usize = 32;
/// Largest chunk one write puts on a link.
const MAX_CHUNK: usize = 64 * 1024;
/// Connections waiting to be accepted per listener.
const ACCEPT_QUEUE: usize = 64;
/// First port; node `i` listens on `BASE_PORT + i`.
const BASE_PORT: u64 = 10_000;

/// The network model's settings.
#[derive(Clone, Debug)]
pub struct Model {
    /// One-way latency from region `a` to region `b`.
    pub latency: Vec<Vec<Duration>>,
    /// Bytes per second per link direction (0: unlimited).
    pub bandwidth: u64,
    /// Chance that a dial fails.
    pub dial_failure: f64,
}

/// What stands between a node and the network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nat {
    /// A public address: every dial comes in.
    #[default]
    Public,
    /// Endpoint-independent mapping, filtering by the address and port dialed (most home
    /// routers): hole punching works with a peer whose mapping is endpoint-independent too.
    Independent,
    /// Endpoint-dependent mapping (symmetric NAT): nothing dials in, not even a hole punch.
    Dependent,
}

impl Nat {
    /// Whether the node is behind a NAT.
    pub fn behind(self) -> bool {
        self != Nat::Public
    }

    /// A short name for reports.
    pub fn label(self) -> &'static str {
        match self {
            Nat::Public => "public",
            Nat::Independent => "EIM",
            Nat::Dependent => "EDM",
        }
    }
}

/// Where a node sits in the model.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    /// Its region (an index into [`Model::latency`]).
    pub region: usize,
    /// Its NAT, if any.
    pub nat: Nat,
}

/// Why dials failed, summed over the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DialStats {
    /// Dials that connected.
    pub connected: u64,
    /// Nothing listening there (the node is down).
    pub refused: u64,
    /// Across a partition.
    pub partitioned: u64,
    /// Into a NAT without a mapping.
    pub nat_blocked: u64,
    /// Into a NAT with a mapping: hole punches and connection reversals that worked.
    pub nat_punched: u64,
    /// Lost at random (`dial_failure`).
    pub lost: u64,
}

struct Incoming {
    link: Link,
    from: Multiaddr,
}

struct SimNode {
    placement: Placement,
    listener: Option<mpsc::Sender<Incoming>>,
    /// Peers this node dialed, and when: its NAT lets them back in for a while.
    mappings: HashMap<usize, Instant>,
    bytes_out: Arc<AtomicU64>,
}

#[derive(Default)]
struct State {
    nodes: Vec<SimNode>,
    /// Group of each node while a partition lasts.
    partition: Option<Vec<u32>>,
    links: Vec<(usize, usize, Weak<LinkShared>)>,
    dial_counts: HashMap<(usize, usize), u64>,
    stats: DialStats,
}

/// The simulated network all nodes of a run share.
pub struct Net {
    seed: u64,
    model: Model,
    state: Mutex<State>,
}

impl Net {
    /// A network of nodes placed as given.
    pub fn new(seed: u64, model: Model, placements: &[Placement]) -> Arc<Self> {
        let nodes = placements
            .iter()
            .map(|&placement| SimNode {
                placement,
                listener: None,
                mappings: HashMap::new(),
                bytes_out: Arc::default(),
            })
            .collect();
        Arc::new(Net {
            seed,
            model,
            state: Mutex::new(State {
                nodes,
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The address node `i` listens on.
    pub fn addr(i: usize) -> Multiaddr {
        Protocol::Memory(BASE_PORT + i as u64).into()
    }

    /// The transport factory for node `i`.
    pub fn transport(self: &Arc<Self>, i: usize) -> RawTransport {
        let net = self.clone();
        RawTransport::new(move || {
            SimTransport {
                net: net.clone(),
                node: i,
                listener: None,
            }
            .map(|link, _| Box::new(link) as Box<dyn RawStream>)
            .boxed()
        })
    }

    /// Splits the network: node `i` is in group `groups[i]`. Links across groups break now.
    pub fn partition(&self, groups: Vec<u32>) {
        let mut st = self.lock();
        for (a, b, link) in &st.links {
            if groups.get(*a) != groups.get(*b)
                && let Some(link) = link.upgrade()
            {
                link.sever();
            }
        }
        st.partition = Some(groups);
    }

    /// Ends a partition.
    pub fn heal(&self) {
        self.lock().partition = None;
    }

    /// Bytes node `i` has sent.
    pub fn bytes_sent(&self, i: usize) -> u64 {
        self.lock()
            .nodes
            .get(i)
            .map_or(0, |n| n.bytes_out.load(Ordering::Relaxed))
    }

    /// Links open now (each carries one connection), and the fewest and most one node has.
    pub fn open_links(&self) -> (usize, usize, usize) {
        let st = self.lock();
        let mut per_node = vec![0usize; st.nodes.len()];
        let mut open = 0;
        for (a, b, l) in &st.links {
            if l.strong_count() > 0 {
                open += 1;
                for i in [*a, *b] {
                    if let Some(n) = per_node.get_mut(i) {
                        *n += 1;
                    }
                }
            }
        }
        let min = per_node.iter().copied().min().unwrap_or(0);
        let max = per_node.iter().copied().max().unwrap_or(0);
        (open, min, max)
    }

    /// Dial outcomes so far.
    pub fn dial_stats(&self) -> DialStats {
        self.lock().stats
    }

    fn latency(&self, st: &State, a: usize, b: usize) -> Duration {
        let region = |i: usize| st.nodes.get(i).map_or(0, |n| n.placement.region);
        self.model
            .latency
            .get(region(a))
            .and_then(|row| row.get(region(b)))
            .copied()
            .unwrap_or_default()
    }

    /// A uniform draw in [0, 1) from the seed and `parts`.
    fn draw(&self, parts: &[u64]) -> f64 {
        let mut h = self.seed ^ 0x9e37_79b9_7f4a_7c15;
        for p in parts {
            h = splitmix(h ^ p);
        }
        (h >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Decides a dial from `from` to `to` as it arrives there; on success hands the far end of
    /// a new link to `to`'s listener and returns the near end.
    fn admit(self: &Arc<Self>, from: usize, to: usize, opts: DialOpts) -> Result<Link, Refusal> {
        let mut st = self.lock();
        let now = Instant::now();
        let n = st.dial_counts.entry((from, to)).or_insert(0);
        *n += 1;
        let attempt = *n;
        if let Some(groups) = &st.partition
            && groups.get(from) != groups.get(to)
        {
            st.stats.partitioned += 1;
            return Err(Refusal::Dropped("partitioned"));
        }
        let Some(target) = st.nodes.get(to) else {
            st.stats.refused += 1;
            return Err(Refusal::Refused);
        };
        let mut punched = false;
        if target.placement.nat.behind() {
            let mapped = target
                .mappings
                .get(&from)
                .is_some_and(|t| now.duration_since(*t) < NAT_WINDOW);
            let dialer = st.nodes.get(from).map_or(Nat::Public, |n| n.placement.nat);
            if !nat_admits(target.placement.nat, mapped, dialer, opts.port_use) {
                st.stats.nat_blocked += 1;
                return Err(Refusal::Dropped("behind NAT"));
            }
            punched = true;
        }
        if self.draw(&[2, from as u64, to as u64, attempt]) < self.model.dial_failure {
            st.stats.lost += 1;
            return Err(Refusal::Dropped("lost"));
        }
        let Some(listener) = target.listener.clone() else {
            st.stats.refused += 1;
            return Err(Refusal::Refused);
        };
        let latency = self.latency(&st, from, to);
        let back = self.latency(&st, to, from);
        let out_from = st.nodes[from].bytes_out.clone();
        let out_to = st.nodes[to].bytes_out.clone();
        let (near, far, shared) = Link::pair(latency, back, self.model.bandwidth, out_from, out_to);
        let mut listener = listener;
        if listener
            .try_send(Incoming {
                link: far,
                from: Net::addr(from),
            })
            .is_err()
        {
            st.stats.refused += 1;
            return Err(Refusal::Refused);
        }
        if punched {
            st.stats.nat_punched += 1;
        }
        st.stats.connected += 1;
        // Forget links that are gone, now and then, so the list stays as long as the live ones.
        if st.links.len() >= 1024 && st.links.len().is_power_of_two() {
            st.links.retain(|(_, _, l)| l.strong_count() > 0);
        }
        st.links.push((from, to, Arc::downgrade(&shared)));
        Ok(near)
    }
}

/// Whether a NAT of kind `target` lets a dial in from a peer behind `dialer`: `mapped`, the
/// target dialed that peer within [`NAT_WINDOW`]; `port_use`, how the dialer dials.
fn nat_admits(target: Nat, mapped: bool, dialer: Nat, port_use: PortUse) -> bool {
    // The dialer's packets come from the port the target sent to only if it dials from its
    // reused port through a mapping that keeps that port.
    let expected_port = port_use == PortUse::Reuse && dialer != Nat::Dependent;
    match target {
        Nat::Public => true,
        Nat::Independent => mapped && expected_port,
        Nat::Dependent => false,
    }
}

enum Refusal {
    /// Nobody listens: the answer comes back at once (a TCP reset).
    Refused,
    /// Nobody answers: the dial times out.
    Dropped(&'static str),
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `/memory/<port>`, optionally followed by `/p2p/<peer>`: what this transport dials. Anything
/// longer (a relay circuit) belongs to the relay transport.
fn parse_port(addr: &Multiaddr) -> Option<u64> {
    let mut it = addr.iter();
    let Some(Protocol::Memory(port)) = it.next() else {
        return None;
    };
    match it.next() {
        None | Some(Protocol::P2p(_)) if it.next().is_none() => Some(port),
        _ => None,
    }
}

/// One node's view of the network.
struct SimTransport {
    net: Arc<Net>,
    node: usize,
    listener: Option<(ListenerId, mpsc::Receiver<Incoming>, bool)>,
}

impl SimTransport {
    fn close_listener(&mut self) {
        let Some((_, rx, _)) = self.listener.take() else {
            return;
        };
        // Only our own registration: a restarted node's new transport may have registered
        // already while this one is being dropped.
        if let Some(n) = self.net.lock().nodes.get_mut(self.node)
            && n.listener
                .as_ref()
                .is_some_and(|tx| tx.is_connected_to(&rx))
        {
            n.listener = None;
        }
    }
}

impl Drop for SimTransport {
    fn drop(&mut self) {
        self.close_listener();
    }
}

impl Transport for SimTransport {
    type Output = Link;
    type Error = io::Error;
    type ListenerUpgrade = Ready<Result<Link, io::Error>>;
    type Dial = BoxFuture<'static, Result<Link, io::Error>>;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        let own = BASE_PORT + self.node as u64;
        match parse_port(&addr) {
            Some(p) if p == own || p == 0 => {}
            Some(_) => {
                return Err(TransportError::Other(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("node {} listens on /memory/{own} only", self.node),
                )));
            }
            None => return Err(TransportError::MultiaddrNotSupported(addr)),
        }
        if self.listener.is_some() {
            return Err(TransportError::Other(io::Error::new(
                io::ErrorKind::AddrInUse,
                "already listening",
            )));
        }
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        if let Some(n) = self.net.lock().nodes.get_mut(self.node) {
            n.listener = Some(tx);
        }
        self.listener = Some((id, rx, true));
        Ok(())
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        if self.listener.as_ref().is_some_and(|(l, _, _)| *l == id) {
            self.close_listener();
            true
        } else {
            false
        }
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let Some(port) = parse_port(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        let to = port
            .checked_sub(BASE_PORT)
            .and_then(|i| usize::try_from(i).ok());
        let net = self.net.clone();
        let from = self.node;
        let (there, back) = {
            let mut st = net.lock();
            // Dialing out opens this node's NAT towards the peer.
            if let (Some(to), Some(n)) = (to, st.nodes.get_mut(from))
                && n.placement.nat.behind()
            {
                n.mappings.retain(|_, t| t.elapsed() < NAT_WINDOW);
                n.mappings.insert(to, Instant::now());
            }
            let to = to.unwrap_or(usize::MAX);
            (net.latency(&st, from, to), net.latency(&st, to, from))
        };
        Ok(async move {
            tokio::time::sleep(there).await;
            let Some(to) = to else {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("nothing listens on {addr}"),
                ));
            };
            match net.admit(from, to, opts) {
                Ok(link) => {
                    tokio::time::sleep(back).await;
                    Ok(link)
                }
                Err(Refusal::Refused) => {
                    tokio::time::sleep(back).await;
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("nothing listens on {addr}"),
                    ))
                }
                Err(Refusal::Dropped(why)) => {
                    tokio::time::sleep(DROP_DELAY).await;
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("dial to {addr} timed out ({why})"),
                    ))
                }
            }
        }
        .boxed())
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        let node = self.node;
        let Some((id, rx, announce)) = self.listener.as_mut() else {
            return Poll::Pending;
        };
        let listener_id = *id;
        if *announce {
            *announce = false;
            return Poll::Ready(TransportEvent::NewAddress {
                listener_id,
                listen_addr: Net::addr(node),
            });
        }
        match Pin::new(rx).poll_next(cx) {
            Poll::Ready(Some(incoming)) => Poll::Ready(TransportEvent::Incoming {
                listener_id,
                upgrade: futures::future::ready(Ok(incoming.link)),
                local_addr: Net::addr(node),
                send_back_addr: incoming.from,
            }),
            Poll::Ready(None) => {
                self.listener = None;
                Poll::Ready(TransportEvent::ListenerClosed {
                    listener_id,
                    reason: Ok(()),
                })
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Bytes on their way, and when they arrive.
struct Chunk {
    at: Instant,
    data: Vec<u8>,
    read: usize,
}

/// What both ends of a link share: whether a partition cut it.
struct LinkShared {
    severed: AtomicBool,
    readers: [AtomicWaker; 2],
}

impl LinkShared {
    fn sever(&self) {
        self.severed.store(true, Ordering::Release);
        for w in &self.readers {
            w.wake();
        }
    }
}

/// One end of a simulated connection: a byte stream with latency and bandwidth.
pub(crate) struct Link {
    tx: mpsc::Sender<Chunk>,
    rx: mpsc::Receiver<Chunk>,
    current: Option<Chunk>,
    timer: Option<Pin<Box<Sleep>>>,
    latency: Duration,
    bandwidth: u64,
    /// When this direction's last queued byte has left.
    busy_until: Instant,
    shared: Arc<LinkShared>,
    side: usize,
    sent: Arc<AtomicU64>,
}

impl Link {
    fn pair(
        latency: Duration,
        back: Duration,
        bandwidth: u64,
        sent_near: Arc<AtomicU64>,
        sent_far: Arc<AtomicU64>,
    ) -> (Link, Link, Arc<LinkShared>) {
        let (tx_a, rx_b) = mpsc::channel(LINK_QUEUE);
        let (tx_b, rx_a) = mpsc::channel(LINK_QUEUE);
        let shared = Arc::new(LinkShared {
            severed: AtomicBool::new(false),
            readers: [AtomicWaker::new(), AtomicWaker::new()],
        });
        let now = Instant::now();
        let end = |tx, rx, latency, side, sent| Link {
            tx,
            rx,
            current: None,
            timer: None,
            latency,
            bandwidth,
            busy_until: now,
            shared: shared.clone(),
            side,
            sent,
        };
        let near = end(tx_a, rx_a, latency, 0, sent_near);
        let far = end(tx_b, rx_b, back, 1, sent_far);
        (near, far, shared)
    }

    fn severed(&self) -> io::Result<()> {
        if self.shared.severed.load(Ordering::Acquire) {
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "link cut by a partition",
            ))
        } else {
            Ok(())
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.severed()?;
        ready!(self.tx.poll_ready(cx)).map_err(|_| io::ErrorKind::BrokenPipe)?;
        let data = buf[..buf.len().min(MAX_CHUNK)].to_vec();
        let now = Instant::now();
        let start = self.busy_until.max(now);
        let transmit = if self.bandwidth == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(data.len() as f64 / self.bandwidth as f64)
        };
        self.busy_until = start + transmit;
        let at = self.busy_until + self.latency;
        let n = data.len();
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        self.tx
            .start_send(Chunk { at, data, read: 0 })
            .map_err(|_| io::ErrorKind::BrokenPipe)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.severed())
    }

    fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tx.close_channel();
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Link {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.shared.readers[this.side].register(cx.waker());
        this.severed()?;
        if this.current.is_none() {
            match Pin::new(&mut this.rx).poll_next(cx) {
                Poll::Ready(Some(chunk)) => this.current = Some(chunk),
                Poll::Ready(None) => return Poll::Ready(Ok(0)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let Some(chunk) = this.current.as_mut() else {
            return Poll::Pending;
        };
        if chunk.at > Instant::now() {
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(chunk.at)));
            if timer.deadline() != chunk.at {
                timer.as_mut().reset(chunk.at);
            }
            ready!(timer.as_mut().poll(cx));
        }
        let n = buf.len().min(chunk.data.len() - chunk.read);
        buf[..n].copy_from_slice(&chunk.data[chunk.read..chunk.read + n]);
        chunk.read += n;
        if chunk.read == chunk.data.len() {
            this.current = None;
        }
        Poll::Ready(Ok(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_memory_addresses_are_ours() {
        let p = |s: &str| parse_port(&s.parse().expect("addr"));
        assert_eq!(p("/memory/10001"), Some(10001));
        assert_eq!(
            p("/memory/7/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"),
            Some(7)
        );
        assert_eq!(
            p("/memory/7/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit"),
            None
        );
        assert_eq!(p("/ip4/127.0.0.1/tcp/1"), None);
    }

    #[test]
    fn draws_are_uniform_and_repeatable() {
        let net = Net::new(
            7,
            Model {
                latency: vec![vec![Duration::ZERO]],
                bandwidth: 0,
                dial_failure: 0.0,
            },
            &[],
        );
        let draws: Vec<f64> = (0..10_000).map(|i| net.draw(&[1, i, i + 1])).collect();
        let share = draws.iter().filter(|&&d| d < 0.7).count() as f64 / draws.len() as f64;
        assert!((share - 0.7).abs() < 0.03, "{share}");
        assert_eq!(net.draw(&[1, 3, 4]), net.draw(&[1, 3, 4]));
    }

    #[test]
    fn nats_let_in_what_the_namespace_routers_let_in() {
        use Nat::*;
        let reuse = PortUse::Reuse;
        // Public: anything.
        assert!(nat_admits(Public, false, Dependent, PortUse::New));
        // Two endpoint-independent NATs dialing each other from their reused ports: a punch.
        assert!(nat_admits(Independent, true, Independent, reuse));
        assert!(nat_admits(Independent, true, Public, reuse));
        // Unsolicited, a dial-back from a new port, or from behind a port-per-destination NAT.
        assert!(!nat_admits(Independent, false, Independent, reuse));
        assert!(!nat_admits(Independent, true, Public, PortUse::New));
        assert!(!nat_admits(Independent, true, Dependent, reuse));
        // Endpoint-dependent: nothing comes in.
        assert!(!nat_admits(Dependent, true, Independent, reuse));
        assert!(!nat_admits(Dependent, true, Public, reuse));
    }
}

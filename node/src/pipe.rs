//! Call pipes (DESIGN §5): one long-lived stream per peer carries all of our calls to it.
//!
//! A request-response exchange opens a stream, negotiates its protocol, sends one request, reads
//! one response and closes, and both ends route every message through their swarm's event loop.
//! On loopback that costs about as much as two signatures. A pipe opens once and then carries
//! tagged frames both ways, straight between the calling task and the connection: the event loop
//! is not on the path. Calls on a pipe run concurrently and answer in any order; frames queued
//! together go out in one write.
//!
//! Each side's writer also signs what it sends: calls and results queue unsigned, and those that
//! queued together are signed under one batch signature (`envelope::sign_batch`), so at 64
//! calls in flight a pipe pays about one signature per write instead of one per call. A frame
//! that goes out alone carries an ordinary (version 1) envelope.
//!
//! Frame: a 4-byte big-endian length of what follows, an 8-byte big-endian tag, then a `call`
//! envelope (caller to callee) or a `call-result` envelope (back, with the call's tag). Lengths
//! are checked before anything is allocated. A callee's first frame is an empty one tagged
//! [`ACCEPTED`]: a pipe that ends before it was never read, so its calls can go again on a new
//! one (a callee may drop a stream it had no room to accept), signed anew with what queued
//! beside them there: the payload, and with it the call id the callee's replay check keys on,
//! stays the same.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::core::upgrade::NegotiationError;
use libp2p::futures::io::{BufReader, ReadHalf, WriteHalf};
use libp2p::futures::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt,
};
use libp2p::{PeerId, Stream, StreamProtocol};
use skillmesh_protocol::envelope::{self, Checks, MAX_BATCH};
use skillmesh_protocol::keys::CALL_PROTOCOL;
use skillmesh_protocol::{CallResult, EnvelopeError, Kind, SigningKey, Unsigned};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::calls::Inbound;
use crate::error::{Error, Result};
use crate::event_loop::Command;

/// Why a call to a peer without call pipes fails.
const NOT_SERVED: &str = "it does not serve skill calls (no call pipe protocol)";
/// The stream protocol of call pipes.
pub(crate) const PROTOCOL: StreamProtocol = StreamProtocol::new(CALL_PROTOCOL);
/// The tag of the callee's first, empty frame: it has taken the pipe and reads it.
const ACCEPTED: u64 = u64::MAX;
/// Pipes tried per call when they end before the callee took them.
const ATTEMPTS: usize = 3;
/// Frames queued for a pipe's writer; callers wait (and their timeouts run) beyond this.
const WRITE_QUEUE: usize = 256;
/// Bytes gathered into one write at most.
const WRITE_BATCH: usize = 64 * 1024;
/// Calls waiting for answers on one pipe at most.
const MAX_PENDING: usize = 4096;
/// A caller closes a pipe that has carried no call for this long; the connection may then go
/// idle and close as usual.
const CALLER_IDLE: Duration = Duration::from_secs(15);
/// A callee closes a pipe that has sent it nothing for this long.
const CALLEE_IDLE: Duration = Duration::from_secs(60);
/// Pipes one peer may hold open to us at once.
const MAX_PIPES_PER_PEER: usize = 4;
/// Opening a stream on a connection we have, or dialing one.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The wait before a second try at opening a pipe whose connection closed under it.
const REOPEN_PAUSE: Duration = Duration::from_millis(200);
/// Calls a callee reads ahead of those it answered, per pipe, on top of the per-peer limit:
/// enough that a caller over the limit hears "busy" instead of silence.
const READ_AHEAD: usize = 16;
/// Each pipe reader's buffer: frames that arrive together are read from it together, and their
/// signatures checked as one batch.
const READ_BUFFER: usize = 64 * 1024;

/// A pipe's stream, split for its reader and writer tasks, which touch it no more once a read
/// has failed.
///
/// Our pipes negotiate lazily: the first call goes out with the protocol proposal, and the
/// callee's confirmation is read with its first frame. When that read fails (the callee refused
/// the protocol or dropped the stream), multistream-select leaves the stream in a state in which
/// any later write, flush or read panics ("Negotiated: Invalid state"), and the writer task may
/// still hold frames: 1,000 netsim nodes hit it. From the first failed read on, this answers
/// every use with a broken pipe instead.
struct Guarded<S> {
    inner: S,
    failed: bool,
}

fn split_guarded(stream: Stream) -> (ReadHalf<Guarded<Stream>>, WriteHalf<Guarded<Stream>>) {
    Guarded {
        inner: stream,
        failed: false,
    }
    .split()
}

impl<S> Guarded<S> {
    fn broken() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "the pipe's stream failed")
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.failed {
            return Poll::Ready(Err(Self::broken()));
        }
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Err(_)) = r {
            self.failed = true;
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.failed {
            return Poll::Ready(Err(Self::broken()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.failed {
            return Poll::Ready(Err(Self::broken()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.failed {
            return Poll::Ready(Err(Self::broken()));
        }
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// A result as the caller's pipe read it: signature checked, decoded, signed by the callee.
pub(crate) type Answer = std::result::Result<CallResult, EnvelopeError>;

/// Calls in flight per peer, both ways, and when each peer last had one: the event loop spares
/// busy and recently busy peers' connections when it trims.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    peers: Mutex<HashMap<PeerId, Busy>>,
    serving: watch::Sender<usize>,
}

#[derive(Debug)]
struct Busy {
    calls: u32,
    last: Instant,
}

impl Activity {
    fn begin(self: &Arc<Self>, peer: PeerId, serving: bool) -> ActivityGuard {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let busy = peers.entry(peer).or_insert(Busy {
            calls: 0,
            last: Instant::now(),
        });
        busy.calls += 1;
        busy.last = Instant::now();
        if serving {
            self.serving.send_modify(|n| *n += 1);
        }
        ActivityGuard {
            activity: self.clone(),
            peer,
            serving,
        }
    }

    /// Peers with a call in flight.
    pub(crate) fn busy(&self) -> Vec<PeerId> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers
            .iter()
            .filter(|(_, b)| b.calls > 0)
            .map(|(p, _)| *p)
            .collect()
    }

    /// When `peer` last had a call in flight.
    pub(crate) fn last(&self, peer: &PeerId) -> Option<Instant> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.get(peer).map(|b| b.last)
    }

    /// Forgets idle peers `keep` rejects (those no longer connected), so the map stays small.
    pub(crate) fn prune(&self, keep: impl Fn(&PeerId) -> bool) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.retain(|p, b| b.calls > 0 || keep(p));
    }

    /// Waits until no inbound call is running.
    pub(crate) async fn served(&self) {
        let mut rx = self.serving.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Inbound calls running.
    pub(crate) fn serving(&self) -> usize {
        *self.serving.borrow()
    }
}

struct ActivityGuard {
    activity: Arc<Activity>,
    peer: PeerId,
    serving: bool,
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let mut peers = self
            .activity
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(b) = peers.get_mut(&self.peer) {
            b.calls = b.calls.saturating_sub(1);
            b.last = Instant::now();
        }
        if self.serving {
            self.activity
                .serving
                .send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

// ---- framing -------------------------------------------------------------------------------------

/// A pipe frame: a length-prefixed frame (the mailbox's framing) whose bytes start with the tag.
fn frame(tag: u64, body: &[u8]) -> Vec<u8> {
    crate::wire::encode_frame(&[&tag.to_be_bytes(), body])
}

/// Reads one frame; `None` at a clean end of stream. A pipe frame is a mailbox-style frame
/// (length, then bytes) whose bytes start with the tag.
async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> io::Result<Option<(u64, Vec<u8>)>> {
    let Some(mut bytes) = crate::wire::next_frame(io, max + 8).await? else {
        return Ok(None);
    };
    let tag = tag_of(&bytes)?;
    bytes.drain(..8);
    Ok(Some((tag, bytes)))
}

/// The tag a frame's bytes start with.
fn tag_of(frame: &[u8]) -> io::Result<u64> {
    frame
        .first_chunk::<8>()
        .map(|t| u64::from_be_bytes(*t))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {} bytes has no room for its tag", frame.len()),
            )
        })
}

/// Reads one frame, waiting for it, then those already buffered behind it, `limit` in all at
/// most: frames that arrived together are handled, and their signatures checked, together.
/// Empty at a clean end of stream.
async fn read_frames<R: AsyncRead + Unpin>(
    io: &mut BufReader<R>,
    max: usize,
    limit: usize,
) -> io::Result<Vec<(u64, Vec<u8>)>> {
    let mut frames = Vec::new();
    let Some(first) = read_frame(io, max).await? else {
        return Ok(frames);
    };
    frames.push(first);
    while frames.len() < limit {
        match buffered_frame(io, max)? {
            Some(f) => frames.push(f),
            None => break,
        }
    }
    Ok(frames)
}

/// The next frame, if all of it is in `io`'s buffer already; the same checks as [`read_frame`].
fn buffered_frame<R: AsyncRead + Unpin>(
    io: &mut BufReader<R>,
    max: usize,
) -> io::Result<Option<(u64, Vec<u8>)>> {
    let buf = io.buffer();
    let Some(len) = buf.get(..4).and_then(|l| <[u8; 4]>::try_from(l).ok()) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len) as usize;
    if len > max + 8 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the limit of {}", max + 8),
        ));
    }
    let Some(frame) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let f = (tag_of(frame)?, frame[8..].to_vec());
    io.consume_unpin(4 + len);
    Ok(Some(f))
}

/// A call envelope as a pipe takes it.
#[derive(Clone, Debug)]
pub(crate) enum Request {
    /// Signed already ([`crate::Node::call_raw`]): it goes out as it is.
    Signed(Vec<u8>),
    /// Prepared by our key: the pipe's writer signs it with what queued beside it.
    Unsigned(Unsigned),
}

impl Request {
    /// The envelope signed alone, for a call that takes no pipe (one to ourselves).
    pub(crate) fn signed(self, key: &SigningKey) -> Vec<u8> {
        match self {
            Request::Signed(bytes) => bytes,
            Request::Unsigned(u) => u.sign(key),
        }
    }
}

/// What a pipe's writer is asked to do.
#[derive(Debug)]
enum Out {
    /// Send a frame as it is.
    Frame(Vec<u8>),
    /// Sign an envelope, with the others that queued beside it, and send it under a tag.
    Sign(u64, Unsigned),
    /// Close the stream's write side after what queued before.
    Close,
}

/// Writes queued frames, several per write when they queue up, until the queue closes, it is
/// asked to close, or a write fails; then closes the stream's write side. The envelopes of one
/// wake-up are signed together with `key`: they share one signature.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut io: W,
    mut rx: mpsc::Receiver<Out>,
    key: SigningKey,
) {
    let mut batch = Vec::new();
    let mut buf = Vec::new();
    let mut closing = false;
    while !closing && rx.recv_many(&mut batch, WRITE_QUEUE).await > 0 {
        buf.clear();
        let unsigned: Vec<&Unsigned> = batch
            .iter()
            .filter_map(|o| match o {
                Out::Sign(_, u) => Some(u),
                _ => None,
            })
            .collect();
        let mut signed = envelope::sign_batch(&key, &unsigned).into_iter();
        for o in batch.drain(..) {
            let f = match o {
                Out::Frame(f) => f,
                // sign_batch gives one envelope per input, in order.
                Out::Sign(tag, _) => frame(tag, &signed.next().unwrap_or_default()),
                Out::Close => {
                    closing = true;
                    break;
                }
            };
            if !buf.is_empty() && buf.len() + f.len() > WRITE_BATCH {
                if io.write_all(&buf).await.is_err() {
                    return;
                }
                buf.clear();
            }
            buf.extend_from_slice(&f);
        }
        if io.write_all(&buf).await.is_err() || io.flush().await.is_err() {
            return;
        }
    }
    let _ = io.close().await;
}

// ---- the caller's side ---------------------------------------------------------------------------

/// Our pipes to other peers, and the serving of theirs.
pub(crate) struct Pipes {
    control: libp2p_stream::Control,
    /// Signs the calls our pipes' writers send.
    signing: SigningKey,
    open: Mutex<HashMap<PeerId, Arc<Pipe>>>,
    opening: Mutex<HashMap<PeerId, Arc<tokio::sync::Mutex<()>>>>,
    activity: Arc<Activity>,
    /// Weak: open pipes must not keep the event loop alive once every node handle is gone.
    commands: mpsc::WeakSender<Command>,
}

impl std::fmt::Debug for Pipes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipes").finish_non_exhaustive()
    }
}

struct Pipe {
    state: Mutex<PipeState>,
    frames: mpsc::Sender<Out>,
}

struct PipeState {
    next: u64,
    pending: HashMap<u64, oneshot::Sender<std::result::Result<Answer, PipeError>>>,
    last_used: Instant,
    closed: bool,
    /// Whether the callee said it took the pipe.
    accepted: bool,
}

/// Why a call on a pipe failed.
#[derive(Debug)]
enum PipeError {
    /// The callee never read the call (the pipe closed before the call was sent, or before the
    /// callee took it): a new pipe may carry it.
    Closed,
    /// The call went out and no answer came back.
    Lost(String),
    /// The peer does not serve call pipes: its answer to our optimistic (lazy) protocol
    /// negotiation was a refusal.
    Unsupported,
}

impl Pipes {
    pub(crate) fn new(
        control: libp2p_stream::Control,
        signing: SigningKey,
        activity: Arc<Activity>,
        commands: mpsc::WeakSender<Command>,
    ) -> Arc<Self> {
        Arc::new(Pipes {
            control,
            signing,
            open: Mutex::default(),
            opening: Mutex::default(),
            activity,
            commands,
        })
    }

    /// Sends a call to `peer` and returns its result, opened (or why it could not be). The
    /// caller bounds the time.
    pub(crate) async fn call(self: &Arc<Self>, peer: PeerId, request: Request) -> Result<Answer> {
        let _busy = self.activity.begin(peer, false);
        // A pipe may close before the callee read our call: between our finding it and the call
        // going out (it went idle, its connection closed), or before the callee took it (it had
        // no room). Then a fresh pipe may carry the same call; were it ever read twice, the
        // callee's replay check (on its call id) would refuse the second.
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
            }
            let pipe = self.pipe(peer).await?;
            match pipe.call(&request).await {
                Ok(response) => return Ok(response),
                Err(PipeError::Closed) => self.forget(peer, &pipe),
                Err(PipeError::Lost(reason)) => {
                    return Err(Error::Unreachable {
                        peer: Box::new(peer),
                        reason,
                    });
                }
                Err(PipeError::Unsupported) => {
                    return Err(Error::Unreachable {
                        peer: Box::new(peer),
                        reason: NOT_SERVED.to_owned(),
                    });
                }
            }
        }
        Err(Error::Unreachable {
            peer: Box::new(peer),
            reason: format!("{ATTEMPTS} call pipes closed before it took them"),
        })
    }

    fn forget(&self, peer: PeerId, pipe: &Arc<Pipe>) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.get(&peer).is_some_and(|p| Arc::ptr_eq(p, pipe)) {
            open.remove(&peer);
        }
    }

    fn existing(&self, peer: &PeerId) -> Option<Arc<Pipe>> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(peer).filter(|p| !p.is_closed()).cloned()
    }

    /// The open pipe to `peer`, or a new one: connected first (through the event loop, which
    /// dials known addresses and asks the DHT for others), then a stream opened on it. One
    /// opening per peer at a time; calls arriving meanwhile wait for it.
    async fn pipe(self: &Arc<Self>, peer: PeerId) -> Result<Arc<Pipe>> {
        if let Some(p) = self.existing(&peer) {
            return Ok(p);
        }
        let gate = Gate {
            pipes: self,
            peer,
            turn: {
                let mut opening = self.opening.lock().unwrap_or_else(|e| e.into_inner());
                opening.entry(peer).or_default().clone()
            },
        };
        let _turn = gate.turn.lock().await;
        if let Some(p) = self.existing(&peer) {
            return Ok(p);
        }
        let stream = self.open_stream(peer).await?;
        let pipe = Pipe::start(peer, stream, self.clone());
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.insert(peer, pipe.clone());
        Ok(pipe)
    }

    async fn open_stream(&self, peer: PeerId) -> Result<Stream> {
        let unreachable = |reason: String| Error::Unreachable {
            peer: Box::new(peer),
            reason,
        };
        // A connection can close under a stream being opened (trimmed, idle, the peer's
        // limits); nothing was sent on it, so connect and try once more, after a moment for
        // the event loop to learn that the connection closed (until then it is "connected").
        let mut last = String::new();
        for attempt in 0..2 {
            if attempt > 0 {
                tokio::time::sleep(REOPEN_PAUSE).await;
            }
            let (tx, rx) = oneshot::channel();
            self.commands
                .upgrade()
                .ok_or(Error::ShutDown)?
                .send(Command::Connect { peer, reply: tx })
                .await
                .map_err(|_| Error::ShutDown)?;
            rx.await.map_err(|_| Error::ShutDown)??;
            let mut control = self.control.clone();
            match tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, PROTOCOL)).await {
                Ok(Ok(stream)) => return Ok(stream),
                // Only with eager negotiation; under `behaviour::STREAMS` (lazy) the refusal
                // comes on the pipe's first read instead (`refused_protocol`).
                Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_))) => {
                    return Err(unreachable(NOT_SERVED.to_owned()));
                }
                // The connection closed under the stream being opened: libp2p says only
                // "oneshot canceled".
                Ok(Err(libp2p_stream::OpenStreamError::Io(e)))
                    if e.kind() == std::io::ErrorKind::ConnectionReset =>
                {
                    last = "the connection closed before a call pipe opened on it (the callee \
                            may have refused it at its connection limit)"
                        .to_owned();
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("no call pipe opened within {OPEN_TIMEOUT:?}"),
            }
        }
        Err(unreachable(last))
    }
}

/// Whether a pipe's read failed because the peer refused the protocol. Outbound streams
/// negotiate lazily (`behaviour.rs`): the call goes out with the protocol proposal, and a
/// refusal arrives as the first read instead of failing the open.
fn refused_protocol(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<NegotiationError>())
        .is_some_and(|n| matches!(n, NegotiationError::Failed))
}

/// A caller's place in the line to open a pipe to `peer`; the last one out (however it leaves:
/// done, failed, or its call timed out) removes the line.
struct Gate<'a> {
    pipes: &'a Pipes,
    peer: PeerId,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        let mut opening = self.pipes.opening.lock().unwrap_or_else(|e| e.into_inner());
        // Ours and the map's: nobody else is waiting.
        if Arc::strong_count(&self.turn) <= 2 {
            opening.remove(&self.peer);
        }
    }
}

impl Pipe {
    fn start(peer: PeerId, stream: Stream, pipes: Arc<Pipes>) -> Arc<Pipe> {
        let (read, write) = split_guarded(stream);
        let (frames, rx) = mpsc::channel(WRITE_QUEUE);
        let key = pipes.signing.clone();
        let pipe = Arc::new(Pipe {
            state: Mutex::new(PipeState {
                next: 0,
                pending: HashMap::new(),
                last_used: Instant::now(),
                closed: false,
                accepted: false,
            }),
            frames,
        });
        tokio::spawn(write_frames(write, rx, key));
        tokio::spawn(pipe.clone().read_results(peer, read, pipes.clone()));
        tokio::spawn(pipe.clone().close_when_idle(peer, pipes));
        pipe
    }

    fn is_closed(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed
    }

    async fn call(self: &Arc<Self>, request: &Request) -> std::result::Result<Answer, PipeError> {
        let (tx, rx) = oneshot::channel();
        let tag = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.closed {
                return Err(PipeError::Closed);
            }
            if st.pending.len() >= MAX_PENDING {
                return Err(PipeError::Lost(format!(
                    "{MAX_PENDING} calls already wait for it"
                )));
            }
            let tag = st.next;
            st.next += 1;
            st.pending.insert(tag, tx);
            st.last_used = Instant::now();
            tag
        };
        // Dropped (the caller timed out, or gave up) or not, the tag leaves the map.
        let _unlist = Unlist { pipe: self, tag };
        let out = match request {
            Request::Signed(bytes) => Out::Frame(frame(tag, bytes)),
            Request::Unsigned(u) => Out::Sign(tag, u.clone()),
        };
        if self.frames.send(out).await.is_err() {
            return Err(PipeError::Closed);
        }
        rx.await
            .map_err(|_| PipeError::Lost("the pipe was dropped".to_owned()))?
    }

    async fn read_results(
        self: Arc<Self>,
        peer: PeerId,
        read: ReadHalf<Guarded<Stream>>,
        pipes: Arc<Pipes>,
    ) {
        let max = Kind::CallResult.max_envelope();
        let mut read = BufReader::with_capacity(READ_BUFFER, read);
        let end = loop {
            let frames = match read_frames(&mut read, max, MAX_BATCH).await {
                Ok(f) if f.is_empty() => break "closed".to_owned(),
                Ok(f) => f,
                Err(e) if refused_protocol(&e) => {
                    tracing::debug!(%peer, "call pipe refused: {NOT_SERVED}");
                    self.close(peer, &pipes, true);
                    return;
                }
                Err(e) => break e.to_string(),
            };
            let results: Vec<&[u8]> = frames
                .iter()
                .filter(|(tag, _)| *tag != ACCEPTED)
                .map(|(_, body)| body.as_slice())
                .collect();
            let checks = Checks::now().signed_by(peer);
            let mut answers = envelope::verify_batch(&results)
                .into_iter()
                .map(|v| {
                    v.and_then(|v| v.decode::<CallResult>(&checks))
                        .map(|o| o.value)
                })
                .collect::<Vec<Answer>>()
                .into_iter();
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            for (tag, _) in &frames {
                if *tag == ACCEPTED {
                    st.accepted = true;
                    continue;
                }
                let answer = answers.next();
                // No waiter: the call timed out here; its late answer is dropped.
                if let (Some(w), Some(a)) = (st.pending.remove(tag), answer) {
                    let _ = w.send(Ok(a));
                }
            }
        };
        tracing::debug!(%peer, "call pipe ended: {end}");
        self.close(peer, &pipes, false);
    }

    /// Marks the pipe closed, fails the calls waiting on it (`refused`: the peer does not
    /// serve call pipes), and forgets it.
    fn close(self: &Arc<Self>, peer: PeerId, pipes: &Pipes, refused: bool) {
        let (waiting, accepted) = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.closed = true;
            (std::mem::take(&mut st.pending), st.accepted)
        };
        for (_, w) in waiting {
            let _ = w.send(Err(if refused {
                PipeError::Unsupported
            } else if accepted {
                PipeError::Lost("the connection closed before the result came".to_owned())
            } else {
                PipeError::Closed
            }));
        }
        pipes.forget(peer, self);
        let _ = self.frames.try_send(Out::Close);
    }

    /// Closes the pipe once it has been unused for [`CALLER_IDLE`] with nothing in flight; the
    /// callee then closes its end and our reader ends.
    async fn close_when_idle(self: Arc<Self>, peer: PeerId, pipes: Arc<Pipes>) {
        loop {
            let wake = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.closed {
                    return;
                }
                let idle = st.last_used.elapsed();
                if st.pending.is_empty() && idle >= CALLER_IDLE {
                    // Under the lock: a call either got in before (and is pending) or sees
                    // the pipe closed and opens another.
                    st.closed = true;
                    None
                } else {
                    Some(CALLER_IDLE.saturating_sub(idle).max(Duration::from_secs(1)))
                }
            };
            match wake {
                Some(d) => tokio::time::sleep(d).await,
                None => break,
            }
        }
        pipes.forget(peer, &self);
        let _ = self.frames.send(Out::Close).await;
    }
}

/// Takes a call's tag out of the pending map when the call ends, however it ends.
struct Unlist<'a> {
    pipe: &'a Pipe,
    tag: u64,
}

impl Drop for Unlist<'_> {
    fn drop(&mut self) {
        let mut st = self.pipe.state.lock().unwrap_or_else(|e| e.into_inner());
        st.pending.remove(&self.tag);
        st.last_used = Instant::now();
    }
}

// ---- the callee's side ---------------------------------------------------------------------------

/// Limits of the serving side.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ServeLimits {
    /// Pipes open to us at once, from everyone.
    pub(crate) max_pipes: usize,
    /// Calls one pipe may have running before we stop reading it.
    pub(crate) per_pipe: usize,
}

impl ServeLimits {
    pub(crate) fn new(max_inbound: u32, max_inbound_per_peer: u32) -> Self {
        ServeLimits {
            max_pipes: (max_inbound as usize).max(MAX_PIPES_PER_PEER),
            per_pipe: max_inbound_per_peer as usize + READ_AHEAD,
        }
    }
}

/// Accepts call pipes and serves the calls on them until `stop` turns true.
pub(crate) async fn serve(
    mut control: libp2p_stream::Control,
    inbound: Arc<Inbound>,
    activity: Arc<Activity>,
    limits: ServeLimits,
    mut stop: watch::Receiver<bool>,
) {
    let mut incoming = match control.accept(PROTOCOL) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!("cannot serve skill calls: {e}");
            return;
        }
    };
    let open: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
    loop {
        let (peer, stream) = tokio::select! {
            next = incoming.next() => match next {
                Some(s) => s,
                None => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let admitted = {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            let total: usize = open.values().sum();
            let mine = open.entry(peer).or_insert(0);
            if *mine >= MAX_PIPES_PER_PEER || total >= limits.max_pipes {
                false
            } else {
                *mine += 1;
                true
            }
        };
        if !admitted {
            tracing::debug!(%peer, "call pipe refused: too many open");
            continue;
        }
        let (inbound, activity, open, stop) = (
            inbound.clone(),
            activity.clone(),
            open.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            serve_pipe(peer, stream, inbound, activity, limits, stop).await;
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = open.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&peer);
                }
            }
        });
    }
}

async fn serve_pipe(
    peer: PeerId,
    stream: Stream,
    inbound: Arc<Inbound>,
    activity: Arc<Activity>,
    limits: ServeLimits,
    mut stop: watch::Receiver<bool>,
) {
    let (read, write) = split_guarded(stream);
    let (frames_tx, rx) = mpsc::channel(WRITE_QUEUE);
    tokio::spawn(write_frames(write, rx, inbound.signing().clone()));
    if frames_tx
        .send(Out::Frame(frame(ACCEPTED, &[])))
        .await
        .is_err()
    {
        return;
    }
    let room = Arc::new(Semaphore::new(limits.per_pipe));
    let max = Kind::Call.max_envelope();
    let mut read = BufReader::with_capacity(READ_BUFFER, read);
    loop {
        // Reading stops while the pipe has its fill of calls running: the caller's stream
        // window fills and it waits, instead of us queueing without bound.
        let Ok(first) = room.clone().acquire_owned().await else {
            return;
        };
        let limit = (1 + room.available_permits()).min(MAX_BATCH);
        let next = tokio::select! {
            r = tokio::time::timeout(CALLEE_IDLE, read_frames(&mut read, max, limit)) => r,
            // Shutting down: no new calls; those running still answer.
            _ = stop.wait_for(|s| *s) => break,
        };
        let frames = match next {
            Ok(Ok(f)) if f.is_empty() => break,
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tracing::debug!(%peer, "call pipe broken: {e}");
                break;
            }
            Err(_) => {
                tracing::debug!(%peer, "call pipe idle; closing");
                break;
            }
        };
        let requests: Vec<&[u8]> = frames.iter().map(|(_, r)| r.as_slice()).collect();
        let calls = inbound.open(peer, &requests);
        let mut slots = std::iter::once(Some(first)).chain(std::iter::repeat_with(|| {
            room.clone().try_acquire_owned().ok()
        }));
        for ((tag, request), call) in frames.into_iter().zip(calls) {
            // Only this loop takes permits, and `limit` counted them: there is one.
            let slot = slots.next().flatten();
            let busy = activity.begin(peer, true);
            let (inbound, tx) = (inbound.clone(), frames_tx.clone());
            tokio::spawn(async move {
                let out = match inbound.handle_opened(peer, &request, call).await {
                    Some(result) => Out::Sign(tag, result),
                    // No result could be sealed: an empty frame, which the caller refuses.
                    None => Out::Frame(frame(tag, &[])),
                };
                let _ = tx.send(out).await;
                drop((busy, slot));
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::futures::io::Cursor;

    fn key() -> SigningKey {
        SigningKey::from_keypair(&libp2p::identity::Keypair::generate_ed25519()).expect("ed25519")
    }

    /// A call prepared by `k`, told apart by `i`.
    fn unsigned(k: &SigningKey, i: u64) -> Unsigned {
        let now = skillmesh_protocol::Timestamp::now();
        let call = skillmesh_protocol::Call {
            call_id: skillmesh_protocol::CallId([i as u8; 16]),
            caller: k.peer_id(),
            target: k.peer_id(),
            skill: skillmesh_protocol::SkillName::new("echo").expect("name"),
            version_req: "*".parse().expect("req"),
            args: serde_bytes::ByteBuf::from(skillmesh_protocol::to_cbor(&i)),
            issued_at: now,
            expires_at: now.saturating_add(Duration::from_secs(30)),
            mode: skillmesh_protocol::Mode::Sync,
            grant: None,
        };
        envelope::prepare(k, &call).expect("prepare")
    }

    #[tokio::test]
    async fn envelopes_queued_together_share_one_signature_and_keep_their_order() {
        let k = key();
        let (tx, rx) = mpsc::channel(16);
        let calls: Vec<Unsigned> = (0..5).map(|i| unsigned(&k, i)).collect();
        tx.send(Out::Frame(frame(100, b"as is")))
            .await
            .expect("queue");
        for (i, u) in calls.iter().enumerate() {
            tx.send(Out::Sign(i as u64, u.clone()))
                .await
                .expect("queue");
        }
        tx.send(Out::Close).await.expect("queue");
        // Past the close: never written.
        tx.send(Out::Sign(9, unsigned(&k, 9))).await.expect("queue");
        drop(tx);
        let mut out = Cursor::new(Vec::new());
        write_frames(&mut out, rx, k.clone()).await;
        let bytes = out.into_inner();
        let mut r = Cursor::new(&bytes);
        let first = read_frame(&mut r, 4096).await.expect("read");
        assert_eq!(first, Some((100, b"as is".to_vec())));
        let mut signatures = Vec::new();
        for (i, u) in calls.iter().enumerate() {
            let (tag, e) = read_frame(&mut r, 4096)
                .await
                .expect("read")
                .expect("frame");
            assert_eq!(tag, i as u64);
            let v = envelope::verify(&e).expect("verifies alone");
            assert_eq!(v.signer(), k.peer_id());
            assert_eq!(v.payload(), u.payload());
            signatures.push(e[36..100].to_vec());
        }
        assert!(
            signatures.iter().all(|s| *s == signatures[0]),
            "one signature"
        );
        assert_eq!(read_frame(&mut r, 4096).await.expect("end"), None);
    }

    #[tokio::test]
    async fn frames_round_trip_and_bad_lengths_are_refused_before_allocating() {
        let f = frame(7, b"hello");
        assert_eq!(&f[..4], &13u32.to_be_bytes());
        let got = read_frame(&mut Cursor::new(&f), 10).await.expect("read");
        assert_eq!(got, Some((7, b"hello".to_vec())));
        // Over the limit, or claiming 4 GiB with no body: refused by the length check.
        assert!(read_frame(&mut Cursor::new(&f), 4).await.is_err());
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        let err = read_frame(&mut Cursor::new(&huge), 1024)
            .await
            .expect_err("oversize");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A length too short to hold the tag.
        let short = [0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(read_frame(&mut Cursor::new(&short), 1024).await.is_err());
        // A clean end between frames is the end of the pipe; one inside a frame is an error.
        assert_eq!(
            read_frame(&mut Cursor::new(&[]), 10).await.expect("eof"),
            None
        );
        assert!(read_frame(&mut Cursor::new(&f[..6]), 10).await.is_err());
    }

    #[tokio::test]
    async fn frames_that_arrived_together_are_read_together() {
        let mut bytes = Vec::new();
        for i in 0..5u64 {
            bytes.extend(frame(i, &[i as u8; 3]));
        }
        // Half of a sixth frame: it waits for the next read.
        bytes.extend(&frame(5, &[5; 3])[..9]);
        let mut r = BufReader::with_capacity(1024, Cursor::new(bytes));
        let got = read_frames(&mut r, 10, 3).await.expect("read");
        assert_eq!(got.iter().map(|f| f.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        let got = read_frames(&mut r, 10, 64).await.expect("read");
        assert_eq!(got, vec![(3, vec![3; 3]), (4, vec![4; 3])]);
        assert!(
            read_frames(&mut r, 10, 64).await.is_err(),
            "cut inside a frame"
        );
        // A buffered frame over the limit is refused as a read one is.
        let mut big = frame(0, &[0; 3]);
        big.extend(frame(1, &[0; 30]));
        let mut r = BufReader::with_capacity(1024, Cursor::new(big));
        assert!(read_frames(&mut r, 10, 64).await.is_err());
    }

    #[tokio::test]
    async fn queued_frames_are_written_together_in_order() {
        let (tx, rx) = mpsc::channel(8);
        for i in 0..5u64 {
            tx.send(Out::Frame(frame(i, &[i as u8; 3])))
                .await
                .expect("queue");
        }
        drop(tx);
        let mut out = Cursor::new(Vec::new());
        write_frames(&mut out, rx, key()).await;
        let bytes = out.into_inner();
        let mut r = Cursor::new(&bytes);
        for i in 0..5u64 {
            let got = read_frame(&mut r, 10).await.expect("read");
            assert_eq!(got, Some((i, vec![i as u8; 3])));
        }
        assert_eq!(read_frame(&mut r, 10).await.expect("end"), None);
    }

    /// Stands for a lazily negotiated stream: once a read failed, any later use panics.
    struct Fragile {
        failed: bool,
    }

    impl AsyncRead for Fragile {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            assert!(!self.failed, "read after a failed read");
            self.failed = true;
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    impl AsyncWrite for Fragile {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            assert!(!self.failed, "write after a failed read");
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            assert!(!self.failed, "flush after a failed read");
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            assert!(!self.failed, "close after a failed read");
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_stream_whose_read_failed_is_not_used_again() {
        let (read, write) = Guarded {
            inner: Fragile { failed: false },
            failed: false,
        }
        .split();
        let mut read = BufReader::new(read);
        assert!(read_frame(&mut read, 10).await.is_err(), "the failed read");
        let err = read_frame(&mut read, 10).await.expect_err("a second read");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        // The writer still holds a frame: it stops at the first write, without a panic.
        let (tx, rx) = mpsc::channel(8);
        tx.send(Out::Frame(frame(1, b"late"))).await.expect("queue");
        drop(tx);
        write_frames(write, rx, key()).await;
    }
}

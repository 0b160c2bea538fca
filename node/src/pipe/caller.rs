//! The caller's side: our pipes to other peers.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::core::upgrade::NegotiationError;
use libp2p::futures::io::{BufReader, ReadHalf};
use libp2p::{PeerId, Stream};
use skillmesh_protocol::envelope::{self, Checks, MAX_BATCH};
use skillmesh_protocol::{CallResult, Kind, SigningKey};
use tokio::sync::{mpsc, oneshot};

use super::{
    ACCEPTED, Activity, Answer, ENVELOPE, Frame, Guarded, Out, READ_BUFFER, Request, WRITE_QUEUE,
    credit, frame, read_frames, split_guarded, write_frames,
};
use crate::error::{Error, Result};
use crate::event_loop::Command;

use super::streams::{self, Gone, OpenError};

/// Why a call to a peer without call pipes fails.
const NOT_SERVED: &str = "it does not serve skill calls (no call pipe protocol)";
/// Pipes tried per call when they end before the callee took them.
const ATTEMPTS: usize = 3;
/// Calls waiting for answers on one pipe at most.
const MAX_PENDING: usize = 4096;
/// A caller closes a pipe that has carried no call for this long; the connection may then go
/// idle and close as usual.
const CALLER_IDLE: Duration = Duration::from_secs(15);
/// Opening a stream on a connection we have, or dialing one.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The wait before a second try at opening a pipe whose connection closed under it.
const REOPEN_PAUSE: Duration = Duration::from_millis(200);

// ---- the caller's side ---------------------------------------------------------------------------

/// Our pipes to other peers, and the serving of theirs.
pub(crate) struct Pipes {
    control: streams::Control,
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
    peer: PeerId,
    state: Mutex<PipeState>,
    frames: mpsc::Sender<Out>,
}

struct PipeState {
    next: u64,
    pending: HashMap<u64, Waiter>,
    last_used: Instant,
    closed: bool,
    /// Whether the callee said it took the pipe.
    accepted: bool,
}

/// Who waits for the frames of a tag.
enum Waiter {
    /// A call (or cancel) answered by one result envelope.
    Once(oneshot::Sender<std::result::Result<Answer, PipeError>>),
    /// A stream call: its frames as they come, for [`StreamCall`] to check; room for a full
    /// window and the last chunk. A callee that sends past the window overflows it and the
    /// stream ends.
    Stream(mpsc::Sender<std::result::Result<Frame, PipeError>>),
}

/// A stream call under way on a pipe: its tag, its frames, and the pipe, for credits.
pub(crate) struct StreamCall {
    pipe: Arc<Pipe>,
    tag: u64,
    frames: mpsc::Receiver<std::result::Result<Frame, PipeError>>,
    _busy: super::ActivityGuard,
}

impl StreamCall {
    /// The next frame of the stream: `None` when the pipe dropped it (it closed, or the callee
    /// overran the window), an error when the pipe failed.
    pub(crate) async fn next(&mut self) -> Option<Result<Frame>> {
        match self.frames.recv().await? {
            Ok(f) => Some(Ok(f)),
            Err(e) => Some(Err(e.into_error(self.pipe.peer))),
        }
    }

    /// Tells the callee we take `n` more chunks.
    pub(crate) fn credit(&self, n: u32) {
        self.pipe.send(Out::Frame(credit(self.tag, n)));
    }
}

impl Drop for StreamCall {
    fn drop(&mut self) {
        let mut st = self.pipe.state.lock().unwrap_or_else(|e| e.into_inner());
        st.pending.remove(&self.tag);
        st.last_used = Instant::now();
    }
}

impl PipeError {
    fn into_error(self, peer: PeerId) -> Error {
        let reason = match self {
            PipeError::Closed => "the call pipe closed before the callee took the call".to_owned(),
            PipeError::Lost(reason) => reason,
            PipeError::Unsupported => NOT_SERVED.to_owned(),
        };
        Error::Unreachable {
            peer: Box::new(peer),
            reason,
        }
    }
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
        control: streams::Control,
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

    /// Sends a stream-mode call to `peer`; its frames come through the returned handle.
    pub(crate) async fn stream(
        self: &Arc<Self>,
        peer: PeerId,
        request: Request,
    ) -> Result<(StreamCall, Frame)> {
        // As for `call`: a pipe that closes before the callee took the call may be replaced.
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
            }
            let pipe = self.pipe(peer).await?;
            let (tx, rx) = mpsc::channel(super::STREAM_WINDOW as usize + 1);
            let Some(tag) = pipe.enlist(Waiter::Stream(tx)) else {
                self.forget(peer, &pipe);
                continue;
            };
            let mut call = StreamCall {
                pipe: pipe.clone(),
                tag,
                frames: rx,
                _busy: self.activity.begin(peer, false),
            };
            if !pipe.send_request(tag, &request).await {
                self.forget(peer, &pipe);
                continue;
            }
            match call.frames.recv().await {
                Some(Ok(first)) => return Ok((call, first)),
                Some(Err(PipeError::Closed)) => self.forget(peer, &pipe),
                Some(Err(e)) => return Err(e.into_error(peer)),
                None => {
                    return Err(Error::Unreachable {
                        peer: Box::new(peer),
                        reason: "the call pipe dropped the stream".to_owned(),
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
        let (stream, gone) = self.open_stream(peer).await?;
        let pipe = Pipe::start(peer, stream, gone, self.clone());
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.insert(peer, pipe.clone());
        Ok(pipe)
    }

    async fn open_stream(&self, peer: PeerId) -> Result<(Stream, Gone)> {
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
            match tokio::time::timeout(OPEN_TIMEOUT, self.control.open(peer)).await {
                Ok(Ok(stream)) => return Ok(stream),
                // Only with eager negotiation; under `behaviour::STREAMS` (lazy) the refusal
                // comes on the pipe's first read instead (`refused_protocol`).
                Ok(Err(OpenError::Unsupported)) => {
                    return Err(unreachable(NOT_SERVED.to_owned()));
                }
                Ok(Err(OpenError::Closed | OpenError::NotConnected)) => {
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
    fn start(peer: PeerId, stream: Stream, gone: Gone, pipes: Arc<Pipes>) -> Arc<Pipe> {
        let (read, write) = split_guarded(stream);
        let (frames, rx) = mpsc::channel(WRITE_QUEUE);
        let key = pipes.signing.clone();
        let pipe = Arc::new(Pipe {
            peer,
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
        tokio::spawn(pipe.clone().read_results(peer, read, gone, pipes.clone()));
        tokio::spawn(pipe.clone().close_when_idle(peer, pipes));
        pipe
    }

    fn is_closed(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed
    }

    /// Takes the next tag for `waiter`; `None` if the pipe closed.
    fn enlist(&self, waiter: Waiter) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.closed || st.pending.len() >= MAX_PENDING {
            return None;
        }
        let tag = st.next;
        st.next += 1;
        st.pending.insert(tag, waiter);
        st.last_used = Instant::now();
        Some(tag)
    }

    /// Queues a request under `tag`; false if the pipe's writer is gone.
    async fn send_request(&self, tag: u64, request: &Request) -> bool {
        let out = match request {
            Request::Signed(bytes) => Out::Frame(frame(tag, ENVELOPE, bytes)),
            Request::Unsigned(u) => Out::Sign(tag, u.clone()),
        };
        self.frames.send(out).await.is_ok()
    }

    /// Queues a small frame without waiting: at once when the writer has room, else from a
    /// task of its own.
    fn send(&self, out: Out) {
        if let Err(mpsc::error::TrySendError::Full(out)) = self.frames.try_send(out) {
            let tx = self.frames.clone();
            tokio::spawn(async move {
                let _ = tx.send(out).await;
            });
        }
    }

    async fn call(self: &Arc<Self>, request: &Request) -> std::result::Result<Answer, PipeError> {
        let (tx, rx) = oneshot::channel();
        {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if !st.closed && st.pending.len() >= MAX_PENDING {
                return Err(PipeError::Lost(format!(
                    "{MAX_PENDING} calls already wait for it"
                )));
            }
        }
        let tag = self.enlist(Waiter::Once(tx)).ok_or(PipeError::Closed)?;
        // Dropped (the caller timed out, or gave up) or not, the tag leaves the map.
        let _unlist = Unlist { pipe: self, tag };
        if !self.send_request(tag, request).await {
            return Err(PipeError::Closed);
        }
        rx.await
            .map_err(|_| PipeError::Lost("the pipe was dropped".to_owned()))?
    }

    async fn read_results(
        self: Arc<Self>,
        peer: PeerId,
        read: ReadHalf<Guarded<Stream>>,
        mut gone: Gone,
        pipes: Arc<Pipes>,
    ) {
        let max = Kind::CallResult.max_envelope();
        let mut read = BufReader::with_capacity(READ_BUFFER, read);
        let end = loop {
            let read = tokio::select! {
                r = read_frames(&mut read, max, MAX_BATCH) => r,
                _ = gone.wait() => break "its connection closed".to_owned(),
            };
            let frames = match read {
                Ok(f) if f.is_empty() => break "closed".to_owned(),
                Ok(f) => f,
                Err(e) if refused_protocol(&e) => {
                    tracing::debug!(%peer, "call pipe refused: {NOT_SERVED}");
                    self.close(peer, &pipes, true);
                    return;
                }
                Err(e) => break e.to_string(),
            };
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            // Results for single answers are checked together, as one signature batch.
            let mut once = Vec::new();
            for f in frames {
                if f.tag == ACCEPTED {
                    st.accepted = true;
                    continue;
                }
                match st.pending.get(&f.tag) {
                    Some(Waiter::Once(_)) => once.push(f),
                    Some(Waiter::Stream(tx)) => {
                        let tag = f.tag;
                        if tx.try_send(Ok(f)).is_err() {
                            // Past the window, or nobody reads it any more.
                            tracing::debug!(%peer, "a stream overran its window or was dropped");
                            st.pending.remove(&tag);
                        }
                    }
                    // No waiter: the call timed out here; its late answer is dropped.
                    None => {}
                }
            }
            let bodies: Vec<&[u8]> = once.iter().map(|f| f.body.as_slice()).collect();
            let checks = Checks::now().signed_by(peer);
            let answers = envelope::verify_batch(&bodies).into_iter().map(|v| {
                v.and_then(|v| v.decode::<CallResult>(&checks))
                    .map(|o| o.value)
            });
            for (f, answer) in once.iter().zip(answers) {
                if let Some(Waiter::Once(w)) = st.pending.remove(&f.tag) {
                    let _ = w.send(Ok(answer));
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
        let error = || {
            if refused {
                PipeError::Unsupported
            } else if accepted {
                PipeError::Lost("the connection closed before the result came".to_owned())
            } else {
                PipeError::Closed
            }
        };
        for (_, w) in waiting {
            match w {
                Waiter::Once(w) => {
                    let _ = w.send(Err(error()));
                }
                Waiter::Stream(tx) => {
                    let _ = tx.try_send(Err(error()));
                }
            }
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

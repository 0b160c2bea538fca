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
    ACCEPTED, Activity, Answer, Guarded, Out, READ_BUFFER, Request, WRITE_QUEUE, frame,
    read_frames, split_guarded, write_frames,
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

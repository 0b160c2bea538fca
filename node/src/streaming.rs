//! Streamed calls, the caller's side: [`Node::call_stream`] returns a [`CallStream`] of the
//! callee's chunks, each checked against the transcript as it arrives (protocol/README.md §3,
//! StreamChunk), and credited back to the callee as the application takes it, so a slow reader
//! slows the handler down. Dropping the stream cancels the call on the callee.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use libp2p::PeerId;
use serde_json::Value;
use skillmesh_protocol::envelope::{self, Checks};
use skillmesh_protocol::{
    Call, CallError, CallId, CallResult, CallStatus, Cancel, ChainReader, ErrorCode, Kind,
    MessageId, Mode, Timestamp,
};
use tokio::sync::mpsc;

use crate::calls::{Reply, decode_chunk, read_result, state_of};
use crate::error::{Error, Result};
use crate::node::{CallOptions, Node};
use crate::pipe::{CHUNK, ENVELOPE, Frame, Request, STREAM_WINDOW, StreamCall};
use crate::skills::Chunk;
use crate::store::{CallLogEntry, CallState, Direction};

/// How long a cancel waits for the callee's answer.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// The chunks of a streamed call, in order, then its end: `None` after the last chunk, or one
/// `Err` if the stream failed (the callee's error, a broken transcript, a lost connection).
/// Dropping it before the end cancels the call.
pub struct CallStream {
    call_id: CallId,
    /// The first chunk, handed over without a trip through the pump.
    first: Option<Chunk>,
    rx: mpsc::Receiver<Result<Chunk>>,
    receipt: Arc<Mutex<Option<Receipt>>>,
}

impl std::fmt::Debug for CallStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStream")
            .field("call_id", &self.call_id)
            .finish_non_exhaustive()
    }
}

impl CallStream {
    /// The call's id, for [`Node::cancel_call`] and the call log.
    pub fn call_id(&self) -> CallId {
        self.call_id
    }

    /// The callee's signed receipt, once the stream has ended with its last chunk.
    pub fn receipt(&self) -> Option<Receipt> {
        self.receipt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Stream for CallStream {
    type Item = Result<Chunk>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(c) = self.first.take() {
            return Poll::Ready(Some(Ok(c)));
        }
        self.rx.poll_recv(cx)
    }
}

/// What proves a stream's output: the call, the signed last chunk, and (with
/// [`StreamOptions::keep_transcript`]) every chunk payload between, which
/// [`Receipt::verify`] checks against the signature.
#[derive(Clone, Debug)]
pub struct Receipt {
    /// The callee.
    pub callee: PeerId,
    /// The call's id.
    pub call_id: CallId,
    /// The call's payload, where the chain starts.
    pub call: Vec<u8>,
    /// Chunks before the last one.
    pub count: u64,
    /// The unsigned chunk payloads in order, if kept.
    pub chunks: Option<Vec<Vec<u8>>>,
    /// The last chunk, a `stream-chunk` envelope signed by the callee.
    pub last: Vec<u8>,
}

impl Receipt {
    /// Checks the kept transcript against the callee's signature.
    pub fn verify(&self) -> std::result::Result<(), skillmesh_protocol::ChainError> {
        let chunks = self.chunks.as_deref().unwrap_or_default();
        skillmesh_protocol::verify_transcript(
            &self.call,
            self.call_id,
            self.callee,
            chunks,
            &self.last,
        )
        .map(|_| ())
    }
}

/// Options of a streamed call.
#[derive(Clone, Debug, Default)]
pub struct StreamOptions {
    /// Versions, grant, and the time to wait for the stream to start.
    pub call: CallOptions,
    /// Keep every chunk payload for [`Receipt::verify`] (memory grows with the output).
    pub keep_transcript: bool,
}

/// Where a stream's frames come from: a pipe, or our own callee (a call to ourselves).
enum Source {
    Pipe(StreamCall),
    Local {
        rx: mpsc::Receiver<Reply>,
        credits: Arc<tokio::sync::Semaphore>,
        key: skillmesh_protocol::SigningKey,
    },
}

impl Source {
    async fn next(&mut self) -> Option<Result<Frame>> {
        match self {
            Source::Pipe(p) => p.next().await,
            Source::Local { rx, key, .. } => Some(Ok(match rx.recv().await? {
                Reply::Chunk(body) => Frame {
                    tag: 0,
                    ty: CHUNK,
                    body,
                },
                Reply::Result(u) => Frame {
                    tag: 0,
                    ty: ENVELOPE,
                    body: u.map(|u| u.sign(key)).unwrap_or_default(),
                },
            })),
        }
    }

    fn credit(&self, n: u32) {
        match self {
            Source::Pipe(p) => p.credit(n),
            Source::Local { credits, .. } => credits.add_permits(n as usize),
        }
    }
}

impl Node {
    /// Calls a stream-mode skill on `peer`; its chunks come as the callee produces them.
    /// Returns once the callee has answered with its first chunk (or refused the call).
    pub async fn call_stream(&self, peer: PeerId, skill: &str, args: Value) -> Result<CallStream> {
        self.call_stream_with(peer, skill, args, StreamOptions::default())
            .await
    }

    /// [`Node::call_stream`] with options.
    pub async fn call_stream_with(
        &self,
        peer: PeerId,
        skill: &str,
        args: Value,
        options: StreamOptions,
    ) -> Result<CallStream> {
        let (call, timeout) = self.new_call(peer, skill, &args, options.call, Mode::Stream)?;
        let unsigned = envelope::prepare(self.signing(), &call)?;
        let payload = unsigned.payload().to_vec();
        let mut entry = CallLogEntry::new(
            call.call_id,
            Direction::Outbound,
            peer,
            call.skill.clone(),
            Mode::Stream,
            CallState::Submitted,
        );
        let started = tokio::time::timeout(timeout, async {
            if peer == self.peer_id() {
                let (tx, rx) = mpsc::channel(STREAM_WINDOW as usize + 1);
                let reply = crate::calls::Replier::local(tx);
                let credits = reply.credits();
                let inbound = self.inbound().clone();
                let request = unsigned.sign(self.signing());
                tokio::spawn(async move {
                    let call = envelope::open::<Call>(&request, &Checks::now().signed_by(peer))
                        .map(|o| o.value);
                    inbound.serve(peer, &request, call, reply).await;
                });
                let mut source = Source::Local {
                    rx,
                    credits,
                    key: self.signing().clone(),
                };
                let first = source.next().await.ok_or(Error::ShutDown)??;
                Ok((source, first))
            } else {
                let (call, first) = self
                    .pipes()
                    .stream(peer, Request::Unsigned(unsigned))
                    .await?;
                Ok::<_, Error>((Source::Pipe(call), first))
            }
        })
        .await
        .map_err(|_| Error::Timeout(timeout))
        .and_then(|r| r);
        let (source, first) = match started {
            Ok(s) => s,
            Err(e) => {
                entry.error = Some(ErrorCode::Internal);
                entry.enter(CallState::Failed, Timestamp::now());
                self.log().record(entry);
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::channel(1);
        let receipt = Arc::new(Mutex::new(None));
        let mut pump = Pump {
            _outbound: self.track_outbound(call.call_id, peer),
            node: self.clone(),
            peer,
            chain: ChainReader::new(MessageId::of(&payload), call.call_id, peer),
            receipt: receipt.clone(),
            call: payload,
            kept: options.keep_transcript.then(Vec::new),
            entry,
            tx,
        };
        // A refusal comes as the first frame: the call fails here, not in the stream.
        let first = match pump.step(first) {
            Ok(step) => step,
            Err(e) => {
                pump.finish(&Err(clone_error(&e)));
                return Err(e);
            }
        };
        pump.entry.enter(CallState::Working, Timestamp::now());
        self.log().record(pump.entry.clone());
        let (first, next) = match first {
            Step::Chunk(c) => (Some(c), None),
            last @ Step::Last(_) => (None, Some(last)),
        };
        tokio::spawn(pump.run(source, next, u32::from(first.is_some())));
        Ok(CallStream {
            call_id: call.call_id,
            first,
            rx,
            receipt,
        })
    }

    /// Asks the callee of our call `id` to stop it. Works for stream and async calls, and for
    /// a sync call still waiting for its result.
    pub async fn cancel_call(&self, id: CallId) -> Result<()> {
        let peer = match self.outbound_peer(id) {
            Some(p) => p,
            None => self.logged_peer(id).await?,
        };
        self.cancel_call_at(peer, id).await
    }

    /// The callee of our logged call `id`. A call made a moment ago may still be on its way to
    /// the log (its writer batches for 50 ms): one not found is looked for again, for a second.
    async fn logged_peer(&self, id: CallId) -> Result<PeerId> {
        for _ in 0..20 {
            if let Some(e) = self.store().call_entry(id, Direction::Outbound).await? {
                return Ok(e.peer);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Error::NotFound(format!("no call {id} of ours")))
    }

    /// Asks `peer` to stop call `id`: it does only if the call is ours. `access_denied` comes
    /// back for anyone else's call, `unknown_call` for one that is not running there.
    pub async fn cancel_call_at(&self, peer: PeerId, id: CallId) -> Result<()> {
        let result = self.send_cancel(peer, id).await?;
        match result.error {
            Some(e) if e.code == ErrorCode::Cancelled => Ok(()),
            Some(e) => Err(Error::Remote(e)),
            None => Err(Error::BadResponse {
                peer: Box::new(peer),
                reason: "a cancel answered without an error code".to_owned(),
            }),
        }
    }

    /// Sends a signed `cancel` for call `id` to `peer` and returns its answer.
    pub(crate) async fn send_cancel(&self, peer: PeerId, id: CallId) -> Result<CallResult> {
        let cancel = Cancel {
            call_id: id,
            caller: self.peer_id(),
            target: peer,
            issued_at: Timestamp::now(),
        };
        let unsigned = envelope::prepare(self.signing(), &cancel)?;
        let answer = if peer == self.peer_id() {
            let bytes = unsigned.sign(self.signing());
            let u = self
                .inbound()
                .cancel(peer, &bytes)
                .ok_or_else(|| Error::Transport("cannot seal a cancel answer".to_owned()))?;
            envelope::open::<CallResult>(&u.sign(self.signing()), &Checks::now()).map(|o| o.value)
        } else {
            tokio::time::timeout(
                CANCEL_TIMEOUT,
                self.pipes().call(peer, Request::Unsigned(unsigned)),
            )
            .await
            .map_err(|_| Error::Timeout(CANCEL_TIMEOUT))??
        };
        read_result(answer, peer, self.peer_id(), id)
    }
}

/// Moves a stream's frames from its source to the application, checking each, crediting the
/// callee as the application takes them, and cancelling when the application drops the stream.
struct Pump {
    _outbound: crate::node::OutboundGuard,
    node: Node,
    peer: PeerId,
    chain: ChainReader,
    call: Vec<u8>,
    kept: Option<Vec<Vec<u8>>>,
    receipt: Arc<Mutex<Option<Receipt>>>,
    entry: CallLogEntry,
    tx: mpsc::Sender<Result<Chunk>>,
}

/// What one frame meant.
enum Step {
    Chunk(Chunk),
    Last(Option<Chunk>),
}

impl Pump {
    /// Runs from the next frame (or `first`, a last chunk already read); `taken` chunks were
    /// handed to the application already.
    async fn run(mut self, mut source: Source, first: Option<Step>, taken: u32) {
        let mut next = first.map(Ok);
        let mut taken = taken;
        let end: std::result::Result<(), Error> = loop {
            let step = match next.take() {
                Some(s) => s,
                None => {
                    let f = tokio::select! {
                        f = source.next() => match f {
                            Some(f) => f,
                            // The pipe let it go: the callee sent past the window.
                            None => break Err(self.bad("the stream overran its window".to_owned())),
                        },
                        _ = self.tx.closed() => break Err(dropped()),
                    };
                    f.and_then(|f| self.step(f))
                }
            };
            match step {
                Ok(Step::Chunk(c)) => {
                    if self.tx.send(Ok(c)).await.is_err() {
                        break Err(dropped());
                    }
                    taken += 1;
                    if taken >= STREAM_WINDOW / 2 {
                        source.credit(taken);
                        taken = 0;
                    }
                }
                Ok(Step::Last(c)) => {
                    if let Some(c) = c {
                        let _ = self.tx.send(Ok(c)).await;
                    }
                    break Ok(());
                }
                Err(e) => {
                    let _ = self.tx.send(Err(clone_error(&e))).await;
                    break Err(e);
                }
            }
        };
        let let_go = matches!(&end, Err(Error::Remote(e)) if e.code == ErrorCode::Cancelled && e.message == DROPPED);
        if let_go || matches!(&end, Err(Error::BadResponse { .. })) {
            // The application let go, or the callee broke the transcript: stop the handler.
            drop(source);
            let id = self.chain_call_id();
            if let Err(e) = self.node.send_cancel(self.peer, id).await {
                tracing::debug!(peer = %self.peer, call = %id, "cancel not delivered: {e}");
            }
        }
        self.finish(&end);
    }

    /// Logs how the stream ended.
    fn finish(&mut self, end: &std::result::Result<(), Error>) {
        let error = match end {
            Ok(()) => None,
            Err(Error::Remote(e)) => Some(e.code),
            Err(Error::BadResponse { .. }) => Some(ErrorCode::BrokenStream),
            Err(_) => Some(ErrorCode::Internal),
        };
        self.entry.error = error;
        self.entry.enter(state_of(error), Timestamp::now());
        self.node.log().record(self.entry.clone());
    }

    fn chain_call_id(&self) -> CallId {
        self.entry.call_id
    }

    fn bad(&self, reason: String) -> Error {
        Error::BadResponse {
            peer: Box::new(self.peer),
            reason,
        }
    }

    /// Checks one frame against the transcript.
    fn step(&mut self, f: Frame) -> Result<Step> {
        match f.ty {
            CHUNK => {
                let c = self
                    .chain
                    .chunk(&f.body)
                    .map_err(|e| self.bad(e.to_string()))?;
                let chunk = decode_chunk(&c.data).map_err(|e| self.bad(e))?;
                if let Some(k) = &mut self.kept {
                    k.push(f.body);
                }
                Ok(Step::Chunk(chunk))
            }
            ENVELOPE => match envelope::peek_payload(&f.body).map(|(k, _)| k) {
                Some(Kind::StreamChunk) => {
                    let c = self
                        .chain
                        .last(&f.body)
                        .map_err(|e| self.bad(e.to_string()))?;
                    *self.receipt.lock().unwrap_or_else(|e| e.into_inner()) = Some(Receipt {
                        callee: self.peer,
                        call_id: self.chain_call_id(),
                        call: self.call.clone(),
                        count: self.chain.count() - 1,
                        chunks: self.kept.take(),
                        last: f.body,
                    });
                    if let Some(e) = c.error {
                        return Err(Error::Remote(e));
                    }
                    if c.data.is_empty() {
                        return Ok(Step::Last(None));
                    }
                    Ok(Step::Last(Some(
                        decode_chunk(&c.data).map_err(|e| self.bad(e))?,
                    )))
                }
                _ => {
                    // A refusal before the stream began: a signed result.
                    let opened =
                        envelope::open::<CallResult>(&f.body, &Checks::now().signed_by(self.peer))
                            .map(|o| o.value);
                    let r =
                        read_result(opened, self.peer, self.node.peer_id(), self.chain_call_id())?;
                    match (r.status, r.error) {
                        (CallStatus::Failed, Some(e)) => Err(Error::Remote(e)),
                        (status, _) => {
                            Err(self
                                .bad(format!("a stream call answered with a {status:?} result")))
                        }
                    }
                }
            },
            ty => Err(self.bad(format!("a frame of type {ty} in a stream"))),
        }
    }
}

/// Why a stream the application dropped ended.
const DROPPED: &str = "dropped by the caller";

fn dropped() -> Error {
    Error::Remote(CallError::new(ErrorCode::Cancelled, DROPPED))
}

/// The error a stream ends with, for the application; the pump keeps the original for the log.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::Remote(c) => Error::Remote(c.clone()),
        Error::Unreachable { peer, reason } => Error::Unreachable {
            peer: peer.clone(),
            reason: reason.clone(),
        },
        Error::BadResponse { peer, reason } => Error::BadResponse {
            peer: peer.clone(),
            reason: reason.clone(),
        },
        Error::Timeout(d) => Error::Timeout(*d),
        other => Error::Transport(other.to_string()),
    }
}

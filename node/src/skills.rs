//! Skills this node serves: the handler an agent registers, with its spec, compiled schemas and
//! concurrency slots.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use futures::Stream;
use libp2p::PeerId;
use serde_json::Value;
use skillmesh_protocol::{CallId, Mode, Schema, SkillName, SkillSpec, ValidationError};
use tokio::sync::Semaphore;
pub use tokio_util::sync::CancellationToken;

/// What a handler learns about the call it serves.
#[derive(Clone, Debug)]
pub struct CallContext {
    /// The verified caller.
    pub caller: PeerId,
    /// The call's id.
    pub call_id: CallId,
    /// The skill called.
    pub skill: SkillName,
    /// When the handler is cut off.
    pub deadline: Instant,
    /// Cancelled when the caller cancels the call (or it runs out of time): work the handler
    /// spawned should stop then. The handler's own future is dropped at that moment.
    pub cancel: CancellationToken,
}

/// A handler's failure, passed to the caller as `handler_failed` with this message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    /// Shown to the caller.
    pub message: String,
}

impl HandlerError {
    /// A failure with a message for the caller.
    pub fn new(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
        }
    }
}

impl From<String> for HandlerError {
    fn from(message: String) -> Self {
        HandlerError { message }
    }
}

impl From<&str> for HandlerError {
    fn from(message: &str) -> Self {
        HandlerError::new(message)
    }
}

/// The future a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, HandlerError>> + Send>>;

/// Serves calls of one skill: JSON arguments in, JSON output out. Any
/// `Fn(CallContext, Value) -> impl Future<Output = Result<Value, HandlerError>>` is one.
pub trait SkillHandler: Send + Sync + 'static {
    /// Runs one call. It is cancelled (dropped) at the deadline or when the caller cancels.
    fn call(&self, ctx: CallContext, args: Value) -> HandlerFuture;
}

impl<F, Fut> SkillHandler for F
where
    F: Fn(CallContext, Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, HandlerError>> + Send + 'static,
{
    fn call(&self, ctx: CallContext, args: Value) -> HandlerFuture {
        Box::pin(self(ctx, args))
    }
}

/// One piece of a streamed result.
#[derive(Clone, Debug, PartialEq)]
pub enum Chunk {
    /// A JSON value (sent as CBOR).
    Json(Value),
    /// Raw bytes, for binary output (sent as a CBOR byte string; long ones are split).
    Bytes(Vec<u8>),
}

/// The chunks a stream handler produces, in order; an error ends the stream with it.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, HandlerError>> + Send>>;

/// Serves calls of one stream-mode skill: JSON arguments in, chunks out as they are produced.
/// The stream is polled only as fast as the caller reads (the window in protocol/README.md
/// §1), and dropped when the caller cancels. Any
/// `Fn(CallContext, Value) -> impl Stream<Item = Result<Chunk, HandlerError>>` is one.
pub trait StreamHandler: Send + Sync + 'static {
    /// Starts one call.
    fn call(&self, ctx: CallContext, args: Value) -> ChunkStream;
}

impl<F, S> StreamHandler for F
where
    F: Fn(CallContext, Value) -> S + Send + Sync + 'static,
    S: Stream<Item = Result<Chunk, HandlerError>> + Send + 'static,
{
    fn call(&self, ctx: CallContext, args: Value) -> ChunkStream {
        Box::pin(self(ctx, args))
    }
}

/// What runs a served skill's calls.
#[derive(Clone)]
pub enum Handler {
    /// One result per call: sync and async skills.
    Unary(Arc<dyn SkillHandler>),
    /// Chunks: stream skills.
    Stream(Arc<dyn StreamHandler>),
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Handler::Unary(_) => "Handler::Unary",
            Handler::Stream(_) => "Handler::Stream",
        })
    }
}

/// A served skill, ready to check and run calls.
pub(crate) struct Registered {
    pub(crate) spec: SkillSpec,
    pub(crate) handler: Handler,
    pub(crate) input: Option<jsonschema::Validator>,
    pub(crate) output: Option<jsonschema::Validator>,
    pub(crate) slots: Arc<Semaphore>,
}

impl Registered {
    pub(crate) fn new(spec: SkillSpec, handler: Handler) -> Result<Self, ValidationError> {
        spec.validate()?;
        match (&handler, spec.mode) {
            (Handler::Unary(_), Mode::Sync | Mode::Async) | (Handler::Stream(_), Mode::Stream) => {}
            (Handler::Unary(_), Mode::Stream) => {
                return Err(ValidationError::new(
                    "mode",
                    "a stream skill needs a stream handler (Node::register_stream)",
                ));
            }
            (Handler::Stream(_), mode) => {
                return Err(ValidationError::new(
                    "mode",
                    format!("a stream handler serves stream skills, not {mode}"),
                ));
            }
        }
        let input = compile(spec.input.as_ref(), "input")?;
        let output = compile(spec.output.as_ref(), "output")?;
        let slots = Arc::new(Semaphore::new(usize::from(spec.limits.max_concurrency)));
        Ok(Registered {
            spec,
            handler,
            input,
            output,
            slots,
        })
    }
}

fn compile(
    schema: Option<&Schema>,
    field: &str,
) -> Result<Option<jsonschema::Validator>, ValidationError> {
    let Some(schema) = schema else {
        return Ok(None);
    };
    let json = match schema.json() {
        Some(Ok(v)) => v,
        Some(Err(e)) => return Err(ValidationError::new(field, format!("not JSON: {e}"))),
        None => {
            return Err(ValidationError::new(
                field,
                "a served skill needs its schema inline, not as a hash",
            ));
        }
    };
    jsonschema::validator_for(&json)
        .map(Some)
        .map_err(|e| ValidationError::new(field, format!("not a valid JSON Schema: {e}")))
}

/// The skills served, shared by the event loop (to build the card) and the call handlers.
pub(crate) type Registry = Arc<RwLock<HashMap<SkillName, Arc<Registered>>>>;

/// The specs of every served skill, sorted by name.
pub(crate) fn specs(registry: &Registry) -> Vec<SkillSpec> {
    let map = registry.read().unwrap_or_else(|e| e.into_inner());
    let mut specs: Vec<SkillSpec> = map.values().map(|r| r.spec.clone()).collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs
}

/// A stream whose chunks a task produces: the task is aborted when the stream is dropped, so
/// whatever it holds (a child process, an HTTP response) goes with it. The channel holds one
/// chunk: the task waits while the caller's window is full.
pub(crate) fn task_stream<F, Fut>(produce: F) -> ChunkStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Chunk, HandlerError>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let task = tokio::spawn(produce(tx));
    Box::pin(TaskStream { rx, task })
}

struct TaskStream {
    rx: tokio::sync::mpsc::Receiver<Result<Chunk, HandlerError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream for TaskStream {
    type Item = Result<Chunk, HandlerError>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for TaskStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

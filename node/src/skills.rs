//! Skills this node serves: the handler an agent registers, with its spec, compiled schemas and
//! concurrency slots.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use libp2p::PeerId;
use serde_json::Value;
use skillmesh_protocol::{CallId, Mode, Schema, SkillName, SkillSpec, ValidationError};
use tokio::sync::Semaphore;

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

/// A served skill, ready to check and run calls.
pub(crate) struct Registered {
    pub(crate) spec: SkillSpec,
    pub(crate) handler: Arc<dyn SkillHandler>,
    pub(crate) input: Option<jsonschema::Validator>,
    pub(crate) output: Option<jsonschema::Validator>,
    pub(crate) slots: Arc<Semaphore>,
}

impl Registered {
    pub(crate) fn new(
        spec: SkillSpec,
        handler: Arc<dyn SkillHandler>,
    ) -> Result<Self, ValidationError> {
        spec.validate()?;
        if spec.mode != Mode::Sync {
            return Err(ValidationError::new(
                "mode",
                format!("{} skills cannot be served yet; only sync", spec.mode),
            ));
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

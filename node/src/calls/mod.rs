//! Skill calls (protocol/README.md §3-4): the callee's checks, in order, and the caller's reading of results.
//!
//! Inbound, every call goes through: size (the frame codec), signature, signer = connection
//! peer, target = us, time window, replay, skill and version, access (share mode, grant), rate
//! and concurrency, argument size and schema; then the handler runs under a deadline. Every
//! refusal is a signed `CallResult` with a stable code, so a caller always learns why.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use serde_bytes::ByteBuf;
use serde_json::Value;
use skillmesh_protocol::envelope::{self, Checks};
use skillmesh_protocol::{
    Call, CallError, CallId, CallResult, CallStatus, Cancel, EnvelopeError, ErrorCode, Grant, Kind,
    MAX_CALL_ARGS_BYTES, MAX_OUTPUT_BYTES, MessageId, Mode, ShareMode, SigningKey, SkillName,
    Timestamp, Timings, Unsigned, from_cbor, to_cbor,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::access::{PeerSlot, PeerSlots, RateLimiter, ReplayCache, replay_horizon};
use crate::async_calls::AsyncCalls;
use crate::call_log::CallLog;
use crate::config::CallsConfig;
use crate::metrics::NodeMetrics;
use crate::skills::{CallContext, Handler, Registered, Registry, SkillHandler};
use crate::store::{CallLogEntry, CallState, Direction};

mod reply;
mod running;
mod stream;

pub(crate) use reply::{Replier, Reply};
use running::{RunGuard, Running};
pub(crate) use stream::decode as decode_chunk;

/// Replay cache entries at most; at 100 calls/s per peer and a 6-minute horizon this is room
/// for several busy peers, and at ~150 bytes an entry about 30 MB in the worst case.
pub(crate) const MAX_REPLAY_ENTRIES: usize = 200_000;
/// Peers whose rate we track at once.
pub(crate) const MAX_RATE_PEERS: usize = 10_000;

/// The callee side: shared by every inbound call task.
pub(crate) struct Inbound {
    me: PeerId,
    signing: SigningKey,
    registry: Registry,
    max_skew: Duration,
    replay: Mutex<ReplayCache>,
    rate: Mutex<RateLimiter>,
    per_peer: PeerSlots,
    global: Arc<Semaphore>,
    log: CallLog,
    metrics: NodeMetrics,
    running: Arc<Running>,
    async_calls: Arc<AsyncCalls>,
    /// Cancelled when the node stops: async calls still running are dropped, left open in the
    /// store for the next start to report as interrupted.
    stopping: tokio_util::sync::CancellationToken,
}

impl Inbound {
    pub(crate) fn new(
        signing: SigningKey,
        registry: Registry,
        config: &CallsConfig,
        log: CallLog,
        metrics: NodeMetrics,
        async_calls: Arc<AsyncCalls>,
    ) -> Self {
        Inbound {
            me: signing.peer_id(),
            signing,
            registry,
            max_skew: config.max_skew,
            replay: Mutex::new(ReplayCache::new(MAX_REPLAY_ENTRIES)),
            rate: Mutex::new(RateLimiter::new(
                config.rate_per_peer,
                config.burst_per_peer,
                MAX_RATE_PEERS,
            )),
            per_peer: PeerSlots::new(config.max_inbound_per_peer),
            global: Arc::new(Semaphore::new(config.max_inbound as usize)),
            log,
            metrics,
            running: Arc::default(),
            async_calls,
            stopping: Default::default(),
        }
    }

    /// Checks and runs one sync call from `peer` that takes no pipe (one to ourselves);
    /// returns the result envelope, signed alone.
    pub(crate) async fn handle(self: &Arc<Self>, peer: PeerId, request: Vec<u8>) -> Vec<u8> {
        let call = envelope::open::<Call>(&request, &self.checks(peer)).map(|o| o.value);
        let (tx, mut rx) = mpsc::channel(1);
        let reply = Replier::local(tx);
        self.serve(peer, &request, call, reply).await;
        match rx.recv().await {
            Some(Reply::Result(Some(u))) => u.sign(&self.signing),
            _ => Vec::new(),
        }
    }

    /// The node stops: async calls running are dropped (they stay open in the store), and
    /// results waiting to be delivered again are left.
    pub(crate) fn stop(&self) {
        self.stopping.cancel();
        self.async_calls.stop();
    }

    /// The key our results are signed with.
    pub(crate) fn signing(&self) -> &SigningKey {
        &self.signing
    }

    /// Opens calls that arrived from `peer` together: their signatures are checked as one
    /// batch (see [`envelope::verify_batch`]), then each is decoded and checked on its own.
    pub(crate) fn open(
        &self,
        peer: PeerId,
        requests: &[&[u8]],
    ) -> Vec<Result<Call, EnvelopeError>> {
        let checks = self.checks(peer);
        envelope::verify_batch(requests)
            .into_iter()
            .map(|v| v.and_then(|v| v.decode::<Call>(&checks)).map(|o| o.value))
            .collect()
    }

    fn checks(&self, peer: PeerId) -> Checks {
        Checks {
            now: Timestamp::now(),
            max_skew: self.max_skew,
            expected_signer: Some(peer),
        }
    }

    /// Serves one call already opened (or refused) by [`Inbound::open`]: checks it, runs it in
    /// its mode, and answers through `reply` (a result for its pipe's writer to sign with the
    /// others that finish beside it, or a stream's chunks). Returns when the call is over.
    pub(crate) async fn serve(
        self: &Arc<Self>,
        peer: PeerId,
        request: &[u8],
        call: Result<Call, EnvelopeError>,
        reply: Replier,
    ) {
        let received = Instant::now();
        let (call_id, skill_name) = peek(request);
        let mut entry = skill_name.map(|skill| {
            CallLogEntry::new(
                call_id,
                Direction::Inbound,
                peer,
                skill,
                call.as_ref().map_or(Mode::Sync, |c| c.mode),
                CallState::Submitted,
            )
        });
        let (outcome, run_ms) = match self.admit(peer, call) {
            Err(e) => (Outcome::Rejected(e), 0),
            Ok(admitted) => {
                let started = Instant::now();
                if let Some(e) = &mut entry {
                    e.enter(CallState::Working, Timestamp::now());
                }
                let outcome = match admitted.skill.handler.clone() {
                    Handler::Stream(h) => {
                        if let Some(e) = &entry {
                            // A stream may run for minutes: show it while it does.
                            self.log.record(e.clone());
                        }
                        let call_msg = envelope::peek_payload(request)
                            .map(|(_, p)| MessageId::of(p))
                            .unwrap_or(MessageId([0; 32]));
                        self.run_stream(admitted, h, call_msg, &reply).await
                    }
                    Handler::Unary(h) if admitted.ctx_mode == Mode::Async => match entry.take() {
                        Some(e) => self.start_async(admitted, h, e, &reply).await,
                        None => {
                            Outcome::Failed(CallError::new(ErrorCode::BadRequest, "no skill name"))
                        }
                    },
                    Handler::Unary(h) => match self.run_unary(admitted, h).await {
                        Ok(out) => Outcome::Output(out),
                        Err(e) => Outcome::Failed(e),
                    },
                };
                (
                    outcome,
                    u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
                )
            }
        };
        let error = outcome.error();
        self.metrics.call(
            true,
            error.map_or("ok", |e| e.code.name()),
            received.elapsed(),
        );
        if let Some(mut e) = entry {
            e.error = error.map(|e| e.code);
            e.enter(outcome.state(), Timestamp::now());
            self.log.record(e);
        }
        let total = received.elapsed().as_millis();
        let timings = Timings {
            queued_ms: u32::try_from(total.saturating_sub(u128::from(run_ms))).unwrap_or(u32::MAX),
            run_ms,
        };
        let result = match outcome {
            // Its last chunk went out already; an accepted async call answered and runs on.
            Outcome::Streamed(_) | Outcome::Accepted => return,
            Outcome::Output(out) => CallResult {
                call_id,
                callee: self.me,
                caller: peer,
                status: CallStatus::Completed,
                output: Some(ByteBuf::from(out)),
                error: None,
                timings,
            },
            Outcome::Rejected(e) | Outcome::Failed(e) => CallResult {
                call_id,
                callee: self.me,
                caller: peer,
                status: CallStatus::Failed,
                output: None,
                error: Some(e),
                timings,
            },
        };
        let unsigned = match envelope::prepare(&self.signing, &result) {
            Ok(unsigned) => Some(unsigned),
            Err(e) => {
                // Only an oversize output can get here; answer with that instead.
                tracing::warn!(%peer, "cannot seal call result: {e}");
                let failed = CallResult {
                    status: CallStatus::Failed,
                    output: None,
                    error: Some(CallError::new(ErrorCode::OutputTooLarge, e.to_string())),
                    ..result
                };
                envelope::prepare(&self.signing, &failed).ok()
            }
        };
        reply.result(unsigned).await;
    }

    /// Answers a `cancel` envelope from `peer`: a result addressed to `peer` that says whether
    /// the call is stopping (`cancelled`), or why not (`access_denied` for anyone but its
    /// caller, `unknown_call`).
    pub(crate) fn cancel(&self, peer: PeerId, request: &[u8]) -> Option<Unsigned> {
        // A cancel costs a signature check: it counts against the peer's call rate, and one
        // over it is refused before that check.
        let allowed = {
            let mut rate = self.rate.lock().unwrap_or_else(|e| e.into_inner());
            rate.allow(peer, Instant::now())
        };
        let (call_id, error) = if !allowed {
            (
                peek_cancel(request),
                CallError::new(
                    ErrorCode::RateLimited,
                    "too many calls and cancels; slow down",
                ),
            )
        } else {
            match envelope::open::<Cancel>(request, &self.checks(peer)).map(|o| o.value) {
                Err(e) => (CallId([0; 16]), refusal(e)),
                Ok(c) if c.target != self.me => (
                    c.call_id,
                    CallError::new(ErrorCode::WrongTarget, format!("this is {}", self.me)),
                ),
                Ok(c) => match self.running.cancel(c.call_id, peer) {
                    Ok(running::Cancelled::Stopping) => (
                        c.call_id,
                        CallError::new(ErrorCode::Cancelled, "cancelled by the caller"),
                    ),
                    Err(e) => {
                        tracing::debug!(%peer, call = %c.call_id, "cancel refused: {e}");
                        (c.call_id, e)
                    }
                },
            }
        };
        let result = CallResult {
            call_id,
            callee: self.me,
            caller: peer,
            status: CallStatus::Failed,
            output: None,
            error: Some(error),
            timings: Timings::default(),
        };
        envelope::prepare(&self.signing, &result).ok()
    }

    /// Every check a call must pass before it runs, in the order of protocol/README.md §4;
    /// on success the call holds its slots until [`Admitted`] is dropped.
    fn admit(
        &self,
        peer: PeerId,
        call: Result<Call, EnvelopeError>,
    ) -> Result<Admitted, CallError> {
        let now = Timestamp::now();
        let call = call.map_err(refusal)?;
        if call.target != self.me {
            return Err(CallError::new(
                ErrorCode::WrongTarget,
                format!("this is {}, not {}", self.me, call.target),
            ));
        }
        {
            let mut replay = self.replay.lock().unwrap_or_else(|e| e.into_inner());
            replay
                .check(
                    peer,
                    call.call_id,
                    replay_horizon(call.expires_at, self.max_skew),
                    now,
                )
                .map_err(|code| CallError::new(code, "call id already used"))?;
        }
        let skill = {
            let map = self.registry.read().unwrap_or_else(|e| e.into_inner());
            map.get(&call.skill).cloned()
        }
        .ok_or_else(|| {
            CallError::new(
                ErrorCode::UnknownSkill,
                format!("no skill {} here", call.skill),
            )
        })?;
        let spec = &skill.spec;
        if !call.version_req.matches(&spec.version) {
            return Err(CallError::new(
                ErrorCode::VersionMismatch,
                format!(
                    "{} is version {}, not {}",
                    spec.name, spec.version, call.version_req
                ),
            ));
        }
        if call.mode != spec.mode {
            return Err(CallError::new(
                ErrorCode::UnsupportedMode,
                format!("{} runs in {} mode", spec.name, spec.mode),
            ));
        }
        self.check_access(peer, &call, spec.share, now)?;
        let allowed = {
            let mut rate = self.rate.lock().unwrap_or_else(|e| e.into_inner());
            rate.allow(peer, Instant::now())
        };
        if !allowed {
            return Err(CallError::new(
                ErrorCode::RateLimited,
                "too many calls; slow down",
            ));
        }
        let busy =
            |what: &str| CallError::new(ErrorCode::Busy, format!("too many calls running {what}"));
        let global = self
            .global
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy("on this node"))?;
        let peer_slot = self
            .per_peer
            .try_take(peer)
            .ok_or_else(|| busy("from you"))?;
        let skill_slot = skill
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy("for this skill"))?;

        if call.args.len() > spec.limits.max_arg_bytes as usize {
            return Err(CallError::new(
                ErrorCode::ArgsTooLarge,
                format!(
                    "{} bytes of arguments, {} allows {}",
                    call.args.len(),
                    spec.name,
                    spec.limits.max_arg_bytes
                ),
            ));
        }
        let args: Value = from_cbor(&call.args, MAX_CALL_ARGS_BYTES).map_err(|e| {
            CallError::new(
                ErrorCode::InvalidArgs,
                format!("arguments are not JSON-like CBOR: {e}"),
            )
        })?;
        if let Some(schema) = &skill.input
            && let Err(e) = schema.validate(&args)
        {
            return Err(CallError::new(
                ErrorCode::InvalidArgs,
                format!("arguments do not match the schema: {e}"),
            ));
        }
        let run = self
            .running
            .enter(call.call_id, peer)
            .ok_or_else(|| busy("(or this call id runs already)"))?;
        // A sync call's caller stops waiting at its expiry: its handler stops there too. A
        // stream or async call only had to arrive in its window; it runs for the skill's time.
        let timeout = match call.mode {
            Mode::Sync => {
                let until_expiry = Duration::from_millis(
                    call.expires_at.as_millis().saturating_sub(now.as_millis()),
                ) + self.max_skew;
                spec.limits.timeout().min(until_expiry)
            }
            Mode::Async | Mode::Stream => spec.limits.timeout(),
        };
        let ctx = CallContext {
            caller: peer,
            call_id: call.call_id,
            skill: call.skill.clone(),
            deadline: Instant::now() + timeout,
            cancel: run.token().clone(),
        };
        Ok(Admitted {
            ctx_mode: call.mode,
            ctx,
            args,
            timeout,
            skill,
            _slots: (global, peer_slot, skill_slot),
            run,
        })
    }

    /// Accepts an async call: notes it durably, answers "accepted", and runs it in a task of its
    /// own that keeps, logs and delivers its result.
    async fn start_async(
        self: &Arc<Self>,
        admitted: Admitted,
        handler: Arc<dyn SkillHandler>,
        mut entry: CallLogEntry,
        reply: &Replier,
    ) -> Outcome {
        let (id, caller) = (admitted.ctx.call_id, admitted.ctx.caller);
        if let Err(e) = self
            .async_calls
            .accepted(id, caller, admitted.ctx.skill.clone())
            .await
        {
            tracing::warn!(%caller, call = %id, "async call not noted: {e}");
            return Outcome::Failed(CallError::new(ErrorCode::Internal, "cannot keep the call"));
        }
        let accepted = CallResult {
            call_id: id,
            callee: self.me,
            caller,
            status: CallStatus::Accepted,
            output: None,
            error: None,
            timings: Timings::default(),
        };
        reply
            .result(envelope::prepare(&self.signing, &accepted).ok())
            .await;
        self.log.record(entry.clone());
        let this = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = tokio::select! {
                _ = this.stopping.cancelled() => return,
                outcome = this.run_unary(admitted, handler) => outcome,
            };
            let timings = Timings {
                queued_ms: 0,
                run_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
            };
            entry.error = outcome.as_ref().err().map(|e| e.code);
            entry.enter(final_state(outcome.as_ref().err()), Timestamp::now());
            this.log.record(entry);
            let result = this.async_calls.seal(caller, id, outcome, timings);
            this.async_calls.clone().finished(caller, id, result).await;
        });
        Outcome::Accepted
    }

    /// Runs a sync (or async) call's handler until it answers, the deadline passes, or the
    /// caller cancels; checks and encodes the output.
    async fn run_unary(
        &self,
        admitted: Admitted,
        handler: Arc<dyn SkillHandler>,
    ) -> Result<Vec<u8>, CallError> {
        let Admitted {
            ctx,
            args,
            timeout,
            skill,
            run,
            ..
        } = admitted;
        let token = run.token().clone();
        // A handler that notices the cancel and answers is still a cancelled call.
        let output = tokio::select! {
            biased;
            _ = token.cancelled() => {
                return Err(CallError::new(ErrorCode::Cancelled, "cancelled by the caller"));
            }
            r = tokio::time::timeout(timeout, handler.call(ctx, args)) => r
                .map_err(|_| {
                    token.cancel();
                    CallError::new(ErrorCode::Timeout, format!("no result within {timeout:?}"))
                })?
                .map_err(|e| {
                    if token.is_cancelled() {
                        CallError::new(ErrorCode::Cancelled, "cancelled by the caller")
                    } else {
                        CallError::new(ErrorCode::HandlerFailed, e.message)
                    }
                })?,
        };
        if let Some(schema) = &skill.output
            && let Err(e) = schema.validate(&output)
        {
            tracing::warn!(skill = %skill.spec.name, "handler output does not match its schema: {e}");
            return Err(CallError::new(
                ErrorCode::Internal,
                "the skill's output does not match its schema",
            ));
        }
        let out = to_cbor(&output);
        if out.len() > MAX_OUTPUT_BYTES {
            return Err(CallError::new(
                ErrorCode::OutputTooLarge,
                format!("{} bytes of output, at most {MAX_OUTPUT_BYTES}", out.len()),
            ));
        }
        Ok(out)
    }

    fn check_access(
        &self,
        peer: PeerId,
        call: &Call,
        share: ShareMode,
        now: Timestamp,
    ) -> Result<(), CallError> {
        let denied = |why: String| Err(CallError::new(ErrorCode::AccessDenied, why));
        match share {
            // Without a mesh key every reachable peer is in the (open) mesh; with one, only mesh
            // members can connect at all (pnet), so a connected peer is a member either way.
            ShareMode::Public | ShareMode::Mesh => Ok(()),
            ShareMode::Grants => {
                let Some(bytes) = &call.grant else {
                    return denied(format!("{} needs a grant from {}", call.skill, self.me));
                };
                let checks = Checks {
                    now,
                    max_skew: self.max_skew,
                    expected_signer: Some(self.me),
                };
                let grant = envelope::open::<Grant>(bytes, &checks)
                    .map_err(|e| {
                        CallError::new(ErrorCode::AccessDenied, format!("grant refused: {e}"))
                    })?
                    .value;
                if grant.grantee != peer {
                    return denied(format!("the grant is for {}, not {peer}", grant.grantee));
                }
                if !grant.covers(&call.skill) {
                    return denied(format!("the grant does not cover {}", call.skill));
                }
                Ok(())
            }
            ShareMode::Private if peer == self.me => Ok(()),
            ShareMode::Private => denied(format!("{} is private to its owner", call.skill)),
        }
    }
}

/// The stable code for an envelope that failed its checks.
fn refusal(e: EnvelopeError) -> CallError {
    let code = match &e {
        EnvelopeError::BadSignature | EnvelopeError::InvalidSignerKey => ErrorCode::BadSignature,
        EnvelopeError::SignerMismatch { .. } | EnvelopeError::UnexpectedSigner { .. } => {
            ErrorCode::SignerMismatch
        }
        EnvelopeError::Expired { .. } => ErrorCode::Expired,
        EnvelopeError::NotYetValid { .. } => ErrorCode::NotYetValid,
        EnvelopeError::Invalid(v) if v.field == "args" => ErrorCode::ArgsTooLarge,
        _ => ErrorCode::BadRequest,
    };
    CallError::new(code, e.to_string())
}

/// The call id a cancel names, read without trusting it, so that a refusal names it too.
fn peek_cancel(request: &[u8]) -> CallId {
    #[derive(serde::Deserialize)]
    struct Peek {
        call_id: CallId,
    }
    envelope::peek_payload(request)
        .filter(|(kind, _)| *kind == Kind::Cancel)
        .and_then(|(_, payload)| from_cbor::<Peek>(payload, Kind::Cancel.max_payload()).ok())
        .map_or(CallId([0; 16]), |p| p.call_id)
}

/// The call id (and skill) of a request, read without trusting them, so that even a refusal
/// names the call it answers. A zero id when it cannot be read.
pub(crate) fn peek(request: &[u8]) -> (CallId, Option<SkillName>) {
    #[derive(serde::Deserialize)]
    struct Peek {
        call_id: CallId,
        skill: Option<SkillName>,
    }
    envelope::peek_payload(request)
        .filter(|(kind, _)| *kind == Kind::Call)
        .and_then(|(_, payload)| from_cbor::<Peek>(payload, Kind::Call.max_payload()).ok())
        .map(|p| (p.call_id, p.skill))
        .unwrap_or((CallId([0; 16]), None))
}

/// Where a call ended, for the log, from the error it ended with (none: completed).
pub(crate) fn final_state(error: Option<&CallError>) -> CallState {
    state_of(error.map(|e| e.code))
}

/// Where a call ended, from the code it ended with (none: completed).
pub(crate) fn state_of(code: Option<ErrorCode>) -> CallState {
    match code {
        None => CallState::Completed,
        Some(ErrorCode::Cancelled) => CallState::Canceled,
        Some(code) if rejected(code) => CallState::Rejected,
        Some(_) => CallState::Failed,
    }
}

/// Whether a callee refuses a call with `code` before running it.
pub(crate) fn rejected(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::BadRequest
            | ErrorCode::BadSignature
            | ErrorCode::SignerMismatch
            | ErrorCode::WrongTarget
            | ErrorCode::Expired
            | ErrorCode::NotYetValid
            | ErrorCode::Replayed
            | ErrorCode::UnknownSkill
            | ErrorCode::VersionMismatch
            | ErrorCode::AccessDenied
            | ErrorCode::RateLimited
            | ErrorCode::Busy
            | ErrorCode::ArgsTooLarge
            | ErrorCode::InvalidArgs
            | ErrorCode::UnsupportedMode
            | ErrorCode::ShuttingDown
    )
}

/// How a served call ended.
enum Outcome {
    /// Refused before it ran.
    Rejected(CallError),
    /// Ran and failed (or was cancelled).
    Failed(CallError),
    /// Ran and answered.
    Output(Vec<u8>),
    /// A stream ended; its last chunk (with the error, if any) is sent.
    Streamed(Option<CallError>),
    /// An async call was accepted; it runs on and logs its own end.
    Accepted,
}

impl Outcome {
    fn error(&self) -> Option<&CallError> {
        match self {
            Outcome::Rejected(e) | Outcome::Failed(e) => Some(e),
            Outcome::Streamed(e) => e.as_ref(),
            Outcome::Output(_) | Outcome::Accepted => None,
        }
    }

    fn state(&self) -> CallState {
        match self {
            Outcome::Rejected(_) => CallState::Rejected,
            Outcome::Accepted => CallState::Working,
            other => match other.error() {
                None => CallState::Completed,
                Some(e) if e.code == ErrorCode::Cancelled => CallState::Canceled,
                Some(_) => CallState::Failed,
            },
        }
    }
}

/// A call that passed its checks, holding its slots and its place among the running calls.
struct Admitted {
    ctx_mode: Mode,
    ctx: CallContext,
    args: Value,
    timeout: Duration,
    skill: Arc<Registered>,
    _slots: (OwnedSemaphorePermit, PeerSlot, OwnedSemaphorePermit),
    run: RunGuard,
}

/// Checks a result from `peer`, opened from its signed envelope, against the call we made.
pub(crate) fn read_result(
    opened: Result<CallResult, EnvelopeError>,
    peer: PeerId,
    me: PeerId,
    call_id: CallId,
) -> Result<CallResult, crate::Error> {
    let bad = |reason: String| crate::Error::BadResponse {
        peer: Box::new(peer),
        reason,
    };
    let result = opened.map_err(|e| bad(e.to_string()))?;
    if result.caller != me {
        return Err(bad(format!("result is addressed to {}", result.caller)));
    }
    if result.call_id != call_id {
        return Err(bad(format!(
            "result is for call {}, not {call_id}",
            result.call_id
        )));
    }
    Ok(result)
}

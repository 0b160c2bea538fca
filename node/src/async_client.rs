//! Async calls, the caller's side: [`Node::call_async`] returns once the callee accepted the
//! call; the result comes later, even across a restart of either side (see `async_calls.rs`).

use std::time::Duration;

use libp2p::PeerId;
use serde_json::Value;
use skillmesh_protocol::envelope;
use skillmesh_protocol::{
    CallError, CallId, CallResult, CallStatus, ErrorCode, MAX_OUTPUT_BYTES, Mode, Timestamp,
    from_cbor,
};

use crate::calls::final_state;
use crate::error::{Error, Result};
use crate::node::{CallOptions, Node};
use crate::pipe::Request;
use crate::store::{CallLogEntry, CallState, Direction};

impl Node {
    /// Calls an async skill on `peer`: returns the call's id once the callee has accepted it.
    /// Follow it with [`Node::call_result`], [`Node::wait_call`] or [`Node::cancel_call`].
    pub async fn call_async(
        &self,
        peer: PeerId,
        skill: &str,
        args: Value,
        options: CallOptions,
    ) -> Result<CallId> {
        let (call, timeout) = self.new_call(peer, skill, &args, options, Mode::Async)?;
        let mut entry = CallLogEntry::new(
            call.call_id,
            Direction::Outbound,
            peer,
            call.skill.clone(),
            Mode::Async,
            CallState::Submitted,
        );
        let request = Request::Unsigned(envelope::prepare(self.signing(), &call)?);
        let answer = self.send_call(peer, request, call.call_id, timeout).await;
        let outcome = match answer {
            Ok(r) if r.status == CallStatus::Accepted => Ok(()),
            Ok(r) => Err(Error::Remote(r.error.unwrap_or_else(|| {
                CallError::new(
                    ErrorCode::Internal,
                    "an async call answered without acceptance",
                )
            }))),
            Err(e) => Err(e),
        };
        match &outcome {
            Ok(()) => entry.enter(CallState::Working, Timestamp::now()),
            Err(Error::Remote(e)) => {
                entry.error = Some(e.code);
                entry.enter(final_state(Some(e)), Timestamp::now());
            }
            Err(_) => {
                entry.error = Some(ErrorCode::Internal);
                entry.enter(CallState::Failed, Timestamp::now());
            }
        }
        // Written before the id is returned: whoever holds the id (another process, or this
        // one after a restart) finds the call in the log.
        if let Err(e) = self.store().log_calls(vec![entry.clone()], true).await {
            tracing::warn!(call = %call.call_id, "async call not logged: {e}");
            self.log().record(entry);
        }
        outcome.map(|()| call.call_id)
    }

    /// Our call `id` as the call log has it: its state, and when it entered each.
    pub async fn call_state(&self, id: CallId) -> Result<Option<CallLogEntry>> {
        Ok(self.store().call_entry(id, Direction::Outbound).await?)
    }

    /// The callee's signed result of our async call `id`, if it has come.
    pub async fn call_result(&self, id: CallId) -> Result<Option<CallResult>> {
        self.kept_result(id, Direction::Outbound).await
    }

    /// The kept result of async call `id` on `direction`'s side: ours, or one we ran.
    pub async fn kept_result(
        &self,
        id: CallId,
        direction: Direction,
    ) -> Result<Option<CallResult>> {
        self.async_calls().result(id, direction).await
    }

    /// Waits up to `timeout` for the result of our async call `id`: its output, or the
    /// callee's error (`cancelled`, `interrupted`, ...).
    pub async fn wait_call(&self, id: CallId, timeout: Duration) -> Result<Value> {
        let r = self.async_calls().wait(id, timeout).await?;
        output(r)
    }
}

/// A final result's output, or its error.
pub(crate) fn output(r: CallResult) -> Result<Value> {
    match (r.status, r.output, r.error) {
        (CallStatus::Completed, Some(out), _) => {
            from_cbor(&out, MAX_OUTPUT_BYTES).map_err(|e| Error::BadResponse {
                peer: Box::new(r.callee),
                reason: format!("output is not JSON-like CBOR: {e}"),
            })
        }
        (_, _, Some(e)) => Err(Error::Remote(e)),
        (status, _, None) => Err(Error::BadResponse {
            peer: Box::new(r.callee),
            reason: format!("a {status:?} result without an error"),
        }),
    }
}

//! Calls this node runs for others, by call id: what a `cancel` finds and stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use skillmesh_protocol::{CallError, CallId, ErrorCode};
use tokio_util::sync::CancellationToken;

/// Calls running here at most, all modes: a bound above every concurrency limit, since each
/// running call also holds a slot of those.
const MAX_RUNNING: usize = 100_000;

/// The calls running here, by id, each with the caller who may stop it.
#[derive(Debug, Default)]
pub(crate) struct Running {
    calls: Mutex<HashMap<CallId, Entry>>,
}

#[derive(Debug)]
struct Entry {
    caller: PeerId,
    token: CancellationToken,
}

/// A call's place in [`Running`]; leaving it (the call ended, however) takes it out.
#[derive(Debug)]
pub(crate) struct RunGuard {
    running: Arc<Running>,
    id: CallId,
    token: CancellationToken,
}

impl RunGuard {
    /// Cancelled when the caller cancels.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let mut calls = self.running.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.remove(&self.id);
    }
}

/// What became of a cancel.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Cancelled {
    /// The call was running and is told to stop.
    Stopping,
}

impl Running {
    /// Enters a call; `None` when it is running already (a replay reaches this only with the
    /// replay cache full) or there are too many.
    pub(crate) fn enter(self: &Arc<Self>, id: CallId, caller: PeerId) -> Option<RunGuard> {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        if calls.len() >= MAX_RUNNING || calls.contains_key(&id) {
            return None;
        }
        let token = CancellationToken::new();
        calls.insert(
            id,
            Entry {
                caller,
                token: token.clone(),
            },
        );
        Some(RunGuard {
            running: self.clone(),
            id,
            token,
        })
    }

    /// Stops call `id` for `by`, who must be its caller.
    pub(crate) fn cancel(&self, id: CallId, by: PeerId) -> Result<Cancelled, CallError> {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        match calls.get(&id) {
            None => Err(CallError::new(
                ErrorCode::UnknownCall,
                format!("no call {id} runs here"),
            )),
            Some(e) if e.caller != by => Err(CallError::new(
                ErrorCode::AccessDenied,
                "only the caller may cancel a call",
            )),
            Some(e) => {
                e.token.cancel();
                Ok(Cancelled::Stopping)
            }
        }
    }

    /// Calls running.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_caller_cancels_and_a_finished_call_is_unknown() {
        let running = Arc::new(Running::default());
        let (caller, stranger) = (PeerId::random(), PeerId::random());
        let id = CallId([3; 16]);
        let guard = running.enter(id, caller).expect("enters");
        assert!(running.enter(id, caller).is_none(), "once");
        let refused = running.cancel(id, stranger).expect_err("a stranger");
        assert_eq!(refused.code, ErrorCode::AccessDenied);
        assert!(!guard.token().is_cancelled());
        assert_eq!(running.cancel(id, caller), Ok(Cancelled::Stopping));
        assert!(guard.token().is_cancelled());
        drop(guard);
        assert_eq!(running.len(), 0);
        let gone = running.cancel(id, caller).expect_err("over");
        assert_eq!(gone.code, ErrorCode::UnknownCall);
    }
}

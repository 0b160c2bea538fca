//! Async calls (protocol/README.md §1, §6): the callee accepts at once, runs the call, and
//! delivers its signed result later as a control message through the mail path: directly when
//! the caller answers, else through the caller's mailboxes, so a caller that went offline gets
//! it when it returns. Both sides keep finished results, bounded (`calls.keep_results`,
//! `calls.keep_results_for`). A callee that restarts while calls run reports each as failed,
//! `interrupted`.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use libp2p::PeerId;
use serde_bytes::ByteBuf;
use skillmesh_protocol::envelope::{self, Checks};
use skillmesh_protocol::{
    CallError, CallId, CallResult, CallStatus, ControlMessage, ErrorCode, SigningKey, SkillName,
    Timestamp, Timings, to_cbor,
};
use tokio::sync::Notify;

use crate::call_log::CallLog;
use crate::calls::final_state;
use crate::error::{Error, Result};
use crate::mail::{MAX_MESSAGE_BYTES, Messenger};
use crate::store::{AsyncRecord, CallLogEntry, CallState, Direction, KeepResults, OpenCall, Store};

/// Attempts to deliver a result before it is left for the caller to ask for.
const DELIVERY_ATTEMPTS: u32 = 6;
/// The wait before the second attempt; it doubles each time (5 s ... 160 s).
const FIRST_RETRY: Duration = Duration::from_secs(5);

/// Both sides of async calls.
pub(crate) struct AsyncCalls {
    me: PeerId,
    signing: SigningKey,
    store: Store,
    log: CallLog,
    keep: KeepResults,
    /// Wakes callers waiting for a result.
    arrived: Notify,
    /// Set once the messenger exists; weak, as the messenger holds this.
    messenger: OnceLock<Weak<Messenger>>,
    /// Cancelled when the node stops: deliveries waiting to try again give up.
    stopping: tokio_util::sync::CancellationToken,
}

impl AsyncCalls {
    pub(crate) fn new(
        signing: SigningKey,
        store: Store,
        log: CallLog,
        keep: KeepResults,
    ) -> Arc<Self> {
        Arc::new(AsyncCalls {
            me: signing.peer_id(),
            signing,
            store,
            log,
            keep,
            arrived: Notify::new(),
            messenger: OnceLock::new(),
            stopping: Default::default(),
        })
    }

    pub(crate) fn stop(&self) {
        self.stopping.cancel();
    }

    pub(crate) fn set_messenger(&self, messenger: &Arc<Messenger>) {
        let _ = self.messenger.set(Arc::downgrade(messenger));
    }

    // ---- the callee's side ---------------------------------------------------------------------

    /// Notes an accepted call durably, before the caller hears "accepted".
    pub(crate) async fn accepted(
        &self,
        id: CallId,
        caller: PeerId,
        skill: SkillName,
    ) -> Result<()> {
        let open = OpenCall {
            caller,
            skill,
            accepted_at: Timestamp::now(),
        };
        Ok(self.store.open_async(id, open).await?)
    }

    /// Keeps a finished call's result and delivers it to its caller, retrying a while.
    pub(crate) async fn finished(self: Arc<Self>, caller: PeerId, id: CallId, result: Vec<u8>) {
        let record = AsyncRecord {
            peer: caller,
            stored_at: Timestamp::now(),
            result: ByteBuf::from(result.clone()),
            delivered: false,
        };
        if let Err(e) = self
            .store
            .put_async_result(id, Direction::Inbound, record, self.keep)
            .await
        {
            tracing::warn!(call = %id, "async result not kept: {e}");
        }
        self.deliver(caller, id, result).await;
    }

    async fn deliver(&self, caller: PeerId, id: CallId, result: Vec<u8>) {
        let message = to_cbor(&ControlMessage {
            call_result: Some(ByteBuf::from(result)),
        });
        let mut wait = FIRST_RETRY;
        for attempt in 1..=DELIVERY_ATTEMPTS {
            let Some(messenger) = self.messenger.get().and_then(Weak::upgrade) else {
                return;
            };
            let sent = tokio::select! {
                _ = self.stopping.cancelled() => return,
                sent = messenger.send_control(caller, &message) => sent,
            };
            match sent {
                Ok(report) => {
                    tracing::debug!(%caller, call = %id, delivery = ?report.delivery, "async result delivered");
                    if let Err(e) = self.store.async_delivered(id).await {
                        tracing::debug!(call = %id, "delivery not noted: {e}");
                    }
                    return;
                }
                Err(Error::ShutDown) => return,
                Err(e) if attempt == DELIVERY_ATTEMPTS => {
                    tracing::warn!(%caller, call = %id, "async result not delivered; kept here: {e}");
                }
                Err(e) => {
                    tracing::debug!(%caller, call = %id, "async result not delivered yet: {e}")
                }
            }
            drop(messenger);
            tokio::select! {
                _ = self.stopping.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait *= 2;
        }
    }

    /// At start: every async call a previous run accepted and never finished failed,
    /// `interrupted`, and its caller is told; results a previous run kept but could not
    /// deliver go out again.
    pub(crate) async fn recover(self: Arc<Self>) {
        match self.store.undelivered_async().await {
            Ok(waiting) => {
                for (id, record) in waiting {
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.deliver(record.peer, id, record.result.into_vec())
                            .await;
                    });
                }
            }
            Err(e) => tracing::warn!("undelivered async results not read: {e}"),
        }
        let open = match self.store.take_open_async().await {
            Ok(open) => open,
            Err(e) => {
                tracing::warn!("interrupted async calls not read: {e}");
                return;
            }
        };
        for (id, call) in open {
            let error = CallError::new(
                ErrorCode::Interrupted,
                "the callee restarted while the call ran",
            );
            let mut entry = CallLogEntry::new(
                id,
                Direction::Inbound,
                call.caller,
                call.skill,
                skillmesh_protocol::Mode::Async,
                CallState::Failed,
            );
            entry.started_at = call.accepted_at;
            entry.error = Some(error.code);
            self.log.record(entry);
            let result = self.seal(call.caller, id, Err(error), Timings::default());
            tracing::info!(caller = %call.caller, call = %id, "async call interrupted by a restart");
            tokio::spawn(self.clone().finished(call.caller, id, result));
        }
    }

    /// A result envelope, signed alone: completed with `output` (CBOR), or failed.
    pub(crate) fn seal(
        &self,
        caller: PeerId,
        id: CallId,
        outcome: std::result::Result<Vec<u8>, CallError>,
        timings: Timings,
    ) -> Vec<u8> {
        let (status, output, error) = match outcome {
            Ok(out) => (CallStatus::Completed, Some(ByteBuf::from(out)), None),
            Err(e) => (CallStatus::Failed, None, Some(e)),
        };
        let mut result = CallResult {
            call_id: id,
            callee: self.me,
            caller,
            status,
            output,
            error,
            timings,
        };
        // A result travels as mail: one that does not fit says so instead.
        let fits = |r: &CallResult| to_cbor(r).len() + 1024 <= MAX_MESSAGE_BYTES;
        if !fits(&result) {
            result.status = CallStatus::Failed;
            result.output = None;
            result.error = Some(CallError::new(
                ErrorCode::OutputTooLarge,
                format!(
                    "an async result travels as mail: at most {} bytes",
                    MAX_MESSAGE_BYTES - 1024
                ),
            ));
        }
        envelope::seal(&self.signing, &result).unwrap_or_default()
    }

    // ---- the caller's side ---------------------------------------------------------------------

    /// Checks a result that came as a control message from `from`: signed by it, for us.
    pub(crate) fn check(
        &self,
        from: PeerId,
        bytes: &[u8],
    ) -> std::result::Result<CallResult, String> {
        let r = envelope::open::<CallResult>(bytes, &Checks::now().signed_by(from))
            .map_err(|e| e.to_string())?
            .value;
        if r.caller != self.me {
            return Err(format!("a result addressed to {}", r.caller));
        }
        if r.status == CallStatus::Accepted {
            return Err("an async result that is not final".to_owned());
        }
        Ok(r)
    }

    /// The keep limits.
    pub(crate) fn keep(&self) -> KeepResults {
        self.keep
    }

    /// A checked result was kept: wake its waiters, and log the call's end. A result that
    /// came within moments of the call may be ahead of the call's own entry (the log's writer
    /// batches for 50 ms): the entry is looked for again, for a second.
    pub(crate) async fn arrived(&self, from: PeerId, result: &CallResult) {
        self.arrived.notify_waiters();
        let state = final_state(result.error.as_ref());
        for _ in 0..20 {
            if let Ok(Some(mut entry)) = self
                .store
                .call_entry(result.call_id, Direction::Outbound)
                .await
            {
                entry.error = result.error.as_ref().map(|e| e.code);
                entry.enter(state, Timestamp::now());
                self.log.record(entry);
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Pruned from the log (or never logged): the kept result still says what it was.
        tracing::debug!(%from, call = %result.call_id, "async result for a call not in the log");
    }

    /// The result of our async call `id`, waiting up to `timeout` for it.
    pub(crate) async fn wait(&self, id: CallId, timeout: Duration) -> Result<CallResult> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.result(id, Direction::Outbound).await? {
                return Ok(r);
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return Err(Error::Timeout(timeout));
            }
        }
    }

    /// The kept result of async call `id` on `direction`'s side: ours (signed by the callee),
    /// or one we ran (signed by us).
    pub(crate) async fn result(
        &self,
        id: CallId,
        direction: Direction,
    ) -> Result<Option<CallResult>> {
        let Some(record) = self.store.async_result(id, direction).await? else {
            return Ok(None);
        };
        let callee = match direction {
            Direction::Outbound => record.peer,
            Direction::Inbound => self.me,
        };
        envelope::open::<CallResult>(&record.result, &Checks::now().signed_by(callee))
            .map(|o| Some(o.value))
            .map_err(Error::from)
    }
}

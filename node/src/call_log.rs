//! The call log writer: records each call's outcome in the store in batches, off the call path.

use skillmesh_protocol::Timestamp;
use tokio::sync::mpsc;

use crate::store::{CallLogEntry, Store};

/// Entries waiting to be written. When the disk falls this far behind, entries are dropped
/// (and counted) rather than slowing calls down.
const QUEUE: usize = 4096;
/// Entries written per transaction at most.
const BATCH: usize = 512;

/// A cheap handle to the writer task.
#[derive(Clone, Debug)]
pub(crate) struct CallLog {
    tx: mpsc::Sender<CallLogEntry>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CallLog {
    /// Starts the writer; it ends when every handle is dropped, after writing what is queued.
    pub(crate) fn start(store: Store) -> Self {
        let (tx, mut rx) = mpsc::channel::<CallLogEntry>(QUEUE);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                let entries = std::mem::take(&mut batch);
                // A durable commit when the queue is drained keeps the log on disk at rest
                // without an fsync per batch under load.
                let durable = rx.is_empty();
                if let Err(e) = store.log_calls(entries, durable).await {
                    tracing::warn!("call log not written: {e}");
                }
            }
        });
        CallLog {
            tx,
            dropped: Default::default(),
        }
    }

    pub(crate) fn record(&self, mut entry: CallLogEntry) {
        entry.updated_at = Timestamp::now();
        if self.tx.try_send(entry).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Entries dropped because the writer fell behind.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

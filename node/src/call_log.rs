//! The call log writer: records each call's outcome in the store in batches, off the call path
//! and below the calls' priority (its commits run on the `background` thread) while it keeps
//! up; at the calls' priority when it falls behind, since a dropped entry is a record lost.

use std::time::{Duration, Instant};

use skillmesh_protocol::Timestamp;
use tokio::sync::mpsc;

use crate::store::{CallLogEntry, Store};

/// Entries waiting to be written. When the disk falls this far behind, entries are dropped
/// (and counted) rather than slowing calls down.
const QUEUE: usize = 4096;
/// Entries written per transaction at most.
const BATCH: usize = 512;
/// How long the writer waits for more entries before a transaction.
const LINGER: Duration = Duration::from_millis(50);
/// How often the log is fsynced at most.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// Entries still queued after a batch was taken at which the writer is behind: its commits
/// then run at the calls' priority (tokio's blocking pool) rather than on the niced
/// `background` thread, which under a full load gets too small a share of the CPU to keep up
/// (64 calls in flight over TCP, 25k calls/s: 1.4-7.6k entries dropped a run while niced).
const BEHIND: usize = QUEUE / 4;

/// A cheap handle to the writer task.
#[derive(Clone, Debug)]
pub(crate) struct CallLog {
    tx: mpsc::Sender<CallLogEntry>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
    writer: std::sync::Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl CallLog {
    /// Starts the writer; it ends on [`CallLog::close`] or when every handle is dropped, after
    /// writing what is queued.
    pub(crate) fn start(store: Store) -> Self {
        let (tx, mut rx) = mpsc::channel::<CallLogEntry>(QUEUE);
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let writer = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            let mut last_sync = Instant::now();
            loop {
                let n = tokio::select! {
                    n = rx.recv_many(&mut batch, BATCH) => n,
                    _ = stopped.changed() => {
                        while let Ok(e) = rx.try_recv() {
                            batch.push(e);
                        }
                        if !batch.is_empty() {
                            let _ = store.log_calls_in_background(std::mem::take(&mut batch), false).await;
                        }
                        0
                    }
                };
                if n == 0 {
                    break;
                }
                // Let a trickle gather into one transaction instead of one per call. A full
                // batch means the calls are ahead: no waiting then, or the writer's pace (not
                // the disk's) would cap the log at BATCH entries per LINGER and drop the rest.
                if batch.len() < BATCH {
                    tokio::time::sleep(LINGER).await;
                    while batch.len() < BATCH {
                        match rx.try_recv() {
                            Ok(e) => batch.push(e),
                            Err(_) => break,
                        }
                    }
                }
                let entries = std::mem::take(&mut batch);
                // fsync at most once per SYNC_EVERY: a crash loses at most that much of the log,
                // and calls never wait on the disk.
                let durable = last_sync.elapsed() >= SYNC_EVERY;
                if durable {
                    last_sync = Instant::now();
                }
                let written = if rx.len() >= BEHIND {
                    store.log_calls(entries, durable).await
                } else {
                    store.log_calls_in_background(entries, durable).await
                };
                if let Err(e) = written {
                    tracing::warn!("call log not written: {e}");
                }
            }
            // Every handle is gone: make what was written durable.
            if let Err(e) = store.log_calls_in_background(Vec::new(), true).await {
                tracing::warn!("call log not synced: {e}");
            }
        });
        CallLog {
            tx,
            dropped: Default::default(),
            stop,
            writer: std::sync::Arc::new(std::sync::Mutex::new(Some(writer))),
        }
    }

    /// Writes what is queued, syncs, and stops the writer; returns when it has.
    pub(crate) async fn close(&self) {
        let _ = self.stop.send(true);
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = writer {
            let _ = w.await;
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

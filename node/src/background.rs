//! Low-priority blocking work: one niced OS thread per process for writes that are records for
//! people (the call log's commits), so that they never take a core from a call.
//!
//! On tokio's blocking pool such a commit (0.4-1.2 ms of CPU for ~180 entries) ran at the
//! calls' own priority and, on a 2-core machine, stood in front of a call now and then: with
//! the call log on, sequential calls over TCP had a p99 of 0.85-2.15x plain libp2p's in
//! fifteen runs, with it off 1.03-1.16x; with the commits on this thread, 0.81-1.43x in
//! fourteen. Here a call's thread preempts the writer as soon as it wakes.

use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce() + Send>;

/// Jobs waiting at most. Each node has at most one job outstanding (its call log writer waits
/// for each commit), so only a process with more nodes than this ever waits for room.
const QUEUE: usize = 4096;

/// How much nicer than the rest of the process the thread is. Not the lowest priority (19, or
/// SCHED_IDLE): under a sustained full load the writer still gets a share and keeps up, where
/// at the lowest its queue would fill and entries be dropped.
const NICE: i32 = 10;

/// The thread's queue, started on first use; `None` if the thread could not be started.
static JOBS: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();

/// Why a job did not run to the end.
#[derive(Debug, thiserror::Error)]
#[error("background job did not finish: {0}")]
pub(crate) struct JobFailed(&'static str);

/// Runs `f` on the low-priority thread and returns what it returned. Where that thread cannot
/// be had, `f` runs on tokio's blocking pool instead: later, never lost.
pub(crate) async fn run<T, F>(f: F) -> Result<T, JobFailed>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (done, result) = oneshot::channel();
    let job: Job = Box::new(move || {
        // A panicking job must not take the thread, and every later job, with it.
        let out = std::panic::catch_unwind(AssertUnwindSafe(f));
        let _ = done.send(out);
    });
    match JOBS.get_or_init(start) {
        Some(jobs) => {
            if let Err(mpsc::error::SendError(job)) = jobs.send(job).await {
                tokio::task::spawn_blocking(job);
            }
        }
        None => {
            tokio::task::spawn_blocking(job);
        }
    }
    match result.await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(_)) => Err(JobFailed("it panicked")),
        Err(_) => Err(JobFailed("its thread is gone")),
    }
}

fn start() -> Option<mpsc::Sender<Job>> {
    let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
    let spawned = std::thread::Builder::new()
        .name("skillmesh-background".into())
        .spawn(move || {
            lower_priority();
            while let Some(job) = rx.blocking_recv() {
                job();
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!(
                "no background thread ({e}): the call log is written at normal priority"
            );
            None
        }
    }
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // On Linux a nice value belongs to a thread: this lowers this thread's alone.
    let me = rustix::thread::gettid();
    let now = rustix::process::getpriority_process(Some(me)).unwrap_or(0);
    if let Err(e) = rustix::process::setpriority_process(Some(me), (now + NICE).min(19)) {
        tracing::debug!("background thread keeps its priority: {e}");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {
    // Elsewhere a nice value is the whole process's; the thread keeps the normal priority.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_job_is_an_error_and_later_jobs_still_run() {
        let first = run(|| 1).await.expect("first");
        let panicked = run(|| -> u32 { panic!("on purpose") }).await;
        let after = run(|| 3).await.expect("after the panic");
        assert_eq!(first, 1);
        assert!(panicked.is_err());
        assert_eq!(after, 3);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_thread_runs_nicer_than_its_caller() {
        let caller = rustix::process::getpriority_process(None).expect("own priority");
        let worker = run(|| rustix::process::getpriority_process(Some(rustix::thread::gettid())))
            .await
            .expect("job")
            .expect("worker priority");
        assert_eq!(worker, (caller + NICE).min(19));
    }
}

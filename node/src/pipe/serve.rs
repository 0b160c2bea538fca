//! The callee's side: accepting pipes and serving the calls on them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::futures::io::BufReader;
use libp2p::{PeerId, Stream};
use skillmesh_protocol::envelope::{self, MAX_BATCH};
use skillmesh_protocol::{Kind, Mode};
use tokio::sync::{Semaphore, mpsc, watch};

use super::streams::{Gone, Incoming};
use super::{
    ACCEPTED, Activity, CREDIT, ENVELOPE, Out, READ_BUFFER, STREAM_WINDOW, WRITE_QUEUE, frame,
    read_frames, split_guarded, write_frames,
};
use crate::calls::{Inbound, Replier};

/// A callee closes a pipe that has sent it nothing for this long.
const CALLEE_IDLE: Duration = Duration::from_secs(60);
/// Pipes one peer may hold open to us at once.
const MAX_PIPES_PER_PEER: usize = 4;
/// Calls a callee reads ahead of those it answered, per pipe, on top of the per-peer limit:
/// enough that a caller over the limit hears "busy" instead of silence.
const READ_AHEAD: usize = 16;

// ---- the callee's side ---------------------------------------------------------------------------

/// Limits of the serving side.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ServeLimits {
    /// Pipes open to us at once, from everyone.
    pub(crate) max_pipes: usize,
    /// Calls one pipe may have running before we stop reading it.
    pub(crate) per_pipe: usize,
}

impl ServeLimits {
    pub(crate) fn new(max_inbound: u32, max_inbound_per_peer: u32) -> Self {
        ServeLimits {
            max_pipes: (max_inbound as usize).max(MAX_PIPES_PER_PEER),
            per_pipe: max_inbound_per_peer as usize + READ_AHEAD,
        }
    }
}

/// Accepts call pipes and serves the calls on them until `stop` turns true.
pub(crate) async fn serve(
    mut incoming: Incoming,
    inbound: Arc<Inbound>,
    activity: Arc<Activity>,
    limits: ServeLimits,
    mut stop: watch::Receiver<bool>,
) {
    let open: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
    loop {
        let (peer, stream, gone) = tokio::select! {
            next = incoming.recv() => match next {
                Some(s) => s,
                None => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let admitted = {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            let total: usize = open.values().sum();
            let mine = open.entry(peer).or_insert(0);
            if *mine >= MAX_PIPES_PER_PEER || total >= limits.max_pipes {
                false
            } else {
                *mine += 1;
                true
            }
        };
        if !admitted {
            tracing::debug!(%peer, "call pipe refused: too many open");
            continue;
        }
        let (inbound, activity, open, stop) = (
            inbound.clone(),
            activity.clone(),
            open.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            serve_pipe(peer, stream, gone, inbound, activity, limits, stop).await;
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = open.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&peer);
                }
            }
        });
    }
}

async fn serve_pipe(
    peer: PeerId,
    stream: Stream,
    mut gone: Gone,
    inbound: Arc<Inbound>,
    activity: Arc<Activity>,
    limits: ServeLimits,
    mut stop: watch::Receiver<bool>,
) {
    let (read, write) = split_guarded(stream);
    let (frames_tx, rx) = mpsc::channel(WRITE_QUEUE);
    tokio::spawn(write_frames(write, rx, inbound.signing().clone()));
    if frames_tx
        .send(Out::Frame(frame(ACCEPTED, ENVELOPE, &[])))
        .await
        .is_err()
    {
        return;
    }
    let room = Arc::new(Semaphore::new(limits.per_pipe));
    // The window of each stream running on this pipe, by tag: credit frames refill it.
    let windows: Windows = Arc::default();
    let max = Kind::Call.max_envelope();
    let mut read = BufReader::with_capacity(READ_BUFFER, read);
    loop {
        // Reading stops while the pipe has its fill of calls running: the caller's stream
        // window fills and it waits, instead of us queueing without bound.
        let Ok(first) = room.clone().acquire_owned().await else {
            break;
        };
        let limit = (1 + room.available_permits()).min(MAX_BATCH);
        let next = tokio::select! {
            r = tokio::time::timeout(CALLEE_IDLE, read_frames(&mut read, max, limit)) => r,
            // Shutting down: no new calls; those running still answer.
            _ = stop.wait_for(|s| *s) => break,
            _ = gone.wait() => break,
        };
        let frames = match next {
            Ok(Ok(f)) if f.is_empty() => break,
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tracing::debug!(%peer, "call pipe broken: {e}");
                break;
            }
            Err(_) if !windows_empty(&windows) => continue,
            Err(_) => {
                tracing::debug!(%peer, "call pipe idle; closing");
                break;
            }
        };
        let mut calls = Vec::new();
        for f in frames {
            match (f.ty, envelope::peek_payload(&f.body).map(|(k, _)| k)) {
                (CREDIT, _) => {
                    let n = f
                        .body
                        .first_chunk::<4>()
                        .map_or(0, |n| u32::from_be_bytes(*n));
                    let windows = windows.lock().unwrap_or_else(|e| e.into_inner());
                    // A credit for a stream that ended is late, not wrong.
                    if let Some(w) = windows.get(&f.tag) {
                        let room = (STREAM_WINDOW as usize).saturating_sub(w.available_permits());
                        w.add_permits((n as usize).min(room));
                    }
                }
                (ENVELOPE, Some(Kind::Cancel)) => {
                    let out = match inbound.cancel(peer, &f.body) {
                        Some(u) => Out::Sign(f.tag, u),
                        None => Out::Frame(frame(f.tag, ENVELOPE, &[])),
                    };
                    // Never waits on the read loop's behalf, nor piles up answers for a peer
                    // that does not read them: with the writer's queue full, this answer is
                    // dropped, and the caller's cancel times out (it may send it again).
                    if frames_tx.try_send(out).is_err() {
                        tracing::debug!(%peer, "cancel answer dropped: the pipe's writer is full");
                    }
                }
                (ENVELOPE, _) => calls.push(f),
                (ty, _) => {
                    tracing::debug!(%peer, "call pipe broken: a frame of type {ty} from the caller");
                    close_windows(&windows);
                    return;
                }
            }
        }
        if calls.is_empty() {
            continue;
        }
        let requests: Vec<&[u8]> = calls.iter().map(|f| f.body.as_slice()).collect();
        let opened = inbound.open(peer, &requests);
        let mut slots = std::iter::once(Some(first)).chain(std::iter::repeat_with(|| {
            room.clone().try_acquire_owned().ok()
        }));
        for (f, call) in calls.into_iter().zip(opened) {
            // Only this loop takes permits, and `limit` counted them: there is one.
            let slot = slots.next().flatten();
            let busy = activity.begin(peer, true);
            let window = Arc::new(Semaphore::new(STREAM_WINDOW as usize));
            if matches!(&call, Ok(c) if c.mode == Mode::Stream) {
                let mut w = windows.lock().unwrap_or_else(|e| e.into_inner());
                w.insert(f.tag, window.clone());
            }
            let reply = Replier::pipe(f.tag, frames_tx.clone(), window);
            let (inbound, windows) = (inbound.clone(), windows.clone());
            tokio::spawn(async move {
                inbound.serve(peer, &f.body, call, reply).await;
                windows
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&f.tag);
                drop((busy, slot));
            });
        }
    }
    // Streams still running here have lost their caller: their windows close, and they stop.
    close_windows(&windows);
}

/// The stream windows of one pipe's calls, by tag.
type Windows = Arc<Mutex<HashMap<u64, Arc<Semaphore>>>>;

fn windows_empty(windows: &Windows) -> bool {
    windows.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
}

fn close_windows(windows: &Windows) {
    for w in windows.lock().unwrap_or_else(|e| e.into_inner()).values() {
        w.close();
    }
}

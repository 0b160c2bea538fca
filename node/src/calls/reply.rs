//! Where a served call's answer goes: its pipe (tagged frames for the pipe's writer), or the
//! local caller of a call to ourselves.

use std::sync::Arc;

use skillmesh_protocol::Unsigned;
use tokio::sync::{Semaphore, mpsc};

use crate::pipe::{CHUNK, ENVELOPE, Out, STREAM_WINDOW, frame};

/// What a served call sends back, for a caller without a pipe.
#[derive(Debug)]
pub(crate) enum Reply {
    /// The result, or a stream's last chunk, for the writer to sign (`None`: nothing could be
    /// sealed; the caller gets an empty envelope and refuses it).
    Result(Option<Unsigned>),
    /// An unsigned stream chunk payload.
    Chunk(Vec<u8>),
}

#[derive(Debug)]
enum Sink {
    Pipe { tag: u64, tx: mpsc::Sender<Out> },
    Local(mpsc::Sender<Reply>),
}

/// A served call's way back, with the stream window the caller credits.
#[derive(Debug)]
pub(crate) struct Replier {
    sink: Sink,
    credits: Arc<Semaphore>,
}

impl Replier {
    /// Answers on a pipe, under the call's tag; `credits` is the stream's window, which the
    /// pipe's reader refills as credit frames come.
    pub(crate) fn pipe(tag: u64, tx: mpsc::Sender<Out>, credits: Arc<Semaphore>) -> Self {
        Replier {
            sink: Sink::Pipe { tag, tx },
            credits,
        }
    }

    /// Answers into a channel; the reader credits the window through [`Replier::credits`].
    pub(crate) fn local(tx: mpsc::Sender<Reply>) -> Self {
        Replier {
            sink: Sink::Local(tx),
            credits: Arc::new(Semaphore::new(STREAM_WINDOW as usize)),
        }
    }

    /// The stream's window.
    pub(crate) fn credits(&self) -> Arc<Semaphore> {
        self.credits.clone()
    }

    /// Sends the result (or a stream's last chunk); false if the caller is gone.
    pub(crate) async fn result(&self, unsigned: Option<Unsigned>) -> bool {
        match &self.sink {
            Sink::Pipe { tag, tx } => {
                let out = match unsigned {
                    Some(u) => Out::Sign(*tag, u),
                    None => Out::Frame(frame(*tag, ENVELOPE, &[])),
                };
                tx.send(out).await.is_ok()
            }
            Sink::Local(tx) => tx.send(Reply::Result(unsigned)).await.is_ok(),
        }
    }

    /// Waits for room in the window, then sends a chunk payload; false if the caller is gone.
    pub(crate) async fn chunk(&self, payload: Vec<u8>) -> bool {
        match self.credits.acquire().await {
            Ok(p) => p.forget(),
            Err(_) => return false,
        }
        match &self.sink {
            Sink::Pipe { tag, tx } => tx
                .send(Out::Frame(frame(*tag, CHUNK, &payload)))
                .await
                .is_ok(),
            Sink::Local(tx) => tx.send(Reply::Chunk(payload)).await.is_ok(),
        }
    }

    /// Resolves when the caller is gone (its pipe or channel closed, or the window closed).
    pub(crate) async fn gone(&self) {
        match &self.sink {
            Sink::Pipe { tx, .. } => tx.closed().await,
            Sink::Local(tx) => tx.closed().await,
        }
    }
}

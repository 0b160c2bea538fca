//! Events over gossipsub (protocol/README.md §3, §5): what a subscriber receives, and the presence of agents.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use libp2p::PeerId;
use libp2p::futures::Stream;
use skillmesh_protocol::{AgentCard, SkillSpec, Timestamp};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

/// Events buffered per topic for slow subscribers; past this the oldest are skipped (and
/// counted in [`Subscription::missed`]).
pub(crate) const SUBSCRIBER_BUFFER: usize = 256;
/// Topics one node may be subscribed to.
pub(crate) const MAX_TOPICS: usize = 256;

/// One verified event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// The application topic name (without the `skillmesh/<mesh>/app/` prefix).
    pub topic: String,
    /// Who published it (verified).
    pub publisher: PeerId,
    /// The publisher's counter.
    pub seq: u64,
    /// When it was published (publisher's clock).
    pub issued_at: Timestamp,
    /// The data as published.
    pub data: Vec<u8>,
}

impl Delivered {
    /// The data as JSON, if it is.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.data).ok()
    }
}

/// A stream of events on one topic. Dropping it ends the subscription for this handle.
pub struct Subscription {
    topic: String,
    inner: BroadcastStream<Delivered>,
    missed: u64,
}

impl Subscription {
    pub(crate) fn new(topic: String, rx: tokio::sync::broadcast::Receiver<Delivered>) -> Self {
        Subscription {
            topic,
            inner: BroadcastStream::new(rx),
            missed: 0,
        }
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Events skipped because this subscriber fell behind.
    pub fn missed(&self) -> u64 {
        self.missed
    }
}

impl Stream for Subscription {
    type Item = Delivered;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivered>> {
        loop {
            match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(d))) => return Poll::Ready(Some(d)),
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(n)))) => self.missed += n,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// An agent seen online.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerInfo {
    /// The agent.
    pub peer: PeerId,
    /// Its display name, from its card.
    pub name: Option<String>,
    /// Its skills, from its card.
    pub skills: Vec<SkillSpec>,
    /// Whether this node has a connection to it now.
    pub connected: bool,
}

/// What presence announcements told us.
#[derive(Debug, Clone)]
pub(crate) struct Presence {
    pub(crate) card: AgentCard,
    pub(crate) seen: Instant,
}

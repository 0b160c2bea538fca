//! # skillmesh
//!
//! A peer-to-peer network for AI agents. Every agent runs a node: it advertises versioned skills
//! in a private Kademlia DHT, answers signed skill calls over libp2p streams, publishes events on
//! gossipsub, traverses NATs through relays anyone may run, and leaves end-to-end encrypted mail
//! at relays for agents that are offline. There is no central server.
//!
//! This crate is the node: embed it in an agent process, or run it as the `skillmesh` daemon.
//! The wire format lives in [`skillmesh_protocol`] (re-exported as [`protocol`]).
//!
//! A [`Node`] is a cheap, cloneable handle to one event loop that owns the libp2p swarm. Build
//! it from a [`config::Config`]; serve skills with [`Node::register_skill`]; find them with
//! [`Node::find_skill`] or [`Node::find_tag`]; call them with [`Node::call`] (and
//! [`Node::call_stream`], [`Node::call_async`]: docs/calls.md in the repository); use gossip with
//! [`Node::subscribe`] and [`Node::publish`]; see who is online with [`Node::peers`].
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! use futures::StreamExt;
//! use serde_json::{json, Value};
//! use skillmesh::config::Config;
//! use skillmesh::protocol::{Mode, ShareMode, SkillSpec};
//! use skillmesh::{CallContext, Chunk, HandlerError, Node};
//!
//! // Loopback only, no mDNS: two agents in one process.
//! let local = |bootstrap| {
//!     let mut c = Config::default();
//!     c.network.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
//!     c.network.bootstrap = bootstrap;
//!     c.network.mdns = false;
//!     c
//! };
//! let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
//!
//! let alice = Node::builder(local(vec![])).data_dir(dir_a.path()).build().await?;
//! let spec = SkillSpec::builder("shout", "1.0.0").share(ShareMode::Public).tag("text").build()?;
//! alice
//!     .register_skill(spec, |_ctx: CallContext, args: Value| async move {
//!         let text = args["text"].as_str().ok_or(HandlerError::new("text please"))?;
//!         Ok::<_, HandlerError>(json!(text.to_uppercase()))
//!     })
//!     .await?;
//!
//! let bob = Node::builder(local(alice.listen_addrs().await?)).data_dir(dir_b.path()).build().await?;
//! let found = loop {
//!     // Provider records reach the DHT as the two connect.
//!     match bob.find_skill("shout").await {
//!         Ok(found) => break found,
//!         Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
//!     }
//! };
//! let out = bob.call(found[0].peer, "shout", json!({"text": "hi"})).await?;
//! assert_eq!(out, json!("HI"));
//!
//! // A stream skill: chunks go out as they are produced, under the reader's pace, and the
//! // caller reads them as a `Stream` (dropping it cancels the call on alice).
//! let spec = SkillSpec::builder("count", "1.0.0").mode(Mode::Stream).build()?;
//! alice
//!     .register_stream(spec, |_ctx: CallContext, args: Value| {
//!         let n = args["n"].as_u64().unwrap_or(0);
//!         futures::stream::iter((0..n).map(|i| Ok::<_, HandlerError>(Chunk::Json(json!(i)))))
//!     })
//!     .await?;
//! let mut chunks = bob.call_stream(alice.peer_id(), "count", json!({"n": 3})).await?;
//! let mut got = Vec::new();
//! while let Some(chunk) = chunks.next().await {
//!     got.push(chunk?);
//! }
//! assert_eq!(got, [0, 1, 2].map(|i| Chunk::Json(json!(i))));
//!
//! bob.shutdown().await?;
//! alice.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Underneath:
//! - [`identity`]: the node's Ed25519 key, kept in the data dir; its PeerId is the agent's address;
//! - [`config`]: defaults, a TOML file, environment variables and flags, validated by key;
//! - [`store`]: durable state in redb (peers, cards, skills, mailbox, call log), bounded.

mod access;
mod addrs;
mod async_calls;
mod async_client;
mod background;
pub mod backing;
mod behaviour;
mod call_log;
mod calls;
pub mod config;
mod connections;
#[cfg(feature = "daemon")]
pub mod control;
mod deferred;
mod discovery;
mod error;
mod event_loop;
mod events;
mod gossip;
pub mod identity;
pub mod mail;
mod metrics;
mod node;
mod pipe;
mod punch;
mod reach;
mod skills;
#[cfg(feature = "daemon")]
pub mod sse;
pub mod store;
mod streaming;
#[cfg(test)]
mod test_swarm;
mod wire;
mod wrap;

pub use behaviour::{RawStream, RawTransport, TransportKind};
pub use discovery::{Found, Query};
pub use error::{Error, Result};
pub use event_loop::{ConnectionInfo, NatStatus, Path, PublishReport, Reach, Relaying};
pub use events::{Delivered, PeerInfo, Subscription};
pub use mail::{Delivery, Inbox, MAX_MESSAGE_BYTES, Message, SendReport};
pub use node::{CallOptions, LookupStats, Node, NodeBuilder, short_id};
pub use reach::{AddrReach, Probes, ReachStatus};
pub use skillmesh_protocol as protocol;
pub use skills::{
    CallContext, CancellationToken, Chunk, ChunkStream, Handler, HandlerError, HandlerFuture,
    SkillHandler, StreamHandler,
};
pub use streaming::{CallStream, Receipt, StreamOptions};

//! # skillmesh
//!
//! A peer-to-peer network for AI agents. Every agent runs a node: it advertises versioned skills
//! in a private Kademlia DHT, answers signed skill calls over libp2p streams, publishes events on
//! gossipsub, traverses NATs through relays anyone may run, and leaves end-to-end encrypted mail
//! at relays for agents that are offline. There is no central server.
//!
//! This crate is the node: embed it in an agent process, or run it as the `skillmesh` daemon.
//! The wire format lives in [`skillmesh_protocol`].
//!
//! The foundation available now:
//! - [`identity`]: the node's Ed25519 key, kept in the data dir; its PeerId is the agent's address;
//! - [`config`]: defaults, a TOML file, environment variables and flags, validated by key;
//! - [`store`]: durable state in redb (peers, cards, skills, mailbox, call log), bounded.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! use skillmesh::config::Config;
//! use skillmesh::identity::Identity;
//! use skillmesh::store::{Store, STORE_FILE};
//! use skillmesh_protocol::{Mode, ShareMode, SkillSpec};
//!
//! let data_dir = tempfile::tempdir()?;
//! let config = Config::from_toml("[node]\nname = \"translator\"\n")?;
//!
//! // First run creates the identity; later runs load the same one.
//! let (identity, created) = Identity::load_or_create(data_dir.path())?;
//! assert!(created);
//!
//! let store = Store::open(&data_dir.path().join(STORE_FILE), config.store.clone()).await?;
//! let spec = SkillSpec::builder("translate", "1.0.0")
//!     .mode(Mode::Sync)
//!     .share(ShareMode::Public)
//!     .tag("nlp")
//!     .build()?;
//! store.put_skill(spec).await?;
//! assert_eq!(store.skills().await?.len(), 1);
//! println!("{} is {}", config.node.name, identity.peer_id());
//! # Ok(())
//! # }
//! ```

mod access;
mod behaviour;
mod calls;
pub mod config;
mod discovery;
mod error;
mod event_loop;
mod events;
pub mod identity;
mod node;
mod skills;
pub mod store;
mod wire;

pub use discovery::{Found, Query};
pub use error::{Error, Result};
pub use event_loop::PublishReport;
pub use events::{Delivered, PeerInfo, Subscription};
pub use node::{CallOptions, Node, NodeBuilder};
pub use skillmesh_protocol as protocol;
pub use skills::{CallContext, HandlerError, HandlerFuture, SkillHandler};

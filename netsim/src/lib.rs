//! # skillmesh-netsim
//!
//! Runs many real skillmesh nodes (the node crate's own code, not a model of it) in one
//! process, over libp2p's in-memory transport with the full stack (Noise, Yamux, Kademlia,
//! gossipsub, signed calls), and reports how the network behaves: discovery success and time,
//! call success and latency, gossip delivery and latency, memory. Scenarios are TOML with a
//! seed: the same seed gives the same roles and workload. See DESIGN §11.
//!
//! Status: the runner and the measurements above. The network model of the design (per-link
//! latency and bandwidth, loss, partitions, churn, NAT, relays) is the next step; until then
//! links are the in-memory transport's, instant and lossless. Scale is not there yet: 20 nodes
//! run in seconds, but a 200-node run did not finish within 400 s (2 GB RSS).
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread")]
//! # async fn main() -> Result<(), skillmesh_netsim::SimError> {
//! let scenario = skillmesh_netsim::Scenario::from_toml(r#"
//!     name = "tiny"
//!     seed = 7
//!     nodes = 5
//!     skills = 2
//!     lookups = 4
//!     calls = 4
//!     events = 2
//!     settle = "1s"
//! "#)?;
//! let report = skillmesh_netsim::run(&scenario).await?;
//! assert_eq!(report.call_success, 1.0);
//! println!("{}", report.table());
//! # Ok(())
//! # }
//! ```

mod net;
mod progress;
mod report;
mod run;
mod scenario;

pub use net::{DialStats, Model, NAT_WINDOW, Net, Placement};
pub use report::{Connections, Latency, MailOutcome, PartitionOutcome, Report, Samples};
pub use run::{Options, run, run_with};
pub use scenario::{Churn, MAX_NODES, Mail, Network, Partition, Scenario};

/// A simulation could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The scenario is invalid.
    #[error("scenario: {0}")]
    Scenario(String),
    /// A node could not start or act.
    #[error("node: {0}")]
    Node(String),
}

//! # skillmesh-netsim
//!
//! Runs many real skillmesh nodes (the node crate's own code, not a model of it) in one process,
//! over libp2p's in-memory transport wrapped by a network model: per-link latency and bandwidth,
//! connection failures, partitions, churn and NAT. Scenarios are TOML files with a seed, and the
//! same seed gives the same topology, workload and fault schedule. See DESIGN §11.
//!
//! Status: this crate is a placeholder in the workspace; the simulator is built on top of the
//! node's event loop once that exists.

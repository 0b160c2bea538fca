#![doc = include_str!("../README.md")]

mod behaviour;
mod control;
mod handler;
mod shared;
mod upgrade;

pub use behaviour::{AlreadyRegistered, Behaviour};
pub use control::{Control, IncomingStreams, OpenStreamError};

/// Inbound streams per protocol waiting for the application to accept them (skillmesh).
pub const ACCEPT_QUEUE: usize = 256;
/// Dial requests waiting for the behaviour (skillmesh).
pub const DIAL_QUEUE: usize = 64;

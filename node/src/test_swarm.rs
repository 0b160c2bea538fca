//! Swarms for components tested without a whole node: TCP on loopback with Noise and Yamux,
//! as the node runs them. (Components that need no real transport use libp2p's swarm test
//! utilities, `libp2p-swarm-test`, instead.)

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{Swarm, SwarmBuilder, noise, tcp, yamux};

/// A swarm of `behaviour` over TCP; connections with nothing to keep them close after `idle`
/// (libp2p's default when `None`).
pub(crate) fn tcp<B: NetworkBehaviour>(
    idle: Option<Duration>,
    behaviour: impl FnOnce(&Keypair) -> B,
) -> Swarm<B> {
    SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|key| behaviour(key))
        .expect("behaviour")
        .with_swarm_config(|c| match idle {
            Some(idle) => c.with_idle_connection_timeout(idle),
            None => c,
        })
        .build()
}

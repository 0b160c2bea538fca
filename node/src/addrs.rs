//! Which of a node's addresses another peer can use.
//!
//! An address has a scope: *loopback* (this host), *local* (a private or link-local range:
//! RFC 1918, carrier-grade NAT's 100.64.0.0/10, 169.254.0.0/16, IPv6 unique-local and
//! link-local), or *global* (everything else, DNS names and relay circuits included). A card
//! goes to every peer of the mesh, so it carries the widest scope the node has: its global
//! addresses (listen addresses, addresses probes confirmed, relay circuits) when it has any;
//! else its local ones (a mesh on one LAN); else loopback (every node on one host). A peer
//! that dialed a card's loopback address from another host would reach itself, and one that
//! dialed a LAN address from elsewhere would reach a stranger or nothing.
//!
//! Addresses a peer tells about itself over identify are kept (for the DHT's routing table)
//! only where they can be of use to us: loopback ones when the peer sees us at a loopback
//! address (it is on this host), local ones when it sees us at a local or loopback address.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

/// Where an address can be reached from; ordered from narrowest to widest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Scope {
    Loopback,
    Local,
    Global,
}

fn v4(ip: Ipv4Addr) -> Scope {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Scope::Loopback
    } else if ip.is_private() || ip.is_link_local() || (a == 100 && (64..128).contains(&b)) {
        Scope::Local
    } else {
        Scope::Global
    }
}

fn v6(ip: Ipv6Addr) -> Scope {
    if let Some(v4addr) = ip.to_ipv4_mapped() {
        return v4(v4addr);
    }
    let first = ip.segments()[0];
    if ip.is_loopback() {
        Scope::Loopback
    } else if first & 0xfe00 == 0xfc00 || first & 0xffc0 == 0xfe80 {
        Scope::Local
    } else {
        Scope::Global
    }
}

/// The scope of `addr`, by its first IP; a relay circuit is as wide as the Internet (a peer
/// reaches it through the relay, whose address is its own affair).
pub(crate) fn scope(addr: &Multiaddr) -> Scope {
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return Scope::Global;
    }
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => v4(ip),
        Some(Protocol::Ip6(ip)) => v6(ip),
        _ => Scope::Global,
    }
}

/// Unspecified addresses (`0.0.0.0`) are for listening, not for others to dial.
fn dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// The addresses a card carries, from all a node has: those of its widest scope, relay
/// circuits first (the only way into a node behind NAT), then QUIC, then the rest, without
/// duplicates, at most `max`.
pub(crate) fn for_card(addrs: &[Multiaddr], max: usize) -> Vec<Multiaddr> {
    let mut seen = HashSet::new();
    let mut v: Vec<Multiaddr> = addrs
        .iter()
        .filter(|a| dialable(a) && seen.insert((*a).clone()))
        .cloned()
        .collect();
    let Some(widest) = v.iter().map(scope).max() else {
        return v;
    };
    v.retain(|a| scope(a) == widest);
    let rank = |a: &Multiaddr| {
        if a.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
            0
        } else if a.iter().any(|p| matches!(p, Protocol::QuicV1)) {
            1
        } else {
            2
        }
    };
    v.sort_by_key(rank);
    v.truncate(max);
    v
}

/// Whether `addr`, which a peer says it listens on, is of use to this node, given where that
/// peer sees this node (`observed`, from identify).
pub(crate) fn usable_from(addr: &Multiaddr, observed: &Multiaddr) -> bool {
    dialable(addr) && scope(addr) >= scope(observed).min(Scope::Global)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().expect("addr")
    }

    #[test]
    fn scopes() {
        assert_eq!(scope(&a("/ip4/127.0.0.1/tcp/1")), Scope::Loopback);
        assert_eq!(scope(&a("/ip6/::1/tcp/1")), Scope::Loopback);
        for local in [
            "/ip4/10.1.2.3/tcp/1",
            "/ip4/172.16.0.1/tcp/1",
            "/ip4/192.168.1.2/tcp/1",
            "/ip4/100.64.0.1/tcp/1",
            "/ip4/169.254.1.1/tcp/1",
            "/ip6/fd00::1/tcp/1",
            "/ip6/fe80::1/tcp/1",
        ] {
            assert_eq!(scope(&a(local)), Scope::Local, "{local}");
        }
        for global in [
            "/ip4/198.18.0.1/tcp/1",
            "/ip4/100.128.0.1/tcp/1",
            "/ip6/2001:db8::1/tcp/1",
            "/dns4/example.org/tcp/1",
            "/ip4/192.168.1.1/tcp/1/p2p/12D3KooWA8aZA9CgHksiD8j6yU5De7m7tcDwMz3Vhtpn8ovYmBNa/p2p-circuit",
        ] {
            assert_eq!(scope(&a(global)), Scope::Global, "{global}");
        }
    }

    #[test]
    fn a_card_carries_the_widest_scope_the_node_has() {
        let circuit = a(
            "/ip4/198.18.0.1/tcp/4001/p2p/12D3KooWA8aZA9CgHksiD8j6yU5De7m7tcDwMz3Vhtpn8ovYmBNa/p2p-circuit",
        );
        let all = vec![
            a("/ip4/127.0.0.1/tcp/4001"),
            a("/ip4/192.168.1.2/tcp/4001"),
            a("/ip4/0.0.0.0/tcp/4001"),
            a("/ip4/198.18.0.7/tcp/4001"),
            a("/ip4/198.18.0.7/udp/4001/quic-v1"),
            circuit.clone(),
            circuit.clone(),
        ];
        assert_eq!(
            for_card(&all, 8),
            vec![
                circuit,
                a("/ip4/198.18.0.7/udp/4001/quic-v1"),
                a("/ip4/198.18.0.7/tcp/4001")
            ]
        );
        assert_eq!(
            for_card(&all[..3], 8),
            vec![a("/ip4/192.168.1.2/tcp/4001")],
            "a LAN mesh"
        );
        assert_eq!(
            for_card(&all[..1], 8),
            vec![a("/ip4/127.0.0.1/tcp/4001")],
            "one host"
        );
        assert!(for_card(&all[2..3], 8).is_empty());
    }

    #[test]
    fn a_peer_s_addresses_are_kept_where_they_can_be_reached() {
        let lo = a("/ip4/127.0.0.1/tcp/1");
        let lan = a("/ip4/192.168.1.2/tcp/1");
        let wan = a("/ip4/198.18.0.2/tcp/1");
        // It sees us on loopback: it is on this host; every address may work.
        assert!(usable_from(&lo, &lo) && usable_from(&lan, &lo) && usable_from(&wan, &lo));
        // Across a LAN: not its loopback.
        assert!(!usable_from(&lo, &lan) && usable_from(&lan, &lan) && usable_from(&wan, &lan));
        // Across the Internet: only what is global.
        assert!(!usable_from(&lo, &wan) && !usable_from(&lan, &wan) && usable_from(&wan, &wan));
    }
}

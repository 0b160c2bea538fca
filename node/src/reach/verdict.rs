//! What a node concludes about its own reachability from the answers to its probes.
//!
//! Each address others report seeing this node at (identify's observed addresses) is a
//! candidate, and each candidate has its own state, `unknown` at first. A probe asks one
//! AutoNAT server to dial the address; its answer is *reached*, *not reached*, or
//! *inconclusive* (the probe could not be made: refused by a limit on either side, no answer in
//! time, a server that connected but whose stream failed). Inconclusive answers count for
//! nothing. An address becomes `public` or `private` when the last [`CONFIRMATIONS`]
//! conclusive answers agree, from as many different servers whenever that many are connected
//! (one server alone must say it twice), and it changes again only on as many agreeing answers
//! the other way. The node is `public` when one address is, `private` when none is and one is
//! private, and `unknown` otherwise. docs/reachability.md has the whole state machine.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use serde::Serialize;

/// Agreeing conclusive answers that decide an address, or change its state.
pub(crate) const CONFIRMATIONS: usize = 2;
/// Conclusive answers kept per address.
const HISTORY: usize = 4;
/// Addresses tracked at once.
pub(crate) const MAX_ADDRS: usize = 8;
/// Wait after an inconclusive probe, doubling each time up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// What this node knows of its reachability (`status` shows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reach {
    /// No verdict yet.
    Unknown,
    /// Others can dial it.
    Public,
    /// Others cannot dial it: it uses relays.
    Private,
}

/// An address whose state changed in a way the swarm must hear of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// Now public: an external address.
    Confirmed(Multiaddr),
    /// Was public, now private.
    Expired(Multiaddr),
}

#[derive(Clone, Debug)]
struct Candidate {
    reach: Reach,
    /// The latest conclusive answers, oldest first: (server, reached).
    results: VecDeque<(PeerId, bool)>,
    /// How many times peers reported seeing us there: the most reported go first.
    score: u32,
    /// When a peer last reported it.
    seen: Instant,
    /// When the last conclusive answer came.
    concluded: Option<Instant>,
    /// When the last inconclusive answer came, and how many came in a row.
    inconclusive: Option<(Instant, u32)>,
    /// Servers probing it now.
    probing: Vec<PeerId>,
}

impl Candidate {
    fn new(now: Instant) -> Self {
        Candidate {
            reach: Reach::Unknown,
            results: VecDeque::new(),
            score: 1,
            seen: now,
            concluded: None,
            inconclusive: None,
            probing: Vec::new(),
        }
    }

    /// The state the last answers agree on, if they do.
    fn agreed(&self, servers: usize) -> Option<Reach> {
        if self.results.len() < CONFIRMATIONS {
            return None;
        }
        let last: Vec<&(PeerId, bool)> = self.results.iter().rev().take(CONFIRMATIONS).collect();
        let reached = last[0].1;
        if last.iter().any(|(_, r)| *r != reached) {
            return None;
        }
        let mut distinct: Vec<PeerId> = last.iter().map(|(s, _)| *s).collect();
        distinct.sort_unstable_by_key(|p| p.to_bytes());
        distinct.dedup();
        if distinct.len() < CONFIRMATIONS.min(servers.max(1)) {
            return None;
        }
        Some(if reached {
            Reach::Public
        } else {
            Reach::Private
        })
    }

    /// Whether the newest answer disagrees with the state: a contest to settle soon.
    fn contested(&self) -> bool {
        matches!(
            (self.reach, self.results.back()),
            (Reach::Public, Some((_, false)))
                | (Reach::Private, Some((_, true)))
                | (Reach::Unknown, _)
        )
    }
}

/// One address's state, for `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AddrReach {
    /// The address.
    pub addr: Multiaddr,
    /// Its state.
    pub reach: Reach,
    /// Its latest conclusive answers, oldest first: true where the server reached it.
    pub answers: Vec<bool>,
}

/// A probe to make: the address, and servers not to ask (they are asking already, or gave
/// the latest answers, which another server should confirm).
pub(crate) struct Due {
    pub(crate) addr: Multiaddr,
    pub(crate) probes: usize,
    pub(crate) avoid: Vec<PeerId>,
    pub(crate) busy: Vec<PeerId>,
}

/// The candidates and their states.
#[derive(Default)]
pub(crate) struct Verdicts {
    addrs: HashMap<Multiaddr, Candidate>,
}

impl Verdicts {
    /// A peer reported seeing this node at `addr`.
    pub(crate) fn seen(&mut self, addr: &Multiaddr, now: Instant) {
        if let Some(c) = self.addrs.get_mut(addr) {
            c.score = c.score.saturating_add(1);
            c.seen = now;
            return;
        }
        if self.addrs.len() >= MAX_ADDRS {
            // Make room by the address reported longest ago that is neither public nor being
            // probed (a node that moved networks is reported at new addresses, not old ones),
            // undecided ones first; if there is none, the newcomer waits to be reported again.
            let Some(evict) = self
                .addrs
                .iter()
                .filter(|(_, c)| c.reach != Reach::Public && c.probing.is_empty())
                .min_by_key(|(_, c)| (c.reach != Reach::Unknown, c.seen))
                .map(|(a, _)| a.clone())
            else {
                return;
            };
            self.addrs.remove(&evict);
        }
        self.addrs.insert(addr.clone(), Candidate::new(now));
    }

    /// A probe of `addr` by `server` began.
    pub(crate) fn started(&mut self, addr: &Multiaddr, server: PeerId) {
        if let Some(c) = self.addrs.get_mut(addr) {
            c.probing.push(server);
        }
    }

    /// A probe of `addr` by `server` ended: `Some(reached)`, or `None` when inconclusive.
    /// `servers` is how many AutoNAT servers this node is connected to.
    pub(crate) fn record(
        &mut self,
        addr: &Multiaddr,
        server: PeerId,
        result: Option<bool>,
        servers: usize,
        now: Instant,
    ) -> Option<Change> {
        let c = self.addrs.get_mut(addr)?;
        if let Some(i) = c.probing.iter().position(|s| *s == server) {
            c.probing.swap_remove(i);
        }
        let Some(reached) = result else {
            let n = c.inconclusive.map_or(1, |(_, n)| n.saturating_add(1));
            c.inconclusive = Some((now, n));
            return None;
        };
        c.inconclusive = None;
        c.concluded = Some(now);
        if c.results.len() >= HISTORY {
            c.results.pop_front();
        }
        c.results.push_back((server, reached));
        let agreed = c.agreed(servers)?;
        let before = c.reach;
        if agreed == before {
            return None;
        }
        c.reach = agreed;
        tracing::info!(%addr, reach = ?agreed, "address reachability decided");
        match (before, agreed) {
            (_, Reach::Public) => Some(Change::Confirmed(addr.clone())),
            (Reach::Public, _) => Some(Change::Expired(addr.clone())),
            _ => None,
        }
    }

    /// The node's verdict.
    pub(crate) fn reach(&self) -> Reach {
        let states = || self.addrs.values().map(|c| c.reach);
        if states().any(|r| r == Reach::Public) {
            Reach::Public
        } else if states().any(|r| r == Reach::Private) {
            Reach::Private
        } else {
            Reach::Unknown
        }
    }

    /// Probes to make now: an address not yet decided (or whose newest answer disagrees with
    /// its state) is probed by up to [`CONFIRMATIONS`] servers at once, again as soon as an
    /// answer comes, and after a backoff when answers are inconclusive; a decided one is
    /// checked again every `recheck`. QUIC addresses first, then the most reported.
    pub(crate) fn due(&self, now: Instant, recheck: Duration) -> Vec<Due> {
        let mut due: Vec<(&Multiaddr, &Candidate)> = self
            .addrs
            .iter()
            .filter(|(_, c)| {
                let waited = c.inconclusive.is_none_or(|(t, n)| {
                    let backoff = FIRST_RETRY
                        .saturating_mul(1 << (n.saturating_sub(1)).min(8))
                        .min(MAX_RETRY);
                    now.saturating_duration_since(t) >= backoff
                });
                let fresh = c
                    .concluded
                    .is_some_and(|t| now.saturating_duration_since(t) < recheck);
                waited && (c.contested() || !fresh) && c.probing.len() < CONFIRMATIONS
            })
            .collect();
        // QUIC first: a dial-back into a NAT that drops it fails in the server's QUIC
        // handshake, where TCP's outlasts the server's timeout and says nothing.
        let quic = |a: &Multiaddr| {
            a.iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1))
        };
        due.sort_by_key(|(a, c)| (!quic(a), std::cmp::Reverse(c.score)));
        due.into_iter()
            .map(|(addr, c)| {
                let want = if c.contested() { CONFIRMATIONS } else { 1 };
                let mut avoid: Vec<PeerId> = c.probing.clone();
                avoid.extend(
                    c.results
                        .iter()
                        .rev()
                        .take(CONFIRMATIONS - 1)
                        .map(|(s, _)| *s),
                );
                Due {
                    addr: addr.clone(),
                    probes: want.saturating_sub(c.probing.len()),
                    avoid,
                    busy: c.probing.clone(),
                }
            })
            .filter(|d| d.probes > 0)
            .collect()
    }

    /// Every address and its state, for `status`, the most reported first.
    pub(crate) fn addrs(&self) -> Vec<AddrReach> {
        let mut v: Vec<(&Multiaddr, &Candidate)> = self.addrs.iter().collect();
        v.sort_by_key(|(a, c)| (std::cmp::Reverse(c.score), a.to_vec()));
        v.into_iter()
            .map(|(a, c)| AddrReach {
                addr: a.clone(),
                reach: c.reach,
                answers: c.results.iter().map(|(_, r)| *r).collect(),
            })
            .collect()
    }

    /// Forgets probes in flight with `server` (its connection closed).
    pub(crate) fn server_gone(&mut self, server: PeerId) {
        for c in self.addrs.values_mut() {
            c.probing.retain(|s| *s != server);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> Multiaddr {
        "/ip4/198.51.100.7/tcp/4001".parse().expect("addr")
    }

    fn probe(
        v: &mut Verdicts,
        server: PeerId,
        reached: Option<bool>,
        servers: usize,
    ) -> Option<Change> {
        v.started(&addr(), server);
        v.record(&addr(), server, reached, servers, Instant::now())
    }

    #[test]
    fn one_failed_probe_never_makes_a_public_node_private() {
        let (s1, s2, s3) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut v = Verdicts::default();
        v.seen(&addr(), Instant::now());
        assert_eq!(probe(&mut v, s1, Some(true), 3), None);
        assert_eq!(v.reach(), Reach::Unknown, "one answer decides nothing");
        assert_eq!(
            probe(&mut v, s2, Some(true), 3),
            Some(Change::Confirmed(addr()))
        );
        assert_eq!(v.reach(), Reach::Public);
        // One server that cannot dial back (its own limits, a firewall of its own).
        assert_eq!(probe(&mut v, s3, Some(false), 3), None);
        assert_eq!(v.reach(), Reach::Public);
        assert_eq!(probe(&mut v, s1, Some(true), 3), None);
        assert_eq!(probe(&mut v, s3, Some(false), 3), None);
        assert_eq!(v.reach(), Reach::Public);
    }

    #[test]
    fn agreement_needs_two_servers_where_there_are_two() {
        let (s1, s2) = (PeerId::random(), PeerId::random());
        let mut v = Verdicts::default();
        v.seen(&addr(), Instant::now());
        probe(&mut v, s1, Some(false), 2);
        probe(&mut v, s1, Some(false), 2);
        assert_eq!(
            v.reach(),
            Reach::Unknown,
            "the same server twice, with another in reach"
        );
        probe(&mut v, s2, Some(false), 2);
        assert_eq!(v.reach(), Reach::Private);
        // Back to public takes as much evidence.
        assert_eq!(probe(&mut v, s2, Some(true), 2), None);
        assert_eq!(v.reach(), Reach::Private);
        assert_eq!(
            probe(&mut v, s1, Some(true), 2),
            Some(Change::Confirmed(addr()))
        );
        assert_eq!(v.reach(), Reach::Public);
        probe(&mut v, s1, Some(false), 2);
        assert_eq!(
            probe(&mut v, s2, Some(false), 2),
            Some(Change::Expired(addr()))
        );
        assert_eq!(v.reach(), Reach::Private);
    }

    #[test]
    fn a_lone_server_must_say_it_twice_and_inconclusive_answers_count_for_nothing() {
        let s = PeerId::random();
        let mut v = Verdicts::default();
        v.seen(&addr(), Instant::now());
        for _ in 0..5 {
            probe(&mut v, s, None, 1);
        }
        assert_eq!(v.reach(), Reach::Unknown);
        probe(&mut v, s, Some(false), 1);
        assert_eq!(v.reach(), Reach::Unknown);
        probe(&mut v, s, None, 1);
        probe(&mut v, s, Some(false), 1);
        assert_eq!(v.reach(), Reach::Private);
    }

    #[test]
    fn probes_are_scheduled_with_backoff_and_rechecks() {
        let (s1, s2) = (PeerId::random(), PeerId::random());
        let recheck = Duration::from_secs(300);
        let mut v = Verdicts::default();
        let t0 = Instant::now();
        v.seen(&addr(), Instant::now());
        let due = v.due(t0, recheck);
        assert_eq!(due.len(), 1);
        assert_eq!(
            due[0].probes, CONFIRMATIONS,
            "undecided: two servers at once"
        );
        // Inconclusive: wait, longer each time.
        v.started(&addr(), s1);
        v.record(&addr(), s1, None, 2, t0);
        assert!(v.due(t0 + Duration::from_secs(1), recheck).is_empty());
        assert_eq!(v.due(t0 + FIRST_RETRY, recheck).len(), 1);
        v.started(&addr(), s1);
        v.record(&addr(), s1, None, 2, t0);
        assert!(v.due(t0 + FIRST_RETRY, recheck).is_empty());
        assert_eq!(v.due(t0 + FIRST_RETRY * 2, recheck).len(), 1);
        // Decided: quiet until the recheck, which asks one server.
        v.started(&addr(), s1);
        v.record(&addr(), s1, Some(true), 2, t0);
        let due = v.due(t0, recheck);
        assert_eq!(
            due[0].avoid,
            vec![s1],
            "the next answer must come from another server"
        );
        v.started(&addr(), s2);
        v.record(&addr(), s2, Some(true), 2, t0);
        assert_eq!(v.reach(), Reach::Public);
        assert!(v.due(t0 + Duration::from_secs(10), recheck).is_empty());
        let due = v.due(t0 + recheck, recheck);
        assert_eq!(due[0].probes, 1);
        // A dissenting answer is settled at once.
        v.started(&addr(), s1);
        v.record(&addr(), s1, Some(false), 2, t0 + recheck);
        assert_eq!(v.due(t0 + recheck, recheck)[0].probes, CONFIRMATIONS);
    }

    #[test]
    fn candidates_are_bounded_and_the_stalest_go_first() {
        let mut v = Verdicts::default();
        let a = |i: u16| -> Multiaddr {
            format!("/ip4/198.51.100.7/tcp/{}", 4000 + i)
                .parse()
                .expect("addr")
        };
        let t0 = Instant::now();
        for i in 0..MAX_ADDRS as u16 {
            let at = t0 + Duration::from_secs(u64::from(i));
            v.seen(&a(i), at);
            v.seen(&a(i), at);
        }
        // The oldest is public: it stays; the next oldest makes room.
        let s = PeerId::random();
        for _ in 0..CONFIRMATIONS {
            v.started(&a(0), s);
            v.record(&a(0), s, Some(true), 1, t0);
        }
        v.seen(&a(100), t0 + Duration::from_secs(100));
        let kept: Vec<Multiaddr> = v.addrs().into_iter().map(|r| r.addr).collect();
        assert_eq!(kept.len(), MAX_ADDRS);
        assert!(kept.contains(&a(0)) && kept.contains(&a(100)) && !kept.contains(&a(1)));
    }
}

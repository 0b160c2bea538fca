//! DHT lookups, each kind in its own map by query id: providers of a key, an agent's card
//! (asked of the agent first, over the card protocol), where a peer is, and relays.

use std::collections::{HashMap, HashSet};

use libp2p::kad::store::MemoryStore;
use libp2p::kad::{
    self, GetClosestPeersOk, GetProvidersOk, GetRecordOk, QueryId, QueryResult, RecordKey,
};
use libp2p::request_response::OutboundRequestId;
use libp2p::{Multiaddr, PeerId};
use skillmesh_protocol::AgentCard;
use skillmesh_protocol::envelope::{self, Checks};
use skillmesh_protocol::keys::{card_key, relay_key};
use tokio::sync::oneshot;

use super::Found;
use crate::discovery::verify_card_record;

/// Providers one lookup collects before it stops.
const MAX_PROVIDERS_PER_LOOKUP: usize = 20;
/// Addresses taken from a provider record, per provider, at most.
const ADDRS_PER_PROVIDER: usize = 8;
/// Answers with providers a lookup waits for before it stops. Providers are stored at the
/// peers nearest to the key as each provider's own walk saw them, and those walks do not all
/// end at the same 20 peers, so one or two answers miss servers on a loaded network; the
/// walk's own end waits for all 20 nearest to answer, which takes seconds there. Four is where
/// netsim's 1,000-node runs stopped missing servers without slowing lookups (the runs and the
/// values tried: docs/performance.md).
const PROVIDER_ANSWERS: u8 = 4;

/// Where a card lookup's answer goes: the verified card and its signed bytes.
pub(crate) type CardReply = oneshot::Sender<Option<(AgentCard, Vec<u8>)>>;
/// Where a provider lookup's answer goes: each provider with the addresses the answers gave.
pub(crate) type ProvidersReply = oneshot::Sender<Vec<(PeerId, Vec<Multiaddr>)>>;

type Kad = kad::Behaviour<MemoryStore>;

struct Providers {
    found: HashMap<PeerId, Vec<Multiaddr>>,
    /// Answers that carried some providers.
    answers: u8,
    /// Counted in the lookup metrics: a skill or tag lookup, not the node's own upkeep.
    counted: bool,
    reply: ProvidersReply,
}

struct CardLookup {
    peer: PeerId,
    best: Option<(AgentCard, Vec<u8>)>,
    reply: CardReply,
}

/// Finding where a peer is: its card first (it lists relay circuit addresses, which the
/// routing table never has for a node behind NAT: it runs kad as a client), then the peer.
enum Locate {
    Card { peer: PeerId, addrs: Vec<Multiaddr> },
    Closest { peer: PeerId },
}

impl Locate {
    fn peer(&self) -> PeerId {
        match self {
            Locate::Card { peer, .. } | Locate::Closest { peer } => *peer,
        }
    }
}

#[derive(Default)]
pub(super) struct Lookups {
    providers: HashMap<QueryId, Providers>,
    /// Cards asked of their agents; on no answer the DHT is asked.
    card_requests: HashMap<OutboundRequestId, (PeerId, CardReply)>,
    cards: HashMap<QueryId, CardLookup>,
    locating: HashMap<QueryId, Locate>,
    relays: HashMap<QueryId, HashSet<PeerId>>,
}

/// `bytes` as `peer`'s card, if they are a valid card envelope signed by it and about it.
pub(super) fn card_of(peer: PeerId, bytes: Vec<u8>) -> Option<(AgentCard, Vec<u8>)> {
    let opened = envelope::open::<AgentCard>(&bytes, &Checks::now().signed_by(peer)).ok()?;
    (opened.value.peer_id == peer).then_some((opened.value, bytes))
}

impl Lookups {
    pub(super) fn owns(&self, id: &QueryId) -> bool {
        self.providers.contains_key(id)
            || self.cards.contains_key(id)
            || self.locating.contains_key(id)
            || self.relays.contains_key(id)
    }

    /// Whether `id` is a provider lookup counted in the metrics.
    pub(super) fn counted(&self, id: &QueryId) -> bool {
        self.providers.get(id).is_some_and(|p| p.counted)
    }

    pub(super) fn find_providers(
        &mut self,
        kad: &mut Kad,
        key: RecordKey,
        counted: bool,
        reply: ProvidersReply,
    ) {
        let id = kad.get_providers(key);
        self.providers.insert(
            id,
            Providers {
                found: HashMap::new(),
                answers: 0,
                counted,
                reply,
            },
        );
    }

    /// The card protocol's request went out as `id`.
    pub(super) fn card_requested(&mut self, id: OutboundRequestId, peer: PeerId, reply: CardReply) {
        self.card_requests.insert(id, (peer, reply));
    }

    /// The answer to card request `id`: the card if it verifies as the asked peer's, else the
    /// DHT is asked. `None` when the request failed.
    pub(super) fn card_answered(
        &mut self,
        kad: &mut Kad,
        id: OutboundRequestId,
        answer: Option<Vec<u8>>,
    ) {
        let Some((peer, reply)) = self.card_requests.remove(&id) else {
            return;
        };
        match answer.and_then(|bytes| card_of(peer, bytes)) {
            Some(card) => {
                let _ = reply.send(Some(card));
            }
            None => {
                tracing::debug!(%peer, "no valid card from the agent; asking the DHT");
                let id = kad.get_record(RecordKey::new(&card_key(&peer)));
                self.cards.insert(
                    id,
                    CardLookup {
                        peer,
                        best: None,
                        reply,
                    },
                );
            }
        }
    }

    /// Asks the DHT where `peer` is, unless that is under way; [`Found::Located`] answers.
    pub(super) fn locate(&mut self, kad: &mut Kad, peer: PeerId) {
        if self.locating.values().any(|l| l.peer() == peer) {
            return;
        }
        let id = kad.get_record(RecordKey::new(&card_key(&peer)));
        self.locating.insert(
            id,
            Locate::Card {
                peer,
                addrs: Vec::new(),
            },
        );
    }

    /// Looks for relays under their DHT key; [`Found::Relays`] answers.
    pub(super) fn search_relays(&mut self, kad: &mut Kad) {
        let id = kad.get_providers(RecordKey::new(&relay_key()));
        self.relays.insert(id, HashSet::new());
    }

    /// A step of one of these lookups. What it found, once it ends.
    pub(super) fn on_result(
        &mut self,
        kad: &mut Kad,
        id: QueryId,
        result: QueryResult,
        last: bool,
    ) -> Option<Found> {
        match result {
            QueryResult::GetProviders(r) => {
                if let Some(p) = self.providers.remove(&id) {
                    self.providers_step(kad, id, p, r, last);
                } else if let Some(mut found) = self.relays.remove(&id) {
                    if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = r {
                        found.extend(providers);
                    }
                    if last {
                        return Some(Found::Relays(found));
                    }
                    self.relays.insert(id, found);
                }
                None
            }
            QueryResult::GetRecord(r) => {
                if let Some(c) = self.cards.remove(&id) {
                    self.card_step(kad, id, c, r, last);
                    None
                } else if let Some(Locate::Card { .. }) = self.locating.get(&id)
                    && let Some(Locate::Card { peer, addrs }) = self.locating.remove(&id)
                {
                    self.locate_card_step(kad, id, peer, addrs, r, last)
                } else {
                    None
                }
            }
            QueryResult::GetClosestPeers(r) => {
                let Some(&Locate::Closest { peer }) = self.locating.get(&id) else {
                    return None;
                };
                self.locating.remove(&id);
                let addrs: Vec<Multiaddr> = match &r {
                    Ok(GetClosestPeersOk { peers, .. }) => peers
                        .iter()
                        .filter(|p| p.peer_id == peer)
                        .flat_map(|p| p.addrs.clone())
                        .collect(),
                    Err(_) => Vec::new(),
                };
                if !last && addrs.is_empty() {
                    self.locating.insert(id, Locate::Closest { peer });
                    return None;
                }
                Some(Found::Located { peer, addrs })
            }
            _ => None,
        }
    }

    fn providers_step(
        &mut self,
        kad: &mut Kad,
        id: QueryId,
        mut p: Providers,
        r: kad::GetProvidersResult,
        last: bool,
    ) {
        if let Ok(GetProvidersOk::FoundProviders {
            providers,
            addresses,
            ..
        }) = r
            && !providers.is_empty()
        {
            // The card requests that follow dial these: the query that carried them is
            // finished by then, and its addresses gone with it. Only those requests: the
            // addresses come from a third party and may be stale (a NAT'd agent's from before
            // it knew), and a call that dialed them would wait out a TCP timeout before it
            // asked the DHT for the agent's card.
            for peer in providers {
                p.found.entry(peer).or_default();
            }
            for (peer, more) in addresses {
                let Some(addrs) = p.found.get_mut(&peer) else {
                    continue;
                };
                for a in more {
                    if addrs.len() < ADDRS_PER_PROVIDER && !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
            }
            p.answers = p.answers.saturating_add(1);
        }
        if last || p.found.len() >= MAX_PROVIDERS_PER_LOOKUP || p.answers >= PROVIDER_ANSWERS {
            if !last && let Some(mut q) = kad.query_mut(&id) {
                q.finish();
            }
            let _ = p
                .reply
                .send(p.found.into_iter().take(MAX_PROVIDERS_PER_LOOKUP).collect());
        } else {
            self.providers.insert(id, p);
        }
    }

    fn card_step(
        &mut self,
        kad: &mut Kad,
        id: QueryId,
        mut c: CardLookup,
        r: kad::GetRecordResult,
        last: bool,
    ) {
        // A valid card from another peer ends the walk: one copy is enough, and going on to
        // ask all twenty of the key's nearest peers only keeps the lookup waiting. Our own
        // stored copy may be old: after that one the walk goes on.
        let mut remote = false;
        if let Ok(GetRecordOk::FoundRecord(found)) = r {
            match verify_card_record(&found.record) {
                Ok(card) if card.peer_id == c.peer => {
                    remote = found.peer.is_some();
                    if c.best.as_ref().is_none_or(|b| b.0.seq < card.seq) {
                        c.best = Some((card, found.record.value));
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(peer = %c.peer, "ignored a bad card record: {e}"),
            }
        }
        if last || remote {
            if !last && let Some(mut q) = kad.query_mut(&id) {
                q.finish();
            }
            let _ = c.reply.send(c.best);
        } else {
            self.cards.insert(id, c);
        }
    }

    fn locate_card_step(
        &mut self,
        kad: &mut Kad,
        id: QueryId,
        peer: PeerId,
        mut addrs: Vec<Multiaddr>,
        r: kad::GetRecordResult,
        last: bool,
    ) -> Option<Found> {
        // As for a card lookup: another peer's copy of the card ends the walk.
        let mut remote = false;
        if let Ok(GetRecordOk::FoundRecord(found)) = r
            && let Ok(card) = verify_card_record(&found.record)
            && card.peer_id == peer
        {
            remote = found.peer.is_some() && !card.addrs.is_empty();
            addrs.extend(card.addrs);
        }
        if !last {
            if !remote {
                self.locating.insert(id, Locate::Card { peer, addrs });
                return None;
            }
            if let Some(mut q) = kad.query_mut(&id) {
                q.finish();
            }
        }
        if addrs.is_empty() {
            let id = kad.get_closest_peers(peer);
            self.locating.insert(id, Locate::Closest { peer });
            return None;
        }
        Some(Found::Located { peer, addrs })
    }
}

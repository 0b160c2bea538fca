//! The discovery component: publishing this node (`publish.rs`), lookups (`lookup.rs`), the
//! card protocol, records other peers store here, and joining the DHT.
//!
//! It works on the Kademlia and card behaviours it is handed and answers with what the event
//! loop must pass on ([`Found`]); it never reaches into the rest of the node.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use libp2p::kad::store::{MemoryStore, RecordStore};
use libp2p::kad::{self, QueryId, RecordKey};
use libp2p::request_response;
use libp2p::{Multiaddr, PeerId};
use skillmesh_protocol::{AgentCard, PrekeyBundle, SigningKey};
use tokio::sync::oneshot;

use crate::config::Config;
use crate::discovery::verify_card_record;
use crate::metrics::NodeMetrics;
use crate::skills::Registry;
use crate::wire::FrameCodec;

mod lookup;
mod publish;

use lookup::{CardReply, Lookups, ProvidersReply};
use publish::Publisher;

/// How long a node without bootstrap peers waits after meeting its first peer before it walks
/// the DHT: the call or request it connected for goes first, and more peers may arrive
/// (libp2p-kad's own automatic walk waits 500 ms for the same reasons).
const JOIN_DELAY: Duration = Duration::from_millis(500);

type Kad = kad::Behaviour<MemoryStore>;
type Cards = request_response::Behaviour<FrameCodec>;

/// How a (re)publication of this node's card and provider records went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Whether at least one other peer stored the card.
    pub card_replicated: bool,
    /// Provider keys (skills and tags) announced.
    pub keys: usize,
    /// Of those, how many reached most of the closest peers their walk found.
    pub keys_replicated: usize,
}

impl PublishReport {
    /// Whether the card reached another peer and every key most of its closest peers.
    pub fn complete(&self) -> bool {
        self.card_replicated && self.keys_replicated == self.keys
    }
}

/// What a lookup found, for the event loop to pass on.
#[derive(Debug)]
pub(super) enum Found {
    /// Where a peer is ([`Discovery::locate`]); no addresses if nowhere known.
    Located { peer: PeerId, addrs: Vec<Multiaddr> },
    /// Relays, from a search for them.
    Relays(HashSet<PeerId>),
}

pub(super) struct Discovery {
    me: PeerId,
    publisher: Publisher,
    lookups: Lookups,
    metrics: NodeMetrics,
    /// Peers to join through; without any, a node joins through the first it meets.
    bootstrap: HashSet<PeerId>,
    /// Whether a join walk has started (a node with an empty routing table cannot).
    joined: bool,
    /// When a node without bootstrap peers walks to join, once it has met someone.
    join_due: Option<Instant>,
}

impl Discovery {
    pub(super) fn new(
        signing: SigningKey,
        registry: Registry,
        config: std::sync::Arc<Config>,
        prekeys: PrekeyBundle,
        metrics: NodeMetrics,
        bootstrap: HashSet<PeerId>,
    ) -> Self {
        Discovery {
            me: signing.peer_id(),
            bootstrap,
            publisher: Publisher::new(signing, registry, config, prekeys),
            lookups: Lookups::default(),
            metrics,
            joined: false,
            join_due: None,
        }
    }

    pub(super) fn own_card(&self) -> Option<&(AgentCard, Vec<u8>)> {
        self.publisher.own_card()
    }

    /// See [`Publisher::set_card`].
    pub(super) fn set_card(
        &mut self,
        prekeys: Option<PrekeyBundle>,
        mailboxes: Option<Vec<PeerId>>,
    ) {
        self.publisher.set_card(prekeys, mailboxes);
    }

    /// Whether a publication is due now: a retry, or a changed card.
    pub(super) fn publish_due(&mut self) -> bool {
        self.publisher.take_due()
    }

    /// See [`Publisher::republish`].
    pub(super) fn republish(
        &mut self,
        kad: &mut Kad,
        addrs: &[Multiaddr],
        mailbox: bool,
        reply: Option<oneshot::Sender<PublishReport>>,
    ) -> bool {
        self.publisher.republish(kad, addrs, mailbox, reply)
    }

    pub(super) fn find_providers(
        &mut self,
        kad: &mut Kad,
        key: RecordKey,
        counted: bool,
        reply: ProvidersReply,
    ) {
        self.lookups.find_providers(kad, key, counted, reply);
    }

    /// `peer`'s card: this node's own, or asked of the agent at its known addresses and
    /// `hints` (from a provider lookup, used for this request only: a third party gave them),
    /// else of the DHT. One request, where the DHT would take a walk of twenty or more.
    pub(super) fn get_card(
        &mut self,
        cards: &mut Cards,
        peer: PeerId,
        hints: Vec<Multiaddr>,
        reply: CardReply,
    ) {
        if peer == self.me {
            let _ = reply.send(self.own_card().cloned());
            return;
        }
        let id = cards.send_request_with_addresses(&peer, Vec::new(), hints);
        self.lookups.card_requested(id, peer, reply);
    }

    /// Where `peer` is: its card's addresses, else the DHT's. [`Found::Located`] answers.
    pub(super) fn locate(&mut self, kad: &mut Kad, peer: PeerId) {
        self.lookups.locate(kad, peer);
    }

    /// Looks for relays; [`Found::Relays`] answers.
    pub(super) fn search_relays(&mut self, kad: &mut Kad) {
        self.lookups.search_relays(kad);
    }

    /// Walks the DHT toward this node's own key: Kademlia's join. The peers nearest to it
    /// learn of it and it of them, and the peers met on the way fill some farther buckets.
    /// libp2p's bootstrap goes on to refresh every bucket farther than the nearest neighbour:
    /// ten more walks in a thousand nodes, ~300 dials per node (66,000 in 200 nodes' start).
    /// Those buckets fill from inbound requests and the periodic refresh
    /// (`dht.refresh_interval`) instead. It counts as the join once it starts: a node with an
    /// empty routing table cannot.
    pub(super) fn walk(&mut self, kad: &mut Kad) {
        if kad.kbuckets().any(|b| b.num_entries() > 0) {
            kad.get_closest_peers(self.me);
            self.joined = true;
        }
    }

    /// A peer connected. Join if it is a bootstrap peer: walk to our own key once we know
    /// someone, once. Bootstrap peers connect again and again (every walk meets them), and a
    /// walk per reconnection was a third of all DHT traffic in a 200-node netsim run. The
    /// table is refreshed every `dht.refresh_interval`, and the connection manager dials
    /// known peers (walking only when it knows none) when a node is left with too few.
    /// Whether it walked.
    pub(super) fn connected(&mut self, kad: &mut Kad, peer: &PeerId) -> bool {
        if self.joined || !self.bootstrap.contains(peer) {
            return false;
        }
        self.walk(kad);
        true
    }

    /// Asks for a new publication soon: the card changed.
    pub(super) fn publish_soon(&mut self) {
        self.publisher.set_card(None, None);
    }

    /// Whether a node without bootstrap peers should join now, having met someone a while ago.
    pub(super) fn join_due(&mut self) -> bool {
        if self.join_due.is_some_and(|t| t <= Instant::now()) {
            self.join_due = None;
            return !self.joined;
        }
        false
    }

    /// A card request of another peer: answered with our card, or an empty answer that sends
    /// the asker to the DHT when there is none yet (just started).
    pub(super) fn on_cards(&mut self, kad: &mut Kad, cards: &mut Cards, event: CardEvent) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { channel, .. } => {
                    let card = self.own_card().map(|(_, b)| b.clone()).unwrap_or_default();
                    if cards.send_response(channel, card).is_err() {
                        tracing::debug!(%peer, "card request gone before its answer");
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => self.lookups.card_answered(kad, request_id, Some(response)),
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                // `card_answered` says that the DHT is asked.
                tracing::debug!(%peer, "card request failed: {error}");
                self.lookups.card_answered(kad, request_id, None);
            }
            _ => {}
        }
    }

    pub(super) fn on_kad(&mut self, kad: &mut Kad, event: kad::Event) -> Option<Found> {
        match event {
            kad::Event::InboundRequest { request } => {
                match request {
                    kad::InboundRequest::PutRecord {
                        record: Some(record),
                        source,
                        ..
                    } => store_card_record(kad, record, source),
                    kad::InboundRequest::AddProvider {
                        record: Some(record),
                    } => {
                        // kad has checked that the provider is the peer that sent it.
                        let (key, provider) = (record.key.clone(), record.provider);
                        match kad.store_mut().add_provider(record) {
                            Ok(()) => tracing::debug!(
                                key = %hex::encode(key.as_ref()),
                                %provider,
                                at = %self.me,
                                "provider record stored"
                            ),
                            Err(e) => tracing::debug!("provider record not stored: {e}"),
                        }
                    }
                    _ => {}
                }
                None
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => {
                // Which walks a node makes, and their cost: how netsim's DHT traffic is
                // attributed (RUST_LOG=skillmesh_node=debug).
                if step.last {
                    tracing::debug!(
                        kind = query_kind(&result),
                        requests = stats.num_requests(),
                        "DHT query finished"
                    );
                }
                self.on_query(kad, id, result, step.last, &stats)
            }
            // A node without bootstrap peers joins through whoever it meets first: someone
            // dialed it, or it dialed someone (`Node::dial`, mDNS).
            kad::Event::RoutingUpdated { .. } if !self.joined && self.bootstrap.is_empty() => {
                self.join_due
                    .get_or_insert_with(|| Instant::now() + JOIN_DELAY);
                None
            }
            _ => None,
        }
    }

    fn on_query(
        &mut self,
        kad: &mut Kad,
        id: QueryId,
        result: kad::QueryResult,
        last: bool,
        stats: &kad::QueryStats,
    ) -> Option<Found> {
        if self.publisher.owns(&id) {
            self.publisher.on_result(id, result, last);
            return None;
        }
        let counted = self.lookups.counted(&id);
        let found = self.lookups.on_result(kad, id, result, last);
        if counted && !self.lookups.owns(&id) {
            self.metrics.lookups.inc();
            self.metrics
                .lookup_requests
                .inc_by(u64::from(stats.num_requests()));
            self.metrics
                .lookup_failures
                .inc_by(u64::from(stats.num_failures()));
        }
        found
    }
}

type CardEvent = request_response::Event<Vec<u8>, Vec<u8>>;

fn query_kind(result: &kad::QueryResult) -> &'static str {
    match result {
        kad::QueryResult::Bootstrap(_) => "bootstrap",
        kad::QueryResult::GetClosestPeers(_) => "closest",
        kad::QueryResult::GetProviders(_) => "providers",
        kad::QueryResult::StartProviding(_) => "start_providing",
        kad::QueryResult::RepublishProvider(_) => "republish_provider",
        kad::QueryResult::GetRecord(_) => "get_record",
        kad::QueryResult::PutRecord(_) => "put_record",
        kad::QueryResult::RepublishRecord(_) => "republish_record",
    }
}

/// Stores a card record from another peer only if it verifies and is newer than the one held.
fn store_card_record(kad: &mut Kad, record: kad::Record, source: PeerId) {
    let card = match verify_card_record(&record) {
        Ok(card) => card,
        Err(e) => {
            tracing::debug!(%source, "refused a DHT record: {e}");
            return;
        }
    };
    let store = kad.store_mut();
    if let Some(existing) = store.get(&record.key)
        && let Ok(have) = verify_card_record(&existing)
        && have.seq >= card.seq
    {
        return;
    }
    if let Err(e) = store.put(record) {
        tracing::debug!("card record not stored: {e}");
    }
}

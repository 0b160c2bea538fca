//! Topics, events and presence: what the event loop knows of gossip.
//!
//! [`Topics`] owns the subscriptions (one broadcast channel per topic), the per-topic rate of
//! accepted events, the presence of agents heard on the mesh's presence topic, and when this
//! node announces its own. It works on the gossipsub behaviour it is handed and tells the loop
//! what an event taught it ([`Heard`]); it never reaches into the rest of the loop.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, PublishError};
use libp2p::{Multiaddr, PeerId};
use skillmesh_protocol::envelope::{self, Checks};
use skillmesh_protocol::{AgentCard, Event, MeshName, SigningKey, Timestamp};
use tokio::sync::broadcast;

use crate::config::GossipConfig;
use crate::error::{Error, Result};
use crate::events::{Delivered, MAX_TOPICS, Presence, SUBSCRIBER_BUFFER};
use crate::metrics::NodeMetrics;

/// Agents whose presence is kept at most; the longest unheard is forgotten first.
const MAX_PRESENCE: usize = 10_000;
/// How long after a newcomer subscribes to presence this node greets it (newcomers in that
/// time share one greeting).
const GREETING_DELAY: Duration = Duration::from_millis(300);

/// What a gossip event asks of the rest of the loop.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Heard {
    /// The peer that forwarded a message: its connection is in use.
    pub(super) active: Option<PeerId>,
    /// An agent's addresses, from its presence card.
    pub(super) addresses: Option<(PeerId, Vec<Multiaddr>)>,
}

pub(super) struct Topics {
    mesh: MeshName,
    /// Accepted per topic and second; more are ignored.
    max_events_per_sec: u32,
    presence_interval: Duration,
    metrics: NodeMetrics,
    subscribed: HashMap<String, broadcast::Sender<Delivered>>,
    /// Events accepted per topic in the current second: (second, count).
    rate: HashMap<String, (u64, u32)>,
    presence: HashMap<PeerId, Presence>,
    presence_due: Option<Instant>,
    /// Last presence sent to greet newcomers: bounds the greetings, since each one goes to the
    /// whole mesh and every join would otherwise make all of the newcomer's peers announce.
    greeted: Option<Instant>,
    /// The `seq` of this node's last event; seeded from the clock so that it grows across
    /// restarts.
    seq: u64,
}

impl Topics {
    pub(super) fn new(mesh: MeshName, config: &GossipConfig, metrics: NodeMetrics) -> Self {
        Topics {
            mesh,
            max_events_per_sec: config.max_events_per_sec,
            presence_interval: config.presence_interval,
            metrics,
            subscribed: HashMap::new(),
            rate: HashMap::new(),
            presence: HashMap::new(),
            presence_due: None,
            greeted: None,
            seq: Timestamp::now().as_millis(),
        }
    }

    /// Joins the mesh's presence topic; done once, when the loop starts.
    pub(super) fn join_presence(&self, gossipsub: &mut gossipsub::Behaviour) {
        let topic = IdentTopic::new(self.mesh.presence_topic());
        if let Err(e) = gossipsub.subscribe(&topic) {
            tracing::warn!("cannot subscribe to presence: {e}");
        }
    }

    pub(super) fn subscribe(
        &mut self,
        gossipsub: &mut gossipsub::Behaviour,
        topic: String,
    ) -> Result<broadcast::Receiver<Delivered>> {
        if let Some(tx) = self.subscribed.get(&topic) {
            return Ok(tx.subscribe());
        }
        if self.subscribed.len() >= MAX_TOPICS {
            return Err(Error::Overloaded("too many topics subscribed"));
        }
        gossipsub
            .subscribe(&IdentTopic::new(topic.clone()))
            .map_err(|e| Error::Publish(format!("cannot subscribe to {topic}: {e}")))?;
        let (tx, rx) = broadcast::channel(SUBSCRIBER_BUFFER);
        self.subscribed.insert(topic, tx);
        Ok(rx)
    }

    /// Leaves the topics nobody listens to any more.
    pub(super) fn drop_unused(&mut self, gossipsub: &mut gossipsub::Behaviour) {
        let unused: Vec<String> = self
            .subscribed
            .iter()
            .filter(|(_, tx)| tx.receiver_count() == 0)
            .map(|(t, _)| t.clone())
            .collect();
        for t in unused {
            self.subscribed.remove(&t);
            let _ = gossipsub.unsubscribe(&IdentTopic::new(t));
        }
    }

    pub(super) fn publish(
        gossipsub: &mut gossipsub::Behaviour,
        topic: String,
        data: Vec<u8>,
    ) -> Result<()> {
        gossipsub
            .publish(IdentTopic::new(topic.clone()), data)
            .map(|_| ())
            .map_err(|e| match e {
                PublishError::NoPeersSubscribedToTopic => {
                    Error::Publish(format!("no peer is subscribed to {topic} yet"))
                }
                other => Error::Publish(other.to_string()),
            })
    }

    /// Connected peers known to subscribe to `topic`.
    pub(super) fn subscribers(gossipsub: &gossipsub::Behaviour, topic: String) -> Vec<PeerId> {
        let hash = IdentTopic::new(topic).hash();
        gossipsub
            .all_peers()
            .filter(|(_, topics)| topics.contains(&&hash))
            .map(|(peer, _)| *peer)
            .collect()
    }

    /// Checks an event, reports the verdict to gossipsub, and hands it to its subscribers (or,
    /// on the presence topic, records the agent).
    pub(super) fn on_event(
        &mut self,
        gossipsub: &mut gossipsub::Behaviour,
        event: gossipsub::Event,
    ) -> Heard {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let mut heard = Heard {
                    active: Some(propagation_source),
                    addresses: None,
                };
                let topic = message.topic.as_str().to_owned();
                // The envelope's signer is the publisher (gossipsub messages are unsigned).
                let verdict = envelope::open::<Event>(&message.data, &Checks::now())
                    .map_err(|_| "bad event envelope")
                    .and_then(|o| {
                        if o.value.topic == topic {
                            Ok(o.value)
                        } else {
                            Err("topic mismatch")
                        }
                    });
                let acceptance = match &verdict {
                    Ok(_) if !self.within_rate(&topic) => MessageAcceptance::Ignore,
                    Ok(_) => MessageAcceptance::Accept,
                    Err(_) => MessageAcceptance::Reject,
                };
                gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
                if verdict.is_err() {
                    self.metrics.events_rejected.inc();
                }
                if acceptance == MessageAcceptance::Ignore {
                    tracing::debug!(%topic, "over gossip.max_events_per_sec; event ignored");
                    return heard;
                }
                match verdict {
                    Ok(event) if topic == self.mesh.presence_topic() => {
                        heard.addresses = self.on_presence(event);
                    }
                    Ok(event) => {
                        self.metrics.events_received.inc();
                        if let Some(tx) = self.subscribed.get(&topic) {
                            let prefix = format!("skillmesh/{}/app/", self.mesh);
                            let _ = tx.send(Delivered {
                                topic: topic.strip_prefix(&prefix).unwrap_or(&topic).to_owned(),
                                publisher: event.publisher,
                                seq: event.seq,
                                issued_at: event.issued_at,
                                data: event.data.into_vec(),
                            });
                        }
                    }
                    Err(why) => tracing::debug!(%propagation_source, "rejected gossip: {why}"),
                }
                heard
            }
            gossipsub::Event::Subscribed { topic, .. }
                if topic.as_str() == self.mesh.presence_topic() =>
            {
                // A newcomer: tell it about us soon (debounced with other newcomers), at most
                // once a quarter presence interval; it hears us later at our next announcement.
                let spacing = self.presence_interval / 4;
                if self.greeted.is_none_or(|t| t.elapsed() >= spacing) {
                    self.greeted = Some(Instant::now());
                    let soon = Instant::now() + GREETING_DELAY;
                    self.presence_due = Some(self.presence_due.map_or(soon, |t| t.min(soon)));
                }
                Heard::default()
            }
            _ => Heard::default(),
        }
    }

    /// Counts an event against its topic's budget for this second.
    fn within_rate(&mut self, topic: &str) -> bool {
        let second = Timestamp::now().as_millis() / 1000;
        if !self.rate.contains_key(topic) && self.rate.len() > MAX_TOPICS {
            // Only subscribed topics (and presence) reach here; clear stale seconds.
            self.rate.retain(|_, (s, _)| *s == second);
        }
        let (s, n) = self.rate.entry(topic.to_owned()).or_insert((second, 0));
        if *s != second {
            *s = second;
            *n = 0;
        }
        *n += 1;
        *n <= self.max_events_per_sec
    }

    /// Records the agent a presence event names; returns its addresses.
    fn on_presence(&mut self, event: Event) -> Option<(PeerId, Vec<Multiaddr>)> {
        let card = match envelope::open::<AgentCard>(
            &event.data,
            &Checks::now().signed_by(event.publisher),
        ) {
            Ok(o) => o.value,
            Err(e) => {
                tracing::debug!(peer = %event.publisher, "bad presence card: {e}");
                return None;
            }
        };
        if self.presence.len() >= MAX_PRESENCE
            && !self.presence.contains_key(&card.peer_id)
            && let Some(oldest) = self
                .presence
                .iter()
                .min_by_key(|(_, p)| p.seen)
                .map(|(k, _)| *k)
        {
            self.presence.remove(&oldest);
        }
        let addresses = (card.peer_id, card.addrs.clone());
        self.presence.insert(
            card.peer_id,
            Presence {
                card,
                seen: Instant::now(),
            },
        );
        Some(addresses)
    }

    /// The agents heard on the presence topic.
    pub(super) fn presence(&self) -> impl Iterator<Item = (&PeerId, &Presence)> {
        self.presence.iter()
    }

    /// The card an agent last announced, if it is present.
    pub(super) fn card(&self, peer: &PeerId) -> Option<&AgentCard> {
        self.presence.get(peer).map(|p| &p.card)
    }

    /// Drops presence not renewed for three intervals.
    pub(super) fn forget_departed(&mut self) {
        let horizon = self.presence_interval * 3;
        let now = Instant::now();
        self.presence
            .retain(|_, p| now.saturating_duration_since(p.seen) < horizon);
    }

    /// Announces this node's presence at the next housekeeping.
    pub(super) fn announce_soon(&mut self) {
        self.presence_due = Some(Instant::now());
    }

    /// Announces this node's presence (its signed card) if that is due.
    pub(super) fn announce_if_due(
        &mut self,
        gossipsub: &mut gossipsub::Behaviour,
        signing: &SigningKey,
        card: Option<&[u8]>,
    ) {
        if self.presence_due.is_none_or(|t| t > Instant::now()) {
            return;
        }
        self.presence_due = None;
        let Some(card) = card else {
            return;
        };
        self.seq += 1;
        let event = Event {
            topic: self.mesh.presence_topic(),
            publisher: signing.peer_id(),
            seq: self.seq,
            issued_at: Timestamp::now(),
            data: card.to_vec().into(),
        };
        match envelope::seal(signing, &event) {
            Ok(bytes) => {
                let topic = IdentTopic::new(self.mesh.presence_topic());
                match gossipsub.publish(topic, bytes) {
                    Ok(_) | Err(PublishError::NoPeersSubscribedToTopic) => {}
                    Err(e) => tracing::debug!("presence not published: {e}"),
                }
            }
            Err(e) => tracing::warn!("cannot sign presence: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(max_events_per_sec: u32) -> Topics {
        let config = GossipConfig {
            max_events_per_sec,
            ..GossipConfig::default()
        };
        Topics::new(
            MeshName::default(),
            &config,
            crate::metrics::Metrics::new().node,
        )
    }

    /// A topic takes at most its budget of events in one second.
    #[test]
    fn events_over_a_topics_budget_are_refused_within_the_second() {
        let mut t = topics(3);
        let second = Timestamp::now().as_millis() / 1000;
        let taken = (0..5).filter(|_| t.within_rate("a")).count();
        // The second may have turned during the count, which restarts the budget.
        if Timestamp::now().as_millis() / 1000 == second {
            assert_eq!(taken, 3);
        } else {
            assert!((3..=5).contains(&taken), "{taken}");
        }
        assert!(t.within_rate("b"), "another topic has its own budget");
    }

    /// Presence is bounded, and what was not renewed for three intervals is forgotten.
    #[test]
    fn presence_is_forgotten_after_three_silent_intervals() {
        let mut t = topics(10);
        let key = libp2p::identity::Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let card = AgentCard {
            peer_id: peer,
            name: "a".to_owned(),
            skills: Vec::new(),
            addrs: Vec::new(),
            mailboxes: Vec::new(),
            prekeys: None,
            seq: 1,
            issued_at: Timestamp::now(),
            expires_at: Timestamp::now(),
        };
        t.presence.insert(
            peer,
            Presence {
                card: card.clone(),
                seen: Instant::now(),
            },
        );
        t.forget_departed();
        assert_eq!(t.presence().count(), 1);
        t.presence.insert(
            peer,
            Presence {
                card,
                seen: Instant::now() - t.presence_interval * 3,
            },
        );
        t.forget_departed();
        assert_eq!(t.presence().count(), 0);
    }
}

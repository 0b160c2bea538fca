//! Prometheus metrics: libp2p's own (swarm, kad, gossipsub, identify, ping) and skillmesh's
//! (calls by direction and status, call latency, connected peers, events).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    direction: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: String,
}

fn latency_histogram() -> Histogram {
    // 0.1 ms to ~3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// skillmesh's own metrics; cheap to clone (all clones share the values).
#[derive(Clone, Debug)]
pub(crate) struct NodeMetrics {
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<DirectionLabel, Histogram, fn() -> Histogram>,
    pub(crate) peers: Gauge,
    pub(crate) events_received: Counter,
    pub(crate) events_rejected: Counter,
    pub(crate) lookups: Counter,
    pub(crate) lookup_requests: Counter,
    pub(crate) lookup_failures: Counter,
}

impl NodeMetrics {
    /// Records a finished call: `status` is `ok` or an error code name.
    pub(crate) fn call(&self, inbound: bool, status: &str, took: Duration) {
        let direction = if inbound { "inbound" } else { "outbound" }.to_owned();
        self.calls
            .get_or_create(&CallLabels {
                direction: direction.clone(),
                status: status.to_owned(),
            })
            .inc();
        self.call_seconds
            .get_or_create(&DirectionLabel { direction })
            .observe(took.as_secs_f64());
    }
}

/// Every metric of one node, and the registry that renders them.
pub(crate) struct Metrics {
    pub(crate) registry: Arc<Registry>,
    pub(crate) node: NodeMetrics,
    pub(crate) libp2p: libp2p::metrics::Metrics,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let libp2p = libp2p::metrics::Metrics::new(&mut registry);
        let sm = registry.sub_registry_with_prefix("skillmesh");
        let node = NodeMetrics {
            calls: Family::default(),
            call_seconds: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            peers: Gauge::default(),
            events_received: Counter::default(),
            events_rejected: Counter::default(),
            lookups: Counter::default(),
            lookup_requests: Counter::default(),
            lookup_failures: Counter::default(),
        };
        sm.register(
            "calls",
            "Skill calls by direction and final status",
            node.calls.clone(),
        );
        sm.register(
            "call_duration_seconds",
            "Skill call latency, from request to signed result",
            node.call_seconds.clone(),
        );
        sm.register(
            "connected_peers",
            "Peers with an open connection",
            node.peers.clone(),
        );
        for (name, help, counter) in [
            (
                "events_received",
                "Gossip events delivered to this node",
                &node.events_received,
            ),
            (
                "events_rejected",
                "Gossip events rejected by validation",
                &node.events_rejected,
            ),
            (
                "dht_lookups",
                "Provider lookups (skill and tag searches) finished",
                &node.lookups,
            ),
            (
                "dht_lookup_requests",
                "DHT requests sent by provider lookups",
                &node.lookup_requests,
            ),
            (
                "dht_lookup_failures",
                "DHT requests of provider lookups that failed or timed out",
                &node.lookup_failures,
            ),
        ] {
            sm.register(name, help, counter.clone());
        }
        Metrics {
            registry: Arc::new(registry),
            node,
            libp2p,
        }
    }
}

/// Renders a registry in the Prometheus text format.
pub(crate) fn render(registry: &Registry) -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

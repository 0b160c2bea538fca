//! Who may call, how often, and how many at once: the callee's admission checks (protocol/README.md §4).
//! Each structure has a hard bound on the state it keeps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use skillmesh_protocol::{CallId, ErrorCode, Timestamp};

/// Token bucket per peer: `rate` calls per second sustained, `burst` at once.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<PeerId, (f64, Instant)>,
    max_peers: usize,
}

impl RateLimiter {
    pub(crate) fn new(rate: u32, burst: u32, max_peers: usize) -> Self {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst),
            buckets: HashMap::new(),
            max_peers,
        }
    }

    /// Takes one token for `peer`; false when its bucket is empty.
    pub(crate) fn allow(&mut self, peer: PeerId, now: Instant) -> bool {
        if self.buckets.len() >= self.max_peers && !self.buckets.contains_key(&peer) {
            // Buckets that have refilled carry no information: forget them first.
            let (rate, burst) = (self.rate, self.burst);
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
            if self.buckets.len() >= self.max_peers {
                return false;
            }
        }
        let (tokens, at) = self.buckets.entry(peer).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Call ids seen while they could still be valid, so a captured call cannot be replayed.
#[derive(Debug)]
pub(crate) struct ReplayCache {
    seen: HashSet<(PeerId, CallId)>,
    by_expiry: BTreeMap<(Timestamp, PeerId, CallId), ()>,
    max: usize,
}

impl ReplayCache {
    pub(crate) fn new(max: usize) -> Self {
        ReplayCache {
            seen: HashSet::new(),
            by_expiry: BTreeMap::new(),
            max,
        }
    }

    /// Records a call valid until `valid_until`; refuses one already seen. When full of calls
    /// that are all still valid it refuses new ones (`Busy`) rather than forget one, since
    /// forgetting would let it be replayed.
    pub(crate) fn check(
        &mut self,
        caller: PeerId,
        id: CallId,
        valid_until: Timestamp,
        now: Timestamp,
    ) -> Result<(), ErrorCode> {
        while let Some((&(t, p, c), ())) = self.by_expiry.first_key_value() {
            if t >= now {
                break;
            }
            self.by_expiry.remove(&(t, p, c));
            self.seen.remove(&(p, c));
        }
        if self.seen.contains(&(caller, id)) {
            return Err(ErrorCode::Replayed);
        }
        if self.seen.len() >= self.max {
            return Err(ErrorCode::Busy);
        }
        self.seen.insert((caller, id));
        self.by_expiry.insert((valid_until, caller, id), ());
        Ok(())
    }
}

/// Counts calls running per peer; a slot is released when its guard drops.
#[derive(Debug, Clone)]
pub(crate) struct PeerSlots {
    running: Arc<Mutex<HashMap<PeerId, u32>>>,
    max_per_peer: u32,
}

/// A taken per-peer slot.
#[derive(Debug)]
pub(crate) struct PeerSlot {
    slots: PeerSlots,
    peer: PeerId,
}

impl PeerSlots {
    pub(crate) fn new(max_per_peer: u32) -> Self {
        PeerSlots {
            running: Arc::default(),
            max_per_peer,
        }
    }

    pub(crate) fn try_take(&self, peer: PeerId) -> Option<PeerSlot> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let n = running.entry(peer).or_insert(0);
        if *n >= self.max_per_peer {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            slots: self.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut running = self.slots.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = running.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                running.remove(&self.peer);
            }
        }
    }
}

/// How long a call id must be remembered: until its expiry plus the skew we tolerate.
pub(crate) fn replay_horizon(expires_at: Timestamp, skew: Duration) -> Timestamp {
    expires_at.saturating_add(skew)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let mut r = RateLimiter::new(10, 3, 100);
        let p = PeerId::random();
        let t = Instant::now();
        assert!((0..3).all(|_| r.allow(p, t)));
        assert!(!r.allow(p, t));
        assert!(r.allow(p, t + Duration::from_millis(100)));
        assert!(!r.allow(p, t + Duration::from_millis(100)));
        // Another peer has its own bucket.
        assert!(r.allow(PeerId::random(), t));
    }

    #[test]
    fn rate_limiter_state_is_bounded() {
        let mut r = RateLimiter::new(1, 1, 2);
        let t = Instant::now();
        assert!(r.allow(PeerId::random(), t));
        assert!(r.allow(PeerId::random(), t));
        // Both buckets are empty (informative), so a third peer is refused, not tracked.
        assert!(!r.allow(PeerId::random(), t));
        assert!(r.buckets.len() <= 2);
        // Once they refill they are forgotten and there is room again.
        assert!(r.allow(PeerId::random(), t + Duration::from_secs(2)));
    }

    #[test]
    fn replays_are_refused_until_expiry_and_the_cache_is_bounded() {
        let mut c = ReplayCache::new(2);
        let p = PeerId::random();
        let now = Timestamp(1000);
        assert!(c.check(p, CallId([1; 16]), Timestamp(2000), now).is_ok());
        assert_eq!(
            c.check(p, CallId([1; 16]), Timestamp(2000), now),
            Err(ErrorCode::Replayed)
        );
        // The same id from another caller is another call.
        assert!(
            c.check(PeerId::random(), CallId([1; 16]), Timestamp(2000), now)
                .is_ok()
        );
        assert_eq!(
            c.check(p, CallId([2; 16]), Timestamp(2000), now),
            Err(ErrorCode::Busy)
        );
        // After expiry the entries go and make room.
        assert!(
            c.check(p, CallId([2; 16]), Timestamp(5000), Timestamp(2001))
                .is_ok()
        );
    }

    #[test]
    fn peer_slots_are_released_on_drop() {
        let s = PeerSlots::new(2);
        let p = PeerId::random();
        let a = s.try_take(p).expect("1");
        let _b = s.try_take(p).expect("2");
        assert!(s.try_take(p).is_none());
        drop(a);
        assert!(s.try_take(p).is_some());
    }
}

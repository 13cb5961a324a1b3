//! Departed peers: routing-table peers that have been unreachable for a while are left out of the
//! cluster views until they connect again.
//!
//! Kademlia keeps a peer in its routing table while it has an address, reachable or not, so a node
//! that left for good would stay a member of its blocks' clusters in every view, holding a slot
//! that can never vote (SPEC 4.9: after two such departures a 3-peer cluster has no quorum). A
//! peer counts as departed once it has had no connection for `departed_after` and a dial to it
//! failed after that; departed peers are dialled again from time to time, and a connection brings
//! them back. A peer that is down or cut off for less than `departed_after` (a restart, a pause, a
//! short partition) never leaves the views.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use libp2p::identity::PeerId;
use tokio::time::Instant;

/// Peers whose disconnection is tracked at most; past it, new disconnections are not tracked
/// (those peers stay in the views, as without this module).
pub(crate) const MAX_TRACKED_PEERS: usize = 4_096;
/// Peers dialled per probe round at most.
pub(crate) const MAX_PROBES_PER_ROUND: usize = 16;

/// Disconnected and departed routing-table peers.
#[derive(Debug)]
pub(crate) struct Departures {
    departed_after: Duration,
    disconnected_since: HashMap<PeerId, Instant>,
    departed: HashSet<PeerId>,
    /// Where the next probe round starts in the (unordered) set of tracked peers.
    probe_cursor: usize,
}

impl Departures {
    /// Peers unreachable for `departed_after` leave the views.
    pub(crate) fn new(departed_after: Duration) -> Self {
        Self { departed_after, disconnected_since: HashMap::new(), departed: HashSet::new(), probe_cursor: 0 }
    }

    /// How often to probe disconnected peers: a third of the departure threshold, at least 1 s.
    pub(crate) fn probe_interval(&self) -> Duration {
        (self.departed_after / 3).max(Duration::from_secs(1))
    }

    /// A connection to `peer` stands. True when the peer had departed (the views change).
    pub(crate) fn connected(&mut self, peer: &PeerId) -> bool {
        self.disconnected_since.remove(peer);
        self.departed.remove(peer)
    }

    /// The last connection to `peer` closed at `now`.
    pub(crate) fn disconnected(&mut self, peer: PeerId, now: Instant) {
        if self.disconnected_since.len() < MAX_TRACKED_PEERS {
            self.disconnected_since.entry(peer).or_insert(now);
        }
    }

    /// A dial to `peer` failed at `now` while it had no connection. True when the peer departs
    /// with it (the views change).
    pub(crate) fn dial_failed(&mut self, peer: PeerId, now: Instant) -> bool {
        if self.departed.contains(&peer) {
            return false;
        }
        if !self.disconnected_since.contains_key(&peer) {
            self.disconnected(peer, now);
            return false;
        }
        let since = self.disconnected_since.get(&peer).copied().unwrap_or(now);
        if now.saturating_duration_since(since) < self.departed_after {
            return false;
        }
        self.departed.insert(peer)
    }

    /// Whether `peer` is left out of the views.
    pub(crate) fn is_departed(&self, peer: &PeerId) -> bool {
        self.departed.contains(peer)
    }

    /// How long `peer` has had no connection, if it is tracked.
    pub(crate) fn unreachable_for(&self, peer: &PeerId, now: Instant) -> Option<Duration> {
        self.disconnected_since.get(peer).map(|since| now.saturating_duration_since(*since))
    }

    /// Up to [`MAX_PROBES_PER_ROUND`] tracked peers to dial this round (rotating through all of
    /// them over rounds): a failed dial can make a peer depart, a successful one brings it back.
    pub(crate) fn probes(&mut self) -> Vec<PeerId> {
        let tracked = self.disconnected_since.len();
        if tracked == 0 {
            return Vec::new();
        }
        let start = self.probe_cursor % tracked;
        let picked: Vec<PeerId> = self
            .disconnected_since
            .keys()
            .copied()
            .cycle()
            .skip(start)
            .take(MAX_PROBES_PER_ROUND.min(tracked))
            .collect();
        self.probe_cursor = start.saturating_add(picked.len());
        picked
    }

    /// Forgets peers for which `keep` is false (no longer in the routing table). True when a
    /// departed peer was forgotten.
    pub(crate) fn retain(&mut self, keep: impl Fn(&PeerId) -> bool) -> bool {
        self.disconnected_since.retain(|peer, _| keep(peer));
        let before = self.departed.len();
        self.departed.retain(|peer| keep(peer));
        self.departed.len() != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn departures() -> Departures {
        Departures::new(Duration::from_secs(30))
    }

    #[test]
    fn a_peer_departs_only_after_the_threshold_and_a_failed_dial() {
        let mut d = departures();
        let peer = PeerId::random();
        let t0 = Instant::now();
        d.disconnected(peer, t0);
        assert!(!d.dial_failed(peer, t0 + Duration::from_secs(29)), "a restart or a short partition");
        assert!(!d.is_departed(&peer));
        assert!(d.dial_failed(peer, t0 + Duration::from_secs(30)));
        assert!(d.is_departed(&peer));
        assert!(!d.dial_failed(peer, t0 + Duration::from_secs(40)), "departs once");
        assert!(d.connected(&peer), "a connection brings it back");
        assert!(!d.is_departed(&peer));
        assert_eq!(d.unreachable_for(&peer, t0), None);
    }

    #[test]
    fn a_peer_never_connected_starts_its_clock_at_the_first_failed_dial() {
        let mut d = departures();
        let peer = PeerId::random();
        let t0 = Instant::now();
        assert!(!d.dial_failed(peer, t0));
        assert_eq!(d.unreachable_for(&peer, t0 + Duration::from_secs(5)), Some(Duration::from_secs(5)));
        assert!(d.dial_failed(peer, t0 + Duration::from_secs(31)));
    }

    #[test]
    fn probes_rotate_through_every_tracked_peer() {
        let mut d = departures();
        let t0 = Instant::now();
        let peers: Vec<PeerId> = (0..40).map(|_| PeerId::random()).collect();
        for p in &peers {
            d.disconnected(*p, t0);
        }
        let mut probed = HashSet::new();
        for _ in 0..3 {
            let round = d.probes();
            assert!(round.len() <= MAX_PROBES_PER_ROUND);
            probed.extend(round);
        }
        assert_eq!(probed.len(), peers.len());
        assert_eq!(d.probe_interval(), Duration::from_secs(10));
    }

    #[test]
    fn tracking_is_bounded_and_forgotten_peers_leave() {
        let mut d = departures();
        let t0 = Instant::now();
        for _ in 0..MAX_TRACKED_PEERS + 10 {
            d.disconnected(PeerId::random(), t0);
        }
        assert_eq!(d.disconnected_since.len(), MAX_TRACKED_PEERS);
        let peer = *d.disconnected_since.keys().next().unwrap_or(&PeerId::random());
        assert!(d.dial_failed(peer, t0 + Duration::from_secs(30)));
        assert!(d.retain(|p| *p != peer), "a departed peer Kademlia dropped is forgotten");
        assert!(!d.is_departed(&peer));
    }
}

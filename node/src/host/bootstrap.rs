//! The bootstrap addresses and when to dial each: a small state machine the swarm task drives.
//!
//! Each address is dialled until a connection through it stands. After a failed dial the next one
//! waits `initial`, then twice as long after each further failure, never longer than `max`; a
//! connection resets the delay. When the node has lost every connection, every address is dialled
//! again at once ([`Bootstrap::rearm`]). Nothing here touches the swarm or a clock: the task
//! passes the time in, which keeps the schedule testable.

use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::identity::PeerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use tokio::time::Instant;

/// Where one bootstrap address stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// To be dialled at this instant.
    Due(Instant),
    /// A dial is in flight.
    Dialling(ConnectionId),
    /// A connection through it stands (or stood: see [`Bootstrap::rearm`]) to this peer.
    Connected(PeerId),
}

/// One configured bootstrap address.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// The address as configured.
    pub(crate) addr: Multiaddr,
    /// The address without its `/p2p` suffix: what goes into the routing table.
    pub(crate) dial_addr: Multiaddr,
    /// The peer the address names with `/p2p/<peer id>`, if it does.
    pub(crate) peer: Option<PeerId>,
    state: State,
    /// The delay after the next failure.
    backoff: Duration,
    /// Failed dials since the last connection.
    failures: u32,
}

/// A failed dial, as the task logs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    /// The address as configured.
    pub(crate) addr: Multiaddr,
    /// Failed dials in a row, this one included.
    pub(crate) failures: u32,
    /// When the address is dialled next.
    pub(crate) retry_in: Duration,
}

/// Every bootstrap address of the node and its schedule.
#[derive(Debug)]
pub(crate) struct Bootstrap {
    targets: Vec<Target>,
    initial: Duration,
    max: Duration,
}

impl Bootstrap {
    /// The addresses of `addrs`, each due now, except those naming `local` and repeats.
    pub(crate) fn new(addrs: &[Multiaddr], local: PeerId, initial: Duration, max: Duration, now: Instant) -> Self {
        let mut targets: Vec<Target> = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let peer = addr.iter().find_map(|p| match p {
                Protocol::P2p(peer) => Some(peer),
                _ => None,
            });
            if peer == Some(local) || targets.iter().any(|t| t.addr == *addr) {
                continue;
            }
            let dial_addr: Multiaddr = addr.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect();
            targets.push(Target {
                addr: addr.clone(),
                dial_addr,
                peer,
                state: State::Due(now),
                backoff: initial,
                failures: 0,
            });
        }
        Self { targets, initial, max }
    }

    /// The peers the addresses name, each with its address (without `/p2p`).
    pub(crate) fn named_peers(&self) -> Vec<(PeerId, Multiaddr)> {
        self.targets.iter().filter_map(|t| t.peer.map(|peer| (peer, t.dial_addr.clone()))).collect()
    }

    /// The earliest instant an address is due, if any waits.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.targets
            .iter()
            .filter_map(|t| match t.state {
                State::Due(at) => Some(at),
                State::Dialling(_) | State::Connected(_) => None,
            })
            .min()
    }

    /// The indexes of the addresses due at `now`.
    pub(crate) fn due(&self, now: Instant) -> Vec<usize> {
        (0..self.targets.len())
            .filter(|&i| self.targets.get(i).is_some_and(|t| matches!(t.state, State::Due(at) if at <= now)))
            .collect()
    }

    /// The address at `index`.
    pub(crate) fn target(&self, index: usize) -> Option<&Target> {
        self.targets.get(index)
    }

    /// A dial of the address at `index` started.
    pub(crate) fn dialling(&mut self, index: usize, connection: ConnectionId) {
        if let Some(target) = self.targets.get_mut(index) {
            target.state = State::Dialling(connection);
        }
    }

    /// A connection to `peer` stands: the addresses whose dial made it, and those naming `peer`,
    /// are connected. Returns the ones that were not connected before.
    pub(crate) fn connected(&mut self, connection: ConnectionId, peer: PeerId) -> Vec<Target> {
        let mut joined = Vec::new();
        for target in &mut self.targets {
            let ours = match target.state {
                State::Dialling(id) => id == connection || target.peer == Some(peer),
                State::Due(_) => target.peer == Some(peer),
                State::Connected(_) => false,
            };
            if ours {
                target.state = State::Connected(peer);
                target.backoff = self.initial;
                target.failures = 0;
                joined.push(target.clone());
            }
        }
        joined
    }

    /// The address at `index` is connected already (to `peer`, the peer it names).
    pub(crate) fn already_connected(&mut self, index: usize, peer: PeerId) {
        if let Some(target) = self.targets.get_mut(index) {
            target.state = State::Connected(peer);
            target.backoff = self.initial;
            target.failures = 0;
        }
    }

    /// The dial `connection` failed; if it was a bootstrap dial, its address is due again after
    /// its backoff, which doubles (up to the cap).
    pub(crate) fn dial_failed(&mut self, connection: ConnectionId, now: Instant) -> Option<Failure> {
        let index = self.targets.iter().position(|t| t.state == State::Dialling(connection))?;
        self.failed(index, now)
    }

    /// The address at `index` could not be dialled at all; it is due again after its backoff.
    pub(crate) fn failed(&mut self, index: usize, now: Instant) -> Option<Failure> {
        let max = self.max;
        let target = self.targets.get_mut(index)?;
        let retry_in = target.backoff;
        target.state = State::Due(now + retry_in);
        target.backoff = retry_in.saturating_mul(2).min(max);
        target.failures = target.failures.saturating_add(1);
        Some(Failure { addr: target.addr.clone(), failures: target.failures, retry_in })
    }

    /// The node lost every connection: every connected address is due now, with the initial
    /// backoff. Returns whether any was.
    pub(crate) fn rearm(&mut self, now: Instant) -> bool {
        let mut any = false;
        for target in &mut self.targets {
            if matches!(target.state, State::Connected(_)) {
                target.state = State::Due(now);
                target.backoff = self.initial;
                any = true;
            }
        }
        any
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    const INITIAL: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_millis(1_000);

    fn plain() -> Multiaddr {
        "/ip4/127.0.0.1/tcp/4101".parse().unwrap()
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_cap_and_a_connection_resets_them() {
        let t0 = Instant::now();
        let mut b = Bootstrap::new(&[plain()], PeerId::random(), INITIAL, MAX, t0);
        assert_eq!(b.due(t0), vec![0]);
        let mut now = t0;
        let mut delays = Vec::new();
        for n in 0..5u32 {
            let id = ConnectionId::new_unchecked(n as usize);
            b.dialling(0, id);
            assert_eq!(b.next_due(), None, "nothing is due while a dial is in flight");
            let failure = b.dial_failed(id, now).unwrap();
            assert_eq!(failure.failures, n + 1);
            assert_eq!(failure.addr, plain());
            delays.push(failure.retry_in.as_millis());
            assert!(b.due(now).is_empty());
            now += failure.retry_in;
            assert_eq!(b.due(now), vec![0]);
        }
        assert_eq!(delays, vec![250, 500, 1_000, 1_000, 1_000]);

        let id = ConnectionId::new_unchecked(99);
        b.dialling(0, id);
        assert!(b.dial_failed(ConnectionId::new_unchecked(98), now).is_none(), "another dial is not ours");
        let peer = PeerId::random();
        let joined = b.connected(id, peer);
        assert_eq!(joined.len(), 1);
        assert_eq!(joined[0].dial_addr, plain());
        assert!(b.connected(id, peer).is_empty(), "reported once");
        assert!(b.rearm(now), "a connected address is dialled again when every connection is gone");
        assert_eq!(b.due(now), vec![0]);
        let id = ConnectionId::new_unchecked(100);
        b.dialling(0, id);
        assert_eq!(b.dial_failed(id, now).unwrap().retry_in, INITIAL, "the backoff starts over");
    }

    #[test]
    fn a_p2p_address_is_connected_by_any_connection_to_its_peer_and_the_local_one_is_skipped() {
        let local = PeerId::random();
        let remote = PeerId::random();
        let own: Multiaddr = format!("/ip4/127.0.0.1/tcp/4101/p2p/{local}").parse().unwrap();
        let theirs: Multiaddr = format!("/ip4/127.0.0.1/tcp/4102/p2p/{remote}").parse().unwrap();
        let t0 = Instant::now();
        let mut b = Bootstrap::new(&[own, theirs.clone(), theirs.clone(), plain()], local, INITIAL, MAX, t0);
        assert_eq!(b.due(t0), vec![0, 1], "the local address and the repeat are dropped");
        assert_eq!(b.named_peers(), vec![(remote, "/ip4/127.0.0.1/tcp/4102".parse().unwrap())]);
        assert_eq!(b.target(0).unwrap().peer, Some(remote));
        assert_eq!(b.target(0).unwrap().dial_addr.to_string(), "/ip4/127.0.0.1/tcp/4102");
        let joined = b.connected(ConnectionId::new_unchecked(7), remote);
        assert_eq!(joined.len(), 1, "an inbound connection from the named peer counts");
        assert_eq!(joined[0].addr, theirs);
        assert_eq!(b.due(t0), vec![1]);
    }
}

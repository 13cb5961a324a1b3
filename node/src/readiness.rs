//! When a node is ready: able to serve its role, as `/ready`, `optimystic status` and the `ready`
//! line of `optimystic start` report it.
//!
//! - Key network `static`: a majority of the configured members is reachable (this node counts;
//!   the others must be connected). Without a member list the node is its only member.
//! - Otherwise, with bootstrap addresses: at least one peer is connected and the routing table is
//!   not empty.
//! - Otherwise (a node alone, nothing to join): at once.
//!
//! The rule is re-evaluated on every connection or routing-table change the host publishes.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;

use libp2p::Multiaddr;
use libp2p::identity::PeerId;
use libp2p::multiaddr::Protocol;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::host::Connectivity;
use crate::metrics::Metrics;

/// Whether the node is ready, and why (or why not) in words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// Whether the node can serve its role.
    pub ready: bool,
    /// What the decision rests on, e.g. `2 peers connected, 2 in the routing table`.
    pub detail: String,
}

impl Readiness {
    /// Not ready, because of `detail`.
    pub fn not_ready(detail: impl Into<String>) -> Self {
        Self { ready: false, detail: detail.into() }
    }
}

/// What readiness requires of a node, from its configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadinessRule {
    /// Nothing: a node with nothing to join.
    Alone,
    /// A connected peer and a non-empty routing table (a node with bootstrap addresses).
    Joined,
    /// A majority of these static members reachable (this node among them counts as reachable).
    StaticQuorum {
        /// Every member, this node included.
        members: BTreeSet<PeerId>,
    },
}

impl ReadinessRule {
    /// The rule of a configuration, for the node `local`.
    pub fn for_config(config: &NodeConfig, local: PeerId) -> Self {
        if config.key_network.kind == "static" {
            let mut members: BTreeSet<PeerId> = static_members(config).into_iter().map(|(peer, _)| peer).collect();
            if members.is_empty() {
                members.insert(local);
            }
            return Self::StaticQuorum { members };
        }
        if config.node.bootstrap.is_empty() { Self::Alone } else { Self::Joined }
    }

    /// Evaluates the rule for the node `local` in the state `now`.
    pub fn evaluate(&self, local: PeerId, now: &Connectivity) -> Readiness {
        let connected = now.connected.len();
        let routing = now.routing_table_peers;
        match self {
            Self::Alone => Readiness {
                ready: true,
                detail: format!(
                    "no bootstrap peers to join; {} connected, {routing} in the routing table",
                    plural(connected, "peer")
                ),
            },
            Self::Joined => {
                let detail = format!("{} connected, {routing} in the routing table", plural(connected, "peer"));
                let ready = connected > 0 && routing > 0;
                let detail = match (connected, routing) {
                    (0, _) => format!("{detail}: dialling the bootstrap peers"),
                    (_, 0) => format!("{detail}: waiting for a peer to enter the routing table"),
                    _ => detail,
                };
                Readiness { ready, detail }
            }
            Self::StaticQuorum { members } => {
                let reachable = members.iter().filter(|m| **m == local || now.connected.contains(m)).count();
                let needed = members.len() / 2 + 1;
                Readiness {
                    ready: reachable >= needed,
                    detail: format!("{reachable} of {} static members reachable, {needed} needed", members.len()),
                }
            }
        }
    }
}

/// `1 peer`, `2 peers`.
pub(crate) fn plural(n: usize, word: &str) -> String {
    if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") }
}

/// The members of a static key network's configuration, each with its address when one is given
/// (`<multiaddr>/p2p/<peer id>`). Entries that do not parse are skipped: the plugin refuses them
/// with a precise message when it is built.
pub fn static_members(config: &NodeConfig) -> Vec<(PeerId, Option<Multiaddr>)> {
    let Some(Value::Array(entries)) = config.key_network.options.get("members") else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(Value::as_str)
        .filter_map(|text| {
            if !text.starts_with('/') {
                return PeerId::from_str(text).ok().map(|peer| (peer, None));
            }
            let addr = Multiaddr::from_str(text).ok()?;
            match addr.iter().last() {
                Some(Protocol::P2p(peer)) => Some((peer, (addr.iter().count() > 1).then_some(addr.clone()))),
                _ => None,
            }
        })
        .collect()
}

/// Re-evaluates `rule` on every change of `connectivity` and publishes the result to `metrics`
/// (`/ready`) and `ready` until the host stops publishing.
pub(crate) async fn track(
    rule: ReadinessRule,
    local: PeerId,
    mut connectivity: watch::Receiver<Connectivity>,
    metrics: Arc<Metrics>,
    ready: watch::Sender<Readiness>,
) {
    loop {
        let now = rule.evaluate(local, &connectivity.borrow_and_update());
        if now.ready != metrics.is_ready() {
            tracing::info!(ready = now.ready, detail = %now.detail, "readiness changed");
        }
        metrics.set_readiness(now.clone());
        ready.send_if_modified(|published| {
            if *published == now {
                return false;
            }
            *published = now;
            true
        });
        if connectivity.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use serde_json::json;

    use super::*;

    fn connectivity(connected: &[PeerId], routing_table_peers: usize) -> Connectivity {
        Connectivity { connected: connected.iter().copied().collect(), routing_table_peers }
    }

    #[test]
    fn a_node_alone_is_ready_at_once_and_a_joining_one_needs_a_peer_and_a_routing_entry() {
        let local = PeerId::random();
        let peer = PeerId::random();
        let mut config = crate::config::defaults();
        assert_eq!(ReadinessRule::for_config(&config, local), ReadinessRule::Alone);
        assert!(ReadinessRule::Alone.evaluate(local, &connectivity(&[], 0)).ready);

        config.node.bootstrap = vec!["/ip4/127.0.0.1/tcp/4101".to_owned()];
        let rule = ReadinessRule::for_config(&config, local);
        assert_eq!(rule, ReadinessRule::Joined);
        let none = rule.evaluate(local, &connectivity(&[], 0));
        assert!(!none.ready && none.detail.contains("dialling"), "{none:?}");
        assert!(!rule.evaluate(local, &connectivity(&[peer], 0)).ready, "a connection alone is not enough");
        assert!(!rule.evaluate(local, &connectivity(&[], 1)).ready, "a routing entry alone is not enough");
        let joined = rule.evaluate(local, &connectivity(&[peer], 1));
        assert!(joined.ready);
        assert_eq!(joined.detail, "1 peer connected, 1 in the routing table");
    }

    #[test]
    fn a_static_member_needs_a_majority_of_the_members_reachable_itself_included() {
        let local = PeerId::random();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut config = crate::config::defaults();
        config.key_network.kind = "static".to_owned();
        config.key_network.options.insert(
            "members".to_owned(),
            json!([
                local.to_string(),
                format!("/ip4/127.0.0.1/tcp/4102/p2p/{a}"),
                b.to_string(),
                c.to_string(),
                "junk"
            ]),
        );
        let members = static_members(&config);
        assert_eq!(members.len(), 4, "the entry that does not parse is skipped");
        assert_eq!(members[1].1.as_ref().map(ToString::to_string), Some(format!("/ip4/127.0.0.1/tcp/4102/p2p/{a}")));
        let rule = ReadinessRule::for_config(&config, local);
        let two = rule.evaluate(local, &connectivity(&[a], 0));
        assert!(!two.ready, "{two:?}");
        assert_eq!(two.detail, "2 of 4 static members reachable, 3 needed");
        assert!(rule.evaluate(local, &connectivity(&[a, c, PeerId::random()], 0)).ready);

        config.key_network.options.remove("members");
        let alone = ReadinessRule::for_config(&config, local);
        assert!(alone.evaluate(local, &connectivity(&[], 0)).ready, "without members the node is the only one");
    }
}

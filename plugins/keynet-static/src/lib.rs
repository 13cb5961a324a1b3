//! [`KeyNetwork`] over a fixed member list, registered as `key-network static`.
//!
//! The cluster of a block is the `cluster_size` members closest to `sha256(blockId)` by the XOR
//! distance of their DHT keys ([`rank_peers`], the same ranking the Kademlia key network uses), so
//! nodes configured with the same member list agree on every cluster without any lookup.
//!
//! Configuration: `{"kind": "static", "cluster_size": 3, "members": ["<peer id>" | "<multiaddr>/p2p/<peer id>", ...]}`.
//! `cluster_size` defaults to 3. Every node must list the same members, itself included; without
//! `members` (or with an empty list) the node is the only member.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use multiaddr::{Multiaddr, Protocol};
use optimystic_core::BlockId;
use optimystic_core::identity::PeerId;
use optimystic_core::keynet::{
    ClusterPeers, ClusterSize, KeyNetwork, KeyNetworkError, PeerInfo, block_key, rank_peers,
};
pub use optimystic_core::keynet::{DEFAULT_CLUSTER_SIZE, MAX_CLUSTER_SIZE};
use optimystic_core::registry::{KeyNetworkContext, PluginConfig, PluginDescriptor, PluginError, parse_config};
use serde::Deserialize;
use serde_json::Value;

/// The largest accepted member list.
pub const MAX_MEMBERS: usize = 4096;
const PLUGIN: &str = "key-network static";

/// A key network over a fixed member list.
#[derive(Debug, Clone)]
pub struct StaticKeyNetwork {
    members: ClusterPeers,
    cluster_size: usize,
}

impl StaticKeyNetwork {
    /// A key network over `members` (with their addresses), `cluster_size` peers per cluster.
    /// Fails when `local` is not a member, the list is empty or too long, or `cluster_size` is
    /// outside `1..=MAX_CLUSTER_SIZE`.
    pub fn new(local: PeerId, members: ClusterPeers, cluster_size: usize) -> Result<Self, PluginError> {
        let config_error = |message: String| PluginError::Config { plugin: PLUGIN.to_owned(), message };
        if !(1..=MAX_CLUSTER_SIZE).contains(&cluster_size) {
            return Err(config_error(format!("cluster_size {cluster_size} must be between 1 and {MAX_CLUSTER_SIZE}")));
        }
        if members.len() > MAX_MEMBERS {
            return Err(config_error(format!("{} members; at most {MAX_MEMBERS}", members.len())));
        }
        if !members.contains_key(&local) {
            return Err(config_error(format!(
                "members must include this node ({local}); every node lists the same members"
            )));
        }
        Ok(Self { members, cluster_size })
    }

    /// Builds from the plugin's configuration section (see the crate documentation).
    pub fn from_config(local: PeerId, config: &Value) -> Result<Self, PluginError> {
        let config_error = |message: String| PluginError::Config { plugin: PLUGIN.to_owned(), message };
        let config: StaticConfig = parse_config(PLUGIN, config)?;
        let mut members = ClusterPeers::new();
        // No list: this node alone (an embedded single node does not know its id beforehand).
        if config.members.is_empty() {
            members.insert(local, PeerInfo::default());
        }
        for text in &config.members {
            let (peer, addr) = parse_member(text).map_err(config_error)?;
            let info = members.entry(peer).or_default();
            if let Some(addr) = addr
                && !info.multiaddrs.contains(&addr)
            {
                info.multiaddrs.push(addr);
            }
        }
        Self::new(local, members, config.cluster_size.get())
    }

    /// The members with their configured addresses.
    pub fn members(&self) -> &ClusterPeers {
        &self.members
    }

    /// The block's cluster members, closest first.
    pub fn ranked(&self, block_id: &BlockId) -> Vec<PeerId> {
        rank_peers(&block_key(block_id), self.members.keys(), self.cluster_size)
    }
}

/// The configuration section: `cluster_size` and the member list (peer ids or multiaddrs ending
/// in `/p2p/<peer id>`, parsed by [`StaticKeyNetwork::from_config`]).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct StaticConfig {
    cluster_size: ClusterSize,
    members: Vec<String>,
}

impl PluginConfig for StaticConfig {
    fn validate(&self) -> Result<(), PluginError> {
        if self.members.len() > MAX_MEMBERS {
            return Err(PluginError::Config {
                plugin: PLUGIN.to_owned(),
                message: format!("{} members; at most {MAX_MEMBERS}", self.members.len()),
            });
        }
        Ok(())
    }
}

/// Parses a member: a peer id, or a multiaddr ending in `/p2p/<peer id>` (the address is kept
/// without that suffix).
fn parse_member(text: &str) -> Result<(PeerId, Option<String>), String> {
    if !text.starts_with('/') {
        let peer = PeerId::from_str(text).map_err(|e| format!("member {text:?} is not a peer id: {e}"))?;
        return Ok((peer, None));
    }
    let mut addr = Multiaddr::from_str(text).map_err(|e| format!("member {text:?} is not a multiaddr: {e}"))?;
    match addr.pop() {
        Some(Protocol::P2p(peer)) => Ok((peer, (!addr.is_empty()).then(|| addr.to_string()))),
        _ => Err(format!("member {text:?} must end with /p2p/<peer id>")),
    }
}

#[async_trait]
impl KeyNetwork for StaticKeyNetwork {
    /// The closest `cluster_size` members (all of them when there are fewer), with their
    /// configured addresses. Never fails: the member list is never empty.
    async fn find_cluster(&self, block_id: &BlockId) -> Result<ClusterPeers, KeyNetworkError> {
        let cluster: ClusterPeers = self
            .ranked(block_id)
            .into_iter()
            .map(|peer| (peer, self.members.get(&peer).cloned().unwrap_or_else(PeerInfo::default)))
            .collect();
        if cluster.is_empty() {
            return Err(KeyNetworkError::NoPeers);
        }
        Ok(cluster)
    }

    async fn find_coordinator(&self, block_id: &BlockId, excluded: &[PeerId]) -> Result<PeerId, KeyNetworkError> {
        let excluded: BTreeSet<&PeerId> = excluded.iter().collect();
        self.ranked(block_id).into_iter().find(|p| !excluded.contains(p)).ok_or(KeyNetworkError::AllExcluded)
    }

    fn cluster_size(&self) -> usize {
        self.cluster_size
    }

    /// A configured member (this node is one).
    async fn has_seen(&self, peer: &PeerId) -> bool {
        self.members.contains_key(peer)
    }
}

fn check(config: &Value) -> Result<(), PluginError> {
    parse_config::<StaticConfig>(PLUGIN, config).map(drop)
}

fn build(cx: &KeyNetworkContext, config: &Value) -> Result<Arc<dyn KeyNetwork>, PluginError> {
    Ok(Arc::new(StaticKeyNetwork::from_config(cx.local_peer_id, config)?))
}

/// The options' defaults (no members: this node alone).
fn defaults() -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("cluster_size".to_owned(), Value::from(DEFAULT_CLUSTER_SIZE));
    map.insert("members".to_owned(), Value::Array(Vec::new()));
    map
}

optimystic_core::inventory::submit! {
    PluginDescriptor::key_network("static", "clusters ranked over a fixed member list", build)
        .with_defaults(defaults)
        .with_check(check)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use optimystic_core::keynet::{distance, peer_key};
    use optimystic_core::registry::Registry;
    use optimystic_testkit::routing::FixedRouting;
    use serde_json::json;

    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    fn config(members: &[PeerId], cluster_size: u64) -> Value {
        json!({"kind": "static", "cluster_size": cluster_size, "members": members.iter().map(ToString::to_string).collect::<Vec<_>>()})
    }

    #[tokio::test]
    async fn clusters_are_the_closest_members_by_xor_distance() {
        let members = peers(7);
        let network = StaticKeyNetwork::from_config(members[0], &config(&members, 3)).unwrap();
        for i in 0..20 {
            let block = BlockId::new(format!("block-{i}")).unwrap();
            let cluster = network.find_cluster(&block).await.unwrap();
            assert_eq!(cluster.len(), 3);
            let key = block_key(&block);
            let worst_in = cluster.keys().map(|p| distance(&key, &peer_key(p))).max().unwrap();
            for outside in members.iter().filter(|p| !cluster.contains_key(p)) {
                assert!(distance(&key, &peer_key(outside)) > worst_in);
            }
            let ranked = network.ranked(&block);
            assert_eq!(network.find_coordinator(&block, &[]).await.unwrap(), ranked[0]);
            assert_eq!(network.find_coordinator(&block, &ranked[..1]).await.unwrap(), ranked[1]);
            assert_eq!(network.find_coordinator(&block, &ranked).await, Err(KeyNetworkError::AllExcluded));
        }
    }

    #[tokio::test]
    async fn every_member_computes_the_same_clusters() {
        let members = peers(5);
        let views: Vec<StaticKeyNetwork> =
            members.iter().map(|m| StaticKeyNetwork::from_config(*m, &config(&members, 3)).unwrap()).collect();
        let block = BlockId::new("shared").unwrap();
        let first = views[0].find_cluster(&block).await.unwrap();
        for view in &views[1..] {
            assert_eq!(view.find_cluster(&block).await.unwrap(), first);
        }
    }

    #[tokio::test]
    async fn small_member_lists_give_everyone() {
        let members = peers(2);
        let network = StaticKeyNetwork::from_config(members[1], &config(&members, 3)).unwrap();
        let cluster = network.find_cluster(&BlockId::new("x").unwrap()).await.unwrap();
        assert_eq!(cluster.keys().copied().collect::<BTreeSet<_>>(), members.into_iter().collect());
    }

    #[test]
    fn multiaddr_members_keep_their_address() {
        let members = peers(2);
        let value = json!({"members": [
            format!("/ip4/127.0.0.1/tcp/4001/p2p/{}", members[0]),
            members[1].to_string(),
        ]});
        let network = StaticKeyNetwork::from_config(members[0], &value).unwrap();
        assert_eq!(network.cluster_size(), DEFAULT_CLUSTER_SIZE);
        assert_eq!(network.members()[&members[0]].multiaddrs, vec!["/ip4/127.0.0.1/tcp/4001".to_owned()]);
        assert!(network.members()[&members[1]].multiaddrs.is_empty());
    }

    #[test]
    fn invalid_configurations_are_refused() {
        let members = peers(3);
        let local = members[0];
        let bad = [
            json!({"members": [members[1].to_string()]}),
            json!({"members": ["not-a-peer"]}),
            json!({"members": ["/ip4/127.0.0.1/tcp/1"]}),
            json!({"members": [local.to_string()], "cluster_size": 0}),
            json!({"members": [local.to_string()], "cluster_size": "3"}),
            json!({"members": [local.to_string()], "clustersize": 3}),
            json!({"members": [5]}),
        ];
        for config in bad {
            assert!(
                matches!(StaticKeyNetwork::from_config(local, &config), Err(PluginError::Config { .. })),
                "{config} was accepted"
            );
        }
    }

    #[test]
    fn without_members_the_node_is_alone() {
        let local = peers(1)[0];
        for config in [json!(null), json!({"kind": "static"}), json!({"members": []})] {
            let net = StaticKeyNetwork::from_config(local, &config).expect("a cluster of one");
            assert_eq!(net.members().keys().copied().collect::<Vec<_>>(), vec![local], "{config}");
        }
    }

    #[test]
    fn registered_as_key_network_static() {
        let members = peers(1);
        let cx = KeyNetworkContext { local_peer_id: members[0], routing: FixedRouting::new(members[0], []) };
        let network = Registry::linked().build_key_network("static", &cx, &config(&members, 1)).unwrap();
        assert_eq!(network.cluster_size(), 1);
    }
}

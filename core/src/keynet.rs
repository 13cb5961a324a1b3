//! The key-network seam: which peers form a block's cluster (SPEC 4).
//!
//! One ranking function, [`rank_peers`], serves every implementation: the cluster of a block is
//! the `cluster_size` peers whose DHT keys (`sha256` of the peer id bytes, as Kademlia uses) are
//! closest by XOR distance to `sha256(utf8(blockId))`.

use std::collections::BTreeMap;

use async_trait::async_trait;
use libp2p_identity::PeerId;
use sha2::{Digest, Sha256};

use crate::model::BlockId;

/// Peers per block cluster when the configuration does not say.
pub const DEFAULT_CLUSTER_SIZE: usize = 3;
/// The most peers per block cluster a key network takes.
pub const MAX_CLUSTER_SIZE: usize = 64;

/// The `cluster_size` option of a key network: peers per block cluster, in
/// `1..=`[`MAX_CLUSTER_SIZE`], [`DEFAULT_CLUSTER_SIZE`] by default. Every key network and the
/// node's configuration check read it with this one type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "u64")]
pub struct ClusterSize(usize);

impl ClusterSize {
    /// The size.
    #[must_use]
    pub fn get(self) -> usize {
        self.0
    }
}

impl Default for ClusterSize {
    fn default() -> Self {
        Self(DEFAULT_CLUSTER_SIZE)
    }
}

impl TryFrom<u64> for ClusterSize {
    type Error = String;

    fn try_from(size: u64) -> Result<Self, String> {
        match usize::try_from(size) {
            Ok(size) if (1..=MAX_CLUSTER_SIZE).contains(&size) => Ok(Self(size)),
            _ => Err(format!("cluster_size {size} must be between 1 and {MAX_CLUSTER_SIZE}")),
        }
    }
}

/// What is known of one cluster peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its listen addresses, as multiaddr text.
    pub multiaddrs: Vec<String>,
}

/// The peers of a cluster, by id.
pub type ClusterPeers = BTreeMap<PeerId, PeerInfo>;

/// A key-network failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyNetworkError {
    /// No peer is known that can serve the key (not even this node).
    #[error("no peer known for the key")]
    NoPeers,
    /// Every candidate was excluded.
    #[error("every candidate coordinator is excluded")]
    AllExcluded,
    /// The DHT lookup failed.
    #[error("DHT lookup failed: {0}")]
    Lookup(String),
}

/// The 32-byte DHT key of a block: `sha256(utf8(blockId))`.
pub fn block_key(block_id: &BlockId) -> [u8; 32] {
    Sha256::digest(block_id.as_bytes()).into()
}

/// The 32-byte DHT key of a peer: `sha256(peer id bytes)`, as Kademlia's `KBucketKey` computes it.
pub fn peer_key(peer: &PeerId) -> [u8; 32] {
    Sha256::digest(peer.to_bytes()).into()
}

/// XOR distance between two keys, comparable as a big-endian number.
pub fn distance(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut d = [0u8; 32];
    for ((out, x), y) in d.iter_mut().zip(a).zip(b) {
        *out = x ^ y;
    }
    d
}

/// The `n` peers closest to `key` by XOR distance of their DHT keys, closest first. Ties (equal
/// distance cannot happen for distinct peers) are broken by peer id. Duplicates count once.
pub fn rank_peers<'a>(key: &[u8; 32], peers: impl IntoIterator<Item = &'a PeerId>, n: usize) -> Vec<PeerId> {
    let mut ranked: Vec<([u8; 32], PeerId)> = peers.into_iter().map(|p| (distance(key, &peer_key(p)), *p)).collect();
    ranked.sort();
    ranked.dedup_by(|a, b| a.1 == b.1);
    ranked.into_iter().take(n).map(|(_, p)| p).collect()
}

/// Maps block ids to the peers responsible for them.
#[async_trait]
pub trait KeyNetwork: Send + Sync + std::fmt::Debug + 'static {
    /// The cluster of a block: up to `cluster_size` peers ranked by [`rank_peers`], this node
    /// included when it is among the closest. Never empty on success: with no other peer known,
    /// the cluster is this node alone.
    ///
    /// Two nodes with the same view of the network return the same cluster. Results may be cached
    /// briefly; a view that changes with churn changes the answer.
    async fn find_cluster(&self, block_id: &BlockId) -> Result<ClusterPeers, KeyNetworkError>;

    /// A peer that can coordinate operations on the block: the closest member of its cluster not in
    /// `excluded`. Fails with [`KeyNetworkError::AllExcluded`] when every member is excluded.
    async fn find_coordinator(&self, block_id: &BlockId, excluded: &[PeerId]) -> Result<PeerId, KeyNetworkError>;

    /// The first `n` peers of the block's ranking in this node's view, closest first: the cluster
    /// and then the peers that would replace its members (a quorum read asks those in place of
    /// members it cannot reach, since other nodes may already count them as members). The default
    /// is the cluster alone, for key networks whose membership does not change.
    ///
    /// Errors: as [`KeyNetwork::find_cluster`].
    async fn ranked(&self, block_id: &BlockId, n: usize) -> Result<Vec<PeerId>, KeyNetworkError> {
        Ok(self.find_cluster(block_id).await?.keys().copied().take(n).collect())
    }

    /// The cluster size this key network targets.
    fn cluster_size(&self) -> usize;

    /// Whether this node has seen `peer`: it is this node, a configured member, in the routing
    /// table, or was returned by an earlier lookup (SPEC 4.11: a record naming a peer never seen
    /// is refused in phase 1, so a made-up peer cannot pin a reservation). May answer `false` for
    /// a real peer not met yet (the record is retried later); must never answer `true` for a peer
    /// id that no peer, configuration or lookup ever presented.
    async fn has_seen(&self, peer: &PeerId) -> bool;
}

/// The DHT view a node host exposes to key-network plugins.
#[async_trait]
pub trait PeerRouting: Send + Sync + std::fmt::Debug + 'static {
    /// This node's peer id.
    fn local_peer_id(&self) -> PeerId;

    /// The live peers of the routing table, with their known addresses. A host may leave out
    /// peers it has found unreachable for a long time (they left the network) until they connect
    /// again, so that they stop holding cluster slots.
    async fn known_peers(&self) -> ClusterPeers;

    /// An iterative DHT lookup of the peers closest to the block's key `sha256(utf8(blockId))`,
    /// bounded by the host's query timeout. Kademlia hashes lookup keys itself, so the block id (not
    /// its hash) is what goes on the wire.
    async fn closest_peers(&self, block_id: &BlockId) -> Result<ClusterPeers, KeyNetworkError>;

    /// A counter that changes whenever the routing table gains or loses a peer (for cache
    /// invalidation).
    fn routing_epoch(&self) -> u64;
}

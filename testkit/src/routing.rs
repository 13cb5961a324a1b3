//! A [`PeerRouting`] over a fixed set of peers, to build key networks in tests without a host.

use std::sync::Arc;

use async_trait::async_trait;
use libp2p_identity::PeerId;
use optimystic_core::BlockId;
use optimystic_core::keynet::{ClusterPeers, KeyNetworkError, PeerInfo, PeerRouting};

/// The routing of a node that knows exactly `peers`, never changes and finds nothing more by
/// lookup.
#[derive(Debug, Clone)]
pub struct FixedRouting {
    local: PeerId,
    peers: ClusterPeers,
}

impl FixedRouting {
    /// The routing of `local`, knowing `peers` (without addresses).
    pub fn new(local: PeerId, peers: impl IntoIterator<Item = PeerId>) -> Arc<Self> {
        Arc::new(Self { local, peers: peers.into_iter().map(|peer| (peer, PeerInfo::default())).collect() })
    }
}

#[async_trait]
impl PeerRouting for FixedRouting {
    fn local_peer_id(&self) -> PeerId {
        self.local
    }

    async fn known_peers(&self) -> ClusterPeers {
        self.peers.clone()
    }

    async fn closest_peers(&self, _block_id: &BlockId) -> Result<ClusterPeers, KeyNetworkError> {
        Ok(self.peers.clone())
    }

    fn routing_epoch(&self) -> u64 {
        0
    }
}

//! Cluster-of-one consensus, registered as `consensus solo` (SPEC 4.7): every operation is applied
//! to the local repository directly, with no messages. For embedded single nodes and tests.

use std::sync::Arc;

use async_trait::async_trait;
use optimystic_core::consensus::Consensus;
use optimystic_core::identity::PeerId;
use optimystic_core::keynet::ClusterPeers;
use optimystic_core::record::ClusterRecord;
use optimystic_core::registry::{ConsensusContext, NoOptions, PluginDescriptor, PluginError, parse_config};
use optimystic_core::wire::{RepoMessage, RepoResponse};
use optimystic_core::{ReadPromotion, RepoError, StorageRepo};
use serde_json::Value;

/// Applies every operation to the local repository.
#[derive(Debug, Clone)]
pub struct SoloConsensus {
    local: StorageRepo,
}

impl SoloConsensus {
    /// Solo consensus over a local repository.
    pub fn new(local: StorageRepo) -> Self {
        Self { local }
    }
}

/// Runs one repo operation against a repository, honouring the message's expiration. Moved to
/// core as [`optimystic_core::apply::apply_operation`]; re-exported here for existing callers.
pub use optimystic_core::apply::apply_operation;

#[async_trait]
impl Consensus for SoloConsensus {
    async fn execute(&self, _peers: &ClusterPeers, message: &RepoMessage) -> Result<RepoResponse, RepoError> {
        apply_operation(&self.local, message).await
    }

    async fn on_update(&self, _sender: PeerId, _record: ClusterRecord) -> Result<ClusterRecord, RepoError> {
        Err(RepoError::BadRequest("this node runs solo consensus and takes no cluster records".into()))
    }

    /// A cluster of one is a single node: reads promote as SPEC 2 get step 2 says.
    fn read_promotion(&self) -> ReadPromotion {
        ReadPromotion::Persist
    }
}

fn check(config: &Value) -> Result<(), PluginError> {
    parse_config::<NoOptions>("consensus solo", config).map(drop)
}

fn build(cx: &ConsensusContext, config: &Value) -> Result<Arc<dyn Consensus>, PluginError> {
    check(config)?;
    Ok(Arc::new(SoloConsensus::new(cx.local_repo.clone())))
}

optimystic_core::inventory::submit! {
    PluginDescriptor::consensus("solo", "cluster of one: apply every operation locally", build).with_check(check)
}

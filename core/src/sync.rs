//! Catch-up of lagging members over `<prefix>/sync/1.0.0`.
//!
//! A member that missed commits (it was down, partitioned, or rejected a record as behind) asks
//! its cluster peers for the committed revisions it lacks, checks the chain, and applies it as a
//! replica. The same protocol answers "what is your latest?" for quorum reads.
//!
//! Requests (JSON):
//! - `{"op": "latest", "blockIds": [id]}` -> `{"latest": {id: TrxRev | null}}` (at most
//!   [`MAX_LATEST_IDS`] ids)
//! - `{"op": "revisions", "blockId": id, "afterRev": u64 | null, "limit": n}` ->
//!   `{"latest": TrxRev | null, "entries": [{"trxId", "rev", "transform"}], "more": bool}`
//!   (at most [`MAX_SYNC_ENTRIES`] entries and about [`MAX_SYNC_RESPONSE_BYTES`] of transforms)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::RepoError;
use crate::model::{BlockId, Transform, TrxId, TrxRev};
use crate::network::{PeerNetwork, ProtocolKind};
use crate::repo::StorageRepo;

/// Most entries one `revisions` answer carries.
pub const MAX_SYNC_ENTRIES: usize = 256;
/// Transforms past this many serialized bytes go to the next page.
pub const MAX_SYNC_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// Most block ids one `latest` request may name.
pub const MAX_LATEST_IDS: usize = 1024;
/// Most pages one catch-up of a block fetches before giving up (bounds work per call).
pub const MAX_SYNC_PAGES: usize = 1024;

/// A sync request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", deny_unknown_fields)]
pub enum SyncRequest {
    /// The newest committed revision of each block.
    #[serde(rename_all = "camelCase")]
    Latest {
        /// The blocks.
        block_ids: Vec<BlockId>,
    },
    /// Committed revisions of one block after `after_rev`.
    #[serde(rename_all = "camelCase")]
    Revisions {
        /// The block.
        block_id: BlockId,
        /// Only revisions newer than this; `None` for all.
        #[serde(default)]
        after_rev: Option<u64>,
        /// Most entries wanted.
        limit: usize,
    },
}

/// One committed revision with its transform.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncEntry {
    /// The transaction.
    pub trx_id: TrxId,
    /// The revision it produced.
    pub rev: u64,
    /// Its transform on the block.
    pub transform: Transform,
}

/// Answer to [`SyncRequest::Latest`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatestResponse {
    /// Each requested block's latest revision (`null` if unknown here).
    pub latest: BTreeMap<BlockId, Option<TrxRev>>,
}

/// Answer to [`SyncRequest::Revisions`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RevisionsResponse {
    /// The peer's latest revision of the block.
    pub latest: Option<TrxRev>,
    /// Committed revisions after `afterRev`, ascending.
    pub entries: Vec<SyncEntry>,
    /// True when more revisions follow the last entry.
    pub more: bool,
}

/// Serves sync requests from a local repository.
#[derive(Clone, Debug)]
pub struct SyncServer {
    local: StorageRepo,
}

impl SyncServer {
    /// A server over the local repository.
    pub fn new(local: StorageRepo) -> Self {
        Self { local }
    }

    /// Answers one request. Malformed requests are `bad-request`; nothing is ever changed.
    pub async fn handle(&self, request: Value) -> Result<Value, RepoError> {
        let request: SyncRequest =
            serde_json::from_value(request).map_err(|e| RepoError::BadRequest(format!("sync request: {e}")))?;
        let response = match request {
            SyncRequest::Latest { block_ids } => {
                if block_ids.len() > MAX_LATEST_IDS {
                    return Err(RepoError::BadRequest(format!(
                        "at most {MAX_LATEST_IDS} block ids per latest request, got {}",
                        block_ids.len()
                    )));
                }
                let mut latest = BTreeMap::new();
                for id in block_ids {
                    let l = self.local.storage().latest(&id).await?;
                    latest.insert(id, l);
                }
                serde_json::to_value(LatestResponse { latest })
            }
            SyncRequest::Revisions { block_id, after_rev, limit } => {
                serde_json::to_value(self.revisions(&block_id, after_rev, limit).await?)
            }
        };
        response.map_err(|e| RepoError::Internal(format!("encoding sync response: {e}")))
    }

    async fn revisions(&self, block_id: &BlockId, after_rev: Option<u64>, limit: usize) -> Result<RevisionsResponse, RepoError> {
        let storage = self.local.storage();
        let latest = storage.latest(block_id).await?;
        let Some(latest_rev) = latest.as_ref().map(|l| l.rev) else {
            return Ok(RevisionsResponse::default());
        };
        let from = match after_rev {
            Some(r) => match r.checked_add(1) {
                Some(f) => f,
                None => return Ok(RevisionsResponse { latest, entries: Vec::new(), more: false }),
            },
            None => 0,
        };
        let limit = limit.clamp(1, MAX_SYNC_ENTRIES);
        let log = storage.revisions(block_id, from, latest_rev).await?;
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut more = false;
        for entry in log {
            if entries.len() >= limit || bytes >= MAX_SYNC_RESPONSE_BYTES {
                more = true;
                break;
            }
            let committed = storage.committed(block_id, &entry.trx_id).await?.ok_or_else(|| {
                RepoError::Internal(format!("revision {} of {block_id} has no committed transform", entry.rev))
            })?;
            bytes = bytes.saturating_add(serde_json::to_vec(&committed.transform).map_or(0, |v| v.len()));
            entries.push(SyncEntry { trx_id: entry.trx_id, rev: entry.rev, transform: committed.transform });
        }
        Ok(RevisionsResponse { latest, entries, more })
    }
}

/// Fetches and applies missing committed revisions from cluster peers.
#[derive(Clone, Debug)]
pub struct CatchUp {
    network: Arc<dyn PeerNetwork>,
    local: StorageRepo,
    timeout: Duration,
}

impl CatchUp {
    /// A catch-up client; `timeout` bounds each request.
    pub fn new(network: Arc<dyn PeerNetwork>, local: StorageRepo, timeout: Duration) -> Self {
        Self { network, local, timeout }
    }

    /// Asks `peers` (not this node) for their latest revision of each block. Peers that fail to
    /// answer are left out of the result.
    pub async fn latest_of(&self, peers: &[PeerId], block_ids: &[BlockId]) -> BTreeMap<PeerId, LatestResponse> {
        let request = match serde_json::to_value(SyncRequest::Latest { block_ids: block_ids.to_vec() }) {
            Ok(r) => r,
            Err(_) => return BTreeMap::new(),
        };
        let local = self.network.local_peer_id();
        let asks = peers.iter().filter(|p| **p != local).map(|peer| {
            let request = request.clone();
            async move {
                let answer = self.network.request(*peer, ProtocolKind::Sync, request, self.timeout).await;
                (*peer, answer)
            }
        });
        let mut out = BTreeMap::new();
        for (peer, answer) in futures::future::join_all(asks).await {
            match answer.map(serde_json::from_value::<LatestResponse>) {
                Ok(Ok(latest)) => {
                    out.insert(peer, latest);
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "malformed latest answer"),
                Err(e) => tracing::debug!(%peer, error = %e, "latest query failed"),
            }
        }
        out
    }

    /// Brings the local copy of `block_id` up to `peer`'s latest, applying each missing committed
    /// revision in order. Returns how many revisions were
    /// applied. The chain is checked: revisions strictly ascend past the local latest and every
    /// transform applies; a bad chain stops the catch-up with an error and keeps what was applied
    /// before it (each applied revision is a valid commit).
    pub async fn catch_up_from(&self, block_id: &BlockId, peer: PeerId) -> Result<usize, RepoError> {
        let mut applied = 0usize;
        for _ in 0..MAX_SYNC_PAGES {
            let after_rev = self.local.storage().latest(block_id).await?.map(|l| l.rev);
            let request = SyncRequest::Revisions { block_id: block_id.clone(), after_rev, limit: MAX_SYNC_ENTRIES };
            let request = serde_json::to_value(request).map_err(|e| RepoError::Internal(e.to_string()))?;
            let answer = self.network.request(peer, ProtocolKind::Sync, request, self.timeout).await?;
            let page: RevisionsResponse = serde_json::from_value(answer)
                .map_err(|e| RepoError::Unavailable(format!("malformed sync answer from {peer}: {e}")))?;
            let mut previous = after_rev;
            for entry in &page.entries {
                if previous.is_some_and(|p| entry.rev <= p) {
                    return Err(RepoError::Unavailable(format!(
                        "{peer} sent revision {} of {block_id} out of order",
                        entry.rev
                    )));
                }
                self.local
                    .apply_replica(block_id, &TrxRev { trx_id: entry.trx_id.clone(), rev: entry.rev }, &entry.transform)
                    .await?;
                previous = Some(entry.rev);
                applied += 1;
            }
            if !page.more || page.entries.is_empty() {
                return Ok(applied);
            }
        }
        Ok(applied)
    }

    /// Catches `block_id` up from whichever of `peers` reports the newest latest revision, if it is
    /// newer than the local one. Returns the revisions applied.
    pub async fn catch_up(&self, block_id: &BlockId, peers: &[PeerId]) -> Result<usize, RepoError> {
        let local_rev = self.local.storage().latest(block_id).await?.map(|l| l.rev);
        let answers = self.latest_of(peers, std::slice::from_ref(block_id)).await;
        let best = answers
            .into_iter()
            .filter_map(|(peer, r)| r.latest.get(block_id).cloned().flatten().map(|l| (l.rev, peer)))
            .filter(|(rev, _)| local_rev.is_none_or(|l| *rev > l))
            .max();
        match best {
            Some((_, peer)) => self.catch_up_from(block_id, peer).await,
            None => Ok(0),
        }
    }
}

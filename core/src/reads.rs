//! Read modes: [`ClusterReads`] wraps the node's writing repository and serves `get` in the
//! configured [`ReadMode`].
//!
//! - [`ReadMode::Quorum`] (default): for each block whose cluster includes this node, a majority of
//!   the cluster (this node plus enough peers) reports its latest revision; if any is newer than
//!   the local one, this node catches up first (verified, SPEC 4.10), then answers from local
//!   storage.
//!   An acknowledged commit is on a majority of its cluster, and any two majorities intersect, so a
//!   quorum read never misses an acknowledged commit. Fails with `unavailable` when too few peers
//!   answer. While members come and go, views differ (SPEC 4.9): a member this node cannot reach
//!   may have left, and another node may already count the next-closest peer in its place. So for
//!   each member that does not answer, the read also asks that stand-in (the next peer of the
//!   block's ranking) and does not answer below a revision a stand-in reports and this node
//!   cannot reach: a read never shows less than a read through the stand-in did.
//!   A claim of a newer revision counts only with execution proof (SPEC 4.10 (d)): a claim this
//!   node cannot catch up to does not fail the read when this node's latest revision is also the
//!   latest of a majority of the cluster (this node and the members that answered the same), and
//!   is left to background catch-up ([`ClusterReads::with_behind`]); otherwise the read fails
//!   with `unavailable`, since an acknowledged commit may be among the revisions not reached.
//! - [`ReadMode::Local`]: answers from local storage; fastest, may be stale.
//!
//! In both modes a node outside a block's cluster forwards the read to a member (closest first),
//! which serves it in its own mode.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use libp2p_identity::PeerId;

use crate::client::RepoClient;
use crate::consensus::BehindSink;
use crate::error::RepoError;
use crate::keynet::KeyNetwork;
pub use crate::model::ReadMode;
use crate::model::{
    BlockGets, BlockId, CommitRequest, CommitResult, GetBlockResults, PendRequest, PendResult, TrxBlocks,
};
use crate::network::PeerNetwork;
use crate::repo::{MessageOptions, Repo, StorageRepo};
use crate::sync::{CatchUp, LatestResponse};

/// The node's repository: writes go to `writes` (the coordinator), reads follow the read mode.
#[derive(Clone)]
pub struct ClusterReads {
    writes: Arc<dyn Repo>,
    local: StorageRepo,
    key_network: Arc<dyn KeyNetwork>,
    network: Arc<dyn PeerNetwork>,
    catch_up: CatchUp,
    mode: ReadMode,
    timeout: Duration,
    behind: Option<Arc<dyn BehindSink>>,
}

impl std::fmt::Debug for ClusterReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterReads").field("mode", &self.mode).finish_non_exhaustive()
    }
}

impl ClusterReads {
    /// Reads in `mode` over the local repository, with `writes` serving pend / cancel / commit;
    /// `timeout` bounds each request to a peer.
    pub fn new(
        writes: Arc<dyn Repo>,
        local: StorageRepo,
        key_network: Arc<dyn KeyNetwork>,
        network: Arc<dyn PeerNetwork>,
        mode: ReadMode,
        timeout: Duration,
    ) -> Self {
        let catch_up = CatchUp::new(network.clone(), local.clone(), key_network.clone(), timeout);
        Self { writes, local, key_network, network, catch_up, mode, timeout, behind: None }
    }

    /// Queues blocks whose reads left a newer, unproven claim behind on `sink` (the node's
    /// bounded catch-up queue), so catch-up pursues it in the background.
    #[must_use]
    pub fn with_behind(mut self, sink: Arc<dyn BehindSink>) -> Self {
        self.behind = Some(sink);
        self
    }

    /// The catch-up client this repository uses.
    pub fn catch_up(&self) -> &CatchUp {
        &self.catch_up
    }

    /// Reads in an explicit mode (the per-request override).
    pub async fn get_in_mode(
        &self,
        gets: &BlockGets,
        options: &MessageOptions,
        mode: ReadMode,
    ) -> Result<GetBlockResults, RepoError> {
        options.check_expired()?;
        let me = self.network.local_peer_id();
        // Group the blocks by cluster, as the coordinator does for writes.
        let mut groups: BTreeMap<Vec<PeerId>, Vec<BlockId>> = BTreeMap::new();
        for block_id in &gets.block_ids {
            let cluster = self
                .key_network
                .find_cluster(block_id)
                .await
                .map_err(|e| RepoError::Unavailable(format!("cluster of {block_id}: {e}")))?;
            let members: Vec<PeerId> = cluster.keys().copied().collect();
            let group = groups.entry(members).or_default();
            if !group.contains(block_id) {
                group.push(block_id.clone());
            }
        }
        let mut results = GetBlockResults::new();
        for (members, block_ids) in groups {
            let part = BlockGets { block_ids, context: gets.context.clone(), read_mode: gets.read_mode };
            let answer = if members.contains(&me) {
                if mode == ReadMode::Quorum {
                    self.converge(&members, &part.block_ids).await?;
                }
                self.local.get(&part, options).await?
            } else {
                self.forward(&members, &part, options).await?
            };
            results.extend(answer);
        }
        Ok(results)
    }

    /// Makes sure the local copies are at least as new as a majority's (quorum read).
    async fn converge(&self, members: &[PeerId], block_ids: &[BlockId]) -> Result<(), RepoError> {
        let me = self.network.local_peer_id();
        let others: Vec<PeerId> = members.iter().copied().filter(|p| *p != me).collect();
        let needed = (members.len() / 2 + 1).saturating_sub(1);
        if needed == 0 {
            return Ok(());
        }
        let answers = self.catch_up.latest_of(&others, block_ids).await;
        if answers.len() < needed {
            return Err(RepoError::Unavailable(format!(
                "quorum read needs {needed} of {} cluster peers, {} answered",
                others.len(),
                answers.len()
            )));
        }
        let unanswered = others.iter().filter(|p| !answers.contains_key(p)).count();
        for block_id in block_ids {
            self.converge_block(members, members, block_id, &answers, &answers).await?;
            if unanswered > 0 {
                self.converge_with_stand_ins(members, block_id, unanswered, &answers).await?;
            }
        }
        Ok(())
    }

    /// Catches `block_id` up to the claims of `answers` (from peers of `view`). A claim this node
    /// could not catch up to came without execution proof it could check (SPEC 4.10 (d)): it
    /// fails the read only when this node's latest revision is not also the latest of a majority
    /// of `members` (this node and the members whose `member_answers` report the same revision):
    /// when a majority answered and agree, an acknowledged commit above it cannot exist, and the
    /// claim is left to background catch-up.
    async fn converge_block(
        &self,
        members: &[PeerId],
        view: &[PeerId],
        block_id: &BlockId,
        answers: &BTreeMap<PeerId, LatestResponse>,
        member_answers: &BTreeMap<PeerId, LatestResponse>,
    ) -> Result<(), RepoError> {
        let local_rev = self.local.storage().latest(block_id).await?.map(|l| l.rev);
        let newest = answers.values().filter_map(|r| r.latest.get(block_id).cloned().flatten().map(|l| l.rev)).max();
        let Some(rev) = newest.filter(|rev| local_rev.is_none_or(|l| *rev > l)) else {
            return Ok(());
        };
        tracing::debug!(%block_id, rev, ?local_rev, "behind a quorum peer; catching up before the read");
        let report = self.catch_up.catch_up_to_claims(block_id, view, answers).await?;
        let Some((peer, claimed)) = report.unreached.first() else {
            return Ok(());
        };
        let mine = self.local.storage().latest(block_id).await?;
        let me = self.network.local_peer_id();
        let agreeing = members
            .iter()
            .filter(|p| {
                **p == me || member_answers.get(p).is_some_and(|r| r.latest.get(block_id).cloned().flatten() == mine)
            })
            .count();
        if agreeing >= crate::evidence::majority(members.len()) {
            tracing::info!(
                %block_id, %peer, claimed, latest = ?mine,
                "an unproven claim of a newer revision; a majority of the view agrees on this one: reading it, catching up in the background"
            );
            if let Some(behind) = &self.behind {
                behind.behind(block_id);
            }
            return Ok(());
        }
        // An acknowledged commit may be among the revisions not reached: answering now could
        // miss it. A peer whose claim is disproved (it served unverifiable data) does not block
        // the read.
        Err(RepoError::Unavailable(format!(
            "quorum read of {block_id}: {peer} reports revision {claimed}, which this node could not catch up to"
        )))
    }

    /// Asks the `count` peers ranked next after `members` for `block_id` (those other nodes may
    /// count as members in place of the unreachable ones) and catches up to what they report,
    /// within the widened view; a claim it cannot reach fails the read unless a majority of
    /// `members` agree with this node ([`Self::converge_block`]).
    async fn converge_with_stand_ins(
        &self,
        members: &[PeerId],
        block_id: &BlockId,
        count: usize,
        member_answers: &BTreeMap<PeerId, LatestResponse>,
    ) -> Result<(), RepoError> {
        let ranked = match self.key_network.ranked(block_id, members.len().saturating_add(count)).await {
            Ok(ranked) => ranked,
            Err(e) => {
                tracing::debug!(%block_id, error = %e, "no stand-ins for unreachable members");
                return Ok(());
            }
        };
        let stand_ins: Vec<PeerId> = ranked.into_iter().filter(|p| !members.contains(p)).take(count).collect();
        if stand_ins.is_empty() {
            return Ok(());
        }
        let widened: Vec<PeerId> = members.iter().chain(&stand_ins).copied().collect();
        let answers = self.catch_up.latest_of(&stand_ins, std::slice::from_ref(block_id)).await;
        self.converge_block(members, &widened, block_id, &answers, member_answers).await
    }

    /// Forwards a read to the first member that answers.
    async fn forward(
        &self,
        members: &[PeerId],
        gets: &BlockGets,
        options: &MessageOptions,
    ) -> Result<GetBlockResults, RepoError> {
        let mut last_error = RepoError::Unavailable("the block's cluster has no members".into());
        let timeout_ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        for member in members {
            let client = RepoClient::new(self.network.clone(), *member).with_default_timeout_ms(timeout_ms);
            match client.get(gets, options).await {
                Ok(results) => return Ok(results),
                Err(e) if e.is_retryable() => last_error = e,
                Err(e) => return Err(e),
            }
        }
        Err(last_error)
    }
}

#[async_trait]
impl Repo for ClusterReads {
    async fn get(&self, gets: &BlockGets, options: &MessageOptions) -> Result<GetBlockResults, RepoError> {
        let mode = gets.read_mode.unwrap_or(self.mode);
        self.get_in_mode(gets, options, mode).await
    }

    async fn pend(&self, request: &PendRequest, options: &MessageOptions) -> Result<PendResult, RepoError> {
        self.writes.pend(request, options).await
    }

    async fn cancel(&self, trx: &TrxBlocks, options: &MessageOptions) -> Result<(), RepoError> {
        self.writes.cancel(trx, options).await
    }

    async fn commit(&self, request: &CommitRequest, options: &MessageOptions) -> Result<CommitResult, RepoError> {
        self.writes.commit(request, options).await
    }
}

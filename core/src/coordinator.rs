//! [`CoordinatorRepo`]: a [`Repo`] whose writes are agreed by each block's cluster.
//!
//! Writes: the blocks of an operation are grouped by cluster (blocks whose clusters have the same
//! peer set share one consensus round; groups run concurrently).
//!
//! - **pend**: if any group fails, the pend is cancelled in every group where it succeeded or may
//!   have been applied, so no partial pend is left behind; the answer is the first group's
//!   `StaleFailure` if any group reported staleness, otherwise the first group's error.
//! - **cancel**: every group; the first error is returned after all groups were tried.
//! - **commit**: first in the group holding `tailId` — the commit point: once it succeeds the
//!   transaction is committed — then in the other groups concurrently, each retried with backoff
//!   (bounded by [`CoordinatorConfig::follower_commit_attempts`]) until it lands. A follower that
//!   still fails is logged and left to read-driven promotion (readers report the transaction
//!   committed through their read context); the client is answered success regardless, because
//!   the commit point was passed.
//!
//! Outcomes come from the [`Consensus`]: a `StaleFailure` when a member reported staleness,
//! `consensus-failed` when the cluster did not agree (nothing applied), `unavailable` when the
//! outcome is unknown.
//!
//! Reads are served from the local repository; cluster-aware reads belong to the node (see its
//! read modes).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;

use crate::consensus::{Clock, Consensus, SystemClock};
use crate::error::{ErrorCode, RepoError};
use crate::keynet::{ClusterPeers, KeyNetwork};
use crate::model::{
    BlockGets, BlockId, BlockTrxRef, CommitRequest, CommitResult, GetBlockResults, PendRequest, PendResult,
    PendSuccess, StaleFailure, Transforms, TrxBlocks, TrxId,
};
use crate::repo::{MessageOptions, Repo, json_size_bytes};
use crate::wire::{RepoMessage, RepoOperation, RepoResponse};

/// How long a coordinated operation may take when the caller gives no expiration.
pub const DEFAULT_OPERATION_TIMEOUT_MS: u64 = 10_000;
/// How many times a follower group of a commit is tried after the commit point.
pub const FOLLOWER_COMMIT_ATTEMPTS: u32 = 5;
/// First delay between follower commit attempts; doubles each time.
pub const FOLLOWER_RETRY_BASE_MS: u64 = 50;
/// Longest delay between follower commit attempts.
pub const FOLLOWER_RETRY_MAX_MS: u64 = 2_000;

/// Tunables of a [`CoordinatorRepo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// Lifetime of an operation whose caller gave no expiration, and of each cancel or follower
    /// commit the coordinator issues on its own, in ms.
    pub operation_timeout_ms: u64,
    /// Attempts per follower group of a commit (at least 1).
    pub follower_commit_attempts: u32,
    /// First delay between follower commit attempts, in ms; doubles each attempt.
    pub follower_retry_base_ms: u64,
    /// Cap of the delay between follower commit attempts, in ms.
    pub follower_retry_max_ms: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            operation_timeout_ms: DEFAULT_OPERATION_TIMEOUT_MS,
            follower_commit_attempts: FOLLOWER_COMMIT_ATTEMPTS,
            follower_retry_base_ms: FOLLOWER_RETRY_BASE_MS,
            follower_retry_max_ms: FOLLOWER_RETRY_MAX_MS,
        }
    }
}

/// A repository whose writes go through a cluster consensus.
#[derive(Debug, Clone)]
pub struct CoordinatorRepo {
    key_network: Arc<dyn KeyNetwork>,
    consensus: Arc<dyn Consensus>,
    reads: Arc<dyn Repo>,
    clock: Arc<dyn Clock>,
    config: CoordinatorConfig,
    max_pend_bytes: Option<u64>,
}

/// Room in a cluster frame around a record's operations (peers, hashes, votes): 64 KiB.
pub const RECORD_ENVELOPE_BYTES: usize = 64 * 1024;

impl std::fmt::Debug for dyn Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn Repo")
    }
}

/// Blocks that share one cluster.
#[derive(Debug)]
struct Group {
    peers: ClusterPeers,
    block_ids: BTreeSet<BlockId>,
}

impl Group {
    fn block_list(&self) -> Vec<BlockId> {
        self.block_ids.iter().cloned().collect()
    }
}

/// Whether an error leaves the operation possibly applied (so a partial pend must be undone).
fn maybe_applied(e: &RepoError) -> bool {
    matches!(e.code(), ErrorCode::Unavailable | ErrorCode::Internal)
}

impl CoordinatorRepo {
    /// A coordinator over a key network and consensus; `reads` serves `get`. Uses the system clock
    /// and [`CoordinatorConfig::default`].
    pub fn new(key_network: Arc<dyn KeyNetwork>, consensus: Arc<dyn Consensus>, reads: Arc<dyn Repo>) -> Self {
        Self {
            key_network,
            consensus,
            reads,
            clock: Arc::new(SystemClock),
            config: CoordinatorConfig::default(),
            max_pend_bytes: None,
        }
    }

    /// This coordinator refusing at once, with `bad-request`, a pend whose JSON is larger than
    /// `max_pend_bytes` for a cluster of more than one peer: its record could not reach the other
    /// members (the cluster frame limit less the record's envelope, [`RECORD_ENVELOPE_BYTES`]).
    /// Larger blocks are written in smaller updates.
    #[must_use]
    pub fn with_max_pend_bytes(mut self, max_pend_bytes: u64) -> Self {
        self.max_pend_bytes = Some(max_pend_bytes);
        self
    }

    /// This coordinator judging expirations by `clock` (simulations run it on virtual time).
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// This coordinator with other tunables; `follower_commit_attempts` below 1 counts as 1.
    #[must_use]
    pub fn with_config(mut self, config: CoordinatorConfig) -> Self {
        self.config = config;
        self
    }

    /// Groups blocks by the peer set of their cluster, in a deterministic order.
    async fn group(&self, block_ids: impl IntoIterator<Item = &BlockId>) -> Result<Vec<Group>, RepoError> {
        let mut groups: BTreeMap<Vec<libp2p_identity::PeerId>, Group> = BTreeMap::new();
        for block_id in block_ids.into_iter().collect::<BTreeSet<_>>() {
            let peers = self
                .key_network
                .find_cluster(block_id)
                .await
                .map_err(|e| RepoError::Unavailable(format!("cluster of {block_id}: {e}")))?;
            if peers.is_empty() {
                return Err(RepoError::Unavailable(format!("no cluster peer known for {block_id}")));
            }
            let key: Vec<_> = peers.keys().copied().collect();
            groups
                .entry(key)
                .or_insert_with(|| Group { peers, block_ids: BTreeSet::new() })
                .block_ids
                .insert(block_id.clone());
        }
        Ok(groups.into_values().collect())
    }

    /// Fails with [`RepoError::Expired`] when the caller's expiration has passed on this clock.
    fn check_expired(&self, options: &MessageOptions) -> Result<(), RepoError> {
        match options.expiration_ms {
            Some(exp) if exp < self.clock.now_ms() => Err(RepoError::Expired),
            _ => Ok(()),
        }
    }

    /// The caller's expiration, or one operation timeout from now.
    fn expiration(&self, options: &MessageOptions) -> u64 {
        options.expiration_ms.unwrap_or_else(|| self.fresh_expiration())
    }

    /// One operation timeout from now, for work the coordinator issues on its own.
    fn fresh_expiration(&self) -> u64 {
        self.clock.now_ms().saturating_add(self.config.operation_timeout_ms)
    }

    async fn run(&self, group: &Group, operation: RepoOperation, expiration: u64) -> Result<RepoResponse, RepoError> {
        if let (Some(max), RepoOperation::Pend(pend)) = (self.max_pend_bytes, &operation)
            && group.peers.len() > 1
        {
            let size = json_size_bytes(pend);
            if size > max {
                let blocks: Vec<&str> = group.block_ids.iter().map(BlockId::as_str).collect();
                return Err(RepoError::BadRequest(format!(
                    "the pend of {} is {size} bytes of JSON, over the {max} bytes a cluster record carries \
                     (limits.max_cluster_frame_bytes less its envelope): write the block in smaller updates",
                    blocks.join(", ")
                )));
            }
        }
        let message = RepoMessage::new(operation, expiration);
        self.consensus.execute(&group.peers, &message).await
    }

    /// Cancels `trx_id` in each group, best effort (a pend left behind expires with nothing
    /// committed and is cancelled by the client's next attempt).
    async fn cancel_groups(&self, trx_id: &TrxId, groups: &[&Group]) {
        let expiration = self.fresh_expiration();
        let cancels = groups.iter().map(|group| async move {
            let trx_ref = TrxBlocks { trx_id: trx_id.clone(), block_ids: group.block_list() };
            if let Err(e) = self.run(group, RepoOperation::Cancel { trx_ref }, expiration).await {
                tracing::warn!(%trx_id, error = %e, "cancelling a partial pend failed");
            }
        });
        join_all(cancels).await;
    }

    /// Commits one follower group after the commit point, retrying with backoff.
    async fn commit_follower(&self, group: &Group, request: &CommitRequest) {
        let part = CommitRequest { block_ids: group.block_list(), ..request.clone() };
        let attempts = self.config.follower_commit_attempts.max(1);
        let mut delay_ms = self.config.follower_retry_base_ms;
        for attempt in 1..=attempts {
            match self.run(group, RepoOperation::Commit(part.clone()), self.fresh_expiration()).await {
                Ok(RepoResponse::Commit(CommitResult::Success(_))) => return,
                Ok(RepoResponse::Commit(CommitResult::Stale(stale))) => {
                    tracing::warn!(trx_id = %request.trx_id, reason = ?stale.reason,
                        "a follower group reported staleness after the commit point");
                    return;
                }
                Ok(other) => {
                    tracing::warn!(trx_id = %request.trx_id, response = ?other,
                        "a follower group answered a commit with a non-commit response");
                    return;
                }
                Err(e) if attempt < attempts && e.is_retryable() => {
                    tracing::debug!(trx_id = %request.trx_id, attempt, error = %e, "follower commit failed; retrying");
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    delay_ms = delay_ms.saturating_mul(2).min(self.config.follower_retry_max_ms);
                }
                Err(e) => {
                    tracing::warn!(trx_id = %request.trx_id, error = %e,
                        "a follower group did not commit; readers will promote it");
                    return;
                }
            }
        }
    }
}

fn restrict(transforms: &Transforms, block_ids: &BTreeSet<BlockId>) -> Transforms {
    let mut out = Transforms::default();
    for id in block_ids {
        out.add(id, &transforms.transform_for(id));
    }
    out
}

fn unexpected(kind: &str, response: &RepoResponse) -> RepoError {
    RepoError::Internal(format!("consensus answered a {kind} with {response:?}"))
}

#[async_trait]
impl Repo for CoordinatorRepo {
    async fn get(&self, gets: &BlockGets, options: &MessageOptions) -> Result<GetBlockResults, RepoError> {
        self.check_expired(options)?;
        // The local repository judges expirations by the system clock; this coordinator's clock
        // already did, so the read goes without a deadline.
        self.reads.get(gets, &MessageOptions::default()).await
    }

    async fn pend(&self, request: &PendRequest, options: &MessageOptions) -> Result<PendResult, RepoError> {
        self.check_expired(options)?;
        let expiration = self.expiration(options);
        let groups = self.group(request.transforms.block_ids().iter()).await?;
        if groups.is_empty() {
            return Err(RepoError::BadRequest("pend touches no block".into()));
        }
        let outcomes = join_all(groups.iter().map(|group| {
            let part = PendRequest { transforms: restrict(&request.transforms, &group.block_ids), ..request.clone() };
            self.run(group, RepoOperation::Pend(part), expiration)
        }))
        .await;

        let mut to_cancel: Vec<&Group> = Vec::new();
        let mut pending: Vec<BlockTrxRef> = Vec::new();
        let mut block_ids = Vec::new();
        let mut stale: Option<StaleFailure> = None;
        let mut error: Option<RepoError> = None;
        for (group, outcome) in groups.iter().zip(outcomes) {
            match outcome {
                Ok(RepoResponse::Pend(PendResult::Success(ok))) => {
                    pending.extend(ok.pending);
                    block_ids.extend(ok.block_ids);
                    to_cancel.push(group);
                }
                Ok(RepoResponse::Pend(PendResult::Stale(failure))) => {
                    stale.get_or_insert(failure);
                }
                Ok(other) => {
                    to_cancel.push(group);
                    error.get_or_insert(unexpected("pend", &other));
                }
                Err(e) => {
                    if maybe_applied(&e) {
                        to_cancel.push(group);
                    }
                    error.get_or_insert(e);
                }
            }
        }
        if stale.is_none() && error.is_none() {
            block_ids.sort();
            block_ids.dedup();
            return Ok(PendResult::Success(PendSuccess { success: crate::model::True, pending, block_ids }));
        }
        self.cancel_groups(&request.trx_id, &to_cancel).await;
        match (stale, error) {
            (Some(failure), _) => Ok(PendResult::Stale(failure)),
            (None, Some(e)) => Err(e),
            (None, None) => Err(RepoError::Internal("pend failed without a reason".into())),
        }
    }

    async fn cancel(&self, trx: &TrxBlocks, options: &MessageOptions) -> Result<(), RepoError> {
        self.check_expired(options)?;
        let expiration = self.expiration(options);
        let groups = self.group(trx.block_ids.iter()).await?;
        let outcomes = join_all(groups.iter().map(|group| {
            let trx_ref = TrxBlocks { trx_id: trx.trx_id.clone(), block_ids: group.block_list() };
            self.run(group, RepoOperation::Cancel { trx_ref }, expiration)
        }))
        .await;
        for outcome in outcomes {
            match outcome {
                Ok(RepoResponse::Cancel) => {}
                Ok(other) => return Err(unexpected("cancel", &other)),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn commit(&self, request: &CommitRequest, options: &MessageOptions) -> Result<CommitResult, RepoError> {
        self.check_expired(options)?;
        let expiration = self.expiration(options);
        let mut groups = self.group(request.block_ids.iter()).await?;
        if groups.is_empty() {
            return Err(RepoError::BadRequest("commit names no block".into()));
        }
        // The group holding the tail is the commit point and goes first.
        let tail_index = groups.iter().position(|g| g.block_ids.contains(&request.tail_id)).unwrap_or(0);
        let tail = groups.remove(tail_index);
        let part = CommitRequest { block_ids: tail.block_list(), ..request.clone() };
        match self.run(&tail, RepoOperation::Commit(part), expiration).await? {
            RepoResponse::Commit(CommitResult::Success(_)) => {}
            RepoResponse::Commit(stale @ CommitResult::Stale(_)) => return Ok(stale),
            other => return Err(unexpected("commit", &other)),
        }
        join_all(groups.iter().map(|group| self.commit_follower(group, request))).await;
        Ok(CommitResult::success())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::sync::Mutex;

    use libp2p_identity::PeerId;

    use super::*;
    use crate::keynet::{KeyNetworkError, PeerInfo};
    use crate::model::{Block, BlockOperation, PendPolicy};
    use crate::record::ClusterRecord;

    fn id(s: &str) -> BlockId {
        BlockId::new(s).unwrap()
    }

    /// Blocks starting with `a` live on peer A's cluster, the others on peer B's.
    #[derive(Debug)]
    struct TwoClusters {
        a: PeerId,
        b: PeerId,
    }

    #[async_trait]
    impl KeyNetwork for TwoClusters {
        async fn find_cluster(&self, block_id: &BlockId) -> Result<ClusterPeers, KeyNetworkError> {
            let peer = if block_id.starts_with('a') { self.a } else { self.b };
            Ok(ClusterPeers::from([(peer, PeerInfo::default())]))
        }

        async fn find_coordinator(&self, _block_id: &BlockId, _excluded: &[PeerId]) -> Result<PeerId, KeyNetworkError> {
            Ok(self.a)
        }

        fn cluster_size(&self) -> usize {
            1
        }

        async fn has_seen(&self, peer: &PeerId) -> bool {
            *peer == self.a || *peer == self.b
        }
    }

    /// Every block on one cluster of three peers.
    #[derive(Debug)]
    struct Crowded([PeerId; 3]);

    #[async_trait]
    impl KeyNetwork for Crowded {
        async fn find_cluster(&self, _block_id: &BlockId) -> Result<ClusterPeers, KeyNetworkError> {
            Ok(self.0.iter().map(|p| (*p, PeerInfo::default())).collect())
        }

        async fn find_coordinator(&self, _block_id: &BlockId, _excluded: &[PeerId]) -> Result<PeerId, KeyNetworkError> {
            Ok(self.0[0])
        }

        fn cluster_size(&self) -> usize {
            3
        }

        async fn has_seen(&self, peer: &PeerId) -> bool {
            self.0.contains(peer)
        }
    }

    /// An answer to give once: to the peer, for the operation kind.
    type Scripted1 = (PeerId, &'static str, Result<RepoResponse, RepoError>);

    /// Scripted answers per cluster peer; records every call.
    #[derive(Debug, Default)]
    struct Scripted {
        calls: Mutex<Vec<(PeerId, RepoOperation)>>,
        /// Answers to give, per peer, per operation kind, in order; default answers otherwise.
        script: Mutex<Vec<Scripted1>>,
    }

    #[async_trait]
    impl Consensus for Scripted {
        async fn execute(&self, peers: &ClusterPeers, message: &RepoMessage) -> Result<RepoResponse, RepoError> {
            let peer = *peers.keys().next().unwrap();
            let op = message.operation().unwrap().clone();
            let kind = op.kind();
            self.calls.lock().unwrap().push((peer, op.clone()));
            let mut script = self.script.lock().unwrap();
            if let Some(i) = script.iter().position(|(p, k, _)| *p == peer && *k == kind) {
                return script.remove(i).2;
            }
            Ok(match op {
                RepoOperation::Pend(p) => RepoResponse::Pend(PendResult::Success(PendSuccess {
                    success: crate::model::True,
                    pending: vec![],
                    block_ids: p.transforms.block_ids(),
                })),
                RepoOperation::Commit(_) => RepoResponse::Commit(CommitResult::success()),
                RepoOperation::Cancel { .. } => RepoResponse::Cancel,
                RepoOperation::Get(_) => return Err(RepoError::BadRequest("get".into())),
            })
        }

        async fn on_update(&self, _sender: PeerId, record: ClusterRecord) -> Result<ClusterRecord, RepoError> {
            Ok(record)
        }
    }

    #[derive(Debug)]
    struct NoReads;

    #[async_trait]
    impl Repo for NoReads {
        async fn get(&self, _: &BlockGets, _: &MessageOptions) -> Result<GetBlockResults, RepoError> {
            Ok(GetBlockResults::new())
        }
        async fn pend(&self, _: &PendRequest, _: &MessageOptions) -> Result<PendResult, RepoError> {
            Err(RepoError::Internal("unused".into()))
        }
        async fn cancel(&self, _: &TrxBlocks, _: &MessageOptions) -> Result<(), RepoError> {
            Err(RepoError::Internal("unused".into()))
        }
        async fn commit(&self, _: &CommitRequest, _: &MessageOptions) -> Result<CommitResult, RepoError> {
            Err(RepoError::Internal("unused".into()))
        }
    }

    fn setup() -> (CoordinatorRepo, Arc<Scripted>, PeerId, PeerId) {
        let (a, b) = (PeerId::random(), PeerId::random());
        let consensus = Arc::new(Scripted::default());
        let repo = CoordinatorRepo::new(Arc::new(TwoClusters { a, b }), consensus.clone(), Arc::new(NoReads))
            .with_config(CoordinatorConfig { follower_retry_base_ms: 1, ..CoordinatorConfig::default() });
        (repo, consensus, a, b)
    }

    fn pend_two() -> PendRequest {
        let mut transforms = Transforms::default();
        transforms.inserts.insert(id("a1"), Block::new(id("a1"), "t", "c"));
        transforms.updates.insert(id("b1"), vec![BlockOperation::set("x", serde_json::json!(1))]);
        PendRequest { trx_id: TrxId::new("t1").unwrap(), rev: None, transforms, policy: PendPolicy::Continue }
    }

    fn kinds(calls: &[(PeerId, RepoOperation)], peer: PeerId) -> Vec<&'static str> {
        calls.iter().filter(|(p, _)| *p == peer).map(|(_, op)| op.kind()).collect()
    }

    fn insert_of(block: &str, bytes: usize) -> PendRequest {
        let mut value = Block::new(id(block), "t", "c");
        value.fields.insert("data".into(), serde_json::json!("x".repeat(bytes)));
        let mut transforms = Transforms::default();
        transforms.inserts.insert(id(block), value);
        PendRequest { trx_id: TrxId::new("t1").unwrap(), rev: Some(1), transforms, policy: PendPolicy::Continue }
    }

    /// Issue 23: a 2 MB insert on a three-node cluster failed after every retry, each member
    /// refusing the record's frame; it is refused at once, before any consensus round.
    #[tokio::test]
    async fn a_pend_too_large_for_a_cluster_record_is_refused_before_consensus() {
        let consensus = Arc::new(Scripted::default());
        let crowded = Crowded([PeerId::random(), PeerId::random(), PeerId::random()]);
        let repo =
            CoordinatorRepo::new(Arc::new(crowded), consensus.clone(), Arc::new(NoReads)).with_max_pend_bytes(1_000);
        let refused = repo.pend(&insert_of("big", 2_000), &MessageOptions::default()).await.unwrap_err();
        assert_eq!(refused.code(), ErrorCode::BadRequest, "{refused}");
        let said = refused.to_string();
        assert!(said.contains("the pend of big is ") && said.contains("over the 1000 bytes"), "{said}");
        assert!(consensus.calls.lock().unwrap().is_empty(), "no consensus round for it");
        assert!(repo.pend(&insert_of("small", 10), &MessageOptions::default()).await.is_ok());

        // A cluster of one peer sends no record anywhere.
        let (alone, _, _, _) = setup();
        let alone = alone.with_max_pend_bytes(1_000);
        assert!(alone.pend(&insert_of("a-big", 2_000), &MessageOptions::default()).await.is_ok());
    }

    #[tokio::test]
    async fn pend_spans_groups_and_merges_answers() {
        let (repo, consensus, a, b) = setup();
        let answer = repo.pend(&pend_two(), &MessageOptions::default()).await.unwrap();
        let PendResult::Success(ok) = answer else { panic!("expected success") };
        assert_eq!(ok.block_ids, vec![id("a1"), id("b1")]);
        let calls = consensus.calls.lock().unwrap();
        assert_eq!(kinds(&calls, a), vec!["pend"]);
        assert_eq!(kinds(&calls, b), vec!["pend"]);
        // Each group saw only its own blocks.
        for (peer, op) in calls.iter() {
            let RepoOperation::Pend(p) = op else { panic!() };
            let expected = if *peer == a { vec![id("a1")] } else { vec![id("b1")] };
            assert_eq!(p.transforms.block_ids(), expected);
        }
    }

    #[tokio::test]
    async fn a_failed_group_cancels_the_pended_ones() {
        let (repo, consensus, a, b) = setup();
        consensus.script.lock().unwrap().push((b, "pend", Err(RepoError::ConsensusFailed("split".into()))));
        let e = repo.pend(&pend_two(), &MessageOptions::default()).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::ConsensusFailed);
        let calls = consensus.calls.lock().unwrap();
        assert_eq!(kinds(&calls, a), vec!["pend", "cancel"]);
        // Consensus failed means nothing applied there: no cancel needed.
        assert_eq!(kinds(&calls, b), vec!["pend"]);
    }

    #[tokio::test]
    async fn an_unknown_outcome_is_cancelled_too_and_staleness_wins() {
        let (repo, consensus, a, b) = setup();
        consensus.script.lock().unwrap().push((a, "pend", Err(RepoError::Unavailable("lost".into()))));
        consensus.script.lock().unwrap().push((
            b,
            "pend",
            Ok(RepoResponse::Pend(PendResult::Stale(StaleFailure {
                reason: Some("stale".into()),
                ..Default::default()
            }))),
        ));
        let answer = repo.pend(&pend_two(), &MessageOptions::default()).await.unwrap();
        assert!(matches!(answer, PendResult::Stale(s) if s.reason.as_deref() == Some("stale")));
        let calls = consensus.calls.lock().unwrap();
        assert_eq!(kinds(&calls, a), vec!["pend", "cancel"]);
        assert_eq!(kinds(&calls, b), vec!["pend"]);
    }

    fn commit_request(tail: &str) -> CommitRequest {
        CommitRequest {
            trx_id: TrxId::new("t1").unwrap(),
            block_ids: vec![id("a1"), id("b1")],
            rev: 1,
            tail_id: id(tail),
            header_id: None,
        }
    }

    #[tokio::test]
    async fn commit_goes_to_the_tail_group_first_and_retries_followers() {
        let (repo, consensus, a, b) = setup();
        for _ in 0..2 {
            consensus.script.lock().unwrap().push((a, "commit", Err(RepoError::Unavailable("lost".into()))));
        }
        let answer = repo.commit(&commit_request("b1"), &MessageOptions::default()).await.unwrap();
        assert!(answer.is_success());
        let calls = consensus.calls.lock().unwrap();
        assert_eq!(calls.first().map(|(p, _)| *p), Some(b));
        assert_eq!(kinds(&calls, a), vec!["commit", "commit", "commit"]);
    }

    #[tokio::test]
    async fn a_failing_follower_does_not_undo_the_commit_point() {
        let (repo, consensus, a, _b) = setup();
        for _ in 0..FOLLOWER_COMMIT_ATTEMPTS {
            consensus.script.lock().unwrap().push((a, "commit", Err(RepoError::Unavailable("lost".into()))));
        }
        assert!(repo.commit(&commit_request("b1"), &MessageOptions::default()).await.unwrap().is_success());
        assert_eq!(kinds(&consensus.calls.lock().unwrap(), a).len(), FOLLOWER_COMMIT_ATTEMPTS as usize);
    }

    #[tokio::test]
    async fn a_stale_or_failed_tail_stops_the_commit() {
        let (repo, consensus, a, b) = setup();
        consensus.script.lock().unwrap().push((
            a,
            "commit",
            Ok(RepoResponse::Commit(CommitResult::Stale(StaleFailure::default()))),
        ));
        let answer = repo.commit(&commit_request("a1"), &MessageOptions::default()).await.unwrap();
        assert!(!answer.is_success());
        assert!(kinds(&consensus.calls.lock().unwrap(), b).is_empty());

        consensus.script.lock().unwrap().push((a, "commit", Err(RepoError::ConsensusFailed("no".into()))));
        let e = repo.commit(&commit_request("a1"), &MessageOptions::default()).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::ConsensusFailed);
        assert!(kinds(&consensus.calls.lock().unwrap(), b).is_empty());
    }

    #[derive(Debug)]
    struct Fixed(u64);

    impl Clock for Fixed {
        fn now_ms(&self) -> u64 {
            self.0
        }
    }

    #[tokio::test]
    async fn expirations_follow_the_injected_clock() {
        let (repo, consensus, _a, _b) = setup();
        let repo = repo.with_clock(Arc::new(Fixed(1_000)));
        let late = MessageOptions { expiration_ms: Some(999) };
        assert!(matches!(repo.pend(&pend_two(), &late).await, Err(RepoError::Expired)));
        assert!(consensus.calls.lock().unwrap().is_empty());
        let fine = MessageOptions { expiration_ms: Some(1_000) };
        assert!(repo.pend(&pend_two(), &fine).await.is_ok());
        repo.cancel(&TrxBlocks { trx_id: TrxId::new("t1").unwrap(), block_ids: vec![id("a1")] }, &fine).await.unwrap();
    }
}

//! A history checker for fault tests: every client operation is recorded with its outcome, peers'
//! storage is snapshotted, and [`History::check`] verifies the safety properties of SPEC section 5
//! that a history and snapshots can show:
//!
//! - no two different transactions hold one revision of a block on any peers (5.1);
//! - every acknowledged commit is on at least a majority of each of its blocks' cluster (5.2: it
//!   survives the loss of any minority);
//! - a commit answered as failed (`StaleFailure`, `consensus-failed`, `bad-request`, `expired`)
//!   whose transaction no other commit attempt may have committed is committed nowhere (5.3, 5.5);
//! - a transaction is at most one revision of a block, on every peer (5.4: nothing applied twice);
//! - `latest` is the newest revision of the log, never decreases between observations, and a
//!   transaction is never both pending and committed on one block (5.6).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use libp2p_identity::PeerId;

use crate::error::{ErrorCode, RepoError, StorageError};
use crate::model::{BlockId, CommitResult, PendResult, TrxId, TrxRev};
use crate::storage::RawStorage;

/// Index of an operation in a [`History`].
pub type OpId = usize;

/// A client operation, as the checker needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOp {
    /// A pend of `trx_id` on `block_ids`.
    Pend {
        /// The transaction.
        trx_id: TrxId,
        /// The blocks its transforms touch.
        block_ids: Vec<BlockId>,
        /// The revision it expects to commit at.
        rev: Option<u64>,
    },
    /// A commit of `trx_id` at `rev` on `block_ids`.
    Commit {
        /// The transaction.
        trx_id: TrxId,
        /// The blocks.
        block_ids: Vec<BlockId>,
        /// The revision.
        rev: u64,
    },
    /// A cancel of `trx_id` on `block_ids`.
    Cancel {
        /// The transaction.
        trx_id: TrxId,
        /// The blocks.
        block_ids: Vec<BlockId>,
    },
}

/// What a client was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No answer (still running, or the client's node crashed): it may or may not have happened.
    Unknown,
    /// Success.
    Success,
    /// A `StaleFailure`: nothing was applied.
    Stale,
    /// An error with this wire code.
    Failed(ErrorCode),
}

impl Outcome {
    /// The outcome of a repo error.
    pub fn of_error(e: &RepoError) -> Self {
        Self::Failed(e.code())
    }

    /// True when the answer guarantees the operation was not applied.
    pub fn not_applied(&self) -> bool {
        matches!(
            self,
            Self::Stale
                | Self::Failed(
                    ErrorCode::ConsensusFailed | ErrorCode::BadRequest | ErrorCode::Expired | ErrorCode::Busy
                )
        )
    }
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpRecord {
    /// Who ran it (a free label: client or coordinator name).
    pub client: String,
    /// The operation.
    pub op: ClientOp,
    /// Its answer.
    pub outcome: Outcome,
}

/// One block as stored on one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockSnapshot {
    /// The newest committed revision.
    pub latest: Option<TrxRev>,
    /// The whole revision log, ascending.
    pub revisions: Vec<TrxRev>,
    /// Transactions pending on the block.
    pub pending: Vec<TrxId>,
}

/// Some blocks as stored on one peer at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSnapshot {
    /// The peer.
    pub peer: PeerId,
    /// The blocks, by id.
    pub blocks: BTreeMap<BlockId, BlockSnapshot>,
}

/// Reads `block_ids` from a peer's storage.
pub async fn snapshot(
    peer: PeerId,
    storage: &dyn RawStorage,
    block_ids: &[BlockId],
) -> Result<NodeSnapshot, StorageError> {
    let mut blocks = BTreeMap::new();
    for block_id in block_ids {
        let block = BlockSnapshot {
            latest: storage.latest(block_id).await?,
            revisions: storage.revisions(block_id, 0, u64::MAX).await?,
            pending: storage.pending_trx_ids(block_id).await?,
        };
        blocks.insert(block_id.clone(), block);
    }
    Ok(NodeSnapshot { peer, blocks })
}

/// A broken safety property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Two transactions hold one revision of a block (on one or several peers).
    ConflictingRevision {
        /// The block.
        block_id: BlockId,
        /// The revision.
        rev: u64,
        /// Which peer has which transaction there.
        holders: Vec<(PeerId, TrxId)>,
    },
    /// An acknowledged commit is on fewer than a majority of a block's cluster.
    LostCommit {
        /// The block.
        block_id: BlockId,
        /// The transaction.
        trx_id: TrxId,
        /// Its revision.
        rev: u64,
        /// How many cluster peers have it.
        found: usize,
        /// How many must.
        needed: usize,
    },
    /// A commit answered as not applied is committed somewhere.
    CommittedAfterFailure {
        /// The peer.
        peer: PeerId,
        /// The block.
        block_id: BlockId,
        /// The transaction.
        trx_id: TrxId,
        /// What the client was answered.
        outcome: Outcome,
    },
    /// A transaction is at two revisions of one block.
    AppliedTwice {
        /// The block.
        block_id: BlockId,
        /// The transaction.
        trx_id: TrxId,
        /// The revisions, with the peers holding them.
        revs: Vec<(PeerId, u64)>,
    },
    /// A transaction is both pending and committed on a block of a peer.
    PendingAndCommitted {
        /// The peer.
        peer: PeerId,
        /// The block.
        block_id: BlockId,
        /// The transaction.
        trx_id: TrxId,
    },
    /// `latest` is not the newest entry of the revision log.
    LatestMismatch {
        /// The peer.
        peer: PeerId,
        /// The block.
        block_id: BlockId,
    },
    /// `latest.rev` went down between two observations.
    LatestDecreased {
        /// The peer.
        peer: PeerId,
        /// The block.
        block_id: BlockId,
        /// The earlier revision.
        from: u64,
        /// The later one.
        to: u64,
    },
}

/// The recorded operations of a test, and what was observed of `latest` over time.
#[derive(Debug, Default)]
pub struct History {
    ops: Mutex<Vec<OpRecord>>,
    latest_seen: Mutex<BTreeMap<(PeerId, BlockId), u64>>,
    observed: Mutex<Vec<Violation>>,
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that `client` starts `op`; its outcome is [`Outcome::Unknown`] until completed.
    pub fn invoke(&self, client: impl Into<String>, op: ClientOp) -> OpId {
        let mut ops = Self::lock(&self.ops);
        ops.push(OpRecord { client: client.into(), op, outcome: Outcome::Unknown });
        ops.len() - 1
    }

    /// Records the answer to operation `id`. An unknown id is ignored.
    pub fn complete(&self, id: OpId, outcome: Outcome) {
        if let Some(record) = Self::lock(&self.ops).get_mut(id) {
            record.outcome = outcome;
        }
    }

    /// Records the answer to a pend.
    pub fn complete_pend(&self, id: OpId, result: &Result<PendResult, RepoError>) {
        self.complete(
            id,
            match result {
                Ok(PendResult::Success(_)) => Outcome::Success,
                Ok(PendResult::Stale(_)) => Outcome::Stale,
                Err(e) => Outcome::of_error(e),
            },
        );
    }

    /// Records the answer to a commit.
    pub fn complete_commit(&self, id: OpId, result: &Result<CommitResult, RepoError>) {
        self.complete(
            id,
            match result {
                Ok(CommitResult::Success(_)) => Outcome::Success,
                Ok(CommitResult::Stale(_)) => Outcome::Stale,
                Err(e) => Outcome::of_error(e),
            },
        );
    }

    /// Records the answer to a cancel.
    pub fn complete_cancel(&self, id: OpId, result: &Result<(), RepoError>) {
        self.complete(id, result.as_ref().map_or_else(Outcome::of_error, |()| Outcome::Success));
    }

    /// Every operation recorded so far, in invocation order.
    pub fn ops(&self) -> Vec<OpRecord> {
        Self::lock(&self.ops).clone()
    }

    /// Records a snapshot's `latest` revisions, noting any that went down since the last
    /// observation of the same peer and block (reported by [`History::check`]).
    pub fn observe(&self, snapshot: &NodeSnapshot) {
        let mut seen = Self::lock(&self.latest_seen);
        for (block_id, block) in &snapshot.blocks {
            let Some(rev) = block.latest.as_ref().map(|l| l.rev) else {
                continue;
            };
            let key = (snapshot.peer, block_id.clone());
            if let Some(before) = seen.get(&key).copied()
                && rev < before
            {
                Self::lock(&self.observed).push(Violation::LatestDecreased {
                    peer: snapshot.peer,
                    block_id: block_id.clone(),
                    from: before,
                    to: rev,
                });
            }
            seen.insert(key, rev);
        }
    }

    /// Checks the recorded operations against final snapshots of every peer (see the module
    /// documentation). `cluster_of` gives each block's cluster; the snapshots are also
    /// [observed](History::observe). Returns every violation found.
    pub fn check(
        &self,
        snapshots: &[NodeSnapshot],
        cluster_of: &dyn Fn(&BlockId) -> Vec<PeerId>,
    ) -> Result<(), Vec<Violation>> {
        for snapshot in snapshots {
            self.observe(snapshot);
        }
        let mut violations = Self::lock(&self.observed).clone();
        check_snapshots(snapshots, &mut violations);
        self.check_commits(snapshots, cluster_of, &mut violations);
        if violations.is_empty() { Ok(()) } else { Err(violations) }
    }

    fn check_commits(
        &self,
        snapshots: &[NodeSnapshot],
        cluster_of: &dyn Fn(&BlockId) -> Vec<PeerId>,
        violations: &mut Vec<Violation>,
    ) {
        let ops = self.ops();
        // Transactions that some commit attempt may have committed.
        let maybe_committed: BTreeSet<&TrxId> = ops
            .iter()
            .filter_map(|r| match &r.op {
                ClientOp::Commit { trx_id, .. } if !r.outcome.not_applied() => Some(trx_id),
                _ => None,
            })
            .collect();
        for record in &ops {
            let ClientOp::Commit { trx_id, block_ids, rev } = &record.op else {
                continue;
            };
            if record.outcome == Outcome::Success {
                for block_id in block_ids {
                    let cluster = cluster_of(block_id);
                    let needed = cluster.len() / 2 + 1;
                    let found = snapshots
                        .iter()
                        .filter(|s| cluster.contains(&s.peer))
                        .filter(|s| {
                            s.blocks
                                .get(block_id)
                                .is_some_and(|b| b.revisions.iter().any(|r| r.rev == *rev && r.trx_id == *trx_id))
                        })
                        .count();
                    if found < needed {
                        violations.push(Violation::LostCommit {
                            block_id: block_id.clone(),
                            trx_id: trx_id.clone(),
                            rev: *rev,
                            found,
                            needed,
                        });
                    }
                }
            } else if record.outcome.not_applied() && !maybe_committed.contains(trx_id) {
                for snapshot in snapshots {
                    for block_id in block_ids {
                        let committed = snapshot
                            .blocks
                            .get(block_id)
                            .is_some_and(|b| b.revisions.iter().any(|r| r.trx_id == *trx_id));
                        if committed {
                            violations.push(Violation::CommittedAfterFailure {
                                peer: snapshot.peer,
                                block_id: block_id.clone(),
                                trx_id: trx_id.clone(),
                                outcome: record.outcome.clone(),
                            });
                        }
                    }
                }
            }
        }
    }
}

/// The properties visible in snapshots alone.
fn check_snapshots(snapshots: &[NodeSnapshot], violations: &mut Vec<Violation>) {
    let mut by_rev: BTreeMap<(&BlockId, u64), BTreeMap<PeerId, &TrxId>> = BTreeMap::new();
    let mut by_trx: BTreeMap<(&BlockId, &TrxId), BTreeSet<(PeerId, u64)>> = BTreeMap::new();
    for snapshot in snapshots {
        for (block_id, block) in &snapshot.blocks {
            if block.latest.as_ref() != block.revisions.last() {
                violations.push(Violation::LatestMismatch { peer: snapshot.peer, block_id: block_id.clone() });
            }
            for entry in &block.revisions {
                by_rev.entry((block_id, entry.rev)).or_default().insert(snapshot.peer, &entry.trx_id);
                by_trx.entry((block_id, &entry.trx_id)).or_default().insert((snapshot.peer, entry.rev));
                if block.pending.contains(&entry.trx_id) {
                    violations.push(Violation::PendingAndCommitted {
                        peer: snapshot.peer,
                        block_id: block_id.clone(),
                        trx_id: entry.trx_id.clone(),
                    });
                }
            }
        }
    }
    for ((block_id, rev), holders) in by_rev {
        let distinct: BTreeSet<&&TrxId> = holders.values().collect();
        if distinct.len() > 1 {
            violations.push(Violation::ConflictingRevision {
                block_id: block_id.clone(),
                rev,
                holders: holders.into_iter().map(|(p, t)| (p, t.clone())).collect(),
            });
        }
    }
    for ((block_id, trx_id), revs) in by_trx {
        let distinct: BTreeSet<u64> = revs.iter().map(|(_, r)| *r).collect();
        let twice_on_a_peer = revs.len() > revs.iter().map(|(p, _)| *p).collect::<BTreeSet<_>>().len();
        if distinct.len() > 1 || twice_on_a_peer {
            violations.push(Violation::AppliedTwice {
                block_id: block_id.clone(),
                trx_id: trx_id.clone(),
                revs: revs.into_iter().collect(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    fn b(s: &str) -> BlockId {
        BlockId::new(s).unwrap()
    }

    fn t(s: &str) -> TrxId {
        TrxId::new(s).unwrap()
    }

    fn rev(trx: &str, rev: u64) -> TrxRev {
        TrxRev { trx_id: t(trx), rev }
    }

    fn node(peer: PeerId, revs: &[(&str, u64)], pending: &[&str]) -> NodeSnapshot {
        let revisions: Vec<TrxRev> = revs.iter().map(|(trx, r)| rev(trx, *r)).collect();
        let block = BlockSnapshot {
            latest: revisions.last().cloned(),
            revisions,
            pending: pending.iter().map(|p| t(p)).collect(),
        };
        NodeSnapshot { peer, blocks: BTreeMap::from([(b("x"), block)]) }
    }

    fn commit(trx: &str, r: u64) -> ClientOp {
        ClientOp::Commit { trx_id: t(trx), block_ids: vec![b("x")], rev: r }
    }

    #[test]
    fn a_clean_history_passes() {
        let peers = [PeerId::random(), PeerId::random(), PeerId::random()];
        let history = History::new();
        let id = history.invoke("c1", commit("t1", 1));
        history.complete_commit(id, &Ok(CommitResult::success()));
        let failed = history.invoke("c2", commit("t2", 1));
        history.complete(failed, Outcome::Failed(ErrorCode::ConsensusFailed));
        let snapshots =
            [node(peers[0], &[("t1", 1)], &["t2"]), node(peers[1], &[("t1", 1)], &[]), node(peers[2], &[], &[])];
        history.check(&snapshots, &|_| peers.to_vec()).unwrap();
        assert_eq!(history.ops().len(), 2);
    }

    #[test]
    fn finds_each_violation() {
        let peers = [PeerId::random(), PeerId::random(), PeerId::random()];
        let history = History::new();
        let ok = history.invoke("c1", commit("t1", 1));
        history.complete(ok, Outcome::Success);
        let failed = history.invoke("c2", commit("t2", 1));
        history.complete(failed, Outcome::Stale);
        history.observe(&node(peers[2], &[("t0", 5)], &[]));
        let mut mismatched = node(peers[2], &[("t3", 2), ("t3", 3)], &["t3"]);
        mismatched.blocks.get_mut(&b("x")).unwrap().latest = Some(rev("t3", 2));
        let snapshots = [node(peers[0], &[("t1", 1)], &[]), node(peers[1], &[("t2", 1)], &[]), mismatched];
        let violations = history.check(&snapshots, &|_| peers.to_vec()).unwrap_err();
        let has = |f: &dyn Fn(&Violation) -> bool| violations.iter().any(f);
        assert!(has(&|v| matches!(v, Violation::ConflictingRevision { rev: 1, .. })));
        assert!(has(&|v| matches!(v, Violation::LostCommit { found: 1, needed: 2, .. })));
        assert!(has(&|v| matches!(v, Violation::CommittedAfterFailure { outcome: Outcome::Stale, .. })));
        assert!(has(&|v| matches!(v, Violation::AppliedTwice { .. })));
        assert!(has(&|v| matches!(v, Violation::PendingAndCommitted { .. })));
        assert!(has(&|v| matches!(v, Violation::LatestMismatch { .. })));
        assert!(has(&|v| matches!(v, Violation::LatestDecreased { from: 5, .. })));
    }

    #[test]
    fn a_failed_attempt_retried_successfully_is_not_a_violation() {
        let peers = [PeerId::random()];
        let history = History::new();
        let first = history.invoke("c", commit("t1", 1));
        history.complete(first, Outcome::Failed(ErrorCode::ConsensusFailed));
        let second = history.invoke("c", commit("t1", 1));
        history.complete(second, Outcome::Success);
        history.check(&[node(peers[0], &[("t1", 1)], &[])], &|_| peers.to_vec()).unwrap();
    }

    #[tokio::test]
    async fn snapshots_storage() {
        #[derive(Debug)]
        struct Empty;
        #[async_trait::async_trait]
        impl RawStorage for Empty {
            async fn latest(&self, _: &BlockId) -> Result<Option<TrxRev>, StorageError> {
                Ok(Some(TrxRev { trx_id: TrxId::new("t").unwrap(), rev: 1 }))
            }
            async fn revisions(&self, _: &BlockId, _: u64, _: u64) -> Result<Vec<TrxRev>, StorageError> {
                Ok(vec![TrxRev { trx_id: TrxId::new("t").unwrap(), rev: 1 }])
            }
            async fn revision_at_or_before(&self, _: &BlockId, _: u64) -> Result<Option<TrxRev>, StorageError> {
                Ok(None)
            }
            async fn committed(
                &self,
                _: &BlockId,
                _: &TrxId,
            ) -> Result<Option<crate::storage::CommittedTransform>, StorageError> {
                Ok(None)
            }
            async fn pending(&self, _: &BlockId, _: &TrxId) -> Result<Option<crate::model::Transform>, StorageError> {
                Ok(None)
            }
            async fn pending_trx_ids(&self, _: &BlockId) -> Result<Vec<TrxId>, StorageError> {
                Ok(vec![])
            }
            async fn save_pending(
                &self,
                _: &BlockId,
                _: &TrxId,
                _: &crate::model::Transform,
            ) -> Result<(), StorageError> {
                Ok(())
            }
            async fn delete_pending(&self, _: &BlockId, _: &TrxId) -> Result<(), StorageError> {
                Ok(())
            }
            async fn materialized(
                &self,
                _: &BlockId,
                _: u64,
            ) -> Result<Option<crate::storage::BlockValue>, StorageError> {
                Ok(None)
            }
            async fn commit_block(&self, _: &BlockId, _: &crate::storage::BlockCommit) -> Result<(), StorageError> {
                Ok(())
            }
            async fn get_meta(&self, _: &str) -> Result<Option<Vec<u8>>, StorageError> {
                Ok(None)
            }
            async fn put_meta(&self, _: &str, _: &[u8]) -> Result<(), StorageError> {
                Ok(())
            }
            async fn delete_meta(&self, _: &str) -> Result<(), StorageError> {
                Ok(())
            }
            async fn list_meta(&self, _: &str, _: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
                Ok(vec![])
            }
            fn durable(&self) -> bool {
                false
            }
            async fn block_ids(&self, _: Option<&BlockId>, _: usize) -> Result<Vec<BlockId>, StorageError> {
                Ok(vec![])
            }
            async fn close(&self) -> Result<(), StorageError> {
                Ok(())
            }
        }
        let peer = PeerId::random();
        let snap = snapshot(peer, &Empty, &[b("x")]).await.unwrap();
        assert_eq!(snap.blocks[&b("x")].revisions, vec![rev("t", 1)]);
        assert_eq!(snap.blocks[&b("x")].latest, Some(rev("t", 1)));
    }
}

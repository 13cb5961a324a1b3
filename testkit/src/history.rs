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
//!   transaction is never both pending and committed on one block (5.6);
//! - replicas hold only committed states (5.7): in every snapshot, the revision log of a block is
//!   exactly `1..=latest` (no gap: revisions are contiguous, SPEC 2 item 7) and the stored value at
//!   `latest` equals the fold of the peer's committed transforms in revision order; every value a
//!   read returned is the value of a committed revision, plus, with a read context, the reader's
//!   own asserted or pending transforms; a read without a context whose answer names `latest`
//!   returned exactly the value of that revision (never a mixture);
//! - with [`History::check_converged`], after writes stopped and catch-up ran (5.7): every live
//!   member of a block's cluster has the same `latest` and the same value;
//! - with [`check_evidence`] (SPEC 4.10): every revision a peer keeps evidence for is proven by
//!   it: both decided records verify, are decided by a majority of the cluster, and carry this
//!   revision's transaction and transform, whether the record carried that operation alone or in
//!   a batch of several (SPEC 4.14).
//!
//! Snapshots given to [`History::observe`] during a run are checked against the per-snapshot
//! properties too (5.6, 5.7 "at every moment"), and reported by the next [`History::check`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use libp2p_identity::PeerId;

use optimystic_core::error::{ErrorCode, RepoError, StorageError};
use optimystic_core::model::{BlockId, CommitResult, PendResult, Transform, TrxId, TrxRev};
use optimystic_core::storage::{BlockValue, CommittedTransform, RawStorage};

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
    /// When it was invoked, on the history's logical clock (invocations and completions tick it).
    pub invoked_at: u64,
    /// When its answer was recorded, on the same clock; `None` while unknown.
    pub completed_at: Option<u64>,
}

/// One read of one block, as the checker needs to know it (SPEC 5.7: a read returns the value of
/// some committed revision, plus, with a context, the reader's own asserted or pending trxs).
#[derive(Debug, Clone, PartialEq)]
pub struct ReadRecord {
    /// Who read (a free label).
    pub client: String,
    /// The block.
    pub block_id: BlockId,
    /// The transforms of the trxs the read context reported committed (`TrxContext.committed`),
    /// by ascending revision: the answer may include them on top of a committed revision.
    pub asserted: Vec<(TrxRev, Transform)>,
    /// The transform of the context's own pending trx (`TrxContext.trxId`), which the answer
    /// includes on top.
    pub own: Option<Transform>,
    /// Whether the read was a quorum read (it must not miss a commit acknowledged before it began).
    pub quorum: bool,
    /// When it was invoked, on the history's logical clock.
    pub invoked_at: u64,
    /// The `latest` the answer reported.
    pub latest: Option<TrxRev>,
    /// The value the answer returned.
    pub value: BlockValue,
}

/// One block as stored on one peer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockSnapshot {
    /// The newest committed revision.
    pub latest: Option<TrxRev>,
    /// The whole revision log, ascending.
    pub revisions: Vec<TrxRev>,
    /// Transactions pending on the block.
    pub pending: Vec<TrxId>,
    /// The materialized value stored at `latest` (`None` when there is no `latest`, or when the
    /// storage keeps no value there, which is itself a violation).
    pub value: Option<BlockValue>,
    /// The committed transform of each transaction of the revision log (a missing one is a
    /// violation).
    pub committed: BTreeMap<TrxId, CommittedTransform>,
}

/// Some blocks as stored on one peer at one moment.
#[derive(Debug, Clone, PartialEq)]
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
        let latest = storage.latest(block_id).await?;
        let revisions = storage.revisions(block_id, 0, u64::MAX).await?;
        let value = match &latest {
            Some(l) => storage.materialized(block_id, l.rev).await?,
            None => None,
        };
        let mut committed = BTreeMap::new();
        for entry in &revisions {
            if let Some(c) = storage.committed(block_id, &entry.trx_id).await? {
                committed.insert(entry.trx_id.clone(), c);
            }
        }
        let pending = storage.pending_trx_ids(block_id).await?;
        blocks.insert(block_id.clone(), BlockSnapshot { latest, revisions, pending, value, committed });
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
    /// The revision log is not exactly `1..=latest`: a revision was applied on a base other than
    /// the one before it (SPEC 2 item 7).
    RevisionGap {
        /// The peer.
        peer: PeerId,
        /// The block.
        block_id: BlockId,
        /// The revisions of the log, ascending.
        revs: Vec<u64>,
    },
    /// The stored value at `latest` is not the fold of the peer's committed transforms in revision
    /// order (or a committed transform is missing or does not apply).
    ValueMismatch {
        /// The peer.
        peer: PeerId,
        /// The block.
        block_id: BlockId,
        /// The revision.
        rev: u64,
        /// What was found wrong (both values, as JSON).
        detail: String,
    },
    /// After quiescence, live members of a block's cluster differ in `latest` or value.
    Diverged {
        /// The block.
        block_id: BlockId,
        /// Each live member's `latest` and value (as JSON).
        states: Vec<(PeerId, Option<TrxRev>, String)>,
    },
    /// A read returned a value that is no committed revision of the block (plus the reader's own
    /// context), or a mixture.
    ImpossibleRead {
        /// The reader.
        client: String,
        /// The block.
        block_id: BlockId,
        /// The `latest` the answer reported.
        latest: Option<TrxRev>,
        /// The value returned (as JSON).
        value: String,
        /// Why it is impossible.
        detail: String,
    },
    /// A quorum read missed a commit acknowledged to a client before the read began.
    StaleQuorumRead {
        /// The reader.
        client: String,
        /// The block.
        block_id: BlockId,
        /// The revision the read answered (0 when none).
        read_rev: u64,
        /// The acknowledged commit it missed.
        trx_id: TrxId,
        /// Its revision.
        rev: u64,
    },
    /// The evidence a peer keeps for a revision does not prove it (SPEC 4.10).
    BadEvidence {
        /// The peer.
        peer: PeerId,
        /// The block.
        block_id: BlockId,
        /// The revision.
        rev: u64,
        /// Why.
        detail: String,
    },
}

/// Checks the evidence `local` (the storage of `peer`) keeps for every committed revision of
/// `block_ids` against `cluster`, the blocks' cluster: each kept evidence must prove its revision
/// ([`optimystic_core::evidence::verify`]: both records verify and are decided, and name this
/// revision's transaction and transform, alone or among the operations of a batched record;
/// evidence still short of its execution proof, a provisional revision, is not a violation). A revision without evidence (applied by quorum agreement, or written
/// outside a cluster) is not a violation.
pub async fn check_evidence(
    peer: PeerId,
    local: &optimystic_core::repo::StorageRepo,
    block_ids: &[BlockId],
    cluster: &[PeerId],
) -> Result<Vec<Violation>, RepoError> {
    let mut violations = Vec::new();
    for block_id in block_ids {
        for entry in local.storage().revisions(block_id, 0, u64::MAX).await? {
            let Some(evidence) = local.evidence(block_id, entry.rev).await? else { continue };
            let detail = match local.storage().committed(block_id, &entry.trx_id).await? {
                None => Some("no committed transform".to_owned()),
                Some(committed) => {
                    match optimystic_core::evidence::verify(
                        Some(&evidence),
                        block_id,
                        &entry,
                        &committed.transform,
                        cluster,
                    ) {
                        Ok(_) | Err(optimystic_core::evidence::EvidenceError::Unproven { .. }) => None,
                        Err(e) => Some(e.to_string()),
                    }
                }
            };
            if let Some(detail) = detail {
                violations.push(Violation::BadEvidence { peer, block_id: block_id.clone(), rev: entry.rev, detail });
            }
        }
    }
    Ok(violations)
}

fn show(value: &BlockValue) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("<unencodable: {e}>"))
}

/// The recorded operations of a test, and what was observed of `latest` over time.
#[derive(Debug, Default)]
pub struct History {
    ops: Mutex<Vec<OpRecord>>,
    reads: Mutex<Vec<ReadRecord>>,
    clock: std::sync::atomic::AtomicU64,
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

    /// The next tick of the history's logical clock.
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    /// Records that `client` starts `op`; its outcome is [`Outcome::Unknown`] until completed.
    pub fn invoke(&self, client: impl Into<String>, op: ClientOp) -> OpId {
        let invoked_at = self.tick();
        let mut ops = Self::lock(&self.ops);
        ops.push(OpRecord { client: client.into(), op, outcome: Outcome::Unknown, invoked_at, completed_at: None });
        ops.len() - 1
    }

    /// Records the answer to operation `id`. An unknown id is ignored.
    pub fn complete(&self, id: OpId, outcome: Outcome) {
        let completed_at = self.tick();
        if let Some(record) = Self::lock(&self.ops).get_mut(id) {
            record.outcome = outcome;
            record.completed_at = Some(completed_at);
        }
    }

    /// Records a read's answer (see [`ReadRecord`]; take `invoked_at` from [`History::tick`] when
    /// the read starts).
    pub fn read(&self, record: ReadRecord) {
        Self::lock(&self.reads).push(record);
    }

    /// Every read recorded so far.
    pub fn reads(&self) -> Vec<ReadRecord> {
        Self::lock(&self.reads).clone()
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
    /// observation of the same peer and block, and checks the snapshot's own consistency (no
    /// revision gap, the stored value is the fold of the committed transforms, nothing both pending
    /// and committed); what it finds is reported by [`History::check`].
    pub fn observe(&self, snapshot: &NodeSnapshot) {
        let mut found = Vec::new();
        check_node(snapshot, &mut found);
        if !found.is_empty() {
            let mut observed = Self::lock(&self.observed);
            for violation in found {
                if !observed.contains(&violation) {
                    observed.push(violation);
                }
            }
        }
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
        self.check_reads(snapshots, &mut violations);
        if violations.is_empty() { Ok(()) } else { Err(violations) }
    }

    /// [`History::check`], plus convergence (SPEC 5.7), for snapshots taken after writes stopped
    /// and catch-up ran: every peer of a block's cluster for which `live` holds has the same
    /// `latest` and the same value.
    pub fn check_converged(
        &self,
        snapshots: &[NodeSnapshot],
        cluster_of: &dyn Fn(&BlockId) -> Vec<PeerId>,
        live: &dyn Fn(&PeerId) -> bool,
    ) -> Result<(), Vec<Violation>> {
        let mut violations = match self.check(snapshots, cluster_of) {
            Ok(()) => Vec::new(),
            Err(violations) => violations,
        };
        let block_ids: BTreeSet<&BlockId> = snapshots.iter().flat_map(|s| s.blocks.keys()).collect();
        for block_id in block_ids {
            let cluster = cluster_of(block_id);
            let states: Vec<(PeerId, Option<TrxRev>, String)> = snapshots
                .iter()
                .filter(|s| cluster.contains(&s.peer) && live(&s.peer))
                .map(|s| {
                    let block = s.blocks.get(block_id).cloned().unwrap_or_default();
                    (s.peer, block.latest, show(&block.value.flatten()))
                })
                .collect();
            let diverged = states.first().is_some_and(|(_, latest, value)| {
                states.iter().any(|(_, other_latest, other_value)| other_latest != latest || other_value != value)
            });
            if diverged {
                violations.push(Violation::Diverged { block_id: block_id.clone(), states });
            }
        }
        if violations.is_empty() { Ok(()) } else { Err(violations) }
    }

    /// SPEC 5.7: every read returned a committed revision's value (plus its own context).
    fn check_reads(&self, snapshots: &[NodeSnapshot], violations: &mut Vec<Violation>) {
        let reads = self.reads();
        if reads.is_empty() {
            return;
        }
        let ops = self.ops();
        let mut chains: BTreeMap<BlockId, Vec<(TrxRev, BlockValue)>> = BTreeMap::new();
        for read in reads {
            let chain =
                chains.entry(read.block_id.clone()).or_insert_with(|| committed_chain(snapshots, &read.block_id));
            if let Some(violation) = check_read(&read, chain) {
                violations.push(violation);
            }
            if read.quorum {
                let read_rev = read.latest.as_ref().map_or(0, |l| l.rev);
                for op in &ops {
                    let ClientOp::Commit { trx_id, block_ids, rev } = &op.op else { continue };
                    let acknowledged_before =
                        op.outcome == Outcome::Success && op.completed_at.is_some_and(|t| t < read.invoked_at);
                    if acknowledged_before && block_ids.contains(&read.block_id) && *rev > read_rev {
                        violations.push(Violation::StaleQuorumRead {
                            client: read.client.clone(),
                            block_id: read.block_id.clone(),
                            read_rev,
                            trx_id: trx_id.clone(),
                            rev: *rev,
                        });
                    }
                }
            }
        }
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

/// The properties of one peer's snapshot alone: `latest` ends the log, nothing is both pending
/// and committed, the log is exactly `1..=latest`, and the stored value at `latest` is the fold of
/// the committed transforms.
fn check_node(snapshot: &NodeSnapshot, violations: &mut Vec<Violation>) {
    let peer = snapshot.peer;
    for (block_id, block) in &snapshot.blocks {
        if block.latest.as_ref() != block.revisions.last() {
            violations.push(Violation::LatestMismatch { peer, block_id: block_id.clone() });
        }
        for entry in &block.revisions {
            if block.pending.contains(&entry.trx_id) {
                violations.push(Violation::PendingAndCommitted {
                    peer,
                    block_id: block_id.clone(),
                    trx_id: entry.trx_id.clone(),
                });
            }
        }
        let contiguous = block.revisions.iter().zip(1u64..).all(|(entry, expected)| entry.rev == expected);
        if !contiguous {
            violations.push(Violation::RevisionGap {
                peer,
                block_id: block_id.clone(),
                revs: block.revisions.iter().map(|r| r.rev).collect(),
            });
            continue;
        }
        let Some(latest) = &block.latest else { continue };
        let mismatch =
            |detail: String| Violation::ValueMismatch { peer, block_id: block_id.clone(), rev: latest.rev, detail };
        let mut folded: BlockValue = None;
        let mut broken = None;
        for entry in &block.revisions {
            match block.committed.get(&entry.trx_id) {
                None => {
                    broken = Some(format!("revision {} names {} with no committed transform", entry.rev, entry.trx_id));
                    break;
                }
                Some(c) if c.rev != entry.rev => {
                    broken = Some(format!(
                        "revision {} names {}, whose committed transform says revision {}",
                        entry.rev, entry.trx_id, c.rev
                    ));
                    break;
                }
                Some(c) => match c.transform.apply(folded.as_ref(), block_id) {
                    Ok(next) => folded = next,
                    Err(e) => {
                        broken =
                            Some(format!("the transform of revision {} does not apply to the fold: {e}", entry.rev));
                        break;
                    }
                },
            }
        }
        if let Some(detail) = broken {
            violations.push(mismatch(detail));
            continue;
        }
        match &block.value {
            None => violations.push(mismatch(format!("no value is stored at latest; the fold is {}", show(&folded)))),
            Some(stored) if *stored != folded => {
                violations.push(mismatch(format!("stored {} but the fold is {}", show(stored), show(&folded))));
            }
            Some(_) => {}
        }
    }
}

/// The committed history of a block as the peers hold it: revision `r` (1, 2, ...) with its trx and
/// the value after it, up to the first revision no snapshot has (or whose transform is missing or
/// does not apply). Where peers disagree on a revision the first peer's wins (the disagreement
/// itself is reported as [`Violation::ConflictingRevision`]).
fn committed_chain(snapshots: &[NodeSnapshot], block_id: &BlockId) -> Vec<(TrxRev, BlockValue)> {
    let mut by_rev: BTreeMap<u64, (&TrxId, &Transform)> = BTreeMap::new();
    for snapshot in snapshots {
        let Some(block) = snapshot.blocks.get(block_id) else { continue };
        for entry in &block.revisions {
            if let Some(c) = block.committed.get(&entry.trx_id).filter(|c| c.rev == entry.rev) {
                by_rev.entry(entry.rev).or_insert((&entry.trx_id, &c.transform));
            }
        }
    }
    let mut chain = Vec::new();
    let mut value: BlockValue = None;
    for (rev, (trx_id, transform)) in by_rev {
        if rev != chain.len() as u64 + 1 {
            break;
        }
        match transform.apply(value.as_ref(), block_id) {
            Ok(next) => value = next,
            Err(_) => break,
        }
        chain.push((TrxRev { trx_id: trx_id.clone(), rev }, value.clone()));
    }
    chain
}

/// Applies `transform` to `value`, or `None` if it does not apply.
fn applied(value: &BlockValue, transform: &Transform, block_id: &BlockId) -> Option<BlockValue> {
    transform.apply(value.as_ref(), block_id).ok()
}

/// Most asserted transforms whose subsets are tried (beyond, only prefixes are).
const MAX_ASSERTED_SUBSETS: usize = 8;

/// Whether a read's answer is a committed revision's value plus its own context.
fn check_read(read: &ReadRecord, chain: &[(TrxRev, BlockValue)]) -> Option<Violation> {
    let impossible = |detail: String| Violation::ImpossibleRead {
        client: read.client.clone(),
        block_id: read.block_id.clone(),
        latest: read.latest.clone(),
        value: show(&read.value),
        detail,
    };
    if read.asserted.is_empty() && read.own.is_none() {
        // A plain read: exactly the value of the revision it names.
        return match &read.latest {
            None if read.value.is_none() => None,
            None => Some(impossible("no latest, yet a value".into())),
            Some(latest) => match latest.rev.checked_sub(1).and_then(|i| chain.get(usize::try_from(i).ok()?)) {
                Some((entry, value)) if entry == latest && *value == read.value => None,
                Some((entry, value)) if entry == latest => {
                    Some(impossible(format!("revision {} has the value {}", latest.rev, show(value))))
                }
                Some((entry, _)) => {
                    Some(impossible(format!("revision {} is {} in the committed history", latest.rev, entry.trx_id)))
                }
                None => Some(impossible(format!("no committed history reaches revision {}", latest.rev))),
            },
        };
    }
    let mut bases: Vec<BlockValue> = vec![None];
    bases.extend(chain.iter().map(|(_, v)| v.clone()));
    let n = read.asserted.len();
    let subsets: Vec<Vec<usize>> = if n <= MAX_ASSERTED_SUBSETS {
        (0u32..(1u32 << n)).map(|mask| (0..n).filter(|i| mask & (1 << i) != 0).collect()).collect()
    } else {
        (0..=n).map(|k| (0..k).collect()).collect()
    };
    for base in &bases {
        for subset in &subsets {
            let mut value = Some(base.clone());
            for i in subset {
                let transform = read.asserted.get(*i).map(|(_, t)| t);
                value = value.and_then(|v| transform.and_then(|t| applied(&v, t, &read.block_id)));
            }
            let Some(value) = value else { continue };
            if value == read.value {
                return None;
            }
            if let Some(own) = &read.own
                && applied(&value, own, &read.block_id).as_ref() == Some(&read.value)
            {
                return None;
            }
        }
    }
    Some(impossible(format!(
        "no committed revision (of {}), with or without the reader's context, has this value",
        chain.len()
    )))
}

/// The properties visible in snapshots alone.
fn check_snapshots(snapshots: &[NodeSnapshot], violations: &mut Vec<Violation>) {
    let mut by_rev: BTreeMap<(&BlockId, u64), BTreeMap<PeerId, &TrxId>> = BTreeMap::new();
    let mut by_trx: BTreeMap<(&BlockId, &TrxId), BTreeSet<(PeerId, u64)>> = BTreeMap::new();
    for snapshot in snapshots {
        for violation in {
            let mut found = Vec::new();
            check_node(snapshot, &mut found);
            found
        } {
            if !violations.contains(&violation) {
                violations.push(violation);
            }
        }
        for (block_id, block) in &snapshot.blocks {
            for entry in &block.revisions {
                by_rev.entry((block_id, entry.rev)).or_default().insert(snapshot.peer, &entry.trx_id);
                by_trx.entry((block_id, &entry.trx_id)).or_default().insert((snapshot.peer, entry.rev));
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

    use serde_json::json;

    use super::*;
    use optimystic_core::model::{Block, BlockOperation};

    fn b(s: &str) -> BlockId {
        BlockId::new(s).unwrap()
    }

    fn t(s: &str) -> TrxId {
        TrxId::new(s).unwrap()
    }

    fn rev(trx: &str, rev: u64) -> TrxRev {
        TrxRev { trx_id: t(trx), rev }
    }

    /// Revision 1 inserts `x` with `v` = its trx; later ones set `v` to their trx.
    fn transform_of(trx: &str, r: u64) -> Transform {
        if r == 1 {
            Transform { insert: Some(Block::new(b("x"), "t", "c").with_field("v", json!(trx))), ..Transform::default() }
        } else {
            Transform { updates: Some(vec![BlockOperation::set("v", json!(trx))]), ..Transform::default() }
        }
    }

    fn value_of(trx: &str) -> BlockValue {
        Some(Block::new(b("x"), "t", "c").with_field("v", json!(trx)))
    }

    fn node(peer: PeerId, revs: &[(&str, u64)], pending: &[&str]) -> NodeSnapshot {
        let revisions: Vec<TrxRev> = revs.iter().map(|(trx, r)| rev(trx, *r)).collect();
        let committed = revs
            .iter()
            .map(|(trx, r)| (t(trx), CommittedTransform { rev: *r, transform: transform_of(trx, *r) }))
            .collect();
        let block = BlockSnapshot {
            latest: revisions.last().cloned(),
            value: revs.last().map(|(trx, _)| value_of(trx)),
            revisions,
            pending: pending.iter().map(|p| t(p)).collect(),
            committed,
        };
        NodeSnapshot { peer, blocks: BTreeMap::from([(b("x"), block)]) }
    }

    fn read(client: &str, latest: Option<(&str, u64)>, value: BlockValue, invoked_at: u64) -> ReadRecord {
        ReadRecord {
            client: client.into(),
            block_id: b("x"),
            asserted: vec![],
            own: None,
            quorum: false,
            invoked_at,
            latest: latest.map(|(trx, r)| rev(trx, r)),
            value,
        }
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

    #[test]
    fn finds_gaps_and_values_that_are_not_the_fold() {
        let peers = [PeerId::random(), PeerId::random()];
        let history = History::new();
        // Revision 2 is missing: 3 was applied on a base other than 2.
        let gap = node(peers[0], &[("t1", 1), ("t3", 3)], &[]);
        // The stored value is not the fold of the committed transforms.
        let mut wrong = node(peers[1], &[("t1", 1), ("t2", 2)], &[]);
        wrong.blocks.get_mut(&b("x")).unwrap().value = Some(value_of("t9"));
        let violations = history.check(&[gap, wrong.clone()], &|_| peers.to_vec()).unwrap_err();
        assert!(
            violations.iter().any(|v| matches!(v, Violation::RevisionGap { revs, .. } if *revs == vec![1, 3])),
            "{violations:?}"
        );
        assert!(violations.iter().any(|v| matches!(v, Violation::ValueMismatch { rev: 2, .. })), "{violations:?}");
        // Observed snapshots are checked too, and reported once.
        let observed = History::new();
        observed.observe(&wrong);
        observed.observe(&wrong);
        let found = observed.check(&[], &|_| peers.to_vec()).unwrap_err();
        assert_eq!(found.len(), 1, "{found:?}");
        // A missing committed transform is a mismatch as well.
        let mut lost = node(peers[0], &[("t1", 1), ("t2", 2)], &[]);
        lost.blocks.get_mut(&b("x")).unwrap().committed.remove(&t("t2"));
        let found = History::new().check(&[lost], &|_| peers.to_vec()).unwrap_err();
        assert!(matches!(found[0], Violation::ValueMismatch { .. }), "{found:?}");
    }

    #[test]
    fn convergence_compares_live_members() {
        let peers = [PeerId::random(), PeerId::random(), PeerId::random()];
        let history = History::new();
        let snapshots = [
            node(peers[0], &[("t1", 1), ("t2", 2)], &[]),
            node(peers[1], &[("t1", 1), ("t2", 2)], &[]),
            node(peers[2], &[("t1", 1)], &[]),
        ];
        let violations = history.check_converged(&snapshots, &|_| peers.to_vec(), &|_| true).unwrap_err();
        assert!(matches!(&violations[..], [Violation::Diverged { states, .. }] if states.len() == 3), "{violations:?}");
        // A member that is down is not required to have converged.
        history.check_converged(&snapshots, &|_| peers.to_vec(), &|p| *p != peers[2]).unwrap();
    }

    #[test]
    fn reads_return_committed_values_plus_their_own_context() {
        let peers = [PeerId::random()];
        let snapshots = [node(peers[0], &[("t1", 1), ("t2", 2)], &[])];
        let history = History::new();
        history.read(read("plain", Some(("t1", 1)), value_of("t1"), 0));
        history.read(read("plain", Some(("t2", 2)), value_of("t2"), 0));
        history.read(read("none", None, None, 0));
        // With a context: an asserted trx (never committed) on top of a committed revision.
        let mut asserted = read("ctx", Some(("t2", 2)), value_of("a3"), 0);
        asserted.asserted = vec![(rev("a3", 3), transform_of("a3", 3))];
        history.read(asserted);
        let mut own = read("own", Some(("t2", 2)), value_of("o"), 0);
        own.own = Some(transform_of("o", 2));
        history.read(own);
        history.check(&snapshots, &|_| peers.to_vec()).unwrap();

        for bad in [
            read("mixture", Some(("t2", 2)), value_of("t1"), 0),
            read("invented", Some(("t9", 2)), value_of("t9"), 0),
            read("future", Some(("t3", 3)), value_of("t3"), 0),
            read("ghost", None, value_of("t1"), 0),
        ] {
            let history = History::new();
            history.read(bad.clone());
            let violations = history.check(&snapshots, &|_| peers.to_vec()).unwrap_err();
            assert!(matches!(&violations[..], [Violation::ImpossibleRead { .. }]), "{bad:?}: {violations:?}");
        }
        let history = History::new();
        let mut context = read("ctx", Some(("t2", 2)), value_of("zz"), 0);
        context.asserted = vec![(rev("a3", 3), transform_of("a3", 3))];
        history.read(context);
        let violations = history.check(&snapshots, &|_| peers.to_vec()).unwrap_err();
        assert!(matches!(&violations[..], [Violation::ImpossibleRead { .. }]), "{violations:?}");
    }

    #[test]
    fn a_quorum_read_sees_every_commit_acknowledged_before_it() {
        let peers = [PeerId::random()];
        let snapshots = [node(peers[0], &[("t1", 1), ("t2", 2)], &[])];
        let history = History::new();
        let id = history.invoke("c", commit("t2", 2));
        let during = history.tick();
        history.complete(id, Outcome::Success);
        let after = history.tick();
        let mut concurrent = read("r1", Some(("t1", 1)), value_of("t1"), during);
        concurrent.quorum = true;
        history.read(concurrent);
        history.check(&snapshots, &|_| peers.to_vec()).unwrap();
        let mut stale = read("r2", Some(("t1", 1)), value_of("t1"), after);
        stale.quorum = true;
        history.read(stale);
        let violations = history.check(&snapshots, &|_| peers.to_vec()).unwrap_err();
        assert!(matches!(&violations[..], [Violation::StaleQuorumRead { rev: 2, read_rev: 1, .. }]), "{violations:?}");
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
            ) -> Result<Option<optimystic_core::storage::CommittedTransform>, StorageError> {
                Ok(None)
            }
            async fn pending(
                &self,
                _: &BlockId,
                _: &TrxId,
            ) -> Result<Option<optimystic_core::model::Transform>, StorageError> {
                Ok(None)
            }
            async fn pending_trx_ids(&self, _: &BlockId) -> Result<Vec<TrxId>, StorageError> {
                Ok(vec![])
            }
            async fn save_pending(
                &self,
                _: &BlockId,
                _: &TrxId,
                _: &optimystic_core::model::Transform,
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
            ) -> Result<Option<optimystic_core::storage::BlockValue>, StorageError> {
                Ok(None)
            }
            async fn commit_block(
                &self,
                _: &BlockId,
                _: &optimystic_core::storage::BlockCommit,
            ) -> Result<(), StorageError> {
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

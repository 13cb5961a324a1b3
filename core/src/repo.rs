//! The block repository: trait [`Repo`] and [`StorageRepo`], SPEC section 2 over a
//! [`RawStorage`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;
use libp2p_identity::PeerId;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::check::Check;
use crate::error::{RepoError, StorageError, TransformError};
use crate::evidence::{self, Evidence, ProvenMark, RecordRef, StoredEvidence, StoredRecord};
use crate::model::{
    Block, BlockGetResult, BlockGets, BlockId, BlockTrxRef, BlockTrxState, CommitRequest, CommitResult,
    GetBlockResults, PendPolicy, PendRequest, PendResult, PendSuccess, StaleFailure, Transform, Transforms, TrxBlocks,
    TrxId, TrxRev, TrxTransforms,
};
use crate::record::ClusterRecord;
use crate::storage::{BlockCommit, BlockValue, MetaWrite, RawStorage, StorageWrite};
use crate::time::now_ms;

/// Options carried with every repo call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageOptions {
    /// Milliseconds since the Unix epoch after which the operation must not start; `None` means
    /// no deadline (local calls).
    pub expiration_ms: Option<u64>,
}

impl MessageOptions {
    /// Options expiring `timeout_ms` from now.
    pub fn expiring_in(timeout_ms: u64) -> Self {
        Self { expiration_ms: Some(now_ms().saturating_add(timeout_ms)) }
    }

    /// Fails with [`RepoError::Expired`] when the expiration has passed.
    pub fn check_expired(&self) -> Result<(), RepoError> {
        match self.expiration_ms {
            Some(exp) if exp < now_ms() => Err(RepoError::Expired),
            _ => Ok(()),
        }
    }
}

/// A block repository: get / pend / cancel / commit of versioned JSON blocks (SPEC section 2).
///
/// Implemented by [`StorageRepo`] (local storage), by the coordinator (a cluster) and by the
/// network client (a remote node); callers cannot tell them apart.
///
/// Errors: a [`RepoError`] whose code is `bad-request` or `expired` guarantees nothing changed;
/// `unavailable` means the outcome is unknown (re-read to find out). A [`StaleFailure`] inside a
/// result is an answer, not an error: the caller re-reads and retries.
#[async_trait]
pub trait Repo: Send + Sync + 'static {
    /// Reads blocks (SPEC 2 get): one entry per distinct id, read at `context.rev` or at `latest`,
    /// after promoting pending transactions the context reports committed. With `context.trxId`
    /// the read includes that pending transaction's writes, and fails with
    /// [`RepoError::PendingNotFound`] if it is not pending on a requested block.
    ///
    /// Idempotent apart from read-driven promotion, which only ever commits what a client reports
    /// committed.
    async fn get(&self, gets: &BlockGets, options: &MessageOptions) -> Result<GetBlockResults, RepoError>;

    /// Pends a transaction's transforms on every block they touch (SPEC 2 pend). Returns a
    /// [`StaleFailure`] when the blocks moved past `request.rev` (with `missing`) or, under policy
    /// `f` / `r`, when other transactions are pending (with `pending`). Pending the same trx with
    /// the same transforms again is a no-op success; with different transforms it is
    /// [`RepoError::TrxConflict`]. Invalid transforms give [`RepoError::InvalidTransform`] and
    /// update or delete of a block never seen give [`RepoError::UnknownBlock`]; nothing changes.
    async fn pend(&self, request: &PendRequest, options: &MessageOptions) -> Result<PendResult, RepoError>;

    /// Deletes the transaction's pending records on the listed blocks. Idempotent: an unknown
    /// transaction is not an error.
    async fn cancel(&self, trx: &TrxBlocks, options: &MessageOptions) -> Result<(), RepoError>;

    /// Commits a pending transaction at `request.rev` on the listed blocks (SPEC 2 commit).
    /// Re-committing the same `{trxId, rev}` is a no-op success. Returns a [`StaleFailure`] with
    /// `missing` when a block is already at or past `rev` with other transactions; fails with
    /// [`RepoError::PendingNotFound`] when the trx is not pending, or
    /// [`RepoError::InvalidTransform`] when a transform no longer applies — in both cases no block
    /// changes.
    async fn commit(&self, request: &CommitRequest, options: &MessageOptions) -> Result<CommitResult, RepoError>;
}

/// Materialized values are kept at `latest` and at the last revision of every window of this many
/// revisions, so a read at any revision replays at most this many transforms.
pub const CHECKPOINT_INTERVAL: u64 = 32;

/// Per-block async locks, taken in sorted id order so concurrent multi-block operations never
/// deadlock. Entries are removed when no one holds or waits for them, so memory stays bounded by
/// the number of blocks in use.
#[derive(Debug, Default)]
struct BlockLocks {
    locks: DashMap<BlockId, Arc<Mutex<()>>>,
}

/// The guards of a set of block locks; released on drop.
struct HeldLocks<'a> {
    owner: &'a BlockLocks,
    held: Vec<(BlockId, OwnedMutexGuard<()>)>,
}

impl BlockLocks {
    async fn lock<'a>(&'a self, ids: impl IntoIterator<Item = &BlockId>) -> HeldLocks<'a> {
        let sorted: BTreeSet<&BlockId> = ids.into_iter().collect();
        let mut held = Vec::with_capacity(sorted.len());
        for id in sorted {
            let mutex = self.locks.entry(id.clone()).or_default().clone();
            held.push((id.clone(), mutex.lock_owned().await));
        }
        HeldLocks { owner: self, held }
    }
}

impl Drop for HeldLocks<'_> {
    fn drop(&mut self) {
        for (id, guard) in self.held.drain(..) {
            drop(guard);
            // Only the map holds it now: nobody waits, drop the entry.
            self.owner.locks.remove_if(&id, |_, m| Arc::strong_count(m) == 1);
        }
    }
}

/// Most committed revisions per block a `StaleFailure`'s `missing` lists: the newest ones (a
/// client far behind re-reads instead; the answer's size and the work to build it stay bounded).
pub const MAX_MISSING_REVISIONS: u64 = 64;

/// Most revisions below `latest` whose kept evidence [`StorageRepo::newest_proven`] inspects.
pub const MAX_PROVEN_SCAN: u64 = 16;

/// What a `get` with a context does with the committed trxs the context reports (SPEC 2 get step
/// 2 and 2.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReadPromotion {
    /// A single node commits them here first (SPEC 2 get step 2).
    #[default]
    Persist,
    /// A cluster member computes them into that answer only and never writes storage on a read
    /// (SPEC 2.1): storage changes only through consensus and verified catch-up.
    AnswerOnly,
}

/// SPEC section 2 over any [`RawStorage`]: the repository of one peer's local blocks.
///
/// Clones share the storage and the block locks; [`StorageRepo::with_read_promotion`] gives a
/// clone that reads differently over the same state.
#[derive(Debug, Clone)]
pub struct StorageRepo {
    inner: Arc<Inner>,
    promotion: ReadPromotion,
    max_block_bytes: u64,
}

/// Default of [`StorageRepo::max_block_bytes`]: 4 MiB, half the default repo frame, so a block at
/// the limit travels in one frame with its envelope.
pub const DEFAULT_MAX_BLOCK_BYTES: u64 = 4 * 1024 * 1024;
/// Most record peer sets [`StorageRepo::revision_peers`] remembers (emptied when full).
const MAX_CACHED_PEER_SETS: usize = 4_096;

#[derive(Debug)]
struct Inner {
    storage: Arc<dyn RawStorage>,
    locks: BlockLocks,
    /// The sorted peer ids of kept records, by messageHash (a messageHash fixes its peer set, so
    /// an entry never goes stale).
    peer_sets: DashMap<String, Arc<[String]>>,
}

impl StorageRepo {
    /// A repository over a storage engine (reads promote as a single node does).
    pub fn new(storage: Arc<dyn RawStorage>) -> Self {
        let inner = Inner { storage, locks: BlockLocks::default(), peer_sets: DashMap::new() };
        Self { inner: Arc::new(inner), promotion: ReadPromotion::Persist, max_block_bytes: DEFAULT_MAX_BLOCK_BYTES }
    }

    /// The same repository refusing, at pend, a transform that would make a block's JSON larger
    /// than `max_block_bytes` and larger than it is now ([`TransformError::TooLarge`]): a block
    /// over the limit (written before it, or under a larger one) can still be read, shrunk and
    /// deleted.
    #[must_use]
    pub fn with_max_block_bytes(mut self, max_block_bytes: u64) -> Self {
        self.max_block_bytes = max_block_bytes;
        self
    }

    /// The largest block a pend may create or grow (see [`StorageRepo::with_max_block_bytes`]).
    pub fn max_block_bytes(&self) -> u64 {
        self.max_block_bytes
    }

    /// The same repository (same storage and locks) with reads promoting as `promotion` says.
    #[must_use]
    pub fn with_read_promotion(&self, promotion: ReadPromotion) -> Self {
        Self { inner: self.inner.clone(), promotion, max_block_bytes: self.max_block_bytes }
    }

    /// How reads treat a context's committed trxs.
    pub fn read_promotion(&self) -> ReadPromotion {
        self.promotion
    }

    /// The storage engine.
    pub fn storage(&self) -> &Arc<dyn RawStorage> {
        &self.inner.storage
    }

    fn raw(&self) -> &dyn RawStorage {
        self.inner.storage.as_ref()
    }

    /// The block's value at revision `at_rev` (the newest revision `<= at_rev`), rebuilt from the
    /// nearest kept materialized value.
    pub async fn value_at(&self, block_id: &BlockId, at_rev: u64) -> Result<BlockValue, RepoError> {
        let Some(target) = self.raw().revision_at_or_before(block_id, at_rev).await? else {
            return Ok(None);
        };
        if let Some(value) = self.raw().materialized(block_id, target.rev).await? {
            return Ok(value);
        }
        // Walk back within the checkpoint window, then to the last revision of an earlier window,
        // which always keeps its value. Fall back to a full replay if a value is missing.
        let window_start = target.rev - target.rev % CHECKPOINT_INTERVAL;
        let mut chain = self.raw().revisions(block_id, window_start, target.rev).await?;
        let mut base: Option<(u64, BlockValue)> = None;
        while let Some(last) = chain.last() {
            if let Some(value) = self.raw().materialized(block_id, last.rev).await? {
                base = Some((last.rev, value));
                break;
            }
            if chain.len() == 1 {
                break;
            }
            chain.pop();
        }
        let (start_value, replay) = match base {
            Some((rev, value)) => (value, self.raw().revisions(block_id, rev.saturating_add(1), target.rev).await?),
            None => match window_start.checked_sub(1) {
                Some(prev) => match self.raw().revision_at_or_before(block_id, prev).await? {
                    Some(prev_rev) => match self.raw().materialized(block_id, prev_rev.rev).await? {
                        Some(value) => {
                            (value, self.raw().revisions(block_id, prev_rev.rev.saturating_add(1), target.rev).await?)
                        }
                        None => (None, self.raw().revisions(block_id, 0, target.rev).await?),
                    },
                    None => (None, self.raw().revisions(block_id, 0, target.rev).await?),
                },
                None => (None, self.raw().revisions(block_id, 0, target.rev).await?),
            },
        };
        let mut value = start_value;
        for step in replay {
            let committed = self.raw().committed(block_id, &step.trx_id).await?.ok_or_else(|| {
                StorageError::Corrupt(format!(
                    "revision {} of block {block_id} names transaction {} with no committed transform",
                    step.rev, step.trx_id
                ))
            })?;
            value = committed
                .transform
                .apply(value.as_ref(), block_id)
                .map_err(|e| StorageError::Corrupt(format!("replaying block {block_id} rev {}: {e}", step.rev)))?;
        }
        Ok(value)
    }

    /// Applies a revision committed elsewhere in the block's cluster (verified catch-up of a
    /// lagging member, SPEC 4.10): commits `transform` as `trx_rev.trx_id` at `trx_rev.rev`,
    /// whether or not the transaction is pending here (a pending record of it is removed, so it is
    /// never both pending and committed). The caller has verified the revision: `evidence` is
    /// given when it is the revision's execution proof ([`crate::evidence::verify_trusted`]); it is
    /// then kept in its stored form ([`crate::evidence::stored_form`]: only what hashes and
    /// signatures cover, bounded) as the revision's evidence, and the revision becomes the block's
    /// newest proven one ([`ProvenMark`]). Without evidence (a quorum's agreement, SPEC 4.10) the
    /// revision is provisional: nothing marks it proven.
    /// Returns `true` when applied, `false` when the block already holds exactly this revision
    /// (idempotent).
    ///
    /// Errors, changing nothing: [`RepoError::InvalidTransform`] when the transform is malformed or
    /// does not apply to the value at `latest`; [`RepoError::BadRequest`] for a revision gap (the
    /// revision is not `latest + 1`: revisions are contiguous, SPEC 2 item 7) or evidence whose
    /// records cannot be stored (malformed, too many peers, too large);
    /// [`RepoError::Internal`] when the block is already at or past `rev` with another history,
    /// or the transaction is committed here at another revision (the replicas diverged).
    pub async fn apply_replica(
        &self,
        block_id: &BlockId,
        trx_rev: &TrxRev,
        transform: &Transform,
        evidence: Option<&Evidence>,
    ) -> Result<bool, RepoError> {
        self.apply_verified(block_id, trx_rev, transform, evidence, true).await
    }

    /// [`StorageRepo::apply_replica`] for a revision a quorum of the view reported identically
    /// whose evidence verifies (decided, naming this revision and transform) but is no execution
    /// proof for this node yet (SPEC 4.10): the revision is provisional. `evidence` is kept in its
    /// stored form all the same, so this node can serve it on and the commit votes that reach its
    /// kept records later can prove it ([`StorageRepo::newest_proven`] counts them); nothing marks
    /// it proven.
    ///
    /// Errors: as [`StorageRepo::apply_replica`].
    pub async fn apply_provisional(
        &self,
        block_id: &BlockId,
        trx_rev: &TrxRev,
        transform: &Transform,
        evidence: Option<&Evidence>,
    ) -> Result<bool, RepoError> {
        self.apply_verified(block_id, trx_rev, transform, evidence, false).await
    }

    async fn apply_verified(
        &self,
        block_id: &BlockId,
        trx_rev: &TrxRev,
        transform: &Transform,
        evidence: Option<&Evidence>,
        proven: bool,
    ) -> Result<bool, RepoError> {
        transform
            .validate_shape(block_id)
            .map_err(|reason| RepoError::InvalidTransform { block_id: block_id.clone(), reason })?;
        let _lock = self.inner.locks.lock([block_id]).await;
        let latest_rev = self.raw().latest(block_id).await?.map_or(0, |l| l.rev);
        if latest_rev >= trx_rev.rev {
            let at = self.raw().revisions(block_id, trx_rev.rev, trx_rev.rev).await?;
            if at.first() == Some(trx_rev) {
                return Ok(false);
            }
            return Err(RepoError::Internal(format!(
                "cannot apply {} at rev {} to {block_id}: the block is already at rev {latest_rev} and has {:?} there",
                trx_rev.trx_id, trx_rev.rev, at
            )));
        }
        if latest_rev.saturating_add(1) != trx_rev.rev {
            return Err(Check::gap_error(block_id, latest_rev, trx_rev.rev));
        }
        if let Some(done) = self.raw().committed(block_id, &trx_rev.trx_id).await? {
            return Err(RepoError::Internal(format!(
                "cannot apply {} at rev {} to {block_id}: it is committed here at rev {}",
                trx_rev.trx_id, trx_rev.rev, done.rev
            )));
        }
        let step = self.prepare_commit(block_id, &trx_rev.trx_id, trx_rev.rev, transform.clone()).await?;
        if let Some(evidence) = evidence {
            let stored = |record: &serde_json::Value| {
                evidence::stored_form(record)
                    .map_err(|e| RepoError::BadRequest(format!("evidence of {block_id} rev {}: {e}", trx_rev.rev)))
            };
            let mut writes = Vec::with_capacity(5);
            let pend = match &evidence.pend {
                Some(pend) => Some(StoredRecord::Ref(self.keep_served(&stored(pend)?, &mut writes).await?)),
                None => None,
            };
            let commit_record = stored(&evidence.commit)?;
            let commit = StoredRecord::Ref(self.keep_served(&commit_record, &mut writes).await?);
            writes.extend(evidence_writes(block_id, trx_rev, &StoredEvidence { pend, commit })?);
            if proven {
                let peers = ClusterRecord::from_value(commit_record)
                    .map_err(|e| RepoError::BadRequest(format!("evidence of {block_id} rev {}: {e}", trx_rev.rev)))?
                    .peers
                    .keys()
                    .filter_map(|p| crate::crypto::parse_peer_id(p).ok())
                    .collect();
                let mark = ProvenMark { trx_rev: trx_rev.clone(), peers };
                let bytes = mark.to_bytes().map_err(|e| RepoError::Internal(format!("encoding a proven mark: {e}")))?;
                writes.push(MetaWrite::Put(evidence::proven_key(block_id), bytes));
            }
            self.raw().write_meta(&writes).await?;
        }
        self.raw().commit_block(block_id, &step).await?;
        Ok(true)
    }

    /// Adds the write keeping a served `record` to `writes` (verified catch-up): as it is when no
    /// copy is kept yet, else the kept copy with the served copy's verified commit votes it lacks
    /// ([`add_verified_commits`]), so a kept record never loses a vote. Returns the reference.
    async fn keep_served(
        &self,
        record: &serde_json::Value,
        writes: &mut Vec<MetaWrite>,
    ) -> Result<RecordRef, RepoError> {
        let hash = record
            .get("messageHash")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| RepoError::BadRequest("a decided record without a messageHash".into()))?;
        let kept = match self.kept_record(hash).await {
            Ok(kept) => kept,
            Err(RepoError::Storage(StorageError::Corrupt(e))) => {
                tracing::warn!(message_hash = %hash, error = %e, "replacing an unreadable kept record");
                None
            }
            Err(e) => return Err(e),
        };
        let Some(mut kept) = kept else { return keep_write(record, writes) };
        if let Ok(served) = ClusterRecord::from_value(record.clone())
            && add_verified_commits(&mut kept, &served.commits) > 0
        {
            writes.push(StorageRepo::keep_record_write(&kept)?.1);
        }
        Ok(RecordRef { record: hash.to_owned() })
    }

    /// The metadata write keeping a decided record once (SPEC 4.10), for the caller to include in
    /// the storage step that executes the operations it carries ([`Step::meta`], with
    /// [`Step::pend`] / [`Step::commit`] given the returned [`KeptRecord`]): the evidence of every
    /// revision they produce refers to it, however many operations (a batch, SPEC 4.14) it
    /// carries. The record counts as kept once that step is written; keeping it again is harmless.
    /// The bytes are those of its JSON value ([`ClusterRecord::to_value`]), written straight from
    /// the record.
    ///
    /// Errors: [`RepoError::Internal`] when the record cannot be encoded.
    pub fn keep_record_write(record: &ClusterRecord) -> Result<(KeptRecord, MetaWrite), RepoError> {
        let bytes = serde_json::to_vec(record).map_err(|e| RepoError::Internal(format!("encoding a record: {e}")))?;
        let write = MetaWrite::Put(evidence::record_key(&record.message_hash), bytes);
        Ok((KeptRecord { message_hash: record.message_hash.clone() }, write))
    }

    /// P(`rev`) (SPEC 4.20): the peer set of the commit record kept as the evidence of revision
    /// `rev` of a block, sorted; `None` when no evidence is kept for it (revision 1 of nothing,
    /// a solo-written or pre-evidence revision). Only the peer ids are read out of the record,
    /// and they are remembered by the record's messageHash (at most 4,096 records).
    ///
    /// Errors: [`StorageError::Corrupt`] when the evidence or its commit record is unreadable or
    /// missing; storage errors.
    pub async fn revision_peers(&self, block_id: &BlockId, rev: u64) -> Result<Option<Arc<[String]>>, RepoError> {
        #[derive(serde::Deserialize)]
        struct PeersOnly {
            peers: BTreeMap<String, serde::de::IgnoredAny>,
        }
        let corrupt =
            |what: String| RepoError::from(StorageError::Corrupt(format!("evidence of {block_id} rev {rev}: {what}")));
        let Some(bytes) = self.raw().get_meta(&evidence::rev_key(block_id, rev)).await? else {
            return Ok(None);
        };
        let stored: StoredEvidence = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let peers: PeersOnly = match stored.commit {
            StoredRecord::Inline(record) => serde_json::from_value(record).map_err(|e| corrupt(e.to_string()))?,
            StoredRecord::Ref(reference) => {
                if let Some(peers) = self.inner.peer_sets.get(&reference.record) {
                    return Ok(Some(Arc::clone(&peers)));
                }
                let bytes = self
                    .raw()
                    .get_meta(&evidence::record_key(&reference.record))
                    .await?
                    .ok_or_else(|| corrupt("its commit record is missing".into()))?;
                let peers: PeersOnly = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                let sorted: Arc<[String]> = peers.peers.into_keys().collect();
                if self.inner.peer_sets.len() >= MAX_CACHED_PEER_SETS {
                    self.inner.peer_sets.clear();
                }
                self.inner.peer_sets.insert(reference.record, Arc::clone(&sorted));
                return Ok(Some(sorted));
            }
        };
        Ok(Some(peers.peers.into_keys().collect()))
    }

    /// The decided record kept under [`evidence::record_key`] for `message_hash`, if any.
    ///
    /// Errors: [`StorageError::Corrupt`] when the kept bytes are not a record; storage errors.
    pub async fn kept_record(&self, message_hash: &str) -> Result<Option<ClusterRecord>, RepoError> {
        let Some(bytes) = self.raw().get_meta(&evidence::record_key(message_hash)).await? else {
            return Ok(None);
        };
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| StorageError::Corrupt(format!("kept record {message_hash}: {e}")))?;
        ClusterRecord::from_value(value)
            .map(Some)
            .map_err(|e| StorageError::Corrupt(format!("kept record {message_hash}: {e}")).into())
    }

    /// Adds to the copy kept for `record` (SPEC 4.4, 4.10) the commit votes of `record` it lacks
    /// that verify against the kept copy's commitHash and come from a peer of its set, holding the
    /// locks of `block_ids` (the blocks the record names) while it reads and writes, so a kept
    /// record only ever gains votes. Nothing happens when no copy is kept. Returns how many votes
    /// were added.
    ///
    /// Errors: as [`StorageRepo::kept_record`], and storage errors of the write (which then
    /// changes nothing).
    pub async fn merge_kept_commits(
        &self,
        block_ids: impl IntoIterator<Item = &BlockId>,
        record: &ClusterRecord,
    ) -> Result<usize, RepoError> {
        let mut step = self.step(block_ids).await;
        let added = step.merge_commits(record).await?;
        if added > 0 {
            step.write().await?;
        }
        Ok(added)
    }

    /// The evidence kept for revision `rev` of a block, if any (SPEC 4.10), with its records
    /// resolved.
    ///
    /// Errors: [`StorageError::Corrupt`] when the stored evidence or a record it refers to is
    /// unreadable or missing; storage errors.
    pub async fn evidence(&self, block_id: &BlockId, rev: u64) -> Result<Option<Evidence>, RepoError> {
        let corrupt =
            |what: String| RepoError::from(StorageError::Corrupt(format!("evidence of {block_id} rev {rev}: {what}")));
        let Some(bytes) = self.raw().get_meta(&evidence::rev_key(block_id, rev)).await? else {
            return Ok(None);
        };
        let stored: StoredEvidence = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let pend = match stored.pend {
            Some(pend) => Some(self.resolve(pend).await?.ok_or_else(|| corrupt("its pend record is missing".into()))?),
            None => None,
        };
        let commit =
            self.resolve(stored.commit).await?.ok_or_else(|| corrupt("its commit record is missing".into()))?;
        Ok(Some(Evidence { pend, commit }))
    }

    /// The block's newest proven revision (SPEC 4.20) and P(r), its custody set: the newer of
    /// the mark catch-up keeps ([`ProvenMark`], void once the block holds another transaction at
    /// that revision) and the newest of the last [`MAX_PROVEN_SCAN`] revisions whose kept
    /// evidence carries approving commit votes on both records from a majority of `view` (this
    /// node's view of the block's cluster; the member's own records gain those votes from the
    /// final record and vote gossip, SPEC 4.4). `None` when neither exists.
    ///
    /// Errors: storage errors.
    pub async fn newest_proven(&self, block_id: &BlockId, view: &[PeerId]) -> Result<Option<ProvenMark>, RepoError> {
        let Some(latest) = self.raw().latest(block_id).await? else {
            return Ok(None);
        };
        let mark = match self.raw().get_meta(&evidence::proven_key(block_id)).await? {
            Some(bytes) => match ProvenMark::from_bytes(&bytes) {
                Ok(mark) if mark.trx_rev.rev <= latest.rev => {
                    let at = self.raw().revisions(block_id, mark.trx_rev.rev, mark.trx_rev.rev).await?;
                    at.first().is_some_and(|held| *held == mark.trx_rev).then_some(mark)
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(%block_id, error = %e, "unreadable proven mark ignored");
                    None
                }
            },
            None => None,
        };
        let floor = mark.as_ref().map_or(0, |m| m.trx_rev.rev);
        let lowest = latest.rev.saturating_sub(MAX_PROVEN_SCAN).max(floor.saturating_add(1)).max(1);
        for step in self.raw().revisions(block_id, lowest, latest.rev).await?.into_iter().rev() {
            let Ok(Some(evidence)) = self.evidence(block_id, step.rev).await else { continue };
            if let Some(peers) = evidence::stored_proof(&evidence, view) {
                return Ok(Some(ProvenMark { trx_rev: step, peers }));
            }
        }
        Ok(mark)
    }

    /// The record a stored reference names (`None` when it is not kept).
    async fn resolve(&self, stored: StoredRecord) -> Result<Option<serde_json::Value>, RepoError> {
        match stored {
            StoredRecord::Inline(record) => Ok(Some(record)),
            StoredRecord::Ref(reference) => {
                match self.raw().get_meta(&evidence::record_key(&reference.record)).await? {
                    None => Ok(None),
                    Some(bytes) => serde_json::from_slice(&bytes)
                        .map(Some)
                        .map_err(|e| StorageError::Corrupt(format!("kept record {}: {e}", reference.record)).into()),
                }
            }
        }
    }

    /// The block's value at `latest` (`None` if unknown or deleted).
    pub async fn latest_value(&self, block_id: &BlockId) -> Result<(Option<TrxRev>, BlockValue), RepoError> {
        let Some(latest) = self.raw().latest(block_id).await? else {
            return Ok((None, None));
        };
        let value = self.value_at(block_id, latest.rev).await?;
        Ok((Some(latest), value))
    }

    /// Committed transactions of a block with `from_rev <= rev <= to_rev`, newest
    /// [`MAX_MISSING_REVISIONS`] at most, added to `missing` grouped per trx.
    async fn collect_missing(
        &self,
        block_id: &BlockId,
        from_rev: u64,
        to_rev: u64,
        missing: &mut BTreeMap<TrxId, (u64, Transforms)>,
    ) -> Result<(), RepoError> {
        let from_rev = from_rev.max(to_rev.saturating_sub(MAX_MISSING_REVISIONS - 1));
        for entry in self.raw().revisions(block_id, from_rev, to_rev).await? {
            let committed = self.raw().committed(block_id, &entry.trx_id).await?.ok_or_else(|| {
                StorageError::Corrupt(format!("revision {} of {block_id} has no committed transform", entry.rev))
            })?;
            let slot = missing.entry(entry.trx_id.clone()).or_insert_with(|| (entry.rev, Transforms::default()));
            slot.1.add(block_id, &committed.transform);
        }
        Ok(())
    }

    fn stale(reason: &str, missing: BTreeMap<TrxId, (u64, Transforms)>) -> Check {
        let mut list: Vec<TrxTransforms> =
            missing.into_iter().map(|(trx_id, (rev, transforms))| TrxTransforms { trx_id, rev, transforms }).collect();
        list.sort_by(|a, b| a.rev.cmp(&b.rev).then_with(|| a.trx_id.cmp(&b.trx_id)));
        Check::Stale(StaleFailure { reason: Some(reason.into()), missing: Some(list), ..StaleFailure::default() })
    }

    /// What `pend` would do (SPEC 2 pend, and SPEC 4.6 for the gap), without changing anything.
    /// Checks in order, across all blocks: transform shapes; unknown blocks ([`Check::Behind`]);
    /// the trx already committed or pending with other transforms ([`Check::Invalid`]), or
    /// pending with the same ones everywhere ([`Check::Done`]); staleness; a revision gap; that the
    /// transforms apply to the current values; then the policy towards other pending trxs.
    ///
    /// Takes the blocks' locks for a consistent view; the answer may be out of date as soon as it
    /// returns (the operation itself checks again). Errors only on storage failures.
    pub async fn check_pend(&self, request: &PendRequest) -> Result<Check, RepoError> {
        let block_ids = request.transforms.block_ids();
        let _locks = self.inner.locks.lock(&block_ids).await;
        self.check_pend_locked(request, &block_ids, true).await
    }

    /// `gaps`: whether a revision gap counts ([`Check::Gap`]); a single node's pend has no gap rule
    /// (SPEC 2 pend), a cluster member's has (SPEC 4.6).
    async fn check_pend_locked(
        &self,
        request: &PendRequest,
        block_ids: &[BlockId],
        gaps: bool,
    ) -> Result<Check, RepoError> {
        if block_ids.is_empty() {
            return Ok(Check::Invalid(RepoError::BadRequest("pend touches no block".into())));
        }
        let per_block: Vec<(&BlockId, Transform)> =
            block_ids.iter().map(|id| (id, request.transforms.transform_for(id))).collect();
        for (block_id, transform) in &per_block {
            if let Err(reason) = transform.validate_shape(block_id) {
                return Ok(Check::Invalid(RepoError::InvalidTransform { block_id: (*block_id).clone(), reason }));
            }
        }
        let mut latests = Vec::with_capacity(per_block.len());
        for (block_id, transform) in &per_block {
            let latest = self.raw().latest(block_id).await?;
            if latest.is_none() && !transform.inserts() {
                return Ok(Check::Behind {
                    block_id: (*block_id).clone(),
                    error: RepoError::UnknownBlock((*block_id).clone()),
                });
            }
            latests.push(latest);
        }
        let trx_id = &request.trx_id;
        let mut already_pending = 0usize;
        for (block_id, transform) in &per_block {
            if self.raw().committed(block_id, trx_id).await?.is_some() {
                return Ok(Check::Invalid(RepoError::AlreadyCommitted {
                    trx_id: trx_id.clone(),
                    block_id: (*block_id).clone(),
                }));
            }
            match self.raw().pending(block_id, trx_id).await? {
                Some(existing) if existing == *transform => already_pending += 1,
                Some(_) => {
                    return Ok(Check::Invalid(RepoError::TrxConflict {
                        trx_id: trx_id.clone(),
                        block_id: (*block_id).clone(),
                    }));
                }
                None => {}
            }
        }
        if already_pending == per_block.len() {
            return Ok(Check::Done);
        }
        let mut missing = BTreeMap::new();
        for ((block_id, transform), latest) in per_block.iter().zip(&latests) {
            if let Some(latest) = latest
                && (request.rev.is_some() || transform.inserts())
            {
                let from = request.rev.unwrap_or(0);
                if latest.rev >= from {
                    self.collect_missing(block_id, from, latest.rev, &mut missing).await?;
                }
            }
        }
        if !missing.is_empty() {
            return Ok(Self::stale("stale revision", missing));
        }
        if let Some(rev) = request.rev.filter(|_| gaps) {
            for ((block_id, _), latest) in per_block.iter().zip(&latests) {
                let latest_rev = latest.as_ref().map_or(0, |l| l.rev);
                if latest_rev.saturating_add(1) < rev {
                    return Ok(Check::Gap { block_id: (*block_id).clone(), latest_rev, rev });
                }
            }
        }
        for ((block_id, transform), latest) in per_block.iter().zip(&latests) {
            let current = match latest {
                Some(l) => self.value_at(block_id, l.rev).await?,
                None => None,
            };
            let reason = match transform.apply(current.as_ref(), block_id) {
                Ok(next) => self.size_check(current.as_ref(), next.as_ref()).err(),
                Err(reason) => Some(reason),
            };
            if let Some(reason) = reason {
                return Ok(Check::Invalid(RepoError::InvalidTransform { block_id: (*block_id).clone(), reason }));
            }
        }
        if request.policy != PendPolicy::Continue {
            let with_transforms = request.policy == PendPolicy::Return;
            let pending = self.others_pending(block_ids, trx_id, with_transforms).await?;
            if !pending.is_empty() {
                return Ok(Check::Stale(StaleFailure {
                    reason: Some("other transactions are pending".into()),
                    pending: Some(pending),
                    ..StaleFailure::default()
                }));
            }
        }
        Ok(Check::Ok)
    }

    /// Refuses `next` when its JSON is over `max_block_bytes` and larger than `current`'s.
    fn size_check(&self, current: Option<&Block>, next: Option<&Block>) -> Result<(), TransformError> {
        let size_bytes = next.map_or(0, json_size_bytes::<Block>);
        if size_bytes <= self.max_block_bytes || size_bytes <= current.map_or(0, json_size_bytes::<Block>) {
            return Ok(());
        }
        Err(TransformError::TooLarge { size_bytes, max_bytes: self.max_block_bytes })
    }

    /// What `commit` would do (SPEC 2 commit, item 7 and SPEC 4.6), without changing anything.
    /// Per block: at or past `rev` is [`Check::Done`] when the trx is committed there at exactly
    /// `rev`, else stale (so is a trx committed here at another revision); then a revision gap
    /// ([`Check::Gap`]); then the trx must be pending ([`Check::Behind`]); then every transform must
    /// apply ([`Check::Invalid`]). Staleness on any block wins over the rest, so the answer does not
    /// depend on the order of the ids. [`Check::Done`] only when every block is done.
    ///
    /// Takes the blocks' locks for a consistent view. Errors only on storage failures.
    pub async fn check_commit(&self, request: &CommitRequest) -> Result<Check, RepoError> {
        let block_ids: BTreeSet<&BlockId> = request.block_ids.iter().collect();
        let _locks = self.inner.locks.lock(block_ids.iter().copied()).await;
        Ok(self.check_commit_locked(request).await?.0)
    }

    /// The check and, when it is [`Check::Ok`], each block still to commit with its step.
    async fn check_commit_locked(
        &self,
        request: &CommitRequest,
    ) -> Result<(Check, Vec<(BlockId, BlockCommit)>), RepoError> {
        let block_ids: BTreeSet<&BlockId> = request.block_ids.iter().collect();
        if block_ids.is_empty() {
            return Ok((Check::Invalid(RepoError::BadRequest("commit names no block".into())), Vec::new()));
        }
        let (trx_id, rev) = (&request.trx_id, request.rev);
        let mut missing = BTreeMap::new();
        let mut to_commit = Vec::with_capacity(block_ids.len());
        for block_id in &block_ids {
            let latest = self.raw().latest(block_id).await?;
            let latest_rev = latest.as_ref().map_or(0, |l| l.rev);
            if let Some(done) = self.raw().committed(block_id, trx_id).await? {
                if done.rev != rev {
                    self.collect_missing(block_id, rev.min(done.rev), latest_rev.max(done.rev), &mut missing).await?;
                }
                continue;
            }
            if latest_rev >= rev && latest.is_some() {
                self.collect_missing(block_id, rev, latest_rev, &mut missing).await?;
                continue;
            }
            to_commit.push((*block_id, latest_rev));
        }
        if !missing.is_empty() {
            return Ok((Self::stale("stale revision", missing), Vec::new()));
        }
        for (block_id, latest_rev) in &to_commit {
            if latest_rev.saturating_add(1) < rev {
                return Ok((Check::Gap { block_id: (*block_id).clone(), latest_rev: *latest_rev, rev }, Vec::new()));
            }
        }
        let mut to_apply = Vec::with_capacity(to_commit.len());
        for (block_id, _) in to_commit {
            match self.raw().pending(block_id, trx_id).await? {
                Some(transform) => to_apply.push((block_id, transform)),
                None => {
                    let error = RepoError::PendingNotFound { trx_id: trx_id.clone(), block_id: block_id.clone() };
                    return Ok((Check::Behind { block_id: block_id.clone(), error }, Vec::new()));
                }
            }
        }
        if to_apply.is_empty() {
            return Ok((Check::Done, Vec::new()));
        }
        let mut steps = Vec::with_capacity(to_apply.len());
        for (block_id, transform) in to_apply {
            match self.prepare_commit(block_id, trx_id, rev, transform).await {
                Ok(step) => steps.push((block_id.clone(), step)),
                Err(e @ RepoError::InvalidTransform { .. }) => return Ok((Check::Invalid(e), Vec::new())),
                Err(e) => return Err(e),
            }
        }
        Ok((Check::Ok, steps))
    }

    /// Computes the commit step of a pending transform on a block whose lock is held.
    async fn prepare_commit(
        &self,
        block_id: &BlockId,
        trx_id: &TrxId,
        rev: u64,
        transform: Transform,
    ) -> Result<BlockCommit, RepoError> {
        let (latest, current) = self.latest_value(block_id).await?;
        let value = transform
            .apply(current.as_ref(), block_id)
            .map_err(|reason| RepoError::InvalidTransform { block_id: block_id.clone(), reason })?;
        let prune_value_at =
            latest.map(|l| l.rev).filter(|prev| prev / CHECKPOINT_INTERVAL == rev / CHECKPOINT_INTERVAL);
        Ok(BlockCommit { trx_id: trx_id.clone(), rev, transform, value, prune_value_at })
    }

    /// Read-driven promotion (SPEC 2 get step 2) on one block whose lock is held, persisted.
    async fn promote(&self, block_id: &BlockId, committed: &[TrxRev]) -> Result<(), RepoError> {
        for entry in Self::reported_in_order(committed) {
            let latest_rev = self.raw().latest(block_id).await?.map_or(0, |l| l.rev);
            if latest_rev >= entry.rev {
                continue;
            }
            let Some(transform) = self.raw().pending(block_id, &entry.trx_id).await? else {
                continue;
            };
            if latest_rev.saturating_add(1) != entry.rev {
                tracing::warn!(%block_id, trx_id = %entry.trx_id, rev = entry.rev, latest_rev,
                    "reported-committed transaction would leave a revision gap; not promoted");
                continue;
            }
            match self.prepare_commit(block_id, &entry.trx_id, entry.rev, transform).await {
                Ok(step) => self.raw().commit_block(block_id, &step).await?,
                Err(RepoError::InvalidTransform { reason, .. }) => {
                    tracing::warn!(%block_id, trx_id = %entry.trx_id, error = %reason,
                        "reported-committed transaction does not apply here; not promoted");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn reported_in_order(committed: &[TrxRev]) -> Vec<&TrxRev> {
        let mut reported: Vec<&TrxRev> = committed.iter().collect();
        reported.sort_by_key(|t| t.rev);
        reported
    }

    /// The value a read answers for one block: at `context.rev` (if older than `latest`) or at
    /// `latest`; under [`ReadPromotion::AnswerOnly`], with the context's reported-committed trxs
    /// that are pending here applied on top for this answer only (SPEC 2.1).
    async fn read_value(
        &self,
        block_id: &BlockId,
        latest: Option<&TrxRev>,
        context: Option<&crate::model::TrxContext>,
    ) -> Result<BlockValue, RepoError> {
        let latest_rev = latest.map_or(0, |l| l.rev);
        if let Some(context) = context
            && latest.is_some()
            && context.rev < latest_rev
        {
            return self.value_at(block_id, context.rev).await;
        }
        let mut value = match latest {
            Some(l) => self.value_at(block_id, l.rev).await?,
            None => None,
        };
        if self.promotion == ReadPromotion::AnswerOnly
            && let Some(context) = context
        {
            let mut at = latest_rev;
            for entry in Self::reported_in_order(&context.committed) {
                if entry.rev != at.saturating_add(1) || entry.rev > context.rev {
                    continue;
                }
                let Some(transform) = self.raw().pending(block_id, &entry.trx_id).await? else { continue };
                match transform.apply(value.as_ref(), block_id) {
                    Ok(next) => {
                        value = next;
                        at = entry.rev;
                    }
                    Err(source) => {
                        tracing::warn!(%block_id, trx_id = %entry.trx_id, error = %source,
                            "reported-committed transaction does not apply here; left out of the answer");
                    }
                }
            }
        }
        Ok(value)
    }

    async fn pendings_of(&self, block_id: &BlockId) -> Result<Vec<TrxId>, RepoError> {
        Ok(self.raw().pending_trx_ids(block_id).await?)
    }

    /// Starts a storage step on `block_ids`, holding their locks until it is written or dropped:
    /// a cluster member executing a decided record stages every operation of the record (a batch,
    /// SPEC 4.14), its evidence and its executed marker, then writes them as one storage step
    /// ([`Step::write`]).
    pub async fn step<'a>(&'a self, block_ids: impl IntoIterator<Item = &BlockId>) -> Step<'a> {
        let locked: BTreeSet<BlockId> = block_ids.into_iter().cloned().collect();
        let locks = self.inner.locks.lock(&locked).await;
        Step { repo: self, _locks: locks, locked, touched: BTreeSet::new(), writes: Vec::new() }
    }

    /// The checks and writes of [`Step::pend`], staged into `writes`; the caller holds the blocks'
    /// locks.
    async fn stage_pend(
        &self,
        request: &PendRequest,
        record: Option<&KeptRecord>,
        writes: &mut Vec<StorageWrite>,
    ) -> Result<PendResult, RepoError> {
        let block_ids = request.transforms.block_ids();
        match self.check_pend_locked(request, &block_ids, record.is_some()).await? {
            Check::Ok => {}
            Check::Done => {
                let pending = self.others_pending(&block_ids, &request.trx_id, false).await?;
                return Ok(PendResult::Success(PendSuccess { success: crate::model::True, pending, block_ids }));
            }
            Check::Stale(failure) => return Ok(PendResult::Stale(failure)),
            Check::Behind { error, .. } | Check::Invalid(error) => return Err(error),
            Check::Gap { block_id, latest_rev, rev } => return Err(Check::gap_error(&block_id, latest_rev, rev)),
        }
        let pending = self.others_pending(&block_ids, &request.trx_id, request.policy == PendPolicy::Return).await?;
        if let Some(record) = record {
            let reference = StoredRecord::Ref(RecordRef { record: record.message_hash.clone() });
            let bytes = serde_json::to_vec(&reference)
                .map_err(|e| RepoError::Internal(format!("encoding a pend record: {e}")))?;
            writes.extend(
                block_ids
                    .iter()
                    .map(|b| StorageWrite::Meta(MetaWrite::Put(evidence::pend_key(b, &request.trx_id), bytes.clone()))),
            );
        }
        for block_id in &block_ids {
            writes.push(StorageWrite::SavePending {
                block_id: block_id.clone(),
                trx_id: request.trx_id.clone(),
                transform: request.transforms.transform_for(block_id),
            });
        }
        Ok(PendResult::Success(PendSuccess { success: crate::model::True, pending, block_ids }))
    }

    /// The checks and writes of [`Step::commit`], staged into `writes`; the caller holds the
    /// blocks' locks.
    async fn stage_commit(
        &self,
        request: &CommitRequest,
        record: Option<&KeptRecord>,
        writes: &mut Vec<StorageWrite>,
    ) -> Result<CommitResult, RepoError> {
        let steps = match self.check_commit_locked(request).await? {
            (Check::Ok, steps) => steps,
            (Check::Done, _) => return Ok(CommitResult::success()),
            (Check::Stale(failure), _) => return Ok(CommitResult::Stale(failure)),
            (Check::Behind { error, .. } | Check::Invalid(error), _) => return Err(error),
            (Check::Gap { block_id, latest_rev, rev }, _) => return Err(Check::gap_error(&block_id, latest_rev, rev)),
        };
        for (block_id, step) in steps {
            if let Some(commit) = record {
                // Evidence is written before (or with) the block's commit step, under its lock, so
                // what is kept for a committed revision is always that revision's.
                let pend = self.raw().get_meta(&evidence::pend_key(&block_id, &request.trx_id)).await?;
                let pend = pend.and_then(|bytes| serde_json::from_slice::<StoredRecord>(&bytes).ok());
                let commit = StoredRecord::Ref(RecordRef { record: commit.message_hash.clone() });
                let trx_rev = TrxRev { trx_id: request.trx_id.clone(), rev: request.rev };
                writes.extend(
                    evidence_writes(&block_id, &trx_rev, &StoredEvidence { pend, commit })?
                        .into_iter()
                        .map(StorageWrite::Meta),
                );
            }
            writes.push(StorageWrite::Commit { block_id, commit: Box::new(step) });
        }
        Ok(CommitResult::success())
    }

    /// The writes of [`Step::cancel`], staged into `writes`.
    fn stage_cancel(trx: &TrxBlocks, writes: &mut Vec<StorageWrite>) {
        writes.extend(
            trx.block_ids.iter().map(|b| StorageWrite::Meta(MetaWrite::Delete(evidence::pend_key(b, &trx.trx_id)))),
        );
        writes.extend(
            trx.block_ids
                .iter()
                .map(|b| StorageWrite::DeletePending { block_id: b.clone(), trx_id: trx.trx_id.clone() }),
        );
    }

    async fn others_pending(
        &self,
        block_ids: &[BlockId],
        trx_id: &TrxId,
        with_transforms: bool,
    ) -> Result<Vec<BlockTrxRef>, RepoError> {
        let mut pending = Vec::new();
        for block_id in block_ids {
            for other in self.pendings_of(block_id).await? {
                if &other == trx_id {
                    continue;
                }
                let transform = if with_transforms { self.raw().pending(block_id, &other).await? } else { None };
                pending.push(BlockTrxRef { block_id: block_id.clone(), trx_id: other, transform });
            }
        }
        Ok(pending)
    }
}

/// A decided record kept once in the metadata space by [`StorageRepo::keep_record_write`]; the
/// evidence [`Step::pend`] and [`Step::commit`] write refers to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptRecord {
    message_hash: String,
}

impl KeptRecord {
    /// The record's messageHash.
    #[must_use]
    pub fn message_hash(&self) -> &str {
        &self.message_hash
    }
}

/// One storage step of a cluster member ([`StorageRepo::step`]): the operations of a decided
/// record staged with their blocks' locks held, written as one [`RawStorage::apply`] (one
/// transaction and one sync on a transactional engine, SPEC 4.14). Each operation checks against
/// storage as it was when the step began: the operations of one step must name disjoint blocks,
/// all among the blocks locked. Dropping a step writes nothing.
pub struct Step<'a> {
    repo: &'a StorageRepo,
    _locks: HeldLocks<'a>,
    locked: BTreeSet<BlockId>,
    touched: BTreeSet<BlockId>,
    writes: Vec<StorageWrite>,
}

impl std::fmt::Debug for Step<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step").field("locked", &self.locked).field("writes", &self.writes.len()).finish()
    }
}

impl Step<'_> {
    /// Stages a metadata write.
    pub fn meta(&mut self, write: MetaWrite) {
        self.writes.push(StorageWrite::Meta(write));
    }

    /// Stages keeping the decided `record` once (SPEC 4.10), as [`StorageRepo::keep_record_write`]
    /// does, except that a copy already kept is never replaced: the votes of `record` it lacks are
    /// added to it instead ([`Step::merge_commits`]), so a kept record only ever gains verified
    /// commit votes. `record`'s own commit votes must have been verified by the caller when no
    /// copy is kept yet.
    ///
    /// Errors: [`RepoError::Internal`] when the record cannot be encoded; storage errors. A kept
    /// copy that cannot be read is replaced by `record` (logged).
    pub async fn keep(&mut self, record: &ClusterRecord) -> Result<KeptRecord, RepoError> {
        match self.repo.kept_record(&record.message_hash).await {
            Ok(Some(mut kept)) => {
                if add_verified_commits(&mut kept, &record.commits) > 0 {
                    self.meta(StorageRepo::keep_record_write(&kept)?.1);
                }
                return Ok(KeptRecord { message_hash: record.message_hash.clone() });
            }
            Ok(None) => {}
            Err(RepoError::Storage(StorageError::Corrupt(e))) => {
                tracing::warn!(message_hash = %record.message_hash, error = %e, "replacing an unreadable kept record");
            }
            Err(e) => return Err(e),
        }
        let (kept, write) = StorageRepo::keep_record_write(record)?;
        self.meta(write);
        Ok(kept)
    }

    /// Stages adding to the copy kept for `record` the commit votes of `record` it lacks: each from
    /// a peer of the kept copy's set, its signature verified against the kept copy's commitHash
    /// (votes that do not verify are skipped and logged). Nothing is staged when no copy is kept
    /// or no vote is new. Returns how many votes were added.
    ///
    /// Errors: as [`StorageRepo::kept_record`]; [`RepoError::Internal`] when the merged record
    /// cannot be encoded.
    pub async fn merge_commits(&mut self, record: &ClusterRecord) -> Result<usize, RepoError> {
        let Some(mut kept) = self.repo.kept_record(&record.message_hash).await? else { return Ok(0) };
        let added = add_verified_commits(&mut kept, &record.commits);
        if added > 0 {
            let (_, write) = StorageRepo::keep_record_write(&kept)?;
            self.meta(write);
        }
        Ok(added)
    }

    /// Stages a pend. With the decided pend record that carried it (a cluster member executing a
    /// decided record), a reference to the record is kept per block as the pend half of the
    /// evidence of the revision its commit will produce (SPEC 4.10), and a revision gap is refused
    /// (SPEC 4.6: a member never applies on a base it does not hold). The answers and errors of
    /// [`Repo::pend`], plus [`RepoError::BadRequest`] for a block this step did not lock or
    /// another operation of it touched. Nothing is staged unless it answers a success.
    pub async fn pend(&mut self, request: &PendRequest, record: Option<&KeptRecord>) -> Result<PendResult, RepoError> {
        self.claim(request.transforms.block_ids().iter())?;
        self.repo.stage_pend(request, record, &mut self.writes).await
    }

    /// Stages a commit. With the decided commit record, each block's new revision keeps
    /// `{pend, commit}` as its evidence (SPEC 4.10), staged before the block's commit step. The
    /// answers and errors of [`Repo::commit`], plus [`RepoError::BadRequest`] as for
    /// [`Step::pend`]. Nothing is staged unless it answers a success.
    pub async fn commit(
        &mut self,
        request: &CommitRequest,
        record: Option<&KeptRecord>,
    ) -> Result<CommitResult, RepoError> {
        self.claim(request.block_ids.iter())?;
        self.repo.stage_commit(request, record, &mut self.writes).await
    }

    /// Stages a cancel that also drops the trx's kept pend records on the blocks; errors as for
    /// [`Step::pend`].
    pub fn cancel(&mut self, trx: &TrxBlocks) -> Result<(), RepoError> {
        self.claim(trx.block_ids.iter())?;
        StorageRepo::stage_cancel(trx, &mut self.writes);
        Ok(())
    }

    /// Writes everything staged as one storage step and releases the locks. An `Err` changes
    /// nothing on an engine whose [`RawStorage::atomic_apply`] holds; elsewhere some prefix of the
    /// staged writes (in the order staged) may be applied.
    pub async fn write(self) -> Result<(), RepoError> {
        Ok(self.repo.raw().apply(&self.writes).await?)
    }

    /// Marks `block_ids` as touched by one operation of this step.
    fn claim<'b>(&mut self, block_ids: impl Iterator<Item = &'b BlockId>) -> Result<(), RepoError> {
        let ids: BTreeSet<&BlockId> = block_ids.collect();
        for id in &ids {
            if !self.locked.contains(*id) {
                return Err(RepoError::BadRequest(format!("block {id} is not locked by this storage step")));
            }
            if self.touched.contains(*id) {
                return Err(RepoError::BadRequest(format!("block {id} is touched twice in one storage step")));
            }
        }
        self.touched.extend(ids.into_iter().cloned());
        Ok(())
    }
}

/// Adds to `kept` each vote of `votes` it lacks that comes from a peer of its set and whose
/// signature verifies against its commitHash; returns how many were added. Votes already there
/// are never replaced.
pub fn add_verified_commits(kept: &mut ClusterRecord, votes: &BTreeMap<String, crate::record::Vote>) -> usize {
    let fresh: Vec<(&String, &crate::record::Vote)> =
        votes.iter().filter(|(peer, _)| kept.peers.contains_key(*peer) && !kept.commits.contains_key(*peer)).collect();
    if fresh.is_empty() {
        return 0;
    }
    let hash = kept.commit_hash();
    let mut added = 0;
    for (peer, vote) in fresh {
        let verified = peer
            .parse::<libp2p_identity::PeerId>()
            .map_err(|e| e.to_string())
            .and_then(|id| vote.verify(&id, &hash).map_err(|e| e.to_string()));
        match verified {
            Ok(()) => {
                kept.commits.insert(peer.clone(), vote.clone());
                added += 1;
            }
            Err(e) => {
                tracing::warn!(%peer, message_hash = %kept.message_hash, error = %e, "ignoring a commit vote that does not verify")
            }
        }
    }
    added
}

/// Adds the write keeping `record` under its messageHash to `writes`; returns the reference.
fn keep_write(record: &serde_json::Value, writes: &mut Vec<MetaWrite>) -> Result<RecordRef, RepoError> {
    let hash = record
        .get("messageHash")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| RepoError::BadRequest("a decided record without a messageHash".into()))?;
    let bytes = serde_json::to_vec(record).map_err(|e| RepoError::Internal(format!("encoding a record: {e}")))?;
    writes.push(MetaWrite::Put(evidence::record_key(hash), bytes));
    Ok(RecordRef { record: hash.to_owned() })
}

/// The writes storing a revision's evidence (and dropping the pend record it came from).
fn evidence_writes(block_id: &BlockId, trx_rev: &TrxRev, stored: &StoredEvidence) -> Result<Vec<MetaWrite>, RepoError> {
    let bytes = serde_json::to_vec(stored).map_err(|e| RepoError::Internal(format!("encoding evidence: {e}")))?;
    Ok(vec![
        MetaWrite::Put(evidence::rev_key(block_id, trx_rev.rev), bytes),
        MetaWrite::Delete(evidence::pend_key(block_id, &trx_rev.trx_id)),
    ])
}

#[async_trait]
impl Repo for StorageRepo {
    async fn get(&self, gets: &BlockGets, options: &MessageOptions) -> Result<GetBlockResults, RepoError> {
        options.check_expired()?;
        let mut results = GetBlockResults::new();
        let ids: BTreeSet<&BlockId> = gets.block_ids.iter().collect();
        for block_id in ids {
            if self.promotion == ReadPromotion::Persist
                && let Some(context) = &gets.context
                && !context.committed.is_empty()
            {
                let _lock = self.inner.locks.lock([block_id]).await;
                self.promote(block_id, &context.committed).await?;
            }
            let latest = self.raw().latest(block_id).await?;
            let mut block = self.read_value(block_id, latest.as_ref(), gets.context.as_ref()).await?;
            if let Some(trx_id) = gets.context.as_ref().and_then(|c| c.trx_id.as_ref()) {
                let Some(transform) = self.raw().pending(block_id, trx_id).await? else {
                    return Err(RepoError::PendingNotFound { trx_id: trx_id.clone(), block_id: block_id.clone() });
                };
                block = transform
                    .apply(block.as_ref(), block_id)
                    .map_err(|reason| RepoError::InvalidTransform { block_id: block_id.clone(), reason })?;
            }
            let pendings = self.pendings_of(block_id).await?;
            results.insert(block_id.clone(), BlockGetResult { block, state: BlockTrxState { latest, pendings } });
        }
        Ok(results)
    }

    /// One storage step ([`RawStorage::apply`]) for all the blocks.
    async fn pend(&self, request: &PendRequest, options: &MessageOptions) -> Result<PendResult, RepoError> {
        options.check_expired()?;
        let mut step = self.step(&request.transforms.block_ids()).await;
        let result = step.pend(request, None).await?;
        step.write().await?;
        Ok(result)
    }

    async fn cancel(&self, trx: &TrxBlocks, options: &MessageOptions) -> Result<(), RepoError> {
        options.check_expired()?;
        let _locks = self.inner.locks.lock(&trx.block_ids).await;
        let writes: Vec<StorageWrite> = trx
            .block_ids
            .iter()
            .map(|b| StorageWrite::DeletePending { block_id: b.clone(), trx_id: trx.trx_id.clone() })
            .collect();
        Ok(self.raw().apply(&writes).await?)
    }

    /// One storage step ([`RawStorage::apply`]) for all the blocks.
    async fn commit(&self, request: &CommitRequest, options: &MessageOptions) -> Result<CommitResult, RepoError> {
        options.check_expired()?;
        let mut step = self.step(&request.block_ids).await;
        let result = step.commit(request, None).await?;
        step.write().await?;
        Ok(result)
    }
}

/// The length of `value`'s JSON, counted without building it.
pub(crate) fn json_size_bytes<T: serde::Serialize>(value: &T) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len() as u64);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a value of the data model into a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

//! The block repository: trait [`Repo`] and [`StorageRepo`], SPEC section 2 over a
//! [`RawStorage`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::error::{RepoError, StorageError};
use crate::model::{
    BlockGetResult, BlockGets, BlockId, BlockTrxRef, BlockTrxState, CommitRequest, CommitResult,
    GetBlockResults, PendPolicy, PendRequest, PendResult, PendSuccess, StaleFailure, Transform, Transforms,
    TrxBlocks, TrxId, TrxRev, TrxTransforms,
};
use crate::storage::{BlockCommit, BlockValue, RawStorage};
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

/// SPEC section 2 over any [`RawStorage`]: the repository of one peer's local blocks.
#[derive(Debug, Clone)]
pub struct StorageRepo {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    storage: Arc<dyn RawStorage>,
    locks: BlockLocks,
}

impl StorageRepo {
    /// A repository over a storage engine.
    pub fn new(storage: Arc<dyn RawStorage>) -> Self {
        Self { inner: Arc::new(Inner { storage, locks: BlockLocks::default() }) }
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

    /// Applies a revision committed elsewhere in the block's cluster (catch-up of a lagging
    /// member, SPEC 4.6): commits `transform` as `trx_rev.trx_id` at `trx_rev.rev`, whether or not
    /// the transaction is pending here (a pending record of it is removed, so it is never both
    /// pending and committed). Returns `true` when applied, `false` when the block already holds
    /// exactly this revision (idempotent).
    ///
    /// Errors, changing nothing: [`RepoError::InvalidTransform`] when the transform is malformed or
    /// does not apply to the value at `latest`; [`RepoError::Internal`] when the block is already
    /// at or past `rev` with another history, or the transaction is committed here at another
    /// revision (the replicas diverged: `latest.rev` never decreases, so it cannot be applied).
    pub async fn apply_replica(
        &self,
        block_id: &BlockId,
        trx_rev: &TrxRev,
        transform: &Transform,
    ) -> Result<bool, RepoError> {
        transform
            .validate_shape(block_id)
            .map_err(|source| RepoError::InvalidTransform { block_id: block_id.clone(), source })?;
        let _lock = self.inner.locks.lock([block_id]).await;
        if let Some(latest) = self.raw().latest(block_id).await?
            && latest.rev >= trx_rev.rev
        {
            let at = self.raw().revisions(block_id, trx_rev.rev, trx_rev.rev).await?;
            if at.first() == Some(trx_rev) {
                return Ok(false);
            }
            return Err(RepoError::Internal(format!(
                "cannot apply {} at rev {} to {block_id}: the block is already at rev {} (trx {}) and has {:?} there",
                trx_rev.trx_id, trx_rev.rev, latest.rev, latest.trx_id, at
            )));
        }
        if let Some(done) = self.raw().committed(block_id, &trx_rev.trx_id).await? {
            return Err(RepoError::Internal(format!(
                "cannot apply {} at rev {} to {block_id}: it is committed here at rev {}",
                trx_rev.trx_id, trx_rev.rev, done.rev
            )));
        }
        let step = self.prepare_commit(block_id, &trx_rev.trx_id, trx_rev.rev, transform.clone()).await?;
        self.raw().commit_block(block_id, &step).await?;
        Ok(true)
    }

    /// The block's value at `latest` (`None` if unknown or deleted).
    pub async fn latest_value(&self, block_id: &BlockId) -> Result<(Option<TrxRev>, BlockValue), RepoError> {
        let Some(latest) = self.raw().latest(block_id).await? else {
            return Ok((None, None));
        };
        let value = self.value_at(block_id, latest.rev).await?;
        Ok((Some(latest), value))
    }

    /// Committed transactions of a block with `rev >= from_rev`, added to `missing` grouped per trx.
    async fn collect_missing(
        &self,
        block_id: &BlockId,
        from_rev: u64,
        to_rev: u64,
        missing: &mut BTreeMap<TrxId, (u64, Transforms)>,
    ) -> Result<(), RepoError> {
        for entry in self.raw().revisions(block_id, from_rev, to_rev).await? {
            let committed = self.raw().committed(block_id, &entry.trx_id).await?.ok_or_else(|| {
                StorageError::Corrupt(format!("revision {} of {block_id} has no committed transform", entry.rev))
            })?;
            let slot = missing.entry(entry.trx_id.clone()).or_insert_with(|| (entry.rev, Transforms::default()));
            slot.1.add(block_id, &committed.transform);
        }
        Ok(())
    }

    fn missing_list(missing: BTreeMap<TrxId, (u64, Transforms)>) -> Vec<TrxTransforms> {
        let mut list: Vec<TrxTransforms> = missing
            .into_iter()
            .map(|(trx_id, (rev, transforms))| TrxTransforms { trx_id, rev, transforms })
            .collect();
        list.sort_by(|a, b| a.rev.cmp(&b.rev).then_with(|| a.trx_id.cmp(&b.trx_id)));
        list
    }

    /// Commit step 2 on one block whose lock is held: true when the block is already at or past
    /// `rev`. Then either the transaction is committed there at exactly `rev` (an idempotent
    /// re-commit: nothing to do, even when later transactions followed it, so a retry can complete
    /// an interrupted multi-block commit), or the committed transactions from `rev` on are added
    /// to `missing`.
    async fn is_at_or_past(
        &self,
        block_id: &BlockId,
        trx_id: &TrxId,
        rev: u64,
        missing: &mut BTreeMap<TrxId, (u64, Transforms)>,
    ) -> Result<bool, RepoError> {
        let Some(latest) = self.raw().latest(block_id).await? else {
            return Ok(false);
        };
        if latest.rev < rev {
            return Ok(false);
        }
        let done = (latest.trx_id == *trx_id && latest.rev == rev)
            || self.raw().committed(block_id, trx_id).await?.is_some_and(|c| c.rev == rev);
        if !done {
            self.collect_missing(block_id, rev, latest.rev, missing).await?;
        }
        Ok(true)
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
            .map_err(|source| RepoError::InvalidTransform { block_id: block_id.clone(), source })?;
        let prune_value_at = latest
            .map(|l| l.rev)
            .filter(|prev| prev / CHECKPOINT_INTERVAL == rev / CHECKPOINT_INTERVAL);
        Ok(BlockCommit { trx_id: trx_id.clone(), rev, transform, value, prune_value_at })
    }

    /// Read-driven promotion (SPEC 2 get step 2) on one block whose lock is held.
    async fn promote(&self, block_id: &BlockId, committed: &[TrxRev]) -> Result<(), RepoError> {
        let mut reported: Vec<&TrxRev> = committed.iter().collect();
        reported.sort_by_key(|t| t.rev);
        for entry in reported {
            let latest_rev = self.raw().latest(block_id).await?.map(|l| l.rev);
            if latest_rev.is_some_and(|l| l >= entry.rev) {
                continue;
            }
            let Some(transform) = self.raw().pending(block_id, &entry.trx_id).await? else {
                continue;
            };
            match self.prepare_commit(block_id, &entry.trx_id, entry.rev, transform).await {
                Ok(step) => self.raw().commit_block(block_id, &step).await?,
                Err(RepoError::InvalidTransform { source, .. }) => {
                    tracing::warn!(%block_id, trx_id = %entry.trx_id, error = %source,
                        "reported-committed transaction does not apply here; not promoted");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn pendings_of(&self, block_id: &BlockId) -> Result<Vec<TrxId>, RepoError> {
        Ok(self.raw().pending_trx_ids(block_id).await?)
    }
}

#[async_trait]
impl Repo for StorageRepo {
    async fn get(&self, gets: &BlockGets, options: &MessageOptions) -> Result<GetBlockResults, RepoError> {
        options.check_expired()?;
        let mut results = GetBlockResults::new();
        let ids: BTreeSet<&BlockId> = gets.block_ids.iter().collect();
        for block_id in ids {
            if let Some(context) = &gets.context
                && !context.committed.is_empty()
            {
                let _lock = self.inner.locks.lock([block_id]).await;
                self.promote(block_id, &context.committed).await?;
            }
            let latest = self.raw().latest(block_id).await?;
            let mut block = match (&gets.context, &latest) {
                (_, None) => None,
                (Some(context), Some(latest)) if context.rev < latest.rev => {
                    self.value_at(block_id, context.rev).await?
                }
                (_, Some(latest)) => self.value_at(block_id, latest.rev).await?,
            };
            if let Some(trx_id) = gets.context.as_ref().and_then(|c| c.trx_id.as_ref()) {
                let Some(transform) = self.raw().pending(block_id, trx_id).await? else {
                    return Err(RepoError::PendingNotFound { trx_id: trx_id.clone(), block_id: block_id.clone() });
                };
                block = transform
                    .apply(block.as_ref(), block_id)
                    .map_err(|source| RepoError::InvalidTransform { block_id: block_id.clone(), source })?;
            }
            let pendings = self.pendings_of(block_id).await?;
            results.insert(block_id.clone(), BlockGetResult { block, state: BlockTrxState { latest, pendings } });
        }
        Ok(results)
    }

    async fn pend(&self, request: &PendRequest, options: &MessageOptions) -> Result<PendResult, RepoError> {
        options.check_expired()?;
        let block_ids = request.transforms.block_ids();
        if block_ids.is_empty() {
            return Err(RepoError::BadRequest("pend touches no block".into()));
        }
        let per_block: Vec<(BlockId, Transform)> =
            block_ids.iter().map(|id| (id.clone(), request.transforms.transform_for(id))).collect();
        // 1. Transform shape (insert header id, header changes): needs no stored state.
        for (block_id, transform) in &per_block {
            transform
                .validate_shape(block_id)
                .map_err(|source| RepoError::InvalidTransform { block_id: block_id.clone(), source })?;
        }

        let _locks = self.inner.locks.lock(&block_ids).await;

        // 2. Unknown blocks: an update or delete of a block with no `latest` here that the same
        //    transform does not insert.
        let mut latests = Vec::with_capacity(per_block.len());
        for (block_id, transform) in &per_block {
            let latest = self.raw().latest(block_id).await?;
            if latest.is_none() && !transform.inserts() {
                return Err(RepoError::UnknownBlock(block_id.clone()));
            }
            latests.push(latest);
        }

        // 3. Re-pend: the same transforms again are a no-op success, different ones a conflict; a
        //    trx already committed on a block cannot be pended there again.
        let mut already_pending = 0usize;
        for (block_id, transform) in &per_block {
            if self.raw().committed(block_id, &request.trx_id).await?.is_some() {
                return Err(RepoError::AlreadyCommitted { trx_id: request.trx_id.clone(), block_id: block_id.clone() });
            }
            match self.raw().pending(block_id, &request.trx_id).await? {
                Some(existing) if existing == *transform => already_pending += 1,
                Some(_) => {
                    return Err(RepoError::TrxConflict { trx_id: request.trx_id.clone(), block_id: block_id.clone() });
                }
                None => {}
            }
        }
        if already_pending == per_block.len() {
            let pending = self.others_pending(&per_block, &request.trx_id, false).await?;
            return Ok(PendResult::Success(PendSuccess { success: crate::model::True, pending, block_ids }));
        }

        // 4. Staleness, before anything is stored.
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
            return Ok(PendResult::Stale(StaleFailure {
                reason: Some("stale revision".into()),
                missing: Some(Self::missing_list(missing)),
                ..StaleFailure::default()
            }));
        }

        // 5. The transforms must apply to the current values.
        for ((block_id, transform), latest) in per_block.iter().zip(&latests) {
            let current = match latest {
                Some(l) => self.value_at(block_id, l.rev).await?,
                None => None,
            };
            transform
                .apply(current.as_ref(), block_id)
                .map_err(|source| RepoError::InvalidTransform { block_id: block_id.clone(), source })?;
        }

        // 6. The policy towards other pending transactions, then store.
        let with_transforms = request.policy == PendPolicy::Return;
        let pending = self.others_pending(&per_block, &request.trx_id, with_transforms).await?;
        if !pending.is_empty() && request.policy != PendPolicy::Continue {
            return Ok(PendResult::Stale(StaleFailure {
                reason: Some("other transactions are pending".into()),
                pending: Some(pending),
                ..StaleFailure::default()
            }));
        }
        for (block_id, transform) in &per_block {
            self.raw().save_pending(block_id, &request.trx_id, transform).await?;
        }
        Ok(PendResult::Success(PendSuccess { success: crate::model::True, pending, block_ids }))
    }

    async fn cancel(&self, trx: &TrxBlocks, options: &MessageOptions) -> Result<(), RepoError> {
        options.check_expired()?;
        let _locks = self.inner.locks.lock(&trx.block_ids).await;
        for block_id in &trx.block_ids {
            self.raw().delete_pending(block_id, &trx.trx_id).await?;
        }
        Ok(())
    }

    async fn commit(&self, request: &CommitRequest, options: &MessageOptions) -> Result<CommitResult, RepoError> {
        options.check_expired()?;
        let block_ids: BTreeSet<&BlockId> = request.block_ids.iter().collect();
        if block_ids.is_empty() {
            return Err(RepoError::BadRequest("commit names no block".into()));
        }
        let _locks = self.inner.locks.lock(block_ids.iter().copied()).await;

        // Step 2 on every block first, so the answer does not depend on the order of the ids.
        let mut missing = BTreeMap::new();
        let mut to_commit = Vec::with_capacity(block_ids.len());
        for block_id in &block_ids {
            if !self.is_at_or_past(block_id, &request.trx_id, request.rev, &mut missing).await? {
                to_commit.push(*block_id);
            }
        }
        if !missing.is_empty() {
            return Ok(CommitResult::Stale(StaleFailure {
                reason: Some("stale revision".into()),
                missing: Some(Self::missing_list(missing)),
                ..StaleFailure::default()
            }));
        }
        // Step 3: the trx must be pending on every block still to commit.
        let mut to_apply = Vec::with_capacity(to_commit.len());
        for block_id in to_commit {
            match self.raw().pending(block_id, &request.trx_id).await? {
                Some(transform) => to_apply.push((block_id, transform)),
                None => {
                    return Err(RepoError::PendingNotFound {
                        trx_id: request.trx_id.clone(),
                        block_id: block_id.clone(),
                    });
                }
            }
        }
        // Step 4: every new value first: if any transform fails, nothing changes anywhere.
        let mut steps = Vec::with_capacity(to_apply.len());
        for (block_id, transform) in to_apply {
            steps.push((block_id, self.prepare_commit(block_id, &request.trx_id, request.rev, transform).await?));
        }
        // Step 5: the atomic per-block commit steps.
        for (block_id, step) in &steps {
            self.raw().commit_block(block_id, step).await?;
        }
        Ok(CommitResult::success())
    }
}

impl StorageRepo {
    async fn others_pending(
        &self,
        per_block: &[(BlockId, Transform)],
        trx_id: &TrxId,
        with_transforms: bool,
    ) -> Result<Vec<BlockTrxRef>, RepoError> {
        let mut pending = Vec::new();
        for (block_id, _) in per_block {
            for other in self.pendings_of(block_id).await? {
                if &other == trx_id {
                    continue;
                }
                let transform =
                    if with_transforms { self.raw().pending(block_id, &other).await? } else { None };
                pending.push(BlockTrxRef { block_id: block_id.clone(), trx_id: other, transform });
            }
        }
        Ok(pending)
    }
}

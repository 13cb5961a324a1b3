//! The storage plugin seam: [`RawStorage`].
//!
//! A storage engine keeps, per block: `latest`, the revision log (`rev -> trxId`), committed
//! transforms by transaction, pending transforms by transaction and materialized block values at
//! some revisions. It also keeps a small key-value space of node metadata (consensus promises,
//! executed markers) that must be as durable as the blocks.
//!
//! The engine does not interpret transforms: [`crate::repo::StorageRepo`] implements the repository
//! rules (SPEC section 2) on top of it, takes the per-block locks and decides what to store. An
//! engine only needs to make each call atomic and, when it reports [`RawStorage::durable`], make
//! every successful write survive a crash of the process.
//!
//! Every method may be called concurrently from many tasks; calls on the same block are already
//! serialized by `StorageRepo` for the mutating ones. Implementations that block (files, LMDB)
//! should move their work off the async executor (for example with `tokio::task::spawn_blocking`).

use async_trait::async_trait;

use crate::error::StorageError;
use crate::model::{Block, BlockId, Transform, TrxId, TrxRev};

/// A block's value at one revision: `None` when the block does not exist there (deleted).
pub type BlockValue = Option<Block>;

/// Everything one per-block commit step changes, applied atomically by
/// [`RawStorage::commit_block`].
#[derive(Clone, Debug, PartialEq)]
pub struct BlockCommit {
    /// The committing transaction.
    pub trx_id: TrxId,
    /// The new revision; greater than the block's current `latest.rev`, if any.
    pub rev: u64,
    /// The transaction's transform on this block (moved from pending to committed).
    pub transform: Transform,
    /// The block's materialized value at `rev`.
    pub value: BlockValue,
    /// A revision whose materialized value is no longer needed and may be dropped in the same step
    /// (the previous `latest`, when it is not a checkpoint). Dropping it is optional.
    pub prune_value_at: Option<u64>,
}

/// What an engine can tell cheaply about its size, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StorageStats {
    /// Blocks with at least one committed revision or pending transform.
    pub blocks: u64,
    /// Bytes used on disk or in memory, when known.
    pub bytes: Option<u64>,
}

/// A transaction committed on a block.
#[derive(Clone, Debug, PartialEq)]
pub struct CommittedTransform {
    /// The revision it produced.
    pub rev: u64,
    /// Its transform on the block.
    pub transform: Transform,
}

/// One write of a metadata batch ([`RawStorage::write_meta`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaWrite {
    /// Writes (or replaces) the value of a key.
    Put(String, Vec<u8>),
    /// Deletes a key (nothing happens if it is absent).
    Delete(String),
}

/// One write of a storage step ([`RawStorage::apply`]): what one of the single-call mutations
/// would write.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant, reason = "a step's writes live briefly, in one vector per step")]
pub enum StorageWrite {
    /// As [`RawStorage::save_pending`].
    SavePending {
        /// The block.
        block_id: BlockId,
        /// The pending transaction.
        trx_id: TrxId,
        /// Its transform on the block.
        transform: Transform,
    },
    /// As [`RawStorage::delete_pending`].
    DeletePending {
        /// The block.
        block_id: BlockId,
        /// The transaction whose pending transform goes.
        trx_id: TrxId,
    },
    /// As [`RawStorage::commit_block`].
    Commit {
        /// The block.
        block_id: BlockId,
        /// The commit step.
        commit: Box<BlockCommit>,
    },
    /// As [`RawStorage::put_meta`] or [`RawStorage::delete_meta`].
    Meta(MetaWrite),
}

/// The byte- and JSON-level storage engine behind a [`crate::repo::StorageRepo`].
///
/// Contract shared by all methods:
/// - An `Err` leaves stored data exactly as it was before the call.
/// - Reads see every write that returned `Ok` before the read began (read-your-writes within one
///   process).
/// - On a [`durable`](RawStorage::durable) engine a write that returned `Ok` survives a crash
///   (SIGKILL, power loss) of the process.
/// - Any byte string is a valid block id or transaction id (up to the model's length bounds): an
///   engine that maps ids to file names must escape them, never trust them.
#[async_trait]
pub trait RawStorage: Send + Sync + std::fmt::Debug + 'static {
    /// The block's newest committed revision, `None` when nothing was ever committed on it.
    async fn latest(&self, block_id: &BlockId) -> Result<Option<TrxRev>, StorageError>;

    /// The revision log entries of a block with `from_rev <= rev <= to_rev`, ascending by `rev`.
    /// An empty or inverted range gives an empty list.
    async fn revisions(&self, block_id: &BlockId, from_rev: u64, to_rev: u64) -> Result<Vec<TrxRev>, StorageError>;

    /// The newest revision log entry with `rev <= at_rev`, if any.
    async fn revision_at_or_before(&self, block_id: &BlockId, at_rev: u64) -> Result<Option<TrxRev>, StorageError>;

    /// The committed transform of `trx_id` on the block, with the revision it produced.
    async fn committed(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<CommittedTransform>, StorageError>;

    /// The pending transform of `trx_id` on the block.
    async fn pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<Transform>, StorageError>;

    /// The transactions pending on the block, sorted by id.
    async fn pending_trx_ids(&self, block_id: &BlockId) -> Result<Vec<TrxId>, StorageError>;

    /// Stores (or replaces) the pending transform of `trx_id` on the block. Idempotent.
    async fn save_pending(&self, block_id: &BlockId, trx_id: &TrxId, transform: &Transform)
    -> Result<(), StorageError>;

    /// Deletes the pending transform of `trx_id` on the block. Idempotent: deleting what is not
    /// there is `Ok`.
    async fn delete_pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<(), StorageError>;

    /// The materialized value kept at exactly `rev`: `None` when no value is kept for that
    /// revision, `Some(None)` when the block does not exist at `rev`.
    async fn materialized(&self, block_id: &BlockId, rev: u64) -> Result<Option<BlockValue>, StorageError>;

    /// The per-block commit step, all or nothing: stores `commit.value` at `commit.rev`, records
    /// `rev -> trxId`, stores the transform as committed, deletes the pending transform of the
    /// transaction, sets `latest = {trxId, rev}` and optionally drops the materialized value at
    /// `prune_value_at`. After a crash the block is either fully at the new revision or fully at
    /// the old one.
    ///
    /// Errors with [`StorageError::Invalid`] (changing nothing) when `commit.rev` does not exceed
    /// the current `latest.rev`.
    async fn commit_block(&self, block_id: &BlockId, commit: &BlockCommit) -> Result<(), StorageError>;

    /// Reads a metadata value.
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;

    /// Writes (or replaces) a metadata value. Idempotent.
    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError>;

    /// Deletes a metadata value. Idempotent.
    async fn delete_meta(&self, key: &str) -> Result<(), StorageError>;

    /// Applies metadata writes in order ([`MetaWrite::Put`] or [`MetaWrite::Delete`], each as
    /// [`RawStorage::put_meta`] and [`RawStorage::delete_meta`] would). Engines with transactions
    /// apply the whole batch atomically, with one sync: a batch that fails changes nothing. The
    /// default applies the writes one by one, so after a crash or an error some prefix of the
    /// batch may be applied; callers order their writes so that every prefix is safe. Idempotent.
    async fn write_meta(&self, writes: &[MetaWrite]) -> Result<(), StorageError> {
        write_meta_in_order(self, writes).await
    }

    /// Applies `writes` in order as one storage step, each exactly as its single-call method
    /// would (a commit is refused as by [`RawStorage::commit_block`]), each seeing the writes
    /// before it. A cluster member applies a decided record (every operation of a batch, its
    /// evidence and its executed marker) with one call (SPEC 4.14).
    ///
    /// Engines that report [`RawStorage::atomic_apply`] apply the whole step atomically, with one
    /// transaction and one sync on a durable engine: an `Err` (any write refused, or the store
    /// failing) changes nothing, and after a crash either every write or none is there. The
    /// default applies the writes one by one: after a crash or an error some prefix of them may be
    /// applied, so callers order their writes so that every prefix is safe. Idempotent when every
    /// write is (a repeated commit is refused, as by `commit_block`).
    async fn apply(&self, writes: &[StorageWrite]) -> Result<(), StorageError> {
        apply_in_order(self, writes).await
    }

    /// True when [`RawStorage::apply`] applies a step atomically (all or nothing, also across a
    /// crash on a durable engine). The default (`false`) applies the writes one by one.
    fn atomic_apply(&self) -> bool {
        false
    }

    /// Every metadata entry whose key starts with `prefix`, sorted by key, at most `limit` of them.
    async fn list_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError>;

    /// True when successful writes survive a crash of the process.
    fn durable(&self) -> bool;

    /// Every block id with at least one committed revision or pending transform, sorted, at most
    /// `limit` of them starting after `after` (for catch-up and inspection).
    async fn block_ids(&self, after: Option<&BlockId>, limit: usize) -> Result<Vec<BlockId>, StorageError>;

    /// Size figures for metrics; `None` when the engine cannot tell cheaply (the default). Must
    /// not scan the whole store on every call.
    async fn stats(&self) -> Result<Option<StorageStats>, StorageError> {
        Ok(None)
    }

    /// Flushes buffered writes and releases the store (file locks included). Calls after `close`
    /// may fail. Idempotent.
    async fn close(&self) -> Result<(), StorageError>;
}

/// [`RawStorage::write_meta`] one write at a time through `put_meta` and `delete_meta`, stopping
/// at the first error (the default `write_meta`, for engines without atomic batches and for
/// wrappers).
pub async fn write_meta_in_order<R: RawStorage + ?Sized>(
    storage: &R,
    writes: &[MetaWrite],
) -> Result<(), StorageError> {
    for write in writes {
        match write {
            MetaWrite::Put(key, value) => storage.put_meta(key, value).await?,
            MetaWrite::Delete(key) => storage.delete_meta(key).await?,
        }
    }
    Ok(())
}

/// [`RawStorage::apply`] one write at a time through the single-call methods, stopping at the
/// first error (the default `apply`, for engines without atomic steps and for wrappers).
pub async fn apply_in_order<R: RawStorage + ?Sized>(storage: &R, writes: &[StorageWrite]) -> Result<(), StorageError> {
    for write in writes {
        match write {
            StorageWrite::SavePending { block_id, trx_id, transform } => {
                storage.save_pending(block_id, trx_id, transform).await?;
            }
            StorageWrite::DeletePending { block_id, trx_id } => storage.delete_pending(block_id, trx_id).await?,
            StorageWrite::Commit { block_id, commit } => storage.commit_block(block_id, commit).await?,
            StorageWrite::Meta(MetaWrite::Put(key, value)) => storage.put_meta(key, value).await?,
            StorageWrite::Meta(MetaWrite::Delete(key)) => storage.delete_meta(key).await?,
        }
    }
    Ok(())
}

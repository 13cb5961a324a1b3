//! [`KvBlockStorage`]: the whole [`RawStorage`] contract over any [`KvStore`].
//!
//! # Key layout
//!
//! One flat, byte-ordered key space; the first byte says what a key holds. `<block>` is the
//! block id's length (u16 big-endian) followed by its bytes, so all of one block's records are
//! contiguous and no block's records are a prefix scan away from another's. Revisions are u64
//! big-endian, so byte order is numeric order.
//!
//! | key                                          | value                                       |
//! |----------------------------------------------|---------------------------------------------|
//! | `b` `<block>` `L`                            | `latest`: rev (u64 BE) + trx id              |
//! | `b` `<block>` `R` `!rev` (u64 BE, bits inverted) | trx id: the revision log, newest first   |
//! | `b` `<block>` `C` trx id                     | rev (u64 BE) + committed transform (JSON)   |
//! | `b` `<block>` `P` trx id                     | pending transform (JSON)                    |
//! | `b` `<block>` `V` rev (u64 BE)               | materialized value (JSON; `null` = deleted) |
//! | `i` block id                                 | empty: the blocks with a `latest` or a pending transform |
//! | `n`                                          | the number of `i` keys (u64 BE), for `stats` |
//! | `m` meta key (at most [`META_INLINE_BYTES`]) | metadata value                              |
//! | `m` first [`META_INLINE_BYTES`] bytes, `0xFF`, SHA-256 of the key | key length (u32 BE) + key + value |
//!
//! The revision log is stored newest first so that "the newest revision at or before `r`" is one
//! prefix scan starting at `!r` with a limit of 1; a range of revisions is one scan, reversed.
//! Keys of at most 1 + 2 + 256 + 1 + 128 = 388 bytes hold block records; metadata keys longer than
//! [`META_INLINE_BYTES`] (evidence and tombstone keys of long ids) are stored under a hash of the
//! key so that no key exceeds [`MAX_KEY_BYTES`]. Such keys sort after every key they start with
//! (`0xFF` never occurs in UTF-8), so the only keys out of order in a scan are long keys sharing
//! their first [`META_INLINE_BYTES`] bytes, which are contiguous: `list_meta` sorts them, and reads
//! the rest of such a group when its limit cuts one.
//!
//! # Invariants
//!
//! - `i<id>` exists exactly when the block has a `latest` or at least one pending transform, and
//!   `n` counts the `i` keys.
//! - Every revision log entry has its committed transform; `latest` is the newest log entry.
//! - Each `RawStorage` call writes one batch, always durable, so each call is atomic and survives
//!   a crash on a durable store. The block mutations (`save_pending`, `delete_pending`,
//!   `commit_block`) read what they check (`latest`, the index, the count) and build their batch
//!   under one writer lock, so no two of them interleave between check and write.
//! - On a store whose writes wait for the disk ([`KvStore::WRITES_WAIT`]), concurrent batches are
//!   written together, one store write (one transaction, one sync) per group, each call answered
//!   once the write that carries it returned: see [`super::group`]. A mutation then checks
//!   against the store plus the writes queued before it, and releases the writer lock once its
//!   batch is queued. Elsewhere (the memory store, or no tokio runtime) each batch is its own
//!   store write, made under the writer lock for mutations.
//! - `materialized` reads the stored bytes every time and parses them only when they are not the
//!   bytes of a value this storage committed and still keeps decoded: see [`super::values`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::group::{self, GroupCommit, GroupStats};
use super::values::ValueCache;
use super::{KvEntry, KvStore, KvWrite, MAX_KEY_BYTES};
use crate::error::StorageError;
use crate::model::{BlockId, Transform, TrxId, TrxRev};
use crate::storage::{BlockCommit, BlockValue, CommittedTransform, MetaWrite, RawStorage, StorageStats, StorageWrite};

/// First byte of a block record key.
const BLOCK: u8 = b'b';
/// First byte of a block index key.
const INDEX: u8 = b'i';
/// The key of the block count.
const COUNT: &[u8] = b"n";
/// First byte of a metadata key.
const META: u8 = b'm';
/// The byte after the stored part of a metadata key that is longer than [`META_INLINE_BYTES`].
const LONG_META: u8 = 0xFF;
/// Bytes of the SHA-256 that ends the key of a long metadata key.
const HASH_BYTES: usize = 32;
/// The longest metadata key stored as it is: longer ones keep this many bytes, then
/// a `0xFF` byte and their SHA-256, [`MAX_KEY_BYTES`] in all.
pub const META_INLINE_BYTES: usize = MAX_KEY_BYTES - 2 - HASH_BYTES;

// Record tags after `<block>`.
const LATEST: u8 = b'L';
const REVISION: u8 = b'R';
const COMMITTED: u8 = b'C';
const PENDING: u8 = b'P';
const VALUE: u8 = b'V';

/// [`RawStorage`] over a [`KvStore`]: the block schema (revision logs, pending and committed
/// transforms, materialized values, metadata) in the key layout of this module.
///
/// Cloning gives another handle on the same store.
#[derive(Debug)]
pub struct KvBlockStorage<S: KvStore> {
    shared: Arc<Shared<S>>,
}

#[derive(Debug)]
struct Shared<S> {
    store: S,
    /// Held by the block mutations from their first read until their batch is written (or, with
    /// group commit, queued).
    writer: Mutex<()>,
    /// The group commit queue (used when `S::WRITES_WAIT` and a tokio runtime runs).
    group: GroupCommit,
    /// The newest materialized value of recently committed blocks, decoded.
    values: ValueCache,
}

/// What the block mutations read: the store, or the store seen through the writes queued for
/// group commit.
trait KvView {
    fn name(&self) -> &'static str;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Vec<KvEntry>, StorageError>;
}

impl<S: KvStore> KvView for S {
    fn name(&self) -> &'static str {
        KvStore::name(self)
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        KvStore::get(self, key)
    }
    fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Vec<KvEntry>, StorageError> {
        KvStore::scan(self, prefix, start, limit)
    }
}

/// The store as it will be once every queued write is written.
struct Queued<'a, S> {
    store: &'a S,
    group: &'a GroupCommit,
}

impl<S: KvStore> KvView for Queued<'_, S> {
    fn name(&self) -> &'static str {
        self.store.name()
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        match self.group.overlay_get(key) {
            Some(value) => Ok(value),
            None => self.store.get(key),
        }
    }
    fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Vec<KvEntry>, StorageError> {
        group::scan_through(self.group, self.store, prefix, start, limit)
    }
}

/// A view plus the writes of the earlier parts of one storage step ([`RawStorage::apply`]), so
/// that each mutation of the step checks against the ones before it.
struct Staged<'a> {
    base: &'a dyn KvView,
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    batch: Vec<KvWrite>,
}

impl<'a> Staged<'a> {
    fn new(base: &'a dyn KvView) -> Self {
        Self { base, overlay: BTreeMap::new(), batch: Vec::new() }
    }

    fn stage(&mut self, writes: Vec<KvWrite>) {
        for write in &writes {
            let value = match write {
                KvWrite::Put { value, .. } => Some(value.clone()),
                KvWrite::Delete { .. } => None,
            };
            self.overlay.insert(write.key().to_vec(), value);
        }
        self.batch.extend(writes);
    }
}

impl KvView for Staged<'_> {
    fn name(&self) -> &'static str {
        self.base.name()
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        match self.overlay.get(key) {
            Some(value) => Ok(value.clone()),
            None => self.base.get(key),
        }
    }
    fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Vec<KvEntry>, StorageError> {
        let from = start.max(prefix).to_vec();
        let staged = self
            .overlay
            .range(from..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        group::scan_overlaid(staged, limit, |n| self.base.scan(prefix, start, n))
    }
}

/// A committed value to keep decoded once it is written: the block prefix and the value's JSON.
type Decoded = (Vec<u8>, Vec<u8>);

/// One block mutation, encoded: [`Mutation::batch`] reads what it checks through a view and
/// gives the store writes (run under the writer lock).
enum Mutation {
    SavePending { block_id: BlockId, key: Vec<u8>, value: Vec<u8> },
    DeletePending { block_id: BlockId, prefix: Vec<u8>, key: Vec<u8> },
    Commit { block_id: BlockId, prefix: Vec<u8>, trx_id: TrxId, rev: u64, batch: Vec<KvWrite> },
    Meta(KvWrite),
}

impl Mutation {
    fn save_pending(
        engine: &'static str,
        block_id: &BlockId,
        trx_id: &TrxId,
        transform: &Transform,
    ) -> Result<Self, StorageError> {
        let key = record(&block_prefix(block_id)?, PENDING, trx_id.as_bytes());
        let value = to_json(engine, "a pending transform", transform)?;
        Ok(Self::SavePending { block_id: block_id.clone(), key, value })
    }

    fn delete_pending(block_id: &BlockId, trx_id: &TrxId) -> Result<Self, StorageError> {
        let prefix = block_prefix(block_id)?;
        let key = record(&prefix, PENDING, trx_id.as_bytes());
        Ok(Self::DeletePending { block_id: block_id.clone(), prefix, key })
    }

    /// The commit step, and the value to keep decoded once it is written.
    fn commit(
        engine: &'static str,
        values: &ValueCache,
        block_id: &BlockId,
        commit: &BlockCommit,
    ) -> Result<(Self, Option<Decoded>), StorageError> {
        let prefix = block_prefix(block_id)?;
        let value = to_json(engine, "a materialized value", &commit.value)?;
        // Once written, the value is kept decoded for `materialized` (see [`super::values`]).
        let cached = values.admits(&prefix, commit.rev, value.len()).then(|| (prefix.clone(), value.clone()));
        let transform = to_json(engine, "a committed transform", &commit.transform)?;
        let trx = commit.trx_id.as_bytes();
        let mut batch = vec![KvWrite::put(record(&prefix, VALUE, &commit.rev.to_be_bytes()), value)];
        if let Some(prune) = commit.prune_value_at.filter(|r| *r != commit.rev) {
            batch.push(KvWrite::delete(record(&prefix, VALUE, &prune.to_be_bytes())));
        }
        batch.push(KvWrite::put(log_key(&prefix, commit.rev), trx));
        batch.push(KvWrite::put(record(&prefix, COMMITTED, trx), rev_prefixed(commit.rev, &transform)));
        batch.push(KvWrite::delete(record(&prefix, PENDING, trx)));
        batch.push(KvWrite::put(record(&prefix, LATEST, &[]), rev_prefixed(commit.rev, trx)));
        let mutation =
            Self::Commit { block_id: block_id.clone(), prefix, trx_id: commit.trx_id.clone(), rev: commit.rev, batch };
        Ok((mutation, cached))
    }

    fn meta(write: &MetaWrite) -> Result<Self, StorageError> {
        meta_write(write).map(Self::Meta)
    }

    /// The store writes of this mutation against `store`; an `Err` refuses it.
    fn batch(self, store: &dyn KvView) -> Result<Vec<KvWrite>, StorageError> {
        match self {
            Self::SavePending { block_id, key, value } => {
                let mut batch = vec![KvWrite::put(key, value)];
                index_if_absent(store, &block_id, &mut batch)?;
                Ok(batch)
            }
            Self::DeletePending { block_id, prefix, key } => {
                if store.get(&key)?.is_none() {
                    return Ok(Vec::new());
                }
                let mut batch = vec![KvWrite::delete(key.clone())];
                // A block with nothing committed and nothing else pending is forgotten.
                if latest_in(store, &prefix)?.is_none() {
                    let pending = record(&prefix, PENDING, &[]);
                    let others = store.scan(&pending, &pending, 2)?;
                    if others.iter().all(|(other, _)| *other == key) {
                        let count = block_count(store)?.checked_sub(1).ok_or_else(|| {
                            corrupt(store.name(), format!("block {block_id} is indexed but the block count is 0"))
                        })?;
                        batch.push(KvWrite::delete(index_key(&block_id)));
                        batch.push(KvWrite::put(COUNT, count.to_be_bytes()));
                    }
                }
                Ok(batch)
            }
            Self::Commit { block_id, prefix, trx_id, rev, mut batch } => {
                match latest_in(store, &prefix)? {
                    Some(current) if current.rev >= rev => {
                        return Err(StorageError::Invalid(format!(
                            "commit of {trx_id} at rev {rev} does not advance latest rev {} of {block_id}",
                            current.rev
                        )));
                    }
                    // A block with a latest is indexed already.
                    Some(_) => {}
                    None => index_if_absent(store, &block_id, &mut batch)?,
                }
                Ok(batch)
            }
            Self::Meta(write) => Ok(vec![write]),
        }
    }
}

impl<S: KvStore> Clone for KvBlockStorage<S> {
    fn clone(&self) -> Self {
        Self { shared: Arc::clone(&self.shared) }
    }
}

impl<S: KvStore + Default> Default for KvBlockStorage<S> {
    fn default() -> Self {
        Self::over(S::default())
    }
}

impl<S: KvStore> From<S> for KvBlockStorage<S> {
    fn from(store: S) -> Self {
        Self::over(store)
    }
}

impl<S: KvStore> KvBlockStorage<S> {
    /// Block storage over `store`, which must be empty or hold this module's layout.
    pub fn over(store: S) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                writer: Mutex::new(()),
                group: GroupCommit::new(),
                values: ValueCache::default(),
            }),
        }
    }

    /// Block storage over a new, empty default store (for example an in-memory one).
    pub fn new() -> Self
    where
        S: Default,
    {
        Self::default()
    }

    /// The store underneath.
    pub fn store(&self) -> &S {
        &self.shared.store
    }

    /// The group commit counters: how many batches were written in how many store writes.
    /// Both stay 0 where group commit is not used (see the module documentation).
    pub fn group_stats(&self) -> GroupStats {
        self.shared.group.stats()
    }

    /// Whether writes go through group commit: the store's writes wait and a runtime runs.
    fn grouped() -> bool {
        S::WRITES_WAIT && tokio::runtime::Handle::try_current().is_ok()
    }

    /// Waits for the group writer's answer, starting the writer when asked to.
    async fn answer(&self, pending: group::Pending) -> Result<(), StorageError> {
        if pending.start {
            let shared = Arc::clone(&self.shared);
            tokio::task::spawn_blocking(move || shared.group.run(&shared.store, &shared.writer));
        }
        pending.answer.await.map_err(|_| StorageError::Failed {
            engine: self.shared.store.name(),
            message: "the group writer stopped before answering".into(),
        })?
    }

    /// Runs `work` on tokio's blocking pool when `waits` (and a runtime is there), else inline.
    async fn run<T, F>(&self, waits: bool, work: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared<S>) -> Result<T, StorageError> + Send + 'static,
    {
        if !waits {
            return work(&self.shared);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return work(&self.shared);
        };
        let shared = Arc::clone(&self.shared);
        runtime
            .spawn_blocking(move || work(&shared))
            .await
            .map_err(|e| StorageError::backend(self.shared.store.name(), "running a call on the blocking pool", e))?
    }

    /// Runs a read.
    async fn read<T, F>(&self, work: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&S) -> Result<T, StorageError> + Send + 'static,
    {
        self.run(S::READS_WAIT, move |shared| work(&shared.store)).await
    }

    /// Runs a block mutation under the writer lock: `work` reads what it checks and returns the
    /// batch to write, durably, before the lock is released; with group commit, `work` reads the
    /// store through the queued writes and the lock is released once its batch is queued.
    async fn mutate<F>(&self, work: F) -> Result<(), StorageError>
    where
        F: FnOnce(&dyn KvView) -> Result<Vec<KvWrite>, StorageError> + Send + 'static,
    {
        if !Self::grouped() {
            return self
                .run(S::WRITES_WAIT, move |shared| {
                    // The lock guards no data (the store keeps its own consistency): a poisoned one is fine.
                    let _writer = shared.writer.lock().unwrap_or_else(PoisonError::into_inner);
                    let batch = work(&shared.store)?;
                    if batch.is_empty() { Ok(()) } else { shared.store.write(&batch, true) }
                })
                .await;
        }
        let slot = self.shared.group.slot().await?;
        let (outcome, pending) = self
            .run(S::READS_WAIT, move |shared| {
                let _writer = shared.writer.lock().unwrap_or_else(PoisonError::into_inner);
                let queued = Queued { store: &shared.store, group: &shared.group };
                Ok(match work(&queued) {
                    Ok(batch) if !batch.is_empty() => (Ok(()), Some(shared.group.enqueue(batch, slot))),
                    // Nothing to write, or a refusal: when the check saw queued writes, the answer
                    // waits for them (an empty barrier batch), so it never rests on writes that
                    // are not yet durable, or that fail.
                    outcome => {
                        let outcome = outcome.map(|_| ());
                        (outcome, shared.group.has_queued().then(|| shared.group.enqueue(Vec::new(), slot)))
                    }
                })
            })
            .await?;
        match pending {
            Some(pending) => self.answer(pending).await.and(outcome),
            None => outcome,
        }
    }

    /// Writes one batch durably.
    async fn write(&self, batch: Vec<KvWrite>) -> Result<(), StorageError> {
        if batch.is_empty() || !Self::grouped() {
            return self.run(S::WRITES_WAIT, move |shared| shared.store.write(&batch, true)).await;
        }
        // Keys are checked before the batch joins a group, so a bad key fails only its own call.
        super::check_keys(self.shared.store.name(), &batch, MAX_KEY_BYTES)?;
        let slot = self.shared.group.slot().await?;
        let pending = self.shared.group.enqueue(batch, slot);
        self.answer(pending).await
    }
}

fn corrupt(engine: &str, what: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("{engine}: {what}"))
}

fn to_json<T: Serialize>(engine: &'static str, what: &str, value: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(value).map_err(|e| StorageError::backend(engine, format!("encoding {what}"), e))
}

fn from_json<T: DeserializeOwned>(engine: &str, what: &str, bytes: &[u8]) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(engine, format!("{what} is not valid JSON: {e}")))
}

/// `b<block>`: the prefix of all of a block's records.
fn block_prefix(block_id: &BlockId) -> Result<Vec<u8>, StorageError> {
    let id = block_id.as_bytes();
    let len = u16::try_from(id.len()).map_err(|_| StorageError::Invalid(format!("block id of {} bytes", id.len())))?;
    let mut key = Vec::with_capacity(3 + id.len() + 1 + 8);
    key.push(BLOCK);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(id);
    Ok(key)
}

/// A block record key: the block prefix, a tag, a suffix.
fn record(prefix: &[u8], tag: u8, suffix: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 1 + suffix.len());
    key.extend_from_slice(prefix);
    key.push(tag);
    key.extend_from_slice(suffix);
    key
}

/// The revision log key of `rev`: newest first.
fn log_key(prefix: &[u8], rev: u64) -> Vec<u8> {
    record(prefix, REVISION, &(!rev).to_be_bytes())
}

/// The revision of a revision log key (its last 8 bytes, inverted).
fn rev_of_log_key(engine: &str, key: &[u8]) -> Result<u64, StorageError> {
    key.last_chunk::<8>().map(|r| !u64::from_be_bytes(*r)).ok_or_else(|| corrupt(engine, "truncated revision log key"))
}

fn index_key(block_id: &BlockId) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + block_id.len());
    key.push(INDEX);
    key.extend_from_slice(block_id.as_bytes());
    key
}

fn decode_trx(engine: &str, bytes: &[u8]) -> Result<TrxId, StorageError> {
    let text = std::str::from_utf8(bytes).map_err(|_| corrupt(engine, "a transaction id is not UTF-8"))?;
    TrxId::new(text).map_err(|e| corrupt(engine, e))
}

/// Splits a leading u64 BE revision off `bytes`.
fn split_rev<'a>(engine: &str, what: &str, bytes: &'a [u8]) -> Result<(u64, &'a [u8]), StorageError> {
    let (rev, rest) = bytes.split_first_chunk::<8>().ok_or_else(|| corrupt(engine, format!("{what} is truncated")))?;
    Ok((u64::from_be_bytes(*rev), rest))
}

fn rev_prefixed(rev: u64, rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + rest.len());
    out.extend_from_slice(&rev.to_be_bytes());
    out.extend_from_slice(rest);
    out
}

fn latest_in<V: KvView + ?Sized>(store: &V, prefix: &[u8]) -> Result<Option<TrxRev>, StorageError> {
    let engine = store.name();
    match store.get(&record(prefix, LATEST, &[]))? {
        Some(bytes) => {
            let (rev, trx) = split_rev(engine, "a latest record", &bytes)?;
            Ok(Some(TrxRev { trx_id: decode_trx(engine, trx)?, rev }))
        }
        None => Ok(None),
    }
}

/// The number of indexed blocks.
fn block_count<V: KvView + ?Sized>(store: &V) -> Result<u64, StorageError> {
    match store.get(COUNT)? {
        Some(bytes) => {
            let count = <[u8; 8]>::try_from(bytes.as_slice())
                .map_err(|_| corrupt(store.name(), format!("the block count has {} bytes, not 8", bytes.len())))?;
            Ok(u64::from_be_bytes(count))
        }
        None => Ok(0),
    }
}

/// Adds to `batch` the index entry of a block that has none yet, and the new count.
fn index_if_absent<V: KvView + ?Sized>(
    store: &V,
    block_id: &BlockId,
    batch: &mut Vec<KvWrite>,
) -> Result<(), StorageError> {
    let key = index_key(block_id);
    if store.get(&key)?.is_none() {
        let count = block_count(store)?.saturating_add(1);
        batch.push(KvWrite::put(key, Vec::new()));
        batch.push(KvWrite::put(COUNT, count.to_be_bytes()));
    }
    Ok(())
}

/// The store key of a metadata key (see the module documentation).
fn meta_key(key: &str) -> Vec<u8> {
    let bytes = key.as_bytes();
    match bytes.split_at_checked(META_INLINE_BYTES) {
        Some((head, tail)) if !tail.is_empty() => {
            let mut out = long_meta_group(head);
            out.extend_from_slice(&Sha256::digest(bytes));
            out
        }
        _ => {
            let mut out = Vec::with_capacity(1 + bytes.len());
            out.push(META);
            out.extend_from_slice(bytes);
            out
        }
    }
}

/// The store key prefix shared by the long metadata keys that start with `head`
/// ([`META_INLINE_BYTES`] bytes).
fn long_meta_group(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_KEY_BYTES);
    out.push(META);
    out.extend_from_slice(head);
    out.push(LONG_META);
    out
}

fn is_long_meta(store_key: &[u8]) -> bool {
    store_key.len() > 1 + META_INLINE_BYTES
}

/// The stored value of a metadata key: the value itself, or for a long key its length, the key
/// and the value.
fn meta_value(key: &str, value: &[u8]) -> Result<Vec<u8>, StorageError> {
    if key.len() <= META_INLINE_BYTES {
        return Ok(value.to_vec());
    }
    let len =
        u32::try_from(key.len()).map_err(|_| StorageError::Invalid(format!("metadata key of {} bytes", key.len())))?;
    let mut out = Vec::with_capacity(4 + key.len() + value.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(value);
    Ok(out)
}

/// The store write of a metadata write.
fn meta_write(write: &MetaWrite) -> Result<KvWrite, StorageError> {
    Ok(match write {
        MetaWrite::Put(key, value) => KvWrite::put(meta_key(key), meta_value(key, value)?),
        MetaWrite::Delete(key) => KvWrite::delete(meta_key(key)),
    })
}

/// A stored metadata entry as `(key, value)`; a long key is checked against its store key.
fn decode_meta(engine: &str, store_key: &[u8], mut stored: Vec<u8>) -> Result<(String, Vec<u8>), StorageError> {
    let bad = |what: &str| corrupt(engine, format!("metadata entry {}: {what}", String::from_utf8_lossy(store_key)));
    if !is_long_meta(store_key) {
        let key = store_key.get(1..).ok_or_else(|| bad("empty key"))?;
        let key = std::str::from_utf8(key).map_err(|_| bad("the key is not UTF-8"))?;
        return Ok((key.to_owned(), stored));
    }
    let (len, rest) = stored.split_first_chunk::<4>().ok_or_else(|| bad("truncated key length"))?;
    let len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| bad("key length overflows"))?;
    let key = rest.get(..len).ok_or_else(|| bad("truncated key"))?;
    let key = std::str::from_utf8(key).map_err(|_| bad("the key is not UTF-8"))?.to_owned();
    if meta_key(&key) != store_key {
        return Err(bad("the stored key does not hash to its store key"));
    }
    let value = stored.split_off(4 + len);
    Ok((key, value))
}

/// `list_meta` over the store (see the module documentation for long keys).
fn list_meta_in<S: KvStore>(store: &S, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let engine = store.name();
    let decode = |raw: Vec<KvEntry>| -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        raw.into_iter().map(|(key, value)| decode_meta(engine, &key, value)).collect()
    };
    let mut entries = match prefix.as_bytes().split_at_checked(META_INLINE_BYTES) {
        // Every match is a long key of one group: read the group, keep the matches.
        Some((head, tail)) if !tail.is_empty() => {
            let group = long_meta_group(head);
            let mut entries = decode(store.scan(&group, &group, usize::MAX)?)?;
            entries.retain(|(key, _)| key.starts_with(prefix));
            entries
        }
        _ => {
            let start = meta_key(prefix);
            let raw = store.scan(&start, &start, limit)?;
            // The limit may cut a group of long keys, which is sorted by hash: read all of it.
            let cut = match raw.last() {
                Some((last, _)) if raw.len() == limit && is_long_meta(last) => {
                    let group = last.get(..2 + META_INLINE_BYTES).unwrap_or(last).to_vec();
                    let mut after = last.clone();
                    after.push(0);
                    Some((group, after))
                }
                _ => None,
            };
            let mut entries = decode(raw)?;
            if let Some((group, after)) = cut {
                entries.extend(decode(store.scan(&group, &after, usize::MAX)?)?);
            }
            entries
        }
    };
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries.truncate(limit);
    Ok(entries)
}

#[async_trait]
impl<S: KvStore> RawStorage for KvBlockStorage<S> {
    async fn latest(&self, block_id: &BlockId) -> Result<Option<TrxRev>, StorageError> {
        let prefix = block_prefix(block_id)?;
        self.read(move |store| latest_in(store, &prefix)).await
    }

    async fn revisions(&self, block_id: &BlockId, from_rev: u64, to_rev: u64) -> Result<Vec<TrxRev>, StorageError> {
        if from_rev > to_rev {
            return Ok(Vec::new());
        }
        let prefix = block_prefix(block_id)?;
        self.read(move |store| {
            // Start at the newest revision that can be in range, and read at most the range.
            let Some(latest) = latest_in(store, &prefix)? else {
                return Ok(Vec::new());
            };
            let to_rev = to_rev.min(latest.rev);
            if from_rev > to_rev {
                return Ok(Vec::new());
            }
            let limit = usize::try_from(to_rev - from_rev).map_or(usize::MAX, |n| n.saturating_add(1));
            let log = record(&prefix, REVISION, &[]);
            let engine = store.name();
            let mut out = Vec::new();
            for (key, trx) in store.scan(&log, &log_key(&prefix, to_rev), limit)? {
                let rev = rev_of_log_key(engine, &key)?;
                if rev < from_rev {
                    break;
                }
                out.push(TrxRev { trx_id: decode_trx(engine, &trx)?, rev });
            }
            out.reverse();
            Ok(out)
        })
        .await
    }

    async fn revision_at_or_before(&self, block_id: &BlockId, at_rev: u64) -> Result<Option<TrxRev>, StorageError> {
        let prefix = block_prefix(block_id)?;
        self.read(move |store| {
            let engine = store.name();
            match store.scan(&record(&prefix, REVISION, &[]), &log_key(&prefix, at_rev), 1)?.into_iter().next() {
                Some((key, trx)) => {
                    Ok(Some(TrxRev { trx_id: decode_trx(engine, &trx)?, rev: rev_of_log_key(engine, &key)? }))
                }
                None => Ok(None),
            }
        })
        .await
    }

    async fn committed(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<CommittedTransform>, StorageError> {
        let key = record(&block_prefix(block_id)?, COMMITTED, trx_id.as_bytes());
        self.read(move |store| {
            let engine = store.name();
            match store.get(&key)? {
                Some(bytes) => {
                    let (rev, json) = split_rev(engine, "a committed transform", &bytes)?;
                    Ok(Some(CommittedTransform { rev, transform: from_json(engine, "a committed transform", json)? }))
                }
                None => Ok(None),
            }
        })
        .await
    }

    async fn pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<Transform>, StorageError> {
        let key = record(&block_prefix(block_id)?, PENDING, trx_id.as_bytes());
        self.read(move |store| {
            store.get(&key)?.map(|bytes| from_json(store.name(), "a pending transform", &bytes)).transpose()
        })
        .await
    }

    async fn pending_trx_ids(&self, block_id: &BlockId) -> Result<Vec<TrxId>, StorageError> {
        let pending = record(&block_prefix(block_id)?, PENDING, &[]);
        self.read(move |store| {
            let engine = store.name();
            let entries = store.scan(&pending, &pending, usize::MAX)?;
            entries.iter().map(|(key, _)| decode_trx(engine, key.get(pending.len()..).unwrap_or_default())).collect()
        })
        .await
    }

    async fn save_pending(
        &self,
        block_id: &BlockId,
        trx_id: &TrxId,
        transform: &Transform,
    ) -> Result<(), StorageError> {
        let mutation = Mutation::save_pending(self.store().name(), block_id, trx_id, transform)?;
        self.mutate(move |store| mutation.batch(store)).await
    }

    async fn delete_pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<(), StorageError> {
        let mutation = Mutation::delete_pending(block_id, trx_id)?;
        self.mutate(move |store| mutation.batch(store)).await
    }

    /// The stored bytes are read every time; they are parsed only when the value cache has no
    /// decoded value for exactly these bytes (see [`super::values`]).
    async fn materialized(&self, block_id: &BlockId, rev: u64) -> Result<Option<BlockValue>, StorageError> {
        let prefix = block_prefix(block_id)?;
        let key = record(&prefix, VALUE, &rev.to_be_bytes());
        self.run(S::READS_WAIT, move |shared| {
            let Some(bytes) = shared.store.get(&key)? else {
                return Ok(None);
            };
            match shared.values.get(&prefix, rev, &bytes) {
                Some(value) => Ok(Some(value)),
                None => from_json(shared.store.name(), "a materialized value", &bytes).map(Some),
            }
        })
        .await
    }

    async fn commit_block(&self, block_id: &BlockId, commit: &BlockCommit) -> Result<(), StorageError> {
        let (mutation, cached) = Mutation::commit(self.store().name(), &self.shared.values, block_id, commit)?;
        self.mutate(move |store| mutation.batch(store)).await?;
        if let Some((prefix, json)) = cached {
            self.shared.values.put(prefix, commit.rev, json, commit.value.clone());
        }
        Ok(())
    }

    /// One store batch, built under the writer lock with each mutation checked against the
    /// store plus the mutations before it: all or nothing, with one sync (shared with other
    /// calls through group commit) on a durable store.
    async fn apply(&self, writes: &[StorageWrite]) -> Result<(), StorageError> {
        if writes.is_empty() {
            return Ok(());
        }
        let engine = self.store().name();
        let mut mutations = Vec::with_capacity(writes.len());
        let mut cached = Vec::new();
        for write in writes {
            mutations.push(match write {
                StorageWrite::SavePending { block_id, trx_id, transform } => {
                    Mutation::save_pending(engine, block_id, trx_id, transform)?
                }
                StorageWrite::DeletePending { block_id, trx_id } => Mutation::delete_pending(block_id, trx_id)?,
                StorageWrite::Commit { block_id, commit } => {
                    let (mutation, keep) = Mutation::commit(engine, &self.shared.values, block_id, commit)?;
                    if let Some((prefix, json)) = keep {
                        cached.push((prefix, commit.rev, json, commit.value.clone()));
                    }
                    mutation
                }
                StorageWrite::Meta(write) => Mutation::meta(write)?,
            });
        }
        self.mutate(move |store| {
            let mut staged = Staged::new(store);
            for mutation in mutations {
                let batch = mutation.batch(&staged)?;
                staged.stage(batch);
            }
            Ok(staged.batch)
        })
        .await?;
        for (prefix, rev, json, value) in cached {
            self.shared.values.put(prefix, rev, json, value);
        }
        Ok(())
    }

    fn atomic_apply(&self) -> bool {
        true
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let (key, store_key) = (key.to_owned(), meta_key(key));
        self.read(move |store| match store.get(&store_key)? {
            Some(stored) => {
                let (stored_key, value) = decode_meta(store.name(), &store_key, stored)?;
                if stored_key == key {
                    Ok(Some(value))
                } else {
                    Err(corrupt(store.name(), format!("metadata key {key:?} reads back as {stored_key:?}")))
                }
            }
            None => Ok(None),
        })
        .await
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.write(vec![KvWrite::put(meta_key(key), meta_value(key, value)?)]).await
    }

    async fn delete_meta(&self, key: &str) -> Result<(), StorageError> {
        self.write(vec![KvWrite::delete(meta_key(key))]).await
    }

    /// One store batch: all or nothing, with one sync on a durable store.
    async fn write_meta(&self, writes: &[MetaWrite]) -> Result<(), StorageError> {
        let batch = writes.iter().map(meta_write).collect::<Result<Vec<_>, StorageError>>()?;
        self.write(batch).await
    }

    async fn list_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let prefix = prefix.to_owned();
        self.read(move |store| list_meta_in(store, &prefix, limit)).await
    }

    fn durable(&self) -> bool {
        self.store().durable()
    }

    async fn block_ids(&self, after: Option<&BlockId>, limit: usize) -> Result<Vec<BlockId>, StorageError> {
        // The first key after `i<after>` is `i<after>` followed by a zero byte.
        let start = match after {
            Some(after) => {
                let mut start = index_key(after);
                start.push(0);
                start
            }
            None => vec![INDEX],
        };
        self.read(move |store| {
            let engine = store.name();
            let mut ids = Vec::new();
            for (key, _) in store.scan(&[INDEX], &start, limit)? {
                let id = std::str::from_utf8(key.get(1..).unwrap_or_default())
                    .map_err(|_| corrupt(engine, "an indexed block id is not UTF-8"))?;
                ids.push(BlockId::new(id).map_err(|e| corrupt(engine, e))?);
            }
            Ok(ids)
        })
        .await
    }

    /// The block count is one stored number; the bytes are the store's own figure.
    async fn stats(&self) -> Result<Option<StorageStats>, StorageError> {
        self.read(|store| Ok(Some(StorageStats { blocks: block_count(store)?, bytes: store.size_bytes()? }))).await
    }

    /// Also drops the decoded values kept (a closed store answers no read anyway).
    async fn close(&self) -> Result<(), StorageError> {
        self.shared.values.clear();
        self.run(S::WRITES_WAIT, |shared| shared.store.close()).await
    }
}

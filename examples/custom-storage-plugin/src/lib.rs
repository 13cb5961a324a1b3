//! A template storage plugin: [`SnapshotStorage`], registered as `storage example-snapshot`.
//!
//! Copy this crate to start a new storage engine. It shows the three things every storage plugin
//! has:
//!
//! 1. an engine type implementing [`RawStorage`] (this file, `impl RawStorage for SnapshotStorage`);
//! 2. a builder that turns the plugin's configuration section into that engine, refusing options it
//!    does not know ([`build`]);
//! 3. an `inventory::submit!` registration so the node finds the builder by name (at the bottom of
//!    this file), plus `tests/conformance.rs`, which runs the shared conformance suite.
//!
//! The engine itself is deliberately simple: every piece of state lives in one
//! `std::sync::Mutex<State>` made of `BTreeMap`s. Holding one lock for each call makes every call
//! atomic for free, which is the hardest part of the contract; a real engine replaces the maps with
//! its own tables (files, LMDB databases, SQL tables) and the lock with its own transactions.
//!
//! The engine is not durable: everything is lost when the process ends, so
//! [`RawStorage::durable`] answers `false`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use optimystic_core::registry::{PluginContext, PluginDescriptor, PluginError};
use optimystic_core::storage::{BlockCommit, BlockValue, CommittedTransform, RawStorage, StorageStats};
use optimystic_core::{BlockId, StorageError, Transform, TrxId, TrxRev};
use serde_json::Value;

/// The name configuration uses to pick this engine (`[storage] kind = "example-snapshot"`).
pub const PLUGIN_NAME: &str = "example-snapshot";

/// How this engine names itself in [`StorageError::Backend`] and [`PluginError::Config`].
const ENGINE: &str = "storage example-snapshot";

/// Everything the engine stores. One table per kind of record the contract mentions, each keyed
/// first by block id so a per-block lookup is a single map access.
///
/// Invariant kept by every method: no inner map is left empty. An entry in `latest` or `pending`
/// therefore means "this block exists for `block_ids`", which keeps `block_ids` and `stats` cheap.
#[derive(Debug, Default)]
struct State {
    /// Per block, the newest committed revision (`latest` in the spec).
    latest: BTreeMap<BlockId, TrxRev>,
    /// Per block, the revision log: `rev -> trxId`, ascending by revision.
    revisions: BTreeMap<BlockId, BTreeMap<u64, TrxId>>,
    /// Per block, the transforms of committed transactions, with the revision each produced.
    committed: BTreeMap<BlockId, BTreeMap<TrxId, CommittedTransform>>,
    /// Per block, the transforms of pending transactions. A `BTreeMap` keeps the ids sorted, which
    /// is what [`RawStorage::pending_trx_ids`] must return.
    pending: BTreeMap<BlockId, BTreeMap<TrxId, Transform>>,
    /// Per block, the materialized block values kept at some revisions (`None` = deleted there).
    values: BTreeMap<BlockId, BTreeMap<u64, BlockValue>>,
    /// Node metadata (consensus promises, executed markers), sorted by key for `list_meta`.
    meta: BTreeMap<String, Vec<u8>>,
    /// Set by [`RawStorage::close`]; every later call is refused.
    closed: bool,
}

/// Options of the engine, parsed from its configuration section by [`build`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Keep every materialized value, ignoring [`BlockCommit::prune_value_at`] (config key
    /// `keep_all_values`, default `false`). Pruning is optional in the contract, so both settings
    /// conform; keeping everything trades memory for faster reads at old revisions.
    pub keep_all_values: bool,
}

/// A from-scratch, in-memory [`RawStorage`] engine: all state in one mutex of `BTreeMap`s.
#[derive(Debug, Default, Clone)]
pub struct SnapshotStorage {
    /// Shared so clones of the handle see the same store.
    state: Arc<Mutex<State>>,
    /// The options it was built with.
    options: SnapshotOptions,
}

impl SnapshotStorage {
    /// An empty store with default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store with the given options.
    pub fn with_options(options: SnapshotOptions) -> Self {
        Self { state: Arc::default(), options }
    }

    /// Locks the store for one call.
    ///
    /// Every trait method takes this lock once and does all its work under it, so each call is
    /// atomic and sees every call that finished before it (read-your-writes). The lock is never
    /// held across an `.await`, so a plain `std::sync::Mutex` is right here.
    ///
    /// A poisoned lock (a thread panicked inside it) becomes a [`StorageError::Backend`] instead of
    /// a panic, and a closed store refuses the call with [`StorageError::Invalid`].
    fn state(&self) -> Result<MutexGuard<'_, State>, StorageError> {
        let guard = self.state.lock().map_err(|_| StorageError::Backend {
            engine: ENGINE,
            message: "a thread panicked while holding the store".into(),
        })?;
        if guard.closed {
            return Err(StorageError::Invalid("the store is closed".into()));
        }
        Ok(guard)
    }
}

#[async_trait]
impl RawStorage for SnapshotStorage {
    /// One map lookup: `latest` is only ever set by `commit_block`.
    async fn latest(&self, block_id: &BlockId) -> Result<Option<TrxRev>, StorageError> {
        Ok(self.state()?.latest.get(block_id).cloned())
    }

    /// A range scan of the block's revision log. `BTreeMap::range` panics on an inverted range,
    /// so that case (which the contract says gives an empty list) is answered first.
    async fn revisions(&self, block_id: &BlockId, from_rev: u64, to_rev: u64) -> Result<Vec<TrxRev>, StorageError> {
        if from_rev > to_rev {
            return Ok(Vec::new());
        }
        let state = self.state()?;
        let Some(log) = state.revisions.get(block_id) else {
            return Ok(Vec::new());
        };
        Ok(log.range(from_rev..=to_rev).map(|(rev, trx_id)| TrxRev { trx_id: trx_id.clone(), rev: *rev }).collect())
    }

    /// The last entry of the range `..=at_rev` is the newest revision not after `at_rev`.
    async fn revision_at_or_before(&self, block_id: &BlockId, at_rev: u64) -> Result<Option<TrxRev>, StorageError> {
        let state = self.state()?;
        Ok(state
            .revisions
            .get(block_id)
            .and_then(|log| log.range(..=at_rev).next_back())
            .map(|(rev, trx_id)| TrxRev { trx_id: trx_id.clone(), rev: *rev }))
    }

    async fn committed(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<CommittedTransform>, StorageError> {
        Ok(self.state()?.committed.get(block_id).and_then(|c| c.get(trx_id)).cloned())
    }

    async fn pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<Transform>, StorageError> {
        Ok(self.state()?.pending.get(block_id).and_then(|p| p.get(trx_id)).cloned())
    }

    /// The keys of a `BTreeMap` come out sorted, as the contract requires.
    async fn pending_trx_ids(&self, block_id: &BlockId) -> Result<Vec<TrxId>, StorageError> {
        Ok(self.state()?.pending.get(block_id).map(|p| p.keys().cloned().collect()).unwrap_or_default())
    }

    /// `insert` replaces an existing entry, so saving the same transform twice is idempotent.
    async fn save_pending(&self, block_id: &BlockId, trx_id: &TrxId, transform: &Transform) -> Result<(), StorageError> {
        let mut state = self.state()?;
        state.pending.entry(block_id.clone()).or_default().insert(trx_id.clone(), transform.clone());
        Ok(())
    }

    /// Idempotent: removing an absent entry is not an error. When the block's last pending
    /// transform goes, its (now empty) inner map goes too, so a block that was only ever pending
    /// and then cancelled disappears from `block_ids` and `stats`.
    async fn delete_pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<(), StorageError> {
        let mut state = self.state()?;
        if let Some(pending) = state.pending.get_mut(block_id) {
            pending.remove(trx_id);
            if pending.is_empty() {
                state.pending.remove(block_id);
            }
        }
        Ok(())
    }

    /// `None`: no value kept at `rev`; `Some(None)`: kept, and the block is deleted at `rev`. The
    /// stored `BlockValue` is exactly that inner option, so a clone of the entry is the answer.
    async fn materialized(&self, block_id: &BlockId, rev: u64) -> Result<Option<BlockValue>, StorageError> {
        Ok(self.state()?.values.get(block_id).and_then(|v| v.get(&rev)).cloned())
    }

    /// The per-block commit step, all or nothing.
    ///
    /// Everything that can fail is checked before anything is written: the revision must advance
    /// `latest`, otherwise the call is refused with [`StorageError::Invalid`] and nothing changes.
    /// After the check only infallible map inserts and removes follow, all under the one lock, so
    /// no reader can observe a half-applied commit. (A durable engine would do the same writes
    /// inside one transaction of its backing store.)
    async fn commit_block(&self, block_id: &BlockId, commit: &BlockCommit) -> Result<(), StorageError> {
        let mut state = self.state()?;

        // 1. Validate: refuse a revision that does not exceed the current latest.
        if let Some(latest) = state.latest.get(block_id)
            && commit.rev <= latest.rev
        {
            return Err(StorageError::Invalid(format!(
                "commit of {} at rev {} does not advance latest rev {} of {block_id}",
                commit.trx_id, commit.rev, latest.rev
            )));
        }

        // 2. Store the materialized value at the new revision, and drop the one the caller no
        //    longer needs (unless configured to keep all; never the value just written).
        let values = state.values.entry(block_id.clone()).or_default();
        values.insert(commit.rev, commit.value.clone());
        if !self.options.keep_all_values
            && let Some(prune) = commit.prune_value_at.filter(|rev| *rev != commit.rev)
        {
            values.remove(&prune);
        }

        // 3. Record `rev -> trxId` in the revision log.
        state.revisions.entry(block_id.clone()).or_default().insert(commit.rev, commit.trx_id.clone());

        // 4. Store the transform as committed, with the revision it produced.
        state
            .committed
            .entry(block_id.clone())
            .or_default()
            .insert(commit.trx_id.clone(), CommittedTransform { rev: commit.rev, transform: commit.transform.clone() });

        // 5. Delete the transaction's pending transform (keeping the "no empty inner map" rule).
        if let Some(pending) = state.pending.get_mut(block_id) {
            pending.remove(&commit.trx_id);
            if pending.is_empty() {
                state.pending.remove(block_id);
            }
        }

        // 6. Advance latest.
        state.latest.insert(block_id.clone(), TrxRev { trx_id: commit.trx_id.clone(), rev: commit.rev });
        Ok(())
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.state()?.meta.get(key).cloned())
    }

    /// `insert` replaces, so writing the same value again is idempotent.
    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.state()?.meta.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    /// Idempotent: removing an absent key is `Ok`.
    async fn delete_meta(&self, key: &str) -> Result<(), StorageError> {
        self.state()?.meta.remove(key);
        Ok(())
    }

    /// Keys sharing a prefix are contiguous in a sorted map: start at `prefix`, stop at the first
    /// key that no longer starts with it, and never return more than `limit` entries.
    async fn list_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let state = self.state()?;
        Ok(state
            .meta
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .take(limit)
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect())
    }

    /// Nothing survives the process, so: not durable.
    fn durable(&self) -> bool {
        false
    }

    /// A block is listed when it has a committed revision (a `latest` entry) or a pending
    /// transform (a non-empty `pending` entry).
    ///
    /// Pagination: both maps are sorted, so take at most `limit` ids strictly after `after` from
    /// each, merge them in a sorted set (a block in both appears once) and keep the first `limit`.
    /// The first `limit` ids of the union are always among the first `limit` of each side.
    async fn block_ids(&self, after: Option<&BlockId>, limit: usize) -> Result<Vec<BlockId>, StorageError> {
        let state = self.state()?;
        let start = match after {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        let committed = state.latest.range::<BlockId, _>((start, Bound::Unbounded)).map(|(id, _)| id).take(limit);
        let pending = state.pending.range::<BlockId, _>((start, Bound::Unbounded)).map(|(id, _)| id).take(limit);
        let merged: BTreeSet<&BlockId> = committed.chain(pending).collect();
        Ok(merged.into_iter().take(limit).cloned().collect())
    }

    /// Counts the blocks `block_ids` lists: every block with a `latest`, plus the blocks that are
    /// only pending. This walks the pending table (usually small), never the whole store.
    async fn stats(&self) -> Result<Option<StorageStats>, StorageError> {
        let state = self.state()?;
        let only_pending = state.pending.keys().filter(|id| !state.latest.contains_key(*id)).count();
        let blocks = state.latest.len().saturating_add(only_pending);
        Ok(Some(StorageStats { blocks: u64::try_from(blocks).unwrap_or(u64::MAX), bytes: None }))
    }

    /// Marks the store closed; later calls fail with [`StorageError::Invalid`]. Idempotent: it
    /// bypasses [`SnapshotStorage::state`] (which refuses a closed store), so a second close is
    /// `Ok`. There is nothing to flush in memory; a durable engine would flush and release its
    /// files or locks here.
    async fn close(&self) -> Result<(), StorageError> {
        match self.state.lock() {
            Ok(mut state) => state.closed = true,
            // A poisoned store is unusable anyway; mark it closed all the same.
            Err(poisoned) => poisoned.into_inner().closed = true,
        }
        Ok(())
    }
}

/// Builds the engine from its configuration section (the `[storage]` table of the node config).
///
/// Accepted: no section at all (`null`), or an object whose keys are `kind` (the plugin name the
/// node used to pick this builder) and the options of [`SnapshotOptions`]. Any other key, a value
/// of the wrong type or a section that is not an object is refused with [`PluginError::Config`],
/// so a typo in a config file fails loudly at start-up instead of being ignored.
pub fn build(_cx: &PluginContext, config: &Value) -> Result<Arc<dyn RawStorage>, PluginError> {
    Ok(Arc::new(SnapshotStorage::with_options(parse_options(config)?)))
}

/// Parses and validates the configuration section; see [`build`].
pub fn parse_options(config: &Value) -> Result<SnapshotOptions, PluginError> {
    let error = |message: String| PluginError::Config { plugin: ENGINE.to_owned(), message };
    let map = match config {
        Value::Null => return Ok(SnapshotOptions::default()),
        Value::Object(map) => map,
        other => return Err(error(format!("expected an object, got {other}"))),
    };
    let mut options = SnapshotOptions::default();
    for (key, value) in map {
        match (key.as_str(), value) {
            ("kind", _) => {}
            ("keep_all_values", Value::Bool(keep)) => options.keep_all_values = *keep,
            ("keep_all_values", other) => return Err(error(format!("keep_all_values must be a boolean, got {other}"))),
            (unknown, _) => return Err(error(format!("unknown option {unknown:?}; known options: keep_all_values"))),
        }
    }
    Ok(options)
}

// Registration: `inventory` collects this descriptor at link time, and the node finds it by kind
// (`storage`) and name. A binary must link this crate (`use optimystic_example_custom_storage as _;`)
// for the registration to be seen.
optimystic_core::inventory::submit! {
    PluginDescriptor::storage(PLUGIN_NAME, "example template: blocks in sorted in-memory maps (not durable)", build)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use optimystic_core::identity::PeerId;
    use optimystic_core::registry::Registry;
    use serde_json::json;

    use super::*;

    #[test]
    fn registered_under_its_name() {
        let cx = PluginContext::new(PeerId::random());
        let storage = Registry::linked().build_storage(PLUGIN_NAME, &cx, &json!({ "kind": PLUGIN_NAME })).expect("build");
        assert!(!storage.durable());
    }

    #[test]
    fn config_is_validated() {
        assert_eq!(parse_options(&Value::Null).unwrap(), SnapshotOptions::default());
        assert_eq!(
            parse_options(&json!({ "kind": PLUGIN_NAME, "keep_all_values": true })).unwrap(),
            SnapshotOptions { keep_all_values: true }
        );
        for bad in [json!({ "keep_all_value": true }), json!({ "keep_all_values": "yes" }), json!(3)] {
            assert!(matches!(parse_options(&bad), Err(PluginError::Config { .. })), "{bad} must be refused");
        }
    }
}

//! In-memory [`RawStorage`], registered as `storage memory`.
//!
//! Not durable: everything is lost when the process ends. Each block's state sits behind its own
//! mutex, so operations on different blocks never contend; the per-block commit step is atomic
//! because it happens under that mutex.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use optimystic_core::registry::{PluginContext, PluginDescriptor, PluginError};
use optimystic_core::storage::{BlockCommit, BlockValue, CommittedTransform, RawStorage, StorageStats};
use optimystic_core::{BlockId, StorageError, Transform, TrxId, TrxRev};
use serde_json::Value;

#[derive(Debug, Default)]
struct BlockState {
    latest: Option<TrxRev>,
    revisions: BTreeMap<u64, TrxId>,
    committed: HashMap<TrxId, CommittedTransform>,
    pending: BTreeMap<TrxId, Transform>,
    values: BTreeMap<u64, BlockValue>,
}

#[derive(Debug, Default)]
struct State {
    blocks: BTreeMap<BlockId, BlockState>,
    meta: BTreeMap<String, Vec<u8>>,
    closed: bool,
}

/// Blocks and metadata in memory.
#[derive(Debug, Default, Clone)]
pub struct MemoryStorage {
    state: Arc<Mutex<State>>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> Result<MutexGuard<'_, State>, StorageError> {
        let guard = self.state.lock().map_err(|_| StorageError::Backend {
            engine: "memory",
            message: "a thread panicked while holding the store".into(),
        })?;
        if guard.closed {
            return Err(StorageError::Invalid("the store is closed".into()));
        }
        Ok(guard)
    }

    fn read<T>(&self, block_id: &BlockId, f: impl FnOnce(&BlockState) -> T) -> Result<Option<T>, StorageError> {
        Ok(self.state()?.blocks.get(block_id).map(f))
    }
}

#[async_trait]
impl RawStorage for MemoryStorage {
    async fn latest(&self, block_id: &BlockId) -> Result<Option<TrxRev>, StorageError> {
        Ok(self.read(block_id, |b| b.latest.clone())?.flatten())
    }

    async fn revisions(&self, block_id: &BlockId, from_rev: u64, to_rev: u64) -> Result<Vec<TrxRev>, StorageError> {
        if from_rev > to_rev {
            return Ok(Vec::new());
        }
        Ok(self
            .read(block_id, |b| {
                b.revisions
                    .range(from_rev..=to_rev)
                    .map(|(rev, trx_id)| TrxRev { trx_id: trx_id.clone(), rev: *rev })
                    .collect()
            })?
            .unwrap_or_default())
    }

    async fn revision_at_or_before(&self, block_id: &BlockId, at_rev: u64) -> Result<Option<TrxRev>, StorageError> {
        Ok(self
            .read(block_id, |b| {
                b.revisions.range(..=at_rev).next_back().map(|(rev, trx_id)| TrxRev { trx_id: trx_id.clone(), rev: *rev })
            })?
            .flatten())
    }

    async fn committed(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<CommittedTransform>, StorageError> {
        Ok(self.read(block_id, |b| b.committed.get(trx_id).cloned())?.flatten())
    }

    async fn pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<Transform>, StorageError> {
        Ok(self.read(block_id, |b| b.pending.get(trx_id).cloned())?.flatten())
    }

    async fn pending_trx_ids(&self, block_id: &BlockId) -> Result<Vec<TrxId>, StorageError> {
        Ok(self.read(block_id, |b| b.pending.keys().cloned().collect())?.unwrap_or_default())
    }

    async fn save_pending(&self, block_id: &BlockId, trx_id: &TrxId, transform: &Transform) -> Result<(), StorageError> {
        let mut state = self.state()?;
        state.blocks.entry(block_id.clone()).or_default().pending.insert(trx_id.clone(), transform.clone());
        Ok(())
    }

    async fn delete_pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<(), StorageError> {
        let mut state = self.state()?;
        let now_empty = match state.blocks.get_mut(block_id) {
            Some(block) => {
                block.pending.remove(trx_id);
                block.latest.is_none() && block.pending.is_empty()
            }
            None => false,
        };
        if now_empty {
            state.blocks.remove(block_id);
        }
        Ok(())
    }

    async fn materialized(&self, block_id: &BlockId, rev: u64) -> Result<Option<BlockValue>, StorageError> {
        Ok(self.read(block_id, |b| b.values.get(&rev).cloned())?.flatten())
    }

    async fn commit_block(&self, block_id: &BlockId, commit: &BlockCommit) -> Result<(), StorageError> {
        let mut state = self.state()?;
        let block = state.blocks.entry(block_id.clone()).or_default();
        if let Some(latest) = &block.latest
            && latest.rev >= commit.rev
        {
            return Err(StorageError::Invalid(format!(
                "commit of {} at rev {} does not advance latest rev {} of {block_id}",
                commit.trx_id, commit.rev, latest.rev
            )));
        }
        block.values.insert(commit.rev, commit.value.clone());
        if let Some(prune) = commit.prune_value_at.filter(|r| *r != commit.rev) {
            block.values.remove(&prune);
        }
        block.revisions.insert(commit.rev, commit.trx_id.clone());
        block
            .committed
            .insert(commit.trx_id.clone(), CommittedTransform { rev: commit.rev, transform: commit.transform.clone() });
        block.pending.remove(&commit.trx_id);
        block.latest = Some(TrxRev { trx_id: commit.trx_id.clone(), rev: commit.rev });
        Ok(())
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.state()?.meta.get(key).cloned())
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.state()?.meta.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    async fn delete_meta(&self, key: &str) -> Result<(), StorageError> {
        self.state()?.meta.remove(key);
        Ok(())
    }

    async fn list_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        Ok(self
            .state()?
            .meta
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn durable(&self) -> bool {
        false
    }

    async fn block_ids(&self, after: Option<&BlockId>, limit: usize) -> Result<Vec<BlockId>, StorageError> {
        let state = self.state()?;
        let ids = state.blocks.keys().filter(|id| after.is_none_or(|a| *id > a)).take(limit).cloned().collect();
        Ok(ids)
    }

    async fn stats(&self) -> Result<Option<StorageStats>, StorageError> {
        let blocks = u64::try_from(self.state()?.blocks.len()).unwrap_or(u64::MAX);
        Ok(Some(StorageStats { blocks, bytes: None }))
    }

    async fn close(&self) -> Result<(), StorageError> {
        if let Ok(mut state) = self.state.lock() {
            state.closed = true;
        }
        Ok(())
    }
}

fn build(_cx: &PluginContext, config: &Value) -> Result<Arc<dyn RawStorage>, PluginError> {
    match config {
        Value::Null => {}
        Value::Object(map) if map.keys().all(|k| k == "kind") => {}
        other => {
            return Err(PluginError::Config {
                plugin: "storage memory".into(),
                message: format!("takes no options, got {other}"),
            });
        }
    }
    Ok(Arc::new(MemoryStorage::new()))
}

optimystic_core::inventory::submit! {
    PluginDescriptor::storage("memory", "blocks in memory; lost when the process ends", build)
}

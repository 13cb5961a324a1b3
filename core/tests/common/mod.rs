//! A tiny in-test [`RawStorage`] (core cannot use the memory plugin without a dependency cycle),
//! with a dump of its whole state for before / after comparisons.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use optimystic_core::storage::{BlockCommit, BlockValue, CommittedTransform, RawStorage};
use optimystic_core::{BlockId, StorageError, Transform, TrxId, TrxRev};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct MiniBlock {
    pub latest: Option<TrxRev>,
    pub revisions: BTreeMap<u64, TrxId>,
    pub committed: BTreeMap<TrxId, CommittedTransform>,
    pub pending: BTreeMap<TrxId, Transform>,
    pub values: BTreeMap<u64, BlockValue>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct MiniState {
    pub blocks: BTreeMap<BlockId, MiniBlock>,
    pub meta: BTreeMap<String, Vec<u8>>,
}

/// Everything in one mutex; not durable.
#[derive(Debug, Default)]
pub struct MiniStorage {
    state: Mutex<MiniState>,
}

impl MiniStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of everything stored.
    pub fn dump(&self) -> MiniState {
        self.state.lock().unwrap().clone()
    }

    fn with<T>(&self, f: impl FnOnce(&mut MiniState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    fn read<T>(&self, id: &BlockId, f: impl FnOnce(&MiniBlock) -> T) -> Option<T> {
        self.with(|s| s.blocks.get(id).map(f))
    }
}

#[async_trait]
impl RawStorage for MiniStorage {
    async fn latest(&self, id: &BlockId) -> Result<Option<TrxRev>, StorageError> {
        Ok(self.read(id, |b| b.latest.clone()).flatten())
    }

    async fn revisions(&self, id: &BlockId, from: u64, to: u64) -> Result<Vec<TrxRev>, StorageError> {
        if from > to {
            return Ok(Vec::new());
        }
        Ok(self
            .read(id, |b| b.revisions.range(from..=to).map(|(r, t)| TrxRev { trx_id: t.clone(), rev: *r }).collect())
            .unwrap_or_default())
    }

    async fn revision_at_or_before(&self, id: &BlockId, at: u64) -> Result<Option<TrxRev>, StorageError> {
        Ok(self
            .read(id, |b| b.revisions.range(..=at).next_back().map(|(r, t)| TrxRev { trx_id: t.clone(), rev: *r }))
            .flatten())
    }

    async fn committed(&self, id: &BlockId, trx: &TrxId) -> Result<Option<CommittedTransform>, StorageError> {
        Ok(self.read(id, |b| b.committed.get(trx).cloned()).flatten())
    }

    async fn pending(&self, id: &BlockId, trx: &TrxId) -> Result<Option<Transform>, StorageError> {
        Ok(self.read(id, |b| b.pending.get(trx).cloned()).flatten())
    }

    async fn pending_trx_ids(&self, id: &BlockId) -> Result<Vec<TrxId>, StorageError> {
        Ok(self.read(id, |b| b.pending.keys().cloned().collect()).unwrap_or_default())
    }

    async fn save_pending(&self, id: &BlockId, trx: &TrxId, t: &Transform) -> Result<(), StorageError> {
        self.with(|s| s.blocks.entry(id.clone()).or_default().pending.insert(trx.clone(), t.clone()));
        Ok(())
    }

    async fn delete_pending(&self, id: &BlockId, trx: &TrxId) -> Result<(), StorageError> {
        self.with(|s| {
            let empty = s.blocks.get_mut(id).is_some_and(|b| {
                b.pending.remove(trx);
                b.latest.is_none() && b.pending.is_empty()
            });
            if empty {
                s.blocks.remove(id);
            }
        });
        Ok(())
    }

    async fn materialized(&self, id: &BlockId, rev: u64) -> Result<Option<BlockValue>, StorageError> {
        Ok(self.read(id, |b| b.values.get(&rev).cloned()).flatten())
    }

    async fn commit_block(&self, id: &BlockId, c: &BlockCommit) -> Result<(), StorageError> {
        self.with(|s| {
            let b = s.blocks.entry(id.clone()).or_default();
            if b.latest.as_ref().is_some_and(|l| l.rev >= c.rev) {
                return Err(StorageError::Invalid(format!("rev {} does not advance latest", c.rev)));
            }
            b.values.insert(c.rev, c.value.clone());
            if let Some(prune) = c.prune_value_at.filter(|p| *p != c.rev) {
                b.values.remove(&prune);
            }
            b.revisions.insert(c.rev, c.trx_id.clone());
            b.committed.insert(c.trx_id.clone(), CommittedTransform { rev: c.rev, transform: c.transform.clone() });
            b.pending.remove(&c.trx_id);
            b.latest = Some(TrxRev { trx_id: c.trx_id.clone(), rev: c.rev });
            Ok(())
        })
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.with(|s| s.meta.get(key).cloned()))
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.with(|s| s.meta.insert(key.to_owned(), value.to_vec()));
        Ok(())
    }

    async fn delete_meta(&self, key: &str) -> Result<(), StorageError> {
        self.with(|s| s.meta.remove(key));
        Ok(())
    }

    async fn list_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        Ok(self.with(|s| {
            s.meta
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }))
    }

    fn durable(&self) -> bool {
        false
    }

    async fn block_ids(&self, after: Option<&BlockId>, limit: usize) -> Result<Vec<BlockId>, StorageError> {
        Ok(self.with(|s| s.blocks.keys().filter(|id| after.is_none_or(|a| *id > a)).take(limit).cloned().collect()))
    }

    async fn close(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

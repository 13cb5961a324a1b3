//! [`MemoryKv`], a [`KvStore`] of one sorted map in memory, and [`MemoryStorage`], block storage
//! over it: the engine of the `storage memory` plugin, and the store tests of any crate use
//! without depending on a plugin.
//!
//! Not durable: everything is lost when the process ends. A batch is applied under the map's
//! write lock, so readers never see part of one; reads share the lock. Calls never wait on I/O, so
//! the adapter runs them inline on the calling task.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{KvBlockStorage, KvEntry, KvStore, KvWrite, MAX_KEY_BYTES, check_keys, scan_map};
use crate::error::StorageError;

/// The engine's name in errors.
const ENGINE: &str = "memory";

/// Block storage over a [`MemoryKv`] (the `storage memory` engine). `MemoryStorage::new()` is an
/// empty store; clones share it.
pub type MemoryStorage = KvBlockStorage<MemoryKv>;

/// A sorted map of byte keys in memory; `None` once closed.
#[derive(Debug)]
pub struct MemoryKv {
    map: RwLock<Option<BTreeMap<Vec<u8>, Vec<u8>>>>,
}

impl Default for MemoryKv {
    fn default() -> Self {
        Self { map: RwLock::new(Some(BTreeMap::new())) }
    }
}

impl MemoryKv {
    /// An empty, open store.
    pub fn new() -> Self {
        Self::default()
    }

    // The map is only changed by whole batches of infallible map operations, so a thread that
    // panicked while holding a lock left it consistent: a poisoned lock is used as it is.
    fn read(&self) -> RwLockReadGuard<'_, Option<BTreeMap<Vec<u8>, Vec<u8>>>> {
        self.map.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, Option<BTreeMap<Vec<u8>, Vec<u8>>>> {
        self.map.write().unwrap_or_else(PoisonError::into_inner)
    }
}

fn closed() -> StorageError {
    StorageError::Closed { engine: ENGINE }
}

impl KvStore for MemoryKv {
    const READS_WAIT: bool = false;
    const WRITES_WAIT: bool = false;

    fn name(&self) -> &'static str {
        ENGINE
    }

    fn durable(&self) -> bool {
        false
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.read().as_ref().ok_or_else(closed)?.get(key).cloned())
    }

    fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Vec<KvEntry>, StorageError> {
        Ok(scan_map(self.read().as_ref().ok_or_else(closed)?, prefix, start, limit))
    }

    /// Checks every key first, then applies the batch under the write lock.
    fn write(&self, batch: &[KvWrite], _durable: bool) -> Result<(), StorageError> {
        check_keys(ENGINE, batch, MAX_KEY_BYTES)?;
        let mut guard = self.write_lock();
        let map = guard.as_mut().ok_or_else(closed)?;
        for write in batch {
            match write {
                KvWrite::Put { key, value } => {
                    map.insert(key.clone(), value.clone());
                }
                KvWrite::Delete { key } => {
                    map.remove(key);
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.read().as_ref().map(|_| ()).ok_or_else(closed)
    }

    /// Drops the map.
    fn close(&self) -> Result<(), StorageError> {
        self.write_lock().take();
        Ok(())
    }
}

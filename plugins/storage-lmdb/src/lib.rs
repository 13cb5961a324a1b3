//! LMDB [`RawStorage`] (through heed), registered as `storage lmdb`.
//!
//! Durable: every mutation is one LMDB write transaction committed with LMDB's default durable
//! sync, and the per-block commit step of [`RawStorage::commit_block`] is exactly one transaction,
//! so after a crash a block is fully at its old or fully at its new revision. The map size is
//! fixed at open (`map_size_bytes`, default [`DEFAULT_MAP_SIZE`]); a full map fails the write with
//! [`StorageError::Full`], changing nothing.
//!
//! The data directory is locked while the store is open and carries a format marker (see
//! `optimystic_storage_file::datadir`); the environment lives in `<dir>/env`. Writes, which wait
//! for the disk, run on tokio's blocking thread pool; reads are lookups in the memory map and run
//! inline, which is several times faster than a hop to the pool (see BENCHMARKS.md).
//!
//! Configuration: `{"kind": "lmdb", "path": optional, "map_size_bytes": optional}`; without `path`
//! the store lives in `<node data dir>/storage-lmdb`, and a relative `path` is resolved against
//! the node's data directory.

mod env;
mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use optimystic_core::registry::{PluginContext, PluginDescriptor, PluginError};
use optimystic_core::storage::{BlockCommit, BlockValue, CommittedTransform, MetaWrite, RawStorage, StorageStats};
use optimystic_core::{BlockId, StorageError, Transform, TrxId, TrxRev};
use optimystic_storage_file::datadir;
use serde_json::Value;
use tokio::sync::RwLock;

use crate::store::Store;

/// The plugin's name in configuration and error messages.
const PLUGIN: &str = "storage lmdb";
/// The directory under the node's data directory used when no `path` is configured.
pub const DEFAULT_SUBDIR: &str = "storage-lmdb";
/// The default map size: 1 GiB.
pub const DEFAULT_MAP_SIZE: usize = 1 << 30;
/// Map sizes are rounded up to a multiple of this (a multiple of every common OS page size).
pub const MAP_SIZE_GRANULE: usize = 64 * 1024;

/// Options of [`LmdbStorage::open_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LmdbOptions {
    /// The most bytes the store may hold; rounded up to [`MAP_SIZE_GRANULE`].
    pub map_size_bytes: usize,
}

impl Default for LmdbOptions {
    fn default() -> Self {
        Self { map_size_bytes: DEFAULT_MAP_SIZE }
    }
}

/// Blocks and metadata in an LMDB environment under one locked data directory.
///
/// Cloning gives another handle on the same open store.
#[derive(Debug, Clone)]
pub struct LmdbStorage {
    path: PathBuf,
    /// `None` once closed. Every call holds a read guard for its whole duration, so `close` waits
    /// for calls in flight before it closes the environment and releases the directory.
    state: Arc<RwLock<Option<Store>>>,
}

impl LmdbStorage {
    /// Opens (creating if needed) the store in `path` with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        Self::open_with(path, LmdbOptions::default())
    }

    /// Opens (creating if needed) the store in `path`.
    ///
    /// Fails with [`StorageError::Locked`] when the directory is held by another process or by
    /// another open store, and with [`StorageError::Incompatible`] when it holds another engine's
    /// data, another format version or unrelated files.
    pub fn open_with(path: impl AsRef<Path>, options: LmdbOptions) -> Result<Self, StorageError> {
        if options.map_size_bytes == 0 {
            return Err(StorageError::Invalid("the LMDB map size must be positive".into()));
        }
        let map_size = options
            .map_size_bytes
            .checked_next_multiple_of(MAP_SIZE_GRANULE)
            .ok_or_else(|| StorageError::Invalid(format!("map size {} is too large", options.map_size_bytes)))?;
        let store = Store::open(path.as_ref(), map_size)?;
        Ok(Self { path: store.path().to_path_buf(), state: Arc::new(RwLock::new(Some(store))) })
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a read on the open store, inline: LMDB reads are lookups in the memory map, cheaper
    /// than a hop to the blocking pool (see BENCHMARKS.md).
    async fn read<T>(&self, work: impl FnOnce(&Store) -> Result<T, StorageError>) -> Result<T, StorageError> {
        match self.state.read().await.as_ref() {
            Some(store) => work(store),
            None => Err(closed()),
        }
    }

    /// Runs blocking work (a write, which waits for the disk) on the open store, on the blocking
    /// thread pool.
    async fn with<T, F>(&self, work: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StorageError> + Send + 'static,
    {
        let guard = self.state.clone().read_owned().await;
        if guard.is_none() {
            return Err(closed());
        }
        tokio::task::spawn_blocking(move || match guard.as_ref() {
            Some(store) => work(store),
            None => Err(closed()),
        })
        .await
        .map_err(|e| StorageError::Backend { engine: store::ENGINE, message: format!("storage task failed: {e}") })?
    }
}

fn closed() -> StorageError {
    StorageError::Invalid("the LMDB store is closed".into())
}

#[async_trait]
impl RawStorage for LmdbStorage {
    async fn latest(&self, block_id: &BlockId) -> Result<Option<TrxRev>, StorageError> {
        self.read(|s| s.latest(block_id)).await
    }

    async fn revisions(&self, block_id: &BlockId, from_rev: u64, to_rev: u64) -> Result<Vec<TrxRev>, StorageError> {
        self.read(|s| s.revisions(block_id, from_rev, to_rev)).await
    }

    async fn revision_at_or_before(&self, block_id: &BlockId, at_rev: u64) -> Result<Option<TrxRev>, StorageError> {
        self.read(|s| s.revision_at_or_before(block_id, at_rev)).await
    }

    async fn committed(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<CommittedTransform>, StorageError> {
        self.read(|s| s.committed(block_id, trx_id)).await
    }

    async fn pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<Transform>, StorageError> {
        self.read(|s| s.pending(block_id, trx_id)).await
    }

    async fn pending_trx_ids(&self, block_id: &BlockId) -> Result<Vec<TrxId>, StorageError> {
        self.read(|s| s.pending_trx_ids(block_id)).await
    }

    async fn save_pending(
        &self,
        block_id: &BlockId,
        trx_id: &TrxId,
        transform: &Transform,
    ) -> Result<(), StorageError> {
        let (block_id, trx_id, transform) = (block_id.clone(), trx_id.clone(), transform.clone());
        self.with(move |s| s.save_pending(&block_id, &trx_id, &transform)).await
    }

    async fn delete_pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<(), StorageError> {
        let (block_id, trx_id) = (block_id.clone(), trx_id.clone());
        self.with(move |s| s.delete_pending(&block_id, &trx_id)).await
    }

    async fn materialized(&self, block_id: &BlockId, rev: u64) -> Result<Option<BlockValue>, StorageError> {
        self.read(|s| s.materialized(block_id, rev)).await
    }

    async fn commit_block(&self, block_id: &BlockId, commit: &BlockCommit) -> Result<(), StorageError> {
        let (block_id, commit) = (block_id.clone(), commit.clone());
        self.with(move |s| s.commit_block(&block_id, &commit)).await
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.read(|s| s.get_meta(key)).await
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.with(move |s| s.put_meta(&key, &value)).await
    }

    async fn delete_meta(&self, key: &str) -> Result<(), StorageError> {
        let key = key.to_owned();
        self.with(move |s| s.delete_meta(&key)).await
    }

    async fn write_meta(&self, writes: &[MetaWrite]) -> Result<(), StorageError> {
        let writes = writes.to_vec();
        self.with(move |s| s.write_meta(&writes)).await
    }

    async fn list_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.read(|s| s.list_meta(prefix, limit)).await
    }

    fn durable(&self) -> bool {
        true
    }

    async fn block_ids(&self, after: Option<&BlockId>, limit: usize) -> Result<Vec<BlockId>, StorageError> {
        self.read(|s| s.block_ids(after, limit)).await
    }

    async fn stats(&self) -> Result<Option<StorageStats>, StorageError> {
        self.with(|s| s.stats().map(Some)).await
    }

    async fn close(&self) -> Result<(), StorageError> {
        // Waits for calls in flight, then closes the environment before releasing the lock.
        let mut state = self.state.write().await;
        let Some(store) = state.take() else {
            return Ok(());
        };
        let synced = store.sync();
        drop(store);
        synced
    }
}

fn build(cx: &PluginContext, config: &Value) -> Result<Arc<dyn RawStorage>, PluginError> {
    let config = datadir::config_object(PLUGIN, config, &["map_size_bytes"])?;
    let path = datadir::resolve_dir(PLUGIN, cx, &config, DEFAULT_SUBDIR)?;
    let mut options = LmdbOptions::default();
    if let Some(size) = config.get("map_size_bytes") {
        options.map_size_bytes =
            size.as_u64().filter(|s| *s > 0).and_then(|s| usize::try_from(s).ok()).ok_or_else(|| {
                PluginError::Config {
                    plugin: PLUGIN.to_owned(),
                    message: format!("`map_size_bytes` must be a positive integer, got {size}"),
                }
            })?;
    }
    Ok(Arc::new(LmdbStorage::open_with(path, options)?))
}

/// The options' defaults: `path` relative to the node's data directory, and the map size.
fn defaults() -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("path".to_owned(), Value::from(DEFAULT_SUBDIR));
    map.insert("map_size_bytes".to_owned(), Value::from(DEFAULT_MAP_SIZE));
    map
}

optimystic_core::inventory::submit! {
    PluginDescriptor::storage("lmdb", "blocks in an LMDB environment, one write transaction per commit step (durable)", build)
        .with_defaults(defaults)
}

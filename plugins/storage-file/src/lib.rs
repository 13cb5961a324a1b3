//! File-system [`RawStorage`], registered as `storage file`.
//!
//! Durable and crash-safe: every block lives in its own directory whose manifest is replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory) as the commit point of
//! the per-block commit step, so after a crash (SIGKILL or power loss) a block is either fully at
//! its old or fully at its new revision. Ids of any content map to safe, reversible file names
//! ([`names`]); nothing outside the data directory is ever touched. The on-disk layout is
//! documented in the (private) `store` module.
//!
//! The data directory is locked while the store is open (`optimystic_datadir`) and carries a format
//! marker. Writes (which wait for fsyncs) and directory scans run on tokio's blocking thread
//! pool; point reads (a few small, usually cached files) run inline.
//!
//! Configuration (`[storage]` section of the node): `{"kind": "file", "path": optional}`; without
//! `path` the store lives in `<node data dir>/storage-file`, and a relative `path` is resolved
//! against the node's data directory.

pub mod names;
mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use optimystic_core::registry::{PluginConfig, PluginDescriptor, PluginError, StorageContext, parse_config};
use optimystic_core::storage::{BlockCommit, BlockValue, CommittedTransform, RawStorage};
use optimystic_core::{BlockId, StorageError, Transform, TrxId, TrxRev};
use optimystic_datadir as datadir;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::RwLock;

use crate::store::Store;

/// The plugin's name in configuration and error messages.
const PLUGIN: &str = "storage file";
/// The directory under the node's data directory used when no `path` is configured.
pub const DEFAULT_SUBDIR: &str = "storage-file";

/// Blocks and metadata in files under one locked data directory.
///
/// Cloning gives another handle on the same open store.
#[derive(Debug, Clone)]
pub struct FileStorage {
    path: PathBuf,
    /// `None` once closed. Every call holds a read guard for its whole duration, so `close` waits
    /// for calls in flight before it releases the directory.
    state: Arc<RwLock<Option<Store>>>,
}

impl FileStorage {
    /// Opens (creating if needed) the store in `path`.
    ///
    /// Fails with [`StorageError::Locked`] when the directory is held by another process or by
    /// another open store, and with [`StorageError::Incompatible`] when it holds another engine's
    /// data, another format version or unrelated files.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let store = Store::open(path.as_ref())?;
        Ok(Self { path: store.path().to_path_buf(), state: Arc::new(RwLock::new(Some(store))) })
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a point read on the open store, inline: a few small-file reads, cheaper than a hop to
    /// the blocking pool (see BENCHMARKS.md).
    async fn read<T>(&self, work: impl FnOnce(&Store) -> Result<T, StorageError>) -> Result<T, StorageError> {
        match self.state.read().await.as_ref() {
            Some(store) => work(store),
            None => Err(closed()),
        }
    }

    /// Runs blocking work (a write, which waits for fsyncs, or a directory scan) on the open
    /// store, on the blocking thread pool.
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
        .map_err(|e| StorageError::backend(store::ENGINE, "running a storage task", e))?
    }
}

fn closed() -> StorageError {
    StorageError::Closed { engine: store::ENGINE }
}

#[async_trait]
impl RawStorage for FileStorage {
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
        // A directory scan: on the blocking pool.
        let block_id = block_id.clone();
        self.with(move |s| s.pending_trx_ids(&block_id)).await
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

    async fn list_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let prefix = prefix.to_owned();
        self.with(move |s| s.list_meta(&prefix, limit)).await
    }

    fn durable(&self) -> bool {
        true
    }

    async fn block_ids(&self, after: Option<&BlockId>, limit: usize) -> Result<Vec<BlockId>, StorageError> {
        let after = after.cloned();
        self.with(move |s| s.block_ids(after.as_ref(), limit)).await
    }

    async fn close(&self) -> Result<(), StorageError> {
        // Waits for calls in flight; every write is already durable, so closing only releases the
        // directory (and its lock).
        let store = self.state.write().await.take();
        drop(store);
        Ok(())
    }
}

/// The configuration section (see the crate documentation).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    path: Option<PathBuf>,
}

impl PluginConfig for FileConfig {
    fn validate(&self) -> Result<(), PluginError> {
        datadir::check_path(PLUGIN, self.path.as_deref())
    }
}

fn check(config: &Value) -> Result<(), PluginError> {
    parse_config::<FileConfig>(PLUGIN, config).map(drop)
}

fn build(cx: &StorageContext, config: &Value) -> Result<Arc<dyn RawStorage>, PluginError> {
    let config: FileConfig = parse_config(PLUGIN, config)?;
    let path = datadir::resolve_dir(PLUGIN, cx.data_dir.as_deref(), config.path.as_deref(), DEFAULT_SUBDIR)?;
    Ok(Arc::new(FileStorage::open(path)?))
}

/// The options' defaults: `path` relative to the node's data directory.
fn defaults() -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("path".to_owned(), Value::from(DEFAULT_SUBDIR));
    map
}

optimystic_core::inventory::submit! {
    PluginDescriptor::storage("file", "blocks in files, one crash-safe directory per block (durable)", build)
        .with_defaults(defaults)
        .with_check(check)
}

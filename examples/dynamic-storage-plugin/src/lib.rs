//! An example dynamic storage plugin, and a template for plugin authors: the in-memory engine of
//! `optimystic-storage-memory`, built as a shared library and exported under the name
//! `dyn-memory`.
//!
//! A plugin crate:
//! 1. sets `crate-type = ["cdylib"]` (this one adds `"rlib"` so its tests can name its types);
//! 2. implements [`RawStorage`] for its engine, which runs without a tokio runtime (the node calls
//!    it from a blocking thread through `futures::executor::block_on`);
//! 3. exports it once with [`optimystic_plugin_abi::export_storage_plugin!`], giving an `open` function
//!    that reads the plugin's configuration section.
//!
//! It must be built by the same rustc and against the same optimystic-core version as the node;
//! the node refuses it otherwise. Load it with `[plugins] load = ["path/to/libplugin.so"]` and
//! select it with `[storage] kind = "dyn-memory"`.
//!
//! Configuration: no option is needed. For tests of the host, `panic_on = "<method>"` makes the
//! engine panic in that [`RawStorage`] method (or in `open`), to show that a panic becomes an
//! error and never crosses the library boundary.

use std::sync::Arc;

use async_trait::async_trait;
use optimystic_core::registry::{PluginConfig, PluginError, parse_config};
use optimystic_core::storage::{BlockCommit, BlockValue, CommittedTransform, RawStorage, StorageStats};
use optimystic_core::{BlockId, StorageError, Transform, TrxId, TrxRev};
use optimystic_plugin_abi::DynamicContext;
use optimystic_storage_memory::MemoryStorage;
use serde::Deserialize;
use serde_json::Value;

/// The name the plugin registers.
pub const NAME: &str = "dyn-memory";

/// The operations `panic_on` accepts: `open` and the [`RawStorage`] methods that reach the engine.
pub const PANIC_POINTS: &[&str] = &[
    "open",
    "latest",
    "revisions",
    "revision_at_or_before",
    "committed",
    "pending",
    "pending_trx_ids",
    "save_pending",
    "delete_pending",
    "materialized",
    "commit_block",
    "get_meta",
    "put_meta",
    "delete_meta",
    "list_meta",
    "block_ids",
    "stats",
    "close",
];

/// The options: `panic_on`, one of [`PANIC_POINTS`] (the section's `kind`, the selector the node
/// leaves in it, is skipped; any other key is refused).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExampleConfig {
    /// The call to panic in.
    pub panic_on: Option<String>,
}

impl PluginConfig for ExampleConfig {
    fn validate(&self) -> Result<(), PluginError> {
        match &self.panic_on {
            Some(op) if !PANIC_POINTS.contains(&op.as_str()) => Err(PluginError::Config {
                plugin: format!("storage {NAME}"),
                message: format!("panic_on {op:?} is not one of {}", PANIC_POINTS.join(", ")),
            }),
            _ => Ok(()),
        }
    }
}

/// The example engine: a [`MemoryStorage`], optionally panicking in one operation.
#[derive(Debug, Clone, Default)]
pub struct ExampleStorage {
    inner: MemoryStorage,
    panic_on: Option<&'static str>,
}

impl ExampleStorage {
    /// Reads the configuration section ([`ExampleConfig`]); anything it refuses is
    /// [`StorageError::Invalid`] (a plugin's errors cross the library boundary as storage errors).
    pub fn from_config(config: &Value) -> Result<Self, StorageError> {
        let config: ExampleConfig =
            parse_config(&format!("storage {NAME}"), config).map_err(|e| StorageError::Invalid(e.to_string()))?;
        let panic_on = config.panic_on.and_then(|op| PANIC_POINTS.iter().copied().find(|p| *p == op));
        Ok(Self { panic_on, ..Self::default() })
    }

    /// Panics when configured to in `op`.
    fn enter(&self, op: &'static str) {
        if self.panic_on == Some(op) {
            panic!("{NAME} was configured to panic in {op}");
        }
    }
}

#[async_trait]
impl RawStorage for ExampleStorage {
    async fn latest(&self, block_id: &BlockId) -> Result<Option<TrxRev>, StorageError> {
        self.enter("latest");
        self.inner.latest(block_id).await
    }

    async fn revisions(&self, block_id: &BlockId, from_rev: u64, to_rev: u64) -> Result<Vec<TrxRev>, StorageError> {
        self.enter("revisions");
        self.inner.revisions(block_id, from_rev, to_rev).await
    }

    async fn revision_at_or_before(&self, block_id: &BlockId, at_rev: u64) -> Result<Option<TrxRev>, StorageError> {
        self.enter("revision_at_or_before");
        self.inner.revision_at_or_before(block_id, at_rev).await
    }

    async fn committed(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<CommittedTransform>, StorageError> {
        self.enter("committed");
        self.inner.committed(block_id, trx_id).await
    }

    async fn pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<Transform>, StorageError> {
        self.enter("pending");
        self.inner.pending(block_id, trx_id).await
    }

    async fn pending_trx_ids(&self, block_id: &BlockId) -> Result<Vec<TrxId>, StorageError> {
        self.enter("pending_trx_ids");
        self.inner.pending_trx_ids(block_id).await
    }

    async fn save_pending(
        &self,
        block_id: &BlockId,
        trx_id: &TrxId,
        transform: &Transform,
    ) -> Result<(), StorageError> {
        self.enter("save_pending");
        self.inner.save_pending(block_id, trx_id, transform).await
    }

    async fn delete_pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<(), StorageError> {
        self.enter("delete_pending");
        self.inner.delete_pending(block_id, trx_id).await
    }

    async fn materialized(&self, block_id: &BlockId, rev: u64) -> Result<Option<BlockValue>, StorageError> {
        self.enter("materialized");
        self.inner.materialized(block_id, rev).await
    }

    async fn commit_block(&self, block_id: &BlockId, commit: &BlockCommit) -> Result<(), StorageError> {
        self.enter("commit_block");
        self.inner.commit_block(block_id, commit).await
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.enter("get_meta");
        self.inner.get_meta(key).await
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.enter("put_meta");
        self.inner.put_meta(key, value).await
    }

    async fn delete_meta(&self, key: &str) -> Result<(), StorageError> {
        self.enter("delete_meta");
        self.inner.delete_meta(key).await
    }

    async fn list_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.enter("list_meta");
        self.inner.list_meta(prefix, limit).await
    }

    fn durable(&self) -> bool {
        self.inner.durable()
    }

    async fn block_ids(&self, after: Option<&BlockId>, limit: usize) -> Result<Vec<BlockId>, StorageError> {
        self.enter("block_ids");
        self.inner.block_ids(after, limit).await
    }

    async fn stats(&self) -> Result<Option<StorageStats>, StorageError> {
        self.enter("stats");
        self.inner.stats().await
    }

    async fn close(&self) -> Result<(), StorageError> {
        self.enter("close");
        self.inner.close().await
    }
}

/// Opens the engine from its configuration section (see [`ExampleStorage::from_config`]). The
/// engine keeps nothing on disk, so it ignores the node's [`DynamicContext`]; a durable engine keeps
/// its files under its `data_dir`.
pub fn open(_cx: &DynamicContext, config: &Value) -> Result<Arc<dyn RawStorage>, StorageError> {
    let storage = ExampleStorage::from_config(config)?;
    storage.enter("open");
    Ok(Arc::new(storage))
}

optimystic_plugin_abi::export_storage_plugin! {
    name: NAME,
    description: "example dynamic plugin: blocks in memory, lost when the process ends",
    open: open,
}

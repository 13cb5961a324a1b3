//! LMDB storage (through heed), registered as `storage lmdb`: [`LmdbKv`], a
//! [`KvStore`](optimystic_core::kv::KvStore) in one LMDB database, used through
//! [`KvBlockStorage`] as [`LmdbStorage`].
//!
//! Durable: every `RawStorage` call is one store batch; concurrent batches share one LMDB write
//! transaction committed with LMDB's default durable sync (group commit, `optimystic_core::kv::group`)
//! and each call returns after it; the per-block commit step is one batch, so after a crash a block
//! is fully at its old or fully at its new revision. The map size is fixed at open
//! (`map_size_bytes`, default [`DEFAULT_MAP_SIZE`]); a full map fails the write with
//! [`StorageError::Full`](optimystic_core::StorageError::Full), changing nothing.
//!
//! The data directory is locked while the store is open and carries a format marker (see
//! `optimystic_datadir`; format version [`FORMAT_VERSION`]); the environment lives
//! in `<dir>/env`. Writes, which wait for the disk, run on tokio's blocking thread pool; reads are
//! lookups in the memory map and run inline, which is several times faster than a hop to the pool
//! (see BENCHMARKS.md).
//!
//! Configuration: `{"kind": "lmdb", "path": optional, "map_size_bytes": optional}`; without `path`
//! the store lives in `<node data dir>/storage-lmdb`, and a relative `path` is resolved against
//! the node's data directory.

mod env;
mod store;

use std::path::PathBuf;
use std::sync::Arc;

use optimystic_core::kv::KvBlockStorage;
use optimystic_core::registry::{PluginConfig, PluginDescriptor, PluginError, StorageContext, parse_config};
use optimystic_core::storage::RawStorage;
use optimystic_datadir as datadir;
use serde::Deserialize;
use serde_json::Value;

pub use crate::store::{DEFAULT_MAP_SIZE, FORMAT_VERSION, LmdbKv, MAP_SIZE_GRANULE};

/// The plugin's name in configuration and error messages.
const PLUGIN: &str = "storage lmdb";
/// The directory under the node's data directory used when no `path` is configured.
pub const DEFAULT_SUBDIR: &str = "storage-lmdb";

/// The `storage lmdb` engine: block storage over an [`LmdbKv`], opened with
/// `LmdbStorage::over(LmdbKv::open(path)?)`. Clones share the open store.
pub type LmdbStorage = KvBlockStorage<LmdbKv>;

/// Options of [`LmdbKv::open_with`].
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

/// The configuration section (see the crate documentation).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LmdbConfig {
    path: Option<PathBuf>,
    map_size_bytes: u64,
}

impl Default for LmdbConfig {
    fn default() -> Self {
        Self { path: None, map_size_bytes: u64::try_from(DEFAULT_MAP_SIZE).unwrap_or(u64::MAX) }
    }
}

impl LmdbConfig {
    /// `map_size_bytes` as a size, `None` when it is 0 or does not fit in memory.
    fn map_size(&self) -> Option<usize> {
        usize::try_from(self.map_size_bytes).ok().filter(|size| *size > 0)
    }
}

impl PluginConfig for LmdbConfig {
    fn validate(&self) -> Result<(), PluginError> {
        datadir::check_path(PLUGIN, self.path.as_deref())?;
        match self.map_size() {
            Some(_) => Ok(()),
            None => Err(PluginError::Config {
                plugin: PLUGIN.to_owned(),
                message: format!("`map_size_bytes` must be a positive integer, got {}", self.map_size_bytes),
            }),
        }
    }
}

fn check(config: &Value) -> Result<(), PluginError> {
    parse_config::<LmdbConfig>(PLUGIN, config).map(drop)
}

fn build(cx: &StorageContext, config: &Value) -> Result<Arc<dyn RawStorage>, PluginError> {
    let config: LmdbConfig = parse_config(PLUGIN, config)?;
    let path = datadir::resolve_dir(PLUGIN, cx.data_dir.as_deref(), config.path.as_deref(), DEFAULT_SUBDIR)?;
    let options = LmdbOptions { map_size_bytes: config.map_size().unwrap_or(DEFAULT_MAP_SIZE) };
    Ok(Arc::new(LmdbStorage::over(LmdbKv::open_with(path, options)?)))
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
        .with_check(check)
}

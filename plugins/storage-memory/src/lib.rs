//! In-memory storage, registered as `storage memory`: [`MemoryStorage`], block storage over
//! [`MemoryKv`], a sorted map (both defined in `optimystic_core::kv`, so tests of other crates use
//! them without depending on this plugin).
//!
//! Not durable: everything is lost when the process ends.

use std::sync::Arc;

pub use optimystic_core::kv::{MemoryKv, MemoryStorage};
use optimystic_core::registry::{NoOptions, PluginDescriptor, PluginError, StorageContext, parse_config};
use optimystic_core::storage::RawStorage;
use serde_json::Value;

fn check(config: &Value) -> Result<(), PluginError> {
    parse_config::<NoOptions>("storage memory", config).map(drop)
}

fn build(_cx: &StorageContext, config: &Value) -> Result<Arc<dyn RawStorage>, PluginError> {
    check(config)?;
    Ok(Arc::new(MemoryStorage::new()))
}

optimystic_core::inventory::submit! {
    PluginDescriptor::storage("memory", "blocks in memory; lost when the process ends", build).with_check(check)
}

//! The storage conformance suite over [`MemoryStorage`]: the key-value adapter over a `MemoryKv`.

use std::sync::Arc;

use optimystic_core::testkit::conformance::Fixture;
use optimystic_storage_memory::MemoryStorage;

optimystic_core::storage_conformance!(|| async {
    Fixture { storage: Arc::new(MemoryStorage::new()), guard: Box::new(()) }
});

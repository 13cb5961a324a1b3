//! The storage conformance suite over [`MemoryStorage`]: the key-value adapter over a `MemoryKv`.

use std::sync::Arc;

use optimystic_storage_memory::MemoryStorage;
use optimystic_testkit::conformance::Fixture;

optimystic_testkit::storage_conformance!(|| async {
    Fixture { storage: Arc::new(MemoryStorage::new()), guard: Box::new(()) }
});

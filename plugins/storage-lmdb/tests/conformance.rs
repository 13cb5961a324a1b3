//! The shared storage conformance suite, run against the LMDB engine (each rule on a fresh
//! temporary directory).

use std::sync::Arc;

use optimystic_core::testkit::conformance::Fixture;
use optimystic_storage_lmdb::LmdbStorage;

optimystic_core::storage_conformance!(|| async {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
    let storage = LmdbStorage::open(dir.path()).unwrap_or_else(|e| panic!("opening the LMDB store: {e}"));
    Fixture { storage: Arc::new(storage), guard: Box::new(dir) }
});

//! The shared storage conformance suite, run against the LMDB engine through the key-value
//! adapter (each rule on a fresh temporary directory).

use std::sync::Arc;

use optimystic_storage_lmdb::{LmdbKv, LmdbStorage};
use optimystic_testkit::conformance::Fixture;

optimystic_testkit::storage_conformance!(|| async {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
    let store = LmdbKv::open(dir.path()).unwrap_or_else(|e| panic!("opening the LMDB store: {e}"));
    let storage = LmdbStorage::over(store);
    Fixture { storage: Arc::new(storage), guard: Box::new(dir) }
});

//! The shared storage conformance suite, run against the file engine (each rule on a fresh
//! temporary directory).

use std::sync::Arc;

use optimystic_storage_file::FileStorage;
use optimystic_testkit::conformance::Fixture;

optimystic_testkit::storage_conformance!(|| async {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
    let storage = FileStorage::open(dir.path()).unwrap_or_else(|e| panic!("opening the file store: {e}"));
    Fixture { storage: Arc::new(storage), guard: Box::new(dir) }
});

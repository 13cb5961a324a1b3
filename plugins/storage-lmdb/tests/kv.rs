//! The `KvStore` contract tests over [`LmdbKv`] (each rule on a fresh temporary directory).

use optimystic_storage_lmdb::LmdbKv;
use optimystic_testkit::kv::KvFixture;

optimystic_testkit::kv_store_conformance!(|| {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
    let store = LmdbKv::open(dir.path()).unwrap_or_else(|e| panic!("opening the LMDB store: {e}"));
    KvFixture::with_guard(store, dir)
});

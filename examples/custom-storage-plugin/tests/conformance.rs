//! The conformance suites over [`WalKv`].
//!
//! `storage_conformance!` expands to one `#[test]` per rule of the `RawStorage` contract and of
//! the repository rules built on it, here run through core's `KvBlockStorage` adapter;
//! `kv_store_conformance!` to one per rule of the `KvStore` contract. Each factory is called once
//! per rule and hands back an empty store in a fresh temporary directory, kept alive as the
//! fixture's `guard`. `cargo test -p optimystic-example-custom-storage` lists them by name.

use std::sync::Arc;

use optimystic_example_custom_storage::{WalKv, WalStorage};
use optimystic_testkit::conformance::Fixture;
use optimystic_testkit::kv::KvFixture;

fn open() -> (WalKv, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
    let store = WalKv::open(dir.path().join("wal.log")).unwrap_or_else(|e| panic!("opening the log: {e}"));
    (store, dir)
}

optimystic_testkit::storage_conformance!(|| async {
    let (store, dir) = open();
    Fixture::with_guard(Arc::new(WalStorage::over(store)), dir)
});

mod kv {
    use super::*;

    optimystic_testkit::kv_store_conformance!(|| {
        let (store, dir) = open();
        KvFixture::with_guard(store, dir)
    });
}

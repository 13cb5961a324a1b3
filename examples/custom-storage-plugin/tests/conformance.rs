//! The storage conformance suite over [`SnapshotStorage`].
//!
//! This one macro call expands to one `#[test]` per rule of the `RawStorage` contract and of the
//! repository rules built on it (`cargo test -p optimystic-example-custom-storage` lists them by
//! name). The factory is called once per rule and must hand back an empty store each time; a
//! durable engine would open a fresh temporary directory here and pass it as the `guard`.

use std::sync::Arc;

use optimystic_core::testkit::conformance::Fixture;
use optimystic_example_custom_storage::SnapshotStorage;

optimystic_core::storage_conformance!(|| async { Fixture::new(Arc::new(SnapshotStorage::new())) });

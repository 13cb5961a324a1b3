//! The `KvStore` contract tests over [`MemoryKv`].

use optimystic_core::testkit::kv::KvFixture;
use optimystic_storage_memory::MemoryKv;

optimystic_core::kv_store_conformance!(|| KvFixture::new(MemoryKv::new()));

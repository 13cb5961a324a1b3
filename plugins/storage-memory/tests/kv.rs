//! The `KvStore` contract tests over [`MemoryKv`].

use optimystic_storage_memory::MemoryKv;
use optimystic_testkit::kv::KvFixture;

optimystic_testkit::kv_store_conformance!(|| KvFixture::new(MemoryKv::new()));

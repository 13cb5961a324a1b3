//! Test support for plugin authors (feature `testkit`): the storage conformance suite
//! ([`conformance`], run with [`storage_conformance!`](crate::storage_conformance)) and the
//! key-value store contract tests ([`kv`], run with
//! [`kv_store_conformance!`](crate::kv_store_conformance)).

pub mod conformance;
pub mod history;
pub mod kv;
pub mod sim;

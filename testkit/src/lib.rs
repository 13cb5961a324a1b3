//! # optimystic-testkit
//!
//! Test support for plugin authors, used as a dev-dependency: the storage conformance suite
//! ([`conformance`], run with [`storage_conformance!`](crate::storage_conformance)), the
//! key-value store contract tests ([`kv`], run with
//! [`kv_store_conformance!`](crate::kv_store_conformance)), the simulated network ([`sim`]) and
//! the history checker ([`history`]).

pub mod conformance;
pub mod history;
pub mod kv;
pub mod sim;

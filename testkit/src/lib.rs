//! # optimystic-testkit
//!
//! Test support for plugin authors, used as a dev-dependency: the storage conformance suite
//! ([`conformance`], run with [`storage_conformance!`](crate::storage_conformance)), the
//! key-value store contract tests ([`kv`], run with
//! [`kv_store_conformance!`](crate::kv_store_conformance)), the simulated network ([`sim`]) and
//! the history checker ([`history`]), and a fixed [`routing`] to build key networks over.

pub mod conformance;
pub mod history;
pub mod kv;
pub mod routing;
pub mod sim;

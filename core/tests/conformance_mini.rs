//! The storage conformance suite over the tiny in-test storage: checks the suite and its macro
//! from inside core (a plugin runs the same with its own engine).

mod common;

use std::sync::Arc;

use optimystic_testkit::conformance::Fixture;

optimystic_testkit::storage_conformance!(|| async { Fixture::new(Arc::new(common::MiniStorage::new())) });

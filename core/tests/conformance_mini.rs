//! The storage conformance suite over the tiny in-test storage: checks the suite and its macro
//! from inside core (a plugin runs the same with its own engine).

#![cfg(feature = "testkit")]

mod common;

use std::sync::Arc;

use optimystic_core::testkit::conformance::Fixture;

optimystic_core::storage_conformance!(|| async { Fixture::new(Arc::new(common::MiniStorage::new())) });

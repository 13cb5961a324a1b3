//! Test support for plugin authors (feature `testkit`): the storage conformance suite
//! ([`conformance`], run with [`storage_conformance!`](crate::storage_conformance)).

pub mod conformance;
pub mod history;
pub mod sim;

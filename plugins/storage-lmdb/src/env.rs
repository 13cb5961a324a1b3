//! Opening the LMDB environment: the only `unsafe` code of this crate.
//!
//! SAFETY (the invariant that makes [`open_env`] sound): heed marks opening an environment
//! `unsafe` because LMDB memory-maps its data file, and the map becomes undefined behaviour if the
//! file is modified behind LMDB's back or the same file is opened twice in one process with
//! different handles. Here every environment lives in `<data dir>/env`, and [`open_env`] is only
//! called by [`crate::LmdbKv::open_with`] while it holds the data directory's exclusive lock
//! ([`optimystic_datadir::DataDir`], an `flock` that conflicts between processes and
//! between two opens in one process). The lock outlives the environment (the store drops the
//! environment before the lock), so there is at most one environment per path per process and no
//! other process of ours writes the file. We never set unsafe flags (`NO_SYNC`, `NO_LOCK`, ...),
//! and transactions never outlive the call that opened them.
#![allow(unsafe_code)]

use std::path::Path;

use heed::{Env, EnvOpenOptions, WithoutTls};

/// Named databases in the environment.
pub const MAX_DBS: u32 = 8;

/// Opens the environment in `path` (which must exist) with a map of `map_size` bytes (a multiple
/// of the OS page size). Must only be called while holding the data directory's lock.
pub fn open_env(path: &Path, map_size: usize) -> heed::Result<Env<WithoutTls>> {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(map_size).max_dbs(MAX_DBS);
    // SAFETY: see the module documentation: the caller holds the exclusive lock of the data
    // directory that contains `path`, so this is the only environment on this file in this
    // process and no other process of ours maps it; no unsafe flags are set.
    unsafe { options.open(path) }
}

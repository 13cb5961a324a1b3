//! The narrow storage seam: [`KvStore`], an ordered byte key-value store with atomic batches.
//!
//! A storage engine can plug in at one of two seams:
//!
//! - [`RawStorage`](crate::storage::RawStorage) knows the block model (revision logs, pending and
//!   committed transforms, materialized values, metadata); an engine that implements it chooses
//!   its own layout (the `file` engine keeps one directory per block).
//! - [`KvStore`] knows only sorted byte keys, values and atomic write batches. The generic
//!   [`KvBlockStorage`] adapter implements the whole `RawStorage` contract over any `KvStore`
//!   (the key layout is documented in [`blocks`]), so a new engine needs seven small methods and
//!   gets revision logs, pending indexes and metadata for free. The `memory` and `lmdb` engines
//!   are `KvStore`s.
//!
//! Every method of a `KvStore` is synchronous and may block; the adapter decides where to run it
//! ([`KvStore::READS_WAIT`], [`KvStore::WRITES_WAIT`]).

pub mod blocks;
pub mod group;
pub mod memory;
pub mod values;

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::error::StorageError;

pub use blocks::KvBlockStorage;
pub use group::GroupStats;
pub use memory::{MemoryKv, MemoryStorage};

/// The longest key, in bytes, that every [`KvStore`] must accept (LMDB's default key limit).
/// [`KvBlockStorage`] never writes a longer key.
pub const MAX_KEY_BYTES: usize = 511;

/// One entry of a [`KvStore::scan`]: a key and its value.
pub type KvEntry = (Vec<u8>, Vec<u8>);

/// One write of a [`KvStore::write`] batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvWrite {
    /// Writes (or replaces) the value of `key`.
    Put {
        /// The key: 1 to [`MAX_KEY_BYTES`] bytes.
        key: Vec<u8>,
        /// The value, any length the store can hold (empty included).
        value: Vec<u8>,
    },
    /// Deletes `key`; deleting an absent key is not an error.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

impl KvWrite {
    /// A put of `value` at `key`.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self::Put { key: key.into(), value: value.into() }
    }

    /// A delete of `key`.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Self::Delete { key: key.into() }
    }

    /// The key written.
    pub fn key(&self) -> &[u8] {
        match self {
            Self::Put { key, .. } | Self::Delete { key } => key,
        }
    }
}

/// Checks, before a store applies anything, that every put of `batch` has a key of 1 to `limit`
/// bytes: otherwise the [`StorageError::Invalid`] the [`KvStore::write`] contract asks for.
pub fn check_keys(engine: &str, batch: &[KvWrite], limit: usize) -> Result<(), StorageError> {
    match batch.iter().find(|w| matches!(w, KvWrite::Put { key, .. } if key.is_empty() || key.len() > limit)) {
        Some(bad) => Err(StorageError::Invalid(format!(
            "{engine}: a key of {} bytes is outside 1..={limit} bytes",
            bad.key().len()
        ))),
        None => Ok(()),
    }
}

/// [`KvStore::scan`] over a sorted map held in memory, for stores built on a `BTreeMap`.
pub fn scan_map(map: &BTreeMap<Vec<u8>, Vec<u8>>, prefix: &[u8], start: &[u8], limit: usize) -> Vec<KvEntry> {
    map.range::<[u8], _>((Bound::Included(start.max(prefix)), Bound::Unbounded))
        .take_while(|(key, _)| key.starts_with(prefix))
        .take(limit)
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// An ordered byte key-value store with atomic write batches: the narrow storage seam.
///
/// Keys are byte strings of 1 to [`MAX_KEY_BYTES`] bytes (a store may accept longer ones), ordered
/// byte-wise (`memcmp` order, shorter first on a common prefix); values are byte strings of any
/// length. Contract shared by all methods:
///
/// - **Errors change nothing.** A call that returns `Err` leaves the stored data as it was.
/// - **Read your writes.** A read sees every batch whose [`write`](KvStore::write) returned `Ok`
///   before the read began, and never part of a batch.
/// - **Concurrency.** Every method may be called from many threads at once; the store serializes
///   what it must. Calls may block (disk, locks): callers run them off the async executor when
///   [`READS_WAIT`](KvStore::READS_WAIT) or [`WRITES_WAIT`](KvStore::WRITES_WAIT) says so.
/// - **After close.** Once [`close`](KvStore::close) returned, every other method fails with
///   [`StorageError::Closed`]; `close` itself returns `Ok` again.
/// - **Corruption.** Bytes read from disk that the store cannot make sense of give
///   [`StorageError::Corrupt`], never a panic.
///
/// `tests/` of a store crate run the contract tests with `optimystic_testkit::kv_store_conformance!`
/// (a dev-dependency on `optimystic-testkit`).
pub trait KvStore: Send + Sync + std::fmt::Debug + 'static {
    /// Whether [`get`](KvStore::get) and [`scan`](KvStore::scan) may wait on I/O: the adapter then
    /// runs them on tokio's blocking thread pool; otherwise inline on the calling task (right for
    /// lookups in memory or in a memory map, where a thread hop costs more than the read).
    const READS_WAIT: bool = true;

    /// Whether [`write`](KvStore::write), [`flush`](KvStore::flush) and [`close`](KvStore::close)
    /// may wait on I/O: the adapter then runs them on tokio's blocking thread pool.
    const WRITES_WAIT: bool = true;

    /// The engine's name, for error messages (`"lmdb"`).
    fn name(&self) -> &'static str;

    /// True when a batch written with `durable: true` survives a crash of the process (SIGKILL,
    /// power loss) once [`write`](KvStore::write) returned `Ok`. A store that keeps nothing across
    /// a restart answers `false`.
    fn durable(&self) -> bool;

    /// The value stored at `key`, `None` when there is none. A key that cannot be stored (empty,
    /// or longer than the store accepts) is `None`, not an error.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// The entries whose key starts with `prefix` and is `>= start`, in ascending key order, at
    /// most `limit` of them. A `start` below `prefix` starts at the first key with the prefix; an
    /// empty `prefix` scans the whole store. `limit` is a bound, not a size hint: `usize::MAX`
    /// means "all". The entries come from one consistent view (no batch is seen in part).
    fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Vec<KvEntry>, StorageError>;

    /// Applies `batch` in order, atomically: after `Ok` every write is applied, after `Err` none
    /// is, and no reader ever sees part of it; after a crash it is either wholly applied or not at
    /// all. Later writes of a key in the batch win over earlier ones. Applying the same batch
    /// again gives the same state (idempotent). An empty batch is `Ok` and changes nothing.
    ///
    /// `durable: true`: on a [`durable`](KvStore::durable) store the batch is on stable storage
    /// when the call returns. `durable: false`: the batch may be lost in a crash (wholly, never in
    /// part, and never a batch without the ones written before it) until the next durable write or
    /// [`flush`](KvStore::flush); a store may sync it anyway.
    ///
    /// Errors: [`StorageError::Invalid`] when a put's key is empty or too long for the store
    /// (at least [`MAX_KEY_BYTES`] must be accepted; see [`check_keys`]); [`StorageError::Full`]
    /// when the store has no room left; I/O and engine errors otherwise. Deleting a key that
    /// cannot be stored is a no-op.
    fn write(&self, batch: &[KvWrite], durable: bool) -> Result<(), StorageError>;

    /// Makes every batch written so far durable (those written with `durable: false` included).
    /// A no-op on a store that is not durable. Idempotent.
    fn flush(&self) -> Result<(), StorageError>;

    /// Flushes as [`flush`](KvStore::flush) does, then releases the store: files, locks and
    /// memory. Waits for calls in flight; later calls fail with [`StorageError::Closed`].
    /// Idempotent: closing a closed store is `Ok`.
    fn close(&self) -> Result<(), StorageError>;

    /// Bytes used on disk or in memory, when the store can tell cheaply (the default: `None`).
    fn size_bytes(&self) -> Result<Option<u64>, StorageError> {
        Ok(None)
    }
}

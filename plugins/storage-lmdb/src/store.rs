//! [`LmdbKv`]: a [`KvStore`] in one LMDB database.
//!
//! The environment lives in `<data dir>/env` and holds one named database, `kv`, whose keys and
//! values are the store's bytes. Every batch is one write transaction committed with LMDB's
//! default durable sync (so `durable: false` is synced too); `KvBlockStorage` hands it the
//! batches of concurrent callers as one (group commit). Reads are read transactions on the
//! memory map.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, MdbError, WithoutTls};
use optimystic_core::StorageError;
use optimystic_core::kv::{KvEntry, KvStore, KvWrite, MAX_KEY_BYTES, check_keys};
use optimystic_datadir::{DataDir, io_error};

use crate::LmdbOptions;
use crate::env::open_env;

/// The engine name written in the format marker.
pub const ENGINE: &str = "lmdb";
/// The on-disk format version this build reads and writes. Version 1 (before the key-value seam)
/// kept blocks and metadata in three databases; version 2 keeps the block layout of
/// `optimystic_core::kv::blocks` in one.
pub const FORMAT_VERSION: u32 = 2;
/// The environment's directory inside the data directory.
const ENV_DIR: &str = "env";
/// The database's name in the environment.
const DB_NAME: &str = "kv";
/// The default map size: 1 GiB.
pub const DEFAULT_MAP_SIZE: usize = 1 << 30;
/// Map sizes are rounded up to a multiple of this (a multiple of every common OS page size).
pub const MAP_SIZE_GRANULE: usize = 64 * 1024;

type Db = Database<'static, Bytes, Bytes>;

/// Maps a heed error; a full map or transaction is [`StorageError::Full`].
fn lmdb_error(context: &str, map_size: usize) -> impl Fn(heed::Error) -> StorageError + '_ {
    move |e| match e {
        heed::Error::Mdb(MdbError::MapFull) => {
            StorageError::Full(format!("{context}: the LMDB map of {map_size} bytes is full; raise `map_size_bytes`"))
        }
        heed::Error::Mdb(MdbError::TxnFull) => {
            StorageError::Full(format!("{context}: too many changes for one LMDB transaction"))
        }
        heed::Error::Io(io) => io_error(format!("LMDB {context}"), io),
        other => StorageError::backend(ENGINE, context, other),
    }
}

/// The open environment.
#[derive(Debug)]
struct Open {
    env: Env<WithoutTls>,
    db: Db,
    /// The locked directory; declared last so the lock is released after the environment closed.
    _dir: DataDir,
}

/// An LMDB environment under one locked data directory, as a [`KvStore`].
#[derive(Debug)]
pub struct LmdbKv {
    path: PathBuf,
    map_size: usize,
    /// Largest key the environment takes, in bytes.
    max_key: usize,
    /// `None` once closed. Every call holds the read lock for its whole duration, so `close`
    /// (which takes the write lock) waits for calls in flight.
    open: RwLock<Option<Open>>,
}

impl LmdbKv {
    /// Opens (creating if needed) the store in `path` with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        Self::open_with(path, LmdbOptions::default())
    }

    /// Opens (creating if needed) the store in `path`.
    ///
    /// Fails with [`StorageError::Locked`] when the directory is held by another process or by
    /// another open store, with [`StorageError::Incompatible`] when it holds another engine's
    /// data, another format version (the message names the version found and the one this build
    /// reads) or unrelated files, and with [`StorageError::Invalid`] for a zero map size.
    pub fn open_with(path: impl AsRef<Path>, options: LmdbOptions) -> Result<Self, StorageError> {
        if options.map_size_bytes == 0 {
            return Err(StorageError::Invalid("the LMDB map size must be positive".into()));
        }
        let map_size = options
            .map_size_bytes
            .checked_next_multiple_of(MAP_SIZE_GRANULE)
            .ok_or_else(|| StorageError::Invalid(format!("map size {} is too large", options.map_size_bytes)))?;
        let dir = DataDir::open(path.as_ref(), ENGINE, FORMAT_VERSION)?;
        let env_path = dir.path().join(ENV_DIR);
        std::fs::create_dir_all(&env_path).map_err(|e| io_error(format!("creating {}", env_path.display()), e))?;
        let env = open_env(&env_path, map_size).map_err(lmdb_error("opening the environment", map_size))?;
        let max_key = env.max_key_size();
        if max_key < MAX_KEY_BYTES {
            return Err(StorageError::Incompatible(format!(
                "this LMDB build takes keys of at most {max_key} bytes; the store needs {MAX_KEY_BYTES}"
            )));
        }
        let wtxn = env.write_txn().map_err(lmdb_error("opening the database", map_size))?;
        let created = env
            .create_databases_and_commit(wtxn, |opener, wtxn| -> heed::Result<_> {
                Ok(CommitOrAbort::<_, ()>::Commit(opener.create_database::<Bytes, Bytes>(wtxn, Some(DB_NAME))?))
            })
            .map_err(lmdb_error("creating the database", map_size))?;
        let CommitOrAbort::Commit(db) = created else {
            return Err(StorageError::Failed { engine: ENGINE, message: "creating the database was aborted".into() });
        };
        let path = dir.path().to_path_buf();
        Ok(Self { path, map_size, max_key, open: RwLock::new(Some(Open { env, db, _dir: dir })) })
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, context: &'static str) -> impl Fn(heed::Error) -> StorageError + '_ {
        lmdb_error(context, self.map_size)
    }

    // The lock guards the open environment, not data: a thread that panicked inside a call left
    // LMDB consistent (an unfinished transaction aborts when dropped), so poison is ignored.
    fn guard(&self) -> RwLockReadGuard<'_, Option<Open>> {
        self.open.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn storable(&self, key: &[u8]) -> bool {
        !key.is_empty() && key.len() <= self.max_key
    }
}

/// The open environment behind a guard from [`LmdbKv::guard`], or [`StorageError::Closed`].
fn env_of<'a>(guard: &'a RwLockReadGuard<'_, Option<Open>>) -> Result<&'a Open, StorageError> {
    guard.as_ref().ok_or(StorageError::Closed { engine: ENGINE })
}

impl KvStore for LmdbKv {
    /// Reads are lookups in the memory map, several times cheaper than a hop to the blocking
    /// pool (see BENCHMARKS.md); writes wait for the disk's sync.
    const READS_WAIT: bool = false;
    const WRITES_WAIT: bool = true;

    fn name(&self) -> &'static str {
        ENGINE
    }

    fn durable(&self) -> bool {
        true
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let guard = self.guard();
        let open = env_of(&guard)?;
        if !self.storable(key) {
            return Ok(None);
        }
        let rtxn = open.env.read_txn().map_err(self.err("starting a read transaction"))?;
        Ok(open.db.get(&rtxn, key).map_err(self.err("reading"))?.map(<[u8]>::to_vec))
    }

    fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Vec<KvEntry>, StorageError> {
        let guard = self.guard();
        let open = env_of(&guard)?;
        let rtxn = open.env.read_txn().map_err(self.err("starting a read transaction"))?;
        // LMDB refuses an empty key, even as a bound: scanning from it is scanning from the start.
        let from = start.max(prefix);
        let range = (if from.is_empty() { Bound::Unbounded } else { Bound::Included(from) }, Bound::Unbounded);
        let mut out = Vec::new();
        for item in open.db.range(&rtxn, &range).map_err(self.err("scanning"))? {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(self.err("scanning"))?;
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key.to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    /// One write transaction: every key is checked before it starts.
    fn write(&self, batch: &[KvWrite], _durable: bool) -> Result<(), StorageError> {
        let guard = self.guard();
        let open = env_of(&guard)?;
        check_keys(ENGINE, batch, self.max_key)?;
        if batch.is_empty() {
            return Ok(());
        }
        let mut wtxn = open.env.write_txn().map_err(self.err("starting a write transaction"))?;
        for write in batch {
            match write {
                KvWrite::Put { key, value } => open.db.put(&mut wtxn, key, value).map_err(self.err("writing"))?,
                KvWrite::Delete { key } if self.storable(key) => {
                    open.db.delete(&mut wtxn, key).map_err(self.err("deleting"))?;
                }
                // A key LMDB cannot hold was never stored.
                KvWrite::Delete { .. } => {}
            }
        }
        wtxn.commit().map_err(self.err("committing"))
    }

    fn flush(&self) -> Result<(), StorageError> {
        let guard = self.guard();
        env_of(&guard)?.env.force_sync().map_err(self.err("syncing"))
    }

    /// Waits for calls in flight, syncs, closes the environment and then releases the directory.
    fn close(&self) -> Result<(), StorageError> {
        let Some(open) = self.open.write().unwrap_or_else(PoisonError::into_inner).take() else {
            return Ok(());
        };
        let synced = open.env.force_sync().map_err(self.err("syncing"));
        drop(open);
        synced
    }

    /// The size of the data file.
    fn size_bytes(&self) -> Result<Option<u64>, StorageError> {
        let guard = self.guard();
        env_of(&guard)?.env.real_disk_size().map(Some).map_err(self.err("measuring the data file"))
    }
}

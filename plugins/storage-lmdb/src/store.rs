//! The blocking LMDB engine behind [`crate::LmdbStorage`].
//!
//! Named databases (all keys and values are bytes):
//!
//! | database | key                                | value                                     |
//! |----------|------------------------------------|-------------------------------------------|
//! | `data`   | block prefix + `L`                 | `latest`: rev (u64 BE) + trx id           |
//! |          | block prefix + `R` + rev (u64 BE)  | trx id (the revision log)                 |
//! |          | block prefix + `C` + trx id        | rev (u64 BE) + committed transform JSON   |
//! |          | block prefix + `P` + trx id        | pending transform JSON                    |
//! |          | block prefix + `V` + rev (u64 BE)  | materialized value JSON (`null` = deleted)|
//! | `blocks` | block id                           | empty: the blocks with a latest or a pending transform, sorted, for listings |
//! | `meta`   | `m` + key                          | value                                     |
//!
//! The block prefix is the id's length (u16 BE) followed by its bytes, so all of one block's
//! records are contiguous, and the few a read touches (latest, the newest revision, the value at
//! latest, the pending transforms) usually share a page: reads stay fast as the store grows. Every
//! mutation, the per-block commit step included, is ONE write transaction, committed with LMDB's
//! default durable sync.

use std::ops::Bound;
use std::path::Path;

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, MdbError, RoTxn, WithoutTls};
use optimystic_core::storage::{BlockCommit, BlockValue, CommittedTransform, MetaWrite, StorageStats};
use optimystic_core::{BlockId, StorageError, Transform, TrxId, TrxRev};
use optimystic_storage_file::datadir::{DataDir, io_error};

use crate::env::open_env;

/// The engine name written in the format marker.
pub const ENGINE: &str = "lmdb";
/// The on-disk format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The environment's directory inside the data directory.
const ENV_DIR: &str = "env";
/// Prefix of metadata keys (LMDB refuses empty keys).
const META_PREFIX: u8 = b'm';

type Db = Database<'static, Bytes, Bytes>;

#[derive(Debug, Clone, Copy)]
struct Dbs {
    data: Db,
    blocks: Db,
    meta: Db,
}

// Record tags after the block prefix in `data`.
const LATEST: u8 = b'L';
const REVISION: u8 = b'R';
const COMMITTED: u8 = b'C';
const PENDING: u8 = b'P';
const VALUE: u8 = b'V';

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
        other => StorageError::Backend { engine: ENGINE, message: format!("{context}: {other}") },
    }
}

fn corrupt(what: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("lmdb: {what}"))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(value).map_err(|e| StorageError::Backend { engine: ENGINE, message: format!("encoding: {e}") })
}

/// The key prefix of a block: its length (u16 BE) and its bytes.
fn block_prefix(block_id: &BlockId) -> Result<Vec<u8>, StorageError> {
    let bytes = block_id.as_bytes();
    let len =
        u16::try_from(bytes.len()).map_err(|_| StorageError::Invalid(format!("block id of {} bytes", bytes.len())))?;
    let mut key = Vec::with_capacity(2 + bytes.len());
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(bytes);
    Ok(key)
}

/// A `data` key: block prefix, tag, suffix.
fn key(prefix: &[u8], tag: u8, suffix: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 1 + suffix.len());
    key.extend_from_slice(prefix);
    key.push(tag);
    key.extend_from_slice(suffix);
    key
}

fn rev_key(prefix: &[u8], tag: u8, rev: u64) -> Vec<u8> {
    key(prefix, tag, &rev.to_be_bytes())
}

fn trx_key(prefix: &[u8], tag: u8, trx_id: &TrxId) -> Vec<u8> {
    key(prefix, tag, trx_id.as_bytes())
}

fn decode_trx(bytes: &[u8]) -> Result<TrxId, StorageError> {
    let text = std::str::from_utf8(bytes).map_err(|_| corrupt("transaction id is not UTF-8"))?;
    TrxId::new(text).map_err(corrupt)
}

/// Splits a leading u64 BE.
fn split_rev(bytes: &[u8]) -> Result<(u64, &[u8]), StorageError> {
    let (rev, rest) = bytes.split_first_chunk::<8>().ok_or_else(|| corrupt("truncated revision"))?;
    Ok((u64::from_be_bytes(*rev), rest))
}

fn encode_latest(latest: &TrxRev) -> Vec<u8> {
    let mut out = latest.rev.to_be_bytes().to_vec();
    out.extend_from_slice(latest.trx_id.as_bytes());
    out
}

fn decode_latest(bytes: &[u8]) -> Result<TrxRev, StorageError> {
    let (rev, trx) = split_rev(bytes)?;
    Ok(TrxRev { trx_id: decode_trx(trx)?, rev })
}

/// The revision in the last 8 bytes of a revision log key.
fn rev_of_key(key: &[u8]) -> Result<u64, StorageError> {
    key.last_chunk::<8>().map(|r| u64::from_be_bytes(*r)).ok_or_else(|| corrupt("truncated revision key"))
}

fn meta_key(key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + key.len());
    out.push(META_PREFIX);
    out.extend_from_slice(key.as_bytes());
    out
}

/// The open store: every method blocks (LMDB calls; writes wait for the disk).
#[derive(Debug)]
pub struct Store {
    env: Env<WithoutTls>,
    dbs: Dbs,
    map_size: usize,
    /// The locked directory; declared last so the lock is released after the environment closed.
    dir: DataDir,
}

impl Store {
    /// Opens (creating if needed) the store in `path` with a map of `map_size` bytes.
    pub fn open(path: &Path, map_size: usize) -> Result<Self, StorageError> {
        let dir = DataDir::open(path, ENGINE, FORMAT_VERSION)?;
        let env_path = dir.path().join(ENV_DIR);
        std::fs::create_dir_all(&env_path).map_err(|e| io_error(format!("creating {}", env_path.display()), e))?;
        let env = open_env(&env_path, map_size).map_err(lmdb_error("opening the environment", map_size))?;
        let wtxn = env.write_txn().map_err(lmdb_error("opening the databases", map_size))?;
        let dbs = env
            .create_databases_and_commit(wtxn, |opener, wtxn| -> heed::Result<_> {
                let mut create = |name: &str| opener.create_database::<Bytes, Bytes>(wtxn, Some(name));
                let dbs = (create("data")?, create("blocks")?, create("meta")?);
                Ok(CommitOrAbort::<_, ()>::Commit(dbs))
            })
            .map_err(lmdb_error("creating the databases", map_size))?;
        let CommitOrAbort::Commit((data, blocks, meta)) = dbs else {
            return Err(StorageError::Backend { engine: ENGINE, message: "creating the databases was aborted".into() });
        };
        Ok(Self { env, dbs: Dbs { data, blocks, meta }, map_size, dir })
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn err(&self, context: &'static str) -> impl Fn(heed::Error) -> StorageError + '_ {
        lmdb_error(context, self.map_size)
    }

    fn read<T>(&self, f: impl FnOnce(&RoTxn<'_, WithoutTls>) -> Result<T, StorageError>) -> Result<T, StorageError> {
        let rtxn = self.env.read_txn().map_err(self.err("starting a read transaction"))?;
        f(&rtxn)
    }

    /// Runs `f` in one write transaction, committed when `f` returns `Ok(true)`, aborted otherwise.
    fn write(&self, f: impl FnOnce(&mut heed::RwTxn<'_>) -> Result<bool, StorageError>) -> Result<(), StorageError> {
        let mut wtxn = self.env.write_txn().map_err(self.err("starting a write transaction"))?;
        if f(&mut wtxn)? {
            wtxn.commit().map_err(self.err("committing"))?;
        }
        Ok(())
    }

    fn latest_in(&self, txn: &RoTxn<'_, WithoutTls>, prefix: &[u8]) -> Result<Option<TrxRev>, StorageError> {
        match self.dbs.data.get(txn, &key(prefix, LATEST, &[])).map_err(self.err("reading latest"))? {
            Some(bytes) => decode_latest(bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Adds the block to the `blocks` listing when it is not there yet.
    fn register(&self, txn: &mut heed::RwTxn<'_>, block_id: &BlockId) -> Result<(), StorageError> {
        if self.dbs.blocks.get(txn, block_id.as_bytes()).map_err(self.err("reading the block list"))?.is_none() {
            self.dbs.blocks.put(txn, block_id.as_bytes(), &[]).map_err(self.err("registering a block"))?;
        }
        Ok(())
    }

    /// See [`optimystic_core::RawStorage::latest`].
    pub fn latest(&self, block_id: &BlockId) -> Result<Option<TrxRev>, StorageError> {
        let prefix = block_prefix(block_id)?;
        self.read(|txn| self.latest_in(txn, &prefix))
    }

    /// See [`optimystic_core::RawStorage::revisions`].
    pub fn revisions(&self, block_id: &BlockId, from: u64, to: u64) -> Result<Vec<TrxRev>, StorageError> {
        if from > to {
            return Ok(Vec::new());
        }
        let prefix = block_prefix(block_id)?;
        let (start, end) = (rev_key(&prefix, REVISION, from), rev_key(&prefix, REVISION, to));
        self.read(|txn| {
            let range = (Bound::Included(start.as_slice()), Bound::Included(end.as_slice()));
            let mut out = Vec::new();
            for item in self.dbs.data.range(txn, &range).map_err(self.err("reading revisions"))? {
                let (key, trx) = item.map_err(self.err("reading revisions"))?;
                out.push(TrxRev { trx_id: decode_trx(trx)?, rev: rev_of_key(key)? });
            }
            Ok(out)
        })
    }

    /// See [`optimystic_core::RawStorage::revision_at_or_before`].
    pub fn revision_at_or_before(&self, block_id: &BlockId, at_rev: u64) -> Result<Option<TrxRev>, StorageError> {
        let prefix = block_prefix(block_id)?;
        let (start, end) = (rev_key(&prefix, REVISION, 0), rev_key(&prefix, REVISION, at_rev));
        self.read(|txn| {
            let range = (Bound::Included(start.as_slice()), Bound::Included(end.as_slice()));
            match self.dbs.data.rev_range(txn, &range).map_err(self.err("reading revisions"))?.next() {
                Some(item) => {
                    let (key, trx) = item.map_err(self.err("reading revisions"))?;
                    Ok(Some(TrxRev { trx_id: decode_trx(trx)?, rev: rev_of_key(key)? }))
                }
                None => Ok(None),
            }
        })
    }

    /// See [`optimystic_core::RawStorage::committed`].
    pub fn committed(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<CommittedTransform>, StorageError> {
        let key = trx_key(&block_prefix(block_id)?, COMMITTED, trx_id);
        self.read(|txn| match self.dbs.data.get(txn, &key).map_err(self.err("reading a committed transform"))? {
            Some(bytes) => {
                let (rev, json) = split_rev(bytes)?;
                let transform = serde_json::from_slice(json).map_err(corrupt)?;
                Ok(Some(CommittedTransform { rev, transform }))
            }
            None => Ok(None),
        })
    }

    /// See [`optimystic_core::RawStorage::pending`].
    pub fn pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<Transform>, StorageError> {
        let key = trx_key(&block_prefix(block_id)?, PENDING, trx_id);
        self.read(|txn| match self.dbs.data.get(txn, &key).map_err(self.err("reading a pending transform"))? {
            Some(bytes) => Ok(Some(serde_json::from_slice(bytes).map_err(corrupt)?)),
            None => Ok(None),
        })
    }

    /// See [`optimystic_core::RawStorage::pending_trx_ids`].
    pub fn pending_trx_ids(&self, block_id: &BlockId) -> Result<Vec<TrxId>, StorageError> {
        let prefix = key(&block_prefix(block_id)?, PENDING, &[]);
        self.read(|txn| {
            let mut ids = Vec::new();
            for item in self.dbs.data.prefix_iter(txn, &prefix).map_err(self.err("listing pending transforms"))? {
                let (key, _) = item.map_err(self.err("listing pending transforms"))?;
                let trx = key.get(prefix.len()..).ok_or_else(|| corrupt("truncated pending key"))?;
                ids.push(decode_trx(trx)?);
            }
            Ok(ids)
        })
    }

    /// See [`optimystic_core::RawStorage::save_pending`].
    pub fn save_pending(&self, block_id: &BlockId, trx_id: &TrxId, transform: &Transform) -> Result<(), StorageError> {
        let key = trx_key(&block_prefix(block_id)?, PENDING, trx_id);
        let value = to_json(transform)?;
        self.write(|txn| {
            self.dbs.data.put(txn, &key, &value).map_err(self.err("saving a pending transform"))?;
            self.register(txn, block_id)?;
            Ok(true)
        })
    }

    /// See [`optimystic_core::RawStorage::delete_pending`].
    pub fn delete_pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<(), StorageError> {
        let prefix = block_prefix(block_id)?;
        let key = trx_key(&prefix, PENDING, trx_id);
        let pendings = self::key(&prefix, PENDING, &[]);
        self.write(|txn| {
            if !self.dbs.data.delete(txn, &key).map_err(self.err("deleting a pending transform"))? {
                return Ok(false);
            }
            // A block with nothing committed and nothing pending is forgotten.
            let unknown = self.latest_in(txn, &prefix)?.is_none();
            if unknown {
                let more =
                    self.dbs.data.prefix_iter(txn, &pendings).map_err(self.err("listing pending"))?.next().is_some();
                if !more {
                    self.dbs.blocks.delete(txn, block_id.as_bytes()).map_err(self.err("forgetting a block"))?;
                }
            }
            Ok(true)
        })
    }

    /// See [`optimystic_core::RawStorage::materialized`].
    pub fn materialized(&self, block_id: &BlockId, rev: u64) -> Result<Option<BlockValue>, StorageError> {
        let key = rev_key(&block_prefix(block_id)?, VALUE, rev);
        self.read(|txn| match self.dbs.data.get(txn, &key).map_err(self.err("reading a value"))? {
            Some(bytes) => Ok(Some(serde_json::from_slice(bytes).map_err(corrupt)?)),
            None => Ok(None),
        })
    }

    /// See [`optimystic_core::RawStorage::commit_block`]: one write transaction.
    pub fn commit_block(&self, block_id: &BlockId, commit: &BlockCommit) -> Result<(), StorageError> {
        let prefix = block_prefix(block_id)?;
        let value = to_json(&commit.value)?;
        let mut committed = commit.rev.to_be_bytes().to_vec();
        committed.extend_from_slice(&to_json(&commit.transform)?);
        let latest = encode_latest(&TrxRev { trx_id: commit.trx_id.clone(), rev: commit.rev });
        let (committed_key, pending_key) =
            (trx_key(&prefix, COMMITTED, &commit.trx_id), trx_key(&prefix, PENDING, &commit.trx_id));
        let (value_key, revision_key) = (rev_key(&prefix, VALUE, commit.rev), rev_key(&prefix, REVISION, commit.rev));
        self.write(|txn| {
            if let Some(current) = self.latest_in(txn, &prefix)?
                && current.rev >= commit.rev
            {
                return Err(StorageError::Invalid(format!(
                    "commit of {} at rev {} does not advance latest rev {} of {block_id}",
                    commit.trx_id, commit.rev, current.rev
                )));
            }
            let err = self.err("committing a block");
            let data = self.dbs.data;
            data.put(txn, &value_key, &value).map_err(&err)?;
            if let Some(prune) = commit.prune_value_at.filter(|r| *r != commit.rev) {
                data.delete(txn, &rev_key(&prefix, VALUE, prune)).map_err(&err)?;
            }
            data.put(txn, &revision_key, commit.trx_id.as_bytes()).map_err(&err)?;
            data.put(txn, &committed_key, &committed).map_err(&err)?;
            data.delete(txn, &pending_key).map_err(&err)?;
            data.put(txn, &key(&prefix, LATEST, &[]), &latest).map_err(&err)?;
            self.register(txn, block_id)?;
            Ok(true)
        })
    }

    /// See [`optimystic_core::RawStorage::get_meta`].
    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let key = meta_key(key);
        if key.len() > self.env.max_key_size() {
            // Such a key can never have been stored.
            return Ok(None);
        }
        self.read(|txn| Ok(self.dbs.meta.get(txn, &key).map_err(self.err("reading metadata"))?.map(<[u8]>::to_vec)))
    }

    /// See [`optimystic_core::RawStorage::put_meta`].
    pub fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        let key = self.checked_meta_key(key)?;
        self.write(|txn| {
            self.dbs.meta.put(txn, &key, value).map_err(self.err("writing metadata"))?;
            Ok(true)
        })
    }

    /// See [`optimystic_core::RawStorage::delete_meta`].
    pub fn delete_meta(&self, key: &str) -> Result<(), StorageError> {
        let key = meta_key(key);
        if key.len() > self.env.max_key_size() {
            return Ok(());
        }
        self.write(|txn| self.dbs.meta.delete(txn, &key).map_err(self.err("deleting metadata")))
    }

    /// See [`optimystic_core::RawStorage::write_meta`]: one write transaction, so all or nothing.
    pub fn write_meta(&self, writes: &[MetaWrite]) -> Result<(), StorageError> {
        let mut checked = Vec::with_capacity(writes.len());
        for write in writes {
            checked.push(match write {
                MetaWrite::Put(key, value) => (self.checked_meta_key(key)?, Some(value)),
                MetaWrite::Delete(key) => (meta_key(key), None),
            });
        }
        self.write(|txn| {
            for (key, value) in &checked {
                match value {
                    Some(value) => self.dbs.meta.put(txn, key, value).map_err(self.err("writing metadata"))?,
                    // A key beyond the size limit can never have been stored.
                    None if key.len() > self.env.max_key_size() => {}
                    None => {
                        self.dbs.meta.delete(txn, key).map_err(self.err("deleting metadata"))?;
                    }
                }
            }
            Ok(!checked.is_empty())
        })
    }

    /// See [`optimystic_core::RawStorage::list_meta`].
    pub fn list_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let prefix = meta_key(prefix);
        self.read(|txn| {
            let mut out = Vec::new();
            for item in self.dbs.meta.prefix_iter(txn, &prefix).map_err(self.err("listing metadata"))? {
                if out.len() >= limit {
                    break;
                }
                let (key, value) = item.map_err(self.err("listing metadata"))?;
                let key = key.get(1..).ok_or_else(|| corrupt("empty metadata key"))?;
                let key = std::str::from_utf8(key).map_err(|_| corrupt("metadata key is not UTF-8"))?;
                out.push((key.to_owned(), value.to_vec()));
            }
            Ok(out)
        })
    }

    /// See [`optimystic_core::RawStorage::block_ids`].
    pub fn block_ids(&self, after: Option<&BlockId>, limit: usize) -> Result<Vec<BlockId>, StorageError> {
        self.read(|txn| {
            let start = match after {
                Some(after) => Bound::Excluded(after.as_bytes()),
                None => Bound::Unbounded,
            };
            let range = (start, Bound::Unbounded);
            let mut out = Vec::new();
            for item in self.dbs.blocks.range(txn, &range).map_err(self.err("listing blocks"))? {
                if out.len() >= limit {
                    break;
                }
                let (key, _) = item.map_err(self.err("listing blocks"))?;
                let id = std::str::from_utf8(key).map_err(|_| corrupt("block id is not UTF-8"))?;
                out.push(BlockId::new(id).map_err(corrupt)?);
            }
            Ok(out)
        })
    }

    /// Size figures: the block count is kept by LMDB (no scan), the bytes are the data file's size.
    pub fn stats(&self) -> Result<StorageStats, StorageError> {
        let blocks = self.read(|txn| self.dbs.blocks.len(txn).map_err(self.err("counting blocks")))?;
        let bytes = self.env.real_disk_size().map_err(self.err("measuring the data file"))?;
        Ok(StorageStats { blocks, bytes: Some(bytes) })
    }

    /// Flushes the environment to disk.
    pub fn sync(&self) -> Result<(), StorageError> {
        self.env.force_sync().map_err(self.err("syncing"))
    }

    /// Metadata keys LMDB can store: at most the environment's key size, minus the prefix byte.
    fn checked_meta_key(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        let full = meta_key(key);
        if full.len() > self.env.max_key_size() {
            return Err(StorageError::Invalid(format!(
                "metadata key of {} bytes exceeds the LMDB limit of {} bytes",
                key.len(),
                self.env.max_key_size().saturating_sub(1)
            )));
        }
        Ok(full)
    }
}

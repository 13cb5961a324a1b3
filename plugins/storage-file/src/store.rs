//! The blocking file-system engine behind [`crate::FileStorage`].
//!
//! Layout of a data directory:
//!
//! ```text
//! FORMAT, LOCK                  see optimystic_datadir
//! tmp/                          files being written; emptied at open
//! meta/<name(key)>              u32 LE key length, key, value
//! blocks/<name(block id)>/
//!     id                        the block id (needed for hashed names)
//!     manifest                  the commit point, replaced atomically (see Manifest)
//!     log/<k>                   sealed revision log chunk k: CHUNK entries [rev, trxId], JSON
//!     t/<name(trx id)>          committed transform: {"trxId", "rev", "transform"}
//!     p/<name(trx id)>          pending transform: {"trxId", "transform"}
//!     v/<rev>                   materialized value at a revision other than latest (checkpoints)
//! ```
//!
//! Names come from [`crate::names`]. Every file is written under `tmp/`, fsynced and renamed into
//! place, so readers never see a partial file. A block directory is prepared under `tmp/` and
//! renamed into `blocks/` whole.
//!
//! The per-block commit step writes the committed transform (and, at a checkpoint, the previous
//! value, and every [`CHUNK`] revisions a sealed log chunk), fsyncs their directories, then
//! replaces the manifest (write, fsync, rename, fsync the block directory). The manifest holds
//! `latest`, the open tail of the revision log, the first revision of every sealed chunk and the
//! value at `latest`: the rename is the commit point, so after a crash a block is fully at the old
//! or fully at the new revision. Files written before a crash that no manifest refers to are
//! ignored: a committed-transform file counts only when the revision log names its transaction at
//! its revision, and a pending file counts only while its transaction is not committed (the
//! pending file is removed after the commit point).

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use optimystic_core::storage::{BlockCommit, BlockValue, CommittedTransform};
use optimystic_core::{BlockId, StorageError, Transform, TrxId, TrxRev};
use serde::{Deserialize, Serialize};

use crate::names::{self, Decoded};
use optimystic_datadir::{DataDir, io_error, sync_dir, write_synced};

/// The engine name written in the format marker.
pub const ENGINE: &str = "file";
/// The on-disk format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Revision log entries per sealed chunk; the manifest holds at most this many.
pub const CHUNK: usize = 64;

const BLOCKS_DIR: &str = "blocks";
const META_DIR: &str = "meta";
const TMP_DIR: &str = "tmp";
const ID_FILE: &str = "id";
const MANIFEST_FILE: &str = "manifest";
const LOG_DIR: &str = "log";
const TRX_DIR: &str = "t";
const PENDING_DIR: &str = "p";
const VALUE_DIR: &str = "v";
const MANIFEST_MAGIC: &[u8; 4] = b"OMF1";
const STRIPES: usize = 64;

/// One revision log entry: `[rev, trxId]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct LogEntry(u64, TrxId);

impl LogEntry {
    fn trx_rev(&self) -> TrxRev {
        TrxRev { trx_id: self.1.clone(), rev: self.0 }
    }
}

/// The JSON header of a manifest.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Header {
    /// The newest committed revision.
    latest: TrxRev,
    /// The first revision of each sealed chunk `log/<k>`, ascending.
    sealed: Vec<u64>,
    /// The newest revision log entries (1..=CHUNK), ascending; the last one is `latest`.
    tail: Vec<LogEntry>,
}

/// A block's manifest: `OMF1`, the header length (u32 LE), the header JSON and the JSON of the
/// value at `latest` (`null` when the block is deleted there).
#[derive(Debug)]
struct Manifest {
    header: Header,
    value: Vec<u8>,
}

impl Manifest {
    fn encode(header: &Header, value: &[u8]) -> Result<Vec<u8>, StorageError> {
        let head = to_json(header)?;
        let len = u32::try_from(head.len())
            .map_err(|_| StorageError::Invalid(format!("manifest header of {} bytes is too large", head.len())))?;
        let mut out = Vec::with_capacity(8 + head.len() + value.len());
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&head);
        out.extend_from_slice(value);
        Ok(out)
    }

    fn decode(bytes: &[u8], path: &Path) -> Result<Self, StorageError> {
        let corrupt = |what: &str| StorageError::Corrupt(format!("manifest {}: {what}", path.display()));
        let rest = bytes.strip_prefix(MANIFEST_MAGIC.as_slice()).ok_or_else(|| corrupt("bad magic"))?;
        let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(|| corrupt("truncated"))?;
        let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| corrupt("header length"))?;
        let (head, value) = rest.split_at_checked(len).ok_or_else(|| corrupt("truncated header"))?;
        let header: Header = serde_json::from_slice(head).map_err(|e| corrupt(&format!("header: {e}")))?;
        let revs: Vec<u64> = header.sealed.iter().copied().chain(header.tail.iter().map(|e| e.0)).collect();
        let tail_ok = !header.tail.is_empty()
            && header.tail.len() <= CHUNK
            && header.tail.last().map(LogEntry::trx_rev).as_ref() == Some(&header.latest)
            && revs.windows(2).all(|w| matches!(w, [a, b] if a < b));
        if !tail_ok {
            return Err(corrupt("inconsistent revision log"));
        }
        Ok(Self { header, value: value.to_vec() })
    }

    fn value(&self, path: &Path) -> Result<BlockValue, StorageError> {
        serde_json::from_slice(&self.value)
            .map_err(|e| StorageError::Corrupt(format!("value in manifest {}: {e}", path.display())))
    }
}

/// `t/<name>`: a committed transform.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommittedFile {
    trx_id: TrxId,
    rev: u64,
    transform: Transform,
}

/// `p/<name>`: a pending transform.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PendingFile {
    trx_id: TrxId,
    transform: Transform,
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(value).map_err(|e| StorageError::backend(ENGINE, "encoding", e))
}

fn from_json<'a, T: Deserialize<'a>>(bytes: &'a [u8], path: &Path) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt(format!("{}: {e}", path.display())))
}

/// Reads a whole file; `None` when it (or its directory) does not exist.
fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::io(format!("reading {}", path.display()), e)),
    }
}

/// The names in a directory; empty when it does not exist.
fn list_dir(path: &Path) -> Result<Vec<String>, StorageError> {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StorageError::io(format!("listing {}", path.display()), e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io(format!("listing {}", path.display()), e))?;
        // Names this engine writes are ASCII; anything else is a stray file and ignored.
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

/// Removes a file; `Ok(false)` when it was not there.
fn remove_opt(path: &Path) -> Result<bool, StorageError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StorageError::io(format!("removing {}", path.display()), e)),
    }
}

fn meta_encode(key: &str, value: &[u8]) -> Result<Vec<u8>, StorageError> {
    let len = u32::try_from(key.len()).map_err(|_| StorageError::Invalid("metadata key too long".into()))?;
    let mut out = Vec::with_capacity(4 + key.len() + value.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(value);
    Ok(out)
}

fn meta_decode(bytes: Vec<u8>, path: &Path) -> Result<(String, Vec<u8>), StorageError> {
    let corrupt = || StorageError::Corrupt(format!("metadata file {} is malformed", path.display()));
    let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(corrupt)?;
    let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| corrupt())?;
    let (key, value) = rest.split_at_checked(len).ok_or_else(corrupt)?;
    let key = std::str::from_utf8(key).map_err(|_| corrupt())?.to_owned();
    Ok((key, value.to_vec()))
}

/// The open store: every method blocks on file-system calls.
#[derive(Debug)]
pub struct Store {
    blocks: PathBuf,
    meta: PathBuf,
    tmp: PathBuf,
    /// Serializes the mutations of a block (by hash of its id) within this process.
    stripes: [Mutex<()>; STRIPES],
    counter: AtomicU64,
    /// The locked directory; declared last so the lock is released after everything else.
    dir: DataDir,
}

impl Store {
    /// Opens (creating if needed) the store in `path`: locks it, checks its format marker and
    /// removes what a crash left in `tmp/`.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let dir = DataDir::open(path, ENGINE, FORMAT_VERSION)?;
        let root = dir.path().to_path_buf();
        let store = Self {
            blocks: root.join(BLOCKS_DIR),
            meta: root.join(META_DIR),
            tmp: root.join(TMP_DIR),
            stripes: std::array::from_fn(|_| Mutex::new(())),
            counter: AtomicU64::new(0),
            dir,
        };
        for sub in [&store.blocks, &store.meta, &store.tmp] {
            fs::create_dir_all(sub).map_err(|e| StorageError::io(format!("creating {}", sub.display()), e))?;
        }
        for name in list_dir(&store.tmp)? {
            let path = store.tmp.join(name);
            let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            removed.map_err(|e| StorageError::io(format!("clearing {}", path.display()), e))?;
        }
        sync_dir(&root)?;
        Ok(store)
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn lock_block(&self, block_id: &BlockId) -> MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        block_id.hash(&mut hasher);
        let index = usize::try_from(hasher.finish() % STRIPES as u64).unwrap_or(0);
        // `index < STRIPES` by construction. The mutex guards no data, so a poisoned one is still
        // a valid lock.
        #[allow(clippy::indexing_slicing)]
        self.stripes[index].lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{}-{n}", std::process::id()))
    }

    /// Writes `bytes` to `target` atomically: a fsynced temporary file renamed into place. The
    /// caller fsyncs `target`'s directory.
    fn put_file(&self, target: &Path, bytes: &[u8]) -> Result<(), StorageError> {
        let tmp = self.tmp_path();
        let written = write_synced(&tmp, bytes).and_then(|()| {
            fs::rename(&tmp, target).map_err(|e| io_error(format!("renaming into {}", target.display()), e))
        });
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    fn block_dir(&self, block_id: &BlockId) -> PathBuf {
        self.blocks.join(names::encode(block_id))
    }

    /// The block's directory, created (whole, atomically) when missing.
    fn ensure_block_dir(&self, block_id: &BlockId) -> Result<PathBuf, StorageError> {
        let dir = self.block_dir(block_id);
        if dir.is_dir() {
            return Ok(dir);
        }
        let staging = self.tmp_path();
        let prepared = (|| {
            fs::create_dir(&staging).map_err(|e| io_error(format!("creating {}", staging.display()), e))?;
            write_synced(&staging.join(ID_FILE), block_id.as_bytes())?;
            for sub in [LOG_DIR, TRX_DIR, PENDING_DIR, VALUE_DIR] {
                let path = staging.join(sub);
                fs::create_dir(&path).map_err(|e| io_error(format!("creating {}", path.display()), e))?;
            }
            sync_dir(&staging)?;
            fs::rename(&staging, &dir).map_err(|e| io_error(format!("creating {}", dir.display()), e))?;
            sync_dir(&self.blocks)
        })();
        if prepared.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        prepared.map(|()| dir)
    }

    fn read_manifest(&self, block_dir: &Path) -> Result<Option<Manifest>, StorageError> {
        let path = block_dir.join(MANIFEST_FILE);
        read_opt(&path)?.map(|bytes| Manifest::decode(&bytes, &path)).transpose()
    }

    fn read_chunk(&self, block_dir: &Path, header: &Header, k: usize) -> Result<Vec<LogEntry>, StorageError> {
        let path = block_dir.join(LOG_DIR).join(k.to_string());
        let bytes = read_opt(&path)?
            .ok_or_else(|| StorageError::Corrupt(format!("sealed revision log chunk {} is missing", path.display())))?;
        let entries: Vec<LogEntry> = from_json(&bytes, &path)?;
        if entries.len() != CHUNK || entries.first().map(|e| e.0) != header.sealed.get(k).copied() {
            return Err(StorageError::Corrupt(format!(
                "sealed revision log chunk {} does not match its manifest",
                path.display()
            )));
        }
        Ok(entries)
    }

    /// The newest log entry with `rev <= at_rev`.
    fn entry_at_or_before(
        &self,
        block_dir: &Path,
        header: &Header,
        at_rev: u64,
    ) -> Result<Option<TrxRev>, StorageError> {
        if at_rev >= header.latest.rev {
            return Ok(Some(header.latest.clone()));
        }
        let in_tail = header.tail.partition_point(|e| e.0 <= at_rev);
        if let Some(entry) = in_tail.checked_sub(1).and_then(|i| header.tail.get(i)) {
            return Ok(Some(entry.trx_rev()));
        }
        let Some(k) = header.sealed.partition_point(|first| *first <= at_rev).checked_sub(1) else {
            return Ok(None);
        };
        let chunk = self.read_chunk(block_dir, header, k)?;
        let index = chunk.partition_point(|e| e.0 <= at_rev);
        Ok(index.checked_sub(1).and_then(|i| chunk.get(i)).map(LogEntry::trx_rev))
    }

    /// The log entries with `from <= rev <= to`, ascending.
    fn entries_between(
        &self,
        block_dir: &Path,
        header: &Header,
        from: u64,
        to: u64,
    ) -> Result<Vec<TrxRev>, StorageError> {
        let mut out = Vec::new();
        if from > to {
            return Ok(out);
        }
        let first_tail = header.tail.first().map_or(u64::MAX, |e| e.0);
        if from < first_tail {
            let start = header.sealed.partition_point(|first| *first <= from).saturating_sub(1);
            for (k, first) in header.sealed.iter().enumerate().skip(start) {
                if *first > to {
                    break;
                }
                let chunk = self.read_chunk(block_dir, header, k)?;
                out.extend(chunk.iter().filter(|e| e.0 >= from && e.0 <= to).map(LogEntry::trx_rev));
            }
        }
        out.extend(header.tail.iter().filter(|e| e.0 >= from && e.0 <= to).map(LogEntry::trx_rev));
        Ok(out)
    }

    /// The committed transform of a transaction, counted only when the log names it at its rev.
    fn committed_in(
        &self,
        block_dir: &Path,
        manifest: Option<&Manifest>,
        trx_id: &TrxId,
    ) -> Result<Option<CommittedTransform>, StorageError> {
        let Some(manifest) = manifest else {
            return Ok(None);
        };
        let path = block_dir.join(TRX_DIR).join(names::encode(trx_id));
        let Some(bytes) = read_opt(&path)? else {
            return Ok(None);
        };
        let file: CommittedFile = from_json(&bytes, &path)?;
        if file.trx_id != *trx_id {
            return Err(StorageError::Corrupt(format!("{} holds transaction {}", path.display(), file.trx_id)));
        }
        let logged = self.entry_at_or_before(block_dir, &manifest.header, file.rev)?;
        if logged.as_ref().is_some_and(|l| l.rev == file.rev && l.trx_id == *trx_id) {
            Ok(Some(CommittedTransform { rev: file.rev, transform: file.transform }))
        } else {
            // Written by a commit step that crashed before its commit point.
            Ok(None)
        }
    }

    /// See [`optimystic_core::RawStorage::latest`].
    pub fn latest(&self, block_id: &BlockId) -> Result<Option<TrxRev>, StorageError> {
        Ok(self.read_manifest(&self.block_dir(block_id))?.map(|m| m.header.latest))
    }

    /// See [`optimystic_core::RawStorage::revisions`].
    pub fn revisions(&self, block_id: &BlockId, from: u64, to: u64) -> Result<Vec<TrxRev>, StorageError> {
        let dir = self.block_dir(block_id);
        match self.read_manifest(&dir)? {
            Some(m) => self.entries_between(&dir, &m.header, from, to),
            None => Ok(Vec::new()),
        }
    }

    /// See [`optimystic_core::RawStorage::revision_at_or_before`].
    pub fn revision_at_or_before(&self, block_id: &BlockId, at_rev: u64) -> Result<Option<TrxRev>, StorageError> {
        let dir = self.block_dir(block_id);
        match self.read_manifest(&dir)? {
            Some(m) => self.entry_at_or_before(&dir, &m.header, at_rev),
            None => Ok(None),
        }
    }

    /// See [`optimystic_core::RawStorage::committed`].
    pub fn committed(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<CommittedTransform>, StorageError> {
        let dir = self.block_dir(block_id);
        let manifest = self.read_manifest(&dir)?;
        self.committed_in(&dir, manifest.as_ref(), trx_id)
    }

    /// See [`optimystic_core::RawStorage::pending`].
    pub fn pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<Transform>, StorageError> {
        let dir = self.block_dir(block_id);
        let path = dir.join(PENDING_DIR).join(names::encode(trx_id));
        let Some(bytes) = read_opt(&path)? else {
            return Ok(None);
        };
        let file: PendingFile = from_json(&bytes, &path)?;
        if file.trx_id != *trx_id {
            return Err(StorageError::Corrupt(format!("{} holds transaction {}", path.display(), file.trx_id)));
        }
        let manifest = self.read_manifest(&dir)?;
        if self.committed_in(&dir, manifest.as_ref(), trx_id)?.is_some() {
            // Left behind by a commit step that crashed after its commit point.
            return Ok(None);
        }
        Ok(Some(file.transform))
    }

    /// See [`optimystic_core::RawStorage::pending_trx_ids`].
    pub fn pending_trx_ids(&self, block_id: &BlockId) -> Result<Vec<TrxId>, StorageError> {
        let dir = self.block_dir(block_id);
        let pending_dir = dir.join(PENDING_DIR);
        let names = list_dir(&pending_dir)?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let manifest = self.read_manifest(&dir)?;
        let mut ids = Vec::with_capacity(names.len());
        for name in names {
            let trx_id = match names::decode(&name) {
                Decoded::Id(id) => TrxId::new(id).map_err(|e| {
                    StorageError::Corrupt(format!("pending file {}: {e}", pending_dir.join(&name).display()))
                })?,
                Decoded::Hashed => {
                    let path = pending_dir.join(&name);
                    match read_opt(&path)? {
                        Some(bytes) => from_json::<PendingFile>(&bytes, &path)?.trx_id,
                        None => continue,
                    }
                }
                Decoded::Foreign => continue,
            };
            if self.committed_in(&dir, manifest.as_ref(), &trx_id)?.is_none() {
                ids.push(trx_id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// See [`optimystic_core::RawStorage::save_pending`].
    pub fn save_pending(&self, block_id: &BlockId, trx_id: &TrxId, transform: &Transform) -> Result<(), StorageError> {
        let _lock = self.lock_block(block_id);
        let dir = self.ensure_block_dir(block_id)?;
        let pending_dir = dir.join(PENDING_DIR);
        let bytes = to_json(&PendingFile { trx_id: trx_id.clone(), transform: transform.clone() })?;
        self.put_file(&pending_dir.join(names::encode(trx_id)), &bytes)?;
        sync_dir(&pending_dir)
    }

    /// See [`optimystic_core::RawStorage::delete_pending`].
    pub fn delete_pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<(), StorageError> {
        let _lock = self.lock_block(block_id);
        let dir = self.block_dir(block_id);
        let pending_dir = dir.join(PENDING_DIR);
        if !remove_opt(&pending_dir.join(names::encode(trx_id)))? {
            return Ok(());
        }
        sync_dir(&pending_dir)?;
        // A block with nothing committed and nothing pending is forgotten. The pending record is
        // already gone, so a failure here only leaves an empty directory behind, which listings
        // ignore.
        if !dir.join(MANIFEST_FILE).exists()
            && list_dir(&pending_dir).is_ok_and(|n| n.is_empty())
            && let Err(e) = self.remove_block_dir(&dir)
        {
            tracing::warn!(%block_id, error = %e, "could not remove an empty block directory");
        }
        Ok(())
    }

    fn remove_block_dir(&self, dir: &Path) -> Result<(), StorageError> {
        let grave = self.tmp_path();
        fs::rename(dir, &grave).map_err(|e| StorageError::io(format!("removing {}", dir.display()), e))?;
        sync_dir(&self.blocks)?;
        fs::remove_dir_all(&grave).map_err(|e| StorageError::io(format!("removing {}", grave.display()), e))
    }

    /// See [`optimystic_core::RawStorage::materialized`].
    pub fn materialized(&self, block_id: &BlockId, rev: u64) -> Result<Option<BlockValue>, StorageError> {
        let dir = self.block_dir(block_id);
        let Some(manifest) = self.read_manifest(&dir)? else {
            return Ok(None);
        };
        if rev == manifest.header.latest.rev {
            return manifest.value(&dir.join(MANIFEST_FILE)).map(Some);
        }
        if rev > manifest.header.latest.rev {
            return Ok(None);
        }
        let path = dir.join(VALUE_DIR).join(rev.to_string());
        read_opt(&path)?.map(|bytes| from_json::<BlockValue>(&bytes, &path)).transpose()
    }

    /// See [`optimystic_core::RawStorage::commit_block`].
    pub fn commit_block(&self, block_id: &BlockId, commit: &BlockCommit) -> Result<(), StorageError> {
        let _lock = self.lock_block(block_id);
        let dir = self.ensure_block_dir(block_id)?;
        let old = self.read_manifest(&dir)?;
        if let Some(old) = &old
            && old.header.latest.rev >= commit.rev
        {
            return Err(StorageError::Invalid(format!(
                "commit of {} at rev {} does not advance latest rev {} of {block_id}",
                commit.trx_id, commit.rev, old.header.latest.rev
            )));
        }
        let trx_name = names::encode(&commit.trx_id);
        let value = to_json(&commit.value)?;
        let committed = to_json(&CommittedFile {
            trx_id: commit.trx_id.clone(),
            rev: commit.rev,
            transform: commit.transform.clone(),
        })?;

        // 1. Everything the new manifest refers to, durable before it.
        self.put_file(&dir.join(TRX_DIR).join(&trx_name), &committed)?;
        let mut dirty = vec![TRX_DIR];
        let entry = LogEntry(commit.rev, commit.trx_id.clone());
        let latest = entry.trx_rev();
        let mut previous_rev = None;
        let header = match old {
            None => Header { latest, sealed: Vec::new(), tail: vec![entry] },
            Some(old) => {
                let prev = old.header.latest.rev;
                previous_rev = Some(prev);
                if commit.prune_value_at != Some(prev) {
                    // The previous latest stays materialized (a checkpoint): move it out of the
                    // manifest into its own file.
                    self.put_file(&dir.join(VALUE_DIR).join(prev.to_string()), &old.value)?;
                    dirty.push(VALUE_DIR);
                }
                let mut header = old.header;
                if header.tail.len() >= CHUNK {
                    let k = header.sealed.len();
                    self.put_file(&dir.join(LOG_DIR).join(k.to_string()), &to_json(&header.tail)?)?;
                    dirty.push(LOG_DIR);
                    if let Some(first) = header.tail.first() {
                        header.sealed.push(first.0);
                    }
                    header.tail.clear();
                }
                header.tail.push(entry);
                header.latest = latest;
                header
            }
        };
        for sub in dirty {
            sync_dir(&dir.join(sub))?;
        }

        // 2. The commit point.
        self.put_file(&dir.join(MANIFEST_FILE), &Manifest::encode(&header, &value)?)?;
        sync_dir(&dir)?;

        // 3. Clean-up; readers already ignore what is left if this fails or a crash interrupts it.
        if let Err(e) = remove_opt(&dir.join(PENDING_DIR).join(&trx_name)) {
            tracing::warn!(%block_id, trx_id = %commit.trx_id, error = %e, "could not remove a committed pending file");
        }
        if let Some(prune) = commit.prune_value_at.filter(|r| Some(*r) != previous_rev && *r != commit.rev)
            && let Err(e) = remove_opt(&dir.join(VALUE_DIR).join(prune.to_string()))
        {
            tracing::warn!(%block_id, rev = prune, error = %e, "could not prune a materialized value");
        }
        Ok(())
    }

    fn meta_path(&self, key: &str) -> PathBuf {
        self.meta.join(names::encode(key))
    }

    /// See [`optimystic_core::RawStorage::get_meta`].
    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let path = self.meta_path(key);
        let Some(bytes) = read_opt(&path)? else {
            return Ok(None);
        };
        let (stored, value) = meta_decode(bytes, &path)?;
        if stored != key {
            return Err(StorageError::Corrupt(format!("{} holds key {stored:?}", path.display())));
        }
        Ok(Some(value))
    }

    /// See [`optimystic_core::RawStorage::put_meta`].
    pub fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.put_file(&self.meta_path(key), &meta_encode(key, value)?)?;
        sync_dir(&self.meta)
    }

    /// See [`optimystic_core::RawStorage::delete_meta`].
    pub fn delete_meta(&self, key: &str) -> Result<(), StorageError> {
        if remove_opt(&self.meta_path(key))? {
            sync_dir(&self.meta)?;
        }
        Ok(())
    }

    /// See [`optimystic_core::RawStorage::list_meta`].
    pub fn list_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let inline = names::inline_prefix(prefix);
        let mut found: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        for name in list_dir(&self.meta)? {
            match names::decode(&name) {
                Decoded::Id(key) if name.starts_with(&inline) => found.push((key, None)),
                Decoded::Hashed => {
                    let path = self.meta.join(&name);
                    if let Some(bytes) = read_opt(&path)? {
                        let (key, value) = meta_decode(bytes, &path)?;
                        if key.starts_with(prefix) {
                            found.push((key, Some(value)));
                        }
                    }
                }
                Decoded::Id(_) | Decoded::Foreign => {}
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::with_capacity(found.len().min(limit));
        for (key, value) in found {
            if out.len() >= limit {
                break;
            }
            let value = match value {
                Some(value) => value,
                // Deleted since the listing: skip it.
                None => match self.get_meta(&key)? {
                    Some(value) => value,
                    None => continue,
                },
            };
            out.push((key, value));
        }
        Ok(out)
    }

    /// See [`optimystic_core::RawStorage::block_ids`].
    pub fn block_ids(&self, after: Option<&BlockId>, limit: usize) -> Result<Vec<BlockId>, StorageError> {
        let mut ids = Vec::new();
        for name in list_dir(&self.blocks)? {
            let dir = self.blocks.join(&name);
            let id = match names::decode(&name) {
                Decoded::Id(id) => id,
                Decoded::Hashed => match read_opt(&dir.join(ID_FILE))? {
                    Some(bytes) => String::from_utf8(bytes)
                        .map_err(|_| StorageError::Corrupt(format!("{} is not UTF-8", dir.join(ID_FILE).display())))?,
                    None => continue,
                },
                Decoded::Foreign => continue,
            };
            let id = BlockId::new(id)
                .map_err(|e| StorageError::Corrupt(format!("block directory {}: {e}", dir.display())))?;
            if after.is_none_or(|a| id > *a) {
                ids.push((id, dir));
            }
        }
        ids.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::new();
        for (id, dir) in ids {
            if out.len() >= limit {
                break;
            }
            if dir.join(MANIFEST_FILE).exists() || !list_dir(&dir.join(PENDING_DIR))?.is_empty() {
                out.push(id);
            }
        }
        Ok(out)
    }
}

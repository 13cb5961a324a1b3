//! A template storage plugin on the key-value seam: [`WalKv`], registered as
//! `storage example-wal`.
//!
//! Copy this crate to start a new storage engine. It shows the three things every storage plugin
//! has:
//!
//! 1. an engine: here a [`KvStore`] (seven small methods: get, scan, an atomic write batch, flush,
//!    close, name, durable), turned into the full block storage by core's generic
//!    [`KvBlockStorage`] adapter, which keeps revision logs, pending transforms and metadata in the
//!    store's keys. (An engine that wants its own layout implements
//!    [`RawStorage`] directly instead, as the `file` engine does.)
//! 2. a builder that turns the plugin's configuration section into that engine, refusing options
//!    it does not know ([`build`]);
//! 3. an `inventory::submit!` registration so the node finds the builder by name (at the bottom of
//!    this file), plus `tests/`, which run the shared conformance suites.
//!
//! The engine keeps every key in a `BTreeMap` and makes it durable with a write-ahead log: each
//! batch is appended to one file as a record `[payload length u32 LE][FNV-1a 64 of the payload,
//! LE][payload]`, fsynced when the batch is durable, and applied to the map. Opening the store
//! replays the log; a record cut short or damaged by a crash ends the replay and is cut off, so
//! the store holds every batch up to the last whole one. The payload of a batch is its writes,
//! each `[1][key length u32 LE][key][value length u32 LE][value]` for a put or
//! `[0][key length u32 LE][key]` for a delete.
//!
//! Kept simple on purpose: the log is never compacted (a real engine rewrites a snapshot of the
//! map now and then), the whole store must fit in memory, and nothing stops two processes from
//! opening the same log (a real engine locks its directory, as the file and LMDB engines do
//! with `optimystic-datadir`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use optimystic_core::StorageError;
use optimystic_core::kv::{KvBlockStorage, KvEntry, KvStore, KvWrite, MAX_KEY_BYTES, check_keys, scan_map};
use optimystic_core::registry::{PluginConfig, PluginDescriptor, PluginError, StorageContext, parse_config};
use optimystic_core::storage::RawStorage;
use serde::Deserialize;
use serde_json::Value;

/// The name configuration uses to pick this engine (`[storage] kind = "example-wal"`).
pub const PLUGIN_NAME: &str = "example-wal";
/// How this engine names itself in errors.
const ENGINE: &str = "example-wal";
/// The log's file name when the configuration names no `path`.
pub const DEFAULT_FILE: &str = "example-wal.log";
/// Bytes before a record's payload: its length (u32) and checksum (u64).
const HEADER_BYTES: usize = 12;

/// The block storage this plugin builds: the adapter over a [`WalKv`].
pub type WalStorage = KvBlockStorage<WalKv>;

/// What an open store holds.
#[derive(Debug)]
struct Open {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The log, opened for appending.
    log: File,
    /// The log's length up to the last whole record: a failed append is cut back to it.
    len: u64,
    /// Whether a batch was appended since the last fsync.
    unsynced: bool,
}

/// A sorted map in memory made durable by an append-only log file: a [`KvStore`].
#[derive(Debug)]
pub struct WalKv {
    path: PathBuf,
    /// `None` once closed. One lock for every call keeps each batch atomic and ordered.
    open: Mutex<Option<Open>>,
}

/// FNV-1a, 64 bits: enough to tell a torn or damaged record from a whole one.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn io(context: &str, path: &Path) -> impl Fn(std::io::Error) -> StorageError {
    let context = format!("{context} {}", path.display());
    move |e| StorageError::io(context.clone(), e)
}

/// Appends a length-prefixed byte string.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), StorageError> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| StorageError::Invalid(format!("{ENGINE}: {} bytes do not fit a log record", bytes.len())))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// A batch as one log record.
fn encode(batch: &[KvWrite]) -> Result<Vec<u8>, StorageError> {
    let mut payload = Vec::new();
    for write in batch {
        match write {
            KvWrite::Put { key, value } => {
                payload.push(1);
                put_bytes(&mut payload, key)?;
                put_bytes(&mut payload, value)?;
            }
            KvWrite::Delete { key } => {
                payload.push(0);
                put_bytes(&mut payload, key)?;
            }
        }
    }
    let mut record = Vec::with_capacity(HEADER_BYTES + payload.len());
    let len = u32::try_from(payload.len())
        .map_err(|_| StorageError::Invalid(format!("{ENGINE}: a batch of {} bytes is too large", payload.len())))?;
    record.extend_from_slice(&len.to_le_bytes());
    record.extend_from_slice(&checksum(&payload).to_le_bytes());
    record.extend_from_slice(&payload);
    Ok(record)
}

/// Reads a length-prefixed byte string at the front of `bytes`.
fn take_bytes<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = bytes.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
    let (taken, rest) = rest.split_at_checked(len)?;
    *bytes = rest;
    Some(taken)
}

/// Applies one record's payload to `map`. A payload that passed its checksum but does not parse
/// was written by something else: [`StorageError::Corrupt`].
fn apply(map: &mut BTreeMap<Vec<u8>, Vec<u8>>, mut payload: &[u8], path: &Path) -> Result<(), StorageError> {
    let corrupt = || StorageError::Corrupt(format!("{ENGINE}: a record of {} does not parse", path.display()));
    while let Some((tag, rest)) = payload.split_first() {
        payload = rest;
        let key = take_bytes(&mut payload).ok_or_else(corrupt)?.to_vec();
        match tag {
            1 => {
                let value = take_bytes(&mut payload).ok_or_else(corrupt)?;
                map.insert(key, value.to_vec());
            }
            0 => {
                map.remove(&key);
            }
            _ => return Err(corrupt()),
        }
    }
    Ok(())
}

impl WalKv {
    /// Opens (creating if needed) the store whose log is the file `path`, replaying the log.
    /// A damaged or incomplete tail (a crash while appending) is cut off.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let path = path.as_ref().to_path_buf();
        let mut log =
            OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(io("opening", &path))?;
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes).map_err(io("reading", &path))?;
        let mut map = BTreeMap::new();
        let mut rest = bytes.as_slice();
        while let Some((len, tail)) = rest.split_first_chunk::<4>()
            && let Some((sum, tail)) = tail.split_first_chunk::<8>()
            && let Some(payload) = usize::try_from(u32::from_le_bytes(*len)).ok().and_then(|len| tail.get(..len))
            && u64::from_le_bytes(*sum) == checksum(payload)
        {
            apply(&mut map, payload, &path)?;
            rest = tail.get(payload.len()..).unwrap_or_default();
        }
        let len = u64::try_from(bytes.len() - rest.len()).unwrap_or(u64::MAX);
        if !rest.is_empty() {
            log.set_len(len).and_then(|()| log.sync_data()).map_err(io("cutting the torn tail of", &path))?;
        }
        Ok(Self { path, open: Mutex::new(Some(Open { map, log, len, unsynced: false })) })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open store, or [`StorageError::Closed`]. A thread that panicked under the lock left
    /// the map and the log consistent (a batch is appended, then applied), so poison is ignored.
    fn lock(&self) -> MutexGuard<'_, Option<Open>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn closed() -> StorageError {
    StorageError::Closed { engine: ENGINE }
}

impl KvStore for WalKv {
    /// Reads are map lookups: run them inline. Writes append to a file and may fsync.
    const READS_WAIT: bool = false;
    const WRITES_WAIT: bool = true;

    fn name(&self) -> &'static str {
        ENGINE
    }

    fn durable(&self) -> bool {
        true
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.lock().as_ref().ok_or_else(closed)?.map.get(key).cloned())
    }

    fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Vec<KvEntry>, StorageError> {
        Ok(scan_map(&self.lock().as_ref().ok_or_else(closed)?.map, prefix, start, limit))
    }

    /// Log first, then the map: a batch is in the map only once it is in the log (and, when
    /// durable, on disk). A failed append is cut back off the log, so the log never keeps a batch
    /// that returned an error.
    fn write(&self, batch: &[KvWrite], durable: bool) -> Result<(), StorageError> {
        let mut guard = self.lock();
        let open = guard.as_mut().ok_or_else(closed)?;
        check_keys(ENGINE, batch, MAX_KEY_BYTES)?;
        if batch.is_empty() {
            return Ok(());
        }
        let record = encode(batch)?;
        let appended = open.log.write_all(&record).and_then(|()| if durable { open.log.sync_data() } else { Ok(()) });
        if let Err(e) = appended {
            // Leave the log as it was; if even that fails, the next open cuts the torn record.
            let _ = open.log.set_len(open.len);
            return Err(io("appending to", &self.path)(e));
        }
        open.len += u64::try_from(record.len()).unwrap_or(u64::MAX);
        open.unsynced = !durable;
        apply(&mut open.map, record.get(HEADER_BYTES..).unwrap_or_default(), &self.path)
    }

    fn flush(&self) -> Result<(), StorageError> {
        let mut guard = self.lock();
        let open = guard.as_mut().ok_or_else(closed)?;
        if open.unsynced {
            open.log.sync_data().map_err(io("syncing", &self.path))?;
            open.unsynced = false;
        }
        Ok(())
    }

    fn close(&self) -> Result<(), StorageError> {
        let mut guard = self.lock();
        if let Some(open) = guard.as_ref()
            && open.unsynced
        {
            open.log.sync_data().map_err(io("syncing", &self.path))?;
        }
        guard.take();
        Ok(())
    }

    fn size_bytes(&self) -> Result<Option<u64>, StorageError> {
        Ok(Some(self.lock().as_ref().ok_or_else(closed)?.len))
    }
}

/// The engine's options: its configuration section (the `[storage]` table of the node config)
/// less `kind`, the plugin name the node used to pick this builder. `deny_unknown_fields` refuses
/// any other key with [`PluginError::Config`], so a typo in a config file fails loudly at start-up
/// instead of being ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WalConfig {
    /// The log file; a relative one is under the node's data directory; default
    /// `<data dir>/example-wal.log`.
    pub path: Option<PathBuf>,
}

impl PluginConfig for WalConfig {
    fn validate(&self) -> Result<(), PluginError> {
        match &self.path {
            Some(path) if path.as_os_str().is_empty() => Err(PluginError::Config {
                plugin: format!("storage {PLUGIN_NAME}"),
                message: "`path` must be a non-empty string".to_owned(),
            }),
            _ => Ok(()),
        }
    }
}

/// Builds the engine from its configuration section ([`WalConfig`]).
pub fn build(cx: &StorageContext, config: &Value) -> Result<Arc<dyn RawStorage>, PluginError> {
    let path = log_path(cx, config)?;
    Ok(Arc::new(WalStorage::over(WalKv::open(path)?)))
}

/// The log file the configuration names; see [`WalConfig`].
pub fn log_path(cx: &StorageContext, config: &Value) -> Result<PathBuf, PluginError> {
    let plugin = format!("storage {PLUGIN_NAME}");
    let config: WalConfig = parse_config(&plugin, config)?;
    let error = |message: String| PluginError::Config { plugin: plugin.clone(), message };
    match (config.path, &cx.data_dir) {
        (Some(path), Some(dir)) if path.is_relative() => Ok(dir.join(path)),
        (Some(path), _) => Ok(path),
        (None, Some(dir)) => Ok(dir.join(DEFAULT_FILE)),
        (None, None) => Err(error("no `path` configured and the node has no data directory".to_owned())),
    }
}

// Registration: `inventory` collects this descriptor at link time, and the node finds it by kind
// (`storage`) and name. A binary must link this crate (`use optimystic_example_custom_storage as _;`)
// for the registration to be seen.
optimystic_core::inventory::submit! {
    PluginDescriptor::storage(PLUGIN_NAME, "example template: a sorted map and a write-ahead log (durable)", build)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use optimystic_core::identity::PeerId;
    use optimystic_core::registry::Registry;
    use serde_json::json;

    use super::*;

    #[test]
    fn registered_under_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let cx = StorageContext { local_peer_id: PeerId::random(), data_dir: Some(dir.path().to_path_buf()) };
        let storage =
            Registry::linked().build_storage(PLUGIN_NAME, &cx, &json!({ "kind": PLUGIN_NAME })).expect("build");
        assert!(storage.durable());
        assert!(dir.path().join(DEFAULT_FILE).exists());
    }

    #[test]
    fn config_is_validated() {
        let mut cx = StorageContext { local_peer_id: PeerId::random(), data_dir: None };
        assert!(matches!(log_path(&cx, &Value::Null), Err(PluginError::Config { .. })), "no path, no data dir");
        assert_eq!(log_path(&cx, &json!({ "path": "/tmp/x.log" })).unwrap(), PathBuf::from("/tmp/x.log"));
        cx.data_dir = Some(PathBuf::from("/data"));
        assert_eq!(log_path(&cx, &json!({ "kind": PLUGIN_NAME })).unwrap(), PathBuf::from("/data").join(DEFAULT_FILE));
        assert_eq!(log_path(&cx, &json!({ "path": "wal.log" })).unwrap(), PathBuf::from("/data/wal.log"));
        for bad in [json!({ "paht": "x" }), json!({ "path": "" }), json!({ "path": 3 }), json!(3)] {
            assert!(matches!(log_path(&cx, &bad), Err(PluginError::Config { .. })), "{bad} must be refused");
        }
    }
}

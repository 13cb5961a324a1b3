//! # optimystic-datadir
//!
//! The data directory of an on-disk engine: its exclusive lock, its format marker and the engine
//! configuration common to on-disk engines. The file and LMDB engines both use it, so both refuse
//! a directory in the same way.
//!
//! - `<dir>/LOCK` is held with an exclusive advisory lock (`flock`) for as long as the store is
//!   open, and names the holder's process id. A second open, from another process or from this
//!   one, fails with [`StorageError::Locked`].
//! - `<dir>/FORMAT` names the engine and its format version (JSON). A directory written by another
//!   engine or by an unknown version is refused with [`StorageError::Incompatible`], and so is a
//!   non-empty directory without a marker. The marker is written atomically before anything else.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use fs2::FileExt;
use optimystic_core::StorageError;
use optimystic_core::registry::PluginError;
use serde::{Deserialize, Serialize};

/// The lock file's name inside a data directory.
pub const LOCK_FILE: &str = "LOCK";
/// The format marker's name inside a data directory.
pub const FORMAT_FILE: &str = "FORMAT";
/// The temporary name the format marker is written under before it is renamed into place.
const FORMAT_TMP_FILE: &str = "FORMAT.tmp";
/// The value of the marker's `format` field.
const FORMAT_MAGIC: &str = "optimystic-storage";

/// The content of `<dir>/FORMAT`.
#[derive(Debug, Serialize, Deserialize)]
struct FormatMarker {
    format: String,
    engine: String,
    version: u32,
}

/// An open, locked data directory. The lock is released when this is dropped.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// Held open for the advisory lock; dropping it releases the lock.
    _lock: File,
}

impl DataDir {
    /// Creates the directory if needed, takes its lock and checks (or, in a fresh directory,
    /// writes) its format marker for `engine` at `version`.
    ///
    /// Fails with [`StorageError::Locked`] when another process or another open store of this
    /// process holds the directory, and with [`StorageError::Incompatible`] when the directory
    /// belongs to another engine, has another format version, or holds unrelated files.
    pub fn open(path: &Path, engine: &str, version: u32) -> Result<Self, StorageError> {
        fs::create_dir_all(path)
            .map_err(|e| StorageError::io(format!("creating data directory {}", path.display()), e))?;
        let lock = lock_dir(path)?;
        check_format(path, engine, version)?;
        Ok(Self { path: path.to_path_buf(), _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes the exclusive lock on `<dir>/LOCK` and writes this process id into it.
fn lock_dir(dir: &Path) -> Result<File, StorageError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StorageError::io(format!("opening lock file {}", path.display()), e))?;
    if let Err(e) = file.try_lock_exclusive() {
        if e.raw_os_error() == fs2::lock_contended_error().raw_os_error() || e.kind() == ErrorKind::WouldBlock {
            let mut holder = String::new();
            // The holder may be between taking the lock and writing its pid: report what is there.
            let holder = match file.read_to_string(&mut holder) {
                Ok(_) if !holder.trim().is_empty() => format!("process {}", holder.trim()),
                _ => "an unknown process".to_owned(),
            };
            return Err(StorageError::Locked(format!("{} is held by {holder}", dir.display())));
        }
        return Err(StorageError::io(format!("locking {}", path.display()), e));
    }
    let pid = std::process::id();
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(format!("{pid}\n").as_bytes()))
        .and_then(|()| file.flush())
        .map_err(|e| StorageError::io(format!("writing lock file {}", path.display()), e))?;
    Ok(file)
}

/// Checks the format marker, writing it first in an empty directory.
fn check_format(dir: &Path, engine: &str, version: u32) -> Result<(), StorageError> {
    let path = dir.join(FORMAT_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let marker: FormatMarker = serde_json::from_slice(&bytes).map_err(|e| {
                StorageError::Incompatible(format!("{} is not an optimystic format marker: {e}", path.display()))
            })?;
            if marker.format != FORMAT_MAGIC {
                return Err(StorageError::Incompatible(format!(
                    "{} names format {:?}, expected {FORMAT_MAGIC:?}",
                    path.display(),
                    marker.format
                )));
            }
            if marker.engine != engine {
                return Err(StorageError::Incompatible(format!(
                    "{} belongs to storage engine {:?}, not {engine:?}",
                    dir.display(),
                    marker.engine
                )));
            }
            if marker.version != version {
                return Err(StorageError::Incompatible(format!(
                    "{} has {engine} format version {}, this build reads version {version}",
                    dir.display(),
                    marker.version
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let entries = fs::read_dir(dir).map_err(|e| StorageError::io(format!("listing {}", dir.display()), e))?;
            for entry in entries {
                let entry = entry.map_err(|e| StorageError::io(format!("listing {}", dir.display()), e))?;
                let name = entry.file_name();
                if name != LOCK_FILE && name != FORMAT_TMP_FILE {
                    return Err(StorageError::Incompatible(format!(
                        "{} has no {FORMAT_FILE} marker but is not empty (found {:?})",
                        dir.display(),
                        name
                    )));
                }
            }
            let marker = FormatMarker { format: FORMAT_MAGIC.to_owned(), engine: engine.to_owned(), version };
            let bytes = serde_json::to_vec_pretty(&marker)
                .map_err(|e| StorageError::backend("datadir", "encoding the format marker", e))?;
            let tmp = dir.join(FORMAT_TMP_FILE);
            write_synced(&tmp, &bytes)?;
            fs::rename(&tmp, &path).map_err(|e| StorageError::io(format!("renaming {}", tmp.display()), e))?;
            sync_dir(dir)
        }
        Err(e) => Err(StorageError::io(format!("reading {}", path.display()), e)),
    }
}

/// Creates (or truncates) `path`, writes `bytes` and fsyncs the file.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let mut file = File::create(path).map_err(|e| StorageError::io(format!("creating {}", path.display()), e))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| io_error(format!("writing {}", path.display()), e))
}

/// Fsyncs a directory, making the creations, renames and removals of its entries durable.
pub fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StorageError::io(format!("syncing directory {}", dir.display()), e))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// An I/O error; a full disk is reported as [`StorageError::Full`].
pub fn io_error(context: String, source: std::io::Error) -> StorageError {
    if source.kind() == ErrorKind::StorageFull || source.kind() == ErrorKind::QuotaExceeded {
        StorageError::Full(format!("{context}: {source}"))
    } else {
        StorageError::io(context, source)
    }
}

/// Checks an engine's configured `path`: when given, it must not be empty.
pub fn check_path(plugin: &str, path: Option<&Path>) -> Result<(), PluginError> {
    match path {
        Some(path) if path.as_os_str().is_empty() => Err(PluginError::Config {
            plugin: plugin.to_owned(),
            message: "`path` must be a non-empty string".to_owned(),
        }),
        _ => Ok(()),
    }
}

/// The data directory an engine opens: the configured `path` (a relative one is resolved against
/// the node's data directory when it has one), else `<node data dir>/<subdir>`. No path and no
/// node data directory is a configuration error.
pub fn resolve_dir(
    plugin: &str,
    data_dir: Option<&Path>,
    path: Option<&Path>,
    subdir: &str,
) -> Result<PathBuf, PluginError> {
    match (path, data_dir) {
        (Some(path), Some(base)) if path.is_relative() => Ok(base.join(path)),
        (Some(path), _) => Ok(path.to_path_buf()),
        (None, Some(base)) => Ok(base.join(subdir)),
        (None, None) => Err(PluginError::Config {
            plugin: plugin.to_owned(),
            message: "no `path` configured and the node has no data directory".to_owned(),
        }),
    }
}

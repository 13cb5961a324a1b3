//! The node's identity key, persisted in its data directory.
//!
//! The key file `identity.key` holds the libp2p protobuf encoding of an Ed25519 keypair. It is
//! created on first start (written to a temporary file with mode `0600`, synced, then renamed into
//! place) and read on every later start, so the peer id survives restarts. A file that cannot be
//! decoded, holds a non-Ed25519 key, or is readable by group or others is an error: it is never
//! silently replaced, since a new identity would make the node a different peer.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

/// The key file's name inside the data directory.
pub const IDENTITY_FILE: &str = "identity.key";
/// The largest key file accepted, in bytes (an Ed25519 keypair encodes to 68).
const MAX_IDENTITY_FILE_BYTES: u64 = 4096;

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("identity key {path}: {error}")]
    Io {
        /// The key file or data directory.
        path: PathBuf,
        /// The error (in the text above, so not also returned by `source()`).
        error: io::Error,
    },
    /// The key file exists but does not hold a usable key. It is left untouched.
    #[error(
        "identity key {path} is corrupt ({reason}); restore it from a backup, or move it away to start as a new peer"
    )]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file may be read by other users.
    #[error("identity key {path} has mode {mode:o}; it must be readable by its owner only (chmod 600)")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// A fresh Ed25519 identity (for ephemeral nodes and tests).
pub fn generate() -> Keypair {
    Keypair::generate_ed25519()
}

/// The identity stored in `data_dir`, created there (with the directory) on first start.
///
/// Guarantees: the same keypair, hence the same peer id, on every call for the same directory; a
/// new key only when no key file exists; an existing but unusable file is an
/// [`IdentityError::Corrupt`] or [`IdentityError::Permissions`] and is never overwritten.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(IDENTITY_FILE);
    match fs::symlink_metadata(&path) {
        Ok(_) => load(&path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => create(data_dir, &path),
        Err(error) => Err(IdentityError::Io { path, error }),
    }
}

/// Reads the key file at `path`.
pub fn load(path: &Path) -> Result<Keypair, IdentityError> {
    let io_error = |error| IdentityError::Io { path: path.to_owned(), error };
    let metadata = fs::metadata(path).map_err(io_error)?;
    if !metadata.is_file() {
        return Err(IdentityError::Corrupt { path: path.to_owned(), reason: "not a regular file".into() });
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions { path: path.to_owned(), mode });
    }
    if metadata.len() > MAX_IDENTITY_FILE_BYTES {
        return Err(IdentityError::Corrupt {
            path: path.to_owned(),
            reason: format!("{} bytes, larger than any key", metadata.len()),
        });
    }
    let bytes = fs::read(path).map_err(io_error)?;
    let keypair = Keypair::from_protobuf_encoding(&bytes)
        .map_err(|e| IdentityError::Corrupt { path: path.to_owned(), reason: e.to_string() })?;
    if keypair.clone().try_into_ed25519().is_err() {
        return Err(IdentityError::Corrupt {
            path: path.to_owned(),
            reason: format!("a {:?} key; peers must use Ed25519", keypair.key_type()),
        });
    }
    Ok(keypair)
}

fn create(data_dir: &Path, path: &Path) -> Result<Keypair, IdentityError> {
    let dir_error = |error| IdentityError::Io { path: data_dir.to_owned(), error };
    fs::create_dir_all(data_dir).map_err(dir_error)?;
    let keypair = generate();
    let encoded = keypair.to_protobuf_encoding().map_err(|e| IdentityError::Corrupt {
        path: path.to_owned(),
        reason: format!("cannot encode a new key: {e}"),
    })?;
    let tmp = data_dir.join(format!("{IDENTITY_FILE}.tmp"));
    let tmp_error = |error| IdentityError::Io { path: tmp.clone(), error };
    // A leftover temporary file is from an interrupted first start: it was never the identity.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(tmp_error(e)),
    }
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(tmp_error)?;
    file.write_all(&encoded).map_err(tmp_error)?;
    file.sync_all().map_err(tmp_error)?;
    drop(file);
    // Keep a key file a concurrent start may have written first.
    fs::hard_link(&tmp, path).map_err(|error| IdentityError::Io { path: path.to_owned(), error })?;
    fs::remove_file(&tmp).map_err(tmp_error)?;
    fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(dir_error)?;
    Ok(keypair)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn same_identity_after_restart_and_owner_only_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = load_or_create(&data).unwrap();
        let again = load_or_create(&data).unwrap();
        assert_eq!(first.public().to_peer_id(), again.public().to_peer_id());
        let mode = fs::metadata(data.join(IDENTITY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let other = load_or_create(&dir.path().join("other")).unwrap();
        assert_ne!(first.public().to_peer_id(), other.public().to_peer_id());
    }

    #[test]
    fn corrupt_key_file_is_an_error_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(b"garbage")
            .unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"garbage");
    }

    #[test]
    fn readable_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load_or_create(dir.path()), Err(IdentityError::Permissions { mode: 0o644, .. })));
    }
}

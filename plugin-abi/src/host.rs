//! The host side: checking a plugin's entry table and driving its engine as a [`RawStorage`].

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::wire::{
    MetaBytes, OpenReply, OpenRequest, StorageCall, WireBlockCommit, WireCommitted, WireStats, WireStorageError,
    WireValue,
};
use super::{
    ABI_VERSION, CORE_VERSION, FfiBuf, FfiBytes, FfiStr, KIND_STORAGE, PluginEntryTable, RUSTC_VERSION, STATUS_ERR,
    STATUS_OK,
};
use optimystic_core::error::StorageError;
use optimystic_core::model::{BlockId, Transform, TrxId, TrxRev};
use optimystic_core::registry::{PluginError, StorageContext};
use optimystic_core::storage::{BlockCommit, BlockValue, CommittedTransform, RawStorage, StorageStats};

/// The longest plugin name, in bytes.
const MAX_NAME_LEN: usize = 64;

/// What an entry table says about its plugin, as read by the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    /// [`PluginEntryTable::abi_version`].
    pub abi_version: u32,
    /// [`PluginEntryTable::kind`].
    pub kind: u32,
    /// [`PluginEntryTable::core_version`].
    pub core_version: String,
    /// [`PluginEntryTable::rustc_version`].
    pub rustc_version: String,
    /// [`PluginEntryTable::name`].
    pub name: String,
    /// [`PluginEntryTable::description`].
    pub description: String,
}

/// Why a plugin's entry table is refused. Each message says what this node expected and what the
/// plugin has.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AbiError {
    /// The entry point returned a null pointer.
    #[error("the entry point returned a null table")]
    NullTable,
    /// The entry point returned a misaligned pointer.
    #[error("the entry point returned a misaligned table")]
    MisalignedTable,
    /// The table has another layout version.
    #[error(
        "the plugin has ABI version {found}, this node expects ABI version {expected}; \
         rebuild the plugin against this node's optimystic-core"
    )]
    AbiVersion {
        /// [`ABI_VERSION`].
        expected: u32,
        /// The plugin's.
        found: u32,
    },
    /// The plugin was built against another version of this crate.
    #[error(
        "the plugin was built against optimystic-core {found}, this node runs optimystic-core {expected}; \
         rebuild the plugin against the node's version"
    )]
    CoreVersion {
        /// [`CORE_VERSION`].
        expected: String,
        /// The plugin's.
        found: String,
    },
    /// The plugin was built by another compiler.
    #[error(
        "the plugin was built with {found:?}, this node was built with {expected:?}; \
         rebuild the plugin with the node's compiler"
    )]
    RustcVersion {
        /// [`RUSTC_VERSION`].
        expected: String,
        /// The plugin's.
        found: String,
    },
    /// The table is of a kind that cannot be loaded dynamically.
    #[error("the plugin has kind {found}; only storage plugins (kind {KIND_STORAGE}) can be loaded dynamically")]
    UnsupportedKind {
        /// The plugin's kind.
        found: u32,
    },
    /// A string of the table is null or not UTF-8.
    #[error("the entry table's {field} is not a valid UTF-8 string")]
    InvalidText {
        /// The field.
        field: &'static str,
    },
    /// The plugin name is unusable in configuration.
    #[error("the plugin name {found:?} is invalid: expected 1 to {MAX_NAME_LEN} ASCII letters, digits, '-' or '_'")]
    InvalidName {
        /// The plugin's name.
        found: String,
    },
}

/// Checks that a table can be used by this node: same [`ABI_VERSION`], [`CORE_VERSION`] and
/// [`RUSTC_VERSION`], [`KIND_STORAGE`], and a name of 1 to 64 ASCII letters, digits, `-` or `_`.
/// Checks are made in that order and the first failure is returned.
pub fn check_table(info: &TableInfo) -> Result<(), AbiError> {
    if info.abi_version != ABI_VERSION {
        return Err(AbiError::AbiVersion { expected: ABI_VERSION, found: info.abi_version });
    }
    if info.core_version != CORE_VERSION {
        return Err(AbiError::CoreVersion { expected: CORE_VERSION.to_owned(), found: info.core_version.clone() });
    }
    if info.rustc_version != RUSTC_VERSION {
        return Err(AbiError::RustcVersion { expected: RUSTC_VERSION.to_owned(), found: info.rustc_version.clone() });
    }
    if info.kind != KIND_STORAGE {
        return Err(AbiError::UnsupportedKind { found: info.kind });
    }
    let name_ok = !info.name.is_empty()
        && info.name.len() <= MAX_NAME_LEN
        && info.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !name_ok {
        return Err(AbiError::InvalidName { found: info.name.clone() });
    }
    Ok(())
}

/// A checked storage plugin table: opens [`DynamicStorage`] engines. Cheap to copy.
#[derive(Clone, Copy)]
pub struct StorageLibrary {
    table: &'static PluginEntryTable,
    name: &'static str,
    description: &'static str,
}

impl std::fmt::Debug for StorageLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageLibrary").field("name", &self.name).finish_non_exhaustive()
    }
}

impl StorageLibrary {
    /// Reads and checks the table an entry point returned: reads `abi_version` alone first and the
    /// rest only when it is [`ABI_VERSION`], then applies [`check_table`].
    ///
    /// # Safety
    ///
    /// `table` must be null or point to memory, readable for the rest of the process and never
    /// written, that starts with a `u32` ABI version; when that version is [`ABI_VERSION`] it must
    /// be a [`PluginEntryTable`] whose strings and functions stay valid for the rest of the process
    /// and whose functions honour their documented contracts. In practice: the result of a
    /// library's [`ENTRY_SYMBOL`](super::ENTRY_SYMBOL) function, the library never unloaded.
    pub unsafe fn from_table(table: *const PluginEntryTable) -> Result<Self, AbiError> {
        if table.is_null() {
            return Err(AbiError::NullTable);
        }
        if !table.is_aligned() {
            return Err(AbiError::MisalignedTable);
        }
        // SAFETY: non-null and aligned; the first field is a `u32` in every ABI version, readable
        // forever (caller's contract). Only that field is read.
        let abi_version = unsafe { (&raw const (*table).abi_version).read() };
        if abi_version != ABI_VERSION {
            return Err(AbiError::AbiVersion { expected: ABI_VERSION, found: abi_version });
        }
        // SAFETY: the ABI version matches, so this is a `PluginEntryTable` that is never written nor
        // freed (caller's contract).
        let table: &'static PluginEntryTable = unsafe { &*table };
        // SAFETY: (for the four strings read below) the table's strings point to static bytes that
        // live forever (caller's contract); `to_static_str` checks null and UTF-8.
        let text = |s: FfiStr, field| unsafe { s.to_static_str() }.ok_or(AbiError::InvalidText { field });
        let name = text(table.name, "name")?;
        let description = text(table.description, "description")?;
        let info = TableInfo {
            abi_version,
            kind: table.kind,
            core_version: text(table.core_version, "core_version")?.to_owned(),
            rustc_version: text(table.rustc_version, "rustc_version")?.to_owned(),
            name: name.to_owned(),
            description: description.to_owned(),
        };
        check_table(&info)?;
        Ok(Self { table, name, description })
    }

    /// The plugin's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The plugin's description.
    pub fn description(&self) -> &'static str {
        self.description
    }

    /// Opens an engine with the node's context and the plugin's configuration section. Runs the
    /// plugin's `open` on the calling thread (it may block). Fails with
    /// [`PluginError::Config`] when the data directory is not UTF-8 and with
    /// [`PluginError::Storage`] when the plugin fails (a panic included).
    pub fn open(&self, cx: &StorageContext, config: &Value) -> Result<DynamicStorage, PluginError> {
        let data_dir = match &cx.data_dir {
            Some(dir) => Some(
                dir.to_str()
                    .ok_or_else(|| PluginError::Config {
                        plugin: format!("storage {}", self.name),
                        message: format!("the data directory {} is not UTF-8", dir.display()),
                    })?
                    .to_owned(),
            ),
            None => None,
        };
        let request = OpenRequest { local_peer_id: cx.local_peer_id.to_base58(), data_dir, config: config.clone() };
        let request =
            serde_json::to_vec(&request).map_err(|e| self.failure(format!("cannot encode the open request: {e}")))?;
        let mut handle: *mut c_void = std::ptr::null_mut();
        let mut out = FfiBuf::EMPTY;
        // SAFETY: the table's `open` honours OpenFn's contract (checked at `from_table`); the request
        // outlives the call and both out pointers are valid for writes.
        let status = unsafe { (self.table.open)(FfiBytes::from_slice(&request), &mut handle, &mut out) };
        let reply = Reply { library: *self, buf: out };
        // Owns the handle from here on: released on every error path below.
        let instance = NonNull::new(handle).map(|handle| Instance { library: *self, handle });
        let OpenReply { durable } = self.decode(status, &reply)?;
        let instance = instance.ok_or_else(|| self.failure("open succeeded without returning a handle".into()))?;
        Ok(DynamicStorage { instance: Arc::new(instance), durable })
    }

    /// Decodes a reply: the result on [`STATUS_OK`], the plugin's error on [`STATUS_ERR`].
    fn decode<T: DeserializeOwned>(&self, status: i32, reply: &Reply) -> Result<T, StorageError> {
        let bytes = reply.bytes().ok_or_else(|| self.failure("the plugin returned an invalid reply buffer".into()))?;
        match status {
            STATUS_OK => serde_json::from_slice(bytes)
                .map_err(|e| self.failure(format!("the plugin returned a malformed reply: {e}"))),
            STATUS_ERR if bytes.is_empty() => Err(self.failure("the plugin failed without an error message".into())),
            STATUS_ERR => match serde_json::from_slice::<WireStorageError>(bytes) {
                Ok(e) => Err(e.into_storage_error(self.name)),
                Err(e) => Err(self.failure(format!("the plugin returned a malformed error: {e}"))),
            },
            other => Err(self.failure(format!("the plugin returned the unknown status {other}"))),
        }
    }

    fn failure(&self, message: String) -> StorageError {
        StorageError::Failed { engine: self.name, message }
    }
}

/// A reply buffer, given back to the plugin when dropped.
struct Reply {
    library: StorageLibrary,
    buf: FfiBuf,
}

impl Reply {
    /// The reply's bytes; `None` when the buffer is inconsistent.
    fn bytes(&self) -> Option<&[u8]> {
        // SAFETY: the buffer was written by the plugin's `open` or `call`, which hand over `len`
        // readable bytes that stay untouched until `free_buf`, called only in `drop`.
        unsafe { self.buf.as_slice() }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        let buf = std::mem::replace(&mut self.buf, FfiBuf::EMPTY);
        if !buf.ptr.is_null() {
            // SAFETY: the buffer came from this plugin's `open` or `call` and is given back once.
            unsafe { (self.library.table.free_buf)(buf) };
        }
    }
}

/// An open engine handle, released when the last user drops it.
struct Instance {
    library: StorageLibrary,
    handle: NonNull<c_void>,
}

// SAFETY: the plugin contract makes a handle usable from any thread (engines are `Send + Sync`);
// the table is immutable static data.
unsafe impl Send for Instance {}
// SAFETY: as for `Send`: `call` may run concurrently on one handle.
unsafe impl Sync for Instance {}

impl Instance {
    /// Runs one call on the calling thread (it may block).
    fn call<T: DeserializeOwned>(&self, request: &[u8]) -> Result<T, StorageError> {
        let mut out = FfiBuf::EMPTY;
        // SAFETY: the handle came from this plugin's `open` and is released only when this instance
        // drops, which cannot happen during `&self`; the request outlives the call and `out` is
        // valid for writes.
        let status =
            unsafe { (self.library.table.call)(self.handle.as_ptr(), FfiBytes::from_slice(request), &mut out) };
        let reply = Reply { library: self.library, buf: out };
        self.library.decode(status, &reply)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: the handle came from this plugin's `open`; this is its only release, and no call
        // runs on it because every call holds the instance (an `Arc`) while it runs.
        unsafe { (self.library.table.release)(self.handle.as_ptr()) };
    }
}

/// A [`RawStorage`] engine living in a dynamic plugin library.
///
/// Each method encodes a [`StorageCall`], runs the plugin's `call` on tokio's blocking thread pool
/// when a tokio runtime is current (on the calling thread otherwise) and decodes the reply. If the
/// future is dropped, the call still finishes in the background. The handle is released (the
/// plugin drops its engine) on the thread that drops the last of the storage and the calls still
/// running.
pub struct DynamicStorage {
    instance: Arc<Instance>,
    durable: bool,
}

impl std::fmt::Debug for DynamicStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamicStorage")
            .field("plugin", &self.instance.library.name)
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

impl DynamicStorage {
    async fn invoke<T: DeserializeOwned + Send + 'static>(&self, call: StorageCall) -> Result<T, StorageError> {
        let library = self.instance.library;
        let request = serde_json::to_vec(&call)
            .map_err(|e| library.failure(format!("cannot encode the {} request: {e}", call.op())))?;
        let instance = Arc::clone(&self.instance);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime
                .spawn_blocking(move || instance.call(&request))
                .await
                .map_err(|e| library.failure(format!("the {} call did not finish: {e}", call.op())))?,
            Err(_) => instance.call(&request),
        }
    }
}

#[async_trait]
impl RawStorage for DynamicStorage {
    async fn latest(&self, block_id: &BlockId) -> Result<Option<TrxRev>, StorageError> {
        self.invoke(StorageCall::Latest { block_id: block_id.clone() }).await
    }

    async fn revisions(&self, block_id: &BlockId, from_rev: u64, to_rev: u64) -> Result<Vec<TrxRev>, StorageError> {
        self.invoke(StorageCall::Revisions { block_id: block_id.clone(), from_rev, to_rev }).await
    }

    async fn revision_at_or_before(&self, block_id: &BlockId, at_rev: u64) -> Result<Option<TrxRev>, StorageError> {
        self.invoke(StorageCall::RevisionAtOrBefore { block_id: block_id.clone(), at_rev }).await
    }

    async fn committed(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<CommittedTransform>, StorageError> {
        let reply: Option<WireCommitted> =
            self.invoke(StorageCall::Committed { block_id: block_id.clone(), trx_id: trx_id.clone() }).await?;
        Ok(reply.map(CommittedTransform::from))
    }

    async fn pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<Transform>, StorageError> {
        self.invoke(StorageCall::Pending { block_id: block_id.clone(), trx_id: trx_id.clone() }).await
    }

    async fn pending_trx_ids(&self, block_id: &BlockId) -> Result<Vec<TrxId>, StorageError> {
        self.invoke(StorageCall::PendingTrxIds { block_id: block_id.clone() }).await
    }

    async fn save_pending(
        &self,
        block_id: &BlockId,
        trx_id: &TrxId,
        transform: &Transform,
    ) -> Result<(), StorageError> {
        self.invoke(StorageCall::SavePending {
            block_id: block_id.clone(),
            trx_id: trx_id.clone(),
            transform: Box::new(transform.clone()),
        })
        .await
    }

    async fn delete_pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<(), StorageError> {
        self.invoke(StorageCall::DeletePending { block_id: block_id.clone(), trx_id: trx_id.clone() }).await
    }

    async fn materialized(&self, block_id: &BlockId, rev: u64) -> Result<Option<BlockValue>, StorageError> {
        let reply: Option<WireValue> =
            self.invoke(StorageCall::Materialized { block_id: block_id.clone(), rev }).await?;
        Ok(reply.map(|kept| kept.value))
    }

    async fn commit_block(&self, block_id: &BlockId, commit: &BlockCommit) -> Result<(), StorageError> {
        self.invoke(StorageCall::CommitBlock {
            block_id: block_id.clone(),
            commit: Box::new(WireBlockCommit::from(commit)),
        })
        .await
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let reply: Option<MetaBytes> = self.invoke(StorageCall::GetMeta { key: key.to_owned() }).await?;
        Ok(reply.map(|bytes| bytes.0))
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.invoke(StorageCall::PutMeta { key: key.to_owned(), value: MetaBytes(value.to_vec()) }).await
    }

    async fn delete_meta(&self, key: &str) -> Result<(), StorageError> {
        self.invoke(StorageCall::DeleteMeta { key: key.to_owned() }).await
    }

    async fn list_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let reply: Vec<(String, MetaBytes)> =
            self.invoke(StorageCall::ListMeta { prefix: prefix.to_owned(), limit }).await?;
        Ok(reply.into_iter().map(|(key, value)| (key, value.0)).collect())
    }

    fn durable(&self) -> bool {
        self.durable
    }

    async fn block_ids(&self, after: Option<&BlockId>, limit: usize) -> Result<Vec<BlockId>, StorageError> {
        self.invoke(StorageCall::BlockIds { after: after.cloned(), limit }).await
    }

    async fn stats(&self) -> Result<Option<StorageStats>, StorageError> {
        let reply: Option<WireStats> = self.invoke(StorageCall::Stats).await?;
        Ok(reply.map(StorageStats::from))
    }

    async fn close(&self) -> Result<(), StorageError> {
        self.invoke(StorageCall::Close).await
    }
}

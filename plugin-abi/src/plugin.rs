//! The plugin side: the entry points [`storage_table`] builds for an engine.

use std::any::Any;
use std::cell::Cell;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;

use futures::executor::block_on;
use serde::Serialize;
use serde_json::Value;

use super::wire::{
    MetaBytes, OpenReply, OpenRequest, StorageCall, WireCommitted, WireStats, WireStorageError, WireValue,
};
use super::{
    ABI_VERSION, CORE_VERSION, FfiBuf, FfiBytes, FfiStr, KIND_STORAGE, PluginEntryTable, RUSTC_VERSION, STATUS_ERR,
    STATUS_OK,
};
use optimystic_core::error::StorageError;
use optimystic_core::storage::RawStorage;

/// What the node tells a dynamic storage plugin when it opens it (the
/// [`StorageContext`](optimystic_core::registry::StorageContext), as it crosses the library
/// boundary).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamicContext {
    /// The node's peer id (base58).
    pub local_peer_id: String,
    /// The node's data directory; `None` for ephemeral nodes.
    pub data_dir: Option<PathBuf>,
}

/// Opens a dynamic plugin's engine from the node's context and the plugin's configuration
/// section. It runs without a tokio runtime; an error (or a panic) fails the node's start with the
/// plugin's message.
pub type OpenStorageFn = fn(&DynamicContext, &Value) -> Result<Arc<dyn RawStorage>, StorageError>;

/// A storage engine exported by a plugin library; [`export_storage_plugin!`](crate::export_storage_plugin)
/// implements it.
pub trait StoragePlugin: 'static {
    /// The name configuration uses: 1 to 64 ASCII letters, digits, `-` or `_`.
    const NAME: &'static str;
    /// One line for `optimystic plugins`.
    const DESCRIPTION: &'static str;
    /// Opens the engine.
    const OPEN: OpenStorageFn;
}

/// The entry table of plugin `P`, to be stored in a `static` that the library's
/// [`ENTRY_SYMBOL`](super::ENTRY_SYMBOL) function returns.
pub const fn storage_table<P: StoragePlugin>() -> PluginEntryTable {
    PluginEntryTable {
        abi_version: ABI_VERSION,
        kind: KIND_STORAGE,
        core_version: FfiStr::from_static(CORE_VERSION),
        rustc_version: FfiStr::from_static(RUSTC_VERSION),
        name: FfiStr::from_static(P::NAME),
        description: FfiStr::from_static(P::DESCRIPTION),
        open: open::<P>,
        call: call::<P>,
        free_buf,
        release,
    }
}

/// The engine behind a handle: `Box::into_raw(Box::new(engine))`.
type Engine = Arc<dyn RawStorage>;

/// `open` of plugin `P`.
///
/// # Safety
///
/// [`OpenFn`](super::OpenFn)'s contract.
unsafe extern "C" fn open<P: StoragePlugin>(
    request: FfiBytes,
    out_handle: *mut *mut c_void,
    out_reply: *mut FfiBuf,
) -> i32 {
    let body = || {
        if out_handle.is_null() {
            return Err(invalid_argument::<P>("open", "a null handle pointer"));
        }
        // SAFETY: the host keeps the request readable and unchanged during the call (OpenFn contract).
        let request = unsafe { request.as_slice() };
        let request: OpenRequest = serde_json::from_slice(request).map_err(|e| undecodable::<P>("open", &e))?;
        let cx = DynamicContext { local_peer_id: request.local_peer_id, data_dir: request.data_dir.map(PathBuf::from) };
        let engine = (P::OPEN)(&cx, &request.config)?;
        let reply = encode::<P>(&OpenReply { durable: engine.durable() })?;
        let handle: *mut Engine = Box::into_raw(Box::new(engine));
        // SAFETY: `out_handle` is non-null (checked above) and valid for writes (OpenFn contract).
        unsafe { out_handle.write(handle.cast()) };
        Ok(reply)
    };
    // SAFETY: `out_reply` is null or valid for writes (OpenFn contract).
    unsafe { entry::<P>(&Cell::new("open"), out_reply, body) }
}

/// `call` of plugin `P`.
///
/// # Safety
///
/// [`CallFn`](super::CallFn)'s contract.
unsafe extern "C" fn call<P: StoragePlugin>(handle: *mut c_void, request: FfiBytes, out_reply: *mut FfiBuf) -> i32 {
    let what = Cell::new("call");
    let body = || {
        if handle.is_null() {
            return Err(invalid_argument::<P>("call", "a null handle"));
        }
        // SAFETY: a non-null handle comes from `open` above (a boxed `Engine`) and is not released
        // while a call runs (CallFn contract); the engine is `Sync`, so sharing it is fine.
        let engine: &Engine = unsafe { &*handle.cast::<Engine>() };
        // SAFETY: the host keeps the request readable and unchanged during the call (CallFn contract).
        let request = unsafe { request.as_slice() };
        let call: StorageCall = serde_json::from_slice(request).map_err(|e| undecodable::<P>("call", &e))?;
        what.set(call.op());
        dispatch::<P>(engine.as_ref(), call)
    };
    // SAFETY: `out_reply` is null or valid for writes (CallFn contract).
    unsafe { entry::<P>(&what, out_reply, body) }
}

/// `free_buf`: takes back a reply buffer.
///
/// # Safety
///
/// [`FreeBufFn`](super::FreeBufFn)'s contract.
unsafe extern "C" fn free_buf(buf: FfiBuf) {
    // Dropping a `Vec<u8>` does not panic; the guard only keeps the no-unwind promise.
    // SAFETY: the host gives back, exactly once, a buffer that `entry` made with `FfiBuf::from_vec`
    // in this library (FreeBufFn contract).
    let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { buf.into_vec() })));
}

/// `release`: destroys a handle.
///
/// # Safety
///
/// [`ReleaseFn`](super::ReleaseFn)'s contract.
unsafe extern "C" fn release(handle: *mut c_void) {
    if handle.is_null() {
        return;
    }
    // A panic in the engine's `Drop` is caught so that it does not unwind into the host; the handle
    // is gone either way and the host has nobody to tell.
    // SAFETY: the handle comes from `Box::into_raw` in `open`, is released exactly once and no call
    // runs on it any more (ReleaseFn contract).
    let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(handle.cast::<Engine>()) })));
}

/// Runs an entry point's body with every panic caught and writes its reply; `what` names the
/// operation running (for the panic message).
///
/// # Safety
///
/// `out_reply` is null or valid for writes.
unsafe fn entry<P: StoragePlugin>(
    what: &Cell<&'static str>,
    out_reply: *mut FfiBuf,
    body: impl FnOnce() -> Result<Vec<u8>, StorageError>,
) -> i32 {
    let run = || {
        let (status, reply) = match catch_unwind(AssertUnwindSafe(body)) {
            Ok(Ok(reply)) => (STATUS_OK, reply),
            Ok(Err(e)) => (STATUS_ERR, encode_error(&e)),
            Err(panic) => (STATUS_ERR, encode_error(&panicked::<P>(what.get(), panic.as_ref()))),
        };
        if !out_reply.is_null() {
            // SAFETY: non-null and valid for writes (caller's contract).
            unsafe { out_reply.write(FfiBuf::from_vec(reply)) };
        }
        status
    };
    // Only a panic while encoding an error could get here: report the failure without a reply.
    catch_unwind(AssertUnwindSafe(run)).unwrap_or(STATUS_ERR)
}

/// Runs one call on the engine, to completion on this thread, and encodes its result.
fn dispatch<P: StoragePlugin>(engine: &dyn RawStorage, call: StorageCall) -> Result<Vec<u8>, StorageError> {
    match call {
        StorageCall::Latest { block_id } => encode::<P>(&block_on(engine.latest(&block_id))?),
        StorageCall::Revisions { block_id, from_rev, to_rev } => {
            encode::<P>(&block_on(engine.revisions(&block_id, from_rev, to_rev))?)
        }
        StorageCall::RevisionAtOrBefore { block_id, at_rev } => {
            encode::<P>(&block_on(engine.revision_at_or_before(&block_id, at_rev))?)
        }
        StorageCall::Committed { block_id, trx_id } => {
            encode::<P>(&block_on(engine.committed(&block_id, &trx_id))?.map(WireCommitted::from))
        }
        StorageCall::Pending { block_id, trx_id } => encode::<P>(&block_on(engine.pending(&block_id, &trx_id))?),
        StorageCall::PendingTrxIds { block_id } => encode::<P>(&block_on(engine.pending_trx_ids(&block_id))?),
        StorageCall::SavePending { block_id, trx_id, transform } => {
            encode::<P>(&block_on(engine.save_pending(&block_id, &trx_id, &transform))?)
        }
        StorageCall::DeletePending { block_id, trx_id } => {
            encode::<P>(&block_on(engine.delete_pending(&block_id, &trx_id))?)
        }
        StorageCall::Materialized { block_id, rev } => {
            encode::<P>(&block_on(engine.materialized(&block_id, rev))?.map(|value| WireValue { value }))
        }
        StorageCall::CommitBlock { block_id, commit } => {
            encode::<P>(&block_on(engine.commit_block(&block_id, &(*commit).into()))?)
        }
        StorageCall::GetMeta { key } => encode::<P>(&block_on(engine.get_meta(&key))?.map(MetaBytes)),
        StorageCall::PutMeta { key, value } => encode::<P>(&block_on(engine.put_meta(&key, &value.0))?),
        StorageCall::DeleteMeta { key } => encode::<P>(&block_on(engine.delete_meta(&key))?),
        StorageCall::ListMeta { prefix, limit } => {
            let entries = block_on(engine.list_meta(&prefix, limit))?;
            encode::<P>(&entries.into_iter().map(|(key, value)| (key, MetaBytes(value))).collect::<Vec<_>>())
        }
        StorageCall::BlockIds { after, limit } => encode::<P>(&block_on(engine.block_ids(after.as_ref(), limit))?),
        StorageCall::Stats => encode::<P>(&block_on(engine.stats())?.map(WireStats::from)),
        StorageCall::Close => encode::<P>(&block_on(engine.close())?),
    }
}

/// A successful reply.
fn encode<P: StoragePlugin>(value: &impl Serialize) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(value).map_err(|e| StorageError::backend(P::NAME, "encoding the reply", e))
}

/// An error reply; empty if even that cannot be encoded (the host then reports a failure without
/// a message).
fn encode_error(e: &StorageError) -> Vec<u8> {
    serde_json::to_vec(&WireStorageError::from(e)).unwrap_or_default()
}

fn invalid_argument<P: StoragePlugin>(what: &str, argument: &str) -> StorageError {
    StorageError::Failed { engine: P::NAME, message: format!("{what} was called with {argument}") }
}

fn undecodable<P: StoragePlugin>(what: &str, e: &serde_json::Error) -> StorageError {
    StorageError::Invalid(format!("plugin {} cannot decode the {what} request: {e}", P::NAME))
}

fn panicked<P: StoragePlugin>(what: &str, panic: &(dyn Any + Send)) -> StorageError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic payload".to_owned());
    StorageError::Failed { engine: P::NAME, message: format!("the plugin panicked during {what}: {message}") }
}

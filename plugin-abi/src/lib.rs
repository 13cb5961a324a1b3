//! Dynamic plugins: storage engines in shared libraries, behind a small C ABI.
//!
//! Rust trait objects have no stable ABI, and a shared library built from Rust carries its own
//! copy of `std`, `tokio` and this crate (their statics included). So nothing Rust-specific
//! crosses the library boundary: the library exports one C function, [`ENTRY_SYMBOL`]
//! (`optimystic_plugin_entry_v1`, of type [`EntryFn`]), that returns a pointer to a static
//! `#[repr(C)]` [`PluginEntryTable`]. Only C types cross: integers, `(pointer, length)` byte
//! strings and opaque handles. Requests and replies are JSON documents ([`StorageCall`] and
//! friends).
//!
//! Only storage plugins ([`KIND_STORAGE`], a [`RawStorage`](optimystic_core::storage::RawStorage) engine)
//! can be loaded dynamically for now; a table of any other kind is refused.
//!
//! # Writing a plugin
//!
//! A `cdylib` crate builds its engine and exports it with
//! [`export_storage_plugin!`](crate::export_storage_plugin). Each call from the node runs the engine's future to
//! completion with `futures::executor::block_on` on a node thread that belongs to no async
//! runtime: **a dynamic storage plugin must not need a tokio runtime** (no `tokio::spawn`,
//! `spawn_blocking` or tokio I/O inside the engine; plain blocking I/O is fine, the node calls
//! plugins from its blocking thread pool). The plugin must be built with `panic = "unwind"` (the
//! default): every entry point catches panics and turns them into an error reply.
//! A library exports at most one plugin.
//!
//! # Version checks
//!
//! The host reads [`PluginEntryTable::abi_version`] first and reads nothing else of a table whose
//! version differs from [`ABI_VERSION`]. It then requires the exact [`CORE_VERSION`] and
//! [`RUSTC_VERSION`] it was built with (see [`check_table`]): anything else is refused with an
//! [`AbiError`] saying what was expected and what was found, never undefined behaviour.
//!
//! # The protocol
//!
//! - `open(request, &mut handle, &mut reply)`: `request` is an [`OpenRequest`]. On success the
//!   plugin stores an opaque handle and an [`OpenReply`] and returns [`STATUS_OK`].
//! - `call(handle, request, &mut reply)`: `request` is a [`StorageCall`]; on [`STATUS_OK`] the reply
//!   is the method's result as JSON (the type each variant documents).
//! - On failure both return [`STATUS_ERR`] with a [`WireStorageError`] as the reply (or an empty
//!   reply when even that could not be written).
//! - Every reply buffer is owned by the plugin and given back with `free_buf`, exactly once.
//! - `release(handle)` destroys a handle once no call on it is running; the handle must not be
//!   used afterwards. It is distinct from [`StorageCall::Close`], which closes the store.
//! - The handle is used concurrently from many threads: plugin engines are `Send + Sync`.
//!
//! The host never unloads a library: the table, its strings and its functions stay valid for
//! the rest of the process.
#![allow(unsafe_code)]

mod host;
mod plugin;
mod wire;

use std::ffi::c_void;

pub use host::{AbiError, DynamicStorage, StorageLibrary, TableInfo, check_table};
pub use plugin::{DynamicContext, OpenStorageFn, StoragePlugin, storage_table};
pub use wire::{
    MetaBytes, OpenReply, OpenRequest, StorageCall, WireBlockCommit, WireCommitted, WireStats, WireStorageError,
    WireValue,
};

/// Version of [`PluginEntryTable`] and of the protocol; bumped on any incompatible change (the
/// entry symbol's `_v1` suffix follows it).
pub const ABI_VERSION: u32 = 1;

/// The symbol every plugin library exports, an [`EntryFn`].
pub const ENTRY_SYMBOL: &str = "optimystic_plugin_entry_v1";

/// The version of `optimystic-core` this crate is built with; a plugin must be built against exactly
/// the host's version.
pub const CORE_VERSION: &str = optimystic_core::VERSION;

/// `rustc --version` of the compiler that built this crate (captured by the build script); a
/// plugin must be built by exactly the host's compiler.
pub const RUSTC_VERSION: &str = env!("OPTIMYSTIC_RUSTC_VERSION");

/// [`PluginEntryTable::kind`] of a storage plugin, the only kind supported so far.
pub const KIND_STORAGE: u32 = 0;

/// An entry point succeeded; its reply holds the result.
pub const STATUS_OK: i32 = 0;
/// An entry point failed; its reply holds a [`WireStorageError`] (or is empty).
pub const STATUS_ERR: i32 = 1;

/// `optimystic_plugin_entry_v1`: returns the library's static table (never null for a valid
/// plugin). Calling it has no side effect.
pub type EntryFn = unsafe extern "C" fn() -> *const PluginEntryTable;

/// Opens an engine. `request` is an [`OpenRequest`], readable for the duration of the call;
/// `out_handle` and `out_reply` are valid for writes. Returns [`STATUS_OK`] after writing a
/// non-null handle and an [`OpenReply`], or [`STATUS_ERR`] after writing an error reply (and no
/// handle).
pub type OpenFn = unsafe extern "C" fn(request: FfiBytes, out_handle: *mut *mut c_void, out_reply: *mut FfiBuf) -> i32;

/// Runs one [`StorageCall`] on a handle returned by `open` and not yet released; `request` is
/// readable for the duration of the call and `out_reply` is valid for writes. May run
/// concurrently on one handle from many threads.
pub type CallFn = unsafe extern "C" fn(handle: *mut c_void, request: FfiBytes, out_reply: *mut FfiBuf) -> i32;

/// Frees a reply buffer the plugin wrote, exactly once. An empty buffer (null pointer) is
/// accepted and ignored.
pub type FreeBufFn = unsafe extern "C" fn(buf: FfiBuf);

/// Destroys a handle returned by `open`, exactly once, when no call on it is running.
pub type ReleaseFn = unsafe extern "C" fn(handle: *mut c_void);

/// A UTF-8 string in the library's static memory, valid for the rest of the process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfiStr {
    /// The first byte; never null (a dangling, aligned pointer for an empty string).
    pub ptr: *const u8,
    /// The length in bytes.
    pub len: usize,
}

// SAFETY: an `FfiStr` is a pointer to immutable static bytes; sharing or sending the pointer is
// harmless, and every way to read through it is an `unsafe fn` with its own contract.
unsafe impl Send for FfiStr {}
// SAFETY: as for `Send`: the bytes are never written.
unsafe impl Sync for FfiStr {}

impl FfiStr {
    /// Points at a static string.
    pub const fn from_static(s: &'static str) -> Self {
        Self { ptr: s.as_ptr(), len: s.len() }
    }

    /// The string, or `None` when the pointer is null or misaligned or the bytes are not UTF-8.
    ///
    /// # Safety
    ///
    /// Unless null, `ptr` must point to `len` readable bytes that stay valid and unchanged for the
    /// rest of the process.
    unsafe fn to_static_str(self) -> Option<&'static str> {
        if self.ptr.is_null() || self.len > isize::MAX as usize {
            return None;
        }
        // SAFETY: non-null, `u8` has no alignment requirement, `len` fits in `isize`, and the caller
        // guarantees `len` readable bytes that live forever and are never written.
        let bytes: &'static [u8] = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        std::str::from_utf8(bytes).ok()
    }
}

/// Bytes borrowed from the caller for the duration of one call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfiBytes {
    /// The first byte; never null (a dangling, aligned pointer when empty).
    pub ptr: *const u8,
    /// The length in bytes.
    pub len: usize,
}

impl FfiBytes {
    /// Borrows a slice; the result is valid while the slice is.
    fn from_slice(bytes: &[u8]) -> Self {
        Self { ptr: bytes.as_ptr(), len: bytes.len() }
    }

    /// The bytes; a null pointer reads as empty.
    ///
    /// # Safety
    ///
    /// Unless null, `ptr` must point to `len` bytes readable and unchanged for `'a`.
    unsafe fn as_slice<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.len == 0 {
            return &[];
        }
        // SAFETY: non-null, byte-aligned, readable for `len` bytes during `'a` (caller's contract).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// A buffer the plugin allocated and the host gives back with `free_buf`. An empty buffer has a
/// null pointer.
#[repr(C)]
#[derive(Debug)]
pub struct FfiBuf {
    /// The first byte, or null for an empty buffer.
    pub ptr: *mut u8,
    /// The number of bytes written.
    pub len: usize,
    /// The allocation's capacity (only meaningful to the plugin that allocated it).
    pub capacity: usize,
}

impl FfiBuf {
    /// A buffer that owns nothing.
    pub const EMPTY: Self = Self { ptr: std::ptr::null_mut(), len: 0, capacity: 0 };

    /// Gives up a vector's allocation (an empty vector gives [`FfiBuf::EMPTY`]); `into_vec` takes it
    /// back.
    fn from_vec(bytes: Vec<u8>) -> Self {
        if bytes.capacity() == 0 {
            return Self::EMPTY;
        }
        let mut bytes = std::mem::ManuallyDrop::new(bytes);
        Self { ptr: bytes.as_mut_ptr(), len: bytes.len(), capacity: bytes.capacity() }
    }

    /// Takes back the allocation of [`FfiBuf::from_vec`].
    ///
    /// # Safety
    ///
    /// `self` must come from `from_vec` in this same library copy, and not have been taken back.
    unsafe fn into_vec(self) -> Vec<u8> {
        if self.ptr.is_null() {
            return Vec::new();
        }
        // SAFETY: pointer, length and capacity come unchanged from a `Vec<u8>` allocated by this
        // library's allocator and not freed since (caller's contract).
        unsafe { Vec::from_raw_parts(self.ptr, self.len, self.capacity) }
    }

    /// The bytes written; `None` when the pointer is null but the length is not zero.
    ///
    /// # Safety
    ///
    /// Unless null, `ptr` must point to `len` bytes readable and unchanged while `self` is
    /// borrowed.
    unsafe fn as_slice(&self) -> Option<&[u8]> {
        if self.ptr.is_null() {
            return (self.len == 0).then_some(&[]);
        }
        if self.len > isize::MAX as usize {
            return None;
        }
        // SAFETY: non-null, byte-aligned, `len` readable bytes that the plugin does not touch until
        // `free_buf` (caller's contract), which needs `self` by value.
        Some(unsafe { std::slice::from_raw_parts(self.ptr, self.len) })
    }
}

/// The table a plugin library exports through [`ENTRY_SYMBOL`]. Layout (C, in order): `u32
/// abi_version`, `u32 kind`, four [`FfiStr`] (`core_version`, `rustc_version`, `name`,
/// `description`), then the function pointers `open`, `call`, `free_buf`, `release`.
///
/// `abi_version` stays the first field in every version, so a host can always read it.
#[repr(C)]
#[derive(Debug)]
pub struct PluginEntryTable {
    /// [`ABI_VERSION`] of the crate that built the table.
    pub abi_version: u32,
    /// [`KIND_STORAGE`]; no other kind is supported yet.
    pub kind: u32,
    /// [`CORE_VERSION`] of the core the plugin was built against.
    pub core_version: FfiStr,
    /// [`RUSTC_VERSION`] of the compiler that built the plugin.
    pub rustc_version: FfiStr,
    /// The plugin name configuration uses (`[storage] kind = "<name>"`).
    pub name: FfiStr,
    /// One line for `optimystic plugins`.
    pub description: FfiStr,
    /// See [`OpenFn`].
    pub open: OpenFn,
    /// See [`CallFn`].
    pub call: CallFn,
    /// See [`FreeBufFn`].
    pub free_buf: FreeBufFn,
    /// See [`ReleaseFn`].
    pub release: ReleaseFn,
}

/// Exports a storage engine from a `cdylib` crate as a dynamic plugin.
///
/// ```text
/// fn open(
///     cx: &optimystic_plugin_abi::DynamicContext,
///     config: &serde_json::Value,
/// ) -> Result<std::sync::Arc<dyn optimystic_core::RawStorage>, optimystic_core::StorageError> {
///     Ok(std::sync::Arc::new(MyEngine::open(cx.data_dir.as_deref(), config)?))
/// }
///
/// optimystic_plugin_abi::export_storage_plugin! {
///     name: "my-engine",
///     description: "my storage engine",
///     open: open,
/// }
/// ```
///
/// `open` is an [`OpenStorageFn`]: it receives the node's [`DynamicContext`] and the plugin's
/// configuration section. The macro defines the `#[unsafe(no_mangle)]` entry point
/// [`ENTRY_SYMBOL`] and its static [`PluginEntryTable`]; use it once per library. The engine
/// runs without a tokio runtime (see the [module documentation](crate)).
#[macro_export]
macro_rules! export_storage_plugin {
    (name: $name:expr, description: $description:expr, open: $open:expr $(,)?) => {
        const _: () = {
            struct ExportedStoragePlugin;

            impl $crate::StoragePlugin for ExportedStoragePlugin {
                const NAME: &'static str = $name;
                const DESCRIPTION: &'static str = $description;
                const OPEN: $crate::OpenStorageFn = $open;
            }

            static TABLE: $crate::PluginEntryTable = $crate::storage_table::<ExportedStoragePlugin>();

            /// The dynamic plugin entry point: returns this library's static entry table.
            #[allow(unsafe_code)]
            #[unsafe(no_mangle)]
            pub extern "C" fn optimystic_plugin_entry_v1() -> *const $crate::PluginEntryTable {
                &TABLE
            }
        };
    };
}

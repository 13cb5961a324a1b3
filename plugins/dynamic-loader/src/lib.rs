//! Loads dynamic plugin libraries (`[plugins] load = ["path/to/libx.so"]`) into a [`Registry`].
//!
//! A plugin library exports the C entry point [`ENTRY_SYMBOL`] defined by
//! [`optimystic_plugin_abi`] (plugin authors use `optimystic_plugin_abi::export_storage_plugin!`).
//! Loading checks, in order, that the file exists, that it is a loadable library, that it exports
//! the entry point, and that its entry table has this node's ABI version, optimystic-core version
//! and rustc version, the storage kind and a usable name; each failure is a
//! [`PluginError::Dynamic`] naming the library and what was expected. Only storage plugins can be
//! loaded for now.
//!
//! Loading a library runs its initialisers, and its code then runs inside the node with the
//! node's privileges: load only libraries you trust. A library, once opened, is never unloaded
//! (not even when its checks fail), so nothing it handed out can dangle.

use std::path::Path;
use std::sync::Arc;

use libloading::Library;
use optimystic_core::registry::{Builder, PluginEntry, PluginError, Registry};
use optimystic_core::storage::RawStorage;
use optimystic_plugin_abi::{ENTRY_SYMBOL, EntryFn, StorageLibrary};

/// Loads one plugin library and describes the plugin it exports, with `origin` set to `path`.
///
/// Errors, each a [`PluginError::Dynamic`] naming `path`: the file does not exist or cannot be
/// read, it is not a loadable library, it does not export [`ENTRY_SYMBOL`], or its entry table is
/// refused by [`optimystic_plugin_abi::check_table`] (ABI, core or rustc version mismatch,
/// unsupported kind, invalid name). The library stays loaded for the rest of the process, even on
/// error.
pub fn load_plugin(path: &Path) -> Result<PluginEntry, PluginError> {
    let fail = |message: String| PluginError::Dynamic { path: path.display().to_string(), message };
    let resolved = std::fs::canonicalize(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => fail("the file does not exist".into()),
        _ => fail(format!("cannot resolve the path: {e}")),
    })?;
    if !resolved.is_file() {
        return Err(fail(format!("{} is not a file", resolved.display())));
    }
    let library = load_library(&resolved).map_err(|e| fail(format!("not a loadable library: {e}")))?;
    let library = entry_table(library).map_err(fail)?;
    let origin = path.display().to_string();
    Ok(PluginEntry {
        name: library.name().to_owned(),
        description: library.description().to_owned(),
        origin,
        builder: Builder::Storage(Arc::new(move |cx, config| {
            let storage: Arc<dyn RawStorage> = Arc::new(library.open(cx, config)?);
            Ok(storage)
        })),
        defaults: Default::default(),
        check: None,
    })
}

/// Loads every library of `paths`, in order, and adds its plugin to `registry`. Stops at the
/// first failure (libraries loaded before it stay registered): any error of [`load_plugin`], or a
/// [`PluginError::Dynamic`] naming the library when a plugin of the same kind and name is already
/// registered.
pub fn load_all<I>(paths: I, registry: &mut Registry) -> Result<(), PluginError>
where
    I: IntoIterator,
    I::Item: AsRef<Path>,
{
    for path in paths {
        let path = path.as_ref();
        let entry = load_plugin(path)?;
        if let Some(existing) = registry.entries().iter().find(|e| e.kind() == entry.kind() && e.name == entry.name) {
            return Err(PluginError::Dynamic {
                path: path.display().to_string(),
                message: format!(
                    "its {} plugin {:?} is already registered (from {}); plugin names must be unique",
                    entry.kind(),
                    entry.name,
                    existing.origin
                ),
            });
        }
        registry.add(entry)?;
    }
    Ok(())
}

/// Opens a library and leaks it: it is never unloaded.
#[allow(unsafe_code)]
fn load_library(path: &Path) -> Result<&'static Library, libloading::Error> {
    // SAFETY: opening a library runs its initialisers; loading a plugin means trusting its code
    // (documented on the crate). The path is absolute, so no search path is involved.
    let library = unsafe { Library::new(path) }?;
    Ok(Box::leak(Box::new(library)))
}

/// Finds and checks the entry table of a loaded library.
#[allow(unsafe_code)]
fn entry_table(library: &'static Library) -> Result<StorageLibrary, String> {
    // SAFETY: a plugin's `ENTRY_SYMBOL` is an `EntryFn` (the ABI contract); a library exporting
    // that name with another type breaks the contract it claims by exporting it.
    let entry = unsafe { library.get::<EntryFn>(ENTRY_SYMBOL) }.map_err(|e| {
        format!(
            "it does not export {ENTRY_SYMBOL} ({e}); is it built with optimystic_plugin_abi::export_storage_plugin!?"
        )
    })?;
    let entry: EntryFn = *entry;
    // SAFETY: an `EntryFn` has no precondition and only returns the address of a static table.
    let table = unsafe { entry() };
    // SAFETY: the table is the library's static, and the library is never unloaded
    // (`load_library` leaks it), so it and everything it points to live for the rest of the process.
    unsafe { StorageLibrary::from_table(table) }.map_err(|e| e.to_string())
}

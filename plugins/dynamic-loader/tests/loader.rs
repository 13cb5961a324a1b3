//! The loader's refusals (missing file, not a library, no entry point, version mismatches) and the
//! JSON protocol of `optimystic_plugin_abi`. Loading a real plugin is tested by
//! `examples/dynamic-storage-plugin`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use optimystic_core::registry::{PluginError, Registry};
use optimystic_core::{Block, BlockId, StorageError, Transform, TrxId};
use optimystic_dynamic_loader::{load_all, load_plugin};
use optimystic_plugin_abi::{
    ABI_VERSION, AbiError, CORE_VERSION, KIND_STORAGE, MetaBytes, RUSTC_VERSION, StorageCall, TableInfo,
    WireBlockCommit, WireStorageError, WireValue, check_table,
};
use serde_json::json;

fn good_table() -> TableInfo {
    TableInfo {
        abi_version: ABI_VERSION,
        kind: KIND_STORAGE,
        core_version: CORE_VERSION.to_owned(),
        rustc_version: RUSTC_VERSION.to_owned(),
        name: "dyn-test_1".to_owned(),
        description: "a test plugin".to_owned(),
    }
}

/// The message of a `PluginError::Dynamic` about `path`.
fn dynamic_message(result: Result<impl std::fmt::Debug, PluginError>, path: &Path) -> String {
    match result {
        Err(PluginError::Dynamic { path: p, message }) => {
            assert_eq!(p, path.display().to_string(), "the error names the library");
            message
        }
        other => panic!("expected a dynamic plugin error, got {other:?}"),
    }
}

#[test]
fn check_table_accepts_this_builds_versions() {
    assert_eq!(check_table(&good_table()), Ok(()));
}

#[test]
fn check_table_refuses_another_abi_version() {
    let info = TableInfo { abi_version: ABI_VERSION + 1, ..good_table() };
    let err = check_table(&info).unwrap_err();
    assert_eq!(err, AbiError::AbiVersion { expected: ABI_VERSION, found: ABI_VERSION + 1 });
    let text = err.to_string();
    assert!(text.contains(&format!("ABI version {}", ABI_VERSION + 1)), "{text}");
    assert!(text.contains(&format!("expects ABI version {ABI_VERSION}")), "{text}");
}

#[test]
fn check_table_refuses_another_core_version() {
    let info = TableInfo { core_version: "0.0.1-other".to_owned(), ..good_table() };
    let err = check_table(&info).unwrap_err();
    assert_eq!(err, AbiError::CoreVersion { expected: CORE_VERSION.to_owned(), found: "0.0.1-other".to_owned() });
    let text = err.to_string();
    assert!(text.contains("optimystic-core 0.0.1-other"), "{text}");
    assert!(text.contains(&format!("runs optimystic-core {CORE_VERSION}")), "{text}");
}

#[test]
fn check_table_refuses_another_rustc_version() {
    let other = "rustc 1.0.0 (a59807500 2015-05-14)";
    let info = TableInfo { rustc_version: other.to_owned(), ..good_table() };
    let err = check_table(&info).unwrap_err();
    assert_eq!(err, AbiError::RustcVersion { expected: RUSTC_VERSION.to_owned(), found: other.to_owned() });
    let text = err.to_string();
    assert!(text.contains(other) && text.contains(RUSTC_VERSION), "{text}");
}

#[test]
fn check_table_refuses_other_kinds() {
    let err = check_table(&TableInfo { kind: 2, ..good_table() }).unwrap_err();
    assert_eq!(err, AbiError::UnsupportedKind { found: 2 });
    assert!(err.to_string().contains("only storage plugins"), "{err}");
}

#[test]
fn check_table_refuses_unusable_names() {
    for name in ["", "has space", "dots.are.not.allowed", "é", &"x".repeat(65)] {
        let err = check_table(&TableInfo { name: name.to_owned(), ..good_table() }).unwrap_err();
        assert_eq!(err, AbiError::InvalidName { found: name.to_owned() });
    }
    assert_eq!(check_table(&TableInfo { name: "x".repeat(64), ..good_table() }), Ok(()));
}

#[test]
fn check_table_reports_the_abi_version_before_anything_else() {
    let info =
        TableInfo { abi_version: 0, core_version: "x".into(), rustc_version: "y".into(), kind: 9, ..good_table() };
    assert!(matches!(check_table(&info), Err(AbiError::AbiVersion { found: 0, .. })));
}

#[test]
fn missing_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libabsent.so");
    let message = dynamic_message(load_plugin(&path), &path);
    assert_eq!(message, "the file does not exist");
}

#[test]
fn directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let message = dynamic_message(load_plugin(dir.path()), dir.path());
    assert!(message.ends_with("is not a file"), "{message}");
}

#[test]
fn file_that_is_not_a_library_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libfake.so");
    std::fs::write(&path, "this is not a shared library\n").unwrap();
    let message = dynamic_message(load_plugin(&path), &path);
    assert!(message.starts_with("not a loadable library: "), "{message}");
}

/// A shared library already mapped into this process that is certainly not a plugin: the C
/// library (found in `/proc/self/maps`, so its path is right on any Linux distribution).
#[cfg(target_os = "linux")]
fn libc_path() -> std::path::PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            let file = Path::new(path).file_name().and_then(|f| f.to_str()).unwrap_or("");
            file.starts_with("libc.so") || (file.starts_with("libc-") && file.ends_with(".so"))
        })
        .map(std::path::PathBuf::from)
        .expect("the C library is mapped into the test process")
}

#[cfg(target_os = "linux")]
#[test]
fn library_without_the_entry_point_is_a_clear_error() {
    let path = libc_path();
    let message = dynamic_message(load_plugin(&path), &path);
    assert!(message.starts_with("it does not export optimystic_plugin_entry_v1"), "{message}");
    assert!(message.contains("export_storage_plugin!"), "{message}");
}

#[test]
fn load_all_stops_at_the_first_failure() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libabsent.so");
    let mut registry = Registry::linked();
    let before = registry.entries().len();
    let message = dynamic_message(load_all([&path], &mut registry), &path);
    assert_eq!(message, "the file does not exist");
    assert_eq!(registry.entries().len(), before);
}

fn block_id(id: &str) -> BlockId {
    BlockId::new(id).unwrap()
}

fn trx_id(id: &str) -> TrxId {
    TrxId::new(id).unwrap()
}

#[test]
fn storage_calls_have_a_stable_json_shape() {
    let call = StorageCall::RevisionAtOrBefore { block_id: block_id("b1"), at_rev: 3 };
    assert_eq!(
        serde_json::to_value(&call).unwrap(),
        json!({"op": "revision_at_or_before", "blockId": "b1", "atRev": 3})
    );
    let call = StorageCall::PutMeta { key: "k".into(), value: MetaBytes(vec![0, 255, 7]) };
    assert_eq!(serde_json::to_value(&call).unwrap(), json!({"op": "put_meta", "key": "k", "value": "AP8H"}));
    assert_eq!(serde_json::to_value(StorageCall::Close).unwrap(), json!({"op": "close"}));
}

#[test]
fn every_storage_call_round_trips_and_names_its_op() {
    let b = block_id("b1");
    let t = trx_id("t1");
    let block = Block::new(b.clone(), "doc", "c1").with_field("pi", json!(0.30000000000000004));
    let transform = Transform { insert: Some(block.clone()), updates: None, delete: None };
    let calls = vec![
        StorageCall::Latest { block_id: b.clone() },
        StorageCall::Revisions { block_id: b.clone(), from_rev: 1, to_rev: u64::MAX },
        StorageCall::RevisionAtOrBefore { block_id: b.clone(), at_rev: 2 },
        StorageCall::Committed { block_id: b.clone(), trx_id: t.clone() },
        StorageCall::Pending { block_id: b.clone(), trx_id: t.clone() },
        StorageCall::PendingTrxIds { block_id: b.clone() },
        StorageCall::SavePending { block_id: b.clone(), trx_id: t.clone(), transform: Box::new(transform.clone()) },
        StorageCall::DeletePending { block_id: b.clone(), trx_id: t.clone() },
        StorageCall::Materialized { block_id: b.clone(), rev: 4 },
        StorageCall::CommitBlock {
            block_id: b.clone(),
            commit: Box::new(WireBlockCommit {
                trx_id: t.clone(),
                rev: 5,
                transform,
                value: Some(block),
                prune_value_at: Some(4),
            }),
        },
        StorageCall::GetMeta { key: "k".into() },
        StorageCall::PutMeta { key: "k".into(), value: MetaBytes(b"\x00binary\xff".to_vec()) },
        StorageCall::DeleteMeta { key: "k".into() },
        StorageCall::ListMeta { prefix: "p/".into(), limit: 10 },
        StorageCall::BlockIds { after: Some(b.clone()), limit: 3 },
        StorageCall::BlockIds { after: None, limit: 3 },
        StorageCall::Stats,
        StorageCall::Close,
    ];
    for call in calls {
        let json = serde_json::to_value(&call).unwrap();
        assert_eq!(json.get("op").and_then(|op| op.as_str()), Some(call.op()), "{json}");
        let back: StorageCall = serde_json::from_value(json).unwrap();
        assert_eq!(back, call);
    }
}

#[test]
fn requests_with_invalid_ids_are_refused_at_decoding() {
    let decoded = serde_json::from_value::<StorageCall>(json!({"op": "latest", "blockId": ""}));
    assert!(decoded.is_err());
    let decoded = serde_json::from_value::<StorageCall>(json!({"op": "no_such_method"}));
    assert!(decoded.is_err());
}

#[test]
fn kept_absent_value_differs_from_no_kept_value() {
    let kept_absent: Option<WireValue> = Some(WireValue { value: None });
    let not_kept: Option<WireValue> = None;
    let kept_absent_json = serde_json::to_string(&kept_absent).unwrap();
    let not_kept_json = serde_json::to_string(&not_kept).unwrap();
    assert_ne!(kept_absent_json, not_kept_json);
    assert_eq!(serde_json::from_str::<Option<WireValue>>(&kept_absent_json).unwrap(), kept_absent);
    assert_eq!(serde_json::from_str::<Option<WireValue>>(&not_kept_json).unwrap(), not_kept);
}

/// Encodes an error as the plugin does and decodes it as the host does.
fn cross(e: &StorageError) -> StorageError {
    let json = serde_json::to_vec(&WireStorageError::from(e)).unwrap();
    serde_json::from_slice::<WireStorageError>(&json).unwrap().into_storage_error("dyn-test")
}

#[test]
fn storage_errors_keep_their_variant_across_the_boundary() {
    let cases = [
        StorageError::Corrupt("c".into()),
        StorageError::Full("f".into()),
        StorageError::Locked("l".into()),
        StorageError::Incompatible("i".into()),
        StorageError::Invalid("v".into()),
    ];
    for e in cases {
        assert_eq!(cross(&e).to_string(), e.to_string());
        assert_eq!(std::mem::discriminant(&cross(&e)), std::mem::discriminant(&e));
    }
}

#[test]
fn io_errors_keep_their_kind_and_os_code() {
    let e = StorageError::io("opening the store", std::io::Error::from_raw_os_error(2));
    match cross(&e) {
        StorageError::Io { context, error } => {
            assert_eq!(context, "opening the store");
            assert_eq!(error.raw_os_error(), Some(2));
            assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    let e = StorageError::io("writing", std::io::Error::new(std::io::ErrorKind::PermissionDenied, "read-only"));
    match cross(&e) {
        StorageError::Io { error, .. } => {
            assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied);
            assert_eq!(error.to_string(), "read-only");
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn backend_errors_are_attributed_to_the_plugin() {
    let own = StorageError::Failed { engine: "dyn-test", message: "boom".into() };
    assert!(matches!(cross(&own), StorageError::Failed { engine: "dyn-test", message } if message == "boom"));
    let inner = StorageError::Failed { engine: "memory", message: "boom".into() };
    assert!(matches!(cross(&inner), StorageError::Failed { engine: "dyn-test", message } if message == "memory: boom"));
}

//! Loads the example plugin's shared library (built by cargo before this test) through
//! `optimystic-dynamic-loader`, as a node does, and runs the storage conformance suite and the
//! host's failure handling against it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use optimystic_core::identity::PeerId;
use optimystic_core::registry::{PluginError, PluginKind, Registry, StorageContext};
use optimystic_core::storage::{BlockCommit, RawStorage};
use optimystic_core::{Block, BlockId, StorageError, Transform, TrxId, TrxRev};
use optimystic_dynamic_loader::{load_all, load_plugin};
use serde_json::{Value, json};

/// The example's shared library. Cargo builds it with the library this test links, into the
/// `deps/` directory holding this test binary. (The copy in `target/<profile>/` is only refreshed
/// by `cargo build`, not by `cargo test`, so it may be stale.)
fn plugin_path() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let file =
        format!("{}optimystic_example_dynamic_storage{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    match exe.parent().map(|deps| deps.join(&file)) {
        Some(path) if path.is_file() => path,
        _ => panic!(
            "the example plugin library {file} is not next to the test binary {}; cargo builds it before \
             this test (crate-type cdylib): run `cargo test -p optimystic-example-dynamic-storage`",
            exe.display()
        ),
    }
}

/// The linked plugins plus the example, loaded once per test process.
fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut registry = Registry::linked();
        load_all([plugin_path()], &mut registry).expect("the example plugin loads");
        registry
    })
}

fn context() -> StorageContext {
    StorageContext { local_peer_id: PeerId::random(), data_dir: None }
}

fn open(config: Value) -> Result<Arc<dyn RawStorage>, PluginError> {
    registry().build_storage("dyn-memory", &context(), &config)
}

fn block_id(id: &str) -> BlockId {
    BlockId::new(id).unwrap()
}

fn trx_id(id: &str) -> TrxId {
    TrxId::new(id).unwrap()
}

mod conformance {
    use optimystic_testkit::conformance::Fixture;

    optimystic_testkit::storage_conformance!(|| async {
        Fixture::new(super::open(serde_json::json!({"kind": "dyn-memory"})).expect("the example plugin opens"))
    });
}

#[test]
fn registers_as_a_storage_plugin_with_its_library_as_origin() {
    let entry = registry()
        .entries()
        .iter()
        .find(|e| e.name == optimystic_example_dynamic_storage::NAME)
        .expect("dyn-memory is registered");
    assert_eq!(entry.kind(), PluginKind::Storage);
    assert_eq!(entry.origin, plugin_path().display().to_string());
    assert!(entry.description.starts_with("example dynamic plugin"), "{}", entry.description);
    assert!(registry().names(PluginKind::Storage).contains(&"memory".to_owned()), "builtins stay registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_round_trips_through_the_library() {
    let storage = open(Value::Null).unwrap();
    assert!(!storage.durable());
    let b = block_id("b1");
    let t = trx_id("t1");
    let block = Block::new(b.clone(), "doc", "c1").with_field("n", json!([1, 2.5, "x", null, {"deep": true}]));
    let transform = Transform { insert: Some(block.clone()), updates: None, delete: None };
    storage.save_pending(&b, &t, &transform).await.unwrap();
    assert_eq!(storage.pending(&b, &t).await.unwrap(), Some(transform.clone()));
    let commit = BlockCommit { trx_id: t.clone(), rev: 1, transform, value: Some(block.clone()), prune_value_at: None };
    storage.commit_block(&b, &commit).await.unwrap();
    assert_eq!(storage.latest(&b).await.unwrap(), Some(TrxRev { trx_id: t.clone(), rev: 1 }));
    assert_eq!(storage.materialized(&b, 1).await.unwrap(), Some(Some(block)));
    assert_eq!(storage.materialized(&b, 2).await.unwrap(), None);
    assert_eq!(storage.committed(&b, &t).await.unwrap().map(|c| c.rev), Some(1));
    assert_eq!(storage.pending(&b, &t).await.unwrap(), None);
    storage.put_meta("m/1", b"\x00\xffbytes").await.unwrap();
    assert_eq!(storage.get_meta("m/1").await.unwrap(), Some(b"\x00\xffbytes".to_vec()));
    assert_eq!(storage.list_meta("m/", 10).await.unwrap(), vec![("m/1".to_owned(), b"\x00\xffbytes".to_vec())]);
    assert_eq!(storage.block_ids(None, 10).await.unwrap(), vec![b.clone()]);
    assert_eq!(storage.stats().await.unwrap().map(|s| s.blocks), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_are_independent() {
    let one = open(Value::Null).unwrap();
    let two = open(Value::Null).unwrap();
    one.put_meta("k", b"1").await.unwrap();
    assert_eq!(two.get_meta("k").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_errors_keep_their_variant() {
    let storage = open(Value::Null).unwrap();
    let b = block_id("b1");
    let commit = |rev| BlockCommit {
        trx_id: trx_id("t1"),
        rev,
        transform: Transform::default(),
        value: None,
        prune_value_at: None,
    };
    storage.commit_block(&b, &commit(2)).await.unwrap();
    match storage.commit_block(&b, &commit(2)).await {
        Err(StorageError::Invalid(message)) => assert!(message.contains("does not advance"), "{message}"),
        other => panic!("expected an invalid-request error, got {other:?}"),
    }
    storage.close().await.unwrap();
    assert!(matches!(storage.latest(&b).await, Err(StorageError::Invalid(_))), "calls after close fail");
}

#[test]
fn works_without_a_tokio_runtime() {
    let storage = open(Value::Null).unwrap();
    futures::executor::block_on(async {
        storage.put_meta("k", b"v").await.unwrap();
        assert_eq!(storage.get_meta("k").await.unwrap(), Some(b"v".to_vec()));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_call_becomes_an_error() {
    let storage = open(json!({"panic_on": "latest"})).unwrap();
    match storage.latest(&block_id("b1")).await {
        Err(StorageError::Failed { engine, message }) => {
            assert_eq!(engine, "dyn-memory");
            assert!(message.contains("panicked during latest"), "{message}");
            assert!(message.contains("configured to panic in latest"), "{message}");
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    storage.put_meta("k", b"v").await.unwrap();
    assert_eq!(storage.get_meta("k").await.unwrap(), Some(b"v".to_vec()), "the engine still serves other calls");
}

#[test]
fn a_panicking_open_becomes_an_error() {
    match open(json!({"panic_on": "open"})) {
        Err(PluginError::Storage(StorageError::Failed { engine, message })) => {
            assert_eq!(engine, "dyn-memory");
            assert!(message.contains("panicked during open"), "{message}");
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
}

#[test]
fn invalid_configuration_is_refused_by_the_plugin() {
    match open(json!({"colour": "blue"})) {
        Err(PluginError::Storage(StorageError::Invalid(message))) => {
            assert!(message.contains("unknown field `colour`"), "{message}");
        }
        other => panic!("expected an invalid-configuration error, got {other:?}"),
    }
    assert!(matches!(open(json!({"panic_on": "nowhere"})), Err(PluginError::Storage(StorageError::Invalid(_)))));
}

#[test]
fn loading_a_plugin_name_twice_is_a_clear_error() {
    let path = plugin_path();
    let mut registry = Registry::linked();
    match load_all([&path, &path], &mut registry) {
        Err(PluginError::Dynamic { path: p, message }) => {
            assert_eq!(p, path.display().to_string());
            assert!(message.contains("\"dyn-memory\" is already registered"), "{message}");
            assert!(message.contains(&format!("from {}", path.display())), "{message}");
        }
        other => panic!("expected a duplicate error, got {other:?}"),
    }
    assert_eq!(registry.names(PluginKind::Storage).iter().filter(|n| *n == "dyn-memory").count(), 1);
}

#[test]
fn load_plugin_describes_the_library() {
    let entry = load_plugin(&plugin_path()).unwrap();
    assert_eq!(entry.name, "dyn-memory");
    assert_eq!(entry.kind(), PluginKind::Storage);
}

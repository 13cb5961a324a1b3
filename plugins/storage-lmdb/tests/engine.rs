//! Engine-specific tests of the LMDB storage: a full map, the directory lock, the format marker,
//! persistence across reopen, odd ids and plugin registration. The SPEC rules are covered by the
//! shared conformance suite (`tests/conformance.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;

use optimystic_core::registry::{PluginError, PluginKind, Registry, StorageContext};
use optimystic_core::storage::{BlockCommit, RawStorage};
use optimystic_core::{Block, BlockId, StorageError, Transform, TrxId, TrxRev};
use optimystic_storage_lmdb::{FORMAT_VERSION, LmdbKv, LmdbOptions, LmdbStorage};
use serde_json::json;

fn open(path: &std::path::Path) -> Result<LmdbStorage, StorageError> {
    LmdbKv::open(path).map(LmdbStorage::over)
}

fn open_with(path: &std::path::Path, options: LmdbOptions) -> Result<LmdbStorage, StorageError> {
    LmdbKv::open_with(path, options).map(LmdbStorage::over)
}

fn bid(s: &str) -> BlockId {
    BlockId::new(s).unwrap()
}

fn tid(s: &str) -> TrxId {
    TrxId::new(s).unwrap()
}

fn block(id: &BlockId, n: u64) -> Block {
    Block::new(id.clone(), "t", "c").with_field("n", json!(n))
}

fn commit(trx: &TrxId, rev: u64, value: Option<Block>, prune: Option<u64>) -> BlockCommit {
    let transform = Transform { insert: value.clone(), ..Transform::default() };
    BlockCommit { trx_id: trx.clone(), rev, transform, value, prune_value_at: prune }
}

#[tokio::test]
async fn a_full_map_is_a_clear_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open_with(dir.path(), LmdbOptions { map_size_bytes: 256 * 1024 }).unwrap();
    let id = bid("big");
    let mut committed = 0u64;
    let mut full = None;
    for rev in 1..=200u64 {
        let value = Block::new(id.clone(), "t", "c").with_field("payload", json!("x".repeat(16 * 1024)));
        let step = commit(&tid(&format!("t{rev}")), rev, Some(value), None);
        match storage.commit_block(&id, &step).await {
            Ok(()) => committed = rev,
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let err = full.expect("a 256 KiB map cannot hold 200 values of 16 KiB");
    assert!(matches!(&err, StorageError::Full(m) if m.contains("map_size_bytes")), "{err:?}");
    assert!(committed > 0);
    // The failed step left nothing behind, and the store still reads and deletes.
    assert_eq!(storage.latest(&id).await.unwrap().map(|l| l.rev), Some(committed));
    assert_eq!(storage.revisions(&id, 0, u64::MAX).await.unwrap().len() as u64, committed);
    assert_eq!(storage.committed(&id, &tid(&format!("t{}", committed + 1))).await.unwrap(), None);
    storage.put_meta("k", b"v").await.ok();
    storage.close().await.unwrap();
}

#[tokio::test]
async fn a_second_open_is_locked_and_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path()).unwrap();
    match open(dir.path()).unwrap_err() {
        StorageError::Locked(message) => assert!(message.contains(&std::process::id().to_string()), "{message}"),
        other => panic!("expected Locked, got {other:?}"),
    }
    first.close().await.unwrap();
    first.close().await.unwrap();
    assert!(first.latest(&bid("a")).await.is_err(), "calls after close fail");
    let second = open(dir.path()).unwrap();
    drop(second);
    open(dir.path()).unwrap();
}

#[test]
fn foreign_or_unknown_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(optimystic_datadir::DataDir::open(dir.path(), "file", 1).unwrap());
    assert!(matches!(open(dir.path()), Err(StorageError::Incompatible(m)) if m.contains("file")));

    // A directory of the format before the key-value seam (version 1), or of a newer build, is
    // refused with both versions named.
    for version in [1, FORMAT_VERSION + 1] {
        let dir = tempfile::tempdir().unwrap();
        let marker = format!(r#"{{"format":"optimystic-storage","engine":"lmdb","version":{version}}}"#);
        std::fs::write(dir.path().join("FORMAT"), marker).unwrap();
        match open(dir.path()) {
            Err(StorageError::Incompatible(m)) => assert!(
                m.contains(&format!("format version {version}"))
                    && m.contains(&format!("reads version {FORMAT_VERSION}")),
                "{m}"
            ),
            other => panic!("version {version}: expected Incompatible, got {other:?}"),
        }
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.mdb"), "someone else's").unwrap();
    assert!(matches!(open(dir.path()), Err(StorageError::Incompatible(_))));

    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()).unwrap());
    assert!(matches!(optimystic_datadir::DataDir::open(dir.path(), "file", 1), Err(StorageError::Incompatible(_))));
}

#[tokio::test]
async fn data_survives_reopen_and_odd_ids_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let long = "ü".repeat(128);
    let ids = ["../../etc/passwd", "a/b", "nul\0byte", "..", "日本", long.as_str()];
    let trx_long = "t".repeat(128);
    {
        let storage = open(dir.path()).unwrap();
        for (i, raw) in ids.iter().enumerate() {
            let id = bid(raw);
            storage.save_pending(&id, &tid(&trx_long), &Transform::default()).await.unwrap();
            let mut prev = None;
            for rev in 1..=40u64 {
                let trx = tid(&format!("{i}/{rev}"));
                let prune = prev.filter(|p: &u64| !p.is_multiple_of(8));
                storage.commit_block(&id, &commit(&trx, rev, Some(block(&id, rev)), prune)).await.unwrap();
                prev = Some(rev);
            }
        }
        storage.put_meta("", b"empty key").await.unwrap();
        storage.put_meta("p/1", b"one").await.unwrap();
        storage.put_meta("p/2", b"two").await.unwrap();
        // Longer than an LMDB key: stored under its hash, read back by its name.
        storage.put_meta(&"k".repeat(600), b"long").await.unwrap();
        storage.close().await.unwrap();
    }
    let storage = open(dir.path()).unwrap();
    let mut sorted: Vec<BlockId> = ids.iter().map(|s| bid(s)).collect();
    sorted.sort();
    assert_eq!(storage.block_ids(None, 100).await.unwrap(), sorted);
    assert_eq!(storage.block_ids(Some(&sorted[1]), 2).await.unwrap(), sorted[2..4].to_vec());
    for (i, raw) in ids.iter().enumerate() {
        let id = bid(raw);
        let trx = |rev: u64| tid(&format!("{i}/{rev}"));
        assert_eq!(storage.latest(&id).await.unwrap(), Some(TrxRev { trx_id: trx(40), rev: 40 }));
        assert_eq!(storage.revisions(&id, 5, 7).await.unwrap().len(), 3);
        assert_eq!(storage.revision_at_or_before(&id, 1000).await.unwrap().map(|r| r.rev), Some(40));
        assert_eq!(storage.revision_at_or_before(&id, 0).await.unwrap(), None);
        assert_eq!(storage.committed(&id, &trx(17)).await.unwrap().map(|c| c.rev), Some(17));
        assert_eq!(storage.materialized(&id, 16).await.unwrap(), Some(Some(block(&id, 16))));
        assert_eq!(storage.materialized(&id, 17).await.unwrap(), None);
        assert_eq!(storage.materialized(&id, 40).await.unwrap(), Some(Some(block(&id, 40))));
        assert_eq!(storage.pending_trx_ids(&id).await.unwrap(), vec![tid(&trx_long)]);
    }
    assert_eq!(storage.get_meta("").await.unwrap().as_deref(), Some(&b"empty key"[..]));
    assert_eq!(storage.get_meta(&"k".repeat(600)).await.unwrap().as_deref(), Some(&b"long"[..]));
    let listed = storage.list_meta("p/", 10).await.unwrap();
    assert_eq!(listed, vec![("p/1".to_owned(), b"one".to_vec()), ("p/2".to_owned(), b"two".to_vec())]);
    assert_eq!(storage.list_meta("p/", 1).await.unwrap().len(), 1);
}

#[tokio::test]
async fn forgotten_blocks_are_not_listed() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path()).unwrap();
    let id = bid("short-lived");
    storage.save_pending(&id, &tid("x"), &Transform::default()).await.unwrap();
    storage.save_pending(&id, &tid("y"), &Transform::default()).await.unwrap();
    storage.delete_pending(&id, &tid("x")).await.unwrap();
    assert_eq!(storage.block_ids(None, 10).await.unwrap(), vec![id.clone()]);
    storage.delete_pending(&id, &tid("y")).await.unwrap();
    storage.delete_pending(&id, &tid("y")).await.unwrap();
    assert!(storage.block_ids(None, 10).await.unwrap().is_empty());
    let stats = storage.stats().await.unwrap().unwrap();
    assert_eq!(stats.blocks, 0);
    assert!(stats.bytes.unwrap() > 0);
    storage.commit_block(&id, &commit(&tid("z"), 1, None, None)).await.unwrap();
    assert_eq!(storage.stats().await.unwrap().unwrap().blocks, 1);
}

#[test]
fn registered_and_configured() {
    let registry = Registry::linked();
    assert!(registry.names(PluginKind::Storage).contains(&"lmdb".to_owned()));
    let peer = optimystic_core::identity::PeerId::random();
    let mut cx = StorageContext { local_peer_id: peer, data_dir: None };
    assert!(matches!(registry.build_storage("lmdb", &cx, &json!({"kind": "lmdb"})), Err(PluginError::Config { .. })));

    let dir = tempfile::tempdir().unwrap();
    cx.data_dir = Some(dir.path().to_path_buf());
    for bad in [json!(0), json!(-1), json!("1GiB"), json!(1.5)] {
        let result = registry.build_storage("lmdb", &cx, &json!({"kind": "lmdb", "map_size_bytes": bad}));
        assert!(matches!(result, Err(PluginError::Config { .. })), "{bad}: {result:?}");
    }
    let storage: Arc<dyn RawStorage> =
        registry.build_storage("lmdb", &cx, &json!({"kind": "lmdb", "map_size_bytes": 10_000_000})).unwrap();
    assert!(storage.durable());
    assert!(dir.path().join("storage-lmdb").join("FORMAT").exists());
    let again = registry.build_storage("lmdb", &cx, &json!({"kind": "lmdb"}));
    assert!(matches!(again, Err(PluginError::Storage(StorageError::Locked(_)))), "{again:?}");
}

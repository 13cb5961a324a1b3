//! Engine-specific tests of the file storage: hostile ids, the directory lock, the format marker,
//! the chunked revision log across reopen, crash leftovers and plugin registration. The SPEC rules
//! are covered by the shared conformance suite (`tests/conformance.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;
use std::sync::Arc;

use optimystic_core::registry::{PluginError, Registry, StorageContext};
use optimystic_core::storage::{BlockCommit, RawStorage};
use optimystic_core::{Block, BlockId, StorageError, Transform, TrxId, TrxRev};
use optimystic_storage_file::{FileStorage, names};
use serde_json::json;

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

/// Every path under `root`, relative.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

#[tokio::test]
async fn hostile_ids_stay_inside_the_data_directory() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let storage = FileStorage::open(&dir).unwrap();
    let long_ascii = "L".repeat(256);
    let long_text = "ü".repeat(128); // 256 bytes
    let ids = [
        "../../etc/passwd",
        "../escape",
        "a/b/c",
        "a\\b",
        "nul\0byte",
        "..",
        ".",
        "/abs",
        "日本語のブロック",
        "CON",
        long_ascii.as_str(),
        long_text.as_str(),
    ];
    let long_trx = "T/..".repeat(32); // 128 bytes
    for (n, raw) in ids.iter().enumerate() {
        let id = bid(raw);
        let trx =
            if n % 2 == 0 { tid(&format!("../{raw}").chars().take(100).collect::<String>()) } else { tid(&long_trx) };
        let pending_trx = tid("p/../\0x");
        let insert = Transform { insert: Some(block(&id, n as u64)), ..Transform::default() };
        storage.save_pending(&id, &pending_trx, &insert).await.unwrap();
        storage.save_pending(&id, &trx, &insert).await.unwrap();
        storage.commit_block(&id, &commit(&trx, 1, Some(block(&id, n as u64)), None)).await.unwrap();
        storage.put_meta(raw, raw.as_bytes()).await.unwrap();
    }
    for (n, raw) in ids.iter().enumerate() {
        let id = bid(raw);
        let latest = storage.latest(&id).await.unwrap().unwrap();
        assert_eq!(latest.rev, 1);
        assert_eq!(storage.materialized(&id, 1).await.unwrap(), Some(Some(block(&id, n as u64))), "{raw:?}");
        assert!(storage.committed(&id, &latest.trx_id).await.unwrap().is_some());
        assert_eq!(storage.pending_trx_ids(&id).await.unwrap(), vec![tid("p/../\0x")], "{raw:?}");
        assert_eq!(storage.get_meta(raw).await.unwrap().as_deref(), Some(raw.as_bytes()));
    }
    let mut expected: Vec<BlockId> = ids.iter().map(|s| bid(s)).collect();
    expected.sort();
    assert_eq!(storage.block_ids(None, 100).await.unwrap(), expected);
    let metas = storage.list_meta("", 100).await.unwrap();
    let mut keys: Vec<&str> = ids.to_vec();
    keys.sort();
    assert_eq!(metas.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), keys);
    assert_eq!(storage.list_meta("../", 100).await.unwrap().len(), 2);
    let long_prefix = "ü".repeat(100);
    assert_eq!(storage.list_meta(&long_prefix, 100).await.unwrap().len(), 1);

    // Nothing outside the data directory, and every name inside is one the engine made.
    assert_eq!(tree(parent.path()).iter().filter(|p| !p.starts_with("data")).count(), 0);
    for path in tree(&dir) {
        for part in Path::new(&path).components() {
            let part = part.as_os_str().to_string_lossy();
            assert!(part.len() <= 255);
            assert!(part.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'), "{path}");
        }
    }
    storage.close().await.unwrap();
}

#[tokio::test]
async fn a_second_open_is_locked_and_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let first = FileStorage::open(dir.path()).unwrap();
    let err = FileStorage::open(dir.path()).unwrap_err();
    match &err {
        StorageError::Locked(message) => assert!(message.contains(&std::process::id().to_string()), "{message}"),
        other => panic!("expected Locked, got {other:?}"),
    }
    first.close().await.unwrap();
    first.close().await.unwrap();
    for (call, result) in [
        ("latest", first.latest(&bid("a")).await.map(drop)),
        ("pending_trx_ids", first.pending_trx_ids(&bid("a")).await.map(drop)),
        ("put_meta", first.put_meta("k", b"v").await),
    ] {
        assert!(matches!(result, Err(StorageError::Closed { engine: "file" })), "{call} after close: {result:?}");
    }
    let second = FileStorage::open(dir.path()).unwrap();
    drop(second);
    FileStorage::open(dir.path()).unwrap();
}

#[test]
fn foreign_or_unknown_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("FORMAT"), r#"{"format":"optimystic-storage","engine":"lmdb","version":1}"#)
        .unwrap();
    assert!(matches!(FileStorage::open(dir.path()), Err(StorageError::Incompatible(m)) if m.contains("lmdb")));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("FORMAT"), r#"{"format":"optimystic-storage","engine":"file","version":99}"#)
        .unwrap();
    assert!(matches!(FileStorage::open(dir.path()), Err(StorageError::Incompatible(m)) if m.contains("99")));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("FORMAT"), "garbage").unwrap();
    assert!(matches!(FileStorage::open(dir.path()), Err(StorageError::Incompatible(_))));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("important.txt"), "not ours").unwrap();
    assert!(matches!(FileStorage::open(dir.path()), Err(StorageError::Incompatible(_))));
    assert_eq!(std::fs::read_to_string(dir.path().join("important.txt")).unwrap(), "not ours");

    let dir = tempfile::tempdir().unwrap();
    drop(FileStorage::open(dir.path()).unwrap());
    let marker = std::fs::read_to_string(dir.path().join("FORMAT")).unwrap();
    assert!(marker.contains("\"file\""), "{marker}");
}

#[tokio::test]
async fn long_histories_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id = bid("history");
    let revs: Vec<u64> = (1..=300).map(|i| i * 3).collect();
    {
        let storage = FileStorage::open(dir.path()).unwrap();
        let mut prev: Option<u64> = None;
        for (i, rev) in revs.iter().enumerate() {
            let trx = tid(&format!("trx-{i}"));
            // Keep every 10th value, like checkpoints.
            let prune = prev.filter(|p| p % 10 != 0);
            storage.commit_block(&id, &commit(&trx, *rev, Some(block(&id, *rev)), prune)).await.unwrap();
            prev = Some(*rev);
        }
        let stale = storage.commit_block(&id, &commit(&tid("late"), 3, None, None)).await;
        assert!(matches!(stale, Err(StorageError::Invalid(_))), "{stale:?}");
        storage.close().await.unwrap();
    }
    let storage = FileStorage::open(dir.path()).unwrap();
    let all = storage.revisions(&id, 0, u64::MAX).await.unwrap();
    let expected: Vec<TrxRev> =
        revs.iter().enumerate().map(|(i, rev)| TrxRev { trx_id: tid(&format!("trx-{i}")), rev: *rev }).collect();
    assert_eq!(all, expected);
    assert_eq!(storage.latest(&id).await.unwrap(), expected.last().cloned());
    for (from, to) in [(0, 0), (1, 2), (3, 3), (4, 200), (190, 194), (500, 900), (899, 2000), (10, 5)] {
        let want: Vec<TrxRev> = expected.iter().filter(|e| e.rev >= from && e.rev <= to).cloned().collect();
        assert_eq!(storage.revisions(&id, from, to).await.unwrap(), want, "{from}..={to}");
    }
    for at in [0, 1, 2, 3, 4, 191, 192, 193, 194, 195, 899, 900, 901, u64::MAX] {
        let want = expected.iter().rev().find(|e| e.rev <= at).cloned();
        assert_eq!(storage.revision_at_or_before(&id, at).await.unwrap(), want, "at {at}");
    }
    for (i, rev) in revs.iter().enumerate() {
        let committed = storage.committed(&id, &tid(&format!("trx-{i}"))).await.unwrap().unwrap();
        assert_eq!(committed.rev, *rev);
        let kept = storage.materialized(&id, *rev).await.unwrap();
        if rev % 10 == 0 || *rev == 900 {
            assert_eq!(kept, Some(Some(block(&id, *rev))), "rev {rev}");
        } else {
            assert_eq!(kept, None, "rev {rev} was pruned");
        }
    }
    assert_eq!(storage.materialized(&id, 901).await.unwrap(), None);
}

#[tokio::test]
async fn files_left_by_a_crash_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let storage = FileStorage::open(dir.path()).unwrap();
    let id = bid("crashy");
    let a = tid("a");
    let insert = Transform { insert: Some(block(&id, 1)), ..Transform::default() };
    storage.save_pending(&id, &a, &insert).await.unwrap();
    storage.commit_block(&id, &commit(&a, 1, Some(block(&id, 1)), None)).await.unwrap();
    storage.close().await.unwrap();

    let block_dir = dir.path().join("blocks").join(names::encode(&id));
    // A crash after the commit point, before the pending file was removed.
    std::fs::write(block_dir.join("p").join(names::encode(&a)), r#"{"trxId":"a","transform":{}}"#).unwrap();
    // A crash before the commit point of trx b at rev 2: its committed file exists, the manifest
    // does not name it.
    std::fs::write(block_dir.join("t").join(names::encode("b")), r#"{"trxId":"b","rev":2,"transform":{}}"#).unwrap();
    // A temporary file.
    std::fs::write(dir.path().join("tmp").join("123-4"), "partial").unwrap();

    let storage = FileStorage::open(dir.path()).unwrap();
    assert_eq!(storage.pending(&id, &a).await.unwrap(), None);
    assert!(storage.pending_trx_ids(&id).await.unwrap().is_empty());
    assert_eq!(storage.committed(&id, &tid("b")).await.unwrap(), None);
    assert_eq!(storage.committed(&id, &a).await.unwrap().map(|c| c.rev), Some(1));
    assert!(tree(&dir.path().join("tmp")).is_empty());
}

#[tokio::test]
async fn forgotten_blocks_leave_no_directory() {
    let dir = tempfile::tempdir().unwrap();
    let storage = FileStorage::open(dir.path()).unwrap();
    let id = bid("short-lived");
    storage.save_pending(&id, &tid("x"), &Transform::default()).await.unwrap();
    assert_eq!(storage.block_ids(None, 10).await.unwrap(), vec![id.clone()]);
    storage.delete_pending(&id, &tid("x")).await.unwrap();
    storage.delete_pending(&id, &tid("x")).await.unwrap();
    assert!(storage.block_ids(None, 10).await.unwrap().is_empty());
    assert!(tree(&dir.path().join("blocks")).is_empty());
}

#[test]
fn registered_and_configured() {
    let registry = Registry::linked();
    assert!(registry.names(optimystic_core::registry::PluginKind::Storage).contains(&"file".to_owned()));
    let peer = optimystic_core::identity::PeerId::random();
    let mut cx = StorageContext { local_peer_id: peer, data_dir: None };
    let no_dir = registry.build_storage("file", &cx, &json!({"kind": "file"}));
    assert!(matches!(no_dir, Err(PluginError::Config { .. })), "{no_dir:?}");

    let dir = tempfile::tempdir().unwrap();
    cx.data_dir = Some(dir.path().to_path_buf());
    let storage: Arc<dyn RawStorage> = registry.build_storage("file", &cx, &json!({"kind": "file"})).unwrap();
    assert!(storage.durable());
    assert!(dir.path().join("storage-file").join("FORMAT").exists());
    let again = registry.build_storage("file", &cx, &json!({"kind": "file"}));
    assert!(matches!(again, Err(PluginError::Storage(StorageError::Locked(_)))), "{again:?}");

    let explicit = dir.path().join("elsewhere");
    let config = json!({"kind": "file", "path": explicit.to_str().unwrap()});
    registry.build_storage("file", &StorageContext { local_peer_id: peer, data_dir: None }, &config).unwrap();
    assert!(explicit.join("FORMAT").exists());

    let unknown = registry.build_storage("file", &cx, &json!({"kind": "file", "paht": "x"}));
    assert!(matches!(unknown, Err(PluginError::Config { .. })), "{unknown:?}");
}

//! Damaged bytes under the key-value adapter give `StorageError::Corrupt`, never a panic: each
//! record kind of the layout (`optimystic_core::kv::blocks`) is overwritten with junk and read.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use optimystic_core::kv::{KvStore, KvWrite};
use optimystic_core::storage::{BlockCommit, RawStorage};
use optimystic_core::{Block, BlockId, StorageError, Transform, TrxId};
use optimystic_storage_memory::MemoryStorage;

/// A store with block `a` committed at rev 1 (trx `t1`) and pending `t2`, plus a metadata key.
async fn store() -> MemoryStorage {
    let storage = MemoryStorage::new();
    let a = BlockId::new("a").unwrap();
    let value = Block::new(a.clone(), "t", "c");
    let transform = Transform { insert: Some(value.clone()), ..Transform::default() };
    let commit = BlockCommit {
        trx_id: tid("t1"),
        rev: 1,
        transform: transform.clone(),
        value: Some(value),
        prune_value_at: None,
    };
    storage.commit_block(&a, &commit).await.unwrap();
    storage.save_pending(&a, &tid("t2"), &transform).await.unwrap();
    storage.put_meta("m", b"v").await.unwrap();
    storage
}

fn tid(s: &str) -> TrxId {
    TrxId::new(s).unwrap()
}

/// Every stored key whose bytes start with `prefix`.
fn keys(storage: &MemoryStorage, prefix: &[u8]) -> Vec<Vec<u8>> {
    storage.store().scan(prefix, prefix, usize::MAX).unwrap().into_iter().map(|(k, _)| k).collect()
}

fn assert_corrupt<T: std::fmt::Debug>(what: &str, result: Result<T, StorageError>) {
    assert!(matches!(result, Err(StorageError::Corrupt(_))), "{what}: expected Corrupt, got {result:?}");
}

#[tokio::test]
async fn junk_values_are_corrupt_errors() {
    let a = BlockId::new("a").unwrap();
    // Too short for a revision and an id, or a revision followed by bytes that are neither UTF-8
    // nor JSON.
    for junk in [&b""[..], b"\xff\xff\xff\xff\xff\xff\xff\xff\xff"] {
        let storage = store().await;
        let mut block_keys = keys(&storage, b"b");
        block_keys.extend(keys(&storage, b"n"));
        let writes: Vec<KvWrite> = block_keys.iter().map(|k| KvWrite::put(k.clone(), junk)).collect();
        storage.store().write(&writes, true).unwrap();
        assert_corrupt("latest", storage.latest(&a).await);
        assert_corrupt("revisions", storage.revisions(&a, 0, 10).await);
        assert_corrupt("committed", storage.committed(&a, &tid("t1")).await);
        assert_corrupt("pending", storage.pending(&a, &tid("t2")).await);
        assert_corrupt("materialized", storage.materialized(&a, 1).await);
        assert_corrupt("stats", storage.stats().await);
        assert_corrupt(
            "commit_block",
            storage
                .commit_block(
                    &a,
                    &BlockCommit {
                        trx_id: tid("t3"),
                        rev: 2,
                        transform: Transform::default(),
                        value: None,
                        prune_value_at: None,
                    },
                )
                .await,
        );
    }
}

#[tokio::test]
async fn junk_keys_are_corrupt_errors() {
    let storage = store().await;
    let a = BlockId::new("a").unwrap();
    let pending = keys(&storage, b"b").into_iter().find(|k| k.contains(&b'P')).unwrap();
    let mut bad_trx = pending.clone();
    bad_trx.truncate(pending.len() - 2);
    bad_trx.push(0xff);
    let long_meta = [&b"m"[..], &[b'x'; 477], &[0xff], &[7; 32]].concat();
    let writes = [
        KvWrite::put(bad_trx, b"{}"),
        KvWrite::put(&b"i\xff"[..], b""),
        KvWrite::put(&b"m\xff"[..], b"v"),
        KvWrite::put(long_meta, b"\x00\x00\x00\x05short"),
    ];
    storage.store().write(&writes, true).unwrap();
    assert_corrupt("pending_trx_ids", storage.pending_trx_ids(&a).await);
    assert_corrupt("block_ids", storage.block_ids(None, 10).await);
    assert_corrupt("list_meta", storage.list_meta("", 10).await);
    assert_corrupt("list_meta of long keys", storage.list_meta(&"x".repeat(470), 10).await);
}

//! The adapter's cache of decoded materialized values (`optimystic_core::kv::values`) answers
//! exactly as the stored bytes do: after each kind of write through the adapter, after writes to
//! the store underneath, and after close.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use optimystic_core::kv::{KvStore, KvWrite};
use optimystic_core::storage::{BlockCommit, BlockValue, MetaWrite, RawStorage};
use optimystic_core::{Block, BlockId, StorageError, Transform, TrxId};
use optimystic_storage_memory::MemoryStorage;
use serde_json::json;

fn tid(s: &str) -> TrxId {
    TrxId::new(s).unwrap()
}

fn block(entries: usize) -> BlockValue {
    let a = BlockId::new("a").unwrap();
    Some(Block::new(a, "t", "c").with_field("entries", json!((0..entries).collect::<Vec<_>>())))
}

fn commit(trx: &str, rev: u64, value: BlockValue, prune_value_at: Option<u64>) -> BlockCommit {
    BlockCommit { trx_id: tid(trx), rev, transform: Transform::default(), value, prune_value_at }
}

/// The store key of block `a`'s materialized value at `rev` (layout of `optimystic_core::kv::blocks`).
fn value_key(rev: u64) -> Vec<u8> {
    [&b"b\x00\x01aV"[..], &rev.to_be_bytes()].concat()
}

#[tokio::test]
async fn reads_follow_every_write() {
    let storage = MemoryStorage::new();
    let a = BlockId::new("a").unwrap();

    // A commit's value reads back, equal to the value committed, and so does a deletion (`None`).
    storage.commit_block(&a, &commit("t1", 1, block(1), None)).await.unwrap();
    assert_eq!(storage.materialized(&a, 1).await.unwrap(), Some(block(1)));
    storage.commit_block(&a, &commit("t2", 2, None, None)).await.unwrap();
    assert_eq!(storage.materialized(&a, 2).await.unwrap(), Some(None));
    assert_eq!(storage.materialized(&a, 1).await.unwrap(), Some(block(1)));

    // A pruned value is gone.
    storage.commit_block(&a, &commit("t3", 3, block(3), Some(2))).await.unwrap();
    assert_eq!(storage.materialized(&a, 2).await.unwrap(), None);
    assert_eq!(storage.materialized(&a, 3).await.unwrap(), Some(block(3)));

    // A refused commit (not past latest) leaves the value as it was.
    let refused = storage.commit_block(&a, &commit("t4", 3, block(4), None)).await;
    assert!(matches!(refused, Err(StorageError::Invalid(_))), "{refused:?}");
    assert_eq!(storage.materialized(&a, 3).await.unwrap(), Some(block(3)));

    // Pends, their removal and metadata writes do not touch it.
    storage.save_pending(&a, &tid("t5"), &Transform::default()).await.unwrap();
    storage.delete_pending(&a, &tid("t5")).await.unwrap();
    storage.write_meta(&[MetaWrite::Put("m".into(), b"v".to_vec())]).await.unwrap();
    assert_eq!(storage.materialized(&a, 3).await.unwrap(), Some(block(3)));

    // Writes to the store underneath are read as they are: other valid bytes, damaged bytes, a
    // deletion.
    let other = serde_json::to_vec(&block(7)).unwrap();
    storage.store().write(&[KvWrite::put(value_key(3), other)], true).unwrap();
    assert_eq!(storage.materialized(&a, 3).await.unwrap(), Some(block(7)));
    storage.store().write(&[KvWrite::put(value_key(3), &b"{not json"[..])], true).unwrap();
    assert!(matches!(storage.materialized(&a, 3).await, Err(StorageError::Corrupt(_))));
    storage.store().write(&[KvWrite::delete(value_key(3))], true).unwrap();
    assert_eq!(storage.materialized(&a, 3).await.unwrap(), None);

    // A later commit is read back again.
    storage.commit_block(&a, &commit("t6", 4, block(4), Some(3))).await.unwrap();
    assert_eq!(storage.materialized(&a, 4).await.unwrap(), Some(block(4)));

    // Closed: no value is answered from the cache.
    storage.close().await.unwrap();
    let closed = storage.materialized(&a, 4).await;
    assert!(matches!(closed, Err(StorageError::Closed { .. })), "{closed:?}");
}

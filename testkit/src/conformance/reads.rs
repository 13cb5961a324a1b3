//! Reads at every old revision, across checkpoint windows, against a model.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde_json::json;

use super::Fixture;
use super::support::{Harness, Tx, bid, set, splice};
use optimystic_core::error::StorageError;
use optimystic_core::model::{Block, BlockId, Transform, Transforms, TrxId, TrxRev};
use optimystic_core::repo::{CHECKPOINT_INTERVAL, StorageRepo};
use optimystic_core::storage::{BlockCommit, BlockValue, CommittedTransform, RawStorage, StorageStats};

/// A [`RawStorage`] that counts the committed transforms read (the transforms a read replays).
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn RawStorage>,
    committed_reads: AtomicU64,
}

#[async_trait]
impl RawStorage for Counting {
    async fn latest(&self, block_id: &BlockId) -> Result<Option<TrxRev>, StorageError> {
        self.inner.latest(block_id).await
    }
    async fn revisions(&self, block_id: &BlockId, from_rev: u64, to_rev: u64) -> Result<Vec<TrxRev>, StorageError> {
        self.inner.revisions(block_id, from_rev, to_rev).await
    }
    async fn revision_at_or_before(&self, block_id: &BlockId, at_rev: u64) -> Result<Option<TrxRev>, StorageError> {
        self.inner.revision_at_or_before(block_id, at_rev).await
    }
    async fn committed(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<CommittedTransform>, StorageError> {
        self.committed_reads.fetch_add(1, Ordering::Relaxed);
        self.inner.committed(block_id, trx_id).await
    }
    async fn pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<Option<Transform>, StorageError> {
        self.inner.pending(block_id, trx_id).await
    }
    async fn pending_trx_ids(&self, block_id: &BlockId) -> Result<Vec<TrxId>, StorageError> {
        self.inner.pending_trx_ids(block_id).await
    }
    async fn save_pending(
        &self,
        block_id: &BlockId,
        trx_id: &TrxId,
        transform: &Transform,
    ) -> Result<(), StorageError> {
        self.inner.save_pending(block_id, trx_id, transform).await
    }
    async fn delete_pending(&self, block_id: &BlockId, trx_id: &TrxId) -> Result<(), StorageError> {
        self.inner.delete_pending(block_id, trx_id).await
    }
    async fn materialized(&self, block_id: &BlockId, rev: u64) -> Result<Option<BlockValue>, StorageError> {
        self.inner.materialized(block_id, rev).await
    }
    async fn commit_block(&self, block_id: &BlockId, commit: &BlockCommit) -> Result<(), StorageError> {
        self.inner.commit_block(block_id, commit).await
    }
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get_meta(key).await
    }
    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.inner.put_meta(key, value).await
    }
    async fn delete_meta(&self, key: &str) -> Result<(), StorageError> {
        self.inner.delete_meta(key).await
    }
    async fn list_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.inner.list_meta(prefix, limit).await
    }
    fn durable(&self) -> bool {
        self.inner.durable()
    }
    async fn block_ids(&self, after: Option<&BlockId>, limit: usize) -> Result<Vec<BlockId>, StorageError> {
        self.inner.block_ids(after, limit).await
    }
    async fn stats(&self) -> Result<Option<StorageStats>, StorageError> {
        self.inner.stats().await
    }
    async fn close(&self) -> Result<(), StorageError> {
        self.inner.close().await
    }
}

/// The transforms of step `i` (1-based) of the history: inserts, appends with occasional trims,
/// sets, a delete every 23 steps followed by a re-insert, and block `s` changed by the same trx
/// (a splice every third step, else a set). Both blocks change at every step: a trx commits at
/// the same revision on all its blocks and revisions are contiguous (SPEC 2 item 7).
fn step_transforms(i: u64, model: &BTreeMap<BlockId, Option<Block>>) -> Transforms {
    let r_value = model.get(&bid("r")).cloned().flatten();
    let mut tx = Tx::new();
    tx = match (&r_value, i % 23) {
        (_, _) if i == 1 => tx.insert("r", json!({"items": [], "n": 0, "note": "first"})),
        (Some(_), 0) => tx.delete("r"),
        (None, _) => tx.insert("r", json!({"items": [i], "n": i, "note": format!("again at {i}")})),
        (Some(value), _) => {
            let len = value.fields.get("items").and_then(|v| v.as_array()).map_or(0, Vec::len) as u64;
            let mut ops = vec![splice("items", len, 0, json!([i, {"step": i}])), set("n", json!(i))];
            if len > 6 {
                ops.push(splice("items", 1, 3, json!([])));
            }
            tx.update("r", ops)
        }
    };
    if i == 1 {
        tx = tx.insert("s", json!({"log": []}));
    } else if i.is_multiple_of(3) {
        tx = tx.update("s", vec![splice("log", 0, 0, json!([format!("s{i}")]))]);
    } else {
        tx = tx.update("s", vec![set("at", json!(i))]);
    }
    tx.build()
}

/// Reads at every revision, over more than three checkpoint windows, with deletes and re-inserts
/// and a second block changed by the same trxs, equal a model; so do reads past `latest`; each
/// read replays a bounded number of transforms; a fresh repo over the same store reads the same.
pub async fn reads_at_every_revision_across_checkpoints(fixture: Fixture) {
    let counting = Arc::new(Counting { inner: fixture.storage.clone(), committed_reads: AtomicU64::new(0) });
    let h = Harness::over(fixture, counting.clone());
    let steps = 3 * CHECKPOINT_INTERVAL + 11;

    // The model: per block, (rev, value) after each commit that touched it.
    let mut current: BTreeMap<BlockId, Option<Block>> = BTreeMap::new();
    let mut history: BTreeMap<BlockId, Vec<(u64, Option<Block>)>> = BTreeMap::new();
    let mut rev = 0u64;
    for i in 1..=steps {
        rev += 1;
        let transforms = step_transforms(i, &current);
        for block_id in transforms.block_ids() {
            let transform = transforms.transform_for(&block_id);
            let before = current.get(&block_id).cloned().flatten();
            let after = transform.apply(before.as_ref(), &block_id).expect("the history's transforms apply");
            current.insert(block_id.clone(), after.clone());
            history.entry(block_id).or_default().push((rev, after));
        }
        h.apply(&format!("h{i:03}"), rev, transforms).await;
    }
    let last_rev = rev;

    let expected_at = |block_id: &BlockId, at: u64| -> Option<Block> {
        history.get(block_id).and_then(|h| h.iter().rev().find(|(r, _)| *r <= at)).and_then(|(_, v)| v.clone())
    };
    let fresh = StorageRepo::new(counting.clone());
    // Bounded replay: a read rebuilds from the last kept value of an earlier window, so it reads at
    // most one window of transforms (plus a little slack for the walk-back).
    let bound = 2 * CHECKPOINT_INTERVAL + 2;
    for id in ["r", "s"] {
        let block_id = bid(id);
        for at in 0..=last_rev + 2 {
            let expected = expected_at(&block_id, at);
            let before = counting.committed_reads.load(std::sync::atomic::Ordering::Relaxed);
            let got = h.value(id, Some(at)).await;
            let replayed = counting.committed_reads.load(std::sync::atomic::Ordering::Relaxed) - before;
            assert_eq!(got, expected, "value of {id} at rev {at}");
            assert!(
                replayed <= bound,
                "a read of {id} at rev {at} replayed {replayed} transforms (more than {bound}): are the \
                 materialized values committed at `rev` kept?"
            );
            let direct = h.repo.value_at(&block_id, at).await.expect("value_at");
            assert_eq!(direct, expected, "StorageRepo::value_at of {id} at {at}");
            let again = fresh.value_at(&block_id, at).await.expect("value_at (fresh repo)");
            assert_eq!(again, expected, "a fresh repo over the same store reads {id} at {at} the same");
        }
    }
    h.check_invariants(&["r", "s"], "after the history").await;
}

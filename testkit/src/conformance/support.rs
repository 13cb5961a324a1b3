//! Helpers shared by the conformance rules: ids, blocks, transforms, a harness over a
//! [`StorageRepo`], state snapshots and the SPEC 2 invariants.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;

use serde_json::{Value, json};

use super::Fixture;
use optimystic_core::error::{RepoError, TransformError};
use optimystic_core::model::{
    Block, BlockGetResult, BlockGets, BlockId, BlockOperation, BlockTrxRef, CommitRequest, CommitResult,
    GetBlockResults, PendPolicy, PendRequest, PendResult, PendSuccess, StaleFailure, Transform, Transforms, TrxBlocks,
    TrxContext, TrxId, TrxRev, TrxTransforms,
};
use optimystic_core::repo::{MessageOptions, Repo, StorageRepo};
use optimystic_core::storage::{BlockValue, CommittedTransform, RawStorage};

/// A block id from a literal.
pub(crate) fn bid(id: &str) -> BlockId {
    BlockId::new(id).expect("test block ids are valid")
}

/// A transaction id from a literal.
pub(crate) fn tid(id: &str) -> TrxId {
    TrxId::new(id).expect("test transaction ids are valid")
}

/// Block ids from literals.
pub(crate) fn bids(ids: &[&str]) -> Vec<BlockId> {
    ids.iter().map(|id| bid(id)).collect()
}

/// No deadline.
pub(crate) fn opts() -> MessageOptions {
    MessageOptions::default()
}

/// A block `{header: {id, type: "test", collectionId: "conformance"}, ...fields}`.
pub(crate) fn block(id: &str, fields: Value) -> Block {
    let Value::Object(fields) = fields else {
        panic!("block fields must be a JSON object, got {fields}");
    };
    let mut block = Block::new(bid(id), "test", "conformance");
    block.fields = fields;
    block
}

/// A splice operation.
pub(crate) fn splice(entity: &str, index: u64, delete_count: u64, items: Value) -> BlockOperation {
    let Value::Array(items) = items else {
        panic!("splice items must be an array, got {items}");
    };
    BlockOperation::splice(entity, index, delete_count, items)
}

/// A set operation.
pub(crate) fn set(entity: &str, value: Value) -> BlockOperation {
    BlockOperation::set(entity, value)
}

/// Builder of a transaction's [`Transforms`].
#[derive(Clone, Debug, Default)]
pub(crate) struct Tx(pub(crate) Transforms);

impl Tx {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn insert(mut self, id: &str, fields: Value) -> Self {
        self.0.inserts.insert(bid(id), block(id, fields));
        self
    }

    pub(crate) fn insert_block(mut self, id: &str, block: Block) -> Self {
        self.0.inserts.insert(bid(id), block);
        self
    }

    pub(crate) fn update(mut self, id: &str, ops: Vec<BlockOperation>) -> Self {
        self.0.updates.insert(bid(id), ops);
        self
    }

    pub(crate) fn delete(mut self, id: &str) -> Self {
        self.0.deletes.push(bid(id));
        self
    }

    pub(crate) fn build(self) -> Transforms {
        self.0
    }
}

/// Which error a repo call gave, for assertions.
pub(crate) fn describe(result: &Result<impl std::fmt::Debug, RepoError>) -> String {
    match result {
        Ok(v) => format!("Ok({v:?})"),
        Err(e) => format!("Err({e:?}: {e})"),
    }
}

/// Asserts an `InvalidTransform` error on `block` with `source`.
#[track_caller]
pub(crate) fn assert_invalid<T: std::fmt::Debug>(
    result: &Result<T, RepoError>,
    block: &str,
    source: &TransformError,
    what: &str,
) {
    match result {
        Err(RepoError::InvalidTransform { block_id, reason: got }) if block_id.as_str() == block && got == source => {}
        other => panic!("{what}: expected InvalidTransform on {block} ({source}), got {}", describe(other)),
    }
}

/// One block's stored state, as the storage reports it.
#[derive(Debug, PartialEq)]
pub(crate) struct BlockSnapshot {
    pub(crate) latest: Option<TrxRev>,
    pub(crate) revisions: Vec<(TrxRev, Option<CommittedTransform>)>,
    pub(crate) pending: Vec<(TrxId, Option<Transform>)>,
    pub(crate) values: Vec<(u64, BlockValue)>,
}

/// The stored state of some blocks plus the engine's block id list.
#[derive(Debug, PartialEq)]
pub(crate) struct Snapshot {
    pub(crate) block_ids: Vec<BlockId>,
    pub(crate) blocks: BTreeMap<BlockId, BlockSnapshot>,
}

/// A [`StorageRepo`] over the fixture's storage, with helpers.
#[derive(Debug)]
pub(crate) struct Harness {
    pub(crate) repo: StorageRepo,
    /// The newest `latest.rev` seen per block, to check it never decreases.
    seen_latest: Mutex<BTreeMap<BlockId, u64>>,
    // Kept last: dropped after the repo.
    _fixture: Fixture,
}

impl Harness {
    pub(crate) fn new(fixture: Fixture) -> Self {
        let repo = StorageRepo::new(fixture.storage.clone());
        Self { repo, seen_latest: Mutex::new(BTreeMap::new()), _fixture: fixture }
    }

    /// A harness whose repo runs over `storage` (a wrapper of the fixture's storage).
    pub(crate) fn over(fixture: Fixture, storage: Arc<dyn RawStorage>) -> Self {
        let repo = StorageRepo::new(storage);
        Self { repo, seen_latest: Mutex::new(BTreeMap::new()), _fixture: fixture }
    }

    pub(crate) fn raw(&self) -> &dyn RawStorage {
        self.repo.storage().as_ref()
    }

    pub(crate) async fn pend(
        &self,
        trx: &str,
        rev: Option<u64>,
        transforms: Transforms,
        policy: PendPolicy,
    ) -> Result<PendResult, RepoError> {
        self.repo.pend(&PendRequest { trx_id: tid(trx), rev, transforms, policy }, &opts()).await
    }

    /// Pends and expects success.
    pub(crate) async fn pend_ok(
        &self,
        trx: &str,
        rev: Option<u64>,
        transforms: Transforms,
        policy: PendPolicy,
    ) -> PendSuccess {
        match self.pend(trx, rev, transforms, policy).await {
            Ok(PendResult::Success(s)) => s,
            other => panic!("pend of {trx} should succeed, got {}", describe(&other)),
        }
    }

    /// Pends and expects a stale answer.
    pub(crate) async fn pend_stale(
        &self,
        trx: &str,
        rev: Option<u64>,
        transforms: Transforms,
        policy: PendPolicy,
    ) -> StaleFailure {
        match self.pend(trx, rev, transforms, policy).await {
            Ok(PendResult::Stale(s)) => s,
            other => panic!("pend of {trx} should be stale, got {}", describe(&other)),
        }
    }

    pub(crate) async fn commit(&self, trx: &str, blocks: &[&str], rev: u64) -> Result<CommitResult, RepoError> {
        let block_ids = bids(blocks);
        let tail_id = block_ids.first().cloned().unwrap_or_else(|| bid("tail"));
        self.repo.commit(&CommitRequest { trx_id: tid(trx), block_ids, rev, tail_id, header_id: None }, &opts()).await
    }

    /// Commits and expects success.
    pub(crate) async fn commit_ok(&self, trx: &str, blocks: &[&str], rev: u64) {
        match self.commit(trx, blocks, rev).await {
            Ok(CommitResult::Success(_)) => {}
            other => panic!("commit of {trx} at {rev} on {blocks:?} should succeed, got {}", describe(&other)),
        }
    }

    /// Commits and expects a stale answer.
    pub(crate) async fn commit_stale(&self, trx: &str, blocks: &[&str], rev: u64) -> StaleFailure {
        match self.commit(trx, blocks, rev).await {
            Ok(CommitResult::Stale(s)) => s,
            other => panic!("commit of {trx} at {rev} on {blocks:?} should be stale, got {}", describe(&other)),
        }
    }

    /// Pends (policy `c`) and commits a transaction on every block it touches.
    pub(crate) async fn apply(&self, trx: &str, rev: u64, transforms: Transforms) {
        let ids: Vec<String> = transforms.block_ids().iter().map(|b| b.to_string()).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        self.pend_ok(trx, Some(rev), transforms, PendPolicy::Continue).await;
        self.commit_ok(trx, &ids, rev).await;
    }

    pub(crate) async fn cancel(&self, trx: &str, blocks: &[&str]) {
        let request = TrxBlocks { trx_id: tid(trx), block_ids: bids(blocks) };
        if let Err(e) = self.repo.cancel(&request, &opts()).await {
            panic!("cancel of {trx} on {blocks:?} should succeed, got {e:?}");
        }
    }

    pub(crate) async fn get(&self, ids: &[&str], context: Option<TrxContext>) -> Result<GetBlockResults, RepoError> {
        self.repo.get(&BlockGets { block_ids: bids(ids), context, read_mode: None }, &opts()).await
    }

    /// Reads one block (at `latest`, or at `rev`) and expects success.
    pub(crate) async fn read_one(&self, id: &str, rev: Option<u64>) -> BlockGetResult {
        let context = rev.map(|rev| TrxContext { committed: Vec::new(), rev, trx_id: None });
        let mut results = match self.get(&[id], context).await {
            Ok(r) => r,
            Err(e) => panic!("get of {id} at {rev:?} should succeed, got {e:?}"),
        };
        assert_eq!(results.len(), 1, "get of one id answers one entry");
        results.remove(&bid(id)).unwrap_or_else(|| panic!("get of {id} must answer for {id}"))
    }

    /// The block's value at `latest` (or at `rev`).
    pub(crate) async fn value(&self, id: &str, rev: Option<u64>) -> Option<Block> {
        self.read_one(id, rev).await.block
    }

    pub(crate) async fn latest(&self, id: &str) -> Option<TrxRev> {
        self.raw().latest(&bid(id)).await.expect("latest")
    }

    pub(crate) async fn pendings(&self, id: &str) -> Vec<TrxId> {
        self.raw().pending_trx_ids(&bid(id)).await.expect("pending_trx_ids")
    }

    /// Everything the storage reports about `ids`.
    pub(crate) async fn snapshot(&self, ids: &[&str]) -> Snapshot {
        snapshot(&self.repo, ids).await
    }

    /// Checks the SPEC 2 commit invariants on `ids` (and that `latest.rev` never decreased since
    /// the last check).
    pub(crate) async fn check_invariants(&self, ids: &[&str], when: &str) {
        for id in ids {
            let block_id = bid(id);
            check_block_invariants(&self.repo, &block_id, when).await;
            if let Some(latest) = self.latest(id).await {
                let mut seen = self.seen_latest.lock().expect("seen_latest");
                let previous = seen.insert(block_id.clone(), latest.rev);
                if let Some(previous) = previous {
                    assert!(
                        latest.rev >= previous,
                        "{when}: latest.rev of {id} went down from {previous} to {}",
                        latest.rev
                    );
                }
            } else {
                let seen = self.seen_latest.lock().expect("seen_latest");
                assert!(!seen.contains_key(&block_id), "{when}: latest of {id} disappeared");
            }
        }
    }
}

/// Everything the storage reports about `ids`.
pub(crate) async fn snapshot(repo: &StorageRepo, ids: &[&str]) -> Snapshot {
    let raw = repo.storage();
    let block_ids = raw.block_ids(None, usize::MAX).await.expect("block_ids");
    let mut blocks = BTreeMap::new();
    for id in ids {
        let block_id = bid(id);
        let latest = raw.latest(&block_id).await.expect("latest");
        let mut revisions = Vec::new();
        let mut values = Vec::new();
        for entry in raw.revisions(&block_id, 0, u64::MAX).await.expect("revisions") {
            let committed = raw.committed(&block_id, &entry.trx_id).await.expect("committed");
            let value = repo.value_at(&block_id, entry.rev).await.expect("value_at");
            values.push((entry.rev, value));
            revisions.push((entry, committed));
        }
        let mut pending = Vec::new();
        for trx_id in raw.pending_trx_ids(&block_id).await.expect("pending_trx_ids") {
            let transform = raw.pending(&block_id, &trx_id).await.expect("pending");
            pending.push((trx_id, transform));
        }
        blocks.insert(block_id, BlockSnapshot { latest, revisions, pending, values });
    }
    Snapshot { block_ids, blocks }
}

/// The SPEC 2 invariants of one block in a quiet store: `latest` is the newest revision of the
/// log and materializable, every revision has its committed transform, no transaction is both
/// pending and committed, pending ids are sorted.
pub(crate) async fn check_block_invariants(repo: &StorageRepo, block_id: &BlockId, when: &str) {
    let raw = repo.storage();
    let latest = raw.latest(block_id).await.expect("latest");
    let log = raw.revisions(block_id, 0, u64::MAX).await.expect("revisions");
    assert_eq!(latest.as_ref(), log.last(), "{when}: latest of {block_id} must be the newest revision of its log");
    for pair in log.windows(2) {
        assert!(pair[0].rev < pair[1].rev, "{when}: revisions of {block_id} must ascend: {log:?}");
    }
    for entry in &log {
        let committed = raw.committed(block_id, &entry.trx_id).await.expect("committed");
        assert_eq!(
            committed.map(|c| c.rev),
            Some(entry.rev),
            "{when}: revision {} of {block_id} names {} which must be committed at that revision",
            entry.rev,
            entry.trx_id
        );
    }
    let pendings = raw.pending_trx_ids(block_id).await.expect("pending_trx_ids");
    let mut sorted = pendings.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(pendings, sorted, "{when}: pending ids of {block_id} must be sorted and distinct");
    for trx_id in &pendings {
        let committed = raw.committed(block_id, trx_id).await.expect("committed");
        assert!(committed.is_none(), "{when}: {trx_id} is both pending and committed on {block_id}");
        let transform = raw.pending(block_id, trx_id).await.expect("pending");
        assert!(transform.is_some(), "{when}: {trx_id} is listed pending on {block_id} but has no transform");
    }
    if let Some(latest) = latest
        && let Err(e) = repo.value_at(block_id, latest.rev).await
    {
        panic!("{when}: latest {latest:?} of {block_id} cannot be materialized: {e}");
    }
}

/// The pending references of a success or stale answer, as `(block, trx, has transform)`.
pub(crate) fn refs(pending: &[BlockTrxRef]) -> Vec<(String, String, Option<Transform>)> {
    pending.iter().map(|p| (p.block_id.to_string(), p.trx_id.to_string(), p.transform.clone())).collect()
}

/// The `missing` of a stale answer as `(trx, rev, transforms)`.
pub(crate) fn missing_of(stale: &StaleFailure) -> Vec<(String, u64, Transforms)> {
    stale
        .missing
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|TrxTransforms { trx_id, rev, transforms }| (trx_id.to_string(), *rev, transforms.clone()))
        .collect()
}

/// The standard block of the pend and commit rules: `{items: [1, 2, 3], name: "x", n: 0}`.
pub(crate) fn base_fields() -> Value {
    json!({"items": [1, 2, 3], "name": "x", "n": 0})
}

/// Inserts `a` at rev 1 (trx `t-base`) with [`base_fields`].
pub(crate) async fn with_base_block(h: &Harness) {
    h.apply("t-base", 1, Tx::new().insert("a", base_fields()).build()).await;
}

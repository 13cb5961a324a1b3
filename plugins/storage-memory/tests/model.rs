//! Random sequences of repo operations on `StorageRepo` over `MemoryStorage`, compared step by step
//! with a straightforward in-memory reference model of SPEC section 2 written here: the answer of
//! every operation (success, stale with its `missing` / `pending`, or the error kind) and the whole
//! stored state after it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use optimystic_core::model::{
    BlockGetResult, BlockGets, BlockTrxRef, BlockTrxState, CommitRequest, CommitResult, GetBlockResults, PendPolicy,
    PendRequest, PendResult, TrxBlocks, TrxContext, TrxTransforms,
};
use optimystic_core::storage::CommittedTransform;
use optimystic_core::{
    Block, BlockId, BlockOperation, MessageOptions, RawStorage, Repo, RepoError, StorageRepo, Transform,
    TransformError, Transforms, TrxId, TrxRev,
};
use optimystic_storage_memory::MemoryStorage;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const BLOCKS: [&str; 3] = ["a", "b", "c"];
const TRXS: [&str; 6] = ["init", "t0", "t1", "t2", "t3", "t4"];
const MAX_REV: u64 = 8;

fn bid(id: &str) -> BlockId {
    BlockId::new(id).unwrap()
}

fn tid(id: &str) -> TrxId {
    TrxId::new(id).unwrap()
}

// =============================================================================================
// The reference model.

/// SPEC 1.1 for one operation.
fn model_op(fields: &mut Map<String, Value>, op: &BlockOperation) -> Result<(), TransformError> {
    let BlockOperation(entity, index, delete_count, inserted) = op;
    if entity == "header" {
        return Err(TransformError::HeaderChange);
    }
    let new_value = match inserted {
        Value::Array(items) => {
            let current = fields.get(entity).ok_or_else(|| TransformError::MissingField { entity: entity.clone() })?;
            let Value::Array(array) = current else {
                return Err(TransformError::NotAnArray { entity: entity.clone() });
            };
            if *index > array.len() as u64 {
                return Err(TransformError::IndexPastEnd { entity: entity.clone(), index: *index, len: array.len() });
            }
            let start = *index as usize;
            let end = start + (*delete_count).min((array.len() - start) as u64) as usize;
            let mut out = array[..start].to_vec();
            out.extend(items.iter().cloned());
            out.extend(array[end..].iter().cloned());
            Value::Array(out)
        }
        other => other.clone(),
    };
    fields.insert(entity.clone(), new_value);
    Ok(())
}

/// Insert, then updates, then delete.
fn model_apply(value: Option<&Block>, t: &Transform, id: &BlockId) -> Result<Option<Block>, TransformError> {
    let mut current = t.insert.clone().or_else(|| value.cloned());
    let updates = t.updates.clone().unwrap_or_default();
    if !updates.is_empty() {
        let block = current.as_mut().ok_or_else(|| TransformError::BlockAbsent { block_id: id.clone() })?;
        let mut fields = block.fields.clone();
        for op in &updates {
            model_op(&mut fields, op)?;
        }
        block.fields = fields;
    }
    if t.delete == Some(true) {
        current = None;
    }
    Ok(current)
}

#[derive(Clone, Debug, Default)]
struct ModelBlock {
    latest: Option<TrxRev>,
    log: BTreeMap<u64, TrxId>,
    committed: BTreeMap<TrxId, (u64, Transform)>,
    pending: BTreeMap<TrxId, Transform>,
    /// The value after every revision.
    values: BTreeMap<u64, Option<Block>>,
}

impl ModelBlock {
    fn value_at(&self, rev: u64) -> Option<Block> {
        self.log.range(..=rev).next_back().and_then(|(r, _)| self.values.get(r).cloned().flatten())
    }

    fn latest_value(&self) -> Option<Block> {
        self.latest.as_ref().and_then(|l| self.value_at(l.rev))
    }

    fn commit(&mut self, trx: &TrxId, rev: u64, t: Transform, value: Option<Block>) {
        self.values.insert(rev, value);
        self.log.insert(rev, trx.clone());
        self.committed.insert(trx.clone(), (rev, t));
        self.pending.remove(trx);
        self.latest = Some(TrxRev { trx_id: trx.clone(), rev });
    }

    /// Committed trxs from `from` on, grouped per trx.
    fn collect_missing(&self, id: &BlockId, from: u64, missing: &mut BTreeMap<TrxId, (u64, Transforms)>) {
        for (rev, trx) in self.log.range(from..) {
            let t = &self.committed[trx].1;
            missing.entry(trx.clone()).or_insert_with(|| (*rev, Transforms::default())).1.add(id, t);
        }
    }
}

fn missing_list(missing: BTreeMap<TrxId, (u64, Transforms)>) -> Vec<TrxTransforms> {
    let mut list: Vec<TrxTransforms> =
        missing.into_iter().map(|(trx_id, (rev, transforms))| TrxTransforms { trx_id, rev, transforms }).collect();
    list.sort_by(|a, b| (a.rev, &a.trx_id).cmp(&(b.rev, &b.trx_id)));
    list
}

/// What an operation answered, in a form both sides produce.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Pended { pending: Vec<BlockTrxRef>, block_ids: Vec<BlockId> },
    Stale { missing: Vec<TrxTransforms>, pending: Vec<BlockTrxRef> },
    Committed,
    Cancelled,
    Got(GetBlockResults),
    Error(ErrorKind),
}

#[derive(Clone, Debug, PartialEq)]
enum ErrorKind {
    Invalid(BlockId, TransformError),
    Unknown(BlockId),
    PendingNotFound(TrxId, BlockId),
    Conflict(TrxId, BlockId),
    AlreadyCommitted(TrxId, BlockId),
    BadRequest,
    Other(String),
}

impl From<RepoError> for ErrorKind {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::InvalidTransform { block_id, reason } => Self::Invalid(block_id, reason),
            RepoError::UnknownBlock(id) => Self::Unknown(id),
            RepoError::PendingNotFound { trx_id, block_id } => Self::PendingNotFound(trx_id, block_id),
            RepoError::TrxConflict { trx_id, block_id } => Self::Conflict(trx_id, block_id),
            RepoError::AlreadyCommitted { trx_id, block_id } => Self::AlreadyCommitted(trx_id, block_id),
            RepoError::BadRequest(_) => Self::BadRequest,
            other => Self::Other(other.to_string()),
        }
    }
}

#[derive(Debug, Default)]
struct Model {
    blocks: BTreeMap<BlockId, ModelBlock>,
}

impl Model {
    fn block(&mut self, id: &BlockId) -> &mut ModelBlock {
        self.blocks.entry(id.clone()).or_default()
    }

    fn pend(&mut self, req: &PendRequest) -> Outcome {
        let ids: Vec<BlockId> = req
            .transforms
            .inserts
            .keys()
            .chain(req.transforms.updates.keys())
            .chain(&req.transforms.deletes)
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if ids.is_empty() {
            return Outcome::Error(ErrorKind::BadRequest);
        }
        let per: Vec<(BlockId, Transform)> =
            ids.iter().map(|id| (id.clone(), req.transforms.transform_for(id))).collect();
        let trx = &req.trx_id;
        // 1. shape
        for (id, t) in &per {
            if let Some(b) = &t.insert
                && b.header.id != *id
            {
                let e = TransformError::InsertIdMismatch { key: id.clone(), header_id: b.header.id.clone() };
                return Outcome::Error(ErrorKind::Invalid(id.clone(), e));
            }
            if t.updates.iter().flatten().any(|op| op.0 == "header") {
                return Outcome::Error(ErrorKind::Invalid(id.clone(), TransformError::HeaderChange));
            }
        }
        // 2. unknown blocks
        for (id, t) in &per {
            if self.block(id).latest.is_none() && t.insert.is_none() {
                return Outcome::Error(ErrorKind::Unknown(id.clone()));
            }
        }
        // 3. re-pend
        let mut same = 0;
        for (id, t) in &per {
            let b = self.block(id);
            if b.committed.contains_key(trx) {
                return Outcome::Error(ErrorKind::AlreadyCommitted(trx.clone(), id.clone()));
            }
            match b.pending.get(trx) {
                Some(existing) if existing == t => same += 1,
                Some(_) => return Outcome::Error(ErrorKind::Conflict(trx.clone(), id.clone())),
                None => {}
            }
        }
        let others = |model: &mut Model, with: bool| -> Vec<BlockTrxRef> {
            let mut out = Vec::new();
            for id in &ids {
                for (other, t) in &model.block(id).pending {
                    if other != trx {
                        out.push(BlockTrxRef {
                            block_id: id.clone(),
                            trx_id: other.clone(),
                            transform: with.then(|| t.clone()),
                        });
                    }
                }
            }
            out
        };
        if same == per.len() {
            return Outcome::Pended { pending: others(self, false), block_ids: ids };
        }
        // 4. staleness
        let mut missing = BTreeMap::new();
        for (id, t) in &per {
            let b = self.block(id).clone();
            if let Some(latest) = &b.latest
                && (req.rev.is_some() || t.insert.is_some())
            {
                let from = req.rev.unwrap_or(0);
                if latest.rev >= from {
                    b.collect_missing(id, from, &mut missing);
                }
            }
        }
        if !missing.is_empty() {
            return Outcome::Stale { missing: missing_list(missing), pending: Vec::new() };
        }
        // 5. transforms apply to the current values
        for (id, t) in &per {
            let current = self.block(id).latest_value();
            if let Err(e) = model_apply(current.as_ref(), t, id) {
                return Outcome::Error(ErrorKind::Invalid(id.clone(), e));
            }
        }
        // 6. policy
        let pending = others(self, req.policy == PendPolicy::Return);
        if !pending.is_empty() && req.policy != PendPolicy::Continue {
            return Outcome::Stale { missing: Vec::new(), pending };
        }
        for (id, t) in per {
            self.block(&id).pending.insert(trx.clone(), t);
        }
        Outcome::Pended { pending, block_ids: ids }
    }

    fn commit(&mut self, req: &CommitRequest) -> Outcome {
        let ids: BTreeSet<BlockId> = req.block_ids.iter().cloned().collect();
        if ids.is_empty() {
            return Outcome::Error(ErrorKind::BadRequest);
        }
        let (trx, rev) = (&req.trx_id, req.rev);
        let mut missing = BTreeMap::new();
        let mut to_commit = Vec::new();
        for id in &ids {
            let b = self.block(id).clone();
            let latest_rev = b.latest.as_ref().map_or(0, |l| l.rev);
            match b.committed.get(trx) {
                // Already committed here at `rev`: done on this block.
                Some((done, _)) if *done == rev => {}
                // Committed here at another revision: stale, `missing` from the older of the two
                // revisions on (it names the trx itself). This is StorageRepo's rule; SPEC 2
                // commit.3 read literally would answer PendingNotFound when `latest.rev < rev`.
                Some((done, _)) => b.collect_missing(id, rev.min(*done), &mut missing),
                None if b.latest.is_some() && latest_rev >= rev => b.collect_missing(id, rev, &mut missing),
                None => to_commit.push((id.clone(), latest_rev)),
            }
        }
        if !missing.is_empty() {
            return Outcome::Stale { missing: missing_list(missing), pending: Vec::new() };
        }
        // SPEC 2 item 7: revisions are contiguous; a block not at `rev - 1` is a revision gap.
        if to_commit.iter().any(|(_, latest_rev)| latest_rev + 1 < rev) {
            return Outcome::Error(ErrorKind::BadRequest);
        }
        let to_commit: Vec<BlockId> = to_commit.into_iter().map(|(id, _)| id).collect();
        let mut steps = Vec::new();
        for id in &to_commit {
            let Some(t) = self.block(id).pending.get(trx).cloned() else {
                return Outcome::Error(ErrorKind::PendingNotFound(trx.clone(), id.clone()));
            };
            steps.push((id.clone(), t));
        }
        let mut values = Vec::new();
        for (id, t) in &steps {
            let current = self.block(id).latest_value();
            match model_apply(current.as_ref(), t, id) {
                Ok(v) => values.push(v),
                Err(e) => return Outcome::Error(ErrorKind::Invalid(id.clone(), e)),
            }
        }
        for ((id, t), value) in steps.into_iter().zip(values) {
            self.block(&id).commit(trx, rev, t, value);
        }
        Outcome::Committed
    }

    fn cancel(&mut self, req: &TrxBlocks) -> Outcome {
        for id in &req.block_ids {
            self.block(id).pending.remove(&req.trx_id);
        }
        Outcome::Cancelled
    }

    fn get(&mut self, gets: &BlockGets) -> Outcome {
        let ids: BTreeSet<BlockId> = gets.block_ids.iter().cloned().collect();
        let mut results = GetBlockResults::new();
        for id in ids {
            if let Some(ctx) = &gets.context {
                let mut reported: Vec<&TrxRev> = ctx.committed.iter().collect();
                reported.sort_by_key(|t| t.rev); // stable
                for entry in reported {
                    let b = self.block(&id);
                    let latest_rev = b.latest.as_ref().map_or(0, |l| l.rev);
                    if b.latest.is_some() && latest_rev >= entry.rev {
                        continue;
                    }
                    let Some(t) = b.pending.get(&entry.trx_id).cloned() else { continue };
                    // SPEC 2 item 7: never promoted over a revision gap.
                    if latest_rev + 1 != entry.rev {
                        continue;
                    }
                    if let Ok(value) = model_apply(b.latest_value().as_ref(), &t, &id) {
                        b.commit(&entry.trx_id, entry.rev, t, value);
                    }
                }
            }
            let b = self.block(&id).clone();
            let mut block = match (&gets.context, &b.latest) {
                (_, None) => None,
                (Some(ctx), Some(latest)) if ctx.rev < latest.rev => b.value_at(ctx.rev),
                (_, Some(latest)) => b.value_at(latest.rev),
            };
            if let Some(trx) = gets.context.as_ref().and_then(|c| c.trx_id.as_ref()) {
                let Some(t) = b.pending.get(trx) else {
                    return Outcome::Error(ErrorKind::PendingNotFound(trx.clone(), id));
                };
                match model_apply(block.as_ref(), t, &id) {
                    Ok(v) => block = v,
                    Err(e) => return Outcome::Error(ErrorKind::Invalid(id, e)),
                }
            }
            let state = BlockTrxState { latest: b.latest.clone(), pendings: b.pending.keys().cloned().collect() };
            results.insert(id, BlockGetResult { block, state });
        }
        Outcome::Got(results)
    }

    fn max_latest(&self, ids: &[BlockId]) -> u64 {
        ids.iter().filter_map(|id| self.blocks.get(id)?.latest.as_ref().map(|l| l.rev)).max().unwrap_or(0)
    }

    /// The `n`-th (modulo) trx pending on some block, if any.
    fn nth_pending(&self, n: usize) -> Option<TrxId> {
        let trxs: Vec<&TrxId> =
            self.blocks.values().flat_map(|b| b.pending.keys()).collect::<BTreeSet<_>>().into_iter().collect();
        if trxs.is_empty() {
            return None;
        }
        trxs.get(n % trxs.len()).map(|t| (*t).clone())
    }

    fn pending_blocks_of(&self, trx: &TrxId) -> Vec<BlockId> {
        self.blocks.iter().filter(|(_, b)| b.pending.contains_key(trx)).map(|(id, _)| id.clone()).collect()
    }
}

// =============================================================================================
// Operations and their strategies.

#[derive(Clone, Debug)]
enum Rev {
    Fixed(u64),
    /// `max(latest.rev) + 1` over the blocks concerned, at the time of the operation.
    Next,
}

#[derive(Clone, Debug)]
enum Blocks {
    These(Vec<BlockId>),
    /// The blocks the trx is pending on in the model (or `a` when none).
    PendingOf,
}

#[derive(Clone, Debug)]
enum Trx {
    Fixed(TrxId),
    /// The n-th trx pending in the model (or `t0` when none).
    Pending(usize),
}

/// A read context to build: revision, own trx, reported commits.
type ContextSpec = (Rev, Option<TrxId>, Vec<(TrxId, Rev)>);

#[derive(Clone, Debug)]
enum Op {
    Pend { trx: TrxId, rev: Option<Rev>, transforms: Transforms, policy: PendPolicy },
    Commit { trx: Trx, blocks: Blocks, rev: Rev },
    Cancel { trx: TrxId, blocks: Blocks },
    Get { blocks: Vec<BlockId>, context: Option<ContextSpec> },
}

fn block_id() -> impl Strategy<Value = BlockId> {
    prop::sample::select(BLOCKS.to_vec()).prop_map(bid)
}

fn trx_id() -> impl Strategy<Value = TrxId> {
    prop::sample::select(TRXS.to_vec()).prop_map(tid)
}

fn rev() -> impl Strategy<Value = Rev> {
    prop_oneof![3 => Just(Rev::Next), 2 => (0..=MAX_REV).prop_map(Rev::Fixed)]
}

fn small_int() -> impl Strategy<Value = Value> {
    (0..4i64).prop_map(|n| json!(n))
}

fn operation() -> impl Strategy<Value = BlockOperation> {
    prop_oneof![
        4 => small_int().prop_map(|v| BlockOperation::set("n", v)),
        6 => (0..5u64, 0..3u64, prop::collection::vec(small_int(), 0..3))
            .prop_map(|(i, d, items)| BlockOperation::splice("items", i, d, items)),
        1 => Just(BlockOperation::set("missing", json!(1))),
        1 => Just(BlockOperation::splice("n", 0, 0, vec![json!(1)])),
    ]
}

fn inserted(id: BlockId) -> impl Strategy<Value = Block> {
    (prop::collection::vec(small_int(), 0..4), small_int(), any::<bool>(), prop::bool::weighted(0.05)).prop_map(
        move |(items, n, with_items, mismatch)| {
            let header_id = if mismatch { bid("zz") } else { id.clone() };
            let mut block = Block::new(header_id, "t", "c").with_field("n", n);
            if with_items {
                block = block.with_field("items", Value::Array(items));
            }
            block
        },
    )
}

fn transform_for(id: BlockId) -> impl Strategy<Value = Transform> {
    prop_oneof![
        6 => prop::collection::vec(operation(), 1..3)
            .prop_map(|ops| Transform { updates: Some(ops), ..Transform::default() }),
        3 => (inserted(id.clone()), prop::option::weighted(0.3, prop::collection::vec(operation(), 1..3)))
            .prop_map(|(b, updates)| Transform { insert: Some(b), updates, delete: None }),
        1 => Just(Transform { delete: Some(true), ..Transform::default() }),
    ]
}

fn transforms() -> impl Strategy<Value = Transforms> {
    prop_oneof![
        1 => Just(Transforms::single(&bid("a"), &Transform {
            updates: Some(vec![BlockOperation::set("header", json!(null))]),
            ..Transform::default()
        })),
        30 => prop::sample::subsequence(BLOCKS.to_vec(), 1..=2).prop_flat_map(|ids| {
            let per: Vec<_> = ids.into_iter().map(|id| transform_for(bid(id)).prop_map(move |t| (bid(id), t))).collect();
            per.prop_map(|pairs| {
                let mut transforms = Transforms::default();
                for (id, t) in &pairs {
                    transforms.add(id, t);
                }
                transforms
            })
        }),
        1 => Just(Transforms::default()),
    ]
}

fn blocks() -> impl Strategy<Value = Blocks> {
    prop_oneof![
        3 => Just(Blocks::PendingOf),
        2 => prop::collection::vec(block_id(), 1..4).prop_map(Blocks::These),
        1 => Just(Blocks::These(Vec::new())),
    ]
}

fn policy() -> impl Strategy<Value = PendPolicy> {
    prop_oneof![4 => Just(PendPolicy::Continue), 1 => Just(PendPolicy::Fail), 1 => Just(PendPolicy::Return)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (trx_id(), prop::option::weighted(0.7, rev()), transforms(), policy())
            .prop_map(|(trx, rev, transforms, policy)| Op::Pend { trx, rev, transforms, policy }),
        5 => (prop_oneof![3 => any::<usize>().prop_map(Trx::Pending), 1 => trx_id().prop_map(Trx::Fixed)], blocks(), rev())
            .prop_map(|(trx, blocks, rev)| Op::Commit { trx, blocks, rev }),
        1 => (trx_id(), blocks()).prop_map(|(trx, blocks)| Op::Cancel { trx, blocks }),
        3 => (
            prop::collection::vec(block_id(), 0..4),
            prop::option::weighted(
                0.7,
                (rev(), prop::option::weighted(0.3, trx_id()), prop::collection::vec((trx_id(), rev()), 0..3)),
            ),
        )
            .prop_map(|(blocks, context)| Op::Get { blocks, context }),
    ]
}

// =============================================================================================
// Running a sequence.

fn resolve_rev(model: &Model, rev: &Rev, ids: &[BlockId]) -> u64 {
    match rev {
        Rev::Fixed(r) => *r,
        Rev::Next => model.max_latest(ids) + 1,
    }
}

fn resolve_blocks(model: &Model, trx: &TrxId, blocks: &Blocks) -> Vec<BlockId> {
    match blocks {
        Blocks::These(ids) => ids.clone(),
        Blocks::PendingOf => {
            let ids = model.pending_blocks_of(trx);
            if ids.is_empty() { vec![bid("a")] } else { ids }
        }
    }
}

async fn run_op(repo: &StorageRepo, model: &mut Model, op: &Op) -> (String, Outcome, Outcome) {
    let options = MessageOptions::default();
    match op {
        Op::Pend { trx, rev, transforms, policy } => {
            let ids = transforms.block_ids();
            let rev = rev.as_ref().map(|r| resolve_rev(model, r, &ids));
            let req = PendRequest { trx_id: trx.clone(), rev, transforms: transforms.clone(), policy: *policy };
            let got = match repo.pend(&req, &options).await {
                Ok(PendResult::Success(s)) => Outcome::Pended { pending: s.pending, block_ids: s.block_ids },
                Ok(PendResult::Stale(s)) => {
                    Outcome::Stale { missing: s.missing.unwrap_or_default(), pending: s.pending.unwrap_or_default() }
                }
                Err(e) => Outcome::Error(e.into()),
            };
            (format!("{req:?}"), got, model.pend(&req))
        }
        Op::Commit { trx, blocks, rev } => {
            let trx = &match trx {
                Trx::Fixed(t) => t.clone(),
                Trx::Pending(n) => model.nth_pending(*n).unwrap_or_else(|| tid("t0")),
            };
            let ids = resolve_blocks(model, trx, blocks);
            let rev = resolve_rev(model, rev, &ids);
            let req = CommitRequest {
                trx_id: trx.clone(),
                block_ids: ids.clone(),
                rev,
                tail_id: ids.first().cloned().unwrap_or_else(|| bid("a")),
                header_id: None,
            };
            let got = match repo.commit(&req, &options).await {
                Ok(CommitResult::Success(_)) => Outcome::Committed,
                Ok(CommitResult::Stale(s)) => {
                    Outcome::Stale { missing: s.missing.unwrap_or_default(), pending: s.pending.unwrap_or_default() }
                }
                Err(e) => Outcome::Error(e.into()),
            };
            (format!("{req:?}"), got, model.commit(&req))
        }
        Op::Cancel { trx, blocks } => {
            let req = TrxBlocks { trx_id: trx.clone(), block_ids: resolve_blocks(model, trx, blocks) };
            let got = match repo.cancel(&req, &options).await {
                Ok(()) => Outcome::Cancelled,
                Err(e) => Outcome::Error(e.into()),
            };
            (format!("{req:?}"), got, model.cancel(&req))
        }
        Op::Get { blocks, context } => {
            let context = context.as_ref().map(|(rev, trx, committed)| TrxContext {
                rev: resolve_rev(model, rev, blocks),
                trx_id: trx.clone(),
                committed: committed
                    .iter()
                    .map(|(t, r)| TrxRev { trx_id: t.clone(), rev: resolve_rev(model, r, blocks) })
                    .collect(),
            });
            let gets = BlockGets { block_ids: blocks.clone(), context, read_mode: None };
            let got = match repo.get(&gets, &options).await {
                Ok(results) => Outcome::Got(results),
                Err(e) => Outcome::Error(e.into()),
            };
            (format!("{gets:?}"), got, model.get(&gets))
        }
    }
}

/// The stored state of every block, from the storage and the model, in one comparable shape.
/// Per trx: its committed and pending transform on a block.
type TrxState = (TrxId, Option<CommittedTransform>, Option<Transform>);
/// Per block: latest, revision log, trx states, values at revisions 0..=max.
type BlockState = (BlockId, Option<TrxRev>, Vec<TrxRev>, Vec<TrxState>, Vec<Option<Block>>);

#[derive(Debug, PartialEq)]
struct State {
    block_ids: Vec<BlockId>,
    blocks: Vec<BlockState>,
}

async fn storage_state(repo: &StorageRepo, max_rev: u64) -> State {
    let raw = repo.storage();
    let mut blocks = Vec::new();
    for id in BLOCKS.map(bid) {
        let latest = raw.latest(&id).await.unwrap();
        let log = raw.revisions(&id, 0, u64::MAX).await.unwrap();
        let mut trxs = Vec::new();
        for trx in TRXS.map(tid) {
            trxs.push((trx.clone(), raw.committed(&id, &trx).await.unwrap(), raw.pending(&id, &trx).await.unwrap()));
        }
        let mut values = Vec::new();
        for rev in 0..=max_rev {
            values.push(repo.value_at(&id, rev).await.unwrap());
        }
        blocks.push((id, latest, log, trxs, values));
    }
    State { block_ids: raw.block_ids(None, usize::MAX).await.unwrap(), blocks }
}

fn model_state(model: &Model, max_rev: u64) -> State {
    let empty = ModelBlock::default();
    let mut blocks = Vec::new();
    for id in BLOCKS.map(bid) {
        let b = model.blocks.get(&id).unwrap_or(&empty);
        let log = b.log.iter().map(|(rev, trx)| TrxRev { trx_id: trx.clone(), rev: *rev }).collect();
        let trxs = TRXS
            .map(tid)
            .into_iter()
            .map(|trx| {
                let committed =
                    b.committed.get(&trx).map(|(rev, t)| CommittedTransform { rev: *rev, transform: t.clone() });
                let pending = b.pending.get(&trx).cloned();
                (trx, committed, pending)
            })
            .collect();
        let values = (0..=max_rev).map(|rev| b.value_at(rev)).collect();
        blocks.push((id, b.latest.clone(), log, trxs, values));
    }
    let block_ids = model
        .blocks
        .iter()
        .filter(|(_, b)| b.latest.is_some() || !b.pending.is_empty())
        .map(|(id, _)| id.clone())
        .collect();
    State { block_ids, blocks }
}

/// Runs the init prefix then `ops`, comparing each answer and the state after it with the model;
/// returns the answers to `ops`.
fn run_sequence(ops: Vec<Op>) -> Result<Vec<Outcome>, TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(async {
        let storage: Arc<dyn RawStorage> = Arc::new(MemoryStorage::new());
        let repo = StorageRepo::new(storage);
        let mut model = Model::default();
        // Every sequence starts with `a` and `b` committed at rev 1.
        let init =
            |id: &str| Block::new(bid(id), "t", "c").with_field("items", json!([0, 1])).with_field("n", json!(0));
        let mut transforms = Transforms::default();
        transforms.inserts.insert(bid("a"), init("a"));
        transforms.inserts.insert(bid("b"), init("b"));
        let prefix = [
            Op::Pend { trx: tid("init"), rev: Some(Rev::Fixed(1)), transforms, policy: PendPolicy::Fail },
            Op::Commit { trx: Trx::Fixed(tid("init")), blocks: Blocks::PendingOf, rev: Rev::Fixed(1) },
        ];
        let mut answers = Vec::new();
        for (step, op) in prefix.iter().chain(&ops).enumerate() {
            let (request, got, expected) = run_op(&repo, &mut model, op).await;
            prop_assert_eq!(&got, &expected, "step {}: {}", step, request);
            let max_rev = model.blocks.values().filter_map(|b| b.latest.as_ref().map(|l| l.rev)).max().unwrap_or(0) + 1;
            let stored = storage_state(&repo, max_rev.max(MAX_REV + 1)).await;
            let modelled = model_state(&model, max_rev.max(MAX_REV + 1));
            prop_assert_eq!(stored, modelled, "state after step {}: {}", step, request);
            if step >= prefix.len() {
                answers.push(got);
            }
        }
        Ok(answers)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    /// Random sequences of pend / commit / cancel / get agree with the reference model, answer by
    /// answer and state by state.
    #[test]
    fn repo_matches_reference_model(ops in prop::collection::vec(op(), 1..40)) {
        run_sequence(ops).map(|_| ())?;
    }
}

/// The run is not vacuous: a sequence that must commit does, a revision gap is refused (SPEC 2
/// item 7), and the model agrees.
#[test]
fn a_known_sequence_commits() {
    let t = |ops: Vec<BlockOperation>| Transform { updates: Some(ops), ..Transform::default() };
    let insert = Transform {
        insert: Some(Block::new(bid("c"), "t", "c").with_field("items", json!([]))),
        ..Transform::default()
    };
    let ops = vec![
        Op::Pend {
            trx: tid("t0"),
            rev: Some(Rev::Next),
            transforms: Transforms::single(&bid("c"), &insert),
            policy: PendPolicy::Fail,
        },
        // c is new (revision 0): a commit at 2 is a gap, at 1 it commits.
        Op::Commit { trx: Trx::Fixed(tid("t0")), blocks: Blocks::PendingOf, rev: Rev::Fixed(2) },
        Op::Commit { trx: Trx::Fixed(tid("t0")), blocks: Blocks::PendingOf, rev: Rev::Fixed(1) },
        Op::Pend {
            trx: tid("t1"),
            rev: Some(Rev::Next),
            transforms: Transforms::single(&bid("c"), &t(vec![BlockOperation::splice("items", 0, 0, vec![json!(1)])])),
            policy: PendPolicy::Continue,
        },
        Op::Commit { trx: Trx::Pending(0), blocks: Blocks::PendingOf, rev: Rev::Next },
        Op::Get { blocks: vec![bid("c")], context: Some((Rev::Fixed(1), None, vec![])) },
        // a (at 1) and c (at 2) together: the next revision of the pair, 3, is a gap on a.
        Op::Pend {
            trx: tid("t2"),
            rev: None,
            transforms: {
                let mut both = Transforms::single(&bid("a"), &t(vec![BlockOperation::set("n", json!(2))]));
                both.add(&bid("c"), &t(vec![BlockOperation::set("fresh", json!(2))]));
                both
            },
            policy: PendPolicy::Continue,
        },
        Op::Commit { trx: Trx::Fixed(tid("t2")), blocks: Blocks::PendingOf, rev: Rev::Next },
    ];
    let answers = run_sequence(ops).unwrap();
    assert!(matches!(&answers[0], Outcome::Pended { .. }), "{:?}", answers[0]);
    assert_eq!(answers[1], Outcome::Error(ErrorKind::BadRequest), "c at 0, commit at 2");
    assert_eq!(answers[2], Outcome::Committed);
    assert!(matches!(&answers[3], Outcome::Pended { .. }), "{:?}", answers[3]);
    assert_eq!(answers[4], Outcome::Committed);
    assert!(matches!(&answers[5], Outcome::Got(_)), "{:?}", answers[5]);
    assert!(matches!(&answers[6], Outcome::Pended { .. }), "{:?}", answers[6]);
    assert_eq!(answers[7], Outcome::Error(ErrorKind::BadRequest), "a at 1, c at 2, commit at 3");
}

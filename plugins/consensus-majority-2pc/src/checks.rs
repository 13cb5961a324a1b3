//! Promise-time checks: what a record claims, which claims conflict, and whether the operation
//! would go through against local storage (SPEC 4.2), without applying anything.
//!
//! Reject reasons start with a category the coordinator maps to the client's answer:
//! `stale:` (a `StaleFailure`, computed here and returned next to the vote), `behind:` (this member
//! lacks state the operation needs), `invalid:` (the operation cannot apply), `conflict:` (another
//! record holds a reservation), `busy:` (too many reservations).

use std::collections::{BTreeMap, BTreeSet};

use optimystic_core::model::{BlockTrxRef, PendPolicy, StaleFailure, TrxTransforms};
use optimystic_core::wire::RepoOperation;
use optimystic_core::{BlockId, RepoError, StorageError, StorageRepo, Transforms, TrxId};
use serde_json::Value;

/// Reason prefix of a stale rejection.
pub(crate) const STALE: &str = "stale";
/// Reason prefix of an invalid-operation rejection.
pub(crate) const INVALID: &str = "invalid";

/// What an operation does to one block, for conflict detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claim {
    pub block_id: BlockId,
    pub trx_id: TrxId,
    pub kind: ClaimKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimKind {
    Pend,
    Commit { rev: u64 },
    Cancel,
}

impl Claim {
    /// Whether two claims on the same block may not hold reservations at once: records of
    /// different transactions always conflict; for one transaction, a pend conflicts with nothing,
    /// a commit conflicts with a cancel and with a commit at another revision.
    pub fn conflicts_with(&self, other: &Claim) -> bool {
        if self.block_id != other.block_id {
            return false;
        }
        if self.trx_id != other.trx_id {
            return true;
        }
        match (self.kind, other.kind) {
            (ClaimKind::Pend, _) | (_, ClaimKind::Pend) | (ClaimKind::Cancel, ClaimKind::Cancel) => false,
            (ClaimKind::Commit { rev: a }, ClaimKind::Commit { rev: b }) => a != b,
            (ClaimKind::Commit { .. }, ClaimKind::Cancel) | (ClaimKind::Cancel, ClaimKind::Commit { .. }) => true,
        }
    }
}

/// The claims of an operation, one per distinct block. A `get` claims nothing.
pub(crate) fn claims(operation: &RepoOperation) -> Vec<Claim> {
    let (trx_id, kind, blocks): (&TrxId, ClaimKind, Vec<BlockId>) = match operation {
        RepoOperation::Get(_) => return Vec::new(),
        RepoOperation::Pend(p) => (&p.trx_id, ClaimKind::Pend, p.transforms.block_ids()),
        RepoOperation::Commit(c) => (&c.trx_id, ClaimKind::Commit { rev: c.rev }, c.block_ids.clone()),
        RepoOperation::Cancel { trx_ref } => (&trx_ref.trx_id, ClaimKind::Cancel, trx_ref.block_ids.clone()),
    };
    let distinct: BTreeSet<BlockId> = blocks.into_iter().collect();
    distinct.into_iter().map(|block_id| Claim { block_id, trx_id: trx_id.clone(), kind }).collect()
}

/// The outcome of checking an operation against local storage.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Check {
    Approve,
    /// Reject, with the reason to sign and, for staleness, the `StaleFailure` to return.
    Reject { reason: String, stale: Option<Value> },
}

fn reject(category: &str, detail: impl std::fmt::Display) -> Check {
    Check::Reject { reason: format!("{category}: {detail}"), stale: None }
}

fn stale(detail: impl std::fmt::Display, failure: StaleFailure) -> Result<Check, RepoError> {
    let value = serde_json::to_value(&failure).map_err(|e| RepoError::Internal(format!("encoding a stale answer: {e}")))?;
    Ok(Check::Reject { reason: format!("{STALE}: {detail}"), stale: Some(value) })
}

/// Committed transactions of a block with `from_rev <= rev <= to_rev`, grouped per transaction.
async fn collect_missing(
    local: &StorageRepo,
    block_id: &BlockId,
    from_rev: u64,
    to_rev: u64,
    missing: &mut BTreeMap<TrxId, (u64, Transforms)>,
) -> Result<(), RepoError> {
    let storage = local.storage();
    for entry in storage.revisions(block_id, from_rev, to_rev).await? {
        let committed = storage.committed(block_id, &entry.trx_id).await?.ok_or_else(|| {
            StorageError::Corrupt(format!("revision {} of {block_id} has no committed transform", entry.rev))
        })?;
        let slot = missing.entry(entry.trx_id.clone()).or_insert_with(|| (entry.rev, Transforms::default()));
        slot.1.add(block_id, &committed.transform);
    }
    Ok(())
}

fn missing_list(missing: BTreeMap<TrxId, (u64, Transforms)>) -> Vec<TrxTransforms> {
    let mut list: Vec<TrxTransforms> =
        missing.into_iter().map(|(trx_id, (rev, transforms))| TrxTransforms { trx_id, rev, transforms }).collect();
    list.sort_by(|a, b| a.rev.cmp(&b.rev).then_with(|| a.trx_id.cmp(&b.trx_id)));
    list
}

/// Would `operation` go through here? Reads local storage only.
pub(crate) async fn check_operation(local: &StorageRepo, operation: &RepoOperation) -> Result<Check, RepoError> {
    match operation {
        RepoOperation::Get(_) => Ok(reject(INVALID, "a get is not agreed by consensus")),
        RepoOperation::Cancel { .. } => Ok(Check::Approve),
        RepoOperation::Pend(request) => check_pend(local, request).await,
        RepoOperation::Commit(request) => check_commit(local, request).await,
    }
}

async fn check_pend(local: &StorageRepo, request: &optimystic_core::PendRequest) -> Result<Check, RepoError> {
    let storage = local.storage();
    let block_ids = request.transforms.block_ids();
    if block_ids.is_empty() {
        return Ok(reject(INVALID, "the pend touches no block"));
    }
    let trx_id = &request.trx_id;
    let mut missing = BTreeMap::new();
    let mut already_pending = 0usize;
    let mut latests = Vec::with_capacity(block_ids.len());
    for block_id in &block_ids {
        let transform = request.transforms.transform_for(block_id);
        if let Err(e) = transform.validate_shape(block_id) {
            return Ok(reject(INVALID, format_args!("block {block_id}: {e}")));
        }
        let latest = storage.latest(block_id).await?;
        if latest.is_none() && !transform.inserts() {
            return Ok(reject("behind", format_args!("unknown block {block_id}")));
        }
        if let Some(done) = storage.committed(block_id, trx_id).await? {
            collect_missing(local, block_id, done.rev, done.rev, &mut missing).await?;
            let failure = StaleFailure { reason: Some("already committed".into()), missing: Some(missing_list(missing)), ..StaleFailure::default() };
            return stale(format_args!("transaction {trx_id} is already committed on {block_id}"), failure);
        }
        match storage.pending(block_id, trx_id).await? {
            Some(existing) if existing == transform => already_pending += 1,
            Some(_) => {
                return Ok(reject(INVALID, format_args!("transaction {trx_id} is pending on {block_id} with other transforms")));
            }
            None => {}
        }
        if let Some(latest) = &latest
            && (request.rev.is_some() || transform.inserts())
        {
            let from = request.rev.unwrap_or(0);
            if latest.rev >= from {
                collect_missing(local, block_id, from, latest.rev, &mut missing).await?;
            }
        }
        latests.push((block_id, transform, latest));
    }
    if already_pending == block_ids.len() {
        return Ok(Check::Approve);
    }
    if !missing.is_empty() {
        let failure = StaleFailure { reason: Some("stale revision".into()), missing: Some(missing_list(missing)), ..StaleFailure::default() };
        return stale("the blocks moved past the requested revision", failure);
    }
    for (block_id, transform, latest) in &latests {
        let current = match latest {
            Some(_) => local.latest_value(block_id).await?.1,
            None => None,
        };
        if let Err(e) = transform.apply(current.as_ref(), block_id) {
            return Ok(reject(INVALID, format_args!("block {block_id}: {e}")));
        }
    }
    if request.policy != PendPolicy::Continue {
        let with_transforms = request.policy == PendPolicy::Return;
        let mut pending = Vec::new();
        for block_id in &block_ids {
            for other in storage.pending_trx_ids(block_id).await? {
                if other == *trx_id {
                    continue;
                }
                let transform = if with_transforms { storage.pending(block_id, &other).await? } else { None };
                pending.push(BlockTrxRef { block_id: block_id.clone(), trx_id: other, transform });
            }
        }
        if !pending.is_empty() {
            let failure = StaleFailure { reason: Some("other transactions are pending".into()), pending: Some(pending), ..StaleFailure::default() };
            return stale("other transactions are pending", failure);
        }
    }
    Ok(Check::Approve)
}

async fn check_commit(local: &StorageRepo, request: &optimystic_core::CommitRequest) -> Result<Check, RepoError> {
    let storage = local.storage();
    let block_ids: BTreeSet<&BlockId> = request.block_ids.iter().collect();
    if block_ids.is_empty() {
        return Ok(reject(INVALID, "the commit names no block"));
    }
    let (trx_id, rev) = (&request.trx_id, request.rev);
    let mut missing = BTreeMap::new();
    let mut to_apply = Vec::new();
    for block_id in block_ids {
        let latest = storage.latest(block_id).await?;
        if let Some(done) = storage.committed(block_id, trx_id).await? {
            if done.rev == rev {
                continue;
            }
            let to = latest.as_ref().map_or(done.rev, |l| l.rev);
            collect_missing(local, block_id, rev.min(done.rev), to, &mut missing).await?;
            continue;
        }
        if let Some(latest) = &latest
            && latest.rev >= rev
        {
            collect_missing(local, block_id, rev, latest.rev, &mut missing).await?;
            continue;
        }
        match storage.pending(block_id, trx_id).await? {
            Some(transform) => to_apply.push((block_id, transform)),
            None => return Ok(reject("behind", format_args!("pending transaction {trx_id} not found on {block_id}"))),
        }
    }
    if !missing.is_empty() {
        let failure = StaleFailure { reason: Some("stale revision".into()), missing: Some(missing_list(missing)), ..StaleFailure::default() };
        return stale(format_args!("a block is at or past revision {rev}"), failure);
    }
    for (block_id, transform) in to_apply {
        let current = local.latest_value(block_id).await?.1;
        if let Err(e) = transform.apply(current.as_ref(), block_id) {
            return Ok(reject(INVALID, format_args!("block {block_id}: {e}")));
        }
    }
    Ok(Check::Approve)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn claim(block: &str, trx: &str, kind: ClaimKind) -> Claim {
        Claim { block_id: BlockId::new(block).unwrap(), trx_id: TrxId::new(trx).unwrap(), kind }
    }

    #[test]
    fn conflict_rules() {
        let pend = claim("x", "t", ClaimKind::Pend);
        let commit1 = claim("x", "t", ClaimKind::Commit { rev: 1 });
        let commit2 = claim("x", "t", ClaimKind::Commit { rev: 2 });
        let cancel = claim("x", "t", ClaimKind::Cancel);
        assert!(!pend.conflicts_with(&commit1));
        assert!(!cancel.conflicts_with(&pend));
        assert!(!commit1.conflicts_with(&commit1.clone()));
        assert!(commit1.conflicts_with(&commit2));
        assert!(commit1.conflicts_with(&cancel));
        assert!(!cancel.conflicts_with(&cancel.clone()));
        assert!(pend.conflicts_with(&claim("x", "u", ClaimKind::Pend)));
        assert!(!pend.conflicts_with(&claim("y", "u", ClaimKind::Pend)));
    }
}

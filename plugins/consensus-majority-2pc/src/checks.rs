//! What a record claims, which claims conflict (SPEC 4.2, 4.12), and the promise-time check of an
//! operation against local storage, which is the repository's own dry run
//! ([`StorageRepo::check_pend`], [`StorageRepo::check_commit`]): one implementation of the SPEC 2
//! rules for a single node and a member.

use std::collections::BTreeSet;
use std::sync::Arc;

use optimystic_core::wire::RepoOperation;
use optimystic_core::{BlockId, Check, RepoError, StorageRepo, Transform, TrxId};

/// What an operation does to one block, for conflict detection.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Claim {
    pub block_id: BlockId,
    pub trx_id: TrxId,
    pub kind: ClaimKind,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ClaimKind {
    /// A pend, with its transform for the block (two pends of one trx conflict when these differ,
    /// by the same equality the repository uses for a re-pend).
    Pend {
        /// Shared: a record's claims are copied into its context and its reservation.
        transform: Arc<Transform>,
    },
    Commit {
        rev: u64,
    },
    Cancel,
}

impl Claim {
    /// Whether two claims on the same block may not hold reservations at once (SPEC 4.12): records
    /// of different transactions always conflict; for one transaction, two pends conflict when
    /// their transforms differ, a cancel conflicts with a pend and with a commit, and two commits
    /// conflict at different revisions.
    pub fn conflicts_with(&self, other: &Claim) -> bool {
        if self.block_id != other.block_id {
            return false;
        }
        if self.trx_id != other.trx_id {
            return true;
        }
        match (&self.kind, &other.kind) {
            (ClaimKind::Pend { transform: a }, ClaimKind::Pend { transform: b }) => a != b,
            (ClaimKind::Pend { .. }, ClaimKind::Commit { .. })
            | (ClaimKind::Commit { .. }, ClaimKind::Pend { .. })
            | (ClaimKind::Cancel, ClaimKind::Cancel) => false,
            (ClaimKind::Commit { rev: a }, ClaimKind::Commit { rev: b }) => a != b,
            (ClaimKind::Cancel, _) | (_, ClaimKind::Cancel) => true,
        }
    }
}

/// The claims of an operation, one per distinct block. A `get` claims nothing.
pub(crate) fn claims(operation: &RepoOperation) -> Vec<Claim> {
    match operation {
        RepoOperation::Get(_) => Vec::new(),
        RepoOperation::Pend(p) => p
            .transforms
            .block_ids()
            .into_iter()
            .map(|block_id| {
                let transform = Arc::new(p.transforms.transform_for(&block_id));
                Claim { block_id, trx_id: p.trx_id.clone(), kind: ClaimKind::Pend { transform } }
            })
            .collect(),
        RepoOperation::Commit(c) => distinct(&c.block_ids, &c.trx_id, &ClaimKind::Commit { rev: c.rev }),
        RepoOperation::Cancel { trx_ref } => distinct(&trx_ref.block_ids, &trx_ref.trx_id, &ClaimKind::Cancel),
    }
}

/// The blocks an operation names, without duplicates (a `get` names none here).
pub(crate) fn blocks_of(operation: &RepoOperation) -> Vec<BlockId> {
    match operation {
        RepoOperation::Get(_) => Vec::new(),
        RepoOperation::Pend(p) => p.transforms.block_ids(),
        RepoOperation::Commit(c) => c.block_ids.iter().collect::<BTreeSet<_>>().into_iter().cloned().collect(),
        RepoOperation::Cancel { trx_ref } => {
            trx_ref.block_ids.iter().collect::<BTreeSet<_>>().into_iter().cloned().collect()
        }
    }
}

fn distinct(blocks: &[BlockId], trx_id: &TrxId, kind: &ClaimKind) -> Vec<Claim> {
    let distinct: BTreeSet<&BlockId> = blocks.iter().collect();
    distinct
        .into_iter()
        .map(|block_id| Claim { block_id: block_id.clone(), trx_id: trx_id.clone(), kind: kind.clone() })
        .collect()
}

/// Would `operation` go through here? Reads local storage only. A cancel always would.
pub(crate) async fn check_operation(local: &StorageRepo, operation: &RepoOperation) -> Result<Check, RepoError> {
    match operation {
        RepoOperation::Get(_) => Ok(Check::Invalid(RepoError::BadRequest("a get is not agreed by consensus".into()))),
        RepoOperation::Cancel { .. } => Ok(Check::Ok),
        RepoOperation::Pend(request) => local.check_pend(request).await,
        RepoOperation::Commit(request) => local.check_commit(request).await,
    }
}

/// SPEC 4.20 write-path custody of `operation`: a commit at revision `r` of a block this member
/// holds at `r - 1` with evidence needs a majority of P(r-1) (the peer set of the commit record
/// that fixed `r - 1` here) among `counted`: the record's peer set for a member to promise it,
/// its approving promises for the coordinator to decide it. A block this member holds at another revision is left to the other
/// checks (behind, done or stale); one whose `r - 1` has no evidence here (`r = 1`, solo-written
/// or pre-evidence data) is judged by them alone. Returns why custody fails, if it does.
pub(crate) async fn custody_failure(
    local: &StorageRepo,
    operation: &RepoOperation,
    counted: &BTreeSet<&str>,
) -> Result<Option<String>, RepoError> {
    let RepoOperation::Commit(commit) = operation else { return Ok(None) };
    let Some(base) = commit.rev.checked_sub(1).filter(|base| *base > 0) else { return Ok(None) };
    for block_id in commit.block_ids.iter().collect::<BTreeSet<_>>() {
        if local.storage().latest(block_id).await?.map(|l| l.rev) != Some(base) {
            continue;
        }
        let Some(custodians) = local.revision_peers(block_id, base).await? else { continue };
        let needed = custodians.len() / 2 + 1;
        let present = custodians.iter().filter(|peer| counted.contains(peer.as_str())).count();
        if present < needed {
            return Ok(Some(format!(
                "custody: {present} of the {} peers of revision {base} of block {block_id} count; {needed} needed",
                custodians.len()
            )));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn claim(block: &str, trx: &str, kind: ClaimKind) -> Claim {
        Claim { block_id: BlockId::new(block).unwrap(), trx_id: TrxId::new(trx).unwrap(), kind }
    }

    fn pend(value: &str) -> ClaimKind {
        let set = optimystic_core::BlockOperation::set("v", serde_json::json!(value));
        ClaimKind::Pend { transform: Arc::new(Transform { updates: Some(vec![set]), ..Transform::default() }) }
    }

    #[test]
    fn conflict_rules() {
        let pend_a = claim("x", "t", pend("a"));
        let commit1 = claim("x", "t", ClaimKind::Commit { rev: 1 });
        let commit2 = claim("x", "t", ClaimKind::Commit { rev: 2 });
        let cancel = claim("x", "t", ClaimKind::Cancel);
        assert!(!pend_a.conflicts_with(&commit1));
        assert!(!pend_a.conflicts_with(&pend_a.clone()), "the same pend twice");
        assert!(pend_a.conflicts_with(&claim("x", "t", pend("b"))), "one trx, two transforms (SPEC 4.12)");
        assert!(cancel.conflicts_with(&pend_a), "a cancel and a pend of one trx (SPEC 4.12)");
        assert!(pend_a.conflicts_with(&cancel));
        assert!(!commit1.conflicts_with(&commit1.clone()));
        assert!(commit1.conflicts_with(&commit2));
        assert!(commit1.conflicts_with(&cancel));
        assert!(!cancel.conflicts_with(&cancel.clone()));
        assert!(pend_a.conflicts_with(&claim("x", "u", pend("a"))));
        assert!(!pend_a.conflicts_with(&claim("y", "u", pend("a"))));
    }
}

//! Evidence of committed revisions (SPEC 4.10): the decided pend and commit records behind each
//! revision a cluster member stores, and their verification by a peer catching up.
//!
//! A member executing a decided pend keeps the record per block and transaction
//! ([`pend_key`]); executing the decided commit of that transaction at revision `r` turns it into the
//! revision's evidence ([`rev_key`]): `{"pend": record, "commit": record}`. Catch-up serves each
//! revision with its evidence, and the receiver applies it only when [`verify`] accepts it
//! against the receiver's own view of the block's cluster. Both records are kept as received (their
//! hashes and signatures are over the JSON as sent), so they verify anywhere.
//!
//! A record may carry several operations (a batch, SPEC 4.14) on pairwise disjoint blocks: the
//! evidence of a revision is then the whole batch record, and verification looks for the one
//! operation that names the block. A member keeps each decided record once ([`record_key`]) and
//! its evidence refers to it ([`StoredEvidence`]), so a batch of `k` operations costs one copy of
//! the record, not `k`; catch-up still serves and receives whole records ([`Evidence`]).

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::crypto;
use crate::model::{BlockId, Transform, TrxId, TrxRev};
use crate::record::ClusterRecord;
use crate::wire::{RecordMessage, RepoOperation};

/// Metadata key prefix of revision evidence.
pub const REV_PREFIX: &str = "evidence/rev/";
/// Metadata key prefix of decided pend records awaiting their commit.
pub const PEND_PREFIX: &str = "evidence/pend/";
/// Metadata key prefix of decided records kept once, which evidence refers to.
pub const RECORD_PREFIX: &str = "evidence/record/";

/// The decided records proving one committed revision of a block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    /// The decided pend record that carried the transaction's transform for the block (`None`
    /// when this member never held it, for example a revision applied before evidence was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pend: Option<Value>,
    /// The decided commit record of the revision.
    pub commit: Value,
}

/// A decided record as stored evidence holds it: a reference to the record kept once under
/// [`record_key`] (`{"record": messageHash}`), or the record itself (evidence written before
/// references were kept).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StoredRecord {
    /// The record's messageHash; the record is under [`record_key`].
    Ref(RecordRef),
    /// The record itself.
    Inline(Value),
}

impl<'de> Deserialize<'de> for StoredRecord {
    /// An object whose only field is a string `record` is a reference; anything else is a record.
    /// (Read through a [`Value`]: serde's untagged enums buffer the whole input first.)
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        if let Value::Object(fields) = &value
            && fields.len() == 1
            && let Some(Value::String(hash)) = fields.get("record")
        {
            return Ok(Self::Ref(RecordRef { record: hash.clone() }));
        }
        Ok(Self::Inline(value))
    }
}

/// `{"record": messageHash}`: a decided record kept under [`record_key`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordRef {
    /// The record's messageHash.
    pub record: String,
}

/// The evidence of a revision as a member stores it under [`rev_key`] (served as [`Evidence`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredEvidence {
    /// The decided pend record, when this member held it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pend: Option<StoredRecord>,
    /// The decided commit record.
    pub commit: StoredRecord,
}

/// The metadata key of a decided record kept once (hex of its messageHash).
#[must_use]
pub fn record_key(message_hash: &str) -> String {
    format!("{RECORD_PREFIX}{}", hex(message_hash.as_bytes()))
}

/// Lower-case hex of `bytes`: how ids (any byte string) go into metadata keys.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    let digit = |nibble: u8| char::from(DIGITS.get(usize::from(nibble)).copied().unwrap_or(b'0'));
    for b in bytes {
        out.push(digit(b >> 4));
        out.push(digit(b & 0x0f));
    }
    out
}

/// The metadata key of a revision's evidence. Block ids are hex-escaped (any byte string is a
/// valid id).
#[must_use]
pub fn rev_key(block_id: &BlockId, rev: u64) -> String {
    format!("{REV_PREFIX}{}/{rev:020}", hex(block_id.as_str().as_bytes()))
}

/// The metadata key of a decided pend record of `trx_id` on a block, kept until the commit.
#[must_use]
pub fn pend_key(block_id: &BlockId, trx_id: &TrxId) -> String {
    format!("{PEND_PREFIX}{}/{}", hex(block_id.as_str().as_bytes()), hex(trx_id.as_str().as_bytes()))
}

/// Why evidence was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvidenceError {
    /// The peer sent no evidence (or no pend record) for the revision.
    #[error("no evidence for revision {rev} of {block_id}")]
    Missing {
        /// The block.
        block_id: BlockId,
        /// The revision.
        rev: u64,
    },
    /// The records verify, but their approvals do not come from a majority of this node's view of
    /// the cluster (membership changed since, or padded peer sets): the quorum-agreement fallback
    /// may apply.
    #[error("evidence for revision {rev} of {block_id} does not cover this node's view: {detail}")]
    Membership {
        /// The block.
        block_id: BlockId,
        /// The revision.
        rev: u64,
        /// Why.
        detail: String,
    },
    /// The evidence is forged, tampered with or about something else: the peer that sent it is
    /// not to be trusted for this catch-up.
    #[error("invalid evidence for revision {rev} of {block_id}: {detail}")]
    Invalid {
        /// The block.
        block_id: BlockId,
        /// The revision.
        rev: u64,
        /// Why.
        detail: String,
    },
}

/// Approvals needed among `n` peers: a majority (thresholds below a majority are configuration
/// errors, SPEC 4.13, so a majority is what every honest decided record carries).
#[must_use]
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// Checks `evidence` for revision `trx_rev` of `block_id` carrying `transform` (SPEC 4.10 (a)-(c),
/// except the `latest + 1` rule, which the caller checks under its block lock): both records
/// verify, are decided (a majority of their peer set approved), name this transaction, revision,
/// block and transform, and each carries approving promises from a majority of `view` (this node's
/// own view of the block's cluster: approvals from outside it count for nothing).
///
/// Errors: [`EvidenceError::Missing`] without a pend record; [`EvidenceError::Membership`] when
/// only the view coverage fails; [`EvidenceError::Invalid`] otherwise.
pub fn verify(
    evidence: Option<&Evidence>,
    block_id: &BlockId,
    trx_rev: &TrxRev,
    transform: &Transform,
    view: &[PeerId],
) -> Result<(), EvidenceError> {
    let rev = trx_rev.rev;
    let missing = || EvidenceError::Missing { block_id: block_id.clone(), rev };
    let evidence = evidence.ok_or_else(missing)?;
    let pend_value = evidence.pend.as_ref().ok_or_else(missing)?;
    let invalid = |detail: String| EvidenceError::Invalid { block_id: block_id.clone(), rev, detail };

    let commit = decided(&evidence.commit).map_err(|e| invalid(format!("commit record: {e}")))?;
    match operation_on(&commit, block_id).map_err(|e| invalid(format!("commit record: {e}")))? {
        RepoOperation::Commit(c) if c.trx_id == trx_rev.trx_id && c.rev == rev => {}
        _ => return Err(invalid("the commit record is not the commit of this transaction, revision and block".into())),
    }
    let pend = decided(pend_value).map_err(|e| invalid(format!("pend record: {e}")))?;
    match operation_on(&pend, block_id).map_err(|e| invalid(format!("pend record: {e}")))? {
        RepoOperation::Pend(p) if p.trx_id == trx_rev.trx_id && p.transforms.transform_for(block_id) == *transform => {}
        _ => return Err(invalid("the pend record does not carry this transaction's transform for the block".into())),
    }
    for (what, record) in [("pend", &pend), ("commit", &commit)] {
        // Approvals from a majority of this node's own view: a peer set padded with made-up keys
        // approving each other proves nothing (their approvals are not from the view).
        let needed = majority(view.len());
        let approving =
            view.iter().filter(|p| record.promises.get(&crypto::peer_text(p)).is_some_and(|v| v.is_approve())).count();
        if approving < needed {
            return Err(EvidenceError::Membership {
                block_id: block_id.clone(),
                rev,
                detail: format!(
                    "{approving} of the {} peers of this node's view approved the {what} record; {needed} needed",
                    view.len()
                ),
            });
        }
    }
    Ok(())
}

/// A record that verifies (digest, hash, keys, every vote; expiry is not checked: evidence is
/// old by nature) and carries approving promises from a majority of its peer set.
fn decided(value: &Value) -> Result<ClusterRecord, String> {
    let record = ClusterRecord::from_value(value.clone()).map_err(|e| e.to_string())?;
    record.verify(None).map_err(|e| e.to_string())?;
    let approvals = record.promises.values().filter(|v| v.is_approve()).count();
    let needed = majority(record.peers.len());
    if approvals < needed {
        return Err(format!("{approvals} of {} peers approved, {needed} needed", record.peers.len()));
    }
    Ok(record)
}

/// The one operation of `record` that names `block_id` (a record of several operations names each
/// block in at most one of them, SPEC 4.14); an error when none or several do.
fn operation_on(record: &ClusterRecord, block_id: &BlockId) -> Result<RepoOperation, String> {
    let message = RecordMessage::from_value(&record.message).map_err(|e| e.to_string())?;
    let mut naming = message.operations.into_iter().filter(|op| names_block(op, block_id));
    match (naming.next(), naming.next()) {
        (Some(op), None) => Ok(op),
        (None, _) => Err(format!("no operation names block {block_id}")),
        (Some(_), Some(_)) => Err(format!("several operations name block {block_id}")),
    }
}

fn names_block(operation: &RepoOperation, block_id: &BlockId) -> bool {
    match operation {
        RepoOperation::Get(_) => false,
        RepoOperation::Pend(p) => p.transforms.block_ids().contains(block_id),
        RepoOperation::Commit(c) => c.block_ids.contains(block_id),
        RepoOperation::Cancel { trx_ref } => trx_ref.block_ids.contains(block_id),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn keys_escape_ids_and_sort_revisions() {
        let b = BlockId::new("a/b").unwrap();
        assert_eq!(rev_key(&b, 7), "evidence/rev/612f62/00000000000000000007");
        assert!(rev_key(&b, 9) < rev_key(&b, 10));
        assert_eq!(pend_key(&b, &TrxId::new("t").unwrap()), "evidence/pend/612f62/74");
    }

    #[test]
    fn stored_records_are_references_or_records() {
        let parse = |text: &str| serde_json::from_str::<StoredRecord>(text).unwrap();
        assert_eq!(parse(r#"{"record":"zA"}"#), StoredRecord::Ref(RecordRef { record: "zA".into() }));
        let inline = r#"{"messageHash":"zA","record":"x"}"#;
        assert!(matches!(parse(inline), StoredRecord::Inline(_)), "a record with more fields is a record");
        assert!(matches!(parse(r#"{"record":5}"#), StoredRecord::Inline(_)));
        assert_eq!(serde_json::to_string(&parse(r#"{"record":"zA"}"#)).unwrap(), r#"{"record":"zA"}"#);
        assert_eq!(serde_json::to_string(&parse(inline)).unwrap(), inline);
    }

    #[test]
    fn no_evidence_is_missing() {
        let b = BlockId::new("b").unwrap();
        let trx_rev = TrxRev { trx_id: TrxId::new("t").unwrap(), rev: 1 };
        let err = verify(None, &b, &trx_rev, &Transform::default(), &[]).unwrap_err();
        assert!(matches!(err, EvidenceError::Missing { .. }));
        let without_pend = Evidence { pend: None, commit: Value::Null };
        let err = verify(Some(&without_pend), &b, &trx_rev, &Transform::default(), &[]).unwrap_err();
        assert!(matches!(err, EvidenceError::Missing { .. }));
        let garbage = Evidence { pend: Some(Value::Null), commit: Value::Null };
        let err = verify(Some(&garbage), &b, &trx_rev, &Transform::default(), &[]).unwrap_err();
        assert!(matches!(err, EvidenceError::Invalid { .. }));
    }

    /// A batched record (SPEC 4.14) is evidence for each of its operations: verification finds
    /// the operation naming the block; a record naming the block twice proves nothing.
    #[test]
    fn batched_records_prove_each_of_their_operations() {
        use libp2p_identity::Keypair;

        use crate::model::{BlockOperation, CommitRequest, PendPolicy, PendRequest, Transforms};
        use crate::record::{ClusterPeer, VoteType};

        let keys: Vec<Keypair> = (0..3).map(|_| Keypair::generate_ed25519()).collect();
        let view: Vec<PeerId> = keys.iter().map(|k| k.public().to_peer_id()).collect();
        let decided_record = |operations: Vec<RepoOperation>| {
            let peers = view.iter().map(|p| (crypto::peer_text(p), ClusterPeer::new(p, vec![]).unwrap())).collect();
            let message = serde_json::to_value(RecordMessage { operations, expiration: 1 }).unwrap();
            let mut record = ClusterRecord::new(peers, message);
            for key in keys.iter().take(2) {
                let vote = record.sign_promise(key, VoteType::Approve, None).unwrap();
                record.promises.insert(crypto::peer_text(&key.public().to_peer_id()), vote);
            }
            record.to_value()
        };
        let set = |v: i64| Transform {
            updates: Some(vec![BlockOperation::set("v", serde_json::json!(v))]),
            ..Transform::default()
        };
        let pend = |trx: &str, block: &BlockId, v: i64| {
            RepoOperation::Pend(PendRequest {
                trx_id: TrxId::new(trx).unwrap(),
                rev: Some(2),
                transforms: Transforms::single(block, &set(v)),
                policy: PendPolicy::Continue,
            })
        };
        let commit = |trx: &str, block: &BlockId| {
            RepoOperation::Commit(CommitRequest {
                trx_id: TrxId::new(trx).unwrap(),
                block_ids: vec![block.clone()],
                rev: 2,
                tail_id: block.clone(),
                header_id: None,
            })
        };
        let (a, b) = (BlockId::new("a").unwrap(), BlockId::new("b").unwrap());
        let evidence = Evidence {
            pend: Some(decided_record(vec![pend("ta", &a, 1), pend("tb", &b, 2)])),
            commit: decided_record(vec![commit("tb", &b), commit("ta", &a)]),
        };
        let at = |trx: &str| TrxRev { trx_id: TrxId::new(trx).unwrap(), rev: 2 };
        verify(Some(&evidence), &a, &at("ta"), &set(1), &view).unwrap();
        verify(Some(&evidence), &b, &at("tb"), &set(2), &view).unwrap();
        // Another transaction, another transform, or a block the batch does not name.
        for (block, trx, v) in [(&a, "tb", 1), (&b, "tb", 1), (&BlockId::new("c").unwrap(), "ta", 1)] {
            let e = verify(Some(&evidence), block, &at(trx), &set(v), &view).unwrap_err();
            assert!(matches!(e, EvidenceError::Invalid { .. }), "{e}");
        }
        // Two operations naming one block: ambiguous, refused.
        let doubled = Evidence {
            pend: Some(decided_record(vec![pend("ta", &a, 1), pend("tz", &a, 3)])),
            commit: decided_record(vec![commit("ta", &a)]),
        };
        let e = verify(Some(&doubled), &a, &at("ta"), &set(1), &view).unwrap_err();
        assert!(e.to_string().contains("several operations"), "{e}");
    }
}

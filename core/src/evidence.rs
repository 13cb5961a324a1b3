//! Evidence of committed revisions (SPEC 4.10): the decided pend and commit records behind each
//! revision a cluster member stores, and their verification by a peer catching up.
//!
//! A member executing a decided pend keeps the record per block and transaction
//! ([`pend_key`]); executing the decided commit of that transaction at revision `r` turns it into the
//! revision's evidence ([`rev_key`]): `{"pend": record, "commit": record}`. Catch-up serves each
//! revision with its evidence, and the receiver applies it only when [`verify_trusted`] finds its
//! execution proof (SPEC 4.10 (d), 4.20): approving commit votes on both records from a majority
//! of a trusted set (the receiver's own view of the block's cluster, or P(L) of its newest proven
//! revision, [`ProvenMark`]), never counted over the record's own peer set. A decided record
//! without them proves a decision that recovery may have renounced. Records keep their hashed and
//! signed content as received (hashes and signatures are over the JSON as sent), so they verify
//! anywhere; what no hash covers is dropped before a served record is stored ([`stored_form`]).
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
use crate::record::{ClusterRecord, VoteType};
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

/// Metadata key prefix of each block's newest proven revision ([`ProvenMark`]).
pub const PROVEN_PREFIX: &str = "evidence/proven/";

/// Most peers a served record's peer set may name (the largest `cluster_size`, SPEC 4.9).
pub const MAX_RECORD_PEERS: usize = 64;
/// Most bytes of a record kept from served evidence, in its stored form ([`stored_form`]).
pub const MAX_KEPT_RECORD_BYTES: usize = 4 * 1024 * 1024;
/// Most addresses kept per peer of a served record (addresses are covered by no hash).
pub const MAX_KEPT_MULTIADDRS: usize = 8;
/// Most bytes of one kept address.
pub const MAX_MULTIADDR_BYTES: usize = 256;
/// Most bytes of a vote's `rejectReason` or `conflictWith` kept from served evidence; a vote with a
/// longer one is dropped from the stored form.
pub const MAX_VOTE_DETAIL_BYTES: usize = 1024;

/// The metadata key of a block's newest proven revision ([`ProvenMark`]).
#[must_use]
pub fn proven_key(block_id: &BlockId) -> String {
    format!("{PROVEN_PREFIX}{}", hex(block_id.as_str().as_bytes()))
}

/// A block's newest revision held with its execution proof (SPEC 4.20), kept under
/// [`proven_key`]: the revision, its transaction and P(r), the peer set of the commit record that
/// fixed it. A mark whose transaction is not the one the block holds at that revision any more is
/// void.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvenMark {
    /// The revision and its transaction.
    pub trx_rev: TrxRev,
    /// P(r), sorted: the custody set trusted for revision r + 1.
    pub peers: Vec<PeerId>,
}

/// [`ProvenMark`] as stored: `{"trxRev": TrxRev, "peers": [peer id text]}`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredMark {
    trx_rev: TrxRev,
    peers: Vec<String>,
}

impl ProvenMark {
    /// The stored form, for a metadata write under [`proven_key`].
    ///
    /// Errors: when it cannot be encoded.
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&StoredMark {
            trx_rev: self.trx_rev.clone(),
            peers: self.peers.iter().map(crypto::peer_text).collect(),
        })
    }

    /// Reads a stored mark.
    ///
    /// Errors: malformed JSON or peer ids.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let stored: StoredMark = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let peers = stored
            .peers
            .iter()
            .map(|p| crypto::parse_peer_id(p).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { trx_rev: stored.trx_rev, peers })
    }
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
    /// The records verify and name this revision, but carry no execution proof counted over any of
    /// this node's trusted sets (membership changed since, the records were renounced after being
    /// decided, or their commit votes were never gathered): the quorum-of-view fallback may apply
    /// it, as a provisional revision.
    #[error("evidence for revision {rev} of {block_id} is no execution proof for this node: {detail}")]
    Unproven {
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

/// [`verify_trusted`] with this node's view of the block's cluster as the only trusted set.
///
/// Errors: as [`verify_trusted`].
pub fn verify(
    evidence: Option<&Evidence>,
    block_id: &BlockId,
    trx_rev: &TrxRev,
    transform: &Transform,
    view: &[PeerId],
) -> Result<Vec<PeerId>, EvidenceError> {
    verify_trusted(evidence, block_id, trx_rev, transform, &[view])
}

/// Checks that `evidence` is the execution proof of revision `trx_rev` of `block_id` carrying
/// `transform` (SPEC 4.10 (a)-(d), 4.20; the `latest + 1` rule and the catch-up base are the
/// caller's, under its block lock):
/// - both records verify (digest, hash, keys, every vote) and are decided (approving promises
///   from a majority of their peer set), and they name this transaction, revision, block and
///   transform;
/// - for one trusted set `T` of `trusted` (this node's view of the block's cluster, and P(L) of
///   its newest proven revision L, [`ProvenMark`]): the approving promises of each record from
///   peers of `T` reach a majority of the record's peer set, and each record carries approving
///   commit votes ("applied here") from a majority of `T`. Votes count only from `T`, never
///   from the record's own peer set: a coordinator can name keys it made. The commit record's
///   votes prove revision r executed; the pend record's prove that the transform applied is the
///   one executed (a renounced pend with another transform has no such votes).
///
/// Returns P(r): the commit record's peer set, sorted (the custody set of revision r + 1).
///
/// Errors: [`EvidenceError::Missing`] without a pend record; [`EvidenceError::Unproven`] when
/// only the trusted-set counts fail; [`EvidenceError::Invalid`] otherwise.
pub fn verify_trusted(
    evidence: Option<&Evidence>,
    block_id: &BlockId,
    trx_rev: &TrxRev,
    transform: &Transform,
    trusted: &[&[PeerId]],
) -> Result<Vec<PeerId>, EvidenceError> {
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
    let peer_set = peers_of(&commit).map_err(|e| invalid(format!("commit record: {e}")))?;
    let mut why = Vec::new();
    for set in trusted.iter().filter(|set| !set.is_empty()) {
        match proven_over(&pend, &commit, set) {
            Ok(()) => return Ok(peer_set),
            Err(e) => why.push(e),
        }
    }
    Err(EvidenceError::Unproven {
        block_id: block_id.clone(),
        rev,
        detail: if why.is_empty() { "no trusted set".into() } else { why.join("; ") },
    })
}

/// Whether `pend` and `commit` carry their execution proof counted over `trusted` (see
/// [`verify_trusted`]).
fn proven_over(pend: &ClusterRecord, commit: &ClusterRecord, trusted: &[PeerId]) -> Result<(), String> {
    let from_trusted = |votes: &std::collections::BTreeMap<String, crate::record::Vote>| {
        trusted.iter().filter(|p| votes.get(&crypto::peer_text(p)).is_some_and(|v| v.is_approve())).count()
    };
    for (what, record) in [("pend", pend), ("commit", commit)] {
        let promised = from_trusted(&record.promises);
        let needed = majority(record.peers.len());
        if promised < needed {
            return Err(format!(
                "{promised} trusted peers approved the {what} record, {needed} of its {} peers needed",
                record.peers.len()
            ));
        }
        let executed = from_trusted(&record.commits);
        let needed = majority(trusted.len());
        if executed < needed {
            return Err(format!(
                "{executed} of {} trusted peers executed the {what} record, {needed} needed",
                trusted.len()
            ));
        }
    }
    Ok(())
}

/// Whether stored evidence (kept by this node, so already admitted under its membership rules)
/// holds its execution proof: each record carries approving commit votes from a majority of
/// `trusted`, or, when `trusted` is empty, of its own peer set. Signatures are not checked again.
#[must_use]
pub fn stored_proof(evidence: &Evidence, trusted: &[PeerId]) -> Option<Vec<PeerId>> {
    let pend = ClusterRecord::from_value(evidence.pend.clone()?).ok()?;
    let commit = ClusterRecord::from_value(evidence.commit.clone()).ok()?;
    for record in [&pend, &commit] {
        let approving = |p: &String| record.commits.get(p).is_some_and(|v| v.is_approve());
        let (executed, of) = if trusted.is_empty() {
            (record.peers.keys().filter(|p| approving(p)).count(), record.peers.len())
        } else {
            (trusted.iter().filter(|p| approving(&crypto::peer_text(p))).count(), trusted.len())
        };
        if executed < majority(of) {
            return None;
        }
    }
    peers_of(&commit).ok()
}

/// The record's peer set as peer ids, sorted.
fn peers_of(record: &ClusterRecord) -> Result<Vec<PeerId>, String> {
    let mut peers = record
        .peers
        .keys()
        .map(|p| crypto::parse_peer_id(p).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    peers.sort();
    Ok(peers)
}

/// The form in which a served decided record is stored (SPEC 4.10 (d)): only what its hashes and
/// signatures cover plus a bounded set of known fields. Kept: `messageHash`, `membershipVersion`,
/// `membershipDigest` and `message` (covered by the hashes), `promises` as received (covered by
/// the commit votes' `commitHash`, and each by its signature), each peer's `publicKey` (checked
/// against its id) with at most [`MAX_KEPT_MULTIADDRS`] addresses of at most
/// [`MAX_MULTIADDR_BYTES`], and each commit vote's signed fields (a vote whose signed detail
/// exceeds [`MAX_VOTE_DETAIL_BYTES`] is dropped). Unknown top-level fields and unsigned fields of
/// commit votes are dropped.
///
/// Errors: a record that does not parse, names more than [`MAX_RECORD_PEERS`] peers, or whose
/// stored form exceeds [`MAX_KEPT_RECORD_BYTES`].
pub fn stored_form(value: &Value) -> Result<Value, String> {
    let mut record = ClusterRecord::from_value(value.clone()).map_err(|e| e.to_string())?;
    if record.peers.len() > MAX_RECORD_PEERS {
        return Err(format!("{} peers, at most {MAX_RECORD_PEERS}", record.peers.len()));
    }
    record.extra.clear();
    for peer in record.peers.values_mut() {
        peer.extra.clear();
        peer.multiaddrs.retain(|a| a.len() <= MAX_MULTIADDR_BYTES);
        peer.multiaddrs.truncate(MAX_KEPT_MULTIADDRS);
    }
    record.commits.retain(|_, vote| vote.signed_extra().map_or(0, str::len) <= MAX_VOTE_DETAIL_BYTES);
    for vote in record.commits.values_mut() {
        vote.extra.clear();
        match vote.r#type {
            VoteType::Approve => (vote.reject_reason, vote.conflict_with) = (None, None),
            VoteType::Reject => vote.conflict_with = None,
            VoteType::Conflict => vote.reject_reason = None,
        }
    }
    let stored = record.into_value();
    let bytes = serde_json::to_vec(&stored).map_or(usize::MAX, |b| b.len());
    if bytes > MAX_KEPT_RECORD_BYTES {
        return Err(format!("{bytes} bytes, at most {MAX_KEPT_RECORD_BYTES}"));
    }
    Ok(stored)
}

/// A record that verifies (digest, hash, keys, every vote; expiry is not checked: evidence is
/// old by nature) and carries approving promises from a majority of its peer set.
fn decided(value: &Value) -> Result<ClusterRecord, String> {
    let record = ClusterRecord::from_value(value.clone()).map_err(|e| e.to_string())?;
    if record.peers.len() > MAX_RECORD_PEERS {
        return Err(format!("{} peers, at most {MAX_RECORD_PEERS}", record.peers.len()));
    }
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
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

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
        use crate::record::ClusterPeer;

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
            for key in keys.iter().take(2) {
                let vote = record.sign_commit(key, VoteType::Approve, None).unwrap();
                record.commits.insert(crypto::peer_text(&key.public().to_peer_id()), vote);
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

    /// SPEC 4.20: execution proof counts commit votes over a trusted set: this node's view, or
    /// P(L) of its newest proven revision (custody across membership changes); never over the
    /// record's own peer set.
    #[test]
    fn execution_proof_counts_over_a_trusted_set_only() {
        use libp2p_identity::Keypair;

        use crate::model::{BlockOperation, CommitRequest, PendPolicy, PendRequest, Transforms};
        use crate::record::ClusterPeer;
        use crate::wire::RepoMessage;

        let keys: Vec<Keypair> = (0..5).map(|_| Keypair::generate_ed25519()).collect();
        let ids: Vec<PeerId> = keys.iter().map(|k| k.public().to_peer_id()).collect();
        let b = BlockId::new("b").unwrap();
        let set =
            Transform { updates: Some(vec![BlockOperation::set("v", serde_json::json!(1))]), ..Transform::default() };
        // Peer set {0, 3, 4}: promised by all three, executed by 3 and 4.
        let record_among = |operation: RepoOperation| {
            let set_of: Vec<&Keypair> = [&keys[0], &keys[3], &keys[4]].into();
            let peers = set_of
                .iter()
                .map(|k| {
                    (
                        crypto::peer_text(&k.public().to_peer_id()),
                        ClusterPeer::new(&k.public().to_peer_id(), vec![]).unwrap(),
                    )
                })
                .collect();
            let mut record = ClusterRecord::new(peers, serde_json::to_value(RepoMessage::new(operation, 1)).unwrap());
            for key in &set_of {
                let vote = record.sign_promise(key, VoteType::Approve, None).unwrap();
                record.promises.insert(crypto::peer_text(&key.public().to_peer_id()), vote);
            }
            for key in &set_of[1..] {
                let vote = record.sign_commit(key, VoteType::Approve, None).unwrap();
                record.commits.insert(crypto::peer_text(&key.public().to_peer_id()), vote);
            }
            record.to_value()
        };
        let trx_id = TrxId::new("t").unwrap();
        let evidence = Evidence {
            pend: Some(record_among(RepoOperation::Pend(PendRequest {
                trx_id: trx_id.clone(),
                rev: Some(2),
                transforms: Transforms::single(&b, &set),
                policy: PendPolicy::Continue,
            }))),
            commit: record_among(RepoOperation::Commit(CommitRequest {
                trx_id: trx_id.clone(),
                block_ids: vec![b.clone()],
                rev: 2,
                tail_id: b.clone(),
                header_id: None,
            })),
        };
        let trx_rev = TrxRev { trx_id, rev: 2 };
        let view = [ids[0], ids[1], ids[2]];
        let custody = [ids[0], ids[3], ids[4]];
        let e = verify(Some(&evidence), &b, &trx_rev, &set, &view).unwrap_err();
        assert!(matches!(e, EvidenceError::Unproven { .. }), "{e}");
        let mut p_r = custody.to_vec();
        p_r.sort();
        assert_eq!(verify_trusted(Some(&evidence), &b, &trx_rev, &set, &[&view, &custody]).unwrap(), p_r);
        // Without any trusted set, nothing is proven.
        let e = verify_trusted(Some(&evidence), &b, &trx_rev, &set, &[]).unwrap_err();
        assert!(matches!(e, EvidenceError::Unproven { .. }), "{e}");
    }
}

//! What a member persists in its storage's metadata space, and in which order.
//!
//! - `2pc/entry/<expiration ms, 20 digits>/<messageHash>`: one [`Entry`] per record the member
//!   voted on or executed: its promise vote, its commit vote and result, the record copy it needs
//!   for recovery. Keys sort by expiration, so the oldest markers are collected first.
//! - `2pc/live/<messageHash>`: the expiration, present while the record holds a reservation
//!   (promised, or decided and not yet executed). A restart lists these (bounded by
//!   `max_reservations`) to rebuild the reservations.
//! - `2pc/rej/<expiration ms, 20 digits>/<messageHash>`: a [`RejectionRef`], present while the
//!   member keeps a rejected record's entry (its final vote). Stored rejections are bounded in
//!   blocks per sender and in total (SPEC 4.10); a restart lists these (bounded by
//!   `max_rejections`) to count them again, and collection deletes them with their entries at
//!   the record's expiration plus grace, oldest first. Rejections stored before this index
//!   existed have none and are collected with the other markers.
//!
//! Write order makes every crash point safe: a live pointer is written before its entry (a pointer
//! without an entry is dropped at load: that vote was never answered), and deleted after the entry
//! is resolved (a pointer to a resolved entry is dropped at load).

use std::collections::BTreeMap;

use optimystic_core::evidence::StoredRecord;
use optimystic_core::record::Vote;
use optimystic_core::{MetaWrite, RawStorage, RepoError, StorageError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Prefix of the entries.
pub(crate) const ENTRY_PREFIX: &str = "2pc/entry/";
/// Prefix of the live pointers.
pub(crate) const LIVE_PREFIX: &str = "2pc/live/";
/// Prefix of cancel tombstones: `2pc/tomb/<hex block id>/<hex trx id>` -> the time (ms) after which
/// it may be collected (SPEC 4.12).
pub(crate) const TOMB_PREFIX: &str = "2pc/tomb/";

/// Prefix of the rejection index.
pub(crate) const REJECTION_PREFIX: &str = "2pc/rej/";

/// The rejection index key of a record.
pub(crate) fn rejection_key(expiration_ms: u64, message_hash: &str) -> String {
    format!("{REJECTION_PREFIX}{expiration_ms:020}/{message_hash}")
}

/// The expiration and messageHash encoded in a rejection index key.
pub(crate) fn parse_rejection_key(key: &str) -> Option<(u64, &str)> {
    let (expiration, hash) = key.strip_prefix(REJECTION_PREFIX)?.split_once('/')?;
    Some((expiration.parse().ok()?, hash))
}

/// What a stored rejection counts for against the bounds (the value of its index key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RejectionRef {
    /// The blocks the rejected record names.
    pub blocks: usize,
    /// The sender whose budget it counts against; absent for the outsiders' shared budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
}

/// The tombstone key of a cancelled trx on a block.
pub(crate) fn tomb_key(block_id: &optimystic_core::BlockId, trx_id: &optimystic_core::TrxId) -> String {
    use optimystic_core::evidence::hex;
    format!("{TOMB_PREFIX}{}/{}", hex(block_id.as_str().as_bytes()), hex(trx_id.as_str().as_bytes()))
}

/// Where a member stands on one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordStatus {
    /// Approved in phase 1: the record holds a reservation on its blocks.
    Promised,
    /// Rejected in phase 1 (the vote is kept: votes are final).
    Rejected,
    /// Seen with a promise quorum, not yet executed (only across a crash or a storage failure).
    Decided,
    /// Executed: applied to local storage exactly once, result and commit vote kept.
    Executed,
    /// Never to execute here: the promise quorum is out of reach, or every other peer answered
    /// that it did not execute it after its expiration, or this node's own coordinator gave it
    /// up while this member's promise had never left the node.
    Aborted,
}

impl RecordStatus {
    /// Whether the record holds a reservation (and a live pointer).
    #[must_use]
    pub fn is_live(self) -> bool {
        matches!(self, Self::Promised | Self::Decided)
    }
}

/// The persisted state of one record on one member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Entry {
    pub status: RecordStatus,
    pub expiration_ms: u64,
    /// This member's promise vote, if it cast one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promise: Option<Vote>,
    /// The record: without votes while promised; the decided copy (with its promise quorum) once
    /// decided or executed, as a reference to the copy kept for evidence when the record carries
    /// a pend or a commit ([`optimystic_core::StorageRepo::keep_record_write`]), else inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<StoredRecord>,
    /// This member's commit vote, once executed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<Vote>,
    /// The execution result (a repo response or an error envelope). Never a copy of history for a
    /// rejection (SPEC 4.11): a stale answer is computed when answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The peer that sent the record, while it holds a reservation (per-sender bounds); absent
    /// for a sender outside the cluster ([`Entry::outsider`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// The record came from a sender outside this member's view of the cluster: its reservation
    /// counts against the budget all such senders share (SPEC 4.20 "Sybil senders"). Entries
    /// written before this flag existed read as their sender's own budget.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outsider: bool,
    /// This member answered a status query "not executed" (past expiration): it will never
    /// execute the record (SPEC 4.11). A promised record keeps its reservation until recovery
    /// settles it (see the `recovery` module).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub renounced: bool,
    /// Verified renounces of the record by other peers of its peer set (peer id text -> signature,
    /// see the `faulty` module), gathered by recovery: kept across restarts so that the bound of
    /// SPEC 4.5 counts them without asking again. Entries written before this field read as none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub renounces: BTreeMap<String, String>,
    /// This member's promise was cast for its own coordinator and never sent to another peer:
    /// when that coordinator gives the record up, nobody else holds the vote, so no decided copy
    /// can count it and the reservation may go at once (see `Inner::abandon`). Entries written
    /// before this flag existed read as shared.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local_only: bool,
}

pub(crate) fn entry_key(expiration_ms: u64, message_hash: &str) -> String {
    format!("{ENTRY_PREFIX}{expiration_ms:020}/{message_hash}")
}

pub(crate) fn live_key(message_hash: &str) -> String {
    format!("{LIVE_PREFIX}{message_hash}")
}

/// The expiration encoded in an entry key.
pub(crate) fn expiration_of_key(key: &str) -> Option<u64> {
    key.strip_prefix(ENTRY_PREFIX)?.split('/').next()?.parse().ok()
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> RepoError {
    RepoError::Storage(StorageError::Corrupt(format!("2pc {what}: {e}")))
}

pub(crate) async fn read_entry(
    storage: &dyn RawStorage,
    expiration_ms: u64,
    message_hash: &str,
) -> Result<Option<Entry>, RepoError> {
    match storage.get_meta(&entry_key(expiration_ms, message_hash)).await? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| corrupt("entry", e)),
    }
}

/// Writes an entry, with the live pointer first when it is live and deleted after when not, in one
/// metadata batch (one sync on transactional engines; in this order on the others).
pub(crate) async fn write_entry(storage: &dyn RawStorage, message_hash: &str, entry: &Entry) -> Result<(), RepoError> {
    write_entry_after(storage, message_hash, entry, Vec::new()).await
}

/// [`write_entry`], with `before` written first in the same batch (the record an entry refers to).
pub(crate) async fn write_entry_after(
    storage: &dyn RawStorage,
    message_hash: &str,
    entry: &Entry,
    mut before: Vec<MetaWrite>,
) -> Result<(), RepoError> {
    before.extend(entry_writes(message_hash, entry)?);
    storage.write_meta(&before).await?;
    Ok(())
}

/// The metadata writes of [`write_entry`], in their order.
pub(crate) fn entry_writes(message_hash: &str, entry: &Entry) -> Result<[MetaWrite; 2], RepoError> {
    let bytes = serde_json::to_vec(entry).map_err(|e| RepoError::Internal(format!("encoding a 2pc entry: {e}")))?;
    let live = live_key(message_hash);
    let entry_write = MetaWrite::Put(entry_key(entry.expiration_ms, message_hash), bytes);
    Ok(if entry.status.is_live() {
        [MetaWrite::Put(live, entry.expiration_ms.to_string().into_bytes()), entry_write]
    } else {
        [entry_write, MetaWrite::Delete(live)]
    })
}

/// Every live pointer: `(messageHash, expiration)`, at most `limit`. Malformed pointers are
/// reported as corrupt.
pub(crate) async fn live_pointers(storage: &dyn RawStorage, limit: usize) -> Result<Vec<(String, u64)>, RepoError> {
    let mut out = Vec::new();
    for (key, value) in storage.list_meta(LIVE_PREFIX, limit).await? {
        let hash = key.strip_prefix(LIVE_PREFIX).unwrap_or(&key).to_owned();
        let expiration = std::str::from_utf8(&value)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| corrupt("live pointer", &key))?;
        out.push((hash, expiration));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn keys_sort_by_expiration_and_round_trip() {
        let a = entry_key(999, "zB");
        let b = entry_key(1_000, "zA");
        assert!(a < b);
        assert_eq!(expiration_of_key(&a), Some(999));
        assert_eq!(expiration_of_key("2pc/live/zA"), None);
        assert_eq!(live_key("zA"), "2pc/live/zA");
    }

    #[test]
    fn entries_round_trip() {
        let entry = Entry {
            status: RecordStatus::Promised,
            expiration_ms: 5,
            promise: None,
            record: Some(StoredRecord::Inline(serde_json::json!({"x": 1}))),
            commit: None,
            result: None,
            sender: None,
            outsider: false,
            renounced: false,
            renounces: BTreeMap::new(),
            local_only: false,
        };
        let text = serde_json::to_string(&entry).unwrap();
        assert_eq!(text, r#"{"status":"promised","expirationMs":5,"record":{"x":1}}"#);
        assert_eq!(serde_json::from_str::<Entry>(&text).unwrap(), entry);
        let by_reference = r#"{"status":"executed","expirationMs":5,"record":{"record":"zA"}}"#;
        let parsed = serde_json::from_str::<Entry>(by_reference).unwrap();
        assert!(matches!(&parsed.record, Some(StoredRecord::Ref(r)) if r.record == "zA"));
        assert_eq!(serde_json::to_string(&parsed).unwrap(), by_reference);
    }
}

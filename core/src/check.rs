//! Dry-run checks of repo operations ([`Check`]) and typed reject reasons ([`RejectReason`]).
//!
//! [`crate::StorageRepo::check_pend`] and [`crate::StorageRepo::check_commit`] are the one
//! implementation of the SPEC section 2 rules: the repository's own `pend` and `commit` act on their
//! outcome, and a consensus member turns the same outcome into its vote (SPEC 4.2, 4.6), so a single
//! node and a cluster member can never disagree on what an operation would do.

use std::fmt;

use crate::error::RepoError;
use crate::model::{BlockId, StaleFailure};

/// What an operation would do against a peer's current state, computed without changing anything.
#[derive(Debug)]
pub enum Check {
    /// It applies on the state as it is.
    Ok,
    /// It is already applied exactly (a re-pend of the same transforms, a re-commit of the same
    /// `{trxId, rev}`): applying it again changes nothing and succeeds.
    Done,
    /// The blocks moved past the requested revision (or, under policy `f` / `r`, other
    /// transactions are pending): the answer the client gets.
    Stale(StaleFailure),
    /// This peer lacks state the operation needs: the block is unknown here, or the transaction
    /// is not pending here. A single node answers it as an error; a cluster member is behind.
    Behind {
        /// The block.
        block_id: BlockId,
        /// The error a single node answers with ([`RepoError::UnknownBlock`] or
        /// [`RepoError::PendingNotFound`]).
        error: RepoError,
    },
    /// A revision gap (SPEC 2 item 7): the operation targets revision `rev` but the block is at
    /// `latest_rev < rev - 1`. A single node answers `bad-request`; a cluster member is behind.
    Gap {
        /// The block.
        block_id: BlockId,
        /// The block's `latest.rev` here (0 when it has none).
        latest_rev: u64,
        /// The revision the operation targets.
        rev: u64,
    },
    /// The operation can never apply (an invalid transform, a conflicting re-pend, a
    /// transaction already committed): the error to answer. Nothing changes.
    Invalid(RepoError),
}

impl Check {
    /// The error a single node answers a gap with.
    #[must_use]
    pub fn gap_error(block_id: &BlockId, latest_rev: u64, rev: u64) -> RepoError {
        RepoError::BadRequest(format!(
            "revision gap on {block_id}: revision {rev} needs revision {} here, the block is at {latest_rev}",
            rev.saturating_sub(1)
        ))
    }

    /// The reject reason a consensus member signs for this outcome; `None` for [`Check::Ok`] and
    /// [`Check::Done`], which are approved.
    #[must_use]
    pub fn reject_reason(&self) -> Option<RejectReason> {
        match self {
            Self::Ok | Self::Done => None,
            Self::Stale(failure) => Some(RejectReason::new(
                RejectCategory::Stale,
                failure.reason.clone().unwrap_or_else(|| "stale revision".into()),
            )),
            Self::Behind { error, .. } => Some(RejectReason::new(RejectCategory::Behind, error.to_string())),
            Self::Gap { block_id, latest_rev, rev } => Some(RejectReason::new(
                RejectCategory::Behind,
                format!(
                    "block {block_id} is at revision {latest_rev} here, revision {rev} needs {}",
                    rev.saturating_sub(1)
                ),
            )),
            Self::Invalid(error) => Some(RejectReason::new(RejectCategory::Invalid, error.to_string())),
        }
    }

    /// The block this peer is behind on, for [`Check::Behind`] and [`Check::Gap`].
    #[must_use]
    pub fn behind_block(&self) -> Option<&BlockId> {
        match self {
            Self::Behind { block_id, .. } | Self::Gap { block_id, .. } => Some(block_id),
            _ => None,
        }
    }
}

/// The category of a reject reason: the text before the first `": "` on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RejectCategory {
    /// The blocks moved past the requested revision; a `StaleFailure` travels with the vote.
    Stale,
    /// This member lacks state the operation needs (unknown block, missed pend, revision gap).
    Behind,
    /// The operation can never apply.
    Invalid,
    /// Another record holds a reservation on a block.
    Conflict,
    /// The member holds too many reservations (in total or for this sender).
    Busy,
    /// The record is not acceptable to this member as sent: its peer set, its age.
    Refused,
    /// The decided operation failed when applied here (commit votes).
    Failed,
    /// Some operations of a batched record (SPEC 4.14) fail; the detail lists each one's index and
    /// reason (see [`BatchFailure`]).
    Batch,
    /// A category this implementation does not know (other implementations may send more).
    Other(String),
}

impl RejectCategory {
    /// The wire text of the category.
    #[must_use]
    pub fn as_str(&self) -> &str {
        match self {
            Self::Stale => "stale",
            Self::Behind => "behind",
            Self::Invalid => "invalid",
            Self::Conflict => "conflict",
            Self::Busy => "busy",
            Self::Refused => "refused",
            Self::Failed => "failed",
            Self::Batch => "batch",
            Self::Other(text) => text,
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "stale" => Self::Stale,
            "behind" => Self::Behind,
            "invalid" => Self::Invalid,
            "conflict" => Self::Conflict,
            "busy" => Self::Busy,
            "refused" => Self::Refused,
            "failed" => Self::Failed,
            "batch" => Self::Batch,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// A vote's reject reason: a category and a detail, `category: detail` on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectReason {
    /// What kind of refusal.
    pub category: RejectCategory,
    /// Human-readable detail.
    pub detail: String,
}

/// Longest detail kept in a reject reason (error messages can be long; votes travel in every
/// copy of a record).
pub const MAX_REJECT_DETAIL_CHARS: usize = 200;

impl RejectReason {
    /// A reason; the detail is cut to [`MAX_REJECT_DETAIL_CHARS`].
    #[must_use]
    pub fn new(category: RejectCategory, detail: impl Into<String>) -> Self {
        let detail: String = detail.into();
        let detail = if detail.chars().count() > MAX_REJECT_DETAIL_CHARS {
            detail.chars().take(MAX_REJECT_DETAIL_CHARS).collect()
        } else {
            detail
        };
        Self { category, detail }
    }

    /// Parses a received reason. A text without `": "` is all category (no detail).
    #[must_use]
    pub fn parse(text: &str) -> Self {
        match text.split_once(": ") {
            Some((category, detail)) => Self { category: RejectCategory::parse(category), detail: detail.to_owned() },
            None => Self { category: RejectCategory::parse(text), detail: String::new() },
        }
    }
}

/// One failing operation of a batched record (SPEC 4.14): its index in the record's `operations`
/// and its own reason.
///
/// On the wire a batch rejection is the reason `batch: ` followed by a JSON array of
/// `[index, "category: detail"]` pairs, one per failing operation, by ascending index, for example
/// `batch: [[0,"stale: stale revision"],[3,"conflict: block b is reserved by z..."]]`. Each entry's
/// reason is a complete reason of its own (cut to [`MAX_REJECT_DETAIL_CHARS`] like any other);
/// operations not listed passed. JSON strings quote and escape the inner reasons, so any detail
/// text parses back exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFailure {
    /// The operation's index in the record's `operations`.
    pub index: usize,
    /// Why it fails.
    pub reason: RejectReason,
}

impl RejectReason {
    /// The rejection of a batched record whose operations `failures` fail (any order; listed by
    /// ascending index). The detail is not cut: each entry's reason already is.
    #[must_use]
    pub fn batch(failures: &[BatchFailure]) -> Self {
        let mut sorted: Vec<&BatchFailure> = failures.iter().collect();
        sorted.sort_by_key(|f| f.index);
        let entries: Vec<serde_json::Value> =
            sorted.iter().map(|f| serde_json::json!([f.index, f.reason.to_string()])).collect();
        Self { category: RejectCategory::Batch, detail: serde_json::Value::Array(entries).to_string() }
    }

    /// The failing operations listed by a [`RejectCategory::Batch`] reason; `None` for any other
    /// category, `Some(Err(why))` for a batch reason whose detail does not parse.
    #[must_use]
    pub fn batch_failures(&self) -> Option<Result<Vec<BatchFailure>, String>> {
        if self.category != RejectCategory::Batch {
            return None;
        }
        let parsed = serde_json::from_str::<Vec<(usize, String)>>(&self.detail)
            .map_err(|e| format!("malformed batch rejection: {e}"))
            .map(|entries| {
                entries.into_iter().map(|(index, text)| BatchFailure { index, reason: Self::parse(&text) }).collect()
            });
        Some(parsed)
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.detail.is_empty() {
            f.write_str(self.category.as_str())
        } else {
            write!(f, "{}: {}", self.category.as_str(), self.detail)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn reasons_round_trip_through_their_wire_text() {
        for category in [
            RejectCategory::Stale,
            RejectCategory::Behind,
            RejectCategory::Invalid,
            RejectCategory::Conflict,
            RejectCategory::Busy,
            RejectCategory::Refused,
            RejectCategory::Failed,
            RejectCategory::Other("shrug".into()),
        ] {
            let reason = RejectReason::new(category, "block b: why: more");
            assert_eq!(RejectReason::parse(&reason.to_string()), reason);
        }
        assert_eq!(RejectReason::parse("behind").category, RejectCategory::Behind);
        assert_eq!(RejectReason::new(RejectCategory::Busy, "x".repeat(1000)).detail.len(), MAX_REJECT_DETAIL_CHARS);
    }

    #[test]
    fn batch_rejections_list_each_failing_operation_and_parse_back() {
        let awkward = RejectReason::new(RejectCategory::Conflict, "block \"a, b\"]: [[1,\"x\"]] is reserved by z");
        let stale = RejectReason::new(RejectCategory::Stale, "stale revision");
        let reason = RejectReason::batch(&[
            BatchFailure { index: 3, reason: awkward.clone() },
            BatchFailure { index: 0, reason: stale.clone() },
        ]);
        let text = reason.to_string();
        assert!(text.starts_with("batch: [[0,\"stale: stale revision\"],[3,"), "{text}");
        let parsed = RejectReason::parse(&text);
        assert_eq!(parsed.category, RejectCategory::Batch);
        let failures = parsed.batch_failures().unwrap().unwrap();
        assert_eq!(
            failures,
            vec![BatchFailure { index: 0, reason: stale }, BatchFailure { index: 3, reason: awkward }]
        );
        assert!(RejectReason::parse("batch: [[0").batch_failures().unwrap().is_err());
        assert!(RejectReason::parse("stale: x").batch_failures().is_none());
    }

    #[test]
    fn gaps_and_behind_vote_behind() {
        let block_id = BlockId::new("b").unwrap();
        let gap = Check::Gap { block_id: block_id.clone(), latest_rev: 1, rev: 5 };
        assert_eq!(gap.reject_reason().unwrap().category, RejectCategory::Behind);
        assert_eq!(gap.behind_block(), Some(&block_id));
        let behind = Check::Behind { block_id: block_id.clone(), error: RepoError::UnknownBlock(block_id.clone()) };
        assert_eq!(behind.reject_reason().unwrap().to_string(), "behind: unknown block b");
        assert!(Check::Ok.reject_reason().is_none() && Check::Done.reject_reason().is_none());
    }
}

//! Error types shared by the traits of this crate.
//!
//! Each variant says what the caller can and cannot know: for example `RepoError::Unavailable`
//! means the operation may or may not have been applied, while `RepoError::BadRequest` guarantees
//! that nothing changed.

use serde::{Deserialize, Serialize};

use crate::model::{BlockId, IdError, TrxId};

/// Why a transform cannot be applied to a block (SPEC 1.1). Nothing is ever applied partially.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransformError {
    /// An operation tried to change the block header.
    #[error("operations may not change the block header")]
    HeaderChange,
    /// An operation names a field the block does not have.
    #[error("field {entity:?} does not exist")]
    MissingField {
        /// The field.
        entity: String,
    },
    /// A splice targets a field that is not an array.
    #[error("field {entity:?} is not an array, cannot splice it")]
    NotAnArray {
        /// The field.
        entity: String,
    },
    /// A splice starts past the end of the array.
    #[error("splice index {index} is past the end of field {entity:?} (length {len})")]
    IndexPastEnd {
        /// The field.
        entity: String,
        /// The requested index.
        index: u64,
        /// The array's length.
        len: usize,
    },
    /// Updates were given for a block that does not exist at that point.
    #[error("block {block_id} does not exist, cannot update it")]
    BlockAbsent {
        /// The block.
        block_id: BlockId,
    },
    /// The block's JSON would be larger than the repository's `max_block_bytes` and larger than it
    /// is now (a block over the limit may still shrink).
    #[error(
        "the block would be {size_bytes} bytes of JSON, over the limit of {max_bytes} bytes (limits.max_block_bytes)"
    )]
    TooLarge {
        /// The size the transform would give the block.
        size_bytes: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// An insert's `header.id` differs from the id it is inserted under.
    #[error("insert under {key} carries header id {header_id}")]
    InsertIdMismatch {
        /// The id the block is inserted under.
        key: BlockId,
        /// The id in its header.
        header_id: BlockId,
    },
}

/// Errors of a storage engine. Any of them leaves stored data as it was before the call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An operating-system I/O error. Its text includes the I/O error's, so it is not also
    /// returned by `source()`.
    #[error("storage I/O error while {context}: {error}")]
    Io {
        /// What the engine was doing.
        context: String,
        /// The error.
        error: std::io::Error,
    },
    /// Stored data could not be decoded: the store is damaged or was written by something else.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The store has no room left (for example a full LMDB map).
    #[error("storage is full: {0}")]
    Full(String),
    /// Another process or handle holds the store.
    #[error("storage is locked: {0}")]
    Locked(String),
    /// The data directory has an unknown format version or belongs to another engine.
    #[error("incompatible storage: {0}")]
    Incompatible(String),
    /// The request is invalid for the store (for example a committed revision that does not
    /// advance `latest`). Nothing changed.
    #[error("invalid storage request: {0}")]
    Invalid(String),
    /// An engine failure with no underlying error to keep (a refused state, a closed queue, a
    /// plugin that panicked); failures caused by a library error are [`StorageError::Backend`].
    #[error("storage engine {engine} failed: {message}")]
    Failed {
        /// The engine.
        engine: &'static str,
        /// What failed.
        message: String,
    },
    /// The store was closed; every call after `close` (but `close` itself) fails with this.
    #[error("storage engine {engine} is closed")]
    Closed {
        /// The engine.
        engine: &'static str,
    },
    /// An engine failure caused by an error of the library underneath (LMDB, the file system's
    /// encoder, a blocking task), kept for callers that inspect it or downcast it. Its text
    /// includes the error's, so it is not also returned by `source()`.
    #[error("storage engine {engine} failed while {context}: {error}")]
    Backend {
        /// The engine.
        engine: &'static str,
        /// What the engine was doing.
        context: String,
        /// The underlying error.
        error: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl StorageError {
    /// An I/O error with what the engine was doing.
    pub fn io(context: impl Into<String>, error: std::io::Error) -> Self {
        Self::Io { context: context.into(), error }
    }

    /// An engine failure with what the engine was doing and the underlying error.
    pub fn backend(
        engine: &'static str,
        context: impl Into<String>,
        error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self::Backend { engine, context: context.into(), error: error.into() }
    }
}

/// The error codes of the wire error envelope (SPEC 3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Malformed JSON, unknown operation, invalid transform, oversize frame. Nothing changed.
    BadRequest,
    /// The message's expiration passed. Nothing changed.
    Expired,
    /// The cluster did not reach agreement. The operation was not applied.
    ConsensusFailed,
    /// The node could not reach what it needed; the operation may or may not have been applied.
    Unavailable,
    /// Too many requests in flight; retry later. Nothing changed.
    Busy,
    /// A bug or storage failure on the answering node.
    Internal,
}

impl ErrorCode {
    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::Expired => "expired",
            Self::ConsensusFailed => "consensus-failed",
            Self::Unavailable => "unavailable",
            Self::Busy => "busy",
            Self::Internal => "internal",
        }
    }

    /// Parses a wire code; unknown codes are `None`.
    pub fn parse(code: &str) -> Option<Self> {
        Some(match code {
            "bad-request" => Self::BadRequest,
            "expired" => Self::Expired,
            "consensus-failed" => Self::ConsensusFailed,
            "unavailable" => Self::Unavailable,
            "busy" => Self::Busy,
            "internal" => Self::Internal,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of a [`crate::repo::Repo`] operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// A transform is invalid for its block. Nothing changed. Its text includes the reason's (it
    /// travels as text in error envelopes), so the reason is not also returned by `source()`.
    #[error("invalid transform for block {block_id}: {reason}")]
    InvalidTransform {
        /// The block.
        block_id: BlockId,
        /// Why.
        reason: TransformError,
    },
    /// An update or delete names a block this peer has never seen. Nothing changed.
    #[error("unknown block {0}")]
    UnknownBlock(BlockId),
    /// A commit or read names a transaction that is not pending on a block. Nothing changed.
    #[error("pending transaction {trx_id} not found on {block_id}")]
    PendingNotFound {
        /// The transaction.
        trx_id: TrxId,
        /// The block.
        block_id: BlockId,
    },
    /// The transaction is already pending with different transforms. Nothing changed.
    #[error("transaction {trx_id} is already pending on {block_id} with different transforms")]
    TrxConflict {
        /// The transaction.
        trx_id: TrxId,
        /// The block.
        block_id: BlockId,
    },
    /// The transaction is already committed on the block; it cannot be pended again.
    #[error("transaction {trx_id} is already committed on {block_id}")]
    AlreadyCommitted {
        /// The transaction.
        trx_id: TrxId,
        /// The block.
        block_id: BlockId,
    },
    /// The request is malformed. Nothing changed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The message's expiration passed before it could be served. Nothing changed.
    #[error("request expired")]
    Expired,
    /// The cluster did not agree; the operation was not applied.
    #[error("consensus failed: {0}")]
    ConsensusFailed(String),
    /// A peer or the cluster could not be reached in time: the operation may or may not have
    /// been applied; re-reading tells.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The node is at its limit of requests in flight. Nothing changed; retry later.
    #[error("busy: {0}")]
    Busy(String),
    /// The storage engine failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An internal failure on the answering node.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<IdError> for RepoError {
    fn from(e: IdError) -> Self {
        Self::BadRequest(e.to_string())
    }
}

impl RepoError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidTransform { .. }
            | Self::UnknownBlock(_)
            | Self::PendingNotFound { .. }
            | Self::TrxConflict { .. }
            | Self::AlreadyCommitted { .. }
            | Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::Expired => ErrorCode::Expired,
            Self::ConsensusFailed(_) => ErrorCode::ConsensusFailed,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Busy(_) => ErrorCode::Busy,
            Self::Storage(_) | Self::Internal(_) => ErrorCode::Internal,
        }
    }

    /// Rebuilds an error from a received envelope (code and message).
    ///
    /// Peers send an error's whole text, which starts with the same words this side's text
    /// adds for the code (`bad request: `, `unavailable: `, ...): they are removed from the
    /// message so that the rebuilt error says them once.
    pub fn from_envelope(code: &str, message: String) -> Self {
        let code_parsed = ErrorCode::parse(code);
        let message = match code_parsed.and_then(Self::prefix_of) {
            Some(prefix) => {
                let mut rest = message.as_str();
                while let Some(shorter) = rest.strip_prefix(prefix) {
                    rest = shorter;
                }
                rest.to_owned()
            }
            None => message,
        };
        match code_parsed {
            Some(ErrorCode::BadRequest) => Self::BadRequest(message),
            Some(ErrorCode::Expired) => Self::Expired,
            Some(ErrorCode::ConsensusFailed) => Self::ConsensusFailed(message),
            Some(ErrorCode::Unavailable) => Self::Unavailable(message),
            Some(ErrorCode::Busy) => Self::Busy(message),
            Some(ErrorCode::Internal) => Self::Internal(message),
            None => Self::Internal(format!("unknown error code {code:?}: {message}")),
        }
    }

    /// The words an error rebuilt from an envelope with `code` starts its text with.
    fn prefix_of(code: ErrorCode) -> Option<&'static str> {
        match code {
            ErrorCode::BadRequest => Some("bad request: "),
            ErrorCode::ConsensusFailed => Some("consensus failed: "),
            ErrorCode::Unavailable => Some("unavailable: "),
            ErrorCode::Busy => Some("busy: "),
            ErrorCode::Internal => Some("internal error: "),
            ErrorCode::Expired => None,
        }
    }

    /// True when a retry of the same request may succeed (the cluster or node was busy or
    /// unreachable, or agreement failed).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::ConsensusFailed(_) | Self::Unavailable(_) | Self::Busy(_))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::error::Error as _;

    use super::*;

    /// No error's text repeats its `source()`: printing the chain would say it twice.
    fn says_its_cause_once(error: &(dyn std::error::Error + 'static)) {
        if let Some(source) = error.source() {
            let (text, cause) = (error.to_string(), source.to_string());
            assert!(!text.contains(&cause), "{text:?} repeats its source {cause:?}");
        }
    }

    #[test]
    fn errors_do_not_repeat_their_source() {
        let block_id = BlockId::new("diary").unwrap();
        let invalid =
            RepoError::InvalidTransform { block_id, reason: TransformError::MissingField { entity: "x".into() } };
        says_its_cause_once(&invalid);
        assert!(invalid.to_string().contains("field \"x\" does not exist"), "the reason is in the text: {invalid}");
        let io = StorageError::io("opening", std::io::Error::from(std::io::ErrorKind::NotFound));
        says_its_cause_once(&io);
        says_its_cause_once(&RepoError::Storage(io));
        let engine = StorageError::backend("lmdb", "committing", std::io::Error::other("disk on fire"));
        says_its_cause_once(&engine);
        assert!(engine.to_string().contains("disk on fire"), "the cause is in the text: {engine}");
        assert!(RepoError::Storage(StorageError::Full("map".into())).source().is_none());
    }

    #[test]
    fn an_envelope_round_trip_says_the_code_once() {
        for error in [
            RepoError::BadRequest("invalid transform for block diary".into()),
            RepoError::ConsensusFailed("1 of 3 peers approved".into()),
            RepoError::Unavailable("no route".into()),
            RepoError::Busy("queue full".into()),
            RepoError::Internal("bug".into()),
            RepoError::Expired,
        ] {
            let sent = error.to_string();
            let received = RepoError::from_envelope(error.code().as_str(), sent.clone());
            assert_eq!(received.to_string(), sent, "one hop");
            let again = RepoError::from_envelope(received.code().as_str(), received.to_string());
            assert_eq!(again.to_string(), sent, "a forwarded error");
        }
        let unknown = RepoError::InvalidTransform {
            block_id: BlockId::new("diary").unwrap(),
            reason: TransformError::HeaderChange,
        };
        let received = RepoError::from_envelope("bad-request", unknown.to_string());
        assert_eq!(received.to_string(), format!("bad request: {unknown}"));
    }
}

//! Repo protocol messages (SPEC 3.2): the request envelope, responses and the error envelope.
//!
//! Parsing never panics: any malformed input gives a [`WireError`] that maps to the `bad-request`
//! error code.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ErrorCode, RepoError};
use crate::model::{BlockGets, CommitRequest, CommitResult, GetBlockResults, PendRequest, PendResult, TrxBlocks};

/// Protocol id prefix used when none is configured.
pub const DEFAULT_PROTOCOL_PREFIX: &str = "/db-p2p";

/// The Kademlia protocol id for a prefix: `<prefix>/kad/1.0.0`. The other protocol ids come from
/// [`crate::network::ProtocolKind::protocol_id`].
pub fn kad_protocol(prefix: &str) -> String {
    format!("{prefix}/kad/1.0.0")
}

/// One repo operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum RepoOperation {
    /// Read blocks.
    Get(BlockGets),
    /// Pend a transaction.
    Pend(PendRequest),
    /// Cancel a pending transaction.
    Cancel {
        /// The transaction and its blocks.
        #[serde(rename = "trxRef")]
        trx_ref: TrxBlocks,
    },
    /// Commit a pending transaction.
    Commit(CommitRequest),
}

impl RepoOperation {
    /// The operation's name as on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Get(_) => "get",
            Self::Pend(_) => "pend",
            Self::Cancel { .. } => "cancel",
            Self::Commit(_) => "commit",
        }
    }
}

/// `{"operations": [op], "expiration": ms}` with exactly one operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RepoMessage {
    /// The operations; exactly one.
    pub operations: Vec<RepoOperation>,
    /// Milliseconds since the Unix epoch after which the message must not be served.
    pub expiration: u64,
}

impl RepoMessage {
    /// A message carrying one operation.
    pub fn new(operation: RepoOperation, expiration_ms: u64) -> Self {
        Self { operations: vec![operation], expiration: expiration_ms }
    }

    /// Parses and validates a message from JSON bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, WireError> {
        let message: Self = serde_json::from_slice(bytes).map_err(WireError::Json)?;
        message.validate()?;
        Ok(message)
    }

    /// Parses and validates a message from a JSON value.
    pub fn from_value(value: Value) -> Result<Self, WireError> {
        let message: Self = serde_json::from_value(value).map_err(WireError::Json)?;
        message.validate()?;
        Ok(message)
    }

    fn validate(&self) -> Result<(), WireError> {
        match self.operations.len() {
            1 => Ok(()),
            n => Err(WireError::OperationCount(n)),
        }
    }

    /// The single operation.
    pub fn operation(&self) -> Result<&RepoOperation, WireError> {
        match self.operations.as_slice() {
            [op] => Ok(op),
            ops => Err(WireError::OperationCount(ops.len())),
        }
    }

    /// Moves out the single operation.
    pub fn into_operation(self) -> Result<RepoOperation, WireError> {
        let n = self.operations.len();
        let mut ops = self.operations.into_iter();
        match (ops.next(), ops.next()) {
            (Some(op), None) => Ok(op),
            _ => Err(WireError::OperationCount(n)),
        }
    }

    /// True when `now_ms` is past the expiration.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expiration < now_ms
    }
}

/// Most operations one cluster record's message may carry (SPEC 4.14): the hard bound a member
/// accepts whatever its own `max_batch_ops`, so that nodes configured differently still agree.
pub const MAX_RECORD_OPERATIONS: usize = 1_024;

/// The message of a cluster record (SPEC 3.3, 4.14): `{"operations": [op, ...], "expiration": ms}`
/// with 1 to [`MAX_RECORD_OPERATIONS`] operations. A record of one operation carries exactly the
/// [`RepoMessage`] of the repo protocol (the same JSON); a batched record carries several, each
/// agreed and executed as if it were alone. Rules on which operations may share a record (their
/// block sets are pairwise disjoint) belong to the consensus that builds and checks it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordMessage {
    /// The operations, in the order their results are reported.
    pub operations: Vec<RepoOperation>,
    /// Milliseconds since the Unix epoch after which no member may execute the record.
    pub expiration: u64,
}

impl RecordMessage {
    /// Parses and validates a record's message: 1 to [`MAX_RECORD_OPERATIONS`] operations.
    pub fn from_value(value: &Value) -> Result<Self, WireError> {
        let message = Self::deserialize(value).map_err(WireError::Json)?;
        match message.operations.len() {
            1..=MAX_RECORD_OPERATIONS => Ok(message),
            n => Err(WireError::RecordOperationCount(n)),
        }
    }
}

impl From<RepoMessage> for RecordMessage {
    fn from(message: RepoMessage) -> Self {
        Self { operations: message.operations, expiration: message.expiration }
    }
}

/// A malformed message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The bytes are not JSON of the expected shape.
    #[error("malformed message: {0}")]
    Json(serde_json::Error),
    /// The message does not carry exactly one operation.
    #[error("a message carries exactly one operation, got {0}")]
    OperationCount(usize),
    /// A cluster record's message carries no operation or more than [`MAX_RECORD_OPERATIONS`].
    #[error("a record's message carries 1 to {MAX_RECORD_OPERATIONS} operations, got {0}")]
    RecordOperationCount(usize),
    /// A response of the wrong shape for its request.
    #[error("unexpected response: {0}")]
    UnexpectedResponse(String),
}

impl From<WireError> for RepoError {
    fn from(e: WireError) -> Self {
        Self::BadRequest(e.to_string())
    }
}

/// The body of an error envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The machine-readable code (see [`ErrorCode`]).
    pub code: String,
    /// A message for people.
    pub message: String,
}

/// `{"error": {"code", "message"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    /// The error.
    pub error: ErrorBody,
}

impl ErrorEnvelope {
    /// An envelope with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { error: ErrorBody { code: code.as_str().to_owned(), message: message.into() } }
    }

    /// Recognizes an error envelope in a response value.
    pub fn from_response(value: &Value) -> Option<Self> {
        let obj = value.as_object()?;
        if obj.len() != 1 {
            return None;
        }
        serde_json::from_value(value.clone()).ok()
    }

    /// The envelope as a typed error.
    pub fn into_error(self) -> RepoError {
        RepoError::from_envelope(&self.error.code, self.error.message)
    }
}

impl From<&RepoError> for ErrorEnvelope {
    fn from(e: &RepoError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

/// The successful answer to one repo operation.
#[derive(Clone, Debug, PartialEq)]
pub enum RepoResponse {
    /// Answer to `get`.
    Get(GetBlockResults),
    /// Answer to `pend`.
    Pend(PendResult),
    /// Answer to `cancel` (`null` on the wire).
    Cancel,
    /// Answer to `commit`.
    Commit(CommitResult),
}

impl RepoResponse {
    /// The answer as JSON.
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        match self {
            Self::Get(r) => serde_json::to_value(r),
            Self::Pend(r) => serde_json::to_value(r),
            Self::Cancel => Ok(Value::Null),
            Self::Commit(r) => serde_json::to_value(r),
        }
    }
}

/// Decodes a response to the given kind of operation: the error envelope becomes a typed error.
pub fn decode_response(kind: &str, value: Value) -> Result<RepoResponse, RepoError> {
    if let Some(envelope) = ErrorEnvelope::from_response(&value) {
        return Err(envelope.into_error());
    }
    let unexpected = |e: serde_json::Error| RepoError::Internal(format!("malformed {kind} response: {e}"));
    Ok(match kind {
        "get" => RepoResponse::Get(serde_json::from_value(value).map_err(unexpected)?),
        "pend" => RepoResponse::Pend(serde_json::from_value(value).map_err(unexpected)?),
        "cancel" => RepoResponse::Cancel,
        "commit" => RepoResponse::Commit(serde_json::from_value(value).map_err(unexpected)?),
        other => return Err(RepoError::Internal(format!("unknown operation kind {other:?}"))),
    })
}

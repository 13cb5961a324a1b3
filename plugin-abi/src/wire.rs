//! The JSON documents that cross the dynamic plugin boundary.

use std::io;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use optimystic_core::error::StorageError;
use optimystic_core::model::{BlockId, Transform, TrxId};
use optimystic_core::storage::{BlockCommit, BlockValue, CommittedTransform, StorageStats};

/// What the host sends to `open`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenRequest {
    /// The node's peer id (base58).
    pub local_peer_id: String,
    /// The node's data directory; `None` for ephemeral nodes.
    #[serde(default)]
    pub data_dir: Option<String>,
    /// The plugin's configuration section.
    #[serde(default)]
    pub config: Value,
}

/// What a successful `open` replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenReply {
    /// [`RawStorage::durable`](optimystic_core::storage::RawStorage::durable) of the opened engine, fixed for
    /// its lifetime.
    pub durable: bool,
}

/// Bytes as standard base64 text (metadata values).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetaBytes(pub Vec<u8>);

impl Serialize for MetaBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for MetaBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map(Self).map_err(serde::de::Error::custom)
    }
}

/// [`BlockCommit`] on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireBlockCommit {
    /// See [`BlockCommit::trx_id`].
    pub trx_id: TrxId,
    /// See [`BlockCommit::rev`].
    pub rev: u64,
    /// See [`BlockCommit::transform`].
    pub transform: Transform,
    /// See [`BlockCommit::value`].
    pub value: BlockValue,
    /// See [`BlockCommit::prune_value_at`].
    #[serde(default)]
    pub prune_value_at: Option<u64>,
}

impl From<&BlockCommit> for WireBlockCommit {
    fn from(c: &BlockCommit) -> Self {
        Self {
            trx_id: c.trx_id.clone(),
            rev: c.rev,
            transform: c.transform.clone(),
            value: c.value.clone(),
            prune_value_at: c.prune_value_at,
        }
    }
}

impl From<WireBlockCommit> for BlockCommit {
    fn from(c: WireBlockCommit) -> Self {
        Self { trx_id: c.trx_id, rev: c.rev, transform: c.transform, value: c.value, prune_value_at: c.prune_value_at }
    }
}

/// [`CommittedTransform`] on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireCommitted {
    /// See [`CommittedTransform::rev`].
    pub rev: u64,
    /// See [`CommittedTransform::transform`].
    pub transform: Transform,
}

impl From<CommittedTransform> for WireCommitted {
    fn from(c: CommittedTransform) -> Self {
        Self { rev: c.rev, transform: c.transform }
    }
}

impl From<WireCommitted> for CommittedTransform {
    fn from(c: WireCommitted) -> Self {
        Self { rev: c.rev, transform: c.transform }
    }
}

/// A kept materialized value (`{"value": null}` when the block does not exist at that revision),
/// so that "no value kept" (`null`) stays distinct from "kept: absent".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireValue {
    /// The block at that revision, `None` when it does not exist there.
    pub value: BlockValue,
}

/// [`StorageStats`] on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireStats {
    /// See [`StorageStats::blocks`].
    pub blocks: u64,
    /// See [`StorageStats::bytes`].
    #[serde(default)]
    pub bytes: Option<u64>,
}

impl From<StorageStats> for WireStats {
    fn from(s: StorageStats) -> Self {
        Self { blocks: s.blocks, bytes: s.bytes }
    }
}

impl From<WireStats> for StorageStats {
    fn from(s: WireStats) -> Self {
        Self { blocks: s.blocks, bytes: s.bytes }
    }
}

/// One [`RawStorage`](optimystic_core::storage::RawStorage) method call, as JSON `{"op": "<method>", ...}`
/// with camelCase arguments. Each variant names the JSON type of its successful reply.
/// `durable` is not a call: [`OpenReply`] answers it once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", rename_all_fields = "camelCase")]
pub enum StorageCall {
    /// `latest`; replies `Option<TrxRev>`.
    Latest {
        /// The block.
        block_id: BlockId,
    },
    /// `revisions`; replies `Vec<TrxRev>`.
    Revisions {
        /// The block.
        block_id: BlockId,
        /// First revision, inclusive.
        from_rev: u64,
        /// Last revision, inclusive.
        to_rev: u64,
    },
    /// `revision_at_or_before`; replies `Option<TrxRev>`.
    RevisionAtOrBefore {
        /// The block.
        block_id: BlockId,
        /// The revision bound, inclusive.
        at_rev: u64,
    },
    /// `committed`; replies `Option<WireCommitted>`.
    Committed {
        /// The block.
        block_id: BlockId,
        /// The transaction.
        trx_id: TrxId,
    },
    /// `pending`; replies `Option<Transform>`.
    Pending {
        /// The block.
        block_id: BlockId,
        /// The transaction.
        trx_id: TrxId,
    },
    /// `pending_trx_ids`; replies `Vec<TrxId>`.
    PendingTrxIds {
        /// The block.
        block_id: BlockId,
    },
    /// `save_pending`; replies `null`.
    SavePending {
        /// The block.
        block_id: BlockId,
        /// The transaction.
        trx_id: TrxId,
        /// Its transform on the block.
        transform: Box<Transform>,
    },
    /// `delete_pending`; replies `null`.
    DeletePending {
        /// The block.
        block_id: BlockId,
        /// The transaction.
        trx_id: TrxId,
    },
    /// `materialized`; replies `Option<WireValue>`.
    Materialized {
        /// The block.
        block_id: BlockId,
        /// The exact revision.
        rev: u64,
    },
    /// `commit_block`; replies `null`.
    CommitBlock {
        /// The block.
        block_id: BlockId,
        /// The commit step.
        commit: Box<WireBlockCommit>,
    },
    /// `get_meta`; replies `Option<MetaBytes>`.
    GetMeta {
        /// The key.
        key: String,
    },
    /// `put_meta`; replies `null`.
    PutMeta {
        /// The key.
        key: String,
        /// The value.
        value: MetaBytes,
    },
    /// `delete_meta`; replies `null`.
    DeleteMeta {
        /// The key.
        key: String,
    },
    /// `list_meta`; replies `Vec<(String, MetaBytes)>` (pairs as two-element arrays).
    ListMeta {
        /// The key prefix.
        prefix: String,
        /// The most entries to return.
        limit: usize,
    },
    /// `block_ids`; replies `Vec<BlockId>`.
    BlockIds {
        /// Start after this id.
        #[serde(default)]
        after: Option<BlockId>,
        /// The most ids to return.
        limit: usize,
    },
    /// `stats`; replies `Option<WireStats>`.
    Stats,
    /// `close`; replies `null`.
    Close,
}

impl StorageCall {
    /// The method name, as in `"op"`.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Latest { .. } => "latest",
            Self::Revisions { .. } => "revisions",
            Self::RevisionAtOrBefore { .. } => "revision_at_or_before",
            Self::Committed { .. } => "committed",
            Self::Pending { .. } => "pending",
            Self::PendingTrxIds { .. } => "pending_trx_ids",
            Self::SavePending { .. } => "save_pending",
            Self::DeletePending { .. } => "delete_pending",
            Self::Materialized { .. } => "materialized",
            Self::CommitBlock { .. } => "commit_block",
            Self::GetMeta { .. } => "get_meta",
            Self::PutMeta { .. } => "put_meta",
            Self::DeleteMeta { .. } => "delete_meta",
            Self::ListMeta { .. } => "list_meta",
            Self::BlockIds { .. } => "block_ids",
            Self::Stats => "stats",
            Self::Close => "close",
        }
    }
}

/// A [`StorageError`] on the wire, as JSON `{"kind": "<variant>", ...}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", rename_all_fields = "camelCase")]
pub enum WireStorageError {
    /// [`StorageError::Io`].
    Io {
        /// What the engine was doing.
        context: String,
        /// The `std::io::ErrorKind`, kebab-case (`not-found`, ...); `other` for kinds without a
        /// name here.
        io_kind: String,
        /// The OS error number, when the error came from the OS.
        #[serde(default)]
        os_code: Option<i32>,
        /// The error's text.
        message: String,
    },
    /// [`StorageError::Corrupt`].
    Corrupt {
        /// What is wrong.
        message: String,
    },
    /// [`StorageError::Full`].
    Full {
        /// What is full.
        message: String,
    },
    /// [`StorageError::Locked`].
    Locked {
        /// Who holds the store.
        message: String,
    },
    /// [`StorageError::Incompatible`].
    Incompatible {
        /// What is incompatible.
        message: String,
    },
    /// [`StorageError::Invalid`], and [`StorageError::Closed`] with its message.
    Invalid {
        /// What is invalid.
        message: String,
    },
    /// [`StorageError::Failed`], and [`StorageError::Backend`] with its error in the message
    /// (panics of the plugin arrive as this, too).
    Backend {
        /// The engine that failed.
        engine: String,
        /// What failed.
        message: String,
    },
}

/// `std::io::ErrorKind`s with a wire name; any other kind travels as `other`.
const IO_KINDS: &[(io::ErrorKind, &str)] = &[
    (io::ErrorKind::NotFound, "not-found"),
    (io::ErrorKind::PermissionDenied, "permission-denied"),
    (io::ErrorKind::AlreadyExists, "already-exists"),
    (io::ErrorKind::WouldBlock, "would-block"),
    (io::ErrorKind::InvalidInput, "invalid-input"),
    (io::ErrorKind::InvalidData, "invalid-data"),
    (io::ErrorKind::TimedOut, "timed-out"),
    (io::ErrorKind::WriteZero, "write-zero"),
    (io::ErrorKind::Interrupted, "interrupted"),
    (io::ErrorKind::Unsupported, "unsupported"),
    (io::ErrorKind::UnexpectedEof, "unexpected-eof"),
    (io::ErrorKind::OutOfMemory, "out-of-memory"),
    (io::ErrorKind::StorageFull, "storage-full"),
    (io::ErrorKind::ReadOnlyFilesystem, "read-only-filesystem"),
    (io::ErrorKind::QuotaExceeded, "quota-exceeded"),
    (io::ErrorKind::FileTooLarge, "file-too-large"),
    (io::ErrorKind::ResourceBusy, "resource-busy"),
    (io::ErrorKind::IsADirectory, "is-a-directory"),
    (io::ErrorKind::NotADirectory, "not-a-directory"),
    (io::ErrorKind::DirectoryNotEmpty, "directory-not-empty"),
    (io::ErrorKind::Other, "other"),
];

impl From<&StorageError> for WireStorageError {
    fn from(e: &StorageError) -> Self {
        match e {
            StorageError::Io { context, error } => Self::Io {
                context: context.clone(),
                io_kind: IO_KINDS
                    .iter()
                    .find(|(kind, _)| *kind == error.kind())
                    .map_or("other", |(_, name)| name)
                    .to_owned(),
                os_code: error.raw_os_error(),
                message: error.to_string(),
            },
            StorageError::Corrupt(message) => Self::Corrupt { message: message.clone() },
            StorageError::Full(message) => Self::Full { message: message.clone() },
            StorageError::Locked(message) => Self::Locked { message: message.clone() },
            StorageError::Incompatible(message) => Self::Incompatible { message: message.clone() },
            StorageError::Invalid(message) => Self::Invalid { message: message.clone() },
            StorageError::Failed { engine, message } => {
                Self::Backend { engine: (*engine).to_owned(), message: message.clone() }
            }
            // A closed store refused the call: the request was invalid for it (nothing changed).
            StorageError::Closed { .. } => Self::Invalid { message: e.to_string() },
            StorageError::Backend { engine, context, error } => {
                Self::Backend { engine: (*engine).to_owned(), message: format!("{context}: {error}") }
            }
            // A variant added to core after this ABI version: its text says what failed.
            other => Self::Backend { engine: "plugin".to_owned(), message: other.to_string() },
        }
    }
}

impl WireStorageError {
    /// The error as the host sees it. `engine` names the plugin: a `Backend` error from another
    /// engine name keeps that name in its message.
    pub fn into_storage_error(self, engine: &'static str) -> StorageError {
        match self {
            Self::Io { context, io_kind, os_code, message } => {
                let error = match os_code {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => {
                        let kind = IO_KINDS
                            .iter()
                            .find(|(_, name)| *name == io_kind)
                            .map_or(io::ErrorKind::Other, |(kind, _)| *kind);
                        io::Error::new(kind, message)
                    }
                };
                StorageError::Io { context, error }
            }
            Self::Corrupt { message } => StorageError::Corrupt(message),
            Self::Full { message } => StorageError::Full(message),
            Self::Locked { message } => StorageError::Locked(message),
            Self::Incompatible { message } => StorageError::Incompatible(message),
            Self::Invalid { message } => StorageError::Invalid(message),
            Self::Backend { engine: from, message } if from == engine => StorageError::Failed { engine, message },
            Self::Backend { engine: from, message } => {
                StorageError::Failed { engine, message: format!("{from}: {message}") }
            }
        }
    }
}

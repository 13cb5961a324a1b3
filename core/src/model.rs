//! The data model of SPEC section 1: blocks, transforms and transaction references.
//!
//! Every type serializes exactly as the SPEC's wire shape (camelCase names, optional fields omitted
//! when absent). Block ids and transaction ids are validated newtypes: a value outside the SPEC's
//! bounds cannot be constructed, so it is refused at deserialization with a typed error.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::error::TransformError;

/// Largest block id, in UTF-8 bytes (SPEC 1).
pub const MAX_BLOCK_ID_BYTES: usize = 256;
/// Largest transaction id, in UTF-8 bytes (SPEC 1).
pub const MAX_TRX_ID_BYTES: usize = 128;
/// The block field that operations may never change.
pub const HEADER_FIELD: &str = "header";

macro_rules! bounded_id {
    ($(#[$doc:meta])* $name:ident, $max:expr, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps an id: 1 to the maximum number of UTF-8 bytes.
            pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
                let id = id.into();
                if id.is_empty() || id.len() > $max {
                    return Err(IdError { what: $what, len: id.len(), max: $max });
                }
                Ok(Self(id))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as owned text.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(id: String) -> Result<Self, IdError> {
                Self::new(id)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(id: &str) -> Result<Self, IdError> {
                Self::new(id)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

bounded_id!(
    /// An opaque block id: 1..=256 UTF-8 bytes.
    BlockId,
    MAX_BLOCK_ID_BYTES,
    "block id"
);
bounded_id!(
    /// An opaque transaction id: 1..=128 UTF-8 bytes.
    TrxId,
    MAX_TRX_ID_BYTES,
    "transaction id"
);

/// An id outside its length bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be 1..={max} UTF-8 bytes, got {len}")]
pub struct IdError {
    /// Which kind of id.
    pub what: &'static str,
    /// Its length in bytes.
    pub len: usize,
    /// The maximum length in bytes.
    pub max: usize,
}

/// `{"id", "type", "collectionId"}`; fields other implementations add are kept and round-trip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockHeader {
    /// The block's id.
    pub id: BlockId,
    /// The block's type tag.
    #[serde(rename = "type")]
    pub block_type: String,
    /// The collection the block belongs to.
    pub collection_id: String,
    /// Unknown header fields, kept untouched.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A versioned JSON document: a header plus free fields that round-trip untouched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Block {
    /// The block header; operations can never change it.
    pub header: BlockHeader,
    /// Every other field of the block.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl Block {
    /// A block with the given header values and no other fields.
    pub fn new(id: BlockId, block_type: impl Into<String>, collection_id: impl Into<String>) -> Self {
        Self {
            header: BlockHeader {
                id,
                block_type: block_type.into(),
                collection_id: collection_id.into(),
                extra: Map::new(),
            },
            fields: Map::new(),
        }
    }

    /// Adds a free field (builder style).
    pub fn with_field(mut self, name: impl Into<String>, value: Value) -> Self {
        self.fields.insert(name.into(), value);
        self
    }
}

/// `[entity, index, deleteCount, inserted]` (SPEC 1.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockOperation(pub String, pub u64, pub u64, pub Value);

impl BlockOperation {
    /// A splice of the array field `entity`: remove `delete_count` items at `index`, insert `items`.
    pub fn splice(entity: impl Into<String>, index: u64, delete_count: u64, items: Vec<Value>) -> Self {
        Self(entity.into(), index, delete_count, Value::Array(items))
    }

    /// Sets the field `entity` to `value` (which must not be an array: arrays mean splice).
    pub fn set(entity: impl Into<String>, value: Value) -> Self {
        Self(entity.into(), 0, 0, value)
    }

    /// The field the operation changes.
    pub fn entity(&self) -> &str {
        &self.0
    }

    /// Applies the operation to a block in place (SPEC 1.1).
    ///
    /// On error the block is unchanged: every check happens before any mutation.
    pub fn apply(&self, block: &mut Block) -> Result<(), TransformError> {
        let BlockOperation(entity, index, delete_count, inserted) = self;
        if entity == HEADER_FIELD {
            return Err(TransformError::HeaderChange);
        }
        match inserted {
            Value::Array(items) => {
                let Some(field) = block.fields.get_mut(entity.as_str()) else {
                    return Err(TransformError::MissingField { entity: entity.clone() });
                };
                let Value::Array(target) = field else {
                    return Err(TransformError::NotAnArray { entity: entity.clone() });
                };
                let len = target.len();
                let start = usize::try_from(*index).ok().filter(|i| *i <= len).ok_or(TransformError::IndexPastEnd {
                    entity: entity.clone(),
                    index: *index,
                    len,
                })?;
                let end = start.saturating_add(usize::try_from(*delete_count).unwrap_or(usize::MAX)).min(len);
                target.splice(start..end, items.iter().cloned());
            }
            // A set creates the field when it is absent (SPEC 1.1).
            other => {
                block.fields.insert(entity.clone(), other.clone());
            }
        }
        Ok(())
    }
}

/// The change a transaction makes to one block: insert, then updates, then delete.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transform {
    /// The block's new value, replacing any previous one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insert: Option<Block>,
    /// Operations applied after the insert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates: Option<Vec<BlockOperation>>,
    /// Whether the block is deleted last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete: Option<bool>,
}

impl Transform {
    /// True when the transform does nothing.
    pub fn is_empty(&self) -> bool {
        self.insert.is_none() && self.updates.as_ref().is_none_or(Vec::is_empty) && self.delete != Some(true)
    }

    /// True when the transform inserts the block.
    pub fn inserts(&self) -> bool {
        self.insert.is_some()
    }

    /// Applies the transform to a block's value (`None` = the block does not exist).
    ///
    /// Returns the new value (`None` when deleted). Fails, changing nothing, when an update meets a
    /// block that does not exist or an operation is invalid for the value.
    pub fn apply(&self, value: Option<&Block>, block_id: &BlockId) -> Result<Option<Block>, TransformError> {
        let mut current = match &self.insert {
            Some(block) => Some(block.clone()),
            None => value.cloned(),
        };
        if let Some(updates) = self.updates.as_ref().filter(|u| !u.is_empty()) {
            let Some(block) = current.as_mut() else {
                return Err(TransformError::BlockAbsent { block_id: block_id.clone() });
            };
            for op in updates {
                op.apply(block)?;
            }
        }
        if self.delete == Some(true) {
            current = None;
        }
        Ok(current)
    }

    /// Checks what can be checked without the block's value: an insert's header id matches its key
    /// and no operation targets the header.
    pub fn validate_shape(&self, block_id: &BlockId) -> Result<(), TransformError> {
        if let Some(block) = &self.insert
            && block.header.id != *block_id
        {
            return Err(TransformError::InsertIdMismatch { key: block_id.clone(), header_id: block.header.id.clone() });
        }
        for op in self.updates.iter().flatten() {
            if op.entity() == HEADER_FIELD {
                return Err(TransformError::HeaderChange);
            }
        }
        Ok(())
    }
}

/// All the changes of one transaction, per block (`deletes` is a JSON array).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transforms {
    /// Blocks inserted, by id.
    #[serde(default)]
    pub inserts: BTreeMap<BlockId, Block>,
    /// Operations per block id.
    #[serde(default)]
    pub updates: BTreeMap<BlockId, Vec<BlockOperation>>,
    /// Blocks deleted.
    #[serde(default)]
    pub deletes: Vec<BlockId>,
}

impl Transforms {
    /// Every block id the transforms touch, sorted and without duplicates.
    pub fn block_ids(&self) -> Vec<BlockId> {
        let mut ids: Vec<BlockId> =
            self.inserts.keys().chain(self.updates.keys()).chain(self.deletes.iter()).cloned().collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The transform of one block (empty when the block is not touched).
    pub fn transform_for(&self, block_id: &BlockId) -> Transform {
        Transform {
            insert: self.inserts.get(block_id).cloned(),
            updates: self.updates.get(block_id).cloned(),
            delete: self.deletes.contains(block_id).then_some(true),
        }
    }

    /// Adds one block's transform.
    pub fn add(&mut self, block_id: &BlockId, transform: &Transform) {
        if let Some(block) = &transform.insert {
            self.inserts.insert(block_id.clone(), block.clone());
        }
        if let Some(updates) = &transform.updates {
            self.updates.insert(block_id.clone(), updates.clone());
        }
        if transform.delete == Some(true) && !self.deletes.contains(block_id) {
            self.deletes.push(block_id.clone());
        }
    }

    /// The transforms of a single block.
    pub fn single(block_id: &BlockId, transform: &Transform) -> Self {
        let mut t = Self::default();
        t.add(block_id, transform);
        t
    }
}

/// A committed revision: which transaction made it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrxRev {
    /// The transaction.
    pub trx_id: TrxId,
    /// The block revision it produced.
    pub rev: u64,
}

/// A read context (SPEC 2 get).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrxContext {
    /// Transactions the reader knows are committed (used for read-driven promotion).
    #[serde(default)]
    pub committed: Vec<TrxRev>,
    /// The revision to read at.
    pub rev: u64,
    /// A pending transaction whose own writes the read includes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trx_id: Option<TrxId>,
}

/// A transaction and the blocks it concerns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrxBlocks {
    /// The transaction.
    pub trx_id: TrxId,
    /// Its blocks.
    pub block_ids: Vec<BlockId>,
}

/// A committed transaction with its transforms, as reported in `missing`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrxTransforms {
    /// The transaction.
    pub trx_id: TrxId,
    /// The revision it was committed at.
    pub rev: u64,
    /// Its transforms on the blocks concerned.
    pub transforms: Transforms,
}

/// A transaction pending on a block, as reported in `pending`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockTrxRef {
    /// The block.
    pub block_id: BlockId,
    /// The pending transaction.
    pub trx_id: TrxId,
    /// Its transform, included for policy `r`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<Transform>,
}

/// How a node serves `get` (see `crate::reads`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadMode {
    /// Consult a majority of the block's cluster and catch up first when behind: never misses an
    /// acknowledged commit.
    #[default]
    Quorum,
    /// Answer from local storage: fastest, may be stale.
    Local,
}

/// `get` request: blocks to read, optionally in a read context.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockGets {
    /// The blocks to read; duplicates are answered once.
    pub block_ids: Vec<BlockId>,
    /// The read context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<TrxContext>,
    /// Overrides the serving node's read mode for this request (an extension of the SPEC shape;
    /// peers that do not know it ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_mode: Option<ReadMode>,
}

/// A peer's view of one block's transactions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockTrxState {
    /// The newest committed revision, absent for an unknown block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<TrxRev>,
    /// Transactions pending on the block.
    #[serde(default)]
    pub pendings: Vec<TrxId>,
}

/// One block's answer to `get`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockGetResult {
    /// The block, absent when it does not exist at the revision read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<Block>,
    /// The peer's transaction state of the block.
    pub state: BlockTrxState,
}

/// `get` answer: one entry per distinct requested block id.
pub type GetBlockResults = BTreeMap<BlockId, BlockGetResult>;

/// How `pend` treats other transactions pending on the same blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PendPolicy {
    /// Continue: pend alongside others.
    #[serde(rename = "c")]
    Continue,
    /// Fail, listing the other pending transactions.
    #[serde(rename = "f")]
    Fail,
    /// Fail, listing the other pending transactions with their transforms.
    #[serde(rename = "r")]
    Return,
}

/// `pend` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendRequest {
    /// The transaction.
    pub trx_id: TrxId,
    /// The revision the transaction expects to commit at (enables the stale check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<u64>,
    /// Its changes.
    pub transforms: Transforms,
    /// What to do about other pending transactions.
    pub policy: PendPolicy,
}

/// `commit` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitRequest {
    /// The transaction.
    pub trx_id: TrxId,
    /// The blocks to commit it on.
    pub block_ids: Vec<BlockId>,
    /// The revision it commits at.
    pub rev: u64,
    /// The log tail block (the multi-cluster commit point).
    pub tail_id: BlockId,
    /// The header block, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_id: Option<BlockId>,
}

/// `pend` success.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendSuccess {
    /// Always `true`.
    pub success: True,
    /// Other transactions pending on the same blocks.
    #[serde(default)]
    pub pending: Vec<BlockTrxRef>,
    /// The blocks now pending.
    pub block_ids: Vec<BlockId>,
}

/// A stale answer: the client must re-read and retry. It is an answer, not an error.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StaleFailure {
    /// Always `false`.
    pub success: False,
    /// Why, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Committed transactions the client has not seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<Vec<TrxTransforms>>,
    /// Transactions pending on the blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Vec<BlockTrxRef>>,
}

impl StaleFailure {
    /// True when it reports nothing at all.
    pub fn is_empty(&self) -> bool {
        self.missing.as_ref().is_none_or(Vec::is_empty) && self.pending.as_ref().is_none_or(Vec::is_empty)
    }
}

/// `pend` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PendResult {
    /// Pended.
    Success(PendSuccess),
    /// Not pended: stale or blocked by other pending transactions.
    Stale(StaleFailure),
}

/// `{"success": true}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CommitSuccess {
    /// Always `true`.
    pub success: True,
}

/// `commit` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CommitResult {
    /// Committed (or already committed).
    Success(CommitSuccess),
    /// Not committed: the block moved on.
    Stale(StaleFailure),
}

impl CommitResult {
    /// The success answer.
    pub fn success() -> Self {
        Self::Success(CommitSuccess::default())
    }

    /// True on success.
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Success(_))
    }
}

macro_rules! bool_literal {
    ($(#[$doc:meta])* $name:ident, $value:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name;

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bool($value)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if bool::deserialize(d)? == $value {
                    Ok($name)
                } else {
                    Err(serde::de::Error::custom(concat!("expected ", stringify!($value))))
                }
            }
        }
    };
}

bool_literal!(
    /// The JSON literal `true` (tags success answers).
    True,
    true
);
bool_literal!(
    /// The JSON literal `false` (tags failure answers).
    False,
    false
);

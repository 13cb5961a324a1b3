//! The `ClusterRecord` of the cluster protocol (SPEC 3.3) and its verification (SPEC 3.4).
//!
//! A record carries the repo `message` being agreed on, the peer set it is agreed by, and the
//! members' signed promise and commit votes. Everything that is hashed is kept as received:
//! `message` stays a [`serde_json::Value`], unknown top-level fields are kept in
//! [`ClusterRecord::extra`], unknown fields inside votes and peers are kept in their `extra` maps,
//! and the promises object a record arrived with is kept verbatim for `commitHash` as long as the
//! typed [`ClusterRecord::promises`] still equal what arrived (see
//! [`ClusterRecord::promises_value`]).
//!
//! What the hashes cover: `messageHash` covers `message` and the membership digest; the digest
//! covers the set of peer ids only. Multiaddrs are **not** covered (they churn; a relay may rewrite
//! them without invalidating anything), and `publicKey` is not hashed either but is checked against
//! the key embedded in its peer id, so it cannot be changed. Unknown top-level fields are ignored
//! by verification, as SPEC 3.4 requires.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use libp2p_identity::{Keypair, PeerId, ed25519};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::canon::canon;
use crate::crypto::{self, CryptoError};

/// The membership-binding version this implementation writes and accepts: the peer-id set is
/// folded into every hash.
pub const MEMBERSHIP_VERSION: u32 = 2;

/// One peer of a record's peer set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPeer {
    /// Addresses the peer can be dialled at; not covered by any hash.
    #[serde(default)]
    pub multiaddrs: Vec<String>,
    /// base64url (no padding) of the peer's raw 32-byte Ed25519 key; must match its peer id.
    pub public_key: String,
    /// Unknown fields, kept so that a record round-trips untouched.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ClusterPeer {
    /// A peer entry for `peer_id` with its `publicKey` read out of the id.
    pub fn new(peer_id: &PeerId, multiaddrs: Vec<String>) -> Result<Self, CryptoError> {
        let key = crypto::peer_ed25519_key(peer_id)?;
        Ok(Self { multiaddrs, public_key: crypto::base64url_encode(&key.to_bytes()), extra: Map::new() })
    }

    /// The peer entry as a JSON object.
    #[must_use]
    pub fn to_value(&self) -> Value {
        let mut map = Map::new();
        map.insert("multiaddrs".to_owned(), Value::Array(self.multiaddrs.iter().cloned().map(Value::String).collect()));
        map.insert("publicKey".to_owned(), Value::String(self.public_key.clone()));
        for (key, value) in &self.extra {
            map.entry(key.clone()).or_insert_with(|| value.clone());
        }
        Value::Object(map)
    }
}

/// The kind of a vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VoteType {
    /// The member agrees.
    Approve,
    /// The member refuses; the vote may carry a `rejectReason`.
    Reject,
    /// The member holds a conflicting record that won the race (sent by other implementations);
    /// the vote carries `conflictWith`, that record's messageHash.
    Conflict,
}

impl VoteType {
    /// The wire name: `approve`, `reject` or `conflict`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Approve => "approve",
            Self::Reject => "reject",
            Self::Conflict => "conflict",
        }
    }
}

impl fmt::Display for VoteType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A member's signed vote in a record's `promises` or `commits`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vote {
    /// approve, reject or conflict.
    pub r#type: VoteType,
    /// base64url Ed25519 signature of [`Vote::payload`].
    pub signature: String,
    /// Why a reject was cast; signed when non-empty and the vote is a reject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject_reason: Option<String>,
    /// The messageHash of the winning record of a conflict vote; signed when non-empty and the
    /// vote is a conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict_with: Option<String>,
    /// Unknown fields, kept so that the promises object hashes as received.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Vote {
    /// Signs a vote on `hash` (a promiseHash or commitHash). `detail` becomes the `rejectReason`
    /// of a reject or the `conflictWith` of a conflict, and is ignored for an approve.
    pub fn sign(
        keypair: &Keypair,
        hash: &str,
        vote_type: VoteType,
        detail: Option<String>,
    ) -> Result<Self, CryptoError> {
        let (reject_reason, conflict_with) = match vote_type {
            VoteType::Approve => (None, None),
            VoteType::Reject => (detail, None),
            VoteType::Conflict => (None, detail),
        };
        let mut vote =
            Self { r#type: vote_type, signature: String::new(), reject_reason, conflict_with, extra: Map::new() };
        vote.signature = crypto::sign(keypair, vote.payload(hash).as_bytes())?;
        Ok(vote)
    }

    /// The field the signature covers besides hash and type: `rejectReason` for a reject,
    /// `conflictWith` for a conflict, nothing for an approve.
    #[must_use]
    pub fn signed_extra(&self) -> Option<&str> {
        match self.r#type {
            VoteType::Approve => None,
            VoteType::Reject => self.reject_reason.as_deref(),
            VoteType::Conflict => self.conflict_with.as_deref(),
        }
    }

    /// The signed text for this vote on `hash`; see [`crypto::vote_payload`].
    #[must_use]
    pub fn payload(&self, hash: &str) -> String {
        crypto::vote_payload(hash, self.r#type.as_str(), self.signed_extra())
    }

    /// Verifies this vote on `hash` against the key embedded in `peer_id`.
    pub fn verify(&self, peer_id: &PeerId, hash: &str) -> Result<(), CryptoError> {
        crypto::verify(peer_id, self.payload(hash).as_bytes(), &self.signature)
    }

    /// Verifies this vote on `hash` against an Ed25519 key.
    pub fn verify_with_key(&self, key: &ed25519::PublicKey, hash: &str) -> Result<(), CryptoError> {
        crypto::verify_with_key(key, self.payload(hash).as_bytes(), &self.signature)
    }

    /// Whether this is an approve vote.
    #[must_use]
    pub fn is_approve(&self) -> bool {
        self.r#type == VoteType::Approve
    }

    /// The vote as a JSON object (the same as `serde_json::to_value`).
    #[must_use]
    pub fn to_value(&self) -> Value {
        let mut map = Map::new();
        map.insert("type".to_owned(), Value::String(self.r#type.as_str().to_owned()));
        map.insert("signature".to_owned(), Value::String(self.signature.clone()));
        if let Some(reason) = &self.reject_reason {
            map.insert("rejectReason".to_owned(), Value::String(reason.clone()));
        }
        if let Some(other) = &self.conflict_with {
            map.insert("conflictWith".to_owned(), Value::String(other.clone()));
        }
        for (key, value) in &self.extra {
            map.entry(key.clone()).or_insert_with(|| value.clone());
        }
        Value::Object(map)
    }
}

/// Counts the votes of one type in a vote map.
#[must_use]
pub fn count_votes(votes: &BTreeMap<String, Vote>, vote_type: VoteType) -> usize {
    votes.values().filter(|v| v.r#type == vote_type).count()
}

/// Counts the approve votes in a vote map.
#[must_use]
pub fn count_approvals(votes: &BTreeMap<String, Vote>) -> usize {
    count_votes(votes, VoteType::Approve)
}

/// The two vote rounds of the majority two-phase commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Phase 1, votes in `promises`, signed over the promiseHash.
    Promise,
    /// Phase 2, votes in `commits`, signed over the commitHash.
    Commit,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Promise => "promise",
            Self::Commit => "commit",
        })
    }
}

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The JSON is not a cluster record (missing or mistyped field, unknown vote type, ...).
    #[error("malformed cluster record: {0}")]
    Malformed(String),
    /// `membershipVersion` is not [`MEMBERSHIP_VERSION`].
    #[error("unsupported membershipVersion {0}, expected 2")]
    UnsupportedMembershipVersion(u32),
    /// `membershipDigest` is not the digest of the record's peer ids.
    #[error("membershipDigest mismatch: computed {expected}, record has {found}")]
    DigestMismatch {
        /// The digest computed over the peer ids.
        expected: String,
        /// The digest the record carries.
        found: String,
    },
    /// `messageHash` is not the hash of the message and digest.
    #[error("messageHash mismatch: computed {expected}, record has {found}")]
    HashMismatch {
        /// The hash computed from message and digest.
        expected: String,
        /// The hash the record carries.
        found: String,
    },
    /// A peer id of the peer set cannot be used (not a peer id, key not embedded, not Ed25519).
    #[error("bad peer id {peer}: {reason}")]
    BadPeerId {
        /// The peer id text.
        peer: String,
        /// What is wrong with it (in the text above, so not also returned by `source()`).
        reason: CryptoError,
    },
    /// A peer's `publicKey` is not the key embedded in its peer id.
    #[error("publicKey of peer {peer} does not match its peer id")]
    PublicKeyMismatch {
        /// The peer id.
        peer: String,
    },
    /// A vote from a peer outside the record's peer set.
    #[error("{phase} vote from {peer}, which is not in the peer set")]
    UnknownVoter {
        /// The voter's peer id text.
        peer: String,
        /// Which round the vote is in.
        phase: Phase,
    },
    /// A vote's signature does not verify.
    #[error("bad {phase} signature of {peer}: {reason}")]
    BadSignature {
        /// The voter's peer id.
        peer: String,
        /// Which round the vote is in.
        phase: Phase,
        /// Why it does not verify (in the text above, so not also returned by `source()`).
        reason: CryptoError,
    },
    /// The message's `expiration` has passed.
    #[error("record expired at {expiration_ms} ms, now is {now_ms} ms")]
    Expired {
        /// The message's expiration, ms since the Unix epoch (rounded down, 0 when negative).
        expiration_ms: u64,
        /// The clock the record was checked against.
        now_ms: u64,
    },
}

/// The promises object as it arrived, with its parse at that time.
#[derive(Debug, Clone)]
struct ReceivedPromises {
    raw: Value,
    parsed: BTreeMap<String, Vote>,
}

/// A cluster record (SPEC 3.3). Parse it with [`ClusterRecord::from_value`] (or serde, which does
/// the same) so the promises object is kept as received for `commitHash`.
#[derive(Debug, Clone)]
pub struct ClusterRecord {
    /// `"z"` + base58btc hash of message and membership digest; identifies the record.
    pub message_hash: String,
    /// The peer set, by peer id.
    pub peers: BTreeMap<String, ClusterPeer>,
    /// Membership-binding version; 2 (the default when absent).
    pub membership_version: u32,
    /// Digest of the peer ids.
    pub membership_digest: String,
    /// The repo message being agreed on, as received.
    pub message: Value,
    /// Phase 1 votes by peer id.
    pub promises: BTreeMap<String, Vote>,
    /// Phase 2 votes by peer id.
    pub commits: BTreeMap<String, Vote>,
    /// Unknown top-level fields (e.g. `suggestedClusterSize`), kept untouched and not verified.
    /// Keys equal to a known field name are ignored when the record is written.
    pub extra: Map<String, Value>,
    /// The promises object as received, used for `commitHash` while `promises` still equals it.
    received_promises: Option<ReceivedPromises>,
}

impl PartialEq for ClusterRecord {
    fn eq(&self, other: &Self) -> bool {
        self.message_hash == other.message_hash
            && self.peers == other.peers
            && self.membership_version == other.membership_version
            && self.membership_digest == other.membership_digest
            && self.message == other.message
            && self.promises == other.promises
            && self.commits == other.commits
            && self.extra == other.extra
    }
}

impl Eq for ClusterRecord {}

fn malformed(e: serde_json::Error) -> RecordError {
    RecordError::Malformed(e.to_string())
}

fn missing_field(name: &str) -> RecordError {
    RecordError::Malformed(format!("missing field `{name}`"))
}

/// Takes field `name` out of a record object and parses it; `None` when absent.
fn optional<T: serde::de::DeserializeOwned>(
    map: &mut Map<String, Value>,
    name: &str,
) -> Result<Option<T>, RecordError> {
    map.remove(name)
        .map(|value| serde_json::from_value(value).map_err(|e| RecordError::Malformed(format!("field `{name}`: {e}"))))
        .transpose()
}

/// Takes field `name` out of a record object and parses it; an error when absent.
fn required<T: serde::de::DeserializeOwned>(map: &mut Map<String, Value>, name: &str) -> Result<T, RecordError> {
    optional(map, name)?.ok_or_else(|| missing_field(name))
}

const KNOWN_FIELDS: [&str; 7] =
    ["messageHash", "peers", "membershipVersion", "membershipDigest", "message", "promises", "commits"];

impl ClusterRecord {
    /// Builds a record without votes for `message` and peer set `peers`, computing its
    /// membership digest and messageHash.
    #[must_use]
    pub fn new(peers: BTreeMap<String, ClusterPeer>, message: Value) -> Self {
        let membership_digest = crypto::membership_digest(peers.keys());
        let message_hash = crypto::message_hash(&message, &membership_digest);
        Self {
            message_hash,
            peers,
            membership_version: MEMBERSHIP_VERSION,
            membership_digest,
            message,
            promises: BTreeMap::new(),
            commits: BTreeMap::new(),
            extra: Map::new(),
            received_promises: None,
        }
    }

    /// Parses a record from JSON, keeping its promises object verbatim for `commitHash`.
    /// Does not verify it; see [`ClusterRecord::verify`].
    ///
    /// The fields are taken out of the object one by one: the message (the bulk of a record)
    /// moves into the record as it is, and the promises object is parsed in place and kept.
    pub fn from_value(value: Value) -> Result<Self, RecordError> {
        let Value::Object(mut map) = value else {
            return Err(RecordError::Malformed("not a JSON object".to_owned()));
        };
        let message_hash: String = required(&mut map, "messageHash")?;
        let peers: BTreeMap<String, ClusterPeer> = required(&mut map, "peers")?;
        let membership_version: u32 = optional(&mut map, "membershipVersion")?.unwrap_or(MEMBERSHIP_VERSION);
        let membership_digest: String = required(&mut map, "membershipDigest")?;
        let message = map.remove("message").ok_or_else(|| missing_field("message"))?;
        let (promises, received_promises) = match map.remove("promises") {
            Some(raw) => {
                let parsed = BTreeMap::<String, Vote>::deserialize(&raw).map_err(malformed)?;
                (parsed.clone(), Some(ReceivedPromises { raw, parsed }))
            }
            None => (BTreeMap::new(), None),
        };
        let commits: BTreeMap<String, Vote> = optional(&mut map, "commits")?.unwrap_or_default();
        Ok(Self {
            message_hash,
            peers,
            membership_version,
            membership_digest,
            message,
            promises,
            commits,
            extra: map,
            received_promises,
        })
    }

    /// Parses a record from JSON text; see [`ClusterRecord::from_value`].
    pub fn from_json(text: &str) -> Result<Self, RecordError> {
        let value: Value = serde_json::from_str(text).map_err(|e| RecordError::Malformed(e.to_string()))?;
        Self::from_value(value)
    }

    /// The record as a JSON object, the promises as received when unchanged.
    #[must_use]
    pub fn to_value(&self) -> Value {
        let mut map = Map::new();
        map.insert("messageHash".to_owned(), Value::String(self.message_hash.clone()));
        map.insert(
            "peers".to_owned(),
            Value::Object(self.peers.iter().map(|(id, peer)| (id.clone(), peer.to_value())).collect()),
        );
        map.insert("membershipVersion".to_owned(), Value::from(self.membership_version));
        map.insert("membershipDigest".to_owned(), Value::String(self.membership_digest.clone()));
        map.insert("message".to_owned(), self.message.clone());
        map.insert("promises".to_owned(), self.promises_value());
        map.insert("commits".to_owned(), votes_value(&self.commits));
        for (key, value) in &self.extra {
            if !KNOWN_FIELDS.contains(&key.as_str()) {
                map.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
        Value::Object(map)
    }

    /// The record as a JSON object, like [`Self::to_value`], consuming it: the message and the
    /// promises as received move instead of being copied.
    #[must_use]
    pub fn into_value(mut self) -> Value {
        let promises = match self.received_promises.take() {
            Some(received) if received.parsed == self.promises => received.raw,
            _ => votes_value(&self.promises),
        };
        let mut map = Map::new();
        map.insert("messageHash".to_owned(), Value::String(self.message_hash));
        map.insert(
            "peers".to_owned(),
            Value::Object(self.peers.iter().map(|(id, peer)| (id.clone(), peer.to_value())).collect()),
        );
        map.insert("membershipVersion".to_owned(), Value::from(self.membership_version));
        map.insert("membershipDigest".to_owned(), Value::String(self.membership_digest));
        map.insert("message".to_owned(), self.message);
        map.insert("promises".to_owned(), promises);
        map.insert("commits".to_owned(), votes_value(&self.commits));
        for (key, value) in self.extra {
            if !KNOWN_FIELDS.contains(&key.as_str()) {
                map.entry(key).or_insert(value);
            }
        }
        Value::Object(map)
    }

    /// The promises object `commitHash` covers: the object as received while [`Self::promises`]
    /// still equals what arrived, otherwise the current votes serialized.
    #[must_use]
    pub fn promises_value(&self) -> Value {
        self.promises_for_hash().into_owned()
    }

    /// [`Self::promises_value`], borrowed when it is the object as received.
    fn promises_for_hash(&self) -> Cow<'_, Value> {
        match &self.received_promises {
            Some(received) if received.parsed == self.promises => Cow::Borrowed(&received.raw),
            _ => Cow::Owned(votes_value(&self.promises)),
        }
    }

    /// The membership digest of the current peer set.
    #[must_use]
    pub fn computed_membership_digest(&self) -> String {
        crypto::membership_digest(self.peers.keys())
    }

    /// The messageHash of the current message under the record's declared membership digest.
    #[must_use]
    pub fn computed_message_hash(&self) -> String {
        crypto::message_hash(&self.message, &self.membership_digest)
    }

    /// The promiseHash that promise votes sign.
    #[must_use]
    pub fn promise_hash(&self) -> String {
        crypto::promise_hash(&self.message_hash, &self.message, &self.membership_digest)
    }

    /// The commitHash that commit votes sign, over the current promises ([`Self::promises_value`]).
    #[must_use]
    pub fn commit_hash(&self) -> String {
        crypto::commit_hash(&self.message_hash, &self.message, &self.membership_digest, &self.promises_for_hash())
    }

    /// Signs a promise vote on this record; see [`Vote::sign`] for `detail`.
    pub fn sign_promise(
        &self,
        keypair: &Keypair,
        vote_type: VoteType,
        detail: Option<String>,
    ) -> Result<Vote, CryptoError> {
        Vote::sign(keypair, &self.promise_hash(), vote_type, detail)
    }

    /// Signs a commit vote on this record over its current promises; see [`Vote::sign`].
    pub fn sign_commit(
        &self,
        keypair: &Keypair,
        vote_type: VoteType,
        detail: Option<String>,
    ) -> Result<Vote, CryptoError> {
        Vote::sign(keypair, &self.commit_hash(), vote_type, detail)
    }

    /// The message's `expiration` in ms since the Unix epoch, when it is a number (rounded down,
    /// 0 when negative).
    #[must_use]
    pub fn expiration_ms(&self) -> Option<u64> {
        let n = self.message.get("expiration")?.as_number()?;
        if let Some(u) = n.as_u64() {
            Some(u)
        } else if n.as_i64().is_some() {
            Some(0)
        } else {
            // Saturating float-to-int conversion: negative -> 0, huge -> u64::MAX.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            n.as_f64().map(|f| f.floor() as u64)
        }
    }

    /// Whether the message's numeric `expiration` is before `now_ms`. A message without one
    /// never expires here.
    #[must_use]
    pub fn is_expired(&self, now_ms: u64) -> bool {
        let Some(n) = self.message.get("expiration").and_then(Value::as_number) else {
            return false;
        };
        if let Some(u) = n.as_u64() {
            u < now_ms
        } else if n.as_i64().is_some() {
            true
        } else {
            #[allow(clippy::cast_precision_loss)]
            n.as_f64().is_some_and(|f| f < now_ms as f64)
        }
    }

    /// Counts this record's votes of `vote_type` in `phase`.
    #[must_use]
    pub fn count(&self, phase: Phase, vote_type: VoteType) -> usize {
        match phase {
            Phase::Promise => count_votes(&self.promises, vote_type),
            Phase::Commit => count_votes(&self.commits, vote_type),
        }
    }

    /// Verifies the record; see [`verify_record`].
    pub fn verify(&self, now_ms: Option<u64>) -> Result<(), RecordError> {
        verify_record(self, now_ms)
    }

    /// Verifies the record like [`ClusterRecord::verify`] except the signatures of `signer`'s
    /// votes, which the caller checks itself (a member compares its own votes with the ones it
    /// stored, which is cheaper than a signature check).
    pub fn verify_except_signer(&self, now_ms: Option<u64>, signer: &str) -> Result<(), RecordError> {
        verify_record_inner(self, now_ms, Some(signer))
    }
}

fn votes_value(votes: &BTreeMap<String, Vote>) -> Value {
    Value::Object(votes.iter().map(|(id, vote)| (id.clone(), vote.to_value())).collect())
}

/// Writes what [`ClusterRecord::to_value`] builds, field for field and in the same order, without
/// copying the message or the promises as received.
impl Serialize for ClusterRecord {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        struct Peers<'a>(&'a BTreeMap<String, ClusterPeer>);
        impl Serialize for Peers<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_map(self.0.iter().map(|(id, peer)| (id, peer.to_value())))
            }
        }
        struct Votes<'a>(&'a BTreeMap<String, Vote>);
        impl Serialize for Votes<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_map(self.0.iter().map(|(id, vote)| (id, vote.to_value())))
            }
        }
        let extra: Vec<(&String, &Value)> =
            self.extra.iter().filter(|(key, _)| !KNOWN_FIELDS.contains(&key.as_str())).collect();
        let mut map = serializer.serialize_map(Some(KNOWN_FIELDS.len() + extra.len()))?;
        map.serialize_entry("messageHash", &self.message_hash)?;
        map.serialize_entry("peers", &Peers(&self.peers))?;
        map.serialize_entry("membershipVersion", &self.membership_version)?;
        map.serialize_entry("membershipDigest", &self.membership_digest)?;
        map.serialize_entry("message", &self.message)?;
        map.serialize_entry("promises", self.promises_for_hash().as_ref())?;
        map.serialize_entry("commits", &Votes(&self.commits))?;
        for (key, value) in extra {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for ClusterRecord {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::from_value(value).map_err(serde::de::Error::custom)
    }
}

/// Verifies a record (SPEC 3.4): `membershipVersion` is 2; `membershipDigest` is the digest of the
/// peer ids; `messageHash` is the hash of message and digest; when `now_ms` is given, the message's
/// numeric `expiration` is not before it; every peer id embeds an Ed25519 key equal to its
/// `publicKey`; every promise and commit comes from a peer of the set and its signature verifies
/// over the promiseHash, respectively the commitHash (over the promises as received).
///
/// Vote counts and thresholds are not judged here.
pub fn verify_record(record: &ClusterRecord, now_ms: Option<u64>) -> Result<(), RecordError> {
    verify_record_inner(record, now_ms, None)
}

fn verify_record_inner(
    record: &ClusterRecord,
    now_ms: Option<u64>,
    unchecked_signer: Option<&str>,
) -> Result<(), RecordError> {
    if record.membership_version != MEMBERSHIP_VERSION {
        return Err(RecordError::UnsupportedMembershipVersion(record.membership_version));
    }
    let digest = record.computed_membership_digest();
    if digest != record.membership_digest {
        return Err(RecordError::DigestMismatch { expected: digest, found: record.membership_digest.clone() });
    }
    // The message's canonical text, once for all three hashes.
    let canon_message = canon(&record.message);
    let hash = crypto::message_hash_of_canon(&canon_message, &record.membership_digest);
    if hash != record.message_hash {
        return Err(RecordError::HashMismatch { expected: hash, found: record.message_hash.clone() });
    }
    if let Some(now_ms) = now_ms
        && record.is_expired(now_ms)
    {
        return Err(RecordError::Expired { expiration_ms: record.expiration_ms().unwrap_or(0), now_ms });
    }

    let mut keys: BTreeMap<&str, ed25519::PublicKey> = BTreeMap::new();
    for (peer, entry) in &record.peers {
        let (key, key_text) =
            crypto::peer_key_of_text(peer).map_err(|reason| RecordError::BadPeerId { peer: peer.clone(), reason })?;
        if key_text != entry.public_key {
            return Err(RecordError::PublicKeyMismatch { peer: peer.clone() });
        }
        keys.insert(peer.as_str(), key);
    }

    if !record.promises.is_empty() {
        let promise_hash =
            crypto::promise_hash_of_canon(&record.message_hash, &canon_message, &record.membership_digest);
        verify_votes(&keys, &record.promises, &promise_hash, Phase::Promise, unchecked_signer)?;
    }
    if !record.commits.is_empty() {
        let commit_hash = crypto::commit_hash_of_canon(
            &record.message_hash,
            &canon_message,
            &record.membership_digest,
            &record.promises_for_hash(),
        );
        verify_votes(&keys, &record.commits, &commit_hash, Phase::Commit, unchecked_signer)?;
    }
    Ok(())
}

fn verify_votes(
    keys: &BTreeMap<&str, ed25519::PublicKey>,
    votes: &BTreeMap<String, Vote>,
    hash: &str,
    phase: Phase,
    unchecked_signer: Option<&str>,
) -> Result<(), RecordError> {
    for (peer, vote) in votes {
        let key = keys.get(peer.as_str()).ok_or_else(|| RecordError::UnknownVoter { peer: peer.clone(), phase })?;
        if unchecked_signer == Some(peer.as_str()) {
            continue;
        }
        vote.verify_with_key(key, hash).map_err(|reason| RecordError::BadSignature {
            peer: peer.clone(),
            phase,
            reason,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;
    use crate::canon::canon;
    use serde_json::json;

    const VECTOR: &str = include_str!("../tests/vectors/cluster-record-example.json");
    /// The vector's message expiration.
    const VECTOR_EXPIRATION: u64 = 1_795_608_533_215;
    const COMMITTER: &str = "12D3KooWKd4BZWeVFcQ29u67zyzvEVjZT6XLb261w24zkZrkMRBH";

    fn vector_value() -> Value {
        serde_json::from_str(VECTOR).unwrap()
    }

    fn verify_value(value: Value) -> Result<(), RecordError> {
        ClusterRecord::from_value(value)?.verify(None)
    }

    fn flip_char(text: &str, index: usize) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        chars[index] = if chars[index] == 'A' { 'B' } else { 'A' };
        chars.into_iter().collect()
    }

    #[test]
    fn vector_verifies() {
        let record = ClusterRecord::from_json(VECTOR).unwrap();
        assert_eq!(record.computed_membership_digest(), record.membership_digest);
        assert_eq!(record.computed_message_hash(), record.message_hash);
        record.verify(None).unwrap();
        record.verify(Some(VECTOR_EXPIRATION)).unwrap();
        record.verify(Some(1_700_000_000_000)).unwrap();
        assert_eq!(count_approvals(&record.promises), 4);
        assert_eq!(record.count(Phase::Commit, VoteType::Approve), 1);
        assert_eq!(record.extra.get("suggestedClusterSize"), Some(&json!(4)));
        // serde goes through from_value too.
        let via_serde: ClusterRecord = serde_json::from_str(VECTOR).unwrap();
        via_serde.verify(None).unwrap();
        assert_eq!(via_serde, record);
    }

    #[test]
    fn vector_round_trips_and_promises_canon_equal() {
        let original = vector_value();
        let record = ClusterRecord::from_value(original.clone()).unwrap();
        assert_eq!(canon(&record.to_value()), canon(&original));
        assert_eq!(canon(&serde_json::to_value(&record).unwrap()), canon(&original));
        // Typed votes re-serialize to the same canonical promises object.
        let typed = serde_json::to_value(&record.promises).unwrap();
        assert_eq!(canon(&typed), canon(&original["promises"]));
        assert_eq!(votes_value(&record.promises), typed);
        // Consuming the record gives the same JSON, key order included.
        assert_eq!(
            serde_json::to_string(&record.clone().into_value()).unwrap(),
            serde_json::to_string(&record.to_value()).unwrap()
        );
        let mut changed = record.clone();
        changed.promises.clear();
        changed.extra.insert("messageHash".into(), json!("ignored"));
        assert_eq!(changed.clone().into_value(), changed.to_value());
        // Serializing the record writes the same bytes as serializing its JSON value.
        for copy in [&record, &changed] {
            assert_eq!(serde_json::to_string(copy).unwrap(), serde_json::to_string(&copy.to_value()).unwrap());
        }
        // A re-parsed copy still verifies.
        let text = serde_json::to_string(&record).unwrap();
        ClusterRecord::from_json(&text).unwrap().verify(None).unwrap();
    }

    #[test]
    fn expired_vector_is_refused() {
        let record = ClusterRecord::from_json(VECTOR).unwrap();
        assert_eq!(record.expiration_ms(), Some(VECTOR_EXPIRATION));
        assert_eq!(
            record.verify(Some(VECTOR_EXPIRATION + 1)),
            Err(RecordError::Expired { expiration_ms: VECTOR_EXPIRATION, now_ms: VECTOR_EXPIRATION + 1 })
        );
    }

    #[test]
    fn changing_the_message_fails() {
        let edits: [fn(&mut Value); 8] = [
            |v| v["message"]["operations"][0]["commit"]["rev"] = json!(2),
            |v| v["message"]["operations"][0]["commit"]["rev"] = json!(1.5),
            |v| v["message"]["operations"][0]["commit"]["actionId"] = json!("nMy-FwOkthIHNP2hEMKG2R"),
            |v| v["message"]["operations"][0]["commit"]["blockIds"][0] = json!("wiretesT"),
            |v| v["message"]["operations"][0]["commit"]["tailId"] = json!("x"),
            |v| v["message"]["expiration"] = json!(VECTOR_EXPIRATION + 1),
            |v| v["message"]["extra"] = json!(null),
            |v| v["message"]["operations"] = json!([]),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut value = vector_value();
            edit(&mut value);
            assert!(matches!(verify_value(value), Err(RecordError::HashMismatch { .. })), "edit {i}");
        }
        // Re-hashing the edited message (a forger without keys) breaks every signature instead.
        let mut record = ClusterRecord::from_json(VECTOR).unwrap();
        record.message["operations"][0]["commit"]["rev"] = json!(2);
        record.message_hash = record.computed_message_hash();
        assert!(matches!(record.verify(None), Err(RecordError::BadSignature { phase: Phase::Promise, .. })));
    }

    #[test]
    fn changing_the_hashes_fails() {
        let mut value = vector_value();
        value["messageHash"] = json!(flip_char(value["messageHash"].as_str().unwrap(), 5));
        assert!(matches!(verify_value(value), Err(RecordError::HashMismatch { .. })));
        let mut value = vector_value();
        value["membershipDigest"] = json!(flip_char(value["membershipDigest"].as_str().unwrap(), 5));
        assert!(matches!(verify_value(value), Err(RecordError::DigestMismatch { .. })));
        let mut value = vector_value();
        value["membershipVersion"] = json!(1);
        assert_eq!(verify_value(value), Err(RecordError::UnsupportedMembershipVersion(1)));
    }

    #[test]
    fn changing_the_peer_set_fails() {
        // Removing a peer.
        let mut value = vector_value();
        value["peers"].as_object_mut().unwrap().shift_remove(COMMITTER);
        assert!(matches!(verify_value(value), Err(RecordError::DigestMismatch { .. })));
        // Adding a peer, with a correct key for its id.
        let mut value = vector_value();
        let extra_peer = Keypair::generate_ed25519().public().to_peer_id();
        let entry = ClusterPeer::new(&extra_peer, vec![]).unwrap();
        value["peers"][extra_peer.to_base58()] = entry.to_value();
        assert!(matches!(verify_value(value), Err(RecordError::DigestMismatch { .. })));
        // Changing a publicKey (swapping two peers' keys; and one flipped character).
        let mut value = vector_value();
        let ids: Vec<String> = value["peers"].as_object().unwrap().keys().cloned().collect();
        let k0 = value["peers"][&ids[0]]["publicKey"].clone();
        let k1 = value["peers"][&ids[1]]["publicKey"].clone();
        value["peers"][&ids[0]]["publicKey"] = k1;
        value["peers"][&ids[1]]["publicKey"] = k0;
        assert!(matches!(verify_value(value), Err(RecordError::PublicKeyMismatch { .. })));
        let mut value = vector_value();
        let key = value["peers"][&ids[2]]["publicKey"].as_str().unwrap().to_owned();
        value["peers"][&ids[2]]["publicKey"] = json!(flip_char(&key, 0));
        assert_eq!(verify_value(value), Err(RecordError::PublicKeyMismatch { peer: ids[2].clone() }));
    }

    #[test]
    fn multiaddrs_and_unknown_top_level_fields_are_not_covered() {
        let mut value = vector_value();
        value["peers"][COMMITTER]["multiaddrs"] = json!(["/ip4/10.0.0.1/tcp/1"]);
        value["suggestedClusterSize"] = json!(7);
        value["somethingNew"] = json!({"a": 1});
        verify_value(value).unwrap();
    }

    #[test]
    fn changing_any_signature_fails() {
        let original = vector_value();
        for phase in ["promises", "commits"] {
            for peer in original[phase].as_object().unwrap().keys() {
                let signature = original[phase][peer]["signature"].as_str().unwrap();
                let len = signature.chars().count();
                for index in [0, 1, len / 2, len - 2, len - 1] {
                    let mut value = original.clone();
                    value[phase][peer]["signature"] = json!(flip_char(signature, index));
                    let result = verify_value(value);
                    let (expected_phase, other_phase) =
                        if phase == "promises" { (Phase::Promise, "commit") } else { (Phase::Commit, "promise") };
                    match result {
                        // A changed promise also changes the commitHash; the promise is checked first.
                        Err(RecordError::BadSignature { phase: p, peer: ref who, .. }) => {
                            assert_eq!(p, expected_phase, "{phase} {peer} {index} vs {other_phase}");
                            assert_eq!(who, peer);
                        }
                        other => panic!("{phase} {peer} {index}: {other:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn changing_a_vote_fails() {
        // Vote type of a promise.
        let mut value = vector_value();
        value["promises"][COMMITTER]["type"] = json!("reject");
        assert!(matches!(verify_value(value), Err(RecordError::BadSignature { phase: Phase::Promise, .. })));
        // Vote type of a commit.
        let mut value = vector_value();
        value["commits"][COMMITTER]["type"] = json!("reject");
        assert!(matches!(verify_value(value), Err(RecordError::BadSignature { phase: Phase::Commit, .. })));
        // An unknown vote type is malformed.
        let mut value = vector_value();
        value["commits"][COMMITTER]["type"] = json!("maybe");
        assert!(matches!(verify_value(value), Err(RecordError::Malformed(_))));
        // Any field added to a promise changes the commitHash (promises are hashed as received).
        let mut value = vector_value();
        value["promises"][COMMITTER]["note"] = json!("hi");
        assert!(matches!(verify_value(value), Err(RecordError::BadSignature { phase: Phase::Commit, .. })));
        // Dropping a promise changes the commitHash too.
        let mut value = vector_value();
        let first = value["promises"].as_object().unwrap().keys().next().unwrap().clone();
        value["promises"].as_object_mut().unwrap().shift_remove(&first);
        assert!(matches!(verify_value(value), Err(RecordError::BadSignature { phase: Phase::Commit, .. })));
        // Moving a vote to another peer.
        let mut value = vector_value();
        let vote = value["commits"][COMMITTER].clone();
        let commits = value["commits"].as_object_mut().unwrap();
        commits.clear();
        let other = "12D3KooWFT6JBk22os4a79Dz4YB9AGZ8rWxhn4pKRJN6eepNmwxS".to_owned();
        commits.insert(other, vote);
        assert!(matches!(verify_value(value), Err(RecordError::BadSignature { phase: Phase::Commit, .. })));
        // A vote from outside the peer set.
        let mut value = vector_value();
        let stranger = Keypair::generate_ed25519().public().to_peer_id().to_base58();
        value["commits"][&stranger] = value["commits"][COMMITTER].clone();
        assert_eq!(verify_value(value), Err(RecordError::UnknownVoter { peer: stranger, phase: Phase::Commit }));
    }

    #[test]
    fn unchanged_received_promises_hash_verbatim() {
        // A null rejectReason cannot be re-serialized from the typed vote, but is hashed as received.
        let keypair = Keypair::generate_ed25519();
        let peer = keypair.public().to_peer_id();
        let mut peers = BTreeMap::new();
        peers.insert(peer.to_base58(), ClusterPeer::new(&peer, vec![]).unwrap());
        let mut record = ClusterRecord::new(peers, json!({"expiration": 5}));
        let promise = record.sign_promise(&keypair, VoteType::Approve, None).unwrap();
        let mut value = record.to_value();
        let mut promise_value = promise.to_value();
        promise_value["rejectReason"] = Value::Null;
        value["promises"] = json!({ peer.to_base58(): promise_value });
        let received = ClusterRecord::from_value(value.clone()).unwrap();
        let commit = received.sign_commit(&keypair, VoteType::Approve, None).unwrap();
        value["commits"] = json!({ peer.to_base58(): commit.to_value() });
        let received = ClusterRecord::from_value(value).unwrap();
        received.verify(None).unwrap();
        assert_eq!(received.to_value()["promises"][peer.to_base58()]["rejectReason"], Value::Null);
        assert_eq!(serde_json::to_string(&received).unwrap(), serde_json::to_string(&received.to_value()).unwrap());
        // Once the typed promises change, the current ones are hashed.
        record = received.clone();
        record.promises.clear();
        assert_eq!(record.promises_value(), json!({}));
        assert_ne!(record.commit_hash(), received.commit_hash());
    }

    #[test]
    fn own_record_signs_and_verifies() {
        let keypairs: Vec<Keypair> = (0..3).map(|_| Keypair::generate_ed25519()).collect();
        let ids: Vec<PeerId> = keypairs.iter().map(|k| k.public().to_peer_id()).collect();
        let peers: BTreeMap<String, ClusterPeer> = ids
            .iter()
            .map(|id| {
                let addr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{id}");
                (id.to_base58(), ClusterPeer::new(id, vec![addr]).unwrap())
            })
            .collect();
        for (id, peer) in &peers {
            assert_eq!(
                peer.public_key,
                crypto::public_key_base64url(
                    &keypairs[ids.iter().position(|p| &p.to_base58() == id).unwrap()].public()
                )
                .unwrap()
            );
        }
        let message = json!({
            "operations": [{"pend": {"trxId": "t1", "transforms": {"inserts": {}, "updates": {}, "deletes": []}, "policy": "c"}}],
            "expiration": 4_000_000_000_000_u64
        });
        let mut record = ClusterRecord::new(peers, message);
        assert_eq!(record.membership_version, MEMBERSHIP_VERSION);
        record.verify(Some(1)).unwrap();

        // Phase 1: two approvals and a reject with a reason.
        for (i, (keypair, id)) in keypairs.iter().zip(&ids).enumerate() {
            let vote = if i == 2 {
                record.sign_promise(keypair, VoteType::Reject, Some("stale: rev 3".to_owned())).unwrap()
            } else {
                record.sign_promise(keypair, VoteType::Approve, None).unwrap()
            };
            record.promises.insert(id.to_base58(), vote);
        }
        record.verify(Some(1)).unwrap();
        assert_eq!(count_approvals(&record.promises), 2);
        assert_eq!(record.count(Phase::Promise, VoteType::Reject), 1);

        // The reject reason is signed.
        let mut tampered = record.clone();
        tampered.promises.get_mut(&ids[2].to_base58()).unwrap().reject_reason = Some("other".to_owned());
        assert!(matches!(tampered.verify(None), Err(RecordError::BadSignature { phase: Phase::Promise, .. })));

        // Phase 2 over the wire: members receive the record with its promises and sign commits.
        let sent = serde_json::to_string(&record).unwrap();
        let received = ClusterRecord::from_json(&sent).unwrap();
        assert_eq!(received, record);
        assert_eq!(received.commit_hash(), record.commit_hash());
        for (keypair, id) in keypairs.iter().zip(&ids).take(2) {
            let vote = received.sign_commit(keypair, VoteType::Approve, None).unwrap();
            record.commits.insert(id.to_base58(), vote);
        }
        record.verify(Some(1)).unwrap();
        let final_copy = ClusterRecord::from_value(record.to_value()).unwrap();
        final_copy.verify(Some(1)).unwrap();
        assert_eq!(final_copy.count(Phase::Commit, VoteType::Approve), 2);

        // A commit vote signed by the wrong key.
        let mut forged = record.clone();
        let wrong = record.sign_commit(&keypairs[0], VoteType::Approve, None).unwrap();
        forged.commits.insert(ids[1].to_base58(), wrong);
        assert!(matches!(
            forged.verify(None),
            Err(RecordError::BadSignature { phase: Phase::Commit, reason: CryptoError::SignatureMismatch, .. })
        ));

        // Expired.
        assert!(matches!(
            record.verify(Some(4_000_000_000_001)),
            Err(RecordError::Expired { expiration_ms: 4_000_000_000_000, now_ms: 4_000_000_000_001 })
        ));
    }

    #[test]
    fn conflict_votes_sign_conflict_with() {
        let keypair = Keypair::generate_ed25519();
        let id = keypair.public().to_peer_id();
        let mut peers = BTreeMap::new();
        peers.insert(id.to_base58(), ClusterPeer::new(&id, vec![]).unwrap());
        let mut record = ClusterRecord::new(peers, json!({"operations": []}));
        let vote = record.sign_promise(&keypair, VoteType::Conflict, Some("zWinner".to_owned())).unwrap();
        assert_eq!(vote.conflict_with.as_deref(), Some("zWinner"));
        assert_eq!(vote.reject_reason, None);
        assert_eq!(vote.payload("h"), "h:conflict:zWinner");
        assert_eq!(
            vote.to_value(),
            json!({"type": "conflict", "signature": vote.signature, "conflictWith": "zWinner"})
        );
        record.promises.insert(id.to_base58(), vote);
        record.verify(None).unwrap();
        record.promises.get_mut(&id.to_base58()).unwrap().conflict_with = Some("zOther".to_owned());
        assert!(matches!(record.verify(None), Err(RecordError::BadSignature { .. })));
    }

    #[test]
    fn malformed_records_are_refused() {
        for text in [
            "[]",
            "{}",
            r#"{"messageHash": 1}"#,
            r#"{"messageHash":"z","peers":{},"membershipDigest":"d"}"#,
            r#"{"messageHash":"z","peers":{"p":{"publicKey":3}},"membershipDigest":"d","message":{}}"#,
        ] {
            assert!(matches!(ClusterRecord::from_json(text), Err(RecordError::Malformed(_))), "{text}");
        }
        let mut value = vector_value();
        value["peers"]["not-a-peer-id"] = json!({"multiaddrs": [], "publicKey": "x"});
        let mut record = ClusterRecord::from_value(value).unwrap();
        record.membership_digest = record.computed_membership_digest();
        record.message_hash = record.computed_message_hash();
        assert!(matches!(record.verify(None), Err(RecordError::BadPeerId { .. })));
    }
}

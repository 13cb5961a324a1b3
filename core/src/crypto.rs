//! Hashes, encodings and vote signatures of the cluster protocol (SPEC 3.4).
//!
//! All hashes are SHA-256 over the UTF-8 text built from [`canon`] images:
//!
//! - `membershipDigest = base64url(sha256(canon(sorted array of peer ids)))`
//! - `messageHash = "z" + base58btc(sha256(canon(message) + membershipDigest))`
//! - `promiseHash = base64url(sha256(messageHash + canon(message) + membershipDigest))`
//! - `commitHash  = base64url(sha256(messageHash + canon(message) + membershipDigest + canon(promises)))`
//!
//! A vote signs the UTF-8 text `hash + ":" + type`, followed by `":" + extra` when the vote carries a
//! non-empty extra (a reject's `rejectReason`, a conflict's `conflictWith`), exactly as the
//! JavaScript implementation builds it. Signatures are Ed25519, base64url without padding, and are
//! verified with the public key embedded in the signer's peer id (an identity multihash of the
//! protobuf-encoded public key).

use std::str::FromStr;
use std::sync::OnceLock;

use dashmap::DashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libp2p_identity::{Keypair, PeerId, PublicKey, ed25519};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::canon::{canon, canon_into, sort_utf16};

/// Multihash code of the identity "hash": the digest is the input itself.
const MULTIHASH_IDENTITY: u64 = 0x00;

/// Length in bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Peer keys kept decoded: decoding one parses protobuf and decompresses a curve point (about a
/// third of a signature check), and a node checks the votes of the same few peers all day. The
/// cache is emptied when it reaches this many entries (about 200 bytes each).
const MAX_CACHED_PEER_KEYS: usize = 4_096;

/// The base58 text of a peer id, from a bounded cache: encoding is quadratic in the id's length
/// (a few microseconds), and a cluster round names the same few peers many times.
#[must_use]
pub fn peer_text(peer_id: &PeerId) -> String {
    static CACHE: OnceLock<DashMap<PeerId, String>> = OnceLock::new();
    let computed: Result<String, std::convert::Infallible> = cached(&CACHE, peer_id, || Ok(peer_id.to_base58()));
    computed.unwrap_or_else(|never| match never {})
}

/// The value cached for `peer_id`, or `compute`'s, remembered on success. The cache is emptied
/// when it reaches [`MAX_CACHED_PEER_KEYS`] entries.
fn cached<V: Clone, E>(
    cache: &'static OnceLock<DashMap<PeerId, V>>,
    peer_id: &PeerId,
    compute: impl FnOnce() -> Result<V, E>,
) -> Result<V, E> {
    let cache = cache.get_or_init(DashMap::new);
    if let Some(value) = cache.get(peer_id) {
        return Ok(value.clone());
    }
    let value = compute()?;
    if cache.len() >= MAX_CACHED_PEER_KEYS {
        cache.clear();
    }
    cache.insert(*peer_id, value.clone());
    Ok(value)
}

/// Why an encoding, key or signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The text is not a peer id, or the peer id does not embed its public key.
    #[error("bad peer id {peer_id:?}: {reason}")]
    BadPeerId {
        /// The offending peer id text.
        peer_id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The key (or key pair) is of another type than Ed25519.
    #[error("not an Ed25519 key")]
    NotEd25519,
    /// The text is not base64url without padding.
    #[error("bad base64url: {0}")]
    BadBase64(String),
    /// A signature decoded to a length other than [`SIGNATURE_LEN`] bytes.
    #[error("bad signature length: {0} bytes, expected 64")]
    BadSignatureLength(usize),
    /// The signature does not verify for the payload under the signer's key.
    #[error("signature does not match")]
    SignatureMismatch,
}

/// Encodes bytes as base64url without padding (RFC 4648 section 5).
#[must_use]
pub fn base64url_encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url without padding; padding, other alphabets and non-canonical trailing bits are
/// refused.
pub fn base64url_decode(text: &str) -> Result<Vec<u8>, CryptoError> {
    URL_SAFE_NO_PAD.decode(text).map_err(|e| CryptoError::BadBase64(e.to_string()))
}

/// SHA-256 of `bytes`.
#[must_use]
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The membership digest of a peer set: `base64url(sha256(canon(peer ids sorted by UTF-16 code
/// units)))`. Only the ids count, not multiaddrs or keys (a key is a function of its id).
/// Duplicates are kept, as JavaScript would; a peer map's keys have none.
#[must_use]
pub fn membership_digest<I, S>(peer_ids: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut ids: Vec<S> = peer_ids.into_iter().collect();
    sort_utf16(&mut ids);
    let array = Value::Array(ids.iter().map(|id| Value::String(id.as_ref().to_owned())).collect());
    base64url_encode(&sha256(canon(&array).as_bytes()))
}

/// `messageHash = "z" + base58btc(sha256(canon(message) + membershipDigest))`.
#[must_use]
pub fn message_hash(message: &Value, membership_digest: &str) -> String {
    message_hash_of_canon(&canon(message), membership_digest)
}

/// [`message_hash`] of a message given as its canonical text (`canon(message)`).
#[must_use]
pub fn message_hash_of_canon(canon_message: &str, membership_digest: &str) -> String {
    let digest: [u8; 32] = Sha256::new().chain_update(canon_message).chain_update(membership_digest).finalize().into();
    let mut out = String::from("z");
    out.push_str(&bs58::encode(digest).into_string());
    out
}

/// `promiseHash = base64url(sha256(messageHash + canon(message) + membershipDigest))`.
#[must_use]
pub fn promise_hash(message_hash: &str, message: &Value, membership_digest: &str) -> String {
    let mut text = String::from(message_hash);
    canon_into(message, &mut text);
    text.push_str(membership_digest);
    base64url_encode(&sha256(text.as_bytes()))
}

/// [`promise_hash`] of a message given as its canonical text (`canon(message)`).
#[must_use]
pub fn promise_hash_of_canon(message_hash: &str, canon_message: &str, membership_digest: &str) -> String {
    let digest: [u8; 32] = Sha256::new()
        .chain_update(message_hash)
        .chain_update(canon_message)
        .chain_update(membership_digest)
        .finalize()
        .into();
    base64url_encode(&digest)
}

/// `commitHash = base64url(sha256(messageHash + canon(message) + membershipDigest +
/// canon(promises)))`, where `promises` is the record's promises object as received.
#[must_use]
pub fn commit_hash(message_hash: &str, message: &Value, membership_digest: &str, promises: &Value) -> String {
    let mut text = String::from(message_hash);
    canon_into(message, &mut text);
    text.push_str(membership_digest);
    canon_into(promises, &mut text);
    base64url_encode(&sha256(text.as_bytes()))
}

/// [`commit_hash`] of a message given as its canonical text (`canon(message)`).
#[must_use]
pub fn commit_hash_of_canon(
    message_hash: &str,
    canon_message: &str,
    membership_digest: &str,
    promises: &Value,
) -> String {
    let digest: [u8; 32] = Sha256::new()
        .chain_update(message_hash)
        .chain_update(canon_message)
        .chain_update(membership_digest)
        .chain_update(canon(promises))
        .finalize()
        .into();
    base64url_encode(&digest)
}

/// The text a vote signs: `hash + ":" + vote_type`, plus `":" + extra` when `extra` is present and
/// non-empty (as JavaScript's `extra ? ':' + extra : ''`).
#[must_use]
pub fn vote_payload(hash: &str, vote_type: &str, extra: Option<&str>) -> String {
    let mut text = String::with_capacity(hash.len() + vote_type.len() + 2);
    text.push_str(hash);
    text.push(':');
    text.push_str(vote_type);
    if let Some(extra) = extra.filter(|e| !e.is_empty()) {
        text.push(':');
        text.push_str(extra);
    }
    text
}

/// Parses a peer id from its base58 text.
pub fn parse_peer_id(text: &str) -> Result<PeerId, CryptoError> {
    PeerId::from_str(text).map_err(|e| CryptoError::BadPeerId { peer_id: text.to_owned(), reason: e.to_string() })
}

/// Reads the Ed25519 public key embedded in a peer id (identity multihash of the protobuf-encoded
/// key). Peer ids that only hash their key (RSA and other long keys) are refused. Decoded keys are
/// cached (bounded), so repeated checks of one peer's votes decode its key once.
pub fn peer_ed25519_key(peer_id: &PeerId) -> Result<ed25519::PublicKey, CryptoError> {
    static CACHE: OnceLock<DashMap<PeerId, ed25519::PublicKey>> = OnceLock::new();
    cached(&CACHE, peer_id, || decode_peer_ed25519_key(peer_id))
}

fn decode_peer_ed25519_key(peer_id: &PeerId) -> Result<ed25519::PublicKey, CryptoError> {
    let multihash = peer_id.as_ref();
    if multihash.code() != MULTIHASH_IDENTITY {
        return Err(CryptoError::BadPeerId {
            peer_id: peer_id.to_base58(),
            reason: "the peer id does not embed its public key".to_owned(),
        });
    }
    let key = PublicKey::try_decode_protobuf(multihash.digest()).map_err(|e| CryptoError::BadPeerId {
        peer_id: peer_id.to_base58(),
        reason: format!("bad embedded public key: {e}"),
    })?;
    key.try_into_ed25519().map_err(|_| CryptoError::NotEd25519)
}

/// Reads the Ed25519 public key out of a peer id's text; see [`peer_ed25519_key`].
pub fn peer_ed25519_key_str(peer_id: &str) -> Result<ed25519::PublicKey, CryptoError> {
    peer_key_of_text(peer_id).map(|(key, _)| key)
}

/// The Ed25519 key embedded in a peer id's text and that key in base64url (a record peer's
/// `publicKey`), from a bounded cache by text: verifying a record names each of its peers by
/// text, and decoding the base58 and re-encoding the key each time cost more than the lookup.
pub(crate) fn peer_key_of_text(peer_id: &str) -> Result<(ed25519::PublicKey, String), CryptoError> {
    static CACHE: OnceLock<DashMap<String, (ed25519::PublicKey, String)>> = OnceLock::new();
    let cache = CACHE.get_or_init(DashMap::new);
    if let Some(entry) = cache.get(peer_id) {
        return Ok(entry.value().clone());
    }
    let key = peer_ed25519_key(&parse_peer_id(peer_id)?)?;
    let entry = (key.clone(), base64url_encode(&key.to_bytes()));
    if cache.len() >= MAX_CACHED_PEER_KEYS {
        cache.clear();
    }
    cache.insert(peer_id.to_owned(), entry.clone());
    Ok(entry)
}

/// base64url (no padding) of the raw 32-byte Ed25519 key: the `publicKey` field of a record peer.
pub fn public_key_base64url(key: &PublicKey) -> Result<String, CryptoError> {
    let key = key.clone().try_into_ed25519().map_err(|_| CryptoError::NotEd25519)?;
    Ok(base64url_encode(&key.to_bytes()))
}

/// base64url (no padding) of the raw Ed25519 key embedded in a peer id's text.
pub fn peer_public_key_base64url(peer_id: &str) -> Result<String, CryptoError> {
    Ok(base64url_encode(&peer_ed25519_key_str(peer_id)?.to_bytes()))
}

/// Signs `payload` with an Ed25519 identity key pair; returns the signature in base64url.
pub fn sign(keypair: &Keypair, payload: &[u8]) -> Result<String, CryptoError> {
    let keypair = keypair.clone().try_into_ed25519().map_err(|_| CryptoError::NotEd25519)?;
    Ok(base64url_encode(&keypair.sign(payload)))
}

/// Verifies a base64url Ed25519 `signature` of `payload` by the key embedded in `peer_id`.
pub fn verify(peer_id: &PeerId, payload: &[u8], signature: &str) -> Result<(), CryptoError> {
    let key = peer_ed25519_key(peer_id)?;
    verify_with_key(&key, payload, signature)
}

/// Verifies a base64url Ed25519 `signature` of `payload` under `key`.
pub fn verify_with_key(key: &ed25519::PublicKey, payload: &[u8], signature: &str) -> Result<(), CryptoError> {
    let bytes = base64url_decode(signature)?;
    if bytes.len() != SIGNATURE_LEN {
        return Err(CryptoError::BadSignatureLength(bytes.len()));
    }
    if key.verify(payload, &bytes) { Ok(()) } else { Err(CryptoError::SignatureMismatch) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;
    use serde_json::json;

    #[test]
    fn base64url_round_trip_and_refusals() {
        assert_eq!(base64url_encode(b""), "");
        assert_eq!(base64url_encode(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url_decode("-_8").unwrap(), vec![0xfb, 0xff]);
        assert!(matches!(base64url_decode("-_8="), Err(CryptoError::BadBase64(_))));
        assert!(matches!(base64url_decode("+/8"), Err(CryptoError::BadBase64(_))));
        // Non-canonical trailing bits.
        assert!(matches!(base64url_decode("-_9"), Err(CryptoError::BadBase64(_))));
    }

    #[test]
    fn digest_is_order_independent_and_of_ids_only() {
        let a = membership_digest(["b", "a", "c"]);
        assert_eq!(a, membership_digest(vec!["c".to_owned(), "b".to_owned(), "a".to_owned()]));
        assert_eq!(a, base64url_encode(&sha256(br#"["a","b","c"]"#)));
        assert_ne!(a, membership_digest(["a", "b"]));
        assert_eq!(membership_digest(Vec::<String>::new()), base64url_encode(&sha256(b"[]")));
    }

    #[test]
    fn hashes_follow_the_spec_formulas() {
        let message = json!({"b": 1, "a": [0.5, "x"]});
        let digest = "D";
        let text = r#"{"a":[0.5,"x"],"b":1}"#;
        let mh = message_hash(&message, digest);
        assert_eq!(mh, format!("z{}", bs58::encode(sha256(format!("{text}D").as_bytes())).into_string()));
        assert_eq!(promise_hash(&mh, &message, digest), base64url_encode(&sha256(format!("{mh}{text}D").as_bytes())));
        let promises = json!({"p": {"type": "approve", "signature": "s"}});
        assert_eq!(
            commit_hash(&mh, &message, digest, &promises),
            base64url_encode(&sha256(format!(r#"{mh}{text}D{{"p":{{"signature":"s","type":"approve"}}}}"#).as_bytes()))
        );
    }

    #[test]
    fn payloads() {
        assert_eq!(vote_payload("h", "approve", None), "h:approve");
        assert_eq!(vote_payload("h", "reject", Some("stale")), "h:reject:stale");
        assert_eq!(vote_payload("h", "reject", Some("")), "h:reject");
        assert_eq!(vote_payload("h", "conflict", Some("zX")), "h:conflict:zX");
    }

    #[test]
    fn sign_and_verify_with_peer_id_key() {
        let keypair = Keypair::generate_ed25519();
        let peer_id = keypair.public().to_peer_id();
        let signature = sign(&keypair, b"payload").unwrap();
        verify(&peer_id, b"payload", &signature).unwrap();
        assert_eq!(verify(&peer_id, b"other", &signature), Err(CryptoError::SignatureMismatch));
        let other = Keypair::generate_ed25519().public().to_peer_id();
        assert_eq!(verify(&other, b"payload", &signature), Err(CryptoError::SignatureMismatch));
        assert_eq!(verify(&peer_id, b"payload", &base64url_encode(&[1; 63])), Err(CryptoError::BadSignatureLength(63)));
        assert!(matches!(verify(&peer_id, b"payload", "*"), Err(CryptoError::BadBase64(_))));
        assert_eq!(
            public_key_base64url(&keypair.public()).unwrap(),
            peer_public_key_base64url(&peer_id.to_base58()).unwrap()
        );
        assert_eq!(peer_ed25519_key(&peer_id).unwrap(), keypair.public().try_into_ed25519().unwrap());
    }

    #[test]
    fn vector_peer_keys_match_their_ids() {
        assert_eq!(
            peer_public_key_base64url("12D3KooWFT6JBk22os4a79Dz4YB9AGZ8rWxhn4pKRJN6eepNmwxS").unwrap(),
            "U7L6d0Uz0sK3V01Up1xpNbTQuvDyGQmn-TECA5jUknc"
        );
    }

    #[test]
    fn refuses_bad_and_hashed_peer_ids() {
        assert!(matches!(parse_peer_id("not a peer id"), Err(CryptoError::BadPeerId { .. })));
        assert!(matches!(parse_peer_id(""), Err(CryptoError::BadPeerId { .. })));
        // A sha256 peer id (as RSA keys get) does not embed its key.
        let mut bytes = vec![0x12, 0x20];
        bytes.extend_from_slice(&[7; 32]);
        let hashed = PeerId::from_bytes(&bytes).unwrap();
        assert!(matches!(peer_ed25519_key(&hashed), Err(CryptoError::BadPeerId { .. })));
        // An identity peer id whose content is no protobuf public key.
        let garbage = PeerId::random();
        assert!(matches!(peer_ed25519_key(&garbage), Err(CryptoError::BadPeerId { .. })));
    }
}

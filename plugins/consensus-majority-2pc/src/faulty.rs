//! Signed renounces and the peers they prove faulty (SPEC 4.5).
//!
//! A member that answers a status query "not executed" (or "aborted") signs a *renounce*: Ed25519
//! with its identity key over the UTF-8 text `renounce:` + messageHash, base64url without padding
//! (the encoding of votes). Renounced and aborted are one mark, persisted before the answer is
//! sent, so a renounce is a promise never to execute the record. Renounces from a majority of a
//! record's peer set let a member drop its reservation after `recovery_bound_ms` (see the
//! `recovery` module).
//!
//! A peer that signed both a renounce of a record and an approving commit vote on it ("applied
//! here") has lied in one of them: it is *proven faulty*. The proof (both signed statements, the
//! record copy carrying the vote) is logged naming the peer, persisted under
//! `2pc/faulty/<peer id>` and counted; from then on this member counts none of its signatures:
//! not its promises when deciding whether a record is decided or out of reach, not its renounces.
//! At most [`MAX_FAULTY_PEERS`] are kept.

use std::collections::BTreeMap;

use optimystic_core::crypto::{self, CryptoError};
use optimystic_core::identity::{Keypair, PeerId};
use optimystic_core::record::{ClusterRecord, Vote};
use optimystic_core::{RawStorage, RepoError};
use serde_json::{Value, json};

use crate::engine::Inner;

/// Prefix of the persisted proofs: `2pc/faulty/<peer id>` -> the proof (JSON).
pub(crate) const FAULTY_PREFIX: &str = "2pc/faulty/";

/// Most proven-faulty peers a member remembers (and loads at start).
pub const MAX_FAULTY_PEERS: usize = 1_024;

/// The status-answer field carrying the answering member's renounce signature.
pub const RENOUNCE_FIELD: &str = "renounce";

/// The signed text of a renounce of the record `message_hash`.
#[must_use]
pub fn renounce_payload(message_hash: &str) -> String {
    format!("renounce:{message_hash}")
}

/// Signs a renounce of the record `message_hash` with an Ed25519 identity key pair.
pub fn sign_renounce(keypair: &Keypair, message_hash: &str) -> Result<String, CryptoError> {
    crypto::sign(keypair, renounce_payload(message_hash).as_bytes())
}

/// Verifies `signature` as `peer`'s renounce of the record `message_hash`.
pub fn verify_renounce(peer: &PeerId, message_hash: &str, signature: &str) -> Result<(), CryptoError> {
    crypto::verify(peer, renounce_payload(message_hash).as_bytes(), signature)
}

fn faulty_key(peer: &PeerId) -> String {
    format!("{FAULTY_PREFIX}{}", peer.to_base58())
}

/// The proven-faulty peers persisted in `storage` (at most [`MAX_FAULTY_PEERS`]); keys that name
/// no peer are skipped.
pub(crate) async fn load_faulty(storage: &dyn RawStorage) -> Result<Vec<String>, RepoError> {
    let listed = storage.list_meta(FAULTY_PREFIX, MAX_FAULTY_PEERS).await?;
    Ok(listed
        .iter()
        .filter_map(|(key, _)| key.strip_prefix(FAULTY_PREFIX))
        .filter(|peer| peer.parse::<PeerId>().is_ok())
        .map(str::to_owned)
        .collect())
}

impl Inner {
    /// Whether `peer` is proven faulty here: its signatures count for nothing.
    pub(crate) fn is_faulty(&self, peer: &PeerId) -> bool {
        self.state().faulty.contains(&peer.to_base58())
    }

    /// The renounces of `record` counted towards SPEC 4.5's bound: this member's own (it
    /// renounces as it counts) and those in `renounces` (verified when gathered) of other peers
    /// of the record's peer set that are not proven faulty.
    pub(crate) fn counted_renounces(&self, record: &ClusterRecord, renounces: &BTreeMap<String, String>) -> usize {
        let state = self.state();
        let others = renounces
            .keys()
            .filter(|peer| **peer != self.me_text && record.peers.contains_key(*peer) && !state.faulty.contains(*peer))
            .count();
        others + 1
    }

    /// The approving and the other votes in `votes` (peer id text -> vote), not counting those
    /// of proven-faulty peers.
    pub(crate) fn count_votes(&self, votes: &BTreeMap<String, Vote>) -> (usize, usize) {
        let state = self.state();
        let counted = votes.iter().filter(|(peer, _)| !state.faulty.contains(*peer));
        counted.fold(
            (0, 0),
            |(approve, other), (_, vote)| {
                if vote.is_approve() { (approve + 1, other) } else { (approve, other + 1) }
            },
        )
    }

    /// Looks for equivocation in a verified copy of a record: a peer whose renounce of it is in
    /// `renounces` (verified) and whose approving commit vote the copy carries is proven faulty.
    /// Each proof is logged, persisted and counted; returns how many peers it proved faulty.
    pub(crate) async fn check_equivocation(
        &self,
        copy: &ClusterRecord,
        renounces: &BTreeMap<String, String>,
    ) -> Result<usize, RepoError> {
        let mut proven = 0;
        for (peer_text, vote) in &copy.commits {
            let Some(renounce) = renounces.get(peer_text) else { continue };
            if !vote.is_approve() {
                continue;
            }
            let Ok(peer) = peer_text.parse::<PeerId>() else { continue };
            if peer == self.me || self.state().faulty.contains(peer_text) {
                continue;
            }
            if vote.verify(&peer, &copy.commit_hash()).is_err()
                || verify_renounce(&peer, &copy.message_hash, renounce).is_err()
            {
                continue;
            }
            let mut witness = copy.clone();
            witness.commits.retain(|p, _| p == peer_text);
            witness.extra.clear();
            let proof = json!({
                "peer": peer_text,
                "messageHash": copy.message_hash,
                "renounce": renounce,
                "record": witness.to_value(),
            });
            self.prove_faulty(peer, &proof).await?;
            proven += 1;
        }
        Ok(proven)
    }

    /// Records `peer` as proven faulty with `proof` (persisted first, then counted; past
    /// [`MAX_FAULTY_PEERS`] it is logged only).
    async fn prove_faulty(&self, peer: PeerId, proof: &Value) -> Result<(), RepoError> {
        tracing::warn!(%peer, proof = %proof, "peer proven faulty: it signed a renounce and an approving commit vote for one record");
        if self.state().faulty.len() >= MAX_FAULTY_PEERS {
            return Ok(());
        }
        let bytes = serde_json::to_vec(proof).map_err(|e| RepoError::Internal(format!("encoding a proof: {e}")))?;
        self.storage().put_meta(&faulty_key(&peer), &bytes).await?;
        self.state().faulty.insert(peer.to_base58());
        Ok(())
    }
}

//! Commit votes after execution (SPEC 4.4): vote gossip between members, and merging the votes a
//! member learns into the copy of the record it keeps for evidence.
//!
//! A member keeps each decided record once (`evidence/record/<hex messageHash>`); the `commits` of
//! that copy hold every verified commit vote the member learned for it: its own, signed when it
//! executed the record, and the others' from the coordinator's final record, from other members'
//! gossip and from the answers to its own gossip. A vote is added only when it comes from a peer
//! of the record's set and its signature verifies against the kept copy's commitHash; a vote is
//! never replaced or dropped ([`optimystic_core::Step::keep`],
//! [`optimystic_core::StorageRepo::merge_kept_commits`]). Approving commit votes from a commit
//! quorum are the revision's execution proof, which catch-up requires (SPEC 4.10 d, 4.20).
//!
//! # Vote gossip
//! A member that executes a record sends the decided record with its commit vote (the `update`
//! operation, as any decided record) to every other peer of the record, once, without re-sends,
//! in the background: a receiver that executed the record merges the vote; one that did not
//! executes the record, as any decided copy (and gossips its own vote in turn). The peer that
//! handed the record over gets the vote in its answer instead, and the coordinator's own member
//! sends nothing (its coordinator's final record carries its vote). The answers to gossip carry
//! the receivers' votes, which the sender merges. So with a coordinator that dies after answering
//! its client, the members that executed still learn each other's votes.
//!
//! The gossip waits `request_timeout_ms` first (at most half the record's remaining lifetime),
//! and is not sent when the kept copy already holds approving votes from a commit quorum by
//! then: the coordinator's final record, which carries every vote to every peer, normally
//! arrives first. It costs nothing then; otherwise `peers - 2` messages per member that did not
//! coordinate (one with three peers). Sent unconditionally it costed about 40% of the
//! throughput of `optimystic bench` (three nodes in one process).
//!
//! An old member treats a gossiped record as a re-delivery of the decided record: it answers with
//! its stored vote (or executes it) and ignores the other votes.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use optimystic_core::BlockId;
use optimystic_core::consensus::update_request;
use optimystic_core::identity::PeerId;
use optimystic_core::keynet::MAX_CLUSTER_SIZE;
use optimystic_core::network::ProtocolKind;
use optimystic_core::record::ClusterRecord;
use tokio::time::Instant;

use crate::engine::{Inner, RESULT_FIELD, RecordContext};

/// Whom a fresh execution sends this member's commit vote to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gossip {
    /// Every other peer of the record (an execution by recovery or after catch-up).
    Everyone,
    /// Every other peer but this one, which handed the record over and gets the vote in its answer.
    Except(PeerId),
    /// Nobody: this node's own coordinator sends the final record, which carries the vote.
    Nobody,
}

impl Inner {
    /// Sends the decided record `executed` with this member's commit vote to the peers `gossip`
    /// names (at most [`MAX_CLUSTER_SIZE`]), each once, in the background, unless the copy kept
    /// here holds approving votes from a commit quorum by then (see the module documentation);
    /// merges the votes their answers carry into the kept copy. The record sent is the kept copy,
    /// read when the gossip is due (nothing is held meanwhile but the record's hash and peers); a
    /// record kept for no revision (a cancel) is not gossiped.
    pub(crate) fn gossip_vote(self: &Arc<Self>, executed: &ClusterRecord, gossip: Gossip, cx: &RecordContext) {
        let skip = match gossip {
            Gossip::Nobody => return,
            Gossip::Everyone => None,
            Gossip::Except(peer) => Some(peer),
        };
        let targets: Vec<PeerId> = executed
            .peers
            .keys()
            .filter(|peer| **peer != self.me_text)
            .filter_map(|peer| peer.parse::<PeerId>().ok())
            .filter(|peer| Some(*peer) != skip)
            .take(MAX_CLUSTER_SIZE)
            .collect();
        if targets.is_empty() {
            return;
        }
        let left_ms = cx.expiration_ms.saturating_sub(self.clock.now_ms());
        if left_ms == 0 {
            return;
        }
        // The final record normally brings every vote first; half the record's remaining
        // lifetime at most, so a record this gossip executes elsewhere is still live there.
        let wait = Duration::from_millis(self.config.request_timeout_ms.min(left_ms / 2));
        let timeout = Duration::from_millis(self.config.request_timeout_ms.min(left_ms - left_ms / 2).max(1));
        let needed = self.config.commit_threshold.of(executed.peers.len());
        let hash = executed.message_hash.clone();
        let blocks: Vec<BlockId> = cx.blocks().into_iter().cloned().collect();
        let me = Arc::clone(self);
        self.spawn(async move {
            tokio::time::sleep(wait).await;
            let mut record = match me.local.kept_record(&hash).await {
                Ok(Some(kept)) if kept.commits.values().filter(|v| v.is_approve()).count() < needed => kept,
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!(message_hash = %hash, error = %e, "cannot read the kept record to gossip a vote");
                    return;
                }
            };
            record.extra.remove(RESULT_FIELD);
            let request = Arc::new(update_request(&record));
            let deadline = Instant::now() + timeout;
            let asks = targets.into_iter().map(|peer| {
                let (me, request) = (&me, request.clone());
                async move {
                    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                    match me.network.request_shared(peer, ProtocolKind::Cluster, request, left).await {
                        Ok(reply) => Some(reply),
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "a gossiped commit vote was not answered");
                            None
                        }
                    }
                }
            });
            for reply in join_all(asks).await.into_iter().flatten() {
                let Ok(reply) = ClusterRecord::from_value(reply) else { continue };
                if reply.message_hash == record.message_hash {
                    me.merge_into_kept(&reply, &blocks).await;
                }
            }
        });
    }

    /// Adds the verified commit votes of `record` that the kept copy lacks (see the module
    /// documentation); failures are logged (the votes may arrive again).
    pub(crate) async fn merge_votes(&self, record: &ClusterRecord, cx: &RecordContext) {
        let blocks: Vec<BlockId> = cx.blocks().into_iter().cloned().collect();
        self.merge_into_kept(record, &blocks).await;
    }

    /// [`Inner::merge_votes`] for a record naming `blocks`.
    async fn merge_into_kept(&self, record: &ClusterRecord, blocks: &[BlockId]) {
        match self.local.merge_kept_commits(blocks, record).await {
            Ok(0) => {}
            Ok(added) => tracing::trace!(message_hash = %record.message_hash, added, "commit votes merged"),
            Err(e) => {
                tracing::warn!(message_hash = %record.message_hash, error = %e, "merging commit votes failed");
            }
        }
    }
}

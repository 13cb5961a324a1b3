//! The coordinator side (SPEC 4.1-4.4): build the record, collect promises, then commits.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use optimystic_core::consensus::update_request;
use optimystic_core::crypto;
use optimystic_core::identity::PeerId;
use optimystic_core::keynet::ClusterPeers;
use optimystic_core::model::{CommitResult, PendResult, StaleFailure};
use optimystic_core::network::{NetworkError, ProtocolKind};
use optimystic_core::record::{ClusterPeer, ClusterRecord, Vote, VoteType};
use optimystic_core::wire::{RepoMessage, RepoOperation, RepoResponse, decode_response};
use optimystic_core::{ErrorCode, RejectCategory, RejectReason, RepoError};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::engine::{Inner, RESULT_FIELD};
use crate::member::{Origin, verified_vote};

/// One promise being asked for: the peer and its answer.
type PromiseAsk<'a> = Pin<Box<dyn Future<Output = (PeerId, Result<ClusterRecord, String>)> + Send + 'a>>;

/// Each distinct reason once, in first-seen order, followed by ` (N peers)` when more than one
/// peer gave it.
fn tally(reasons: &[String]) -> Vec<String> {
    let mut counted: Vec<(&str, usize)> = Vec::new();
    for reason in reasons {
        match counted.iter_mut().find(|(r, _)| *r == reason.as_str()) {
            Some((_, count)) => *count += 1,
            None => counted.push((reason, 1)),
        }
    }
    counted.into_iter().map(|(r, count)| if count > 1 { format!("{r} ({count} peers)") } else { r.to_owned() }).collect()
}

/// The details of `invalid` rejections (the category is the error's code), each distinct one
/// once: every member that refuses an invalid transform says the same thing.
fn invalid_details(reasons: &[String]) -> String {
    let mut details: Vec<String> = Vec::new();
    for reason in reasons {
        let parsed = RejectReason::parse(reason);
        let detail = if parsed.detail.is_empty() { reason.clone() } else { parsed.detail };
        if !details.contains(&detail) {
            details.push(detail);
        }
    }
    details.join("; ")
}

/// The votes collected in phase 1.
#[derive(Debug, Default)]
struct Promises {
    votes: BTreeMap<String, Vote>,
    /// The first `StaleFailure` a stale rejection came with.
    stale: Option<Value>,
    /// Peers that gave no valid vote, with why.
    silent: Vec<String>,
}

impl Promises {
    fn approvals(&self) -> usize {
        self.votes.values().filter(|v| v.is_approve()).count()
    }

    fn rejections(&self) -> usize {
        self.votes.len() - self.approvals()
    }

    fn reasons(&self) -> Vec<String> {
        self.votes
            .iter()
            .filter(|(_, v)| !v.is_approve())
            .map(|(peer, v)| match v.r#type {
                VoteType::Conflict => format!("conflict with {}", v.conflict_with.as_deref().unwrap_or("?")),
                _ => v.reject_reason.clone().unwrap_or_else(|| format!("{peer} rejected")),
            })
            .collect()
    }

    /// Takes `peer`'s promise out of its answer.
    fn add(&mut self, record: &ClusterRecord, peer: &PeerId, answer: Result<ClusterRecord, String>) {
        let reply = match answer {
            Ok(reply) if reply.message_hash == record.message_hash => reply,
            Ok(_) => return self.silent.push(format!("{peer}: answered about another record")),
            Err(e) => return self.silent.push(format!("{peer}: {e}")),
        };
        let Some(vote) = verified_vote(&reply.promises, peer, &record.promise_hash()) else {
            return self.silent.push(format!("{peer}: no valid promise"));
        };
        let stale = vote.reject_reason.as_deref().is_some_and(|r| RejectReason::parse(r).category == RejectCategory::Stale);
        if stale && self.stale.is_none() {
            self.stale = reply.extra.get(RESULT_FIELD).cloned().or_else(|| {
                let reason = vote.reject_reason.clone();
                serde_json::to_value(StaleFailure { reason, ..StaleFailure::default() }).ok()
            });
        }
        self.votes.insert(crypto::peer_text(peer), vote);
    }
}

/// The commit votes collected in phase 2.
#[derive(Debug, Default)]
struct Commits {
    approvals: usize,
    failures: usize,
    /// The result of the first member that applied the operation.
    result: Option<Value>,
    /// The error of the first member that failed to apply it.
    failure: Option<Value>,
}

impl Commits {
    /// Counts `peer`'s commit vote in its answer (already verified unless `local`).
    fn add(&mut self, reply: &ClusterRecord, peer: &str, local: bool) {
        let Some(vote) = reply.commits.get(peer) else {
            if local {
                tracing::debug!("the local member did not apply the decided record (it is behind on a block)");
            }
            return;
        };
        let result = reply.extra.get(RESULT_FIELD).cloned();
        if vote.is_approve() {
            self.approvals += 1;
            if self.result.is_none() {
                self.result = result;
            }
        } else {
            self.failures += 1;
            if self.failure.is_none() {
                self.failure = result;
            }
        }
    }
}

fn parse_reply(reply: Result<Value, NetworkError>) -> Result<ClusterRecord, String> {
    let value = reply.map_err(|e| e.to_string())?;
    ClusterRecord::from_value(value).map_err(|e| e.to_string())
}

/// Whether a failed send of the final record is worth repeating.
fn retryable(e: &NetworkError) -> bool {
    match e {
        NetworkError::Timeout { .. } | NetworkError::DialFailed { .. } | NetworkError::Stream { .. } | NetworkError::Busy { .. } => true,
        NetworkError::Remote { .. } => {
            matches!(e.remote_code(), Some(ErrorCode::Busy | ErrorCode::Unavailable | ErrorCode::Internal))
        }
        _ => false,
    }
}

/// A `StaleFailure` as the answer to an operation of `kind` (a member's unreadable one becomes a
/// bare `StaleFailure`: the client re-reads either way).
fn stale_response(kind: &str, value: Value) -> Result<RepoResponse, RepoError> {
    let failure: StaleFailure = serde_json::from_value(value).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "a member sent an unreadable stale answer");
        StaleFailure { reason: Some("a member reported staleness".into()), ..StaleFailure::default() }
    });
    match kind {
        "pend" => Ok(RepoResponse::Pend(PendResult::Stale(failure))),
        "commit" => Ok(RepoResponse::Commit(CommitResult::Stale(failure))),
        other => Err(RepoError::Internal(format!("a {other} cannot be stale"))),
    }
}

impl Inner {
    /// Runs the majority two-phase commit of `message` among `peers`.
    pub(crate) async fn coordinate(self: &Arc<Self>, peers: &ClusterPeers, message: &RepoMessage) -> Result<RepoResponse, RepoError> {
        self.ensure_started().await?;
        let operation = message.operation()?;
        let kind = operation.kind();
        match operation {
            RepoOperation::Get(_) => return Err(RepoError::BadRequest("a get is not agreed by consensus".into())),
            RepoOperation::Pend(request) => {
                for block_id in request.transforms.block_ids() {
                    request
                        .transforms
                        .transform_for(&block_id)
                        .validate_shape(&block_id)
                        .map_err(|reason| RepoError::InvalidTransform { block_id: block_id.clone(), reason })?;
                }
            }
            RepoOperation::Commit(_) | RepoOperation::Cancel { .. } => {}
        }
        if peers.is_empty() {
            return Err(RepoError::BadRequest("the cluster has no peer".into()));
        }
        let now = self.clock.now_ms();
        if message.is_expired(now) {
            return Err(RepoError::Expired);
        }
        let expiration_ms = message.expiration.min(now.saturating_add(self.config.record_timeout_ms));
        let deadline = Instant::now() + Duration::from_millis(expiration_ms.saturating_sub(now));
        let message = RepoMessage { expiration: expiration_ms, ..message.clone() };
        let value = serde_json::to_value(&message).map_err(|e| RepoError::Internal(format!("encoding the message: {e}")))?;
        let mut peer_map = BTreeMap::new();
        for (peer, info) in peers {
            let entry = ClusterPeer::new(peer, info.multiaddrs.clone())
                .map_err(|e| RepoError::BadRequest(format!("cluster peer {peer}: {e}")))?;
            peer_map.insert(crypto::peer_text(peer), entry);
        }
        let record = ClusterRecord::new(peer_map, value);
        let n = record.peers.len();
        let quorum = self.config.promise_threshold.promise_quorum(n);
        let member = peers.contains_key(&self.me);
        let others: Vec<PeerId> = peers.keys().copied().filter(|p| *p != self.me).collect();

        // Phase 1: promises. The record goes to every peer in parallel (SPEC 4.1), this node's
        // promise through the local path at the same time; the phase ends at a quorum or a proven
        // abort. The local promise runs as its own task: abandoning it midway (say, in the middle
        // of persisting the vote) would leave a stored promise without its reservation. The task
        // is short (one member decision) and may outlive a node shutdown by that much.
        let mut promises = Promises::default();
        let request = update_request(&record);
        let mut asks: FuturesUnordered<PromiseAsk<'_>> = others
            .iter()
            .map(|peer| -> PromiseAsk<'_> {
                let (peer, request) = (*peer, request.clone());
                Box::pin(async move { (peer, parse_reply(self.send(peer, request, deadline).await)) })
            })
            .collect();
        let local_promise = member.then(|| {
            let (me, local) = (Arc::clone(self), record.clone());
            tokio::spawn(async move { me.update(local, Origin::Local).await })
        });
        if let Some(handle) = local_promise {
            asks.push(Box::pin(async move {
                let answer = match handle.await {
                    Ok(answer) => answer.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("the local promise task failed: {e}")),
                };
                (self.me, answer)
            }));
        }
        while promises.approvals() < quorum && promises.rejections() <= n - quorum {
            let Some((peer, answer)) = asks.next().await else { break };
            promises.add(&record, &peer, answer);
        }
        drop(asks);

        if promises.approvals() < quorum {
            return self.fail(record, promises, kind, quorum, member, others).await;
        }

        // Phase 2: the record with its promise quorum.
        let mut decided = record;
        decided.promises = promises.votes;
        self.commit_phase(decided, kind, member, others, deadline).await
    }

    /// One cluster request, within the request timeout and the record's deadline.
    async fn send(&self, peer: PeerId, request: Value, deadline: Instant) -> Result<Value, NetworkError> {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let timeout = left.min(Duration::from_millis(self.config.request_timeout_ms));
        self.network.request(peer, ProtocolKind::Cluster, request, timeout).await
    }

    /// The promise quorum was not reached: free reservations when provably out of reach, and
    /// answer the client.
    async fn fail(
        self: &Arc<Self>,
        record: ClusterRecord,
        promises: Promises,
        kind: &str,
        quorum: usize,
        member: bool,
        others: Vec<PeerId>,
    ) -> Result<RepoResponse, RepoError> {
        let n = record.peers.len();
        let abort_proven = promises.rejections() > n - quorum;
        let reasons = promises.reasons();
        let summary = format!(
            "{} of {n} peers approved, {quorum} needed; rejections: [{}]; no vote: [{}]",
            promises.approvals(),
            tally(&reasons).join("; "),
            promises.silent.join("; ")
        );
        let stale = promises.stale.clone();
        if abort_proven {
            let mut aborted = record;
            aborted.promises = promises.votes;
            if member && let Err(e) = self.update(aborted.clone(), Origin::Local).await {
                tracing::debug!(error = %e, "local abort failed; the reservation expires through recovery");
            }
            let request = update_request(&aborted);
            let me = Arc::clone(self);
            let deadline = Instant::now() + Duration::from_millis(self.config.request_timeout_ms);
            self.spawn(async move {
                let sends = others.iter().map(|peer| me.send(*peer, request.clone(), deadline));
                futures::future::join_all(sends).await;
            });
        }
        tracing::debug!(%summary, "promise phase failed");
        if let Some(stale) = stale {
            return stale_response(kind, stale);
        }
        if abort_proven
            && !reasons.is_empty()
            && reasons.iter().all(|r| RejectReason::parse(r).category == RejectCategory::Invalid)
        {
            return Err(RepoError::BadRequest(invalid_details(&reasons)));
        }
        Err(RepoError::ConsensusFailed(summary))
    }

    /// Sends the decided record, applies it locally, and waits for the commit threshold.
    async fn commit_phase(
        self: &Arc<Self>,
        decided: ClusterRecord,
        kind: &str,
        member: bool,
        others: Vec<PeerId>,
        deadline: Instant,
    ) -> Result<RepoResponse, RepoError> {
        let n = decided.peers.len();
        let needed = self.config.commit_threshold.of(n);
        let mut commits = Commits::default();
        let (tx, mut rx) = mpsc::channel(others.len().max(1));
        for peer in &others {
            let me = Arc::clone(self);
            let (peer, record, tx) = (*peer, decided.clone(), tx.clone());
            self.spawn(async move { me.deliver_final(peer, record, tx).await });
        }
        drop(tx);
        if member {
            match self.update(decided.clone(), Origin::Local).await {
                Ok(reply) => commits.add(&reply, &self.me_text, true),
                Err(e) => tracing::warn!(error = %e, "executing the decided record locally failed"),
            }
        }
        // Stop when the commit threshold is reached, or when enough members failed to apply it
        // that it cannot be.
        while commits.approvals < needed && commits.failures <= n - needed {
            let Ok(Some((peer, reply))) = tokio::time::timeout_at(deadline, rx.recv()).await else { break };
            let Ok(reply) = ClusterRecord::from_value(reply) else { continue };
            if reply.message_hash != decided.message_hash {
                continue;
            }
            // Only `peer`'s own commit vote counts, and its reply arrived on a channel that the
            // transport authenticated as `peer` (Noise): its signature could only have been forged
            // by `peer` itself. Commit votes are never forwarded to third parties, so their
            // signatures are not checked here (members check every vote they are sent).
            commits.add(&reply, &crypto::peer_text(&peer), false);
        }
        if commits.approvals >= needed {
            let result = commits.result.ok_or_else(|| RepoError::Unavailable("no member reported the execution result".into()))?;
            return decode_response(kind, result);
        }
        if commits.failures > n - needed
            && let Some(failure) = commits.failure
        {
            // Applied everywhere it could be, and failed the same way on enough members: the
            // operation's own answer (for example a transform that no longer applies).
            return decode_response(kind, failure);
        }
        Err(RepoError::Unavailable(format!(
            "the record was decided but only {} of {needed} needed commits arrived; recovery settles it",
            commits.approvals
        )))
    }

    /// Sends the decided record to one peer, re-sending with doubling delays while it does not
    /// answer (bounded by `retry_attempts` and the record's expiration), and reports the answer.
    async fn deliver_final(self: Arc<Self>, peer: PeerId, record: ClusterRecord, tx: mpsc::Sender<(PeerId, Value)>) {
        let request = update_request(&record);
        let expiration_ms = record.expiration_ms().unwrap_or(0);
        let mut delay_ms = self.config.retry_base_ms;
        for attempt in 0..=self.config.retry_attempts {
            let now = self.clock.now_ms();
            if now > expiration_ms {
                return;
            }
            let deadline = Instant::now() + Duration::from_millis(expiration_ms - now);
            match self.send(peer, request.clone(), deadline).await {
                Ok(reply) => {
                    // The coordinator may have stopped listening: that is fine.
                    let _ = tx.send((peer, reply)).await;
                    return;
                }
                Err(e) if retryable(&e) && attempt < self.config.retry_attempts => {
                    tracing::debug!(%peer, attempt, error = %e, "re-sending the decided record");
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    delay_ms = delay_ms.saturating_mul(2).min(self.config.retry_max_ms);
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "giving up sending the decided record; recovery settles it");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_member_reasons_are_said_once() {
        let same = "invalid: invalid transform for block diary: field \"x\" does not exist".to_owned();
        let reasons = vec![same.clone(), same.clone()];
        assert_eq!(invalid_details(&reasons), "invalid transform for block diary: field \"x\" does not exist");
        let other = "invalid: block diary: header changes".to_owned();
        assert_eq!(
            invalid_details(&[same.clone(), other, same.clone()]),
            "invalid transform for block diary: field \"x\" does not exist; block diary: header changes"
        );
        let busy = "busy: too many reservations".to_owned();
        assert_eq!(tally(&[same.clone(), busy.clone(), same.clone()]), vec![format!("{same} (2 peers)"), busy]);
    }
}

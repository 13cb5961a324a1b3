//! The coordinator side (SPEC 4.1-4.4, 4.14): build the record, collect promises, then commits.
//!
//! # Batching (SPEC 4.14)
//! Operations are queued per peer set, in a *lane*. A lane runs at most `max_records_in_flight`
//! records at a time. An operation that finds a record slot free goes out at once, alone, run by
//! its own caller (no task in between): there is no timer, so an idle cluster answers as fast as
//! without batching. When that record is settled, the slot passes to a driver task if operations
//! queued meanwhile, and is freed otherwise. Operations that arrive
//! while every slot is busy wait in the lane and go out together in the next record: at most
//! `max_batch_ops` of them and about `max_batch_bytes` of JSON (a single larger operation still
//! goes alone), their block sets pairwise disjoint (an operation naming a block already in the
//! batch waits for the next record, so operations on one block keep their order), in arrival
//! order otherwise. An operation whose expiration passed while queued is answered `expired`.
//! The record's expiration is the earliest of its operations' (capped at `record_timeout_ms`).
//!
//! Members approve a batch only when every operation passes. When the promise quorum is missed,
//! the coordinator answers the client of each operation a member named in a `batch:` rejection
//! (or that a member rejected as a whole) with that operation's own outcome, exactly as if it had
//! been alone (a `StaleFailure` with its member's `missing`, `bad-request` when every rejection
//! naming it says invalid and enough members did, `consensus-failed` otherwise). The other
//! operations run again in a new record when nothing of the failed one stays reserved: when the
//! rejections prove it out of reach (the coordinator waits until the approving members heard of
//! the abort), or when no member but this node's own approved (its member drops a promise that
//! never left the node, `Inner::abandon`). Otherwise (approving members that did not hear the
//! end of the record keep their reservations until recovery) they are answered
//! `consensus-failed` too: a re-run would only meet those reservations. This is the price of
//! batching under failures: with a member unreachable, an operation another member rejects can
//! fail the operations that shared its record (retryably). A decided batch's commit votes and
//! results are counted per operation: an operation succeeded once `commit_threshold` members
//! gave an approving vote for it with a success result (SPEC 4.4; an approving vote next to a
//! result that is not a success is invalid and ignored).
//!
//! After a commit quorum the final record (every verified commit vote collected) goes to every
//! peer in a background task of its own ([`Inner::finish`]), so neither the client nor the lane
//! waits for it.
//!
//! With `max_batch_ops = 1` there are no lanes: every operation runs its own record at once, as
//! many concurrently as callers ask.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
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
use optimystic_core::wire::{RecordMessage, RepoMessage, RepoOperation, RepoResponse, decode_response};
use optimystic_core::{BlockId, ErrorCode, RejectCategory, RejectReason, RepoError};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::checks::{blocks_of, custody_failure};
use crate::engine::{Inner, RESULT_FIELD};
use crate::member::{Origin, verified_vote};

/// One promise being asked for: the peer and its answer.
type PromiseAsk<'a> = Pin<Box<dyn Future<Output = (PeerId, Result<ClusterRecord, String>)> + Send + 'a>>;

/// What a record came to for one of its operations.
#[derive(Debug)]
enum OpOutcome {
    /// The answer to the operation's client.
    Answer(Result<RepoResponse, RepoError>),
    /// The batch was rejected for other operations only: run this one again in a new record.
    Rerun,
}

/// Which operations of a record a rejecting vote names, and why: a `batch:` reason lists them;
/// any other reason (and a conflict vote) concerns every operation.
fn named(vote: &Vote, ops: usize) -> Vec<(usize, RejectReason)> {
    let text = match vote.r#type {
        VoteType::Conflict => format!("conflict with {}", vote.conflict_with.as_deref().unwrap_or("?")),
        _ => vote.reject_reason.clone().unwrap_or_else(|| "rejected".to_owned()),
    };
    let reason = RejectReason::parse(&text);
    match reason.batch_failures() {
        Some(Ok(failures)) => failures.into_iter().filter(|f| f.index < ops).map(|f| (f.index, f.reason)).collect(),
        Some(Err(_)) | None => (0..ops).map(|index| (index, reason.clone())).collect(),
    }
}

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
    counted
        .into_iter()
        .map(|(r, count)| if count > 1 { format!("{r} ({count} peers)") } else { r.to_owned() })
        .collect()
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
#[derive(Debug)]
struct Promises {
    votes: BTreeMap<String, Vote>,
    /// Per operation, the first `StaleFailure` a stale rejection of it came with.
    stale: Vec<Option<Value>>,
    /// Peers that gave no valid vote, with why.
    silent: Vec<String>,
}

impl Promises {
    fn new(ops: usize) -> Self {
        Self { votes: BTreeMap::new(), stale: vec![None; ops], silent: Vec::new() }
    }

    fn approvals(&self) -> usize {
        self.votes.values().filter(|v| v.is_approve()).count()
    }

    fn rejections(&self) -> usize {
        self.votes.len() - self.approvals()
    }

    /// Per operation: the reasons of the rejections naming it (one per rejecting member).
    fn per_operation(&self) -> Vec<Vec<RejectReason>> {
        let mut out = vec![Vec::new(); self.stale.len()];
        for vote in self.votes.values().filter(|v| !v.is_approve()) {
            for (index, reason) in named(vote, self.stale.len()) {
                if let Some(reasons) = out.get_mut(index) {
                    reasons.push(reason);
                }
            }
        }
        out
    }

    /// What a failed promise phase says, every peer asked counted once: as an approval, a
    /// rejection, a peer that gave no vote, or one not waited for (the outcome was decided without
    /// it).
    fn failure_summary(&self, n: usize, quorum: usize) -> String {
        let (approvals, rejections, silent) = (self.approvals(), self.rejections(), self.silent.len());
        let mut text = format!(
            "{approvals} of {n} peers approved, {quorum} needed; {rejections} rejected: [{}]; {silent} gave no vote: [{}]",
            tally(&self.reasons()).join("; "),
            self.silent.join("; ")
        );
        let unheard = n.saturating_sub(approvals + rejections + silent);
        if unheard > 0 {
            text.push_str(&format!("; {unheard} not waited for (the outcome was decided without them)"));
        }
        text
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

    /// Takes `peer`'s promise out of its answer (`promise_hash` is the record's). This node's
    /// own vote (`local`) comes from its own member through the local path: it is not checked
    /// again.
    fn add(
        &mut self,
        record: &ClusterRecord,
        promise_hash: &str,
        peer: &PeerId,
        local: bool,
        answer: Result<ClusterRecord, String>,
    ) {
        let reply = match answer {
            Ok(reply) if reply.message_hash == record.message_hash => reply,
            Ok(_) => return self.silent.push(format!("{peer}: answered about another record")),
            Err(e) => return self.silent.push(format!("{peer}: {e}")),
        };
        let vote = if local {
            reply.promises.get(&crypto::peer_text(peer)).cloned()
        } else {
            verified_vote(&reply.promises, peer, promise_hash)
        };
        let Some(vote) = vote else {
            return self.silent.push(format!("{peer}: no valid promise"));
        };
        if !vote.is_approve() {
            let ops = self.stale.len();
            let result = reply.extra.get(RESULT_FIELD);
            for (index, reason) in named(&vote, ops) {
                let Some(slot) = self.stale.get_mut(index) else { continue };
                if reason.category != RejectCategory::Stale || slot.is_some() {
                    continue;
                }
                // A single operation's answer carries its `StaleFailure`; a batch's, an array of them.
                let sent = if ops == 1 { result } else { result.and_then(|r| r.get(index)) };
                *slot = sent.filter(|v| v.is_object()).cloned().or_else(|| {
                    let bare = StaleFailure { reason: Some(reason.detail.clone()), ..StaleFailure::default() };
                    serde_json::to_value(bare).ok()
                });
            }
        }
        self.votes.insert(crypto::peer_text(peer), vote);
    }
}

/// Most `pending` entries an operation's answer gathers from the members' results (SPEC 4.4:
/// advisory lists are merged, each member's entries bounded by what one result can carry).
const MAX_MERGED_PENDING: usize = 1_024;

/// The execution result of one operation when it is a success (SPEC 4.4: `success` compared, a
/// cancel's `null` is its success), decoded as the operation's answer; `None` otherwise.
fn success(kind: &str, sent: Option<&Value>) -> Option<RepoResponse> {
    let value = sent.cloned().unwrap_or(Value::Null);
    match decode_response(kind, value.clone()) {
        Ok(RepoResponse::Pend(PendResult::Success(s))) => Some(RepoResponse::Pend(PendResult::Success(s))),
        Ok(RepoResponse::Commit(result)) if result.is_success() => Some(RepoResponse::Commit(result)),
        Ok(RepoResponse::Cancel) if value.is_null() => Some(RepoResponse::Cancel),
        _ => None,
    }
}

/// Adds `more`'s `pending` entries that `into` lacks (both pend successes), within
/// [`MAX_MERGED_PENDING`].
fn merge_pending(into: &mut RepoResponse, more: RepoResponse) {
    let (RepoResponse::Pend(PendResult::Success(into)), RepoResponse::Pend(PendResult::Success(more))) = (into, more)
    else {
        return;
    };
    for entry in more.pending {
        if into.pending.len() >= MAX_MERGED_PENDING {
            return;
        }
        if !into.pending.iter().any(|p| p.block_id == entry.block_id && p.trx_id == entry.trx_id) {
            into.pending.push(entry);
        }
    }
}

/// The commit votes collected in phase 2, per operation (SPEC 4.4: an operation succeeded when a
/// commit quorum of approving members reported success).
#[derive(Debug)]
struct Commits {
    kinds: Vec<&'static str>,
    /// Members that applied each operation and reported its success.
    applied: Vec<usize>,
    /// Members on which each operation failed.
    failed: Vec<usize>,
    /// Each operation's answer: the first success reported, with every `pending` list merged.
    results: Vec<Option<RepoResponse>>,
    /// The results of the members on which each operation failed.
    failures: Vec<Vec<Value>>,
    /// Every valid commit vote counted, by peer: what the final record carries.
    votes: BTreeMap<String, Vote>,
}

impl Commits {
    fn new(kinds: &[&'static str]) -> Self {
        let ops = kinds.len();
        Self {
            kinds: kinds.to_vec(),
            applied: vec![0; ops],
            failed: vec![0; ops],
            results: vec![None; ops],
            failures: vec![Vec::new(); ops],
            votes: BTreeMap::new(),
        }
    }

    /// Counts `peer`'s commit `vote` (verified, or this node's own) with the results of its
    /// answer `reply`: an approving vote applied every operation, a rejecting one failed those it
    /// names (all, unless it is a `batch:` reason) and applied the others. An operation counts as
    /// applied only with a success result; an approving vote whose results are not all successes
    /// is invalid (SPEC 4.4): it is ignored and logged.
    fn add(&mut self, reply: &ClusterRecord, peer: &str, vote: Option<Vote>) {
        let Some(vote) = vote else { return };
        let ops = self.applied.len();
        let failing: BTreeSet<usize> =
            if vote.is_approve() { BTreeSet::new() } else { named(&vote, ops).into_iter().map(|(i, _)| i).collect() };
        let result = reply.extra.get(RESULT_FIELD);
        let sent = |index: usize| if ops == 1 { result } else { result.and_then(|r| r.get(index)) };
        let successes: Vec<Option<RepoResponse>> = (0..ops)
            .map(|index| {
                let kind = self.kinds.get(index).copied().unwrap_or("");
                if failing.contains(&index) { None } else { success(kind, sent(index)) }
            })
            .collect();
        if vote.is_approve() && successes.iter().any(Option::is_none) {
            tracing::warn!(%peer, "ignoring an approving commit vote whose result is not a success");
            return;
        }
        for (index, answer) in successes.into_iter().enumerate() {
            if failing.contains(&index) {
                if let (Some(count), Some(kept)) = (self.failed.get_mut(index), self.failures.get_mut(index)) {
                    *count += 1;
                    kept.push(sent(index).cloned().unwrap_or(Value::Null));
                }
                continue;
            }
            // A rejecting batch vote's other operations count only with a success result.
            let Some(answer) = answer else { continue };
            if let (Some(count), Some(kept)) = (self.applied.get_mut(index), self.results.get_mut(index)) {
                *count += 1;
                match kept {
                    Some(kept) => merge_pending(kept, answer),
                    None => *kept = Some(answer),
                }
            }
        }
        self.votes.insert(peer.to_owned(), vote);
    }

    /// Whether every operation succeeded on `needed` members or failed on too many for that.
    fn settled(&self, needed: usize, n: usize) -> bool {
        self.applied.iter().zip(&self.failed).all(|(applied, failed)| *applied >= needed || *failed > n - needed)
    }

    /// Whether some operation reached the commit quorum.
    fn any_applied(&self, needed: usize) -> bool {
        self.applied.iter().any(|applied| *applied >= needed)
    }

    /// Each operation's answer.
    fn answers(&self, needed: usize, n: usize) -> Vec<Result<RepoResponse, RepoError>> {
        self.applied
            .iter()
            .zip(&self.failed)
            .zip(self.results.iter().zip(&self.failures))
            .zip(&self.kinds)
            .map(|(((applied, failed), (result, failures)), kind)| {
                if *applied >= needed
                    && let Some(result) = result
                {
                    return Ok(result.clone());
                }
                // Failed the same way on more members than could still apply it: the operation's
                // own answer (for example a transform that no longer applies). One member's
                // unsigned result alone never decides it.
                if *failed > n - needed
                    && let Some(failure) =
                        failures.iter().find(|f| failures.iter().filter(|g| g == f).count() > n - needed)
                {
                    return decode_response(kind, failure.clone());
                }
                Err(RepoError::Unavailable(format!(
                    "the record was decided but only {applied} of {needed} needed members reported success; the \
                     outcome is unknown: retry the same transaction"
                )))
            })
            .collect()
    }
}

/// Counts the commit vote in a member's answer to the decided record: only `peer`'s own vote,
/// with its signature checked, since it goes into the final record that other members verify.
fn add_reply(commits: &mut Commits, message_hash: &str, commit_hash: &str, peer: PeerId, reply: Value) {
    let Ok(reply) = ClusterRecord::from_value(reply) else { return };
    if reply.message_hash != message_hash {
        return;
    }
    let vote = verified_vote(&reply.commits, &peer, commit_hash);
    commits.add(&reply, &crypto::peer_text(&peer), vote);
}

fn parse_reply(reply: Result<Value, NetworkError>) -> Result<ClusterRecord, String> {
    let value = reply.map_err(|e| e.to_string())?;
    ClusterRecord::from_value(value).map_err(|e| e.to_string())
}

/// Whether a failed send of the final record is worth repeating.
fn retryable(e: &NetworkError) -> bool {
    match e {
        NetworkError::Timeout { .. }
        | NetworkError::DialFailed { .. }
        | NetworkError::Stream { .. }
        | NetworkError::Busy { .. } => true,
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

/// One operation waiting in a lane for the next record.
#[derive(Debug)]
struct Queued {
    /// The peer set, as the caller gave it (the record carries the first operation's).
    peers: ClusterPeers,
    operation: RepoOperation,
    /// The operation's own expiration, ms since the Unix epoch.
    expiration_ms: u64,
    /// The blocks it names.
    blocks: Vec<BlockId>,
    /// Its size as JSON, in bytes.
    bytes: usize,
    reply: oneshot::Sender<Result<RepoResponse, RepoError>>,
}

/// The operations queued for one peer set, and how many records of it are in flight.
#[derive(Debug, Default)]
struct Lane {
    running: usize,
    queue: VecDeque<Queued>,
}

/// The coordinator's lanes, by peer set (sorted peer ids).
#[derive(Debug, Default)]
pub(crate) struct Lanes {
    lanes: StdMutex<HashMap<Vec<PeerId>, Lane>>,
}

/// What the next record of a lane is built from.
struct Batch {
    peers: ClusterPeers,
    queued: Vec<Queued>,
}

impl Lanes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<PeerId>, Lane>> {
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues an operation; `true` when the caller must start a driver for the lane (fewer than
    /// `max_running` records of it in flight).
    fn push(&self, key: &[PeerId], queued: Queued, max_running: usize) -> bool {
        let mut lanes = self.lock();
        let lane = lanes.entry(key.to_vec()).or_default();
        lane.queue.push_back(queued);
        if lane.running < max_running {
            lane.running += 1;
            return true;
        }
        false
    }

    /// Puts operations to run again at the front of the lane, in their order.
    fn requeue(&self, key: &[PeerId], queued: Vec<Queued>) {
        let mut lanes = self.lock();
        let lane = lanes.entry(key.to_vec()).or_default();
        for q in queued.into_iter().rev() {
            lane.queue.push_front(q);
        }
    }

    /// Takes the next batch of the lane (see the module documentation): at most `max_ops`
    /// operations, about `max_bytes` of them and at most `max_blocks` blocks together (members
    /// refuse larger records); `None` when the queue is empty, and then the calling driver is
    /// counted out (in the same step, so an operation queued meanwhile always finds a driver).
    fn next_batch(
        &self,
        key: &[PeerId],
        (max_ops, max_bytes, max_blocks): (usize, usize, usize),
        now_ms: u64,
    ) -> Option<Batch> {
        let mut lanes = self.lock();
        let lane = lanes.get_mut(key)?;
        let mut queued: Vec<Queued> = Vec::new();
        let mut blocks: BTreeSet<BlockId> = BTreeSet::new();
        let mut bytes = 0usize;
        let mut index = 0;
        while queued.len() < max_ops {
            let Some(next) = lane.queue.get(index) else { break };
            if next.expiration_ms < now_ms {
                if let Some(expired) = lane.queue.remove(index) {
                    let _ = expired.reply.send(Err(RepoError::Expired));
                }
                continue;
            }
            let fits = queued.is_empty()
                || (bytes.saturating_add(next.bytes) <= max_bytes
                    && blocks.len().saturating_add(next.blocks.len()) <= max_blocks);
            if !fits || next.blocks.iter().any(|b| blocks.contains(b)) {
                index += 1;
                continue;
            }
            let Some(taken) = lane.queue.remove(index) else { break };
            blocks.extend(taken.blocks.iter().cloned());
            bytes = bytes.saturating_add(taken.bytes);
            queued.push(taken);
        }
        let Some(first) = queued.first() else {
            lane.running = lane.running.saturating_sub(1);
            if lane.running == 0 && lane.queue.is_empty() {
                lanes.remove(key);
            }
            return None;
        };
        Some(Batch { peers: first.peers.clone(), queued })
    }

    /// Whether a record slot of the lane goes on (operations are queued: `true`, the slot stays
    /// counted) or is freed (`false`), in one step with the queue.
    fn continue_or_stop(&self, key: &[PeerId]) -> bool {
        let mut lanes = self.lock();
        let Some(lane) = lanes.get_mut(key) else { return false };
        if !lane.queue.is_empty() {
            return true;
        }
        lane.running = lane.running.saturating_sub(1);
        if lane.running == 0 {
            lanes.remove(key);
        }
        false
    }

    /// A record slot of the lane is given up (the node shuts down): the last one gone fails what
    /// is still queued (each caller gets `unavailable`).
    fn driver_gone(&self, key: &[PeerId]) {
        let mut lanes = self.lock();
        let Some(lane) = lanes.get_mut(key) else { return };
        lane.running = lane.running.saturating_sub(1);
        if lane.running == 0 {
            lanes.remove(key);
        }
    }
}

/// A record slot of a lane held by the running task. Dropped while held (the record ran, or the
/// task was cancelled or panicked midway), it passes the slot on ([`Inner::hand_over`]), so a
/// lane never stalls with operations queued.
struct Slot {
    inner: Arc<Inner>,
    key: Vec<PeerId>,
    held: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.held {
            self.inner.hand_over(&self.key);
        }
    }
}

impl Inner {
    /// Runs the majority two-phase commit of `message` among `peers`: in a record of its own when
    /// batching is off (`max_batch_ops = 1`), else through the peer set's lane.
    pub(crate) async fn coordinate(
        self: &Arc<Self>,
        peers: &ClusterPeers,
        message: &RepoMessage,
    ) -> Result<RepoResponse, RepoError> {
        self.ensure_started().await?;
        let operation = message.operation()?;
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
        if message.is_expired(self.clock.now_ms()) {
            return Err(RepoError::Expired);
        }
        if self.config.max_batch_ops <= 1 {
            let outcome = self.run_record(peers, &[(operation.clone(), message.expiration)]).await.into_iter().next();
            return match outcome {
                Some(OpOutcome::Answer(answer)) => answer,
                Some(OpOutcome::Rerun) | None => {
                    Err(RepoError::Internal("a record of one operation has no other to blame".into()))
                }
            };
        }
        let bytes = serde_json::to_vec(operation)
            .map_err(|e| RepoError::Internal(format!("encoding an operation: {e}")))?
            .len();
        let blocks = blocks_of(operation);
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            peers: peers.clone(),
            operation: operation.clone(),
            expiration_ms: message.expiration,
            blocks,
            bytes,
            reply,
        };
        let key: Vec<PeerId> = peers.keys().copied().collect();
        if self.lanes.push(&key, queued, self.config.max_records_in_flight) {
            // A free record slot: this caller runs the lane's next record itself (its own
            // operation is in it; no task to start, no hand-off), then passes the slot on.
            let mut slot = Slot { inner: Arc::clone(self), key: key.clone(), held: true };
            slot.held = self.run_next(&key).await;
        }
        answer.await.unwrap_or_else(|_| {
            Err(RepoError::Unavailable("the coordinator stopped before the operation's record was settled".into()))
        })
    }

    /// Passes a lane's record slot on: to a driver task when operations are queued, else frees it.
    fn hand_over(self: &Arc<Self>, key: &[PeerId]) {
        if self.lanes.continue_or_stop(key) {
            let me = Arc::clone(self);
            let lane = key.to_vec();
            if !self.spawn(async move { me.drive(lane).await }) {
                // Shutting down: nothing will run the lane.
                self.lanes.driver_gone(key);
            }
        }
    }

    /// Runs records for a lane until its queue is empty.
    async fn drive(self: Arc<Self>, key: Vec<PeerId>) {
        let mut slot = Slot { inner: Arc::clone(&self), key: key.clone(), held: true };
        while self.run_next(&key).await {}
        slot.held = false;
    }

    /// Runs the lane's next record: takes the next batch, runs it, and answers its operations'
    /// callers (or queues them again, see [`OpOutcome::Rerun`]). `false` when the queue was
    /// empty: the slot was freed in the same step.
    async fn run_next(self: &Arc<Self>, key: &[PeerId]) -> bool {
        let now = self.clock.now_ms();
        let bounds = (self.config.max_batch_ops, self.config.max_batch_bytes, self.config.max_record_blocks);
        let Some(batch) = self.lanes.next_batch(key, bounds, now) else {
            return false;
        };
        let operations: Vec<(RepoOperation, u64)> =
            batch.queued.iter().map(|q| (q.operation.clone(), q.expiration_ms)).collect();
        let outcomes = self.run_record(&batch.peers, &operations).await;
        let mut again = Vec::new();
        for (queued, outcome) in batch.queued.into_iter().zip(outcomes) {
            match outcome {
                // The caller may have stopped waiting: that is fine.
                OpOutcome::Answer(answer) => drop(queued.reply.send(answer)),
                OpOutcome::Rerun => again.push(queued),
            }
        }
        if !again.is_empty() {
            self.lanes.requeue(key, again);
        }
        true
    }

    /// Runs one record of `operations` (each with its own expiration) among `peers`: its outcome
    /// for each operation, in order.
    async fn run_record(self: &Arc<Self>, peers: &ClusterPeers, operations: &[(RepoOperation, u64)]) -> Vec<OpOutcome> {
        let answer_all =
            |error: &dyn Fn() -> RepoError| operations.iter().map(|_| OpOutcome::Answer(Err(error()))).collect();
        let now = self.clock.now_ms();
        let earliest = operations.iter().map(|(_, expiration)| *expiration).min().unwrap_or(now);
        if earliest < now {
            return answer_all(&|| RepoError::Expired);
        }
        let expiration_ms = earliest.min(now.saturating_add(self.config.record_timeout_ms));
        let deadline = Instant::now() + Duration::from_millis(expiration_ms.saturating_sub(now));
        let kinds: Vec<&'static str> = operations.iter().map(|(op, _)| op.kind()).collect();
        let message = RecordMessage {
            operations: operations.iter().map(|(op, _)| op.clone()).collect(),
            expiration: expiration_ms,
        };
        let value = match serde_json::to_value(&message) {
            Ok(value) => value,
            Err(e) => return answer_all(&|| RepoError::Internal(format!("encoding the message: {e}"))),
        };
        let mut peer_map = BTreeMap::new();
        for (peer, info) in peers {
            match ClusterPeer::new(peer, info.multiaddrs.clone()) {
                Ok(entry) => peer_map.insert(crypto::peer_text(peer), entry),
                Err(e) => return answer_all(&|| RepoError::BadRequest(format!("cluster peer {peer}: {e}"))),
            };
        }
        let record = ClusterRecord::new(peer_map, value);
        let n = record.peers.len();
        let quorum = self.config.promise_threshold.promise_quorum(n);
        let member = peers.contains_key(&self.me);
        let others: Vec<PeerId> = peers.keys().copied().filter(|p| *p != self.me).collect();

        // Phase 1: promises. The record goes to every peer in parallel (SPEC 4.1), this node's
        // promise through the local path at the same time; the phase ends at a quorum or a proven
        // abort. The local promise runs as a background task of its own: abandoning it midway
        // when the caller stops waiting (say, in the middle of persisting the vote) would leave a
        // stored promise without its reservation. A node shutdown stops it like the rest of the
        // node's work (as a crash would; the vote is written in one batch, before it is given).
        let mut promises = Promises::new(operations.len());
        let request = Arc::new(update_request(&record));
        let mut asks: FuturesUnordered<PromiseAsk<'_>> = others
            .iter()
            .map(|peer| -> PromiseAsk<'_> {
                let (peer, request) = (*peer, request.clone());
                Box::pin(async move { (peer, parse_reply(self.send(peer, request, deadline).await)) })
            })
            .collect();
        let local_done = member.then(|| {
            let (me, local) = (Arc::clone(self), record.clone());
            let (tx, rx) = oneshot::channel();
            let (done_tx, done_rx) = oneshot::channel::<()>();
            // Nothing runs (and the ask below reports it) once the node is shutting down.
            self.spawn(async move {
                // The coordinator may have stopped listening: that is fine.
                let _ = tx.send(me.update(local, Origin::Local).await);
                let _ = done_tx.send(());
            });
            asks.push(Box::pin(async move {
                let answer = match rx.await {
                    Ok(answer) => answer.map_err(|e| e.to_string()),
                    Err(_) => Err("the local promise task stopped".to_owned()),
                };
                (self.me, answer)
            }));
            done_rx
        });
        let promise_hash = record.promise_hash();
        while promises.rejections() <= n - quorum {
            // A quorum whose approvals lack write-path custody (SPEC 4.20) cannot execute: the
            // other answers may still bring it.
            if promises.approvals() >= quorum && self.custody_met(&message.operations, &promises.votes).await {
                break;
            }
            let Some((peer, answer)) = asks.next().await else { break };
            promises.add(&record, &promise_hash, &peer, peer == self.me, answer);
        }
        drop(asks);

        if promises.approvals() < quorum {
            // The local member's decision must be complete before the record is given up (an
            // error means the task stopped at a node shutdown: nothing is left to wait for).
            if let Some(done) = local_done {
                let _ = done.await;
            }
            return self.fail(record, promises, &kinds, quorum, member, others).await;
        }

        // Phase 2: the record with its promise quorum.
        let mut decided = record;
        decided.promises = promises.votes;
        self.commit_phase(decided, &kinds, member, others, deadline).await.into_iter().map(OpOutcome::Answer).collect()
    }

    /// Whether the approving votes include a majority of P(r-1) for every commit of `operations`,
    /// as far as this node's own storage knows P(r-1) (SPEC 4.20; a node without the evidence
    /// leaves the judgement to the members).
    async fn custody_met(&self, operations: &[RepoOperation], votes: &BTreeMap<String, Vote>) -> bool {
        let approving: BTreeSet<&str> =
            votes.iter().filter(|(_, vote)| vote.is_approve()).map(|(peer, _)| peer.as_str()).collect();
        for operation in operations {
            match custody_failure(&self.local, operation, &approving).await {
                Ok(None) => {}
                Ok(Some(detail)) => {
                    tracing::debug!(%detail, "the approvals so far lack write-path custody");
                    return false;
                }
                Err(e) => tracing::debug!(error = %e, "cannot judge write-path custody here; the members will"),
            }
        }
        true
    }

    /// One cluster request, within the request timeout and the record's deadline.
    async fn send(&self, peer: PeerId, request: Arc<Value>, deadline: Instant) -> Result<Value, NetworkError> {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let timeout = left.min(Duration::from_millis(self.config.request_timeout_ms));
        self.network.request_shared(peer, ProtocolKind::Cluster, request, timeout).await
    }

    /// The promise quorum was not reached: free reservations when provably out of reach, and
    /// settle each operation (see the module documentation).
    async fn fail(
        self: &Arc<Self>,
        record: ClusterRecord,
        promises: Promises,
        kinds: &[&str],
        quorum: usize,
        member: bool,
        others: Vec<PeerId>,
    ) -> Vec<OpOutcome> {
        let n = record.peers.len();
        let abort_proven = promises.rejections() > n - quorum;
        let summary = promises.failure_summary(n, quorum);
        tracing::debug!(%summary, "promise phase failed");
        let per_operation = promises.per_operation();
        // Without proof, the approving members keep their reservations until recovery, except
        // this node's own member, which drops a promise that never left the node: when no other
        // member approved, nothing is left reserved and the other operations can run again.
        let freed = if abort_proven {
            true
        } else {
            let remote_approvals =
                promises.votes.iter().filter(|(peer, vote)| **peer != self.me_text && vote.is_approve()).count();
            let local_free = !member
                || self.abandon(&record).await.unwrap_or_else(|e| {
                    tracing::debug!(error = %e, "abandoning the local promise failed; recovery releases it");
                    false
                });
            local_free && remote_approvals == 0
        };
        // Each re-run answers at least one operation (one that was named), so re-runs end.
        let any_named = per_operation.iter().any(|reasons| !reasons.is_empty());
        let rerun: Vec<bool> =
            per_operation.iter().map(|reasons| kinds.len() > 1 && freed && any_named && reasons.is_empty()).collect();
        if abort_proven {
            let mut aborted = record;
            aborted.promises = promises.votes.clone();
            if member && let Err(e) = self.update(aborted.clone(), Origin::Local).await {
                tracing::debug!(error = %e, "local abort failed; the reservation expires through recovery");
            }
            let request = Arc::new(update_request(&aborted));
            let deadline = Instant::now() + Duration::from_millis(self.config.request_timeout_ms);
            // A re-run must not meet this record's reservations: the approving peers hear of the
            // abort before it starts; the others whenever it reaches them.
            let (wait, later): (Vec<PeerId>, Vec<PeerId>) = if rerun.iter().any(|r| *r) {
                others
                    .into_iter()
                    .partition(|p| promises.votes.get(&crypto::peer_text(p)).is_some_and(Vote::is_approve))
            } else {
                (Vec::new(), others)
            };
            let me = Arc::clone(self);
            let later_request = request.clone();
            self.spawn(async move {
                let sends = later.iter().map(|peer| me.send(*peer, later_request.clone(), deadline));
                futures::future::join_all(sends).await;
            });
            futures::future::join_all(wait.iter().map(|peer| self.send(*peer, request.clone(), deadline))).await;
        }
        let Promises { stale, .. } = promises;
        per_operation
            .into_iter()
            .zip(stale)
            .zip(rerun)
            .zip(kinds)
            .map(|(((reasons, stale), rerun), kind)| {
                if rerun {
                    return OpOutcome::Rerun;
                }
                if let Some(stale) = stale {
                    return OpOutcome::Answer(stale_response(kind, stale));
                }
                let proven = reasons.len() > n - quorum;
                if proven && reasons.iter().all(|r| r.category == RejectCategory::Invalid) {
                    let text: Vec<String> = reasons.iter().map(ToString::to_string).collect();
                    return OpOutcome::Answer(Err(RepoError::BadRequest(invalid_details(&text))));
                }
                OpOutcome::Answer(Err(RepoError::ConsensusFailed(summary.clone())))
            })
            .collect()
    }

    /// Sends the decided record, applies it locally, and waits until each operation reached the
    /// commit threshold (or cannot). Once a commit quorum formed, the final record goes to every
    /// peer in the background ([`Inner::finish`]).
    async fn commit_phase(
        self: &Arc<Self>,
        decided: ClusterRecord,
        kinds: &[&'static str],
        member: bool,
        others: Vec<PeerId>,
        deadline: Instant,
    ) -> Vec<Result<RepoResponse, RepoError>> {
        let n = decided.peers.len();
        let needed = self.config.commit_threshold.of(n);
        let mut commits = Commits::new(kinds);
        let (tx, mut rx) = mpsc::channel(others.len().max(1));
        // One request for every peer (built once, not once per peer).
        let request = Arc::new(update_request(&decided));
        let expiration_ms = decided.expiration_ms().unwrap_or(0);
        for peer in &others {
            let me = Arc::clone(self);
            let (peer, request, tx) = (*peer, request.clone(), tx.clone());
            self.spawn(async move { me.deliver_final(peer, request, expiration_ms, Some(tx)).await });
        }
        drop(tx);
        drop(request);
        let message_hash = decided.message_hash.clone();
        let commit_hash = decided.commit_hash();
        if member {
            match self.update(decided.clone(), Origin::Local).await {
                Ok(reply) => {
                    let vote = reply.commits.get(&self.me_text).cloned();
                    if vote.is_none() {
                        tracing::debug!("the local member did not apply the decided record (it is behind on a block)");
                    }
                    commits.add(&reply, &self.me_text, vote);
                }
                Err(e) => tracing::warn!(error = %e, "executing the decided record locally failed"),
            }
        }
        // Stop when every operation reached the commit threshold, or failed on enough members
        // that it cannot.
        while !commits.settled(needed, n) {
            let Ok(Some((peer, reply))) = tokio::time::timeout_at(deadline, rx.recv()).await else { break };
            add_reply(&mut commits, &message_hash, &commit_hash, peer, reply);
        }
        let answers = commits.answers(needed, n);
        if commits.any_applied(needed) {
            let me = Arc::clone(self);
            self.spawn(async move { me.finish(decided, commits, rx, member, others).await });
        }
        answers
    }

    /// Sends the final record (SPEC 4.4): the decided record with every valid commit vote
    /// collected, to every peer of the record (this node's own member through the local path),
    /// so that each member holds the votes that prove the revision executed even when a member
    /// or this coordinator stops now. The answers still on their way are awaited for at most
    /// `request_timeout_ms` first; each peer gets the record with the decided record's bounded
    /// re-sends. Runs in the background: the client has its answer and the lane moves on.
    async fn finish(
        self: Arc<Self>,
        mut decided: ClusterRecord,
        mut commits: Commits,
        mut rx: mpsc::Receiver<(PeerId, Value)>,
        member: bool,
        others: Vec<PeerId>,
    ) {
        let n = decided.peers.len();
        let (message_hash, commit_hash) = (decided.message_hash.clone(), decided.commit_hash());
        let until = Instant::now() + Duration::from_millis(self.config.request_timeout_ms);
        while commits.votes.len() < n {
            let Ok(Some((peer, reply))) = tokio::time::timeout_at(until, rx.recv()).await else { break };
            add_reply(&mut commits, &message_hash, &commit_hash, peer, reply);
        }
        drop(rx);
        decided.commits = std::mem::take(&mut commits.votes);
        if member && let Err(e) = self.update(decided.clone(), Origin::Local).await {
            tracing::debug!(error = %e, "the local member did not take the final record");
        }
        let request = Arc::new(update_request(&decided));
        let expiration_ms = decided.expiration_ms().unwrap_or(0);
        let sends =
            others.into_iter().map(|peer| Arc::clone(&self).deliver_final(peer, request.clone(), expiration_ms, None));
        futures::future::join_all(sends).await;
    }

    /// Sends the decided record (its update `request`, expiring at `expiration_ms`) to one peer,
    /// re-sending with doubling delays while it does not answer (bounded by `retry_attempts` and
    /// the record's expiration), and reports the answer to `tx` (the final record's answers are
    /// not awaited).
    async fn deliver_final(
        self: Arc<Self>,
        peer: PeerId,
        request: Arc<Value>,
        expiration_ms: u64,
        tx: Option<mpsc::Sender<(PeerId, Value)>>,
    ) {
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
                    if let Some(tx) = tx {
                        let _ = tx.send((peer, reply)).await;
                    }
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
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn vote(approve: bool) -> Vote {
        Vote {
            r#type: if approve { VoteType::Approve } else { VoteType::Reject },
            signature: String::new(),
            reject_reason: (!approve).then(|| "failed: no".to_owned()),
            conflict_with: None,
            extra: serde_json::Map::new(),
        }
    }

    fn reply(result: Value) -> ClusterRecord {
        let mut record = ClusterRecord::new(BTreeMap::new(), serde_json::json!({}));
        record.extra.insert(RESULT_FIELD.to_owned(), result);
        record
    }

    /// SPEC 4.4: one member's unsigned result never decides a client's answer, whether it rides
    /// on an approving vote (ignored) or on a rejecting one (a failure answer needs the same
    /// result from more members than could still apply the operation).
    #[test]
    fn one_members_result_never_decides_the_answer() {
        let stale = serde_json::json!({"success": false, "reason": "stale revision"});
        let ok = serde_json::json!({"success": true});
        let mut commits = Commits::new(&["commit"]);
        commits.add(&reply(stale.clone()), "byz", Some(vote(true)));
        assert_eq!(commits.applied, vec![0], "an approving vote next to a stale result is invalid");
        assert!(commits.votes.is_empty());
        commits.add(&reply(ok.clone()), "m2", Some(vote(true)));
        commits.add(&reply(ok), "m3", Some(vote(true)));
        assert!(matches!(commits.answers(2, 3).remove(0), Ok(RepoResponse::Commit(CommitResult::Success(_)))));

        let envelope = |text: &str| serde_json::json!({"error": {"code": "bad-request", "message": text}});
        let mut split = Commits::new(&["commit"]);
        split.add(&reply(envelope("forged")), "byz", Some(vote(false)));
        split.add(&reply(envelope("honest")), "m2", Some(vote(false)));
        let answer = split.answers(2, 3).remove(0).unwrap_err();
        assert_eq!(answer.code(), ErrorCode::Unavailable, "{answer}");
        let mut agreed = Commits::new(&["commit"]);
        agreed.add(&reply(envelope("honest")), "m1", Some(vote(false)));
        agreed.add(&reply(envelope("honest")), "m2", Some(vote(false)));
        assert_eq!(agreed.answers(2, 3).remove(0).unwrap_err().code(), ErrorCode::BadRequest);
    }

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

    /// Issue 23: two of three members rejected an update of a block they do not know; the third
    /// was not waited for. The counts add up to the peers asked.
    #[test]
    fn a_failed_promise_phase_counts_every_peer_asked() {
        let reject = Vote {
            r#type: VoteType::Reject,
            signature: String::new(),
            reject_reason: Some("behind: unknown block nothere".to_owned()),
            conflict_with: None,
            extra: serde_json::Map::new(),
        };
        let mut promises = Promises::new(1);
        promises.votes.insert("a".to_owned(), reject.clone());
        promises.votes.insert("b".to_owned(), reject);
        assert_eq!(
            promises.failure_summary(3, 2),
            "0 of 3 peers approved, 2 needed; 2 rejected: [behind: unknown block nothere (2 peers)]; 0 gave no vote: \
             []; 1 not waited for (the outcome was decided without them)"
        );
        promises.silent.push("c: timed out".to_owned());
        assert_eq!(
            promises.failure_summary(3, 2),
            "0 of 3 peers approved, 2 needed; 2 rejected: [behind: unknown block nothere (2 peers)]; 1 gave no vote: \
             [c: timed out]"
        );
    }
}

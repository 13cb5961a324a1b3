//! The member side: votes, reservations, execution exactly once, and answers to status queries.
//!
//! A record may carry several operations (a batch, SPEC 4.14). Each is checked as it would be
//! alone (bounds, conflicts with other reservations, tombstones, the repository's dry run); the
//! batch is approved only when every one passes, otherwise rejected with a
//! [`RejectCategory::Batch`] reason listing each failing operation's index and reason
//! ([`BatchFailure`]), and the `"result"` field of the answer is an array with each stale
//! operation's `StaleFailure` at its index (`null` elsewhere). A decided batch is executed under
//! the locks of all its blocks, its operations (on disjoint blocks) concurrently: nothing is
//! applied while any operation lacks its base (SPEC 4.6), and each operation's result is kept, in
//! record order, in the executed marker (an array); the commit vote approves when every operation
//! applied, and otherwise rejects with a batch reason naming the ones that did not. On a durable
//! `KvStore` engine the operations' storage writes share group commits (one transaction and one
//! sync per step of all of them, not per operation); the batch is still not one atomic storage
//! step: a crash midway re-executes the batch at restart, which the repository makes a no-op for
//! the operations already applied.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use optimystic_core::error::ErrorCode;
use optimystic_core::evidence::{RecordRef, StoredRecord, record_key};
use optimystic_core::identity::PeerId;
use optimystic_core::model::{CommitResult, PendResult, StaleFailure};
use optimystic_core::record::{ClusterRecord, Phase, RecordError, Vote, VoteType};
use optimystic_core::repo::{KeptRecord, Step, add_verified_commits};
use optimystic_core::wire::{ErrorEnvelope, RepoOperation, RepoResponse};
use optimystic_core::{
    BatchFailure, BlockId, Check, MetaWrite, RawStorage, RejectCategory, RejectReason, RepoError, StorageRepo,
};
use serde_json::{Map, Value, json};

use crate::checks::{check_operation, custody_failure};
use crate::engine::{Budget, HeldBlocks, Inner, Live, RESULT_FIELD, RecordContext, refusal};
use crate::faulty::{RENOUNCE_FIELD, sign_renounce};
use crate::store::{
    Entry, RecordStatus, RejectionRef, entry_writes, read_entry, rejection_key, tomb_key, write_entry,
    write_entry_after,
};
use crate::votes::Gossip;

/// The `operation` of a recovery status query: `{"operation": "status", "record": ClusterRecord}`.
pub const STATUS_OPERATION: &str = "status";

/// Answers to a status query (`"status"` field).
pub(crate) mod answer {
    /// Executed here; the answer carries the decided copy.
    pub const EXECUTED: &str = "executed";
    /// Decided here, execution pending; the answer carries the decided copy.
    pub const DECIDED: &str = "decided";
    /// Known never to execute.
    pub const ABORTED: &str = "aborted";
    /// Not executed, and past its expiration here: it never will be, unless another peer executed it.
    pub const NOT_EXECUTED: &str = "not-executed";
    /// Not executed but not yet expired here: ask again later.
    pub const PENDING: &str = "pending";
}

fn sign_error(e: optimystic_core::crypto::CryptoError) -> RepoError {
    RepoError::Internal(format!("cannot sign a vote: {e}"))
}

/// Whether an execution error is the operation's own answer (the same on every try) rather than a
/// transient failure of this node.
fn deterministic(e: &RepoError) -> bool {
    matches!(e.code(), ErrorCode::BadRequest | ErrorCode::Expired)
}

/// A record without votes or extras, as JSON: what a promised entry keeps for recovery queries.
fn bare(record: &ClusterRecord) -> Value {
    let mut value = record.to_value();
    if let Value::Object(fields) = &mut value {
        fields.retain(|key, _| {
            matches!(key.as_str(), "messageHash" | "peers" | "membershipVersion" | "membershipDigest" | "message")
        });
        fields.insert("promises".to_owned(), Value::Object(Map::new()));
        fields.insert("commits".to_owned(), Value::Object(Map::new()));
    }
    value
}

/// Where a record handed to [`Inner::update`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Another peer (or an embedder), authenticated by the transport as this sender: verified in
    /// full.
    Remote(PeerId),
    /// This node's coordinator, which built the record and verified every vote it added: only its
    /// expiry is checked again.
    Local,
}

/// What executing a decided record here came to.
enum Executed {
    /// Applied (or answered deterministically): the executed marker to persist.
    Marker(Box<Entry>),
    /// This member lacks the base an operation needs (SPEC 4.6): nothing applied, no commit vote,
    /// the record stays decided until catch-up brings the block forward.
    Behind(BlockId),
}

/// What persisting a record as decided writes ([`Inner::persist_decided`]).
struct Persist<'a> {
    hash: &'a str,
    decided: &'a Entry,
    /// The stored entry is already the decided one.
    prior_decided: bool,
    /// The record the entry refers to, kept for evidence.
    keep: Option<&'a ClusterRecord>,
    cx: &'a RecordContext,
}

/// Blocks one phase-1 record may report behind (the node's catch-up queue is shared: a batch
/// naming 1,024 blocks this member lacks queues this many catch-ups, not 1,024).
pub(crate) const MAX_BEHIND_REPORTS_PER_RECORD: usize = 8;

/// Bytes of detail text a batch reason keeps in all; the failing operations past it are listed
/// by index and category only. A vote is stored and re-sent as cast (votes are final), so its
/// size must not grow with the batch: a batch of 1,024 failing operations stays under ~25 KB.
pub(crate) const MAX_BATCH_REASON_DETAIL_BYTES: usize = 2_048;

/// The reject reason of a record whose operations fail as `failures` says (index order): a
/// single operation's own reason, or a batch reason listing each failing one (with their
/// details up to [`MAX_BATCH_REASON_DETAIL_BYTES`] in all).
fn record_reason(batched: bool, failures: &[Option<RejectReason>]) -> Option<RejectReason> {
    if !batched {
        return failures.iter().flatten().next().cloned();
    }
    let mut detail_bytes = 0usize;
    let listed: Vec<BatchFailure> = failures
        .iter()
        .enumerate()
        .filter_map(|(index, reason)| {
            let reason = reason.as_ref()?;
            detail_bytes = detail_bytes.saturating_add(reason.detail.len());
            let reason = if detail_bytes > MAX_BATCH_REASON_DETAIL_BYTES {
                RejectReason::new(reason.category.clone(), "")
            } else {
                reason.clone()
            };
            Some(BatchFailure { index, reason })
        })
        .collect();
    (!listed.is_empty()).then(|| RejectReason::batch(&listed))
}

/// The per-operation results of a batch as one array, within `budget` bytes of JSON: past it,
/// `StaleFailure`s lose their `missing` and `pending` lists (the client re-reads either way), so
/// an answer stays well under the cluster frame limit.
fn fit_results(results: Vec<Option<Value>>, budget: usize) -> Value {
    let mut used = 0usize;
    let fitted = results
        .into_iter()
        .map(|result| {
            let Some(mut value) = result else { return Value::Null };
            let size = serde_json::to_vec(&value).map_or(0, |v| v.len());
            if used.saturating_add(size) > budget
                && let Some(object) = value.as_object_mut()
            {
                object.remove("missing");
                object.remove("pending");
            }
            used = used.saturating_add(serde_json::to_vec(&value).map_or(0, |v| v.len()));
            value
        })
        .collect();
    Value::Array(fitted)
}

impl Inner {
    /// Handles a record received on the cluster protocol, or from this node's coordinator.
    pub(crate) async fn update(
        self: &Arc<Self>,
        mut record: ClusterRecord,
        origin: Origin,
    ) -> Result<ClusterRecord, RepoError> {
        self.ensure_started().await?;
        let now = self.clock.now_ms();
        if !record.commits.is_empty()
            && let Some(reply) = self.merge_into_executed(&record, now).await?
        {
            return Ok(reply);
        }
        match origin {
            Origin::Remote(_) => record.verify_except_signer(Some(now), &self.me_text).map_err(refusal)?,
            Origin::Local if record.is_expired(now) => return Err(RepoError::Expired),
            Origin::Local => {}
        }
        record.extra.remove(RESULT_FIELD);
        let cx = self.context(&record, now, true)?;
        // Bounds first, then the lookups (SPEC 4.10: the work before a bound is bounded).
        self.check_record_size(&cx)?;
        // Proven-faulty peers' votes count for nothing (SPEC 4.5).
        let (approvals, rejections) = self.count_votes(&record.promises);
        let decided = approvals >= cx.promise_quorum;
        let abort_proven = rejections > record.peers.len().saturating_sub(cx.promise_quorum);
        let budget = match origin {
            Origin::Remote(sender) => {
                if !decided && !abort_proven {
                    self.precheck_budget(&record.message_hash, &cx, &sender)?;
                }
                let in_view = self.check_view(&record, &cx, decided, Some(&sender)).await?;
                if !decided {
                    self.check_peers_seen(&record).await?;
                }
                if in_view { Budget::Sender(sender) } else { Budget::Outsiders }
            }
            Origin::Local => {
                self.check_view(&record, &cx, decided, None).await?;
                Budget::Sender(self.me)
            }
        };

        let held = self.locks.lock(cx.blocks()).await;
        let entry = read_entry(self.storage(), cx.expiration_ms, &record.message_hash).await?;
        if matches!(origin, Origin::Remote(_)) {
            self.check_own_votes(&record, entry.as_ref())?;
        }
        let gossip = match origin {
            Origin::Remote(sender) => Gossip::Except(sender),
            Origin::Local => Gossip::Nobody,
        };
        match entry.as_ref().map(|e| e.status) {
            Some(RecordStatus::Executed) => {
                // A final record or another member's gossiped vote (SPEC 4.4): the kept copy
                // gains the verified votes it lacks.
                if record.commits.keys().any(|peer| *peer != self.me_text) {
                    self.merge_votes(&record, &cx).await;
                }
                return self.executed_reply(entry).await;
            }
            Some(RecordStatus::Aborted) => return Ok(self.with_promise(record, entry.as_ref())),
            Some(RecordStatus::Decided) => {
                let mut copy = stored_record(self.storage(), entry.as_ref()).await?;
                add_verified_commits(&mut copy, &record.commits);
                return self.execute_from(&held, copy, entry, &cx, gossip).await;
            }
            Some(RecordStatus::Promised | RecordStatus::Rejected) | None => {}
        }
        // Checked again under the locks that answer status queries (SPEC 4.11): a status answer
        // of "not executed" is persisted as aborted under them, so it can never be followed by an
        // execution.
        if self.clock.now_ms() > cx.expiration_ms {
            return Err(RepoError::Expired);
        }
        if decided {
            return self.execute_from(&held, record, entry, &cx, gossip).await;
        }
        if abort_proven {
            self.abort(&held, &record, entry.clone(), cx.expiration_ms).await?;
            return Ok(self.with_promise(record, entry.as_ref()));
        }
        if let Some(mut stored) = entry.filter(|e| e.promise.is_some()) {
            if stored.local_only && matches!(origin, Origin::Remote(_)) {
                // The vote leaves this node now: it can no longer be abandoned.
                stored.local_only = false;
                write_entry(self.storage(), &record.message_hash, &stored).await?;
            }
            return Ok(self.with_promise(record, Some(&stored)));
        }
        self.promise(&held, record, &cx, budget).await
    }

    /// A final record or gossiped vote (SPEC 4.4) for a record this member executed: only its
    /// commit votes are taken, each verified against the copy kept here (nothing else of the
    /// received record is used, so it needs no verification of its own, and expiry does not
    /// matter); the answer is the stored copy with every vote kept. `None` when this member did
    /// not execute the record (the caller handles it as any update).
    async fn merge_into_executed(
        self: &Arc<Self>,
        record: &ClusterRecord,
        now: u64,
    ) -> Result<Option<ClusterRecord>, RepoError> {
        let Ok(cx) = self.context(record, now, false) else { return Ok(None) };
        // Executed is final (until the marker is collected), so the member's block locks are not
        // taken: records on these blocks keep voting meanwhile. The kept copy is merged under
        // the repository's locks.
        let entry = read_entry(self.storage(), cx.expiration_ms, &record.message_hash).await?;
        if entry.as_ref().map(|e| e.status) != Some(RecordStatus::Executed) {
            return Ok(None);
        }
        self.merge_votes(record, &cx).await;
        self.executed_reply(entry).await.map(Some)
    }

    /// This member's votes in a received record must be the ones it stored; a vote it has no copy
    /// of (its storage was reset, or the vote is forged) must verify.
    fn check_own_votes(&self, record: &ClusterRecord, entry: Option<&Entry>) -> Result<(), RepoError> {
        let stored_promise = entry.and_then(|e| e.promise.as_ref());
        let stored_commit = entry.and_then(|e| e.commit.as_ref());
        for (phase, vote, stored) in [
            (Phase::Promise, record.promises.get(&self.me_text), stored_promise),
            (Phase::Commit, record.commits.get(&self.me_text), stored_commit),
        ] {
            let Some(vote) = vote else { continue };
            if stored == Some(vote) {
                continue;
            }
            let hash = match phase {
                Phase::Promise => record.promise_hash(),
                Phase::Commit => record.commit_hash(),
            };
            vote.verify(&self.me, &hash)
                .map_err(|reason| refusal(RecordError::BadSignature { peer: self.me_text.clone(), phase, reason }))?;
        }
        Ok(())
    }

    /// The incoming record with this member's stored promise merged in (a re-delivered stale
    /// rejection carries no `StaleFailure`: none is stored, SPEC 4.11; the client re-reads).
    fn with_promise(&self, mut record: ClusterRecord, entry: Option<&Entry>) -> ClusterRecord {
        if let Some(vote) = entry.and_then(|e| e.promise.as_ref()) {
            record.promises.insert(self.me_text.clone(), vote.clone());
        }
        record
    }

    /// The stored decided copy with this member's commit vote and result.
    async fn executed_reply(&self, entry: Option<Entry>) -> Result<ClusterRecord, RepoError> {
        let mut copy = stored_record(self.storage(), entry.as_ref()).await?;
        if let Some(entry) = entry {
            if let Some(vote) = entry.commit {
                copy.commits.insert(self.me_text.clone(), vote);
            }
            if let Some(result) = entry.result {
                copy.extra.insert(RESULT_FIELD.to_owned(), result);
            }
        }
        Ok(copy)
    }

    /// Phase 1: decides, persists and returns this member's promise vote. The caller holds the
    /// record's block locks. The reservation counts one per block the record names, against the
    /// total bound and `budget` (the sender's own, or the one all senders outside the cluster
    /// share: SPEC 4.20 "Sybil senders").
    async fn promise(
        self: &Arc<Self>,
        _held: &HeldBlocks<'_>,
        mut record: ClusterRecord,
        cx: &RecordContext,
        budget: Budget,
    ) -> Result<ClusterRecord, RepoError> {
        let hash = record.message_hash.clone();
        let weight = cx.weight();
        let mut failures: Vec<Option<RejectReason>> = vec![None; cx.operations.len()];
        // Bounds, conflicts with other reservations and, when both pass, the reservation itself,
        // in one step of the index: concurrent records on other blocks cannot overrun the bounds.
        let (busy, reserved) = {
            let mut state = self.state();
            let held = state.held;
            let of_budget = state.reservations_of(&budget);
            let (limit, whose) = match budget {
                Budget::Sender(sender) => (self.config.max_reservations_per_sender, format!("records from {sender}")),
                Budget::Outsiders => {
                    (self.config.max_reservations_outsiders, "records from senders outside the cluster".to_owned())
                }
            };
            let busy = if held.saturating_add(weight) > self.config.max_reservations {
                Some(RejectReason::new(RejectCategory::Busy, format!("{held} blocks reserved")))
            } else if of_budget.saturating_add(weight) > limit {
                Some(RejectReason::new(RejectCategory::Busy, format!("{of_budget} blocks reserved for {whose}")))
            } else {
                None
            };
            if busy.is_none() {
                for (failure, claims) in failures.iter_mut().zip(&cx.op_claims) {
                    if let Some((block_id, other)) = state.conflict(&hash, claims) {
                        *failure = Some(RejectReason::new(
                            RejectCategory::Conflict,
                            format!("block {block_id} is reserved by {other}"),
                        ));
                    }
                }
            }
            let reserve = busy.is_none() && failures.iter().all(Option::is_none);
            if reserve {
                let live = Live {
                    status: RecordStatus::Promised,
                    claims: cx.claims.clone(),
                    budget: Some(budget),
                    expiration_ms: cx.expiration_ms,
                    weight,
                };
                state.reserve(&hash, live);
            }
            (busy, reserve)
        };
        let outcome = match busy {
            Some(busy) => Ok((Some(busy), Vec::new())),
            None => self
                .check_operations(&record, cx, &mut failures, budget)
                .await
                .map(|stale| (record_reason(cx.batched(), &failures), stale)),
        };
        let (reason, stale) = match outcome {
            Ok(judged) => judged,
            Err(e) => {
                if reserved {
                    self.state().release(&hash);
                }
                return Err(e);
            }
        };
        let (vote, entry) = match &reason {
            None => {
                let vote = record.sign_promise(&self.keypair, VoteType::Approve, None).map_err(sign_error);
                let vote = match vote {
                    Ok(vote) => vote,
                    Err(e) => {
                        self.state().release(&hash);
                        return Err(e);
                    }
                };
                let entry = Entry {
                    status: RecordStatus::Promised,
                    expiration_ms: cx.expiration_ms,
                    promise: Some(vote.clone()),
                    record: Some(StoredRecord::Inline(bare(&record))),
                    commit: None,
                    result: None,
                    sender: budget.stored_sender(),
                    outsider: budget.is_outsiders(),
                    renounced: false,
                    renounces: BTreeMap::new(),
                    local_only: budget == Budget::Sender(self.me),
                };
                (vote, entry)
            }
            Some(reason) => {
                if reserved {
                    self.state().release(&hash);
                }
                self.take_rejection(budget, weight).await?;
                let vote = record
                    .sign_promise(&self.keypair, VoteType::Reject, Some(reason.to_string()))
                    .map_err(sign_error)?;
                let entry = Entry {
                    status: RecordStatus::Rejected,
                    expiration_ms: cx.expiration_ms,
                    promise: Some(vote.clone()),
                    record: None,
                    commit: None,
                    result: None,
                    sender: None,
                    outsider: false,
                    renounced: false,
                    renounces: BTreeMap::new(),
                    local_only: false,
                };
                (vote, entry)
            }
        };
        let rejection = RejectionRef { blocks: weight, sender: budget.stored_sender() };
        let written = match entry.status {
            RecordStatus::Rejected => match serde_json::to_vec(&rejection) {
                Ok(index) => {
                    let index = MetaWrite::Put(rejection_key(cx.expiration_ms, &hash), index);
                    write_entry_after(self.storage(), &hash, &entry, vec![index]).await
                }
                Err(e) => Err(RepoError::Internal(format!("encoding a rejection index entry: {e}"))),
            },
            _ => write_entry(self.storage(), &hash, &entry).await,
        };
        if let Err(e) = written {
            let mut state = self.state();
            match entry.status {
                RecordStatus::Promised => state.release(&hash),
                _ => state.release_rejection(budget, weight),
            }
            return Err(e);
        }
        if entry.status == RecordStatus::Promised {
            let mut state = self.state();
            self.publish(&state);
            self.schedule_recovery(&mut state, &hash, cx.expiration_ms);
        }
        record.promises.insert(self.me_text.clone(), vote);
        if cx.batched() {
            if stale.iter().any(Option::is_some) {
                record.extra.insert(RESULT_FIELD.to_owned(), fit_results(stale, self.config.max_batch_bytes));
            }
        } else if let Some(Some(stale)) = stale.into_iter().next() {
            record.extra.insert(RESULT_FIELD.to_owned(), stale);
        }
        Ok(record)
    }

    /// Counts a rejection about to be stored against the bounds (SPEC 4.10). When they are
    /// reached, the stored rejections already past their record's expiration plus grace are
    /// collected first (one bounded batch, so that a busy member does not wait for the periodic
    /// collection); past the bounds after that, the answer is `busy`: no vote is cast and
    /// nothing is stored.
    async fn take_rejection(&self, budget: Budget, weight: usize) -> Result<(), RepoError> {
        let (per_budget, total) = (self.config.max_rejections_per_sender, self.config.max_rejections);
        if self.state().take_rejection(budget, weight, per_budget, total).is_ok() {
            return Ok(());
        }
        self.collect_rejections_once().await?;
        self.state().take_rejection(budget, weight, per_budget, total).map_err(RepoError::Busy)
    }

    /// Checks each operation not already failing against tombstones (SPEC 4.12), local storage
    /// (the repository's dry run) and write-path custody (SPEC 4.20: the record's peer set holds
    /// a majority of P(r-1)), recording why it fails in `failures`; returns each stale
    /// operation's `StaleFailure` (by index). Reports blocks this member is behind on: at most
    /// [`MAX_BEHIND_REPORTS_PER_RECORD`] for the record, within `budget`'s allowance of reports
    /// ([`crate::engine::MemberState::take_behind_report`]), so that no record or sender queues
    /// unbounded catch-up work (SPEC 4.10, 4.20).
    async fn check_operations(
        &self,
        record: &ClusterRecord,
        cx: &RecordContext,
        failures: &mut [Option<RejectReason>],
        budget: Budget,
    ) -> Result<Vec<Option<Value>>, RepoError> {
        let hash = record.message_hash.as_str();
        let peers: BTreeSet<&str> = record.peers.keys().map(String::as_str).collect();
        let mut stale = vec![None; cx.operations.len()];
        let mut reported = 0usize;
        for ((operation, failure), stale) in cx.operations.iter().zip(failures.iter_mut()).zip(stale.iter_mut()) {
            if failure.is_some() {
                continue;
            }
            if let Some(reason) = self.tombstoned(operation).await? {
                *failure = Some(reason);
                continue;
            }
            let check = check_operation(&self.local, operation).await?;
            if let Some(block_id) = check.behind_block()
                && reported < MAX_BEHIND_REPORTS_PER_RECORD
                && self.state().take_behind_report(budget, self.clock.now_ms())
            {
                reported += 1;
                self.report_behind_unless_awaited(block_id, hash);
            }
            *failure = check.reject_reason();
            if failure.is_none()
                && let Some(detail) = custody_failure(&self.local, operation, &peers).await?
            {
                *failure = Some(RejectReason::new(RejectCategory::Refused, detail));
            }
            if let Check::Stale(found) = check {
                *stale = Some(
                    serde_json::to_value(&found)
                        .map_err(|e| RepoError::Internal(format!("encoding a stale answer: {e}")))?,
                );
            }
        }
        Ok(stale)
    }

    /// SPEC 4.12: a pend of a trx this member saw cancelled on a block is refused.
    async fn tombstoned(&self, operation: &RepoOperation) -> Result<Option<RejectReason>, RepoError> {
        let RepoOperation::Pend(pend) = operation else { return Ok(None) };
        for block_id in pend.transforms.block_ids() {
            if self.storage().get_meta(&tomb_key(&block_id, &pend.trx_id)).await?.is_some() {
                return Ok(Some(RejectReason::new(
                    RejectCategory::Invalid,
                    format!("transaction {} was cancelled on {block_id}", pend.trx_id),
                )));
            }
        }
        Ok(None)
    }

    /// This node's coordinator gives `record` up without a decision (its promise quorum was
    /// missed, and the rejections do not prove it out of reach). When this member's promise never
    /// left the node ([`Entry::local_only`]), no decided copy can ever count it (the coordinator
    /// that holds it decides nothing more, and every other copy lacks it), so the member drops
    /// the vote, marks the record aborted and frees the reservation at once instead of waiting
    /// for recovery; a later delivery of the record gets no vote from it. Returns whether this
    /// member holds no reservation for the record now.
    pub(crate) async fn abandon(&self, record: &ClusterRecord) -> Result<bool, RepoError> {
        let cx = self.context(record, self.clock.now_ms(), false)?;
        let _held = self.locks.lock(cx.blocks()).await;
        let Some(mut entry) = read_entry(self.storage(), cx.expiration_ms, &record.message_hash).await? else {
            return Ok(true);
        };
        match entry.status {
            RecordStatus::Rejected | RecordStatus::Aborted => Ok(true),
            RecordStatus::Decided | RecordStatus::Executed => Ok(false),
            RecordStatus::Promised if !entry.local_only || entry.renounced => Ok(false),
            RecordStatus::Promised => {
                entry.status = RecordStatus::Aborted;
                entry.promise = None;
                entry.record = None;
                entry.local_only = false;
                write_entry(self.storage(), &record.message_hash, &entry).await?;
                let mut state = self.state();
                state.release(&record.message_hash);
                self.publish(&state);
                Ok(true)
            }
        }
    }

    /// Marks a record aborted (its promise quorum is out of reach, or recovery found that no peer
    /// executed it) and frees its reservation. The caller holds the record's block locks.
    pub(crate) async fn abort(
        &self,
        _held: &HeldBlocks<'_>,
        record: &ClusterRecord,
        entry: Option<Entry>,
        expiration_ms: u64,
    ) -> Result<(), RepoError> {
        let mut entry = entry.unwrap_or(Entry {
            status: RecordStatus::Aborted,
            expiration_ms,
            promise: None,
            record: None,
            commit: None,
            result: None,
            sender: None,
            outsider: false,
            renounced: true,
            renounces: BTreeMap::new(),
            local_only: false,
        });
        if matches!(entry.status, RecordStatus::Executed | RecordStatus::Decided) {
            return Ok(());
        }
        entry.status = RecordStatus::Aborted;
        entry.record = None;
        write_entry(self.storage(), &record.message_hash, &entry).await?;
        let mut state = self.state();
        state.release(&record.message_hash);
        self.publish(&state);
        Ok(())
    }

    /// Phase 2: a decided record (verified promise quorum) is applied here exactly once, as one
    /// storage step (SPEC 4.14): every operation's writes, the evidence and the executed marker
    /// with the results and the commit vote.
    ///
    /// On an engine whose steps are atomic ([`RawStorage::atomic_apply`]) that step is the only
    /// write: after a crash the record is either executed or not applied at all (still promised,
    /// and recovered as any promise is). A step that fails changes nothing; the decided copy is
    /// then persisted on its own, so that recovery executes it later. On other engines the decided
    /// copy is persisted first and the executed marker after the operations' writes: a crash in
    /// between re-applies at restart, before anything else is served, which the repository makes a
    /// no-op for the same operation (re-pend of the same transforms, re-commit of the same
    /// revision, repeated cancel); and while the process runs, an operation applied here is never
    /// applied again: a marker that could not be written is kept in memory and only its write is
    /// retried.
    ///
    /// A member without the base an operation needs (SPEC 4.6) applies nothing and signs no
    /// commit vote: the record stays decided (with its reservation), the node is asked to catch
    /// the block up, and the record is executed once it can be ([`Inner::retry_waiting`]).
    ///
    /// A fresh execution sends this member's commit vote to every other peer of the record
    /// (SPEC 4.4 vote gossip, [`Inner::gossip_vote`]).
    ///
    /// The caller holds the record's block locks.
    pub(crate) async fn execute(
        self: &Arc<Self>,
        held: &HeldBlocks<'_>,
        copy: ClusterRecord,
        prior: Option<Entry>,
        cx: &RecordContext,
    ) -> Result<ClusterRecord, RepoError> {
        self.execute_from(held, copy, prior, cx, Gossip::Everyone).await
    }

    /// [`Inner::execute`], with `gossip` saying whom a fresh execution sends its vote to.
    pub(crate) async fn execute_from(
        self: &Arc<Self>,
        _held: &HeldBlocks<'_>,
        mut copy: ClusterRecord,
        prior: Option<Entry>,
        cx: &RecordContext,
        gossip: Gossip,
    ) -> Result<ClusterRecord, RepoError> {
        copy.extra.remove(RESULT_FIELD);
        let hash = copy.message_hash.clone();
        let unsaved = self.state().unsaved.remove(&hash);
        let fresh = unsaved.is_none();
        let (executed, saved) = match unsaved {
            Some(executed) => (executed, false),
            None => {
                // The decided copy is kept once for evidence (SPEC 4.10) when the record carries
                // a pend or a commit: in the executed step, or with the decided entry that refers
                // to it.
                let keeps =
                    cx.operations.iter().any(|op| matches!(op, RepoOperation::Pend(_) | RepoOperation::Commit(_)));
                let kept = if keeps { Some(StorageRepo::keep_record_write(&copy)?.0) } else { None };
                let prior_decided = prior.as_ref().is_some_and(|p| p.status == RecordStatus::Decided);
                let decided = match prior {
                    Some(prior) if prior_decided => prior,
                    prior => {
                        let (sender, outsider) =
                            prior.as_ref().map_or((None, false), |e| (e.sender.clone(), e.outsider));
                        Entry {
                            status: RecordStatus::Decided,
                            expiration_ms: cx.expiration_ms,
                            promise: prior.and_then(|e| e.promise),
                            record: Some(match &kept {
                                Some(kept) => StoredRecord::Ref(RecordRef { record: kept.message_hash().to_owned() }),
                                None => StoredRecord::Inline(copy.to_value()),
                            }),
                            commit: None,
                            result: None,
                            sender,
                            outsider,
                            renounced: false,
                            renounces: BTreeMap::new(),
                            local_only: false,
                        }
                    }
                };
                let atomic = self.storage().atomic_apply();
                let persist =
                    Persist { hash: &hash, decided: &decided, prior_decided, keep: keeps.then_some(&copy), cx };
                if !atomic {
                    self.persist_decided(&persist).await?;
                }
                let budget = Budget::of_entry(decided.sender.as_deref(), decided.outsider);
                {
                    let live = Live {
                        status: RecordStatus::Decided,
                        claims: cx.claims.clone(),
                        budget,
                        expiration_ms: cx.expiration_ms,
                        weight: cx.weight(),
                    };
                    let mut state = self.state();
                    state.reserve(&hash, live);
                    self.publish(&state);
                    // Should this call be abandoned midway, recovery still finds the record decided.
                    self.schedule_recovery(&mut state, &hash, cx.expiration_ms);
                }
                let outcome = match self.behind_block(&decided, cx).await {
                    Ok(Some(block_id)) => Ok(Executed::Behind(block_id)),
                    Ok(None) => {
                        let mut step = self.local.step(cx.blocks()).await;
                        match self.stage_record(&mut step, &copy, decided.clone(), cx, kept.as_ref()).await {
                            Ok(executed) => {
                                // The kept copy carries this member's own commit vote (SPEC 4.4):
                                // the start of the revision's execution proof.
                                if keeps {
                                    let mut voted = copy.clone();
                                    if let Some(vote) = &executed.commit {
                                        voted.commits.insert(self.me_text.clone(), vote.clone());
                                    }
                                    step.keep(&voted).await?;
                                }
                                if atomic {
                                    for write in entry_writes(&hash, &executed)? {
                                        step.meta(write);
                                    }
                                }
                                step.write().await.map(|()| Executed::Marker(Box::new(executed)))
                            }
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(Executed::Marker(executed)) => (*executed, atomic),
                    Ok(Executed::Behind(block_id)) => {
                        if atomic {
                            self.persist_decided(&persist).await?;
                        }
                        {
                            let mut state = self.state();
                            state.waiting.entry(block_id.clone()).or_default().insert(hash.clone());
                            // Retried with backoff too, should no catch-up ever report back.
                            self.spawn_recovery(&mut state, &hash, cx.expiration_ms);
                        }
                        self.report_behind_unless_awaited(&block_id, &hash);
                        return Ok(copy);
                    }
                    Err(e) => {
                        tracing::warn!(message_hash = %hash, error = %e, "executing a decided record failed; will retry");
                        if atomic && let Err(persisting) = self.persist_decided(&persist).await {
                            tracing::warn!(message_hash = %hash, error = %persisting, "persisting a decided record failed");
                        }
                        self.spawn_recovery(&mut self.state(), &hash, cx.expiration_ms);
                        return Err(e);
                    }
                }
            }
        };
        if !saved && let Err(e) = write_entry(self.storage(), &hash, &executed).await {
            tracing::warn!(message_hash = %hash, error = %e, "writing an executed marker failed; will retry");
            let mut state = self.state();
            state.unsaved.insert(hash.clone(), executed);
            self.spawn_recovery(&mut state, &hash, cx.expiration_ms);
            return Err(e);
        }
        let unblocked: Vec<BlockId> = {
            let mut state = self.state();
            state.release(&hash);
            state.remember_peers(copy.peers.keys());
            self.publish(&state);
            cx.blocks().into_iter().filter(|b| state.waiting.contains_key(*b)).cloned().collect()
        };
        // Records that waited for these blocks (SPEC 4.6) may run now; once the caller released
        // this record's locks.
        for block_id in unblocked {
            self.spawn(Arc::clone(self).retry_waiting_task(block_id));
        }
        if let Some(vote) = executed.commit {
            copy.commits.insert(self.me_text.clone(), vote);
            if fresh {
                self.gossip_vote(&copy, gossip, cx);
            }
        }
        if let Some(result) = executed.result {
            copy.extra.insert(RESULT_FIELD.to_owned(), result);
        }
        Ok(copy)
    }

    /// Persists a record as decided (with the record it refers to): before its operations on an
    /// engine without atomic steps, or when it cannot execute now.
    /// The record is kept without replacing a copy already kept (its votes are merged,
    /// [`Step::keep`]), in the same storage step as the entry and before it.
    async fn persist_decided(&self, persist: &Persist<'_>) -> Result<(), RepoError> {
        if persist.keep.is_none() && persist.prior_decided {
            return Ok(());
        }
        let mut step = self.local.step(persist.cx.blocks()).await;
        if let Some(record) = persist.keep {
            // Kept again when the entry is already decided (a no-op), as the entry may predate
            // references.
            step.keep(record).await?;
        }
        if !persist.prior_decided {
            for write in entry_writes(persist.hash, persist.decided)? {
                step.meta(write);
            }
        }
        step.write().await
    }

    /// The block of the first operation whose base this member lacks (SPEC 4.6), if any. A
    /// member that promised the record has held its blocks' reservation since it checked every
    /// operation against its base: only catch-up moved them meanwhile, and only forward, which
    /// makes an operation done or stale, never behind. Any other member checks, so that nothing
    /// is applied while one operation lacks its base.
    async fn behind_block(&self, decided: &Entry, cx: &RecordContext) -> Result<Option<BlockId>, RepoError> {
        if decided.promise.as_ref().is_some_and(Vote::is_approve) {
            return Ok(None);
        }
        for operation in &cx.operations {
            let check = check_operation(&self.local, operation).await?;
            if let Some(block_id) = check.behind_block() {
                return Ok(Some(block_id.clone()));
            }
        }
        Ok(None)
    }

    /// Stages a decided record's operations into `step` and signs the commit vote: the executed
    /// marker to persist. An approving commit vote means "applied here, on the right base": a
    /// stale answer or a deterministic failure of an operation is its result, signed as a reject
    /// (for a batch, naming the operations concerned). Any other error leaves the record decided
    /// (the step is then dropped unwritten).
    async fn stage_record(
        &self,
        step: &mut Step<'_>,
        copy: &ClusterRecord,
        decided: Entry,
        cx: &RecordContext,
        kept: Option<&KeptRecord>,
    ) -> Result<Entry, RepoError> {
        let mut results = Vec::with_capacity(cx.operations.len());
        let mut failures = Vec::with_capacity(cx.operations.len());
        // Write-path custody is checked when promising (and by the coordinator before it decides),
        // never here: a decided record must be applied alike by every member, and members whose
        // evidence of r - 1 differs (one caught it up by agreement, without evidence) would split
        // on it (seen in the soak test: a commit applied on one member, refused on the others).
        for operation in &cx.operations {
            let (result, failure) = self.stage_operation(step, operation, kept, cx.expiration_ms).await?;
            results.push(result);
            failures.push(failure);
        }
        let reason = record_reason(cx.batched(), &failures);
        let vote = match reason {
            None => copy.sign_commit(&self.keypair, VoteType::Approve, None),
            Some(reason) => copy.sign_commit(&self.keypair, VoteType::Reject, Some(reason.to_string())),
        };
        let result =
            if cx.batched() { Value::Array(results) } else { results.into_iter().next().unwrap_or(Value::Null) };
        Ok(Entry {
            status: RecordStatus::Executed,
            commit: Some(vote.map_err(sign_error)?),
            result: Some(result),
            sender: None,
            ..decided
        })
    }

    /// Stages one decided operation (`record` is its decided record, kept for evidence; present
    /// for pends and commits): its result, and why it did not apply when it did not (stale, a
    /// deterministic failure, or a pend of a trx whose cancel executed here on one of its
    /// blocks: SPEC 4.10, whatever path brings the pend, it never applies after the cancel).
    async fn stage_operation(
        &self,
        step: &mut Step<'_>,
        operation: &RepoOperation,
        record: Option<&KeptRecord>,
        expiration_ms: u64,
    ) -> Result<(Value, Option<RejectReason>), RepoError> {
        if let Some(reason) = self.tombstoned(operation).await? {
            let refused = RepoError::BadRequest(reason.detail.clone());
            let value = serde_json::to_value(ErrorEnvelope::from(&refused))
                .map_err(|e| RepoError::Internal(format!("encoding an execution error: {e}")))?;
            return Ok((value, Some(reason)));
        }
        let applied = match operation {
            RepoOperation::Pend(request) => step.pend(request, record).await.map(RepoResponse::Pend),
            RepoOperation::Commit(request) => step.commit(request, record).await.map(RepoResponse::Commit),
            RepoOperation::Cancel { trx_ref } => {
                let keep_until = expiration_ms.saturating_add(self.config.marker_retention_ms).to_string();
                for block_id in &trx_ref.block_ids {
                    step.meta(MetaWrite::Put(tomb_key(block_id, &trx_ref.trx_id), keep_until.clone().into_bytes()));
                }
                step.cancel(trx_ref).map(|()| RepoResponse::Cancel)
            }
            RepoOperation::Get(_) => Err(RepoError::BadRequest("a get is not agreed by consensus".into())),
        };
        match applied {
            Ok(response) => {
                let stale = match &response {
                    RepoResponse::Pend(PendResult::Stale(f)) | RepoResponse::Commit(CommitResult::Stale(f)) => {
                        Some(stale_reason(f))
                    }
                    _ => None,
                };
                let value = response
                    .to_value()
                    .map_err(|e| RepoError::Internal(format!("encoding an execution result: {e}")))?;
                Ok((value, stale))
            }
            Err(e) if deterministic(&e) => {
                let value = serde_json::to_value(ErrorEnvelope::from(&e))
                    .map_err(|e| RepoError::Internal(format!("encoding an execution error: {e}")))?;
                Ok((value, Some(RejectReason::new(RejectCategory::Failed, e.to_string()))))
            }
            Err(e) => Err(e),
        }
    }

    /// [`Inner::retry_waiting`] as a task of its own (boxed: executing a record can start it).
    fn retry_waiting_task(self: Arc<Self>, block_id: BlockId) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move { self.retry_waiting(&block_id).await })
    }

    /// Executes the decided records that waited for `block_id` (SPEC 4.6), after catch-up (or
    /// the execution of another record) moved it forward. Those still behind keep waiting.
    pub(crate) async fn retry_waiting(self: &Arc<Self>, block_id: &BlockId) {
        let Some(hashes) = self.state().waiting.remove(block_id) else { return };
        for hash in hashes {
            let Some(expiration_ms) = self.state().live.get(&hash).map(|l| l.expiration_ms) else { continue };
            if let Err(e) = self.execute_decided(&hash, expiration_ms).await {
                tracing::debug!(message_hash = %hash, error = %e, "a waiting record did not execute yet");
            }
        }
    }

    /// Executes the record `hash` if it is still decided here, under its block locks; returns
    /// its status afterwards (`None` when this member has no entry for it).
    pub(crate) async fn execute_decided(
        self: &Arc<Self>,
        hash: &str,
        expiration_ms: u64,
    ) -> Result<Option<RecordStatus>, RepoError> {
        let peek = read_entry(self.storage(), expiration_ms, hash).await?;
        if peek.as_ref().map(|e| e.status) != Some(RecordStatus::Decided) {
            return Ok(peek.map(|e| e.status));
        }
        let record = stored_record(self.storage(), peek.as_ref()).await?;
        let cx = self.context(&record, self.clock.now_ms(), false)?;
        let held = self.locks.lock(cx.blocks()).await;
        let entry = read_entry(self.storage(), expiration_ms, hash).await?;
        if entry.as_ref().map(|e| e.status) != Some(RecordStatus::Decided) {
            return Ok(entry.map(|e| e.status));
        }
        self.execute(&held, record, entry, &cx).await?;
        Ok(read_entry(self.storage(), expiration_ms, hash).await?.map(|e| e.status))
    }

    /// Answers a recovery status query about `record` (which may be expired). A "not executed"
    /// or "aborted" answer carries this member's signed renounce of the record
    /// ([`RENOUNCE_FIELD`], SPEC 4.5), said only once the mark it stands for is persisted.
    pub(crate) async fn status(self: &Arc<Self>, record: ClusterRecord) -> Result<Value, RepoError> {
        self.ensure_started().await?;
        record.verify(None).map_err(refusal)?;
        let cx = self.context(&record, self.clock.now_ms(), false)?;
        let _held = self.locks.lock(cx.blocks()).await;
        let entry = read_entry(self.storage(), cx.expiration_ms, &record.message_hash).await?;
        let hash = record.message_hash.clone();
        let renounced = |status: &str| -> Result<Value, RepoError> {
            let signature = sign_renounce(&self.keypair, &hash).map_err(sign_error)?;
            Ok(json!({"messageHash": hash, "status": status, RENOUNCE_FIELD: signature}))
        };
        Ok(match entry.as_ref().map(|e| e.status) {
            Some(RecordStatus::Executed) => {
                json!({"messageHash": hash, "status": answer::EXECUTED, "record": self.executed_reply(entry).await?.to_value()})
            }
            Some(RecordStatus::Decided) => {
                json!({"messageHash": hash, "status": answer::DECIDED, "record": stored_record(self.storage(), entry.as_ref()).await?.to_value()})
            }
            Some(RecordStatus::Aborted) => renounced(answer::ABORTED)?,
            Some(RecordStatus::Promised) if entry.as_ref().is_some_and(|e| e.renounced) => {
                renounced(answer::NOT_EXECUTED)?
            }
            _ if self.clock.now_ms() > cx.expiration_ms => {
                // Persisted before it is said, under the locks executions take (SPEC 4.11): this
                // member will never execute the record now. A promise keeps its reservation
                // until recovery settles the record: another peer may have executed it, and a
                // conflicting record must not take the block meanwhile.
                // A record this member never promised needs nothing stored: it is past its
                // expiration, so no delivery can make this member execute it (SPEC 4.11, and
                // nothing is kept for records a made-up sender asks about, SPEC 5.8).
                if let Some(mut promised) = entry.filter(|e| e.status == RecordStatus::Promised)
                    && !promised.renounced
                {
                    promised.renounced = true;
                    write_entry(self.storage(), &hash, &promised).await?;
                }
                renounced(answer::NOT_EXECUTED)?
            }
            _ => json!({"messageHash": hash, "status": answer::PENDING}),
        })
    }

    /// This member's status for a record, from storage.
    pub(crate) async fn status_of(&self, record: &ClusterRecord) -> Result<Option<RecordStatus>, RepoError> {
        let expiration_ms = record.expiration_ms().unwrap_or(0);
        Ok(read_entry(self.storage(), expiration_ms, &record.message_hash).await?.map(|e| e.status))
    }
}

/// The reject reason detail of a stale execution result.
fn stale_reason(failure: &StaleFailure) -> RejectReason {
    RejectReason::new(RejectCategory::Stale, failure.reason.clone().unwrap_or_else(|| "stale revision".into()))
}

/// The record an entry keeps (read from the copy kept for evidence when it refers to it).
pub(crate) async fn stored_record(storage: &dyn RawStorage, entry: Option<&Entry>) -> Result<ClusterRecord, RepoError> {
    let missing = || RepoError::Internal("a 2pc entry lacks its record".into());
    let value = match entry.and_then(|e| e.record.as_ref()).ok_or_else(missing)? {
        StoredRecord::Inline(value) => value.clone(),
        StoredRecord::Ref(reference) => {
            let bytes = storage.get_meta(&record_key(&reference.record)).await?.ok_or_else(missing)?;
            serde_json::from_slice(&bytes)
                .map_err(|e| RepoError::Internal(format!("a kept 2pc record is unreadable: {e}")))?
        }
    };
    ClusterRecord::from_value(value).map_err(|e| RepoError::Internal(format!("a stored 2pc record is unreadable: {e}")))
}

/// The signer's vote in `votes`, verified against `hash`, if present and valid.
pub(crate) fn verified_vote(
    votes: &std::collections::BTreeMap<String, Vote>,
    peer: &optimystic_core::identity::PeerId,
    hash: &str,
) -> Option<Vote> {
    let vote = votes.get(&optimystic_core::crypto::peer_text(peer))?;
    match vote.verify(peer, hash) {
        Ok(()) => Some(vote.clone()),
        Err(e) => {
            tracing::warn!(%peer, error = %e, "ignoring a vote whose signature does not verify");
            None
        }
    }
}

//! The member side: votes, reservations, execution exactly once, and answers to status queries.

use std::sync::Arc;

use optimystic_core::error::ErrorCode;
use optimystic_core::identity::PeerId;
use optimystic_core::model::{CommitResult, PendResult};
use optimystic_core::record::{ClusterRecord, Phase, RecordError, Vote, VoteType};
use optimystic_core::wire::{ErrorEnvelope, RepoOperation, RepoResponse};
use optimystic_core::{Check, MessageOptions, MetaWrite, RejectCategory, RejectReason, RepoError};
use serde_json::{Map, Value, json};

use crate::checks::check_operation;
use crate::engine::{Inner, Live, MemberState, RESULT_FIELD, RecordContext, refusal};
use crate::store::{Entry, RecordStatus, read_entry, tomb_key, write_entry};

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

/// A record without votes or extras: what a promised entry keeps for recovery queries.
fn bare(record: &ClusterRecord) -> ClusterRecord {
    let mut copy = record.clone();
    copy.promises.clear();
    copy.commits.clear();
    copy.extra = Map::new();
    copy
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
    Marker(Entry),
    /// This member lacks the base the operation needs (SPEC 4.6): nothing applied, no commit vote,
    /// the record stays decided until catch-up brings the block forward.
    Behind(optimystic_core::BlockId),
}

impl Inner {
    /// Handles a record received on the cluster protocol, or from this node's coordinator.
    pub(crate) async fn update(self: &Arc<Self>, mut record: ClusterRecord, origin: Origin) -> Result<ClusterRecord, RepoError> {
        self.ensure_started().await?;
        let now = self.clock.now_ms();
        match origin {
            Origin::Remote(_) => record.verify_except_signer(Some(now), &self.me_text).map_err(refusal)?,
            Origin::Local if record.is_expired(now) => return Err(RepoError::Expired),
            Origin::Local => {}
        }
        record.extra.remove(RESULT_FIELD);
        let cx = self.context(&record, now, true)?;
        let approvals = record.promises.values().filter(|v| v.is_approve()).count();
        let rejections = record.promises.len() - approvals;
        let decided = approvals >= cx.promise_quorum;
        self.check_view(&record, &cx, decided).await?;
        let abort_proven = rejections > record.peers.len().saturating_sub(cx.promise_quorum);
        if !decided && matches!(origin, Origin::Remote(_)) {
            self.check_peers_seen(&record).await?;
        }

        let mut state = self.state.lock().await;
        let entry = read_entry(self.storage(), cx.expiration_ms, &record.message_hash).await?;
        if matches!(origin, Origin::Remote(_)) {
            self.check_own_votes(&record, entry.as_ref())?;
        }
        match entry.as_ref().map(|e| e.status) {
            Some(RecordStatus::Executed) => return self.executed_reply(entry),
            Some(RecordStatus::Aborted) => return Ok(self.with_promise(record, entry.as_ref())),
            Some(RecordStatus::Decided) => {
                let copy = stored_record(entry.as_ref())?;
                return self.execute(&mut state, copy, entry, &cx).await;
            }
            Some(RecordStatus::Promised | RecordStatus::Rejected) | None => {}
        }
        // Checked again under the lock that answers status queries (SPEC 4.11): a status answer
        // of "not executed" is persisted as aborted under this lock, so it can never be followed
        // by an execution.
        if self.clock.now_ms() > cx.expiration_ms {
            return Err(RepoError::Expired);
        }
        if decided {
            return self.execute(&mut state, record, entry, &cx).await;
        }
        if abort_proven {
            self.abort(&mut state, &record, entry.clone(), cx.expiration_ms).await?;
            return Ok(self.with_promise(record, entry.as_ref()));
        }
        if entry.as_ref().is_some_and(|e| e.promise.is_some()) {
            return Ok(self.with_promise(record, entry.as_ref()));
        }
        let sender = match origin {
            Origin::Remote(sender) => sender,
            Origin::Local => self.me,
        };
        self.promise(&mut state, record, &cx, sender).await
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
            vote.verify(&self.me, &hash).map_err(|reason| {
                refusal(RecordError::BadSignature { peer: self.me_text.clone(), phase, reason })
            })?;
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
    fn executed_reply(&self, entry: Option<Entry>) -> Result<ClusterRecord, RepoError> {
        let mut copy = stored_record(entry.as_ref())?;
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

    /// Phase 1: decides, persists and returns this member's promise vote.
    async fn promise(
        self: &Arc<Self>,
        state: &mut MemberState,
        mut record: ClusterRecord,
        cx: &RecordContext,
        sender: PeerId,
    ) -> Result<ClusterRecord, RepoError> {
        let mut stale = None;
        let reason = if state.live.len() >= self.config.max_reservations {
            Some(RejectReason::new(RejectCategory::Busy, format!("{} reservations held", state.live.len())))
        } else if state.reservations_of(&sender) >= self.config.max_reservations_per_sender {
            Some(RejectReason::new(
                RejectCategory::Busy,
                format!("{} reservations held for records from {sender}", state.reservations_of(&sender)),
            ))
        } else if let Some((block_id, other)) = state.conflict(&record.message_hash, &cx.claims) {
            Some(RejectReason::new(RejectCategory::Conflict, format!("block {block_id} is reserved by {other}")))
        } else if let Some(reason) = self.tombstoned(cx).await? {
            Some(reason)
        } else {
            let check = check_operation(&self.local, &cx.operation).await?;
            if let Some(block_id) = check.behind_block() {
                self.report_behind(block_id);
            }
            let reason = check.reject_reason();
            if let Check::Stale(failure) = check {
                stale = Some(
                    serde_json::to_value(&failure)
                        .map_err(|e| RepoError::Internal(format!("encoding a stale answer: {e}")))?,
                );
            }
            reason
        };
        let (vote, entry) = match reason {
            None => {
                let vote = record.sign_promise(&self.keypair, VoteType::Approve, None).map_err(sign_error)?;
                let entry = Entry {
                    status: RecordStatus::Promised,
                    expiration_ms: cx.expiration_ms,
                    promise: Some(vote.clone()),
                    record: Some(bare(&record).to_value()),
                    commit: None,
                    result: None,
                    sender: Some(sender.to_base58()),
                    renounced: false,
                };
                (vote, entry)
            }
            Some(reason) => {
                let vote =
                    record.sign_promise(&self.keypair, VoteType::Reject, Some(reason.to_string())).map_err(sign_error)?;
                let entry = Entry {
                    status: RecordStatus::Rejected,
                    expiration_ms: cx.expiration_ms,
                    promise: Some(vote.clone()),
                    record: None,
                    commit: None,
                    result: None,
                    sender: None,
                    renounced: false,
                };
                (vote, entry)
            }
        };
        write_entry(self.storage(), &record.message_hash, &entry).await?;
        if entry.status == RecordStatus::Promised {
            let live = Live {
                status: RecordStatus::Promised,
                claims: cx.claims.clone(),
                sender: Some(sender),
                expiration_ms: cx.expiration_ms,
            };
            state.reserve(&record.message_hash, live);
            self.publish(state);
            self.schedule_recovery(state, &record.message_hash, cx.expiration_ms);
        }
        record.promises.insert(self.me_text.clone(), vote);
        if let Some(stale) = stale {
            record.extra.insert(RESULT_FIELD.to_owned(), stale);
        }
        Ok(record)
    }

    /// SPEC 4.12: a pend of a trx this member saw cancelled on a block is refused.
    async fn tombstoned(&self, cx: &RecordContext) -> Result<Option<RejectReason>, RepoError> {
        let RepoOperation::Pend(pend) = &cx.operation else { return Ok(None) };
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

    /// Marks a record aborted (its promise quorum is out of reach, or recovery found that no peer
    /// executed it) and frees its reservation.
    pub(crate) async fn abort(
        &self,
        state: &mut MemberState,
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
            renounced: true,
        });
        if matches!(entry.status, RecordStatus::Executed | RecordStatus::Decided) {
            return Ok(());
        }
        entry.status = RecordStatus::Aborted;
        entry.record = None;
        write_entry(self.storage(), &record.message_hash, &entry).await?;
        state.release(&record.message_hash);
        self.publish(state);
        Ok(())
    }

    /// Phase 2: a decided record (verified promise quorum) is applied here exactly once. The
    /// decided copy is persisted first; the executed marker with the result and commit vote after
    /// applying. A crash in between re-applies at restart, before anything else is served, which
    /// the repository makes a no-op for the same operation (re-pend of the same transforms,
    /// re-commit of the same revision, repeated cancel). While the process runs, an operation
    /// applied here is never applied again: a marker that could not be written is kept in memory
    /// and only its write is retried.
    ///
    /// A member without the base the operation needs (SPEC 4.6) applies nothing and signs no
    /// commit vote: the record stays decided (with its reservation), the node is asked to catch
    /// the block up, and the record is executed once it can be ([`Inner::retry_waiting`]).
    pub(crate) async fn execute(
        self: &Arc<Self>,
        state: &mut MemberState,
        mut copy: ClusterRecord,
        prior: Option<Entry>,
        cx: &RecordContext,
    ) -> Result<ClusterRecord, RepoError> {
        copy.extra.remove(RESULT_FIELD);
        let hash = copy.message_hash.clone();
        let executed = match state.unsaved.remove(&hash) {
            Some(executed) => executed,
            None => {
                let decided = match prior {
                    Some(prior) if prior.status == RecordStatus::Decided => prior,
                    prior => {
                        let sender = prior.as_ref().and_then(|e| e.sender.clone());
                        let decided = Entry {
                            status: RecordStatus::Decided,
                            expiration_ms: cx.expiration_ms,
                            promise: prior.and_then(|e| e.promise),
                            record: Some(copy.to_value()),
                            commit: None,
                            result: None,
                            sender,
                            renounced: false,
                        };
                        write_entry(self.storage(), &hash, &decided).await?;
                        decided
                    }
                };
                let sender = decided.sender.as_deref().and_then(|s| s.parse().ok());
                let live = Live { status: RecordStatus::Decided, claims: cx.claims.clone(), sender, expiration_ms: cx.expiration_ms };
                state.reserve(&hash, live);
                self.publish(state);
                // Should this call be abandoned midway, recovery still finds the record decided.
                self.schedule_recovery(state, &hash, cx.expiration_ms);
                match self.apply_once(&copy, decided, cx).await {
                    Ok(Executed::Marker(executed)) => executed,
                    Ok(Executed::Behind(block_id)) => {
                        state.waiting.entry(block_id.clone()).or_default().insert(hash.clone());
                        self.report_behind(&block_id);
                        // Retried with backoff too, should no catch-up ever report back.
                        self.spawn_recovery(state, &hash, cx.expiration_ms);
                        return Ok(copy);
                    }
                    Err(e) => {
                        tracing::warn!(message_hash = %hash, error = %e, "executing a decided record failed; will retry");
                        self.spawn_recovery(state, &hash, cx.expiration_ms);
                        return Err(e);
                    }
                }
            }
        };
        if let Err(e) = write_entry(self.storage(), &hash, &executed).await {
            tracing::warn!(message_hash = %hash, error = %e, "writing an executed marker failed; will retry");
            state.unsaved.insert(hash.clone(), executed);
            self.spawn_recovery(state, &hash, cx.expiration_ms);
            return Err(e);
        }
        state.release(&hash);
        state.remember_peers(copy.peers.keys());
        self.publish(state);
        if let Some(vote) = executed.commit {
            copy.commits.insert(self.me_text.clone(), vote);
        }
        if let Some(result) = executed.result {
            copy.extra.insert(RESULT_FIELD.to_owned(), result);
        }
        Ok(copy)
    }

    /// Applies a decided record to local storage and signs the commit vote: the executed marker
    /// to persist. An approving commit vote means "applied here, on the right base": a stale
    /// answer or a deterministic failure of the operation is its result, signed as a reject. A
    /// member lacking the base applies nothing ([`Executed::Behind`]); any other error leaves the
    /// record decided and unapplied.
    async fn apply_once(&self, copy: &ClusterRecord, decided: Entry, cx: &RecordContext) -> Result<Executed, RepoError> {
        let check = check_operation(&self.local, &cx.operation).await?;
        if let Some(block_id) = check.behind_block() {
            return Ok(Executed::Behind(block_id.clone()));
        }
        let options = MessageOptions::default();
        let record = copy.to_value();
        let applied = match &cx.operation {
            RepoOperation::Pend(request) => {
                self.local.pend_recorded(request, &options, Some(&record)).await.map(RepoResponse::Pend)
            }
            RepoOperation::Commit(request) => {
                self.local.commit_recorded(request, &options, Some(&record)).await.map(RepoResponse::Commit)
            }
            RepoOperation::Cancel { trx_ref } => {
                let keep_until = cx.expiration_ms.saturating_add(self.config.marker_retention_ms).to_string();
                let tombs: Vec<MetaWrite> = trx_ref
                    .block_ids
                    .iter()
                    .map(|b| MetaWrite::Put(tomb_key(b, &trx_ref.trx_id), keep_until.clone().into_bytes()))
                    .collect();
                self.storage().write_meta(&tombs).await?;
                self.local.cancel_recorded(trx_ref, &options).await.map(|()| RepoResponse::Cancel)
            }
            RepoOperation::Get(_) => Err(RepoError::BadRequest("a get is not agreed by consensus".into())),
        };
        let (result, vote) = match applied {
            Ok(response) => {
                let stale = match &response {
                    RepoResponse::Pend(PendResult::Stale(f)) | RepoResponse::Commit(CommitResult::Stale(f)) => {
                        Some(f.reason.clone().unwrap_or_else(|| "stale revision".into()))
                    }
                    _ => None,
                };
                let value = response
                    .to_value()
                    .map_err(|e| RepoError::Internal(format!("encoding an execution result: {e}")))?;
                let vote = match stale {
                    None => copy.sign_commit(&self.keypair, VoteType::Approve, None),
                    Some(detail) => {
                        let reason = RejectReason::new(RejectCategory::Stale, detail);
                        copy.sign_commit(&self.keypair, VoteType::Reject, Some(reason.to_string()))
                    }
                };
                (value, vote.map_err(sign_error)?)
            }
            Err(e) if deterministic(&e) => {
                let value = serde_json::to_value(ErrorEnvelope::from(&e))
                    .map_err(|e| RepoError::Internal(format!("encoding an execution error: {e}")))?;
                let reason = RejectReason::new(RejectCategory::Failed, e.to_string());
                (value, copy.sign_commit(&self.keypair, VoteType::Reject, Some(reason.to_string())).map_err(sign_error)?)
            }
            Err(e) => return Err(e),
        };
        Ok(Executed::Marker(Entry {
            status: RecordStatus::Executed,
            commit: Some(vote),
            result: Some(result),
            sender: None,
            ..decided
        }))
    }

    /// Executes the decided records that waited for `block_id` (SPEC 4.6), after catch-up moved
    /// it forward. Those still behind keep waiting.
    pub(crate) async fn retry_waiting(self: &Arc<Self>, block_id: &optimystic_core::BlockId) {
        let mut state = self.state.lock().await;
        let Some(hashes) = state.waiting.remove(block_id) else { return };
        for hash in hashes {
            let Some(expiration_ms) = state.live.get(&hash).map(|l| l.expiration_ms) else { continue };
            let entry = match read_entry(self.storage(), expiration_ms, &hash).await {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!(message_hash = %hash, error = %e, "reading a waiting record failed");
                    continue;
                }
            };
            if entry.as_ref().map(|e| e.status) != Some(RecordStatus::Decided) {
                continue;
            }
            let outcome = match stored_record(entry.as_ref()) {
                Ok(record) => match self.context(&record, self.clock.now_ms(), false) {
                    Ok(cx) => self.execute(&mut state, record, entry, &cx).await.map(|_| ()),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                tracing::debug!(message_hash = %hash, error = %e, "a waiting record did not execute yet");
            }
        }
    }

    /// Answers a recovery status query about `record` (which may be expired).
    pub(crate) async fn status(self: &Arc<Self>, record: ClusterRecord) -> Result<Value, RepoError> {
        self.ensure_started().await?;
        record.verify(None).map_err(refusal)?;
        let cx = self.context(&record, self.clock.now_ms(), false)?;
        let _state = self.state.lock().await;
        let entry = read_entry(self.storage(), cx.expiration_ms, &record.message_hash).await?;
        let hash = record.message_hash.clone();
        Ok(match entry.as_ref().map(|e| e.status) {
            Some(RecordStatus::Executed) => {
                json!({"messageHash": hash, "status": answer::EXECUTED, "record": self.executed_reply(entry)?.to_value()})
            }
            Some(RecordStatus::Decided) => {
                json!({"messageHash": hash, "status": answer::DECIDED, "record": stored_record(entry.as_ref())?.to_value()})
            }
            Some(RecordStatus::Aborted) => json!({"messageHash": hash, "status": answer::ABORTED}),
            Some(RecordStatus::Promised) if entry.as_ref().is_some_and(|e| e.renounced) => {
                json!({"messageHash": hash, "status": answer::NOT_EXECUTED})
            }
            _ if self.clock.now_ms() > cx.expiration_ms => {
                // Persisted before it is said, under the lock executions take (SPEC 4.11): this
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
                json!({"messageHash": hash, "status": answer::NOT_EXECUTED})
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

/// The record an entry keeps.
pub(crate) fn stored_record(entry: Option<&Entry>) -> Result<ClusterRecord, RepoError> {
    let value = entry
        .and_then(|e| e.record.clone())
        .ok_or_else(|| RepoError::Internal("a 2pc entry lacks its record".into()))?;
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

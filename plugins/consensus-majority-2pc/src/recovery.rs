//! Loading persisted state at start, recovery after a coordinator failure (SPEC 4.5) and
//! collection of old markers.
//!
//! Recovery of a promised record starts at its expiration plus the grace period (by this node's
//! clock): the member asks every other peer of the record for its status, reaching each through
//! this node's own routing by peer id (never through the addresses the record carries). If a peer
//! executed it or holds a copy with a promise quorum, this member executes it too. It drops its
//! reservation (and marks the record aborted) once every other peer has answered that it did not
//! execute it and is past the expiration (so it will not execute it either, normal deliveries
//! being refused after expiration). Until then it asks again with doubling delays: a peer that
//! does not answer may have executed it.
//!
//! Bound: "not executed" answers carry the peer's signed renounce (see the `faulty` module),
//! kept in the record's entry. Past `recovery_bound_ms` after the expiration, a member drops the
//! reservation once renounces from a majority of the record's peer set are in hand, its own
//! included, even if other peers never answer or keep answering "pending". It also drops it as
//! soon as it holds, with evidence, a revision at or above the record's on every block the record
//! names. A peer whose renounce and approving commit vote for one record meet here is proven
//! faulty. Safe against crashes (a record that succeeded was executed by a majority, none of
//! which renounces it), not against a lying member with another member unreachable (SPEC 4.5).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use optimystic_core::identity::PeerId;
use optimystic_core::network::ProtocolKind;
use optimystic_core::record::ClusterRecord;
use optimystic_core::wire::RepoOperation;
use optimystic_core::{MetaWrite, RepoError, StorageError};
use serde_json::{Value, json};

use std::cmp::Reverse;

use crate::engine::{Budget, DueRecovery, Inner, Live, MemberState};
use crate::faulty::{RENOUNCE_FIELD, load_faulty, verify_renounce};
use crate::member::{STATUS_OPERATION, answer, stored_record};
use crate::store::{
    ENTRY_PREFIX, Entry, REJECTION_PREFIX, RecordStatus, RejectionRef, TOMB_PREFIX, entry_key, expiration_of_key,
    live_key, live_pointers, parse_rejection_key, read_entry, write_entry,
};

/// Scheduled recoveries kept per allowed reservation before those of resolved records are
/// dropped early.
const MAX_DUE_PER_RESERVATION: usize = 4;
/// How often old markers are collected.
const GC_INTERVAL_MS: u64 = 60_000;
/// Entries examined per collection step.
const GC_BATCH: usize = 64;
/// Collection steps per interval at most.
const GC_STEPS_PER_INTERVAL: usize = 16;
/// Cancel tombstones examined per collection step (cancels are rare: failed transactions).
const GC_TOMBSTONES_LISTED: usize = 256;
/// Tombstone listings per collection step at most (most are of buckets holding few keys).
const GC_TOMBSTONE_LISTINGS: usize = 64;
/// The characters of a tombstone key after [`TOMB_PREFIX`] ([`crate::store::tomb_key`]: hex
/// digits and the `/` between block and trx), in key order.
const TOMB_KEY_CHARS: &str = "/0123456789abcdef";

/// The tombstone bucket after `bucket` in key order once `bucket` and every key under it were
/// examined: its next sibling, or its parent's next sibling, ...; `None` past the last bucket.
fn next_tomb_bucket(bucket: &str) -> Option<String> {
    let mut next = bucket.to_owned();
    while let Some(last) = next.pop() {
        if let Some(sibling) = TOMB_KEY_CHARS.chars().skip_while(|c| *c != last).nth(1) {
            next.push(sibling);
            return Some(next);
        }
    }
    None
}

/// What one recovery round concluded.
enum Round {
    /// Resolved (executed, aborted, or no longer live): stop.
    Done,
    /// Some peers have not answered finally: ask again later.
    Again,
}

impl Inner {
    /// Loads persisted reservations once; later calls wait for the first to finish.
    pub(crate) async fn ensure_started(self: &Arc<Self>) -> Result<(), RepoError> {
        self.started.get_or_try_init(|| self.load()).await.map(|_| ())
    }

    async fn load(self: &Arc<Self>) -> Result<(), RepoError> {
        let faulty = load_faulty(self.storage()).await?;
        self.state().faulty.extend(faulty);
        let limit = self.config.max_reservations.saturating_add(1);
        let pointers = live_pointers(self.storage(), limit).await?;
        if pointers.len() > self.config.max_reservations {
            return Err(RepoError::Storage(StorageError::Invalid(format!(
                "more than max_reservations ({}) live 2pc reservations are stored; raise max_reservations to start",
                self.config.max_reservations
            ))));
        }
        for (hash, expiration_ms) in pointers {
            let entry = read_entry(self.storage(), expiration_ms, &hash).await?;
            let Some(entry) = entry.filter(|e| e.status.is_live()) else {
                // A pointer whose vote was never answered, or whose record was resolved.
                self.storage().delete_meta(&live_key(&hash)).await?;
                continue;
            };
            let record = stored_record(self.storage(), Some(&entry)).await?;
            let cx = self.context(&record, self.clock.now_ms(), false)?;
            let live = Live {
                status: entry.status,
                claims: cx.claims.clone(),
                budget: Budget::of_entry(entry.sender.as_deref(), entry.outsider),
                expiration_ms,
                weight: cx.weight(),
            };
            self.state().reserve(&hash, live);
            if entry.status == RecordStatus::Decided {
                // Decided before a crash: execute now, whatever the time (it is decided).
                let held = self.locks.lock(cx.blocks()).await;
                if let Err(e) = self.execute(&held, record, Some(entry), &cx).await {
                    tracing::warn!(message_hash = %hash, error = %e, "executing a decided record at start failed");
                }
            } else {
                self.schedule_recovery(&mut self.state(), &hash, expiration_ms);
            }
        }
        self.publish(&self.state());
        self.count_stored_rejections().await?;
        let me = Arc::clone(self);
        self.spawn(async move { me.collect_garbage_forever().await });
        let me = Arc::clone(self);
        self.spawn(async move { me.schedule_recoveries_forever().await });
        Ok(())
    }

    /// Counts the stored rejections (SPEC 4.10 bounds) from their index at start. Lists at most
    /// `max_rejections` plus a collection batch: more are only there when the bound was lowered,
    /// and they are collected at their expiration plus grace all the same.
    async fn count_stored_rejections(&self) -> Result<(), RepoError> {
        let limit = self.config.max_rejections.saturating_add(GC_BATCH);
        let listed = self.storage().list_meta(REJECTION_PREFIX, limit).await?;
        let mut state = self.state();
        for (key, bytes) in listed {
            match serde_json::from_slice::<RejectionRef>(&bytes) {
                Ok(rejection) => {
                    state.count_rejection(Budget::of_rejection(rejection.sender.as_deref()), rejection.blocks)
                }
                Err(e) => {
                    tracing::warn!(%key, error = %e, "an unreadable rejection index entry; collected at its time")
                }
            }
        }
        Ok(())
    }

    /// Arranges the recovery of a promised record at its expiration plus grace, if it is still
    /// live then. One scheduler serves every record: most records execute long before, and a task
    /// (and timer) per promise would pile up by the thousand under load.
    pub(crate) fn schedule_recovery(&self, state: &mut MemberState, message_hash: &str, expiration_ms: u64) {
        let due_ms = expiration_ms.saturating_add(self.config.grace_ms);
        let earliest = state.due.peek().is_none_or(|Reverse(head)| due_ms < head.due_ms);
        if state.due.len() >= self.config.max_reservations.saturating_mul(MAX_DUE_PER_RESERVATION) {
            let live = &state.live;
            state.due.retain(|Reverse(d)| live.contains_key(&d.message_hash));
        }
        state.due.push(Reverse(DueRecovery { due_ms, message_hash: message_hash.to_owned(), expiration_ms }));
        if earliest {
            self.recovery_wake.notify_one();
        }
    }

    /// Starts the recovery of every promised record that is due and still live, then sleeps until
    /// the next is due (or an earlier one is scheduled).
    async fn schedule_recoveries_forever(self: &Arc<Self>) {
        loop {
            let next_due = {
                let mut state = self.state();
                let now = self.clock.now_ms();
                while let Some(Reverse(head)) = state.due.peek() {
                    if head.due_ms >= now {
                        break;
                    }
                    let Some(Reverse(due)) = state.due.pop() else { break };
                    if state.live.contains_key(&due.message_hash) {
                        self.spawn_recovery(&mut state, &due.message_hash, due.expiration_ms);
                    }
                }
                state.due.peek().map(|Reverse(head)| head.due_ms.saturating_sub(now).saturating_add(1))
            };
            match next_due {
                Some(wait_ms) => {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
                        () = self.recovery_wake.notified() => {}
                    }
                }
                None => self.recovery_wake.notified().await,
            }
        }
    }

    /// Starts the recovery task of a live record unless one runs: for a promised record it waits
    /// until expiration plus grace; for a decided one (whose execution failed) it retries at once.
    pub(crate) fn spawn_recovery(self: &Arc<Self>, state: &mut MemberState, message_hash: &str, expiration_ms: u64) {
        if !state.recovering.insert(message_hash.to_owned()) {
            return;
        }
        let decided = state.live.get(message_hash).is_some_and(|l| l.status == RecordStatus::Decided);
        let me = Arc::clone(self);
        let hash = message_hash.to_owned();
        let spawned = self.spawn(async move {
            me.recover(&hash, expiration_ms, decided).await;
            me.state().recovering.remove(&hash);
        });
        if !spawned {
            state.recovering.remove(message_hash);
        }
    }

    async fn recover(self: &Arc<Self>, hash: &str, expiration_ms: u64, decided: bool) {
        let due = if decided { 0 } else { expiration_ms.saturating_add(self.config.grace_ms) };
        loop {
            let now = self.clock.now_ms();
            if now > due {
                break;
            }
            tokio::time::sleep(Duration::from_millis(due - now + 1)).await;
        }
        let mut finals: BTreeSet<PeerId> = BTreeSet::new();
        let mut delay_ms = self.config.retry_max_ms;
        loop {
            match self.recovery_round(hash, expiration_ms, &mut finals).await {
                Ok(Round::Done) => return,
                Ok(Round::Again) => {}
                Err(e) => tracing::warn!(message_hash = %hash, error = %e, "recovery round failed"),
            }
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            delay_ms = delay_ms.saturating_mul(2).min(self.config.recovery_backoff_max_ms);
        }
    }

    async fn recovery_round(
        self: &Arc<Self>,
        hash: &str,
        expiration_ms: u64,
        finals: &mut BTreeSet<PeerId>,
    ) -> Result<Round, RepoError> {
        let entry = read_entry(self.storage(), expiration_ms, hash).await?;
        match entry.as_ref().map(|e| e.status) {
            Some(RecordStatus::Promised) => {}
            Some(RecordStatus::Decided) => {
                // A transient execution failure, or a member behind on the record's blocks
                // (SPEC 4.6): try again, with backoff, until it is executed.
                let now = self.execute_decided(hash, expiration_ms).await?;
                return Ok(if now == Some(RecordStatus::Decided) { Round::Again } else { Round::Done });
            }
            _ => {
                // Resolved: nothing left to recover. A reservation (or live pointer) left by a
                // write that failed halfway goes too, under the record's block locks.
                let claims = self.state().live.get(hash).map(|l| l.claims.clone());
                if let Some(claims) = claims {
                    let _held = self.locks.lock(claims.iter().map(|c| &c.block_id)).await;
                    let now = read_entry(self.storage(), expiration_ms, hash).await?;
                    if !now.is_some_and(|e| e.status.is_live()) {
                        let mut state = self.state();
                        state.release(hash);
                        self.publish(&state);
                    }
                }
                if let Err(e) = self.storage().delete_meta(&live_key(hash)).await {
                    tracing::debug!(message_hash = %hash, error = %e, "a stale live pointer stays until restart");
                }
                return Ok(Round::Done);
            }
        }
        let record = stored_record(self.storage(), entry.as_ref()).await?;
        if self.superseded(&record).await? {
            return self
                .drop_reservation(hash, &record, expiration_ms, BTreeMap::new(), "a newer proven revision")
                .await;
        }
        // Peers are reached through this node's own routing by peer id; the addresses a record
        // carries are never dialled (a sender could point them anywhere).
        let others: Vec<PeerId> = record
            .peers
            .keys()
            .filter(|p| **p != self.me_text)
            .filter_map(|p| p.parse::<PeerId>().ok())
            .filter(|p| !finals.contains(p))
            .collect();
        let mut renounces = entry.as_ref().map(|e| e.renounces.clone()).unwrap_or_default();
        let known = renounces.len();
        if !others.is_empty() {
            let query = json!({"operation": STATUS_OPERATION, "record": record.to_value()});
            let answers = join_all(others.iter().map(|peer| self.ask(*peer, query.clone()))).await;
            let mut copies = Vec::new();
            for (peer, answer) in others.iter().zip(answers) {
                let Some(answer) = answer else { continue };
                if let Some(copy) = same_record(&record, &answer) {
                    copies.push(copy);
                    continue;
                }
                let status = answer.get("status").and_then(Value::as_str);
                if !matches!(status, Some(answer::NOT_EXECUTED | answer::ABORTED)) {
                    continue;
                }
                match answer.get(RENOUNCE_FIELD).and_then(Value::as_str) {
                    // An older peer's unsigned answer still counts as final before the bound.
                    None => {
                        finals.insert(*peer);
                    }
                    Some(signature) => {
                        if verify_renounce(peer, hash, signature).is_ok() {
                            finals.insert(*peer);
                            renounces.insert(peer.to_base58(), signature.to_owned());
                        } else {
                            tracing::warn!(%peer, message_hash = %hash, "a renounce does not verify; ignoring the answer");
                        }
                    }
                }
            }
            // Equivocation first: a peer it proves faulty counts for nothing in the copies.
            for copy in &copies {
                self.check_equivocation(copy, &renounces).await?;
            }
            let mut decided = None;
            for copy in copies {
                if self.is_decided_copy(&copy).await {
                    decided = Some(copy);
                    break;
                }
            }
            if let Some(copy) = decided {
                // This member may have renounced the record while its own queries were in
                // flight: `execute_recovered` decides under the lock.
                if self.execute_recovered(copy, expiration_ms).await? {
                    return Ok(Round::Done);
                }
                return self.settle_renounced(hash, &record, expiration_ms).await;
            }
        }
        let every_peer_answered = record
            .peers
            .keys()
            .filter(|p| **p != self.me_text)
            .all(|p| p.parse::<PeerId>().is_ok_and(|p| finals.contains(&p)));
        if every_peer_answered {
            return self.drop_reservation(hash, &record, expiration_ms, renounces, "no peer executed the record").await;
        }
        if self.clock.now_ms() > expiration_ms.saturating_add(self.config.recovery_bound_ms) {
            // SPEC 4.5's bound: signed renounces from a majority of the peer set.
            if self.counted_renounces(&record, &renounces) > record.peers.len() / 2 {
                return self
                    .drop_reservation(hash, &record, expiration_ms, renounces, "a majority renounced the record")
                    .await;
            }
        }
        if renounces.len() > known {
            self.keep_renounces(hash, expiration_ms, renounces).await?;
        }
        Ok(Round::Again)
    }

    /// Persists the renounces gathered so far in the record's promised entry (under its block
    /// locks), so that a restarted member counts them without asking again.
    async fn keep_renounces(
        &self,
        hash: &str,
        expiration_ms: u64,
        renounces: BTreeMap<String, String>,
    ) -> Result<(), RepoError> {
        let Some(claims) = self.state().live.get(hash).map(|l| l.claims.clone()) else { return Ok(()) };
        let _held = self.locks.lock(claims.iter().map(|c| &c.block_id)).await;
        let entry = read_entry(self.storage(), expiration_ms, hash).await?;
        if let Some(mut promised) = entry.filter(|e| e.status == RecordStatus::Promised) {
            promised.renounces = renounces;
            write_entry(self.storage(), hash, &promised).await?;
        }
        Ok(())
    }

    /// Marks a promised record aborted (renounced by this member too) with the renounces
    /// gathered, and frees its reservation: under its block locks, unless it was settled
    /// meanwhile.
    async fn drop_reservation(
        &self,
        hash: &str,
        record: &ClusterRecord,
        expiration_ms: u64,
        renounces: BTreeMap<String, String>,
        why: &str,
    ) -> Result<Round, RepoError> {
        let cx = self.context(record, self.clock.now_ms(), false)?;
        let held = self.locks.lock(cx.blocks()).await;
        let entry = read_entry(self.storage(), expiration_ms, hash).await?;
        if let Some(mut promised) = entry.filter(|e| e.status == RecordStatus::Promised) {
            tracing::info!(message_hash = %hash, why, "dropping a reservation");
            promised.renounced = true;
            promised.renounces.extend(renounces);
            self.abort(&held, record, Some(promised), expiration_ms).await?;
        }
        Ok(Round::Done)
    }

    /// Whether this member holds, with evidence, a revision at or above the one every operation
    /// of `record` would fix, on every block it names (SPEC 4.5): the record can no longer apply
    /// here. A cancel, or a pend without a revision, fixes none.
    async fn superseded(&self, record: &ClusterRecord) -> Result<bool, RepoError> {
        let cx = self.context(record, self.clock.now_ms(), false)?;
        for operation in &cx.operations {
            let (rev, block_ids) = match operation {
                RepoOperation::Commit(commit) => (commit.rev, commit.block_ids.clone()),
                RepoOperation::Pend(pend) => match pend.rev {
                    Some(rev) => (rev, pend.transforms.block_ids().into_iter().collect()),
                    None => return Ok(false),
                },
                _ => return Ok(false),
            };
            for block_id in &block_ids {
                let Some(latest) = self.storage().latest(block_id).await? else { return Ok(false) };
                if latest.rev < rev || self.local.evidence(block_id, latest.rev).await?.is_none() {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// A record this member renounced (it answered "not executed", SPEC 4.11) turned out decided
    /// elsewhere: it never executes it, so it is behind on the record's blocks. A record with a
    /// commit keeps its reservation until catch-up has brought every committed block to the
    /// commit's revision (a conflicting record at that revision must not be approved here
    /// meanwhile); pends and cancels fix no revision and are released at once.
    async fn settle_renounced(
        self: &Arc<Self>,
        hash: &str,
        record: &ClusterRecord,
        expiration_ms: u64,
    ) -> Result<Round, RepoError> {
        let cx = self.context(record, self.clock.now_ms(), false)?;
        let mut behind = Vec::new();
        for operation in &cx.operations {
            let RepoOperation::Commit(commit) = operation else { continue };
            for block_id in &commit.block_ids {
                let latest_rev = self.storage().latest(block_id).await?.map_or(0, |l| l.rev);
                if latest_rev < commit.rev {
                    behind.push(block_id.clone());
                }
            }
        }
        if !behind.is_empty() {
            for block_id in &behind {
                self.report_behind(block_id);
            }
            return Ok(Round::Again);
        }
        let held = self.locks.lock(cx.blocks()).await;
        let entry = read_entry(self.storage(), expiration_ms, hash).await?;
        if entry.as_ref().map(|e| e.status) == Some(RecordStatus::Promised) {
            tracing::info!(message_hash = %hash, "a renounced record was decided elsewhere; caught up past it, releasing");
            self.abort(&held, record, entry, expiration_ms).await?;
        }
        Ok(Round::Done)
    }

    /// One status query, bounded by the in-flight limit and the request timeout.
    async fn ask(&self, peer: PeerId, query: Value) -> Option<Value> {
        let _permit = self.recovery_permits.acquire().await.ok()?;
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        match self.network.request(peer, ProtocolKind::Cluster, query, timeout).await {
            Ok(answer) => Some(answer),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "recovery status query failed");
                None
            }
        }
    }

    /// Whether a verified copy of a record carries a promise quorum (proven-faulty peers not
    /// counted) that passes the membership checks.
    async fn is_decided_copy(&self, copy: &ClusterRecord) -> bool {
        let Ok(cx) = self.context(copy, self.clock.now_ms(), false) else { return false };
        let (approvals, _) = self.count_votes(&copy.promises);
        approvals >= cx.promise_quorum && self.check_view(copy, &cx, true, None).await.is_ok()
    }

    /// Executes a record recovery found decided elsewhere (past its expiration: it is decided).
    /// Returns `false`, executing nothing, when this member renounced it (SPEC 4.11): the caller
    /// settles it as renounced instead.
    async fn execute_recovered(self: &Arc<Self>, copy: ClusterRecord, expiration_ms: u64) -> Result<bool, RepoError> {
        let cx = self.context(&copy, self.clock.now_ms(), false)?;
        let held = self.locks.lock(cx.blocks()).await;
        let entry = read_entry(self.storage(), expiration_ms, &copy.message_hash).await?;
        if entry.as_ref().is_some_and(|e| e.renounced && e.status == RecordStatus::Promised) {
            return Ok(false);
        }
        if matches!(entry.as_ref().map(|e| e.status), Some(RecordStatus::Executed | RecordStatus::Aborted)) {
            return Ok(true);
        }
        tracing::info!(message_hash = %copy.message_hash, "recovery found the record decided; executing it");
        self.execute(&held, copy, entry, &cx).await.map(|_| true)
    }

    async fn collect_garbage_forever(self: &Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(GC_INTERVAL_MS)).await;
            for _ in 0..GC_STEPS_PER_INTERVAL {
                match self.collect_garbage_once().await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "collecting old 2pc markers failed");
                        break;
                    }
                }
            }
        }
    }

    /// Deletes resolved entries older than the retention; returns whether a full batch was
    /// deleted (more may remain).
    pub(crate) async fn collect_garbage_once(&self) -> Result<bool, RepoError> {
        let cutoff = self.clock.now_ms().saturating_sub(self.config.marker_retention_ms);
        // No lock needed: only resolved entries whose record expired more than the retention ago
        // are deleted, and such an entry never changes any more (every delivery of its record is
        // refused as expired, and status queries persist nothing for a resolved record).
        let live_count = *self.live_count.borrow();
        let listed = self.storage().list_meta(ENTRY_PREFIX, live_count.saturating_add(GC_BATCH)).await?;
        let mut deleted = 0usize;
        for (key, bytes) in listed {
            let Some(expiration_ms) = expiration_of_key(&key) else { continue };
            if expiration_ms >= cutoff {
                break;
            }
            let live = serde_json::from_slice::<Entry>(&bytes).map_or(true, |e| e.status.is_live());
            if !live {
                self.storage().delete_meta(&key).await?;
                deleted += 1;
            }
        }
        let rejections_left = self.collect_rejections_once().await?;
        self.collect_tombstones_once().await?;
        Ok(deleted >= GC_BATCH || rejections_left)
    }

    /// Deletes stored rejections (their entries and index keys) whose record's expiration plus
    /// grace has passed, oldest first, and gives back what they counted for (SPEC 4.10: a
    /// rejection is kept only while its record can still be delivered). An entry that is no
    /// longer a rejection (the record was decided elsewhere and executed here) stays for the
    /// marker retention; only its index key goes. Returns whether a full batch was collected
    /// (more may remain).
    pub(crate) async fn collect_rejections_once(&self) -> Result<bool, RepoError> {
        let now = self.clock.now_ms();
        let listed = self.storage().list_meta(REJECTION_PREFIX, GC_BATCH).await?;
        let mut collected = 0usize;
        for (key, bytes) in listed {
            let Some((expiration_ms, hash)) = parse_rejection_key(&key) else {
                self.storage().delete_meta(&key).await?;
                continue;
            };
            if expiration_ms.saturating_add(self.config.grace_ms) >= now {
                break;
            }
            // No lock needed: the record is past its expiration plus grace, so no delivery
            // changes its entry any more (deliveries are refused as expired).
            let mut writes = Vec::with_capacity(2);
            let entry = read_entry(self.storage(), expiration_ms, hash).await?;
            if entry.is_some_and(|e| e.status == RecordStatus::Rejected) {
                writes.push(MetaWrite::Delete(entry_key(expiration_ms, hash)));
            }
            writes.push(MetaWrite::Delete(key.clone()));
            self.storage().write_meta(&writes).await?;
            if let Ok(rejection) = serde_json::from_slice::<RejectionRef>(&bytes) {
                self.state().release_rejection(Budget::of_rejection(rejection.sender.as_deref()), rejection.blocks);
            }
            collected += 1;
        }
        Ok(collected >= GC_BATCH)
    }

    /// Deletes expired cancel tombstones, examining a bounded part of them per call and going on
    /// where the last call stopped, so that every tombstone is reached however many sort before
    /// it (SPEC 4.12: kept as long as the trx's records can still arrive, then collected).
    ///
    /// Storage lists keys by prefix only, so the sweep walks prefix buckets depth first: a bucket
    /// whose listing is complete (fewer keys than listed at most) is done, and the walk moves to
    /// the next bucket; a full one is split into its sub-buckets, one per next key character.
    /// The bucket to visit next is kept in memory (a restart begins a new sweep).
    async fn collect_tombstones_once(&self) -> Result<(), RepoError> {
        let mut bucket = self.state().tomb_bucket.clone();
        let swept = self.sweep_tombstones(&mut bucket).await;
        self.state().tomb_bucket = bucket;
        swept
    }

    /// One bounded part of the sweep of [`Inner::collect_tombstones_once`], from `bucket` on;
    /// leaves in `bucket` where the next part begins.
    async fn sweep_tombstones(&self, bucket: &mut String) -> Result<(), RepoError> {
        let now = self.clock.now_ms();
        let mut examined = 0usize;
        for _ in 0..GC_TOMBSTONE_LISTINGS {
            let listed = self.storage().list_meta(&format!("{TOMB_PREFIX}{bucket}"), GC_TOMBSTONES_LISTED).await?;
            let complete = listed.len() < GC_TOMBSTONES_LISTED;
            examined = examined.saturating_add(listed.len());
            for (key, bytes) in listed {
                let keep_until = std::str::from_utf8(&bytes).ok().and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
                if keep_until < now {
                    self.storage().delete_meta(&key).await?;
                }
            }
            if complete {
                match next_tomb_bucket(bucket) {
                    Some(next) => *bucket = next,
                    None => {
                        // A whole sweep ended; the next part begins another.
                        bucket.clear();
                        return Ok(());
                    }
                }
            } else if let Some(first) = TOMB_KEY_CHARS.chars().next() {
                bucket.push(first);
            }
            if examined >= GC_TOMBSTONES_LISTED {
                break;
            }
        }
        Ok(())
    }
}

/// The record copy in a status answer, if it is `record` and every signature it carries verifies.
fn same_record(record: &ClusterRecord, answer: &Value) -> Option<ClusterRecord> {
    let copy = ClusterRecord::from_value(answer.get("record")?.clone()).ok()?;
    (copy.message_hash == record.message_hash && copy.verify(None).is_ok()).then_some(copy)
}

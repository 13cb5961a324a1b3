//! The state shared by the member, coordinator and recovery sides of one node.
//!
//! # Locking
//! A member's decisions and executions serialize per block, not per node: every step that reads
//! or writes a record's 2pc entry, or votes on or executes the record, holds the member's
//! [`BlockLocks`] of the record's blocks (all of them, taken in sorted id order, so two records
//! never deadlock). Records on disjoint blocks proceed in parallel; two records sharing a block
//! (a conflict candidate) and two deliveries of one record (same blocks) are serialized. The
//! in-memory index of reservations ([`MemberState`]) sits behind a plain mutex that is never held
//! across an `.await`: it is consulted and updated in short steps under the block locks, so the
//! conflict check and the reservation of a record are atomic with respect to every other record
//! on its blocks. Per-sender and total bounds are checked and taken in one such step.
//! Locks are always taken in this order: member block locks, then the repository's own block
//! locks (inside [`StorageRepo`]), then the index mutex; never the other way round.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex as StdMutex, MutexGuard, PoisonError};

use optimystic_core::consensus::{BehindSink, Clock};
use optimystic_core::crypto;
use optimystic_core::identity::{Keypair, PeerId};
use optimystic_core::keynet::KeyNetwork;
use optimystic_core::network::PeerNetwork;
use optimystic_core::record::{ClusterRecord, RecordError};
use optimystic_core::wire::{RecordMessage, RepoOperation};
use optimystic_core::{BlockId, RawStorage, RepoError, StorageRepo};
use tokio::sync::{Mutex, Notify, OnceCell, OwnedMutexGuard, Semaphore, watch};
use tokio::task::JoinSet;

use crate::checks::{Claim, claims};
use crate::config::MajorityConfig;
use crate::coordinate::Lanes;
use crate::store::{Entry, RecordStatus};

/// Top-level field of a member's answer carrying its execution result (or the `StaleFailure` of a
/// stale rejection). Verification ignores unknown top-level fields (SPEC 3.4), so it travels next
/// to the signed votes without being covered by them.
pub const RESULT_FIELD: &str = "result";

/// Whose budget a reservation (or a stored rejection) counts against (SPEC 4.20 "Sybil
/// senders").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Budget {
    /// A sender in this member's view of the cluster of every block the record names (or any
    /// sender when the member has no key network): a budget of its own.
    Sender(PeerId),
    /// Every other sender: one budget shared by all of them, so that minting peer ids does not
    /// multiply what a sender outside the cluster can pin.
    Outsiders,
}

impl Budget {
    /// The budget a stored rejection counts against ([`crate::store::RejectionRef`]).
    pub fn of_rejection(sender: Option<&str>) -> Self {
        sender.and_then(|s| s.parse().ok()).map_or(Self::Outsiders, Self::Sender)
    }

    /// The sender as a stored rejection keeps it (`None` for the outsiders' budget).
    pub fn stored_sender(self) -> Option<String> {
        match self {
            Self::Sender(sender) => Some(sender.to_base58()),
            Self::Outsiders => None,
        }
    }

    /// The budget a stored entry counted against: its sender's own, or the shared one of
    /// outsiders; `None` when the entry kept no sender (entries stored before senders were
    /// kept).
    pub fn of_entry(sender: Option<&str>, outsider: bool) -> Option<Self> {
        if outsider {
            return Some(Self::Outsiders);
        }
        sender.and_then(|s| s.parse().ok()).map(Self::Sender)
    }

    /// Whether this is the shared budget of senders outside the cluster.
    pub fn is_outsiders(self) -> bool {
        self == Self::Outsiders
    }
}

/// One live reservation in memory.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub status: RecordStatus,
    pub claims: Vec<Claim>,
    /// The budget of the peer that sent the record (reservations are bounded per sender,
    /// SPEC 4.11); `None` when unknown (reservations stored before senders were kept).
    pub budget: Option<Budget>,
    /// The record's expiration (where its entry is stored).
    pub expiration_ms: u64,
    /// The reservations it counts for against the bounds: one per block it names (SPEC 4.10:
    /// a record naming many blocks pins each of them).
    pub weight: usize,
}

/// Most peer ids a member remembers from records it executed (SPEC 4.11 "its own record of past
/// cluster peers").
pub(crate) const MAX_SEEN_PEERS: usize = 4_096;

/// The in-memory index of live reservations, rebuilt from storage at start.
#[derive(Debug, Default)]
pub(crate) struct MemberState {
    pub live: BTreeMap<String, Live>,
    pub by_block: BTreeMap<BlockId, BTreeSet<String>>,
    /// Records with a recovery task running.
    pub recovering: BTreeSet<String>,
    /// Executed markers of records applied here whose marker could not be written: retrying
    /// writes the marker without applying the operation again. At most one per live reservation.
    pub unsaved: BTreeMap<String, Entry>,
    /// Promised records by the time their recovery is due (expiration plus grace): the recovery
    /// scheduler starts a task for those still live then. Entries of records resolved earlier are
    /// skipped when they come up.
    pub due: BinaryHeap<Reverse<DueRecovery>>,
    /// Live reservations per budget (weighted: one per block).
    pub per_budget: BTreeMap<Budget, usize>,
    /// Live reservations in total (weighted: one per block).
    pub held: usize,
    /// Decided records waiting for catch-up of a block this member is behind on (SPEC 4.6).
    pub waiting: BTreeMap<BlockId, BTreeSet<String>>,
    /// Peers of records this member executed (bounded by [`MAX_SEEN_PEERS`]).
    pub seen_peers: BTreeSet<String>,
    /// Peers proven faulty (SPEC 4.5; bounded by [`crate::faulty::MAX_FAULTY_PEERS`]): their
    /// signatures count for nothing here. Peer id texts, as records name peers.
    pub faulty: BTreeSet<String>,
    /// Blocks of stored rejections per budget (SPEC 4.10: bounded per sender and in total).
    pub rejections_per_budget: BTreeMap<Budget, usize>,
    /// Blocks of stored rejections in total.
    pub rejections_held: usize,
    /// Behind reports taken per budget in the current window ([`MemberState::take_behind_report`]).
    pub behind_reports: BTreeMap<Budget, ReportWindow>,
    /// Where the collection of cancel tombstones goes on: the key bucket (the characters after
    /// the tombstone prefix) its next step lists first; empty at the start of a sweep.
    pub tomb_bucket: String,
}

/// Behind reports one budget (a sender in the cluster, or all the others together) may make
/// per [`BEHIND_REPORT_WINDOW_MS`] through the records it sends.
pub(crate) const MAX_BEHIND_REPORTS_PER_BUDGET: usize = 256;
/// The window behind reports are counted over.
pub(crate) const BEHIND_REPORT_WINDOW_MS: u64 = 60_000;
/// Budgets whose behind reports are tracked at once; past it, windows that ended are dropped
/// and a sender not tracked yet counts against the outsiders' allowance.
pub(crate) const MAX_BEHIND_REPORT_BUDGETS: usize = 1_024;

/// Behind reports taken in one window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReportWindow {
    pub started_ms: u64,
    pub taken: usize,
}

/// A promised record's recovery time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct DueRecovery {
    pub due_ms: u64,
    pub message_hash: String,
    pub expiration_ms: u64,
}

impl MemberState {
    /// The first live reservation of another record conflicting with `claims`.
    pub fn conflict(&self, message_hash: &str, claims: &[Claim]) -> Option<(BlockId, String)> {
        for claim in claims {
            for other in self.by_block.get(&claim.block_id).into_iter().flatten() {
                if other == message_hash {
                    continue;
                }
                let Some(live) = self.live.get(other) else { continue };
                if live.claims.iter().any(|c| c.conflicts_with(claim)) {
                    return Some((claim.block_id.clone(), other.clone()));
                }
            }
        }
        None
    }

    pub fn reserve(&mut self, message_hash: &str, live: Live) {
        for claim in &live.claims {
            self.by_block.entry(claim.block_id.clone()).or_default().insert(message_hash.to_owned());
        }
        let (budget, weight) = (live.budget, live.weight);
        if let Some(previous) = self.live.insert(message_hash.to_owned(), live) {
            self.forget(previous.budget, previous.weight);
        }
        self.held = self.held.saturating_add(weight);
        if let Some(budget) = budget {
            let count = self.per_budget.entry(budget).or_default();
            *count = count.saturating_add(weight);
        }
    }

    /// Live reservations counted against `budget` (weighted).
    pub fn reservations_of(&self, budget: &Budget) -> usize {
        self.per_budget.get(budget).copied().unwrap_or(0)
    }

    fn forget(&mut self, budget: Option<Budget>, weight: usize) {
        self.held = self.held.saturating_sub(weight);
        let Some(budget) = budget else { return };
        if let Some(count) = self.per_budget.get_mut(&budget) {
            *count = count.saturating_sub(weight);
            if *count == 0 {
                self.per_budget.remove(&budget);
            }
        }
    }

    /// Counts a stored rejection of `weight` blocks against `budget` and the total, unless that
    /// would pass `per_budget` or `total`; the `busy` detail when it would.
    pub fn take_rejection(
        &mut self,
        budget: Budget,
        weight: usize,
        per_budget: usize,
        total: usize,
    ) -> Result<(), String> {
        if self.rejections_held.saturating_add(weight) > total {
            return Err(format!("{} blocks of rejections stored (max_rejections)", self.rejections_held));
        }
        let of_budget = self.rejections_per_budget.get(&budget).copied().unwrap_or(0);
        if of_budget.saturating_add(weight) > per_budget {
            return Err(format!("{of_budget} blocks of rejections stored for this sender (max_rejections_per_sender)"));
        }
        self.count_rejection(budget, weight);
        Ok(())
    }

    /// Counts a stored rejection without checking the bounds (loading what is stored).
    pub fn count_rejection(&mut self, budget: Budget, weight: usize) {
        self.rejections_held = self.rejections_held.saturating_add(weight);
        let count = self.rejections_per_budget.entry(budget).or_default();
        *count = count.saturating_add(weight);
    }

    /// Gives back what a stored rejection counted for (it was collected, or never written).
    pub fn release_rejection(&mut self, budget: Budget, weight: usize) {
        self.rejections_held = self.rejections_held.saturating_sub(weight);
        if let Some(count) = self.rejections_per_budget.get_mut(&budget) {
            *count = count.saturating_sub(weight);
            if *count == 0 {
                self.rejections_per_budget.remove(&budget);
            }
        }
    }

    /// Takes one behind report from `budget`'s allowance (at `now_ms`): false when its
    /// [`MAX_BEHIND_REPORTS_PER_BUDGET`] reports of the current window are spent.
    pub fn take_behind_report(&mut self, budget: Budget, now_ms: u64) -> bool {
        let ended = |w: &ReportWindow| now_ms.saturating_sub(w.started_ms) >= BEHIND_REPORT_WINDOW_MS;
        let mut budget = budget;
        if !self.behind_reports.contains_key(&budget) && self.behind_reports.len() >= MAX_BEHIND_REPORT_BUDGETS {
            self.behind_reports.retain(|_, w| !ended(w));
            if self.behind_reports.len() >= MAX_BEHIND_REPORT_BUDGETS {
                budget = Budget::Outsiders;
            }
        }
        let window = self.behind_reports.entry(budget).or_insert(ReportWindow { started_ms: now_ms, taken: 0 });
        if ended(window) {
            *window = ReportWindow { started_ms: now_ms, taken: 0 };
        }
        if window.taken >= MAX_BEHIND_REPORTS_PER_BUDGET {
            return false;
        }
        window.taken += 1;
        true
    }

    /// Remembers the peers of an executed record (bounded).
    pub fn remember_peers<'a>(&mut self, peers: impl IntoIterator<Item = &'a String>) {
        for peer in peers {
            if self.seen_peers.len() >= MAX_SEEN_PEERS {
                return;
            }
            self.seen_peers.insert(peer.clone());
        }
    }

    pub fn release(&mut self, message_hash: &str) {
        self.unsaved.remove(message_hash);
        for waiting in self.waiting.values_mut() {
            waiting.remove(message_hash);
        }
        self.waiting.retain(|_, w| !w.is_empty());
        let Some(live) = self.live.remove(message_hash) else { return };
        self.forget(live.budget, live.weight);
        for claim in live.claims {
            if let Some(set) = self.by_block.get_mut(&claim.block_id) {
                set.remove(message_hash);
                if set.is_empty() {
                    self.by_block.remove(&claim.block_id);
                }
            }
        }
    }
}

/// What a verified record asks for.
#[derive(Debug, Clone)]
pub(crate) struct RecordContext {
    /// The operations, in record order (one, or several for a batch).
    pub operations: Vec<RepoOperation>,
    /// The claims of each operation, in the same order.
    pub op_claims: Vec<Vec<Claim>>,
    /// Every claim of the record.
    pub claims: Vec<Claim>,
    pub expiration_ms: u64,
    /// Approving promises needed among the record's peers.
    pub promise_quorum: usize,
}

impl RecordContext {
    /// Whether the record carries several operations (a batch, SPEC 4.14): its reject reasons
    /// and results are per operation.
    pub fn batched(&self) -> bool {
        self.operations.len() > 1
    }

    /// Every block the record names.
    pub fn blocks(&self) -> BTreeSet<&BlockId> {
        self.claims.iter().map(|c| &c.block_id).collect()
    }

    /// How many blocks the record names: what its reservation (or stored rejection) weighs
    /// against the bounds. The operations of a record name disjoint blocks and each operation's
    /// claims are one per block, so this is the number of claims.
    pub fn weight(&self) -> usize {
        self.claims.len()
    }
}

/// A member's per-block locks (see the module documentation). Entries are dropped when no one
/// holds or waits for them, so memory stays bounded by the blocks in use.
#[derive(Debug, Default)]
pub(crate) struct BlockLocks {
    locks: StdMutex<HashMap<BlockId, Arc<Mutex<()>>>>,
}

/// The held locks of a record's blocks; released on drop.
#[derive(Debug)]
pub(crate) struct HeldBlocks<'a> {
    owner: &'a BlockLocks,
    held: Vec<(BlockId, OwnedMutexGuard<()>)>,
}

impl BlockLocks {
    /// Locks `ids` in sorted order (duplicates once).
    pub async fn lock<'a, 'b>(&'a self, ids: impl IntoIterator<Item = &'b BlockId>) -> HeldBlocks<'a> {
        let sorted: BTreeSet<&BlockId> = ids.into_iter().collect();
        let mut held = HeldBlocks { owner: self, held: Vec::with_capacity(sorted.len()) };
        for id in sorted {
            let mutex = {
                let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
                Arc::clone(locks.entry(id.clone()).or_default())
            };
            let guard = mutex.lock_owned().await;
            held.held.push((id.clone(), guard));
        }
        held
    }
}

impl Drop for HeldBlocks<'_> {
    fn drop(&mut self) {
        let mut locks = self.owner.locks.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, guard) in self.held.drain(..) {
            drop(guard);
            // Only the map holds it now: nobody waits, drop the entry.
            if locks.get(&id).is_some_and(|m| Arc::strong_count(m) == 1) {
                locks.remove(&id);
            }
        }
    }
}

/// Background tasks of a node; aborted at shutdown.
#[derive(Debug, Default)]
pub(crate) struct Tasks {
    set: JoinSet<()>,
    closed: bool,
}

/// Everything one node's consensus shares between its requests and background tasks.
#[derive(Debug)]
pub(crate) struct Inner {
    pub config: MajorityConfig,
    pub keypair: Keypair,
    pub me: PeerId,
    pub me_text: String,
    pub network: Arc<dyn PeerNetwork>,
    pub local: StorageRepo,
    pub key_network: Option<Arc<dyn KeyNetwork>>,
    pub clock: Arc<dyn Clock>,
    /// The in-memory index of reservations; never held across an `.await`.
    pub state: StdMutex<MemberState>,
    /// Per-block locks of the member side.
    pub locks: BlockLocks,
    /// The coordinator's queues of operations per peer set (batching, SPEC 4.14).
    pub lanes: Lanes,
    pub live_count: watch::Sender<usize>,
    pub started: OnceCell<()>,
    pub tasks: StdMutex<Tasks>,
    pub recovery_permits: Semaphore,
    /// Wakes the recovery scheduler when a recovery became due earlier than it waits for.
    pub recovery_wake: Notify,
    /// Where this member reports blocks it is behind on.
    pub behind: Option<Arc<dyn BehindSink>>,
}

/// Maps a verification failure to the error a member answers with.
pub(crate) fn refusal(e: RecordError) -> RepoError {
    match e {
        RecordError::Expired { .. } => RepoError::Expired,
        other => RepoError::BadRequest(other.to_string()),
    }
}

impl Inner {
    pub fn storage(&self) -> &dyn RawStorage {
        self.local.storage().as_ref()
    }

    /// The in-memory index of reservations (a short critical section: never held across an
    /// `.await`).
    pub fn state(&self) -> MutexGuard<'_, MemberState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `future` in the background until it ends or the node shuts down; `false` (and nothing
    /// runs) once the node is shutting down.
    pub fn spawn(&self, future: impl Future<Output = ()> + Send + 'static) -> bool {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        if tasks.closed {
            return false;
        }
        while tasks.set.try_join_next().is_some() {}
        tasks.set.spawn(future);
        true
    }

    /// Aborts every background task; no new one starts afterwards.
    pub fn shutdown(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        tasks.closed = true;
        tasks.set.abort_all();
    }

    /// Reports a block this member is behind on to the node, unless another record than
    /// `except` that this member promised holds a reservation on it: its decided copy is most
    /// likely what the block waits for (a commit overtaking the decided copy of its own pend), and
    /// its execution retries the records waiting for the block, so a catch-up now would only ask
    /// the peers for what is on its way. A record decided here but itself waiting does not count
    /// (it waits too); a promise never decided ends by recovery, and later reports go through.
    pub fn report_behind_unless_awaited(&self, block_id: &BlockId, except: &str) {
        let awaited = {
            let state = self.state();
            state.by_block.get(block_id).is_some_and(|holders| {
                holders
                    .iter()
                    .any(|h| h != except && state.live.get(h).is_some_and(|l| l.status == RecordStatus::Promised))
            })
        };
        if !awaited {
            self.report_behind(block_id);
        }
    }

    /// Reports a block this member is behind on to the node (which catches it up).
    pub fn report_behind(&self, block_id: &BlockId) {
        tracing::debug!(%block_id, "behind on a block; asking for catch-up");
        if let Some(sink) = &self.behind {
            sink.behind(block_id);
        }
    }

    /// SPEC 4.11: a phase-1 record may name only peers this node has seen (its key network's
    /// view, configured members, or peers of records it executed).
    pub async fn check_peers_seen(&self, record: &ClusterRecord) -> Result<(), RepoError> {
        let Some(key_network) = &self.key_network else { return Ok(()) };
        let unknown: Vec<&String> = {
            let state = self.state();
            record.peers.keys().filter(|p| **p != self.me_text && !state.seen_peers.contains(*p)).collect()
        };
        for peer in unknown {
            let seen = match peer.parse::<PeerId>() {
                Ok(id) => key_network.has_seen(&id).await,
                Err(_) => false,
            };
            if !seen {
                let shown: String = peer.chars().take(64).collect();
                return Err(RepoError::BadRequest(format!(
                    "refused: the record's peer set names {shown}, a peer this member has never seen"
                )));
            }
        }
        Ok(())
    }

    /// Publishes the number of live reservations (after the state changed).
    pub fn publish(&self, state: &MemberState) {
        self.live_count.send_replace(state.live.len());
    }

    /// Parses what a record asks for: one operation, or several on pairwise disjoint blocks (a
    /// batch, SPEC 4.14, at most [`optimystic_core::wire::MAX_RECORD_OPERATIONS`]), each naming
    /// at least one block and none a `get`. `check_lifetime` refuses records expiring further
    /// ahead than this node would ever issue (updates; status queries skip it).
    pub fn context(
        &self,
        record: &ClusterRecord,
        now_ms: u64,
        check_lifetime: bool,
    ) -> Result<RecordContext, RepoError> {
        if !record.peers.contains_key(&self.me_text) {
            return Err(RepoError::BadRequest(format!(
                "membership: this member ({}) is not in the record's peer set",
                self.me_text
            )));
        }
        let message = RecordMessage::from_value(&record.message)?;
        let expiration_ms = message.expiration;
        let horizon = now_ms.saturating_add(self.config.record_timeout_ms).saturating_add(self.config.grace_ms);
        if check_lifetime && expiration_ms > horizon {
            return Err(RepoError::BadRequest(format!(
                "the record expires at {expiration_ms} ms, more than record_timeout_ms + grace_ms ahead"
            )));
        }
        let mut op_claims = Vec::with_capacity(message.operations.len());
        let mut named: BTreeMap<BlockId, usize> = BTreeMap::new();
        for (index, operation) in message.operations.iter().enumerate() {
            if matches!(operation, RepoOperation::Get(_)) {
                return Err(RepoError::BadRequest("a get is not agreed by consensus".into()));
            }
            let op = claims(operation);
            if op.is_empty() {
                return Err(RepoError::BadRequest(format!("operation {index} of the record names no block")));
            }
            for claim in &op {
                if let Some(first) = named.insert(claim.block_id.clone(), index) {
                    return Err(RepoError::BadRequest(format!(
                        "operations {first} and {index} of the record both name block {}: a batch's blocks are disjoint",
                        claim.block_id
                    )));
                }
            }
            op_claims.push(op);
        }
        let claims = op_claims.iter().flatten().cloned().collect();
        let promise_quorum = self.config.promise_threshold.promise_quorum(record.peers.len());
        Ok(RecordContext { operations: message.operations, op_claims, claims, expiration_ms, promise_quorum })
    }

    /// Refuses a record naming more than `max_record_blocks` blocks, before any cluster lookup
    /// or storage read is done for it (SPEC 4.10: the work before a bound is checked is bounded).
    pub fn check_record_size(&self, cx: &RecordContext) -> Result<(), RepoError> {
        let named = cx.weight();
        if named > self.config.max_record_blocks {
            return Err(RepoError::BadRequest(format!(
                "the record names {named} blocks; a member takes records of at most {} (max_record_blocks)",
                self.config.max_record_blocks
            )));
        }
        Ok(())
    }

    /// Refuses a phase-1 record from `sender` early, before the cluster lookups of
    /// [`Inner::check_view`], when it cannot be reserved whatever they find: answers `busy` (no
    /// vote is cast, so nothing is stored) when the record would overrun the total bound, or
    /// both the sender's own budget and the shared one of outsiders (which of the two applies is
    /// only known after the lookups). A record already holding a reservation here passes (its
    /// re-delivery).
    pub fn precheck_budget(&self, hash: &str, cx: &RecordContext, sender: &PeerId) -> Result<(), RepoError> {
        let state = self.state();
        if state.live.contains_key(hash) {
            return Ok(());
        }
        let weight = cx.weight();
        if state.held.saturating_add(weight) > self.config.max_reservations {
            return Err(RepoError::Busy(format!("{} blocks reserved (max_reservations)", state.held)));
        }
        let own = state.reservations_of(&Budget::Sender(*sender));
        let outsiders = state.reservations_of(&Budget::Outsiders);
        if own.saturating_add(weight) > self.config.max_reservations_per_sender
            && outsiders.saturating_add(weight) > self.config.max_reservations_outsiders
        {
            return Err(RepoError::Busy(format!(
                "{own} blocks reserved for records from {sender} and {outsiders} for senders outside the cluster"
            )));
        }
        Ok(())
    }

    /// Membership against this member's own view of each block's cluster (when it has a key
    /// network): the record's peer set must cover a promise quorum of the view and, when
    /// `approvals_too`, the approving promises must include a promise quorum of it. Otherwise a
    /// coordinator with a shrunken peer set could decide a record with fewer peers than the
    /// cluster's quorum. Does one cluster lookup per block the record names (the caller bounds
    /// them first, [`Inner::check_record_size`]).
    ///
    /// Returns whether `sender` is in the view of every block the record names (always true
    /// without a key network, false for no sender): which budget its record counts against
    /// ([`Budget`]).
    pub async fn check_view(
        &self,
        record: &ClusterRecord,
        cx: &RecordContext,
        approvals_too: bool,
        sender: Option<&PeerId>,
    ) -> Result<bool, RepoError> {
        let Some(key_network) = &self.key_network else { return Ok(true) };
        let mut sender_in_view = sender.is_some();
        for block_id in cx.blocks() {
            let view = key_network
                .find_cluster(block_id)
                .await
                .map_err(|e| RepoError::Unavailable(format!("cluster of {block_id}: {e}")))?;
            sender_in_view &= sender.is_some_and(|s| view.contains_key(s));
            let needed = self.config.promise_threshold.promise_quorum(view.len());
            let covered = view.keys().filter(|p| record.peers.contains_key(&crypto::peer_text(p))).count();
            if covered < needed {
                return Err(RepoError::BadRequest(format!(
                    "membership: the record's peer set covers {covered} of the {} peers this member sees for block \
                     {block_id}; {needed} needed",
                    view.len()
                )));
            }
            if approvals_too {
                let approving = view
                    .keys()
                    .filter(|p| record.promises.get(&crypto::peer_text(p)).is_some_and(|v| v.is_approve()))
                    .count();
                if approving < needed {
                    return Err(RepoError::BadRequest(format!(
                        "membership: {approving} of the {} peers this member sees for block {block_id} approved; \
                         {needed} needed",
                        view.len()
                    )));
                }
            }
        }
        Ok(sender_in_view)
    }
}

//! Majority two-phase commit with Ed25519-signed votes (SPEC section 4), registered as
//! `consensus majority-2pc`.
//!
//! # Coordinator side ([`Consensus::execute`])
//! 1. Builds a [`ClusterRecord`] for the message among the block group's peers. The message's
//!    expiration is capped at now + `record_timeout_ms`: every record expires. Operations for
//!    one peer set are batched (SPEC 4.14): one that finds no record of its peer set in flight
//!    goes out at once, alone (its record is exactly the repo message, as without batching);
//!    those arriving meanwhile go out together in the next record, on pairwise disjoint blocks,
//!    at most `max_batch_ops` of them (see the `coordinate` module documentation).
//! 2. Phase 1: this node votes first through the local path (no message to itself), then every
//!    other peer is asked in parallel; it stops waiting once the promise quorum is reached or out
//!    of reach. Only each peer's own vote, verified against the Ed25519 key in its peer id, counts.
//! 3. Quorum reached: the decided record (the record with the promises) is applied locally (when
//!    this node is a member) and sent to every other peer; a peer that does not answer gets it
//!    again after 250 ms, doubling, capped, `retry_attempts` times (configurable), never past the
//!    record's expiration. The client's answer comes from a commit quorum (SPEC 4.4): success
//!    once `commit_threshold` members gave an approving commit vote with a success result
//!    (`success` compared, a cancel's `null` is its success; the pends' advisory `pending` lists
//!    merged). The `"result"` next to a vote is unsigned: one member's result never decides the
//!    answer, and an approving vote whose result is not a success is ignored (logged). Without
//!    such a quorum in time the answer is `unavailable` (outcome unknown: the client retries the
//!    same trx; members settle the record through recovery). Once a commit quorum formed, the
//!    final record (the decided record with every commit vote collected, each verified) goes to
//!    every peer in the background, after the answers still on their way (at most
//!    `request_timeout_ms` more), with the same bounded re-sends; members merge the votes into
//!    the copy they keep for evidence. One message per other peer and record; an old member
//!    takes it as a re-delivery of the decided record.
//! 4. Quorum not reached: if the rejections prove it out of reach, the record with those
//!    rejections is sent to every peer, which frees their reservations at once. The client gets a
//!    `StaleFailure` when a member rejected as stale (the member's computed `StaleFailure` travels
//!    in the `"result"` field of its answer), `bad-request` when every rejection says the
//!    operation is invalid, `consensus-failed` otherwise. Nothing was applied anywhere: a record
//!    is decided only by a coordinator that assembled a promise quorum and sent it. For a batch
//!    each operation gets its own outcome from the rejections naming it, and the operations no
//!    member named run again in a new record when nothing of the failed one stays reserved.
//!    This node's own member drops a promise that never left the node when the coordinator gives
//!    its record up (no decided copy can ever count that vote).
//!
//! # Member side ([`Consensus::on_update`], [`MajorityConsensus::handle_cluster_request`])
//! - Every record is verified (digest, hash, keys against peer ids, every vote signature) and
//!   refused when expired, when this node is not in its peer set, when it expires further ahead
//!   than `record_timeout_ms + grace_ms`, or (with a key network) when its peer set covers less
//!   than a quorum of this node's own view of a block's cluster, or a decided record's approvals
//!   do not include such a quorum (a shrunken peer set cannot decide anything).
//! - Phase 1: at most one live reservation per block (a pend and the commit or cancel of the same
//!   transaction do not conflict, nor two commits of one transaction at one revision); the
//!   operation is checked against local storage without applying it; a member that is behind
//!   (unknown block, pend not found) or stale votes reject with a reason. The vote and the
//!   reservation are persisted before the vote is returned. Votes are final: a re-delivery gets
//!   the stored vote. A batch (at most [`optimystic_core::wire::MAX_RECORD_OPERATIONS`]
//!   operations, blocks pairwise disjoint, else refused) is approved only when every operation
//!   passes, else rejected with `batch: [[index, "category: detail"], ...]` listing each failing
//!   one ([`optimystic_core::BatchFailure`]), each stale one's `StaleFailure` at its index of the
//!   `"result"` array. A batch holds one reservation per operation against the bounds.
//! - Phase 2: a record carrying a verified promise quorum is applied exactly once, as one storage
//!   step ([`optimystic_core::RawStorage::apply`], SPEC 4.14): the operations' writes, the
//!   record kept for evidence and the executed marker (result and commit vote, keyed by
//!   messageHash) together. On an engine with atomic steps (memory, LMDB) that is one transaction
//!   and one sync, and a crash leaves the record executed or not applied at all; a step that fails
//!   changes nothing and the record is persisted as decided, for recovery. On other engines (the
//!   file engine) the decided copy is persisted first and the marker last: a crash in between
//!   re-executes the record at restart, which the repository makes a no-op for what was applied.
//!   A re-delivery gets the stored commit vote and result. The
//!   member keeps the decided pend and commit records as each revision's evidence (SPEC 4.10),
//!   one copy per record however many revisions it proves. A member lacking the base (revision
//!   r - 1, or the pending trx) applies nothing and signs no commit vote: it reports the block
//!   behind ([`optimystic_core::consensus::BehindSink`]) and runs the record once catch-up (or the
//!   execution of the record it waited for) brought the block forward (SPEC 4.6). Only an
//!   operation applied here gets an approving commit vote; a stale result is signed as a reject.
//!   A decided batch stages its operations (disjoint blocks) under the locks of all its blocks,
//!   nothing while one lacks its base; the executed marker keeps the array of their results in
//!   record order, and the commit vote rejects (`batch:`) naming those that did not apply. On
//!   LMDB concurrent steps of different records share group commits
//!   (`optimystic_core::kv::group`).
//! - Commit votes after execution (SPEC 4.4; the `votes` module): the kept copy of a decided
//!   record gains every verified commit vote the member learns (its own at execution, others'
//!   from the final record and from gossip), never losing one. A member that executes a record
//!   sends its vote to the record's other peers once (not to the peer that handed it the
//!   record, nor from the coordinator's own member), and merges the votes their answers carry.
//! - Write-path custody (SPEC 4.20): a commit at revision r of a block this member holds at r - 1
//!   with evidence is promised only when the record's peer set holds a majority of P(r-1) (the
//!   peer set of the commit record that fixed r - 1 here). It is not checked again at execution:
//!   members whose evidence of r - 1 differs would split on a decided record. With no evidence
//!   of r - 1 here (r = 1, solo-written or pre-evidence data) the other rules
//!   alone apply. A coordinator that knows P(r-1) keeps collecting promises past the first quorum
//!   until the approvals hold such a majority (or no answer is left).
//! - Bounds (SPEC 4.11-4.13): phase-1 records naming a peer this node never saw are refused;
//!   records naming more than `max_record_blocks` blocks are refused before any lookup;
//!   reservations are bounded in blocks, in total, per sender in the member's view and for all
//!   other senders together; a rejection stores no history; a "not
//!   executed" status answer is final (persisted, under the locks executions take); two pends of
//!   one trx with different transforms conflict, and a cancelled trx cannot be pended again
//!   (tombstones); thresholds below a majority are configuration errors.
//! - Recovery (SPEC 4.5): see the `recovery` module documentation; status queries use the extra
//!   request shape `{"operation": "status", "record": ClusterRecord}`. A "not executed" or
//!   "aborted" answer carries the member's signed renounce ([`RENOUNCE_FIELD`], over
//!   `renounce:` + messageHash); past `recovery_bound_ms`, renounces from a majority of a
//!   record's peer set release its reservation. A peer that signed a renounce and an approving
//!   commit vote for one record is proven faulty ([`MajorityConsensus::is_faulty`]): its
//!   signatures count for nothing here afterwards.
//! - A pend never applies on a block after a cancel of its trx executed there, whatever brings
//!   it (phase 1, a late decided copy, recovery): the tombstone is checked at execution too.
//!
//! # Storage
//! State lives in the storage's metadata space under `2pc/` (see the `store` module): durable
//! exactly as the storage is. On memory storage a restarted node has forgotten its promises and
//! executed markers; it must rejoin under a new identity (the node refuses to restart a
//! memory-backed identity). Resolved markers are kept `marker_retention_ms` past their record's
//! expiration, then collected.
//!
//! # Configuration (`[consensus]`, `kind = "majority-2pc"`; durations in ms)
//! | Key | Default | Meaning |
//! |---|---|---|
//! | `promise_threshold`, `commit_threshold` | `majority` | `"majority"`, a count, or a fraction in (0.5, 1]; never below a majority |
//! | `record_timeout_ms` | 10000 | longest lifetime of a record |
//! | `request_timeout_ms` | 2000 | one cluster request |
//! | `grace_ms` | 2000 | wait past expiration before recovery asks the peers (above the allowed clock skew) |
//! | `retry_attempts`, `retry_base_ms`, `retry_max_ms` | 5, 250, 4000 | re-sends of the decided record |
//! | `recovery_backoff_max_ms` | 30000 | cap of the delay between recovery rounds |
//! | `recovery_bound_ms` | 600000 (10 min) | past a record's expiration, recovery drops a reservation on signed renounces from a majority of its peer set (`grace_ms`..=`marker_retention_ms`) |
//! | `max_reservations`, `max_reservations_per_sender` | 10000, 2500 | blocks held by live reservations (a record counts each block it names) in total and per sender in the member's view of the blocks' cluster |
//! | `max_reservations_outsiders` | 2500 | blocks held by live reservations for every sender outside that view together (SPEC 4.20 "Sybil senders") |
//! | `max_record_blocks` | 1024 | most blocks one record names; larger records are refused before any lookup; at most `max_reservations` and `max_rejections` |
//! | `max_rejections`, `max_rejections_per_sender` | 10000, 2500 | blocks of stored rejections in total and per budget (as reservations: one per sender in the view, one shared by outsiders); past them a member answers `busy` without voting |
//! | `max_recovery_queries_in_flight` | 64 | status queries at once |
//! | `marker_retention_ms` | 7 days | how long resolved markers are kept past expiration |
//! | `max_batch_ops` | 64 | most operations per record (1..=1024; 1 disables batching: every operation runs its own record at once); at most `max_reservations_per_sender` and `max_record_blocks` |
//! | `max_batch_bytes` | 262144 (256 KiB) | most bytes of operations (JSON) per batched record, 1 KiB..=256 MiB; keep it well under `limits.max_cluster_frame_bytes` (1 MiB): answers carry votes and per-operation results |
//! | `max_records_in_flight` | 1 | records of one peer set in flight at once while batching (1..=1024); more shortens waits but shrinks batches, which costs CPU per operation |
//!
//! # Locking
//! A member's decisions and executions serialize per block (the record's blocks' locks, taken in
//! sorted order), not per node: records on disjoint blocks vote and execute in parallel. See the
//! `engine` module documentation.
//!
//! # Limits and known gaps
//! - Every node of a cluster must run the same thresholds: a member judges "decided" by its own
//!   configuration.
//! - A batch is decided or aborted as a whole. With a member unreachable, an operation another
//!   member rejects fails the operations that shared its record (retryably, `consensus-failed`)
//!   unless nothing of the record stays reserved.
//! - A member that rejected a record, or never saw it, and missed its decided copy stays behind
//!   for that record: it votes reject (`behind: ...`) on what depends on it until verified
//!   catch-up (the sync protocol, driven by the node through the `BehindSink`) brings it up to
//!   date.
//! - Under churn, members judge membership by their own view; two concurrent inserts of one new
//!   block id under divergent views remain the risk documented for the project (SPEC 4.9).

mod checks;
mod config;
mod coordinate;
mod engine;
mod faulty;
mod member;
mod recovery;
mod store;
mod votes;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex as StdMutex};

use async_trait::async_trait;
use optimystic_core::consensus::{
    BehindSink, Clock, Consensus, UPDATE_OPERATION, split_request, system_clock, take_record,
};
use optimystic_core::identity::{Keypair, PeerId};
use optimystic_core::keynet::{ClusterPeers, KeyNetwork};
use optimystic_core::network::PeerNetwork;
use optimystic_core::record::ClusterRecord;
use optimystic_core::registry::{ConsensusContext, PluginDescriptor, PluginError};
use optimystic_core::wire::{RepoMessage, RepoResponse};
use optimystic_core::{BlockId, RepoError, StorageRepo};
use serde_json::Value;
use tokio::sync::{OnceCell, Semaphore, watch};

use crate::member::Origin;

pub use config::{MajorityConfig, Threshold};
pub use engine::RESULT_FIELD;
pub use faulty::{MAX_FAULTY_PEERS, RENOUNCE_FIELD, renounce_payload, sign_renounce, verify_renounce};
pub use member::STATUS_OPERATION;
pub use store::RecordStatus;

use crate::config::PLUGIN;
use crate::coordinate::Lanes;
use crate::engine::{BlockLocks, Inner, MemberState, Tasks};

/// What a [`MajorityConsensus`] is built from.
#[derive(Debug, Clone)]
pub struct MajorityDeps {
    /// The node's Ed25519 identity: signs votes; its peer id must be the network's.
    pub keypair: Keypair,
    /// The transport to the other peers.
    pub network: Arc<dyn PeerNetwork>,
    /// The local repository: where decided operations are applied and whose storage's metadata
    /// space keeps votes, reservations and markers.
    pub local: StorageRepo,
    /// This node's view of block clusters, for the membership checks; `None` skips them.
    pub key_network: Option<Arc<dyn KeyNetwork>>,
    /// The wall clock record expirations are judged by.
    pub clock: Arc<dyn Clock>,
    /// Where this member reports blocks it is behind on (the node catches them up and calls
    /// [`Consensus::caught_up`]); `None` leaves catching up to someone else.
    pub behind: Option<Arc<dyn BehindSink>>,
}

/// The majority two-phase commit of one node: coordinator and member. Dropping it (or
/// [`Consensus::shutdown`]) stops its background work; persisted state stays, and a consensus
/// built again over the same storage resumes from it.
#[derive(Debug)]
pub struct MajorityConsensus {
    inner: Arc<Inner>,
}

impl MajorityConsensus {
    /// A consensus over `deps` with `config`. Fails with [`PluginError::Config`] when the
    /// configuration is inconsistent, the key pair is not Ed25519, or the key pair's peer id is not
    /// the network's local peer id. Nothing is read or spawned until first use or
    /// [`Consensus::start`].
    pub fn new(config: MajorityConfig, deps: MajorityDeps) -> Result<Self, PluginError> {
        config.validate()?;
        if deps.keypair.clone().try_into_ed25519().is_err() {
            return Err(PluginError::Config { plugin: PLUGIN.into(), message: "the node key must be Ed25519".into() });
        }
        let me = deps.keypair.public().to_peer_id();
        if deps.network.local_peer_id() != me {
            return Err(PluginError::Config {
                plugin: PLUGIN.into(),
                message: format!("the key pair's peer id {me} is not the network's {}", deps.network.local_peer_id()),
            });
        }
        let permits = config.max_recovery_queries_in_flight;
        let inner = Inner {
            config,
            keypair: deps.keypair,
            me,
            me_text: me.to_base58(),
            network: deps.network,
            local: deps.local,
            key_network: deps.key_network,
            clock: deps.clock,
            state: StdMutex::new(MemberState::default()),
            locks: BlockLocks::default(),
            lanes: Lanes::default(),
            live_count: watch::Sender::new(0),
            started: OnceCell::new(),
            tasks: StdMutex::new(Tasks::default()),
            recovery_permits: Semaphore::new(permits),
            recovery_wake: tokio::sync::Notify::new(),
            behind: deps.behind,
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The configuration in force.
    pub fn config(&self) -> &MajorityConfig {
        &self.inner.config
    }

    /// Answers one cluster-protocol request: `{"operation": "update", "record": ...}` with this
    /// member's merged record (as [`Consensus::on_update`]), `{"operation": "status", "record": ...}`
    /// with `{"messageHash", "status", "record"?, "renounce"?}` where status is `executed` or
    /// `decided` (with the decided copy), `aborted`, `not-executed` (past expiration here, so it
    /// never will be unless another peer executed it; both with this member's signed renounce,
    /// [`RENOUNCE_FIELD`]) or `pending`. Errors are sent as the error envelope.
    pub async fn handle_cluster_request(&self, sender: PeerId, request: Value) -> Result<Value, RepoError> {
        let (operation, mut fields) = split_request(request)?;
        let record = take_record(&mut fields)?;
        match operation.as_str() {
            UPDATE_OPERATION => Ok(self.inner.update(record, Origin::Remote(sender)).await?.into_value()),
            STATUS_OPERATION => self.inner.status(record).await,
            other => {
                let shown: String = other.chars().take(64).collect();
                Err(RepoError::BadRequest(format!("unknown cluster operation {shown:?}")))
            }
        }
    }

    /// This member's status for `record` (`None` if it never voted on or executed it).
    pub async fn status_of(&self, record: &ClusterRecord) -> Result<Option<RecordStatus>, RepoError> {
        self.inner.status_of(record).await
    }

    /// Whether `peer` is proven faulty here (SPEC 4.5: it signed a renounce and an approving
    /// commit vote for one record): this member counts none of its signatures. Evidence checks
    /// outside this plugin should ask this too.
    pub fn is_faulty(&self, peer: &PeerId) -> bool {
        self.inner.is_faulty(peer)
    }

    /// The peers proven faulty here (at most [`MAX_FAULTY_PEERS`]), as peer id texts.
    pub fn faulty_peers(&self) -> BTreeSet<String> {
        self.inner.state().faulty.clone()
    }

    /// How many live reservations this member holds.
    pub fn live_reservations(&self) -> usize {
        *self.inner.live_count.borrow()
    }

    /// Waits until this member holds no live reservation (every record it promised was executed or
    /// aborted).
    pub async fn wait_idle(&self) {
        let mut watch = self.inner.live_count.subscribe();
        // The sender lives as long as `self`: waiting cannot fail while we hold it.
        let _ = watch.wait_for(|count| *count == 0).await;
    }

    /// The blocks this member holds live reservations on.
    pub async fn reserved_blocks(&self) -> BTreeSet<BlockId> {
        self.inner.state().by_block.keys().cloned().collect()
    }

    /// Deletes resolved markers older than `marker_retention_ms` past their expiration, one batch;
    /// returns whether a full batch was deleted (more may remain). Runs by itself every minute
    /// once started.
    pub async fn collect_garbage(&self) -> Result<bool, RepoError> {
        self.inner.collect_garbage_once().await
    }
}

impl Drop for MajorityConsensus {
    fn drop(&mut self) {
        self.inner.shutdown();
    }
}

#[async_trait]
impl Consensus for MajorityConsensus {
    async fn execute(&self, peers: &ClusterPeers, message: &RepoMessage) -> Result<RepoResponse, RepoError> {
        self.inner.coordinate(peers, message).await
    }

    async fn on_update(&self, sender: PeerId, record: ClusterRecord) -> Result<ClusterRecord, RepoError> {
        self.inner.update(record, Origin::Remote(sender)).await
    }

    async fn handle_request(&self, sender: PeerId, request: Value) -> Result<Value, RepoError> {
        self.handle_cluster_request(sender, request).await
    }

    async fn caught_up(&self, block_id: &BlockId) {
        self.inner.retry_waiting(block_id).await;
    }

    async fn start(&self) -> Result<(), RepoError> {
        self.inner.ensure_started().await
    }

    fn shutdown(&self) {
        self.inner.shutdown();
    }
}

fn build(cx: &ConsensusContext, config: &Value) -> Result<Arc<dyn Consensus>, PluginError> {
    let config = MajorityConfig::from_value(config)?;
    let cluster_size = cx.key_network.cluster_size();
    config.promise_threshold.check_cluster_size("promise_threshold", cluster_size)?;
    config.commit_threshold.check_cluster_size("commit_threshold", cluster_size)?;
    let deps = MajorityDeps {
        keypair: cx.keypair.clone(),
        network: cx.network.clone(),
        local: cx.local_repo.clone(),
        key_network: Some(cx.key_network.clone()),
        clock: system_clock(),
        behind: Some(cx.behind.clone()),
    };
    Ok(Arc::new(MajorityConsensus::new(config, deps)?))
}

optimystic_core::inventory::submit! {
    PluginDescriptor::consensus(
        "majority-2pc",
        "majority two-phase commit with Ed25519-signed votes among each block's cluster",
        build,
    )
    .with_defaults(config::defaults)
    .with_check(|section| MajorityConfig::from_value(section).map(drop))
}

#[cfg(test)]
mod tests;

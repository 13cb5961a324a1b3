//! Fault simulations of the majority two-phase commit, each checking SPEC section 5 with the
//! history checker of `optimystic_testkit::history`.
//!
//! Every scenario runs on the simulated network of `optimystic_testkit::sim`, on a
//! current-thread tokio runtime with paused time (timeouts cost no wall time), once per seed.
//! Each simulated node is composed as the real node composes itself: the consensus reports the
//! blocks it is behind on to a catch-up sink (`SimCatchUp`: verified catch-up, then
//! `Consensus::caught_up`), the node serves the cluster and sync protocols (`NodeHandler`), reads
//! go through `ClusterReads` over a repository that never writes on a read, and a (re)started node
//! catches every stored block up. Every scenario ends in `World::check`: faults stop, crashed nodes
//! restart, catch-up runs until nothing moves, and the history is checked against every node's
//! storage, SPEC 5.7 convergence and reads included.
//!
//! - `OPTIMYSTIC_SIM_SEEDS=<n>`: seeds per scenario (default 30; run 1,000 or more locally, in
//!   `--release`).
//! - `OPTIMYSTIC_SIM_SEED_BASE=<n>`: first seed (default: random, printed on failure).
//! - `OPTIMYSTIC_SIM_SEED=<n>`: run only this seed (replays a failure).
//! - `OPTIMYSTIC_SIM_KEEP_GOING=1`: run every seed and list the failing ones at the end.
//! - `OPTIMYSTIC_SIM_WALL_SECS=<n>`: wall time one seed may take before it counts as spinning
//!   (a busy loop that never lets virtual time advance; default 120).
//! - `OPTIMYSTIC_SIM_TRACE=1`: print every message of the simulated network and every behind
//!   report / catch-up, with its virtual time (use with one seed).
//! - `OPTIMYSTIC_SIM_NO_CATCH_UP=1`: nodes without catch-up (to study the consensus alone).
//!
//! A failure names its scenario and seed and prints the command that replays it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use optimystic_consensus_majority_2pc::{MajorityConfig, MajorityConsensus, MajorityDeps, RecordStatus};
use optimystic_core::consensus::{Consensus, update_request};
use optimystic_core::coordinator::{CoordinatorConfig, CoordinatorRepo};
use optimystic_core::crypto;
use optimystic_core::identity::{Keypair, PeerId};
use optimystic_core::keynet::{ClusterPeers, KeyNetwork, KeyNetworkError, PeerInfo, block_key, rank_peers};
use optimystic_core::kv::MemoryStorage;
use optimystic_core::model::{
    BlockGets, BlockOperation, CommitRequest, CommitResult, PendPolicy, PendRequest, PendResult, TrxBlocks, TrxContext,
};
use optimystic_core::network::{NetworkError, PeerNetwork, ProtocolKind};
use optimystic_core::reads::{ClusterReads, ReadMode};
use optimystic_core::record::{ClusterPeer, ClusterRecord, VoteType};
use optimystic_core::storage::{BlockCommit, BlockValue, CommittedTransform, MetaWrite, StorageWrite};
use optimystic_core::sync::SyncServer;
use optimystic_core::wire::{RepoMessage, RepoOperation};
use optimystic_core::{
    Block, BlockId, ErrorCode, MessageOptions, RawStorage, ReadPromotion, Repo, RepoError, StorageError, StorageRepo,
    Transform, Transforms, TrxId, TrxRev,
};
use optimystic_testkit::history::{ClientOp, History, NodeSnapshot, ReadRecord, check_evidence, snapshot};
use optimystic_testkit::sim::{Direction, Envelope, NodeHandler, SimCatchUp, SimConfig, SimHandler, SimNet, Verdict};
use rand::Rng;
use serde_json::{Value, json};
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// Seeds and the runner
// ---------------------------------------------------------------------------------------------

const DEFAULT_SEEDS: u64 = 30;
/// Virtual time one seed may take before it counts as hung.
const VIRTUAL_BUDGET: Duration = Duration::from_secs(3_600);
/// Virtual time the cluster gets to free every reservation once faults stop.
const SETTLE_BUDGET: Duration = Duration::from_secs(600);
/// Most writes a chaos scenario issues while waiting for its faults to play out.
const MAX_CHAOS_WRITES: usize = 60;
/// Catch-up rounds quiescence may take (each round catches every block up on every node).
const MAX_QUIESCE_ROUNDS: usize = 8;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{name} must be an integer, got {v:?}")))
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = env_u64("OPTIMYSTIC_SIM_SEED") {
        return vec![seed];
    }
    let count = env_u64("OPTIMYSTIC_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let base = env_u64("OPTIMYSTIC_SIM_SEED_BASE").unwrap_or_else(|| rand::thread_rng().gen_range(0..1_000_000_000));
    (0..count).map(|i| base.wrapping_add(i)).collect()
}

/// Whether nodes run without catch-up (`OPTIMYSTIC_SIM_NO_CATCH_UP=1`, to study the consensus
/// alone).
fn no_catch_up() -> bool {
    std::env::var("OPTIMYSTIC_SIM_NO_CATCH_UP").is_ok_and(|v| !v.is_empty() && v != "0")
}

type Scenario = fn(u64) -> Pin<Box<dyn Future<Output = String> + Send>>;

/// Runs one seed of a scenario on a fresh paused-time runtime; returns its trace.
fn run_seed(scenario: Scenario, seed: u64) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    runtime.block_on(async move {
        tokio::time::timeout(VIRTUAL_BUDGET, scenario(seed))
            .await
            .expect("the scenario did not finish in its virtual time budget")
    })
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

/// Runs one seed in its own thread, so that a run that spins without advancing virtual time (a
/// busy loop in the code under test) is reported after `wall` of real time instead of hanging the
/// test. A spinning thread is left behind (it ends with the process).
fn run_guarded(scenario: Scenario, seed: u64, wall: Duration) -> Result<String, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("seed-{seed}"))
        .spawn(move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run_seed(scenario, seed)));
            let _ = tx.send(outcome.map_err(|panic| panic_message(panic.as_ref())));
        })
        .expect("cannot spawn a seed's thread");
    match rx.recv_timeout(wall) {
        Ok(outcome) => outcome,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "no result after {wall:?} of wall time: the run spins without advancing virtual time (a busy loop)"
        )),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err("the seed's thread died".into()),
    }
}

/// Runs every seed of a scenario. A failure names the seed and the command that replays it. With
/// `OPTIMYSTIC_SIM_KEEP_GOING=1` every seed runs and the failing ones are listed at the end;
/// `OPTIMYSTIC_SIM_WALL_SECS` bounds one seed's wall time (default 120). Returns how many seeds
/// kept batched records (records of several operations, SPEC 4.14).
fn run(name: &str, scenario: Scenario) -> usize {
    let seeds = seeds();
    let keep_going = std::env::var("OPTIMYSTIC_SIM_KEEP_GOING").is_ok_and(|v| !v.is_empty() && v != "0");
    let wall = Duration::from_secs(env_u64("OPTIMYSTIC_SIM_WALL_SECS").unwrap_or(120));
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    let (mut batched_seeds, mut batched_records) = (0usize, 0usize);
    for seed in &seeds {
        match run_guarded(scenario, *seed, wall) {
            Ok(trace) => {
                let batched = trace
                    .lines()
                    .find_map(|l| l.strip_prefix(BATCHED))
                    .and_then(|n| n.split_whitespace().next())
                    .and_then(|n| n.parse::<usize>().ok());
                batched_records += batched.unwrap_or(0);
                batched_seeds += usize::from(batched.unwrap_or(0) > 0);
            }
            Err(message) => {
                let report = format!(
                    "scenario {name} failed with seed {seed}: {message}\n  replay: OPTIMYSTIC_SIM_SEED={seed} cargo test \
                     -p optimystic-consensus-majority-2pc --test simulation {name}"
                );
                if !keep_going {
                    panic!("{report}");
                }
                eprintln!("{report}");
                let first_line: String = message.lines().next().unwrap_or_default().chars().take(300).collect();
                failures.push(format!("seed {seed}: {first_line}"));
            }
        }
    }
    eprintln!(
        "{name}: {} seeds from {:?}: {} passed, {} failed, in {:?}; {batched_records} batched records in {batched_seeds} seeds",
        seeds.len(),
        seeds.first(),
        seeds.len() - failures.len(),
        failures.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "scenario {name} failed with {} seeds:\n{}", failures.len(), failures.join("\n"));
    batched_seeds
}

/// [`run`] for a scenario with concurrent writers on several blocks: batches must have formed
/// (in at least one seed; a single seed may, by its timing, never queue two operations at once).
fn run_batched(name: &str, scenario: Scenario) {
    let batched_seeds = run(name, scenario);
    assert!(batched_seeds > 0, "scenario {name}: no seed kept a record of several operations: batching never happened");
}

// ---------------------------------------------------------------------------------------------
// The simulated cluster
// ---------------------------------------------------------------------------------------------

/// Memory storage that claims durability: its state outlives a simulated crash (the same
/// `MemoryStorage` is handed to the restarted node), as a disk would. With `atomic`, storage
/// steps and metadata batches are all-or-nothing (as on LMDB); without, they are applied one
/// write at a time, so a crash can cut them (as on the file engine).
#[derive(Debug, Clone)]
struct DurableMemory {
    store: MemoryStorage,
    atomic: bool,
}

#[async_trait]
impl RawStorage for DurableMemory {
    async fn latest(&self, b: &BlockId) -> Result<Option<TrxRev>, StorageError> {
        self.store.latest(b).await
    }
    async fn revisions(&self, b: &BlockId, from: u64, to: u64) -> Result<Vec<TrxRev>, StorageError> {
        self.store.revisions(b, from, to).await
    }
    async fn revision_at_or_before(&self, b: &BlockId, at: u64) -> Result<Option<TrxRev>, StorageError> {
        self.store.revision_at_or_before(b, at).await
    }
    async fn committed(&self, b: &BlockId, t: &TrxId) -> Result<Option<CommittedTransform>, StorageError> {
        self.store.committed(b, t).await
    }
    async fn pending(&self, b: &BlockId, t: &TrxId) -> Result<Option<Transform>, StorageError> {
        self.store.pending(b, t).await
    }
    async fn pending_trx_ids(&self, b: &BlockId) -> Result<Vec<TrxId>, StorageError> {
        self.store.pending_trx_ids(b).await
    }
    async fn save_pending(&self, b: &BlockId, t: &TrxId, x: &Transform) -> Result<(), StorageError> {
        self.store.save_pending(b, t, x).await
    }
    async fn delete_pending(&self, b: &BlockId, t: &TrxId) -> Result<(), StorageError> {
        self.store.delete_pending(b, t).await
    }
    async fn materialized(&self, b: &BlockId, rev: u64) -> Result<Option<BlockValue>, StorageError> {
        self.store.materialized(b, rev).await
    }
    async fn commit_block(&self, b: &BlockId, c: &BlockCommit) -> Result<(), StorageError> {
        self.store.commit_block(b, c).await
    }
    async fn get_meta(&self, k: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.store.get_meta(k).await
    }
    async fn put_meta(&self, k: &str, v: &[u8]) -> Result<(), StorageError> {
        self.store.put_meta(k, v).await
    }
    async fn delete_meta(&self, k: &str) -> Result<(), StorageError> {
        self.store.delete_meta(k).await
    }
    async fn write_meta(&self, writes: &[MetaWrite]) -> Result<(), StorageError> {
        if !self.atomic {
            return optimystic_core::storage::write_meta_in_order(self, writes).await;
        }
        self.store.write_meta(writes).await
    }
    async fn apply(&self, writes: &[StorageWrite]) -> Result<(), StorageError> {
        if !self.atomic {
            return optimystic_core::storage::apply_in_order(self, writes).await;
        }
        self.store.apply(writes).await
    }
    fn atomic_apply(&self) -> bool {
        self.atomic
    }
    async fn list_meta(&self, p: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.store.list_meta(p, limit).await
    }
    fn durable(&self) -> bool {
        true
    }
    async fn block_ids(&self, after: Option<&BlockId>, limit: usize) -> Result<Vec<BlockId>, StorageError> {
        self.store.block_ids(after, limit).await
    }
    async fn close(&self) -> Result<(), StorageError> {
        self.store.close().await
    }
}

/// Clusters ranked over a fixed peer list.
#[derive(Debug)]
struct StaticKeys {
    peers: Vec<PeerId>,
    size: usize,
}

#[async_trait]
impl KeyNetwork for StaticKeys {
    async fn find_cluster(&self, block_id: &BlockId) -> Result<ClusterPeers, KeyNetworkError> {
        Ok(rank_peers(&block_key(block_id), &self.peers, self.size)
            .into_iter()
            .map(|p| (p, PeerInfo::default()))
            .collect())
    }
    async fn find_coordinator(&self, block_id: &BlockId, excluded: &[PeerId]) -> Result<PeerId, KeyNetworkError> {
        rank_peers(&block_key(block_id), &self.peers, self.size)
            .into_iter()
            .find(|p| !excluded.contains(p))
            .ok_or(KeyNetworkError::AllExcluded)
    }
    fn cluster_size(&self) -> usize {
        self.size
    }
    async fn has_seen(&self, peer: &PeerId) -> bool {
        self.peers.contains(peer)
    }
}

#[derive(Clone)]
struct Node {
    consensus: Arc<MajorityConsensus>,
    repo: Arc<CoordinatorRepo>,
    /// The node's repository as its clients see it: writes through the coordinator, reads in a
    /// read mode (quorum reads catch up first), as the real node composes it.
    reads: Arc<ClusterReads>,
    /// The local repository reads are answered from (promotion as the consensus says: a member
    /// never writes on a read, SPEC 2.1).
    local: StorageRepo,
    /// The node's `BehindSink`: catch-up of blocks its consensus reports behind.
    catch_up: SimCatchUp,
}

/// Answers a sync request in place of the node's honest sync server (`None`: the honest answer).
type SyncForgery = Arc<dyn Fn(Value) -> BoxFuture<'static, Option<Value>> + Send + Sync>;

/// A node whose sync protocol lies where its forgery says so.
struct ForgingHandler {
    honest: NodeHandler,
    forgery: SyncForgery,
}

impl SimHandler for ForgingHandler {
    fn handle(
        &self,
        from: PeerId,
        protocol: ProtocolKind,
        request: Value,
    ) -> BoxFuture<'static, Result<Value, RepoError>> {
        if protocol != ProtocolKind::Sync {
            return self.honest.handle(from, protocol, request);
        }
        let forgery = (self.forgery)(request.clone());
        let honest = self.honest.clone();
        Box::pin(async move {
            match forgery.await {
                Some(forged) => Ok(forged),
                None => honest.handle(from, protocol, request).await,
            }
        })
    }

    fn on_crash(&self) {
        self.honest.on_crash();
    }
}

/// A node that answers every recovery status query "pending", whatever it knows (a lying member,
/// SPEC 4.5), and serves everything else honestly.
struct StatusLiar {
    inner: Arc<dyn SimHandler>,
}

impl SimHandler for StatusLiar {
    fn handle(
        &self,
        from: PeerId,
        protocol: ProtocolKind,
        request: Value,
    ) -> BoxFuture<'static, Result<Value, RepoError>> {
        if protocol == ProtocolKind::Cluster && request.get("operation") == Some(&json!("status")) {
            let hash = request.pointer("/record/messageHash").cloned().unwrap_or(Value::Null);
            return Box::pin(async move { Ok(json!({"messageHash": hash, "status": "pending"})) });
        }
        self.inner.handle(from, protocol, request)
    }

    fn on_crash(&self) {
        self.inner.on_crash();
    }
}

/// A node that votes honestly but forges the unsigned `result` next to every approving commit
/// vote it gives: `{"success": false, "reason": "stale revision"}` (issue 21 finding 2).
struct ResultForger {
    inner: Arc<dyn SimHandler>,
}

impl SimHandler for ResultForger {
    fn handle(
        &self,
        from: PeerId,
        protocol: ProtocolKind,
        request: Value,
    ) -> BoxFuture<'static, Result<Value, RepoError>> {
        let answer = self.inner.handle(from, protocol, request);
        Box::pin(async move {
            let mut answer = answer.await?;
            if protocol == ProtocolKind::Cluster
                && let Some(commits) = answer.get("commits").and_then(Value::as_object)
                && commits.values().any(|vote| vote["type"] == json!("approve"))
            {
                answer["result"] = json!({"success": false, "reason": "stale revision"});
            }
            Ok(answer)
        })
    }

    fn on_crash(&self) {
        self.inner.on_crash();
    }
}

/// Settings of the simulated deployment: short timeouts, in virtual time.
fn consensus_config() -> MajorityConfig {
    MajorityConfig {
        record_timeout_ms: 2_000,
        request_timeout_ms: 400,
        grace_ms: 500,
        retry_base_ms: 50,
        retry_max_ms: 400,
        recovery_backoff_max_ms: 3_200,
        ..MajorityConfig::default()
    }
}

/// [`consensus_config`] with a short `recovery_bound_ms` (SPEC 4.5), for the scenarios where one
/// peer would otherwise pin a reservation for its full default (10 minutes, past the settle
/// budget).
fn bounded_config() -> MajorityConfig {
    MajorityConfig { recovery_bound_ms: BOUND_MS, ..consensus_config() }
}

/// `recovery_bound_ms` of [`bounded_config`].
const BOUND_MS: u64 = 20_000;

const OPERATION_TIMEOUT_MS: u64 = 2_000;
/// Largest clock error of a node, in ms; below `grace_ms`.
const MAX_SKEW_MS: i64 = 200;

fn x() -> BlockId {
    BlockId::new("x").unwrap()
}

struct World {
    seed: u64,
    sim: SimNet,
    peers: Vec<PeerId>,
    /// Peers per block cluster (every peer unless a scenario says fewer).
    cluster_size: usize,
    keys: BTreeMap<PeerId, Keypair>,
    /// Each node's clock error, in ms (below the grace period, as a deployment must ensure).
    skews: BTreeMap<PeerId, i64>,
    storages: BTreeMap<PeerId, DurableMemory>,
    nodes: Mutex<BTreeMap<PeerId, Node>>,
    history: History,
    next_trx: AtomicU64,
    /// Longest client commit, in virtual ms.
    longest_commit_ms: AtomicU64,
    /// Nodes whose sync protocol lies (byzantine peers).
    forgeries: Mutex<BTreeMap<PeerId, SyncForgery>>,
    /// Nodes that answer every recovery status query "pending" (lying members, SPEC 4.5).
    liars: Mutex<BTreeSet<PeerId>>,
    /// The consensus configuration of every node.
    config: MajorityConfig,
    /// Nodes that forge the unsigned result next to each approving commit vote they give.
    result_forgers: Mutex<BTreeSet<PeerId>>,
    /// The task snapshotting every node's storage during the run (SPEC 5.7 "at every moment").
    sampler: Mutex<Option<tokio::task::AbortHandle>>,
}

impl World {
    async fn new(seed: u64, n: usize, config: SimConfig) -> Arc<Self> {
        Self::build(seed, n, n, config, consensus_config()).await
    }

    /// [`World::new`] with nodes running `consensus`.
    async fn configured(seed: u64, n: usize, config: SimConfig, consensus: MajorityConfig) -> Arc<Self> {
        Self::build(seed, n, n, config, consensus).await
    }

    /// A world of `n` nodes whose block clusters have `cluster_size` peers (ranked as the key
    /// network ranks them), so some nodes coordinate writes to blocks they do not hold.
    async fn new_sized(seed: u64, n: usize, cluster_size: usize, config: SimConfig) -> Arc<Self> {
        Self::build(seed, n, cluster_size, config, consensus_config()).await
    }

    /// A world of `n` nodes, clusters of `cluster_size`, nodes running `consensus`.
    async fn build(
        seed: u64,
        n: usize,
        cluster_size: usize,
        config: SimConfig,
        consensus: MajorityConfig,
    ) -> Arc<Self> {
        let sim = SimNet::new(seed, config);
        let mut keys = BTreeMap::new();
        for _ in 0..n {
            let mut secret: [u8; 32] = sim.random(|r| r.r#gen());
            let keypair = Keypair::ed25519_from_bytes(&mut secret).unwrap();
            keys.insert(keypair.public().to_peer_id(), keypair);
        }
        let peers: Vec<PeerId> = keys.keys().copied().collect();
        let skews = peers.iter().map(|p| (*p, sim.random(|r| r.gen_range(-MAX_SKEW_MS..=MAX_SKEW_MS)))).collect();
        // Even seeds model an engine with atomic storage steps, odd ones an engine without.
        let atomic = seed.is_multiple_of(2);
        let storages = peers.iter().map(|p| (*p, DurableMemory { store: MemoryStorage::default(), atomic })).collect();
        let world = Arc::new(Self {
            seed,
            sim,
            peers,
            cluster_size,
            keys,
            skews,
            storages,
            nodes: Mutex::new(BTreeMap::new()),
            history: History::new(),
            next_trx: AtomicU64::new(0),
            longest_commit_ms: AtomicU64::new(0),
            forgeries: Mutex::new(BTreeMap::new()),
            liars: Mutex::new(BTreeSet::new()),
            config: consensus,
            result_forgers: Mutex::new(BTreeSet::new()),
            sampler: Mutex::new(None),
        });
        for peer in world.peers.clone() {
            world.start(peer).await;
        }
        world
    }

    fn key_network(&self) -> Arc<StaticKeys> {
        Arc::new(StaticKeys { peers: self.peers.clone(), size: self.cluster_size })
    }

    /// The cluster of `block`, as every node's key network ranks it.
    fn cluster_of(&self, block: &BlockId) -> Vec<PeerId> {
        rank_peers(&block_key(block), &self.peers, self.cluster_size)
    }

    /// Starts (or restarts, over its surviving storage) a node, composed as the real node composes
    /// it: the consensus reports behind blocks to a catch-up sink, the node serves the cluster and
    /// sync protocols, reads go through `ClusterReads` over a local repository that never writes on
    /// a read, and after a start every stored block is caught up (as `catch_up_after_start`).
    async fn start(&self, peer: PeerId) {
        let local = StorageRepo::new(Arc::new(self.storages[&peer].clone()));
        let keys = self.key_network();
        let network = self.sim.network(peer);
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        let catch_up = SimCatchUp::new(network.clone(), local.clone(), keys.clone(), timeout);
        let deps = MajorityDeps {
            keypair: self.keys[&peer].clone(),
            network: network.clone(),
            local: local.clone(),
            key_network: Some(keys.clone()),
            clock: self.sim.clock_with_skew(self.skews[&peer]),
            // `OPTIMYSTIC_SIM_NO_CATCH_UP=1` (a debugging aid) builds nodes without catch-up.
            behind: (!no_catch_up())
                .then(|| Arc::new(catch_up.clone()) as Arc<dyn optimystic_core::consensus::BehindSink>),
        };
        let consensus = Arc::new(MajorityConsensus::new(self.config.clone(), deps).unwrap());
        let as_dyn: Arc<dyn Consensus> = consensus.clone();
        catch_up.set_consensus(&as_dyn);
        consensus.start().await.unwrap();
        // SPEC 2.1: on a cluster member a read never writes storage.
        let read_local = local.with_read_promotion(consensus.read_promotion());
        let repo = Arc::new(
            CoordinatorRepo::new(keys.clone(), consensus.clone(), Arc::new(read_local.clone()))
                .with_clock(self.sim.clock_with_skew(self.skews[&peer]))
                .with_config(CoordinatorConfig {
                    operation_timeout_ms: OPERATION_TIMEOUT_MS,
                    ..CoordinatorConfig::default()
                }),
        );
        let reads =
            Arc::new(ClusterReads::new(repo.clone(), read_local.clone(), keys, network, ReadMode::Quorum, timeout));
        let honest = NodeHandler::new(as_dyn, local.clone());
        let forgery = self.forgeries.lock().unwrap().get(&peer).cloned();
        let mut handler: Arc<dyn SimHandler> = match forgery {
            Some(forgery) => Arc::new(ForgingHandler { honest, forgery }),
            None => Arc::new(honest),
        };
        if self.result_forgers.lock().unwrap().contains(&peer) {
            handler = Arc::new(ResultForger { inner: handler });
        }
        if self.liars.lock().unwrap().contains(&peer) {
            handler = Arc::new(StatusLiar { inner: handler });
        }
        self.sim.register(peer, handler);
        let node = Node { consensus, repo, reads, local: read_local, catch_up: catch_up.clone() };
        self.nodes.lock().unwrap().insert(peer, node);
        // After a (re)start, every stored block is caught up from the cluster.
        if no_catch_up() {
            return;
        }
        let storage = self.storages[&peer].clone();
        drop(self.sim.spawn_on(peer, async move {
            for block_id in storage.block_ids(None, 10_000).await.unwrap_or_default() {
                let _ = catch_up.run(&block_id).await;
            }
        }));
    }

    fn crash(&self, peer: PeerId) {
        self.sim.crash(peer);
        self.nodes.lock().unwrap().remove(&peer);
    }

    fn node(&self, peer: PeerId) -> Option<Node> {
        self.nodes.lock().unwrap().get(&peer).cloned()
    }

    fn up(&self) -> Vec<PeerId> {
        self.nodes.lock().unwrap().keys().copied().collect()
    }

    fn trx(&self, label: &str) -> TrxId {
        TrxId::new(format!("{label}-{}", self.next_trx.fetch_add(1, Ordering::SeqCst))).unwrap()
    }

    fn pick(&self, peers: &[PeerId]) -> PeerId {
        let i = self.sim.random(|r| r.gen_range(0..peers.len()));
        peers[i]
    }

    /// Runs a client operation as a task of node `via` (a crash of it cancels the operation).
    async fn on<T: Send + 'static>(
        &self,
        via: PeerId,
        op: impl FnOnce(Node) -> Pin<Box<dyn Future<Output = T> + Send>>,
    ) -> Option<T> {
        let node = self.node(via)?;
        self.sim.spawn_on(via, op(node)).await.ok()
    }

    async fn pend(&self, via: PeerId, trx_id: &TrxId, rev: u64, value: Value) -> Option<Result<PendResult, RepoError>> {
        self.pend_on(via, &x(), trx_id, rev, value).await
    }

    /// Pends a write of `value` to block `block` at `rev`: an insert at revision 1 (the block is
    /// new), else an update of its `value` field.
    async fn pend_on(
        &self,
        via: PeerId,
        block: &BlockId,
        trx_id: &TrxId,
        rev: u64,
        value: Value,
    ) -> Option<Result<PendResult, RepoError>> {
        let transforms = if rev == 1 {
            let inserted = Block::new(block.clone(), "counter", "c").with_field("value", value);
            Transforms { inserts: BTreeMap::from([(block.clone(), inserted)]), ..Transforms::default() }
        } else {
            Transforms {
                updates: BTreeMap::from([(block.clone(), vec![BlockOperation::set("value", value)])]),
                ..Transforms::default()
            }
        };
        self.pend_transforms(via, trx_id, Some(rev), transforms).await
    }

    async fn pend_transforms(
        &self,
        via: PeerId,
        trx_id: &TrxId,
        rev: Option<u64>,
        transforms: Transforms,
    ) -> Option<Result<PendResult, RepoError>> {
        let request = PendRequest { trx_id: trx_id.clone(), rev, transforms, policy: PendPolicy::Continue };
        let id = self.history.invoke(
            via.to_base58(),
            ClientOp::Pend { trx_id: trx_id.clone(), block_ids: request.transforms.block_ids(), rev },
        );
        let result = self
            .on(via, move |node| Box::pin(async move { node.repo.pend(&request, &MessageOptions::default()).await }))
            .await;
        if let Some(result) = &result {
            self.history.complete_pend(id, result);
        }
        result
    }

    async fn commit(&self, via: PeerId, trx_id: &TrxId, rev: u64) -> Option<Result<CommitResult, RepoError>> {
        self.commit_on(via, &x(), trx_id, rev).await
    }

    async fn commit_on(
        &self,
        via: PeerId,
        block: &BlockId,
        trx_id: &TrxId,
        rev: u64,
    ) -> Option<Result<CommitResult, RepoError>> {
        let request = CommitRequest {
            trx_id: trx_id.clone(),
            block_ids: vec![block.clone()],
            rev,
            tail_id: block.clone(),
            header_id: None,
        };
        let id = self
            .history
            .invoke(via.to_base58(), ClientOp::Commit { trx_id: trx_id.clone(), block_ids: vec![block.clone()], rev });
        let started = Instant::now();
        let result = self
            .on(via, move |node| Box::pin(async move { node.repo.commit(&request, &MessageOptions::default()).await }))
            .await;
        let took = u64::try_from(started.elapsed().as_millis()).unwrap();
        self.longest_commit_ms.fetch_max(took, Ordering::SeqCst);
        if let Some(result) = &result {
            self.history.complete_commit(id, result);
        }
        result
    }

    async fn cancel_on(&self, via: PeerId, block: &BlockId, trx_id: &TrxId) -> Option<Result<(), RepoError>> {
        let trx = TrxBlocks { trx_id: trx_id.clone(), block_ids: vec![block.clone()] };
        let id = self
            .history
            .invoke(via.to_base58(), ClientOp::Cancel { trx_id: trx_id.clone(), block_ids: vec![block.clone()] });
        let result = self
            .on(via, move |node| Box::pin(async move { node.repo.cancel(&trx, &MessageOptions::default()).await }))
            .await;
        if let Some(result) = &result {
            self.history.complete_cancel(id, result);
        }
        result
    }

    /// Creates block `x` at revision 1 with every node up and no faults.
    async fn bootstrap(&self) {
        let via = self.peers[0];
        let trx = self.trx("init");
        let block = Block::new(x(), "counter", "c").with_field("value", json!(0));
        let transforms = Transforms { inserts: BTreeMap::from([(x(), block)]), ..Transforms::default() };
        let pended = self.pend_transforms(via, &trx, Some(1), transforms).await.unwrap().unwrap();
        assert!(matches!(pended, PendResult::Success(_)), "bootstrap pend: {pended:?}");
        let committed = self.commit(via, &trx, 1).await.unwrap().unwrap();
        assert!(committed.is_success(), "bootstrap commit: {committed:?}");
        self.wait_idle().await;
    }

    /// The newest revision of `x` a node's storage holds.
    async fn latest_rev(&self, peer: PeerId) -> u64 {
        self.latest_rev_of(peer, &x()).await
    }

    /// The newest revision of `block` a node's storage holds.
    async fn latest_rev_of(&self, peer: PeerId, block: &BlockId) -> u64 {
        self.storages[&peer].latest(block).await.unwrap().map_or(0, |l| l.rev)
    }

    /// Stops every fault, restarts crashed nodes, and waits for quiescence: no message in flight,
    /// no reservation held, and a catch-up of every block on every node applies nothing more.
    async fn settle(&self) {
        self.stop_sampler();
        self.sim.set_filter(None);
        self.sim.set_drop_probability(0.0);
        self.sim.heal();
        for peer in &self.peers {
            if self.node(*peer).is_none() {
                self.start(*peer).await;
            }
        }
        self.quiesce().await;
    }

    /// Waits until nothing moves any more: [`World::wait_idle`], then a catch-up of every stored
    /// block on every running node (as a restarted node does), until a round applies nothing.
    async fn quiesce(&self) {
        for _ in 0..MAX_QUIESCE_ROUNDS {
            self.wait_idle().await;
            let applied = self.catch_up_everywhere().await;
            self.wait_idle().await;
            if applied == 0 {
                return;
            }
        }
        panic!("catch-up still applied revisions after {MAX_QUIESCE_ROUNDS} rounds with faults stopped");
    }

    /// Every block any node stores.
    async fn blocks(&self) -> Vec<BlockId> {
        let mut blocks = BTreeSet::new();
        for storage in self.storages.values() {
            blocks.extend(storage.block_ids(None, 10_000).await.unwrap());
        }
        blocks.into_iter().collect()
    }

    /// Catches every block up on every running node (each as a task of its node); returns the
    /// revisions applied.
    async fn catch_up_everywhere(&self) -> usize {
        if no_catch_up() {
            return 0;
        }
        let blocks = self.blocks().await;
        let mut applied = 0;
        for peer in self.up() {
            let Some(node) = self.node(peer) else { continue };
            for block_id in &blocks {
                let catch_up = node.catch_up.clone();
                let block_id = block_id.clone();
                if let Ok(Ok(n)) = self.sim.spawn_on(peer, async move { catch_up.run(&block_id).await }).await {
                    applied += n;
                }
            }
        }
        applied
    }

    /// Waits until no request is in flight and no running node holds a reservation (the records
    /// of finished operations may still be on their way to some members when the client has its
    /// answer).
    async fn wait_idle(&self) {
        let all_idle = async {
            loop {
                self.sim.wait_quiet().await;
                let nodes: Vec<Node> = self.nodes.lock().unwrap().values().cloned().collect();
                for node in &nodes {
                    node.consensus.wait_idle().await;
                }
                if self.sim.in_flight() == 0 && nodes.iter().all(|n| n.consensus.live_reservations() == 0) {
                    return;
                }
            }
        };
        if tokio::time::timeout(SETTLE_BUDGET, all_idle).await.is_err() {
            let held: Vec<(PeerId, usize)> =
                self.nodes.lock().unwrap().iter().map(|(p, n)| (*p, n.consensus.live_reservations())).collect();
            panic!(
                "reservations still held {SETTLE_BUDGET:?} after faults stopped: {held:?}\n{}",
                self.describe_live().await
            );
        }
    }

    /// The live 2pc entries of every node, for failure reports: status, renounced flag, operation.
    async fn describe_live(&self) -> String {
        let mut out = String::new();
        for peer in &self.peers {
            let storage = &self.storages[peer];
            let live = storage.list_meta("2pc/live/", 1_000).await.unwrap_or_default();
            if live.is_empty() {
                continue;
            }
            let entries = storage.list_meta("2pc/entry/", 100_000).await.unwrap_or_default();
            let latest = self.latest_rev(*peer).await;
            for (key, _) in live {
                let hash = key.trim_start_matches("2pc/live/");
                let entry = entries
                    .iter()
                    .find(|(k, _)| k.ends_with(hash))
                    .and_then(|(_, v)| serde_json::from_slice::<Value>(v).ok());
                let entry = entry.unwrap_or(Value::Null);
                // A decided entry refers to the copy kept for evidence.
                let kept = match entry.pointer("/record/record").and_then(Value::as_str) {
                    Some(reference) => storage
                        .get_meta(&optimystic_core::evidence::record_key(reference))
                        .await
                        .ok()
                        .flatten()
                        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok()),
                    None => entry.get("record").cloned(),
                };
                let op = kept.as_ref().and_then(|r| r.pointer("/message/operations")).map(|op| {
                    let text = op.to_string();
                    text.chars().take(320).collect::<String>()
                });
                out.push_str(&format!(
                    "  {peer} (x at rev {latest}, up {}): {hash} status {} renounced {} op {}\n",
                    self.sim.is_up(*peer),
                    entry.get("status").unwrap_or(&Value::Null),
                    entry.get("renounced").unwrap_or(&Value::Null),
                    op.unwrap_or_default()
                ));
            }
        }
        out
    }

    async fn snapshots(&self) -> Vec<NodeSnapshot> {
        let blocks = self.blocks().await;
        let mut out = Vec::new();
        for peer in &self.peers {
            out.push(snapshot(*peer, &self.storages[peer], &blocks).await.unwrap());
        }
        out
    }

    /// Snapshots every node's storage now and hands the snapshots to the history checker, which
    /// checks them at once (no gap, value = fold of the committed transforms, latest never
    /// decreasing) and reports at [`World::check`].
    async fn observe(&self) {
        for snap in self.snapshots().await {
            self.history.observe(&snap);
        }
    }

    /// Observes every node's storage every `every` of virtual time until [`World::settle`].
    fn start_sampler(self: &Arc<Self>, every: Duration) {
        let world = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(world) = world.upgrade() else { return };
                world.observe().await;
            }
        });
        *self.sampler.lock().unwrap() = Some(task.abort_handle());
    }

    fn stop_sampler(&self) {
        if let Some(task) = self.sampler.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Reads `x` at `via` in `mode` (a client of that node), records the answer for the checker
    /// (SPEC 5.7: the value of a committed revision, plus the context's own trxs), and returns it.
    /// `asserted` are the transforms of the context's committed entries, `own` that of its
    /// `trxId`.
    async fn read(
        &self,
        via: PeerId,
        mode: ReadMode,
        context: Option<TrxContext>,
        asserted: Vec<(TrxRev, Transform)>,
        own: Option<Transform>,
    ) -> Option<Result<(Option<TrxRev>, Option<Block>), RepoError>> {
        let gets = BlockGets { block_ids: vec![x()], context, read_mode: None };
        let invoked_at = self.history.tick();
        let result = self
            .on(via, move |node| {
                Box::pin(async move { node.reads.get_in_mode(&gets, &MessageOptions::default(), mode).await })
            })
            .await?;
        let answer = result.map(|mut results| {
            let entry = results.remove(&x()).expect("a read answers every block it was asked");
            (entry.state.latest, entry.block)
        });
        if let Ok((latest, value)) = &answer {
            self.history.read(ReadRecord {
                client: via.to_base58(),
                block_id: x(),
                asserted,
                own,
                quorum: mode == ReadMode::Quorum,
                invoked_at,
                latest: latest.clone(),
                value: value.clone(),
            });
        }
        Some(answer)
    }

    /// A plain read (no context) at `via` in a random mode.
    async fn random_read(&self, via: PeerId) -> Option<Result<(Option<TrxRev>, Option<Block>), RepoError>> {
        let mode = if self.sim.random(|r| r.gen_bool(0.5)) { ReadMode::Quorum } else { ReadMode::Local };
        self.read(via, mode, None, Vec::new(), None).await
    }

    /// Quiesces (faults off, crashed nodes restarted, catch-up run), then checks the history
    /// against every node's storage, SPEC 5.7 convergence included; returns the run's trace.
    async fn check(&self) -> String {
        self.settle().await;
        let snapshots = self.snapshots().await;
        let up: BTreeSet<PeerId> = self.up().into_iter().collect();
        if let Err(violations) =
            self.history.check_converged(&snapshots, &|block| self.cluster_of(block), &|p| up.contains(p))
        {
            panic!("safety violations: {violations:#?}\nhistory: {:#?}\nsnapshots: {snapshots:#?}", self.history.ops());
        }
        // Every revision's kept evidence (batched records included) proves that revision.
        let blocks = self.blocks().await;
        for peer in &self.peers {
            let local = StorageRepo::new(Arc::new(self.storages[peer].clone()));
            for block in &blocks {
                let cluster = self.cluster_of(block);
                let violations = check_evidence(*peer, &local, std::slice::from_ref(block), &cluster).await.unwrap();
                assert!(violations.is_empty(), "evidence that does not prove its revision: {violations:#?}");
            }
        }
        format!(
            "seed {} ops {:?} reads {:?} snapshots {:?}\n{BATCHED}{}",
            self.seed,
            self.history.ops(),
            self.history.reads(),
            snapshots,
            self.batched_records().await
        )
    }

    /// How many distinct decided records of several operations (batches, SPEC 4.14) the nodes
    /// kept (for evidence, or inline in their executed markers).
    async fn batched_records(&self) -> usize {
        let mut batched = BTreeSet::new();
        for storage in self.storages.values() {
            let kept = storage.list_meta("evidence/record/", 1_000_000).await.unwrap();
            let entries = storage.list_meta("2pc/entry/", 1_000_000).await.unwrap();
            for (_, bytes) in kept.into_iter().chain(entries) {
                let Ok(value) = serde_json::from_slice::<Value>(&bytes) else { continue };
                let record = value.get("record").filter(|r| r.is_object()).unwrap_or(&value);
                let ops = record.pointer("/message/operations").and_then(Value::as_array).map_or(0, Vec::len);
                if ops > 1
                    && let Some(hash) = record.get("messageHash").and_then(Value::as_str)
                {
                    batched.insert(hash.to_owned());
                }
            }
        }
        batched.len()
    }
}

fn random_delays(world: &World) {
    let (min, max) = world.sim.random(|r| {
        let min = r.gen_range(1..5);
        (min, min + r.gen_range(0..20))
    });
    world.sim.set_delay_ms(min, max);
}

fn is_retryable(e: &RepoError) -> bool {
    matches!(e.code(), ErrorCode::ConsensusFailed | ErrorCode::Unavailable | ErrorCode::Busy | ErrorCode::Expired)
}

/// Whether a record (or the record inside an update request) carries the commit of `trx` (alone
/// or in a batch).
fn commits_trx(body: &Value, trx: &str) -> bool {
    let record = body.get("record").unwrap_or(body);
    record
        .pointer("/message/operations")
        .and_then(Value::as_array)
        .is_some_and(|ops| ops.iter().any(|op| op.pointer("/commit/trxId").and_then(Value::as_str) == Some(trx)))
}

fn has_votes(body: &Value, field: &str) -> bool {
    let record = body.get("record").unwrap_or(body);
    record.get(field).and_then(Value::as_object).is_some_and(|m| !m.is_empty())
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// A minority partition: the majority side commits; the minority side fails with an error and
/// commits nothing.
async fn minority_partition(seed: u64) -> String {
    let n = if seed.is_multiple_of(2) { 3 } else { 5 };
    let world = World::new(seed, n, SimConfig::default()).await;
    world.bootstrap().await;
    let mut shuffled = world.peers.clone();
    world.sim.random(|r| rand::seq::SliceRandom::shuffle(shuffled.as_mut_slice(), r));
    let minority: Vec<PeerId> = shuffled[..(n - 1) / 2].to_vec();
    let majority: Vec<PeerId> = shuffled[(n - 1) / 2..].to_vec();
    let (m, j) = (minority[0], world.pick(&majority));

    let t_min = world.trx("minority");
    let t_maj = world.trx("majority");
    assert!(matches!(world.pend(j, &t_maj, 2, json!("maj")).await.unwrap().unwrap(), PendResult::Success(_)));
    assert!(matches!(world.pend(m, &t_min, 2, json!("min")).await.unwrap().unwrap(), PendResult::Success(_)));
    world.wait_idle().await;

    random_delays(&world);
    let side = spawn_side_writers(&world);
    world.sim.partition(&[minority.clone(), majority.clone()]);
    let minority_first = world.sim.random(|r| r.gen_bool(0.5));
    let (w1, w2) = (world.clone(), world.clone());
    let (t1, t2) = (t_maj.clone(), t_min.clone());
    let maj = tokio::spawn(async move {
        if minority_first {
            tokio::task::yield_now().await;
        }
        w1.commit(j, &t1, 2).await
    });
    let min = tokio::spawn(async move { w2.commit(m, &t2, 2).await });
    let maj = maj.await.unwrap().unwrap();
    let min = min.await.unwrap().unwrap();
    assert!(matches!(maj, Ok(CommitResult::Success(_))), "majority side: {maj:?}");
    match &min {
        Err(e) if is_retryable(e) => {}
        other => panic!("minority side must fail with a retryable error, got {other:?}"),
    }
    // A new write from the minority side fails too.
    let t_new = world.trx("minority-new");
    let late = world.pend(m, &t_new, 3, json!("late")).await.unwrap();
    assert!(!matches!(late, Ok(PendResult::Success(_))), "minority pend: {late:?}");

    side.stop().await;
    world.settle().await;
    for peer in &majority {
        assert_eq!(world.latest_rev(*peer).await, 2);
    }
    let trace = world.check().await;
    // The minority's transaction is committed nowhere.
    for snap in world.snapshots().await {
        assert!(snap.blocks[&x()].revisions.iter().all(|r| r.trx_id != t_min), "{snap:?}");
    }
    trace
}

/// Where the coordinator of a commit dies.
#[derive(Debug, Clone, Copy)]
enum CrashPoint {
    /// When the k-th promise answer reaches it (k >= 1).
    PromiseAnswer(usize),
    /// When it sends the decided record for the first time (phase 1 complete, applied locally).
    FirstDecidedSend,
    /// When the k-th commit answer reaches it (some members executed).
    CommitAnswer(usize),
}

/// The coordinator of a commit dies mid-protocol (optionally with another peer unreachable): no
/// conflicting commit takes the block once the first was executed anywhere, every member ends up
/// holding the decided revision (by executing the record or, if it answered "not executed" first,
/// by catching the revision up: SPEC 4.11, 5.7), and reservations are freed once settled.
async fn coordinator_crash(seed: u64, after_phase1: bool) -> String {
    let world = World::new(seed, 5, SimConfig::default()).await;
    world.bootstrap().await;
    let c = world.pick(&world.peers);
    let others: Vec<PeerId> = world.peers.iter().copied().filter(|p| *p != c).collect();
    let q = world.pick(&others);
    let t = world.trx("t");
    let u = world.trx("u");
    assert!(matches!(world.pend(c, &t, 2, json!("t")).await.unwrap().unwrap(), PendResult::Success(_)));
    assert!(matches!(world.pend(q, &u, 2, json!("u")).await.unwrap().unwrap(), PendResult::Success(_)));
    world.wait_idle().await;
    random_delays(&world);
    let side = spawn_side_writers(&world);

    let point = world.sim.random(|r| {
        if after_phase1 {
            if r.gen_bool(0.5) { CrashPoint::PromiseAnswer(r.gen_range(1..=2)) } else { CrashPoint::FirstDecidedSend }
        } else {
            // The third answer may reach the client's success first: then the success must last.
            CrashPoint::CommitAnswer(r.gen_range(1..=3))
        }
    });
    let unreachable = world.sim.random(|r| r.gen_bool(0.5)).then(|| {
        let candidates: Vec<PeerId> = others.iter().copied().filter(|p| *p != q).collect();
        world.pick(&candidates)
    });
    let t_text = t.to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let crashed = Arc::new(AtomicBool::new(false));
    let record_seen: Arc<Mutex<Option<Value>>> = Arc::new(Mutex::new(None));
    {
        let (count, crashed, record_seen) = (count.clone(), crashed.clone(), record_seen.clone());
        world.sim.set_filter(Some(Arc::new(move |e: &Envelope<'_>| {
            if crashed.load(Ordering::SeqCst) || !commits_trx(e.body, &t_text) {
                return Verdict::Deliver;
            }
            if e.direction == Direction::Request && e.from == c {
                let mut seen = record_seen.lock().unwrap();
                if seen.is_none() {
                    *seen = e.body.get("record").cloned();
                }
            }
            let hit = match point {
                CrashPoint::PromiseAnswer(k) => {
                    e.direction == Direction::Response && e.to == c && !has_votes(e.body, "commits") && {
                        count.fetch_add(1, Ordering::SeqCst) + 1 == k
                    }
                }
                CrashPoint::FirstDecidedSend => {
                    e.direction == Direction::Request && e.from == c && has_votes(e.body, "promises")
                }
                CrashPoint::CommitAnswer(k) => {
                    e.direction == Direction::Response && e.to == c && has_votes(e.body, "commits") && {
                        count.fetch_add(1, Ordering::SeqCst) + 1 == k
                    }
                }
            };
            if !hit {
                return Verdict::Deliver;
            }
            crashed.store(true, Ordering::SeqCst);
            if e.from == c { Verdict::CrashSender } else { Verdict::CrashReceiver }
        })));
    }
    if let Some(p) = unreachable {
        let rest: Vec<PeerId> = world.peers.iter().copied().filter(|x| *x != p).collect();
        world.sim.partition(&[vec![p], rest]);
    }
    let outcome = world.commit(c, &t, 2).await;
    // A client answered before the crash point leaves later answers on the wire: let them land.
    world.sim.wait_quiet().await;
    assert!(crashed.load(Ordering::SeqCst), "the crash point {point:?} was never reached (outcome {outcome:?})");
    if let Some(answer) = &outcome {
        // Only a crash on a late commit answer may come after the client's success.
        assert!(
            matches!(point, CrashPoint::CommitAnswer(_)) && matches!(answer, Ok(CommitResult::Success(_))),
            "the coordinator crashed at {point:?}, yet its client was answered {answer:?}"
        );
    }
    world.crash(c);
    let record = ClusterRecord::from_value(record_seen.lock().unwrap().clone().unwrap()).unwrap();

    // While the coordinator is down, a conflicting commit of another transaction at the same
    // revision must not win if the first one was decided.
    let conflicting = world.commit(q, &u, 2).await;
    let u_won = matches!(conflicting, Some(Ok(CommitResult::Success(_))));

    // Restart the coordinator after a while (before or after recovery begins), then heal.
    let downtime = world.sim.random(|r| r.gen_range(100..6_000));
    tokio::time::sleep(Duration::from_millis(downtime)).await;
    side.stop().await;
    world.settle().await;

    let mut statuses = BTreeMap::new();
    for peer in &world.peers {
        let node = world.node(*peer).unwrap();
        statuses.insert(*peer, node.consensus.status_of(&record).await.unwrap());
    }
    let executed: BTreeSet<PeerId> =
        statuses.iter().filter(|(_, s)| **s == Some(RecordStatus::Executed)).map(|(p, _)| *p).collect();
    if matches!(point, CrashPoint::FirstDecidedSend | CrashPoint::CommitAnswer(_)) {
        assert!(executed.contains(&c), "the coordinator applied the decided record locally before sending it");
    }
    let snapshots = world.snapshots().await;
    if !executed.is_empty() {
        // SPEC 4.11: a member that answered "not executed" never executes the record, even when
        // another peer did; it catches the committed revision up instead. So members may end
        // Executed or Aborted, but every one holds t at revision 2 (by execution or catch-up),
        // and u never takes revision 2 anywhere.
        assert!(!u_won, "{u} committed at revision 2 although {t} was decided ({point:?}, statuses {statuses:?})");
        for snap in &snapshots {
            let revs = &snap.blocks[&x()].revisions;
            assert!(
                revs.iter().any(|r| r.trx_id == t && r.rev == 2),
                "{} does not hold {t} at revision 2 after settling ({point:?}, statuses {statuses:?}): {revs:?}",
                snap.peer
            );
        }
    }
    for peer in &world.peers {
        let node = world.node(*peer).unwrap();
        assert_eq!(node.consensus.live_reservations(), 0, "{peer} still holds a reservation after settling");
        assert!(node.consensus.reserved_blocks().await.is_empty());
    }
    world.check().await
}

/// Members crash and restart while clients write: nothing is applied twice, a restarted member
/// keeps its promises, and the history stays safe.
async fn member_crash_restart(seed: u64) -> String {
    let world = World::new(seed, 3, SimConfig::default()).await;
    world.bootstrap().await;
    random_delays(&world);
    let drop = world.sim.random(|r| r.gen_range(0.0..0.05));
    world.sim.set_drop_probability(drop);
    world.start_sampler(Duration::from_millis(25));
    let reader = spawn_reader(&world);
    let side = spawn_side_writers(&world);

    let writers: Vec<_> = (0..2)
        .map(|w| {
            let world = world.clone();
            tokio::spawn(async move {
                for i in 0..3 {
                    let up = world.up();
                    if up.is_empty() {
                        continue;
                    }
                    let via = world.pick(&up);
                    write_with_retries(&world, via, &format!("w{w}i{i}"), 4).await;
                }
            })
        })
        .collect();

    let chaos = {
        let world = world.clone();
        tokio::spawn(async move {
            for _ in 0..2 {
                let wait = world.sim.random(|r| r.gen_range(0..400));
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let victim = world.pick(&world.peers);
                if world.node(victim).is_none() {
                    continue;
                }
                world.crash(victim);
                let live_before = world.storages[&victim].list_meta("2pc/live/", 100_000).await.unwrap().len();
                let down = world.sim.random(|r| r.gen_range(10..3_000));
                tokio::time::sleep(Duration::from_millis(down)).await;
                world.start(victim).await;
                // Every persisted reservation is back (decided ones were executed at start).
                let node = world.node(victim).unwrap();
                let live_after = world.storages[&victim].list_meta("2pc/live/", 100_000).await.unwrap().len();
                assert!(live_after <= live_before);
                assert_eq!(
                    node.consensus.live_reservations(),
                    live_after,
                    "reservations lost in the restart of {victim}"
                );
            }
        })
    };
    for writer in writers {
        writer.await.unwrap();
    }
    chaos.await.unwrap();
    reader.stop().await;
    side.stop().await;
    world.settle().await;
    world.check().await
}

/// A client reading `x` at random nodes in random modes until stopped (its answers go to the
/// history checker: SPEC 5.7 reads, and quorum reads that must not miss acknowledged commits).
struct Reader {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
    }
}

fn spawn_reader(world: &Arc<World>) -> Reader {
    let stop = Arc::new(AtomicBool::new(false));
    let world = world.clone();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        while !stopped.load(Ordering::SeqCst) {
            let wait = world.sim.random(|r| r.gen_range(2..40));
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let up = world.up();
            if up.is_empty() {
                continue;
            }
            let via = world.pick(&up);
            let _ = world.random_read(via).await;
        }
    });
    Reader { stop, task }
}

/// Reads `x` at `via`, pends a write at the next revision and commits it; retries stale or
/// retryable failures with a new transaction. Returns whether a write committed.
async fn write_with_retries(world: &World, via: PeerId, label: &str, attempts: usize) -> bool {
    write_block_with_retries(world, via, &x(), label, attempts).await
}

/// [`write_with_retries`] on `block` (inserted by the first write that finds it at revision 0).
async fn write_block_with_retries(world: &World, via: PeerId, block: &BlockId, label: &str, attempts: usize) -> bool {
    let mut rev = world.latest_rev_of(via, block).await + 1;
    for attempt in 0..attempts {
        let trx = world.trx(&format!("{label}a{attempt}"));
        match world.pend_on(via, block, &trx, rev, json!(label)).await {
            None => return false,
            Some(Ok(PendResult::Success(_))) => {}
            Some(Ok(PendResult::Stale(stale))) => {
                let newest = stale.missing.iter().flatten().map(|m| m.rev).max().unwrap_or(rev);
                rev = rev.max(newest + 1);
                continue;
            }
            Some(Err(e)) => {
                assert!(is_retryable(&e), "pend failed with a non-retryable error: {e}");
                client_backoff(attempt).await;
                continue;
            }
        }
        match world.commit_on(via, block, &trx, rev).await {
            None => return false,
            Some(Ok(CommitResult::Success(_))) => return true,
            Some(Ok(CommitResult::Stale(stale))) => {
                let newest = stale.missing.iter().flatten().map(|m| m.rev).max().unwrap_or(rev);
                rev = rev.max(newest + 1);
            }
            Some(Err(e)) => {
                assert!(is_retryable(&e), "commit failed with a non-retryable error: {e}");
                client_backoff(attempt).await;
                if e.code() == ErrorCode::Unavailable {
                    // The outcome is unknown: leave it to recovery, do not cancel.
                    rev += 1;
                    continue;
                }
            }
        }
        if world.cancel_on(via, block, &trx).await.is_none() {
            return false;
        }
    }
    false
}

/// A client's wait before it retries a write that failed retryably (attempt 0, 1, ...): 100 ms
/// more per attempt. Without it a client can spend all its attempts while the reservations of a
/// record whose coordinator crashed still stand (until recovery, SPEC 4.5), which is no client's
/// behaviour.
async fn client_backoff(attempt: usize) {
    let ms = 100 * u64::try_from(attempt + 1).unwrap_or(u64::MAX);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Prefix of the trace line counting batched records (see [`World::check`] and [`run_batched`]).
const BATCHED: &str = "batched records: ";

/// Writers on blocks of their own (`s0`, `s1`, ...), a few writes each, through one node of the
/// run (another running node while it is down): their operations queue in that coordinator's
/// lane together and with the scenario's, so they share records (batching, SPEC 4.14); the
/// history checker checks their blocks like `x`.
struct SideWriters {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SideWriters {
    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}

fn spawn_side_writers(world: &Arc<World>) -> SideWriters {
    let stop = Arc::new(AtomicBool::new(false));
    let count = world.sim.random(|r| r.gen_range(2..=4usize));
    let home = world.pick(&world.peers);
    let tasks = (0..count)
        .map(|w| {
            let (world, stopped) = (world.clone(), stop.clone());
            let writes = world.sim.random(|r| r.gen_range(3..=10usize));
            tokio::spawn(async move {
                let block = BlockId::new(format!("s{w}")).unwrap();
                for i in 0..writes {
                    if stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    let wait = world.sim.random(|r| r.gen_range(0..10));
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    let up = world.up();
                    if up.is_empty() {
                        continue;
                    }
                    let via = if up.contains(&home) { home } else { world.pick(&up) };
                    write_block_with_retries(&world, via, &block, &format!("s{w}i{i}"), 3).await;
                }
            })
        })
        .collect();
    SideWriters { stop, tasks }
}

/// Conflicting writers on one block through different coordinators: at most one commit per
/// revision, the losers get a `StaleFailure` or a retryable error, and nobody waits past the
/// record's expiration.
async fn conflicting_writers(seed: u64) -> String {
    let world = World::new(seed, 3, SimConfig::default()).await;
    world.bootstrap().await;
    random_delays(&world);
    let drop = world.sim.random(|r| if r.gen_bool(0.5) { 0.0 } else { r.gen_range(0.0..0.05) });
    world.sim.set_drop_probability(drop);
    let writers = world.sim.random(|r| r.gen_range(2..=3));
    let reader = spawn_reader(&world);
    let side = spawn_side_writers(&world);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let world = world.clone();
        let via = world.peers[w % world.peers.len()];
        let offset = world.sim.random(|r| r.gen_range(0..20));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(offset)).await;
            let trx = world.trx(&format!("writer{w}"));
            let started = Instant::now();
            let pended = world.pend(via, &trx, 2, json!(w)).await.unwrap();
            let committed = match &pended {
                Ok(PendResult::Success(_)) => Some(world.commit(via, &trx, 2).await.unwrap()),
                Ok(PendResult::Stale(_)) => None,
                Err(e) => {
                    assert!(is_retryable(e), "writer {w}: pend failed with {e}");
                    None
                }
            };
            let took = started.elapsed();
            (trx, pended, committed, took)
        }));
    }
    let mut winners = 0;
    for task in tasks {
        let (trx, pended, committed, took) = task.await.unwrap();
        // A pend that fails may cancel its partial pend with a fresh record: two record lifetimes.
        let bound =
            Duration::from_millis(2 * (consensus_config().record_timeout_ms + consensus_config().request_timeout_ms));
        assert!(took <= bound, "{trx} waited {took:?}");
        match committed {
            Some(Ok(CommitResult::Success(_))) => winners += 1,
            Some(Ok(CommitResult::Stale(_))) | None => {}
            Some(Err(e)) => assert!(is_retryable(&e), "{trx}: commit failed with {e} (pend {pended:?})"),
        }
    }
    reader.stop().await;
    side.stop().await;
    assert!(winners <= 1, "{winners} writers committed revision 2");
    let longest = world.longest_commit_ms.load(Ordering::SeqCst);
    assert!(longest <= consensus_config().record_timeout_ms + 50, "a commit waited {longest} ms, past its expiration");
    world.settle().await;
    world.check().await
}

/// Signs a record's promise by `keypair`.
fn promise(record: &mut ClusterRecord, keypair: &Keypair, vote: VoteType) {
    let signed = record.sign_promise(keypair, vote, None).unwrap();
    record.promises.insert(keypair.public().to_peer_id().to_base58(), signed);
}

fn record_for(peers: &[PeerId], message: &RepoMessage) -> ClusterRecord {
    let peers = peers.iter().map(|p| (p.to_base58(), ClusterPeer::new(p, vec![]).unwrap())).collect();
    ClusterRecord::new(peers, serde_json::to_value(message).unwrap())
}

/// Forged signature, tampered message, wrong public key, expired record, shrunken peer set: each
/// refused, nothing changed; then the genuine record goes through.
async fn refusals(seed: u64) -> String {
    let world = World::new(seed, 3, SimConfig::default()).await;
    world.bootstrap().await;
    let t = world.trx("t");
    assert!(matches!(world.pend(world.peers[0], &t, 2, json!("t")).await.unwrap().unwrap(), PendResult::Success(_)));
    world.wait_idle().await;

    let mut secret: [u8; 32] = world.sim.random(|r| r.r#gen());
    let attacker = Keypair::ed25519_from_bytes(&mut secret).unwrap();
    let mut secret: [u8; 32] = world.sim.random(|r| r.r#gen());
    let accomplice = Keypair::ed25519_from_bytes(&mut secret).unwrap();
    let attacker_id = attacker.public().to_peer_id();
    let net = world.sim.network(attacker_id);
    let target = world.pick(&world.peers);
    let signers: Vec<PeerId> = world.peers.iter().copied().filter(|p| *p != target).collect();
    let now = world.sim.clock().now_ms();
    let commit = RepoOperation::Commit(CommitRequest {
        trx_id: t.clone(),
        block_ids: vec![x()],
        rev: 2,
        tail_id: x(),
        header_id: None,
    });
    let decided_at = |expiration: u64| {
        let mut record = record_for(&world.peers, &RepoMessage::new(commit.clone(), expiration));
        for signer in &signers {
            promise(&mut record, &world.keys[signer], VoteType::Approve);
        }
        record
    };
    let genuine = decided_at(now + 1_000);

    let mut forged = genuine.clone();
    let victim = signers[world.sim.random(|r| r.gen_range(0..signers.len()))].to_base58();
    let payload = forged.promises[&victim].payload(&forged.promise_hash());
    forged.promises.get_mut(&victim).unwrap().signature = crypto::sign(&attacker, payload.as_bytes()).unwrap();

    let mut tampered = genuine.clone();
    tampered.message["operations"][0]["commit"]["rev"] = json!(world.sim.random(|r| r.gen_range(3..100)));
    let mut rehashed = tampered.clone();
    rehashed.message_hash = rehashed.computed_message_hash();

    let mut wrong_key = genuine.clone();
    let holder = world.pick(&world.peers).to_base58();
    wrong_key.peers.get_mut(&holder).unwrap().public_key = crypto::public_key_base64url(&attacker.public()).unwrap();

    let late_ms = world.sim.random(|r| r.gen_range(1..10_000));
    let expired = decided_at(now.saturating_sub(late_ms + MAX_SKEW_MS.unsigned_abs()));

    let shrunken_peers = [attacker_id, target];
    let shrunken_phase1 = record_for(&shrunken_peers, &RepoMessage::new(commit.clone(), now + 1_000));
    let mut shrunken_decided = record_for(
        &[attacker_id, accomplice.public().to_peer_id(), target],
        &RepoMessage::new(commit.clone(), now + 1_000),
    );
    promise(&mut shrunken_decided, &attacker, VoteType::Approve);
    promise(&mut shrunken_decided, &accomplice, VoteType::Approve);

    // A promise in the target's own name that it never cast: it checks it like any other.
    let mut own_forged = genuine.clone();
    let own_payload = own_forged.promises[&victim].payload(&own_forged.promise_hash());
    let mut own_vote = own_forged.promises[&victim].clone();
    own_vote.signature = crypto::sign(&attacker, own_payload.as_bytes()).unwrap();
    own_forged.promises.insert(target.to_base58(), own_vote);

    let cases = [
        ("forged signature", forged, ErrorCode::BadRequest),
        ("forged vote of the receiving member", own_forged, ErrorCode::BadRequest),
        ("tampered message", tampered, ErrorCode::BadRequest),
        ("tampered and re-hashed message", rehashed, ErrorCode::BadRequest),
        ("wrong public key", wrong_key, ErrorCode::BadRequest),
        ("expired record", expired, ErrorCode::Expired),
        ("shrunken peer set (phase 1)", shrunken_phase1, ErrorCode::BadRequest),
        ("shrunken peer set (decided)", shrunken_decided, ErrorCode::BadRequest),
    ];
    let before = world.snapshots().await;
    let meta_before = world.storages[&target].list_meta("2pc/", 100_000).await.unwrap();
    for (name, record, code) in cases {
        let answer = net.request(target, ProtocolKind::Cluster, update_request(&record), Duration::from_secs(1)).await;
        match answer {
            Err(NetworkError::Remote { code: got, .. }) if got == code.as_str() => {}
            other => panic!("{name}: expected {code}, got {other:?}"),
        }
        assert_eq!(world.snapshots().await, before, "{name} changed a block");
        assert_eq!(
            world.storages[&target].list_meta("2pc/", 100_000).await.unwrap(),
            meta_before,
            "{name} changed 2pc state"
        );
    }
    // The genuine decided record is accepted and applied.
    let answer =
        net.request(target, ProtocolKind::Cluster, update_request(&genuine), Duration::from_secs(1)).await.unwrap();
    let reply = ClusterRecord::from_value(answer).unwrap();
    reply.verify(None).unwrap();
    assert!(reply.commits[&target.to_base58()].is_approve());
    assert_eq!(world.latest_rev(target).await, 2);
    world.settle().await;
    world.check().await
}

/// Phase 1 sends the record to every peer at once (SPEC 4.1) and ends at a quorum: a member that
/// swallows every request does not slow a write down (no waiting for the request timeout).
async fn phase1_asks_everyone_and_waits_for_a_quorum(seed: u64) -> String {
    let world = World::new(seed, 3, SimConfig::default()).await;
    world.bootstrap().await;
    let via = world.pick(&world.peers);
    let others: Vec<PeerId> = world.peers.iter().copied().filter(|p| *p != via).collect();
    let phase1_asks = Arc::new(AtomicUsize::new(0));
    let counter = phase1_asks.clone();
    world.sim.set_filter(Some(Arc::new(move |e: &Envelope<'_>| {
        if e.protocol == ProtocolKind::Cluster
            && e.direction == Direction::Request
            && e.body.get("operation") == Some(&json!("update"))
            && !has_votes(e.body, "promises")
        {
            counter.fetch_add(1, Ordering::SeqCst);
        }
        Verdict::Deliver
    })));
    let t = world.trx("healthy");
    assert!(matches!(world.pend(via, &t, 2, json!("healthy")).await.unwrap().unwrap(), PendResult::Success(_)));
    assert_eq!(phase1_asks.load(Ordering::SeqCst), 2, "both other peers are asked (the coordinator promises locally)");
    world.wait_idle().await;
    for peer in &world.peers {
        assert!(world.storages[peer].pending(&x(), &t).await.unwrap().is_some(), "every member applied the pend");
    }

    // One member swallows every cluster request: each write still lands, long before the 400 ms
    // request timeout (round trips take 2-10 virtual ms).
    let silent = others[world.sim.random(|r| r.gen_range(0..others.len()))];
    world.sim.set_filter(Some(Arc::new(move |e: &Envelope<'_>| {
        if e.protocol == ProtocolKind::Cluster && e.to == silent { Verdict::Drop } else { Verdict::Deliver }
    })));
    for i in 0..4 {
        let t = world.trx("silent");
        let started = Instant::now();
        let answer = world.pend(via, &t, 2, json!(i)).await.unwrap();
        assert!(matches!(answer, Ok(PendResult::Success(_))), "{answer:?}");
        let took = started.elapsed();
        assert!(took < Duration::from_millis(200), "the pend took {took:?} with one silent member");
    }
    world.settle().await;
    world.check().await
}

/// A member persists its promise: after a crash and restart it still rejects a conflicting record
/// while the first is live, and a re-delivery gets the same vote.
async fn restart_keeps_promises(seed: u64) -> String {
    let world = World::new(seed, 3, SimConfig::default()).await;
    world.bootstrap().await;
    let (t, u) = (world.trx("t"), world.trx("u"));
    assert!(matches!(world.pend(world.peers[0], &t, 2, json!("t")).await.unwrap().unwrap(), PendResult::Success(_)));
    assert!(matches!(world.pend(world.peers[1], &u, 2, json!("u")).await.unwrap().unwrap(), PendResult::Success(_)));
    world.wait_idle().await;
    let target = world.pick(&world.peers);
    let now = world.sim.clock().now_ms();
    let commit_of = |trx: &TrxId| {
        let op = RepoOperation::Commit(CommitRequest {
            trx_id: trx.clone(),
            block_ids: vec![x()],
            rev: 2,
            tail_id: x(),
            header_id: None,
        });
        record_for(&world.peers, &RepoMessage::new(op, now + 1_500))
    };
    let (first, second) = (commit_of(&t), commit_of(&u));
    let node = world.node(target).unwrap();
    let voted = node.consensus.on_update(world.peers[0], first.clone()).await.unwrap();
    let vote = voted.promises[&target.to_base58()].clone();
    assert!(vote.is_approve());

    world.crash(target);
    drop(node);
    world.start(target).await;
    let node = world.node(target).unwrap();
    assert_eq!(node.consensus.reserved_blocks().await, BTreeSet::from([x()]));
    let other = node.consensus.on_update(world.peers[0], second).await.unwrap();
    let refused = &other.promises[&target.to_base58()];
    assert_eq!(refused.r#type, VoteType::Reject);
    assert!(refused.reject_reason.as_deref().unwrap_or("").starts_with("conflict"), "{refused:?}");
    let again = node.consensus.on_update(world.peers[0], first.clone()).await.unwrap();
    assert_eq!(again.promises[&target.to_base58()], vote, "votes are final");
    // Nobody sends phase 2: recovery drops the reservation once every peer answered.
    world.settle().await;
    assert_eq!(node.consensus.status_of(&first).await.unwrap(), Some(RecordStatus::Aborted));
    world.check().await
}

// ---------------------------------------------------------------------------------------------
// Catch-up, byzantine peers and read contexts
// ---------------------------------------------------------------------------------------------

/// Counts the decided records (a promise quorum attached) sent to `to` on the cluster protocol.
fn is_decided_request_to(e: &Envelope<'_>, to: PeerId) -> bool {
    e.protocol == ProtocolKind::Cluster
        && e.direction == Direction::Request
        && e.to == to
        && e.body.get("operation") == Some(&json!("update"))
        && has_votes(e.body, "promises")
}

/// A member crashes when a decided record reaches it and restarts while the coordinator still
/// re-sends decided records to it, possibly behind by several revisions written meanwhile
/// (SPEC 4.6): it never applies a commit on a base it does not hold (sampled throughout: the
/// revision log stays exactly 1..=latest and the value the fold of the committed transforms), and
/// after settling every member has converged (SPEC 5.7).
async fn member_restarts_during_resends(seed: u64) -> String {
    let n = if seed.is_multiple_of(2) { 3 } else { 5 };
    let world = World::new(seed, n, SimConfig::default()).await;
    world.bootstrap().await;
    random_delays(&world);
    world.start_sampler(Duration::from_millis(20));
    let m = world.pick(&world.peers);
    let others: Vec<PeerId> = world.peers.iter().copied().filter(|p| *p != m).collect();
    let c = world.pick(&others);
    let crash_at = world.sim.random(|r| r.gen_range(1..=6usize));
    let restarts = world.sim.random(|r| r.gen_range(1..=2usize));
    let decided_seen = Arc::new(AtomicUsize::new(0));
    let armed = Arc::new(AtomicBool::new(true));
    let crashed = Arc::new(tokio::sync::Notify::new());
    {
        let (decided_seen, armed, crashed) = (decided_seen.clone(), armed.clone(), crashed.clone());
        world.sim.set_filter(Some(Arc::new(move |e: &Envelope<'_>| {
            if !is_decided_request_to(e, m) {
                return Verdict::Deliver;
            }
            let k = decided_seen.fetch_add(1, Ordering::SeqCst) + 1;
            if k >= crash_at && armed.swap(false, Ordering::SeqCst) {
                crashed.notify_one();
                return Verdict::CrashReceiver;
            }
            Verdict::Deliver
        })));
    }
    let writes = world.sim.random(|r| r.gen_range(6..=10usize));
    let side = spawn_side_writers(&world);
    let chaos_done = Arc::new(AtomicBool::new(false));
    let chaos_more = Arc::new(AtomicBool::new(true));
    let chaos = {
        let world = world.clone();
        let (armed, chaos_done, chaos_more) = (armed.clone(), chaos_done.clone(), chaos_more.clone());
        tokio::spawn(async move {
            for round in 0..restarts {
                crashed.notified().await;
                world.crash(m);
                // Down for a while (writes go on), then back while the coordinator's re-sends of
                // the record it crashed on, and of those it missed, may still be on their way.
                let down = world.sim.random(|r| r.gen_range(5..1_200));
                world.sim.trace_event(&format!("{m} crashed on a decided record; down for {down} ms"));
                tokio::time::sleep(Duration::from_millis(down)).await;
                world.sim.trace_event(&format!("{m} restarts at revision {}", world.latest_rev(m).await));
                world.start(m).await;
                if round + 1 < restarts && chaos_more.load(Ordering::SeqCst) {
                    armed.store(true, Ordering::SeqCst);
                } else {
                    break;
                }
            }
            chaos_done.store(true, Ordering::SeqCst);
        })
    };
    // Writes go on until the member has crashed and restarted (and a few more after).
    let mut committed = 0;
    for i in 0..MAX_CHAOS_WRITES {
        if i >= writes && chaos_done.load(Ordering::SeqCst) {
            break;
        }
        committed += usize::from(write_with_retries(&world, c, &format!("w{i}"), 4).await);
        if world.sim.random(|r| r.gen_bool(0.3)) {
            let reader = world.pick(&world.up());
            let _ = world.random_read(reader).await;
        }
    }
    assert!(committed > 0, "no write committed through {c}");
    if chaos_done.load(Ordering::SeqCst) || !world.sim.is_up(m) {
        // Done, or down and about to restart: no further round.
        chaos_more.store(false, Ordering::SeqCst);
        armed.store(false, Ordering::SeqCst);
        chaos.await.unwrap();
    } else {
        // The crash point was never reached: stop waiting for it.
        armed.store(false, Ordering::SeqCst);
        chaos.abort();
    }
    side.stop().await;
    world.check().await
}

/// A member is partitioned away while 20 or more commits go through, then the partition heals
/// while the coordinator still re-sends the last decided records: the member applies nothing
/// across a gap (it is at revision 1 and receives commits at revision 20+), catches up with
/// evidence (its catch-up keeps the evidence of every revision) and converges.
async fn far_behind_member(seed: u64) -> String {
    let n = if seed.is_multiple_of(2) { 3 } else { 5 };
    let world = World::new(seed, n, SimConfig::default()).await;
    world.bootstrap().await;
    random_delays(&world);
    world.start_sampler(Duration::from_millis(50));
    let m = world.pick(&world.peers);
    let rest: Vec<PeerId> = world.peers.iter().copied().filter(|p| *p != m).collect();
    let c = world.pick(&rest);
    world.sim.partition(&[vec![m], rest.clone()]);
    let side = spawn_side_writers(&world);
    let commits = world.sim.random(|r| r.gen_range(20..=30usize));
    let heal_after = commits - world.sim.random(|r| r.gen_range(0..=2usize));
    let mut committed = 0;
    for i in 0..commits {
        if i == heal_after {
            world.sim.heal();
        }
        assert!(write_with_retries(&world, c, &format!("p{i}"), 6).await, "write {i} through {c} failed");
        committed += 1;
    }
    world.sim.heal();
    // The re-sends and the next writes reach the member: it votes behind, waits, and catches up.
    for i in 0..3 {
        let via = world.pick(&world.peers);
        write_with_retries(&world, via, &format!("h{i}"), 6).await;
        let _ = world.random_read(world.pick(&world.peers)).await;
    }
    side.stop().await;
    world.wait_idle().await;
    let newest = world.latest_rev(c).await;
    assert!(newest > committed as u64, "the writes went through (latest {newest})");
    // The member caught up by itself (behind reports, before any settle-time catch-up).
    assert_eq!(world.latest_rev(m).await, newest, "{m} did not catch up after the partition healed");
    let node = world.node(m).unwrap();
    assert!(node.catch_up.reports() > 0, "{m} never reported being behind");
    for rev in 2..=newest {
        assert!(node.local.evidence(&x(), rev).await.unwrap().is_some(), "{m} keeps no evidence for revision {rev}");
    }
    world.check().await
}

/// Made-up Ed25519 identities (peers nobody has seen), drawn from the seed.
fn made_up_keys(world: &World, count: usize) -> Vec<Keypair> {
    (0..count)
        .map(|_| {
            let mut secret: [u8; 32] = world.sim.random(|r| r.r#gen());
            Keypair::ed25519_from_bytes(&mut secret).unwrap()
        })
        .collect()
}

fn set_value(value: Value) -> Transform {
    Transform { updates: Some(vec![BlockOperation::set("value", value)]), ..Transform::default() }
}

fn pend_op(trx_id: &TrxId, rev: u64, value: Value) -> RepoOperation {
    RepoOperation::Pend(PendRequest {
        trx_id: trx_id.clone(),
        rev: Some(rev),
        transforms: Transforms {
            updates: BTreeMap::from([(x(), vec![BlockOperation::set("value", value)])]),
            ..Transforms::default()
        },
        policy: PendPolicy::Continue,
    })
}

fn commit_op(trx_id: &TrxId, rev: u64) -> RepoOperation {
    RepoOperation::Commit(CommitRequest {
        trx_id: trx_id.clone(),
        block_ids: vec![x()],
        rev,
        tail_id: x(),
        header_id: None,
    })
}

/// A record among `peers` with approving (or rejecting) promises signed by `signers`.
fn signed(
    peers: &[PeerId],
    operation: RepoOperation,
    expiration: u64,
    signers: &[&Keypair],
    vote: VoteType,
) -> ClusterRecord {
    let mut record = record_for(peers, &RepoMessage::new(operation, expiration));
    for signer in signers {
        let signed = record
            .sign_promise(signer, vote, (vote == VoteType::Reject).then(|| "conflict: made up".to_owned()))
            .unwrap();
        record.promises.insert(signer.public().to_peer_id().to_base58(), signed);
    }
    record
}

/// What the byzantine peer's sync protocol serves.
#[derive(Clone)]
struct Forger {
    byz: Keypair,
    view: Vec<PeerId>,
    made_up: Vec<Keypair>,
    honest: SyncServer,
    /// Also serve evidence whose peer set is the whole view plus made-up peers, "decided" by the
    /// forger and its made-up peers (their approvals outnumber the view's).
    inflate: bool,
    served: Arc<AtomicUsize>,
    clock: Arc<dyn optimystic_core::consensus::Clock>,
}

impl Forger {
    /// A forged page: one entry at `rev` (what the asker expects), of one of several kinds.
    async fn page(&self, block_id: &BlockId, rev: u64) -> Value {
        let kind = self.served.fetch_add(1, Ordering::SeqCst);
        let trx = TrxId::new(format!("forged-{kind}")).unwrap();
        let transform = set_value(json!(format!("forged {kind}")));
        let expiration = self.clock.now_ms() + 1_000;
        let byz_id = self.byz.public().to_peer_id();
        let mut entry = json!({"trxId": trx.as_str(), "rev": rev, "transform": transform});
        // The inflated kind alone when asked for (it is the known hole), else the four others.
        let variant = if self.inflate { 4 } else { kind % 4 };
        match variant {
            // No evidence: only a quorum of the view reporting it identically would do.
            0 => {}
            // Evidence decided by made-up peers (and the forger) among themselves.
            1 => {
                let peers: Vec<PeerId> =
                    std::iter::once(byz_id).chain(self.made_up.iter().map(|k| k.public().to_peer_id())).collect();
                let signers: Vec<&Keypair> = std::iter::once(&self.byz).chain(self.made_up.iter()).collect();
                entry["evidence"] = json!({
                    "pend": signed(&peers, pend_op(&trx, rev, json!(format!("forged {kind}"))), expiration, &signers, VoteType::Approve).to_value(),
                    "commit": signed(&peers, commit_op(&trx, rev), expiration, &signers, VoteType::Approve).to_value(),
                });
            }
            // Genuine evidence of a real revision with its transform tampered with.
            2 => {
                let request = json!({"op": "revisions", "blockId": block_id.as_str(), "afterRev": rev.saturating_sub(1), "limit": 1});
                if let Ok(real) = self.honest.handle(request).await
                    && let Some(first) = real["entries"].get(0)
                {
                    entry = first.clone();
                    entry["transform"] = serde_json::to_value(&transform).unwrap();
                }
            }
            // Genuine evidence of the previous revision, replayed for this one.
            3 => {
                let request = json!({"op": "revisions", "blockId": block_id.as_str(), "afterRev": rev.saturating_sub(2), "limit": 1});
                if let Ok(real) = self.honest.handle(request).await
                    && let Some(first) = real["entries"].get(0)
                {
                    entry = first.clone();
                    entry["rev"] = json!(rev);
                }
            }
            // Inflated evidence: the whole view plus more made-up peers than the view has,
            // approved by the forger and the made-up peers only.
            _ => {
                let peers: Vec<PeerId> =
                    self.view.iter().copied().chain(self.made_up.iter().map(|k| k.public().to_peer_id())).collect();
                let signers: Vec<&Keypair> = std::iter::once(&self.byz).chain(self.made_up.iter()).collect();
                entry["evidence"] = json!({
                    "pend": signed(&peers, pend_op(&trx, rev, json!(format!("forged {kind}"))), expiration, &signers, VoteType::Approve).to_value(),
                    "commit": signed(&peers, commit_op(&trx, rev), expiration, &signers, VoteType::Approve).to_value(),
                });
            }
        }
        json!({"latest": {"trxId": "forged-top", "rev": 1_000_000}, "entries": [entry], "more": true})
    }

    fn forgery(self) -> SyncForgery {
        Arc::new(move |request: Value| {
            let forger = self.clone();
            Box::pin(async move {
                match request.get("op").and_then(Value::as_str) {
                    Some("latest") => {
                        let ids = request["blockIds"].as_array().cloned().unwrap_or_default();
                        let latest: serde_json::Map<String, Value> = ids
                            .iter()
                            .filter_map(Value::as_str)
                            .map(|id| (id.to_owned(), json!({"trxId": "forged-top", "rev": 1_000_000})))
                            .collect();
                        Some(json!({"latest": latest}))
                    }
                    Some("revisions") => {
                        let block_id = BlockId::new(request["blockId"].as_str()?).ok()?;
                        let after = request["afterRev"].as_u64().unwrap_or(0);
                        Some(forger.page(&block_id, after + 1).await)
                    }
                    _ => None,
                }
            })
        })
    }
}

/// Bytes of padding the lying peer adds to each record it serves.
const PADDING_BYTES: usize = 16 * 1024;
/// Marks the lying peer's padding, so the scenario can look for it in storage.
const PADDING_MARK: &str = "byzantine-padding:";

/// What a byzantine member's sync protocol serves in `byzantine_evidence`: it claims revision
/// 1,000,000 of every block and answers each page, in turn, with its honest entries padded
/// (an unknown field of [`PADDING_BYTES`] at the top level and in each peer entry and commit
/// vote of every record), with their execution proof withheld (commit votes removed: decided
/// records it could have renounced), with the transforms forged under the real evidence, or
/// with an error.
#[derive(Clone)]
struct Liar {
    honest: SyncServer,
    served: Arc<AtomicUsize>,
}

impl Liar {
    fn pad(record: &mut Value) {
        let padding = json!(format!("{PADDING_MARK}{}", "p".repeat(PADDING_BYTES)));
        record["padding"] = padding.clone();
        for field in ["peers", "commits"] {
            if let Some(entries) = record.get_mut(field).and_then(Value::as_object_mut) {
                for entry in entries.values_mut() {
                    entry["padding"] = padding.clone();
                }
            }
        }
    }

    async fn page(&self, request: Value) -> Value {
        let kind = self.served.fetch_add(1, Ordering::SeqCst) % 4;
        if kind == 3 {
            return json!({"error": {"code": "unavailable", "message": "not today"}});
        }
        let Ok(mut page) = self.honest.handle(request).await else {
            return json!({"error": {"code": "internal", "message": "no honest page"}});
        };
        page["latest"] = json!({"trxId": "forged-top", "rev": 1_000_000});
        page["more"] = json!(true);
        for entry in page["entries"].as_array_mut().into_iter().flatten() {
            let Some(evidence) = entry.get_mut("evidence").and_then(Value::as_object_mut) else { continue };
            for record in evidence.values_mut() {
                match kind {
                    0 => Self::pad(record),
                    1 => record["commits"] = json!({}),
                    _ => {}
                }
            }
            if kind == 2 {
                entry["transform"] = serde_json::to_value(set_value(json!("forged transform"))).unwrap();
            }
        }
        page
    }

    fn forgery(self) -> SyncForgery {
        Arc::new(move |request: Value| {
            let liar = self.clone();
            Box::pin(async move {
                match request.get("op").and_then(Value::as_str) {
                    Some("latest") => {
                        let ids = request["blockIds"].as_array().cloned().unwrap_or_default();
                        let latest: serde_json::Map<String, Value> = ids
                            .iter()
                            .filter_map(Value::as_str)
                            .map(|id| (id.to_owned(), json!({"trxId": "forged-top", "rev": 1_000_000})))
                            .collect();
                        Some(json!({"latest": latest}))
                    }
                    Some("revisions") => Some(liar.page(request).await),
                    _ => None,
                }
            })
        })
    }
}

/// Issue 21 (findings 1, 4, 8, 15) with a byzantine member: its sync protocol claims revision
/// 1,000,000 and serves padded evidence, evidence with its execution proof withheld, forged
/// transforms under real evidence, or errors, while a member misses writes and catches up
/// (catch-up asks it first: it claims the newest revision). Honest nodes apply nothing forged,
/// store none of its padding, converge, and every quorum read at an honest node succeeds once
/// writes stop (a majority agrees; the unproven claim does not fail it).
async fn byzantine_evidence(seed: u64) -> String {
    let world = World::new(seed, 5, SimConfig::default()).await;
    let byz = world.pick(&world.peers);
    let honest: Vec<PeerId> = world.peers.iter().copied().filter(|p| *p != byz).collect();
    let liar = Liar {
        honest: SyncServer::new(StorageRepo::new(Arc::new(world.storages[&byz].clone()))),
        served: Arc::new(AtomicUsize::new(0)),
    };
    let served = liar.served.clone();
    world.crash(byz);
    world.forgeries.lock().unwrap().insert(byz, liar.forgery());
    world.start(byz).await;
    world.bootstrap().await;
    random_delays(&world);
    world.start_sampler(Duration::from_millis(50));
    let side = spawn_side_writers(&world);

    let m = world.pick(&honest);
    let rest: Vec<PeerId> = world.peers.iter().copied().filter(|p| *p != m).collect();
    let c = world.pick(&honest.iter().copied().filter(|p| *p != m).collect::<Vec<_>>());
    world.sim.partition(&[vec![m], rest]);
    let missed = world.sim.random(|r| r.gen_range(3..=8usize));
    for i in 0..missed {
        assert!(write_with_retries(&world, c, &format!("p{i}"), 6).await, "write {i} failed");
    }
    world.sim.heal();
    for i in 0..3 {
        write_with_retries(&world, world.pick(&honest), &format!("h{i}"), 6).await;
        let _ = world.random_read(world.pick(&honest)).await;
    }
    side.stop().await;
    world.wait_idle().await;
    world.catch_up_everywhere().await;
    for peer in &honest {
        let read = world.read(*peer, ReadMode::Quorum, None, Vec::new(), None).await;
        assert!(
            matches!(read, Some(Ok(_))),
            "a quorum read at {peer} failed on the byzantine peer's unproven claim: {read:?}"
        );
    }
    let snapshots = world.snapshots().await;
    for peer in &honest {
        for (key, value) in world.storages[peer].list_meta("", 100_000).await.unwrap() {
            assert!(
                !String::from_utf8_lossy(&value).contains(PADDING_MARK),
                "{peer} stored the byzantine peer's padding under {key} ({} bytes)",
                value.len()
            );
        }
        for rev in &snapshots.iter().find(|s| s.peer == *peer).unwrap().blocks[&x()].revisions {
            assert!(!rev.trx_id.as_str().starts_with("forged"), "{peer} applied a forged revision: {rev:?}");
        }
    }
    let trace = world.check().await;
    assert!(served.load(Ordering::SeqCst) > 0, "no catch-up ever asked the byzantine peer for a page");
    format!("{trace} pages served by the liar {}", served.load(Ordering::SeqCst))
}

/// The byzantine peer sends records naming made-up peers to `target`: each is refused and leaves
/// no reservation and no block change behind. Returns how many 2pc metadata entries the target
/// gained from the records that are answered rather than refused (an abort proven by made-up
/// rejections, a status query of an expired made-up record).
async fn send_made_up_records(world: &World, byz: &Keypair, target: PeerId, made_up: &[Keypair]) -> usize {
    let byz_id = byz.public().to_peer_id();
    let net = world.sim.network(byz_id);
    let now = world.sim.clock().now_ms();
    let latest = world.latest_rev(target).await;
    let ids: Vec<PeerId> = made_up.iter().map(|k| k.public().to_peer_id()).collect();
    let inflated: Vec<PeerId> = world.peers.iter().copied().chain(ids.iter().copied()).collect();
    let trx = TrxId::new("made-up").unwrap();
    let made_up_signers: Vec<&Keypair> = made_up.iter().collect();
    let byz_and_made_up: Vec<&Keypair> = std::iter::once(byz).chain(made_up.iter()).collect();
    let cases = [
        (
            "phase 1 naming a made-up peer",
            record_for(
                &[world.peers.clone(), vec![ids[0]]].concat(),
                &RepoMessage::new(pend_op(&trx, latest + 1, json!("m")), now + 1_000),
            ),
        ),
        (
            "phase 1 among made-up peers",
            record_for(
                &[vec![target, byz_id], ids[..3].to_vec()].concat(),
                &RepoMessage::new(pend_op(&trx, latest + 1, json!("m")), now + 1_000),
            ),
        ),
        (
            "phase 1 without the sender",
            record_for(
                &[vec![target], ids[..2].to_vec()].concat(),
                &RepoMessage::new(commit_op(&trx, latest + 1), now + 1_000),
            ),
        ),
        (
            "decided by made-up peers outnumbering the view",
            signed(&inflated, commit_op(&trx, latest + 1), now + 1_000, &byz_and_made_up, VoteType::Approve),
        ),
        (
            "pend decided by made-up peers outnumbering the view",
            signed(&inflated, pend_op(&trx, latest + 1, json!("m")), now + 1_000, &byz_and_made_up, VoteType::Approve),
        ),
    ];
    let before = snapshot(target, &world.storages[&target], &[x()]).await.unwrap();
    for (name, record) in cases {
        let answer = net.request(target, ProtocolKind::Cluster, update_request(&record), Duration::from_secs(1)).await;
        assert!(
            matches!(&answer, Err(NetworkError::Remote { code, .. }) if code == ErrorCode::BadRequest.as_str()),
            "{name}: expected a refusal, got {answer:?}"
        );
        let node = world.node(target).unwrap();
        assert!(node.consensus.reserved_blocks().await.is_empty(), "{name} left a reservation");
        assert_eq!(snapshot(target, &world.storages[&target], &[x()]).await.unwrap(), before, "{name} changed a block");
    }
    // Answered, not refused: what do they make the target store?
    let meta_before = world.storages[&target].list_meta("2pc/", 100_000).await.unwrap().len();
    let abort = signed(&inflated, commit_op(&trx, latest + 1), now + 1_000, &made_up_signers, VoteType::Reject);
    let _ = net.request(target, ProtocolKind::Cluster, update_request(&abort), Duration::from_secs(1)).await;
    let expired = record_for(&inflated, &RepoMessage::new(commit_op(&trx, latest + 1), now.saturating_sub(10_000)));
    let status = json!({"operation": "status", "record": expired.to_value()});
    let _ = net.request(target, ProtocolKind::Cluster, status, Duration::from_secs(1)).await;
    let node = world.node(target).unwrap();
    assert!(node.consensus.reserved_blocks().await.is_empty(), "an answered made-up record left a reservation");
    assert_eq!(
        snapshot(target, &world.storages[&target], &[x()]).await.unwrap(),
        before,
        "a made-up record changed a block"
    );
    world.storages[&target].list_meta("2pc/", 100_000).await.unwrap().len().saturating_sub(meta_before)
}

/// A byzantine member (it votes honestly but its sync protocol lies: it claims revision 1,000,000
/// and serves invented revisions without evidence, with evidence decided among made-up peers,
/// with genuine evidence and a tampered transform, or with the previous revision's evidence
/// replayed; and it sends records naming made-up peers). Honest members apply nothing it
/// invents: their histories stay the honest one, the made-up records are refused and hold no
/// reservation (SPEC 4.10, 4.11, 5.8).
async fn byzantine_peer(seed: u64, inflate: bool) -> String {
    let world = World::new(seed, 5, SimConfig::default()).await;
    let byz = world.pick(&world.peers);
    let honest: Vec<PeerId> = world.peers.iter().copied().filter(|p| *p != byz).collect();
    let made_up = made_up_keys(&world, 6);
    let forger = Forger {
        byz: world.keys[&byz].clone(),
        view: world.peers.clone(),
        made_up: made_up.clone(),
        honest: SyncServer::new(StorageRepo::new(Arc::new(world.storages[&byz].clone()))),
        inflate,
        served: Arc::new(AtomicUsize::new(0)),
        clock: world.sim.clock(),
    };
    let served = forger.served.clone();
    world.crash(byz);
    world.forgeries.lock().unwrap().insert(byz, forger.forgery());
    world.start(byz).await;
    world.bootstrap().await;
    random_delays(&world);
    world.start_sampler(Duration::from_millis(50));
    let side = spawn_side_writers(&world);

    // A member misses some commits; every catch-up asks the byzantine peer first (it claims the
    // newest revision).
    let m = world.pick(&honest);
    let rest: Vec<PeerId> = world.peers.iter().copied().filter(|p| *p != m).collect();
    let c = world.pick(&honest.iter().copied().filter(|p| *p != m).collect::<Vec<_>>());
    world.sim.partition(&[vec![m], rest]);
    let missed = world.sim.random(|r| r.gen_range(3..=8usize));
    for i in 0..missed {
        assert!(write_with_retries(&world, c, &format!("p{i}"), 6).await, "write {i} failed");
    }
    world.sim.heal();
    for i in 0..3 {
        write_with_retries(&world, world.pick(&honest), &format!("h{i}"), 6).await;
        let _ = world.random_read(world.pick(&honest)).await;
    }
    side.stop().await;
    world.wait_idle().await;
    let no_forged_revision = async || {
        for snap in world.snapshots().await {
            for rev in &snap.blocks[&x()].revisions {
                assert!(
                    !rev.trx_id.as_str().starts_with("forged") && rev.trx_id.as_str() != "made-up",
                    "{} applied a revision the byzantine peer invented: {rev:?}",
                    snap.peer
                );
            }
        }
    };
    no_forged_revision().await;
    let target = world.pick(&honest);
    let stored = send_made_up_records(&world, &world.keys[&byz], target, &made_up).await;
    let trace = world.check().await;
    assert!(served.load(Ordering::SeqCst) > 0, "no catch-up ever asked the byzantine peer for a page");
    no_forged_revision().await;
    format!("{trace} made-up records stored {stored} 2pc entries")
}

/// SPEC 4.11 / 5.8: records a single peer makes up (naming made-up peers) make a member store
/// nothing: an abort "proven" by made-up rejections and a status query of an expired made-up
/// record are answered without persisting anything.
async fn made_up_records_store_nothing(seed: u64) -> String {
    let world = World::new(seed, 5, SimConfig::default()).await;
    world.bootstrap().await;
    let byz = world.pick(&world.peers);
    let honest: Vec<PeerId> = world.peers.iter().copied().filter(|p| *p != byz).collect();
    let target = world.pick(&honest);
    let made_up = made_up_keys(&world, 6);
    let stored = send_made_up_records(&world, &world.keys[&byz], target, &made_up).await;
    assert_eq!(stored, 0, "records invented by one peer made {target} store {stored} 2pc entries");
    world.check().await
}

/// SPEC 2.1: a read whose context names a transaction that was pended but never committed (and
/// one that exists nowhere) answers with the reader's context on a member, for that answer only:
/// storage is unchanged, nothing is promoted, and a later commit of another transaction at that
/// revision goes through.
async fn read_with_uncommitted_context(seed: u64) -> String {
    let world = World::new(seed, 3, SimConfig::default()).await;
    world.bootstrap().await;
    random_delays(&world);
    let c = world.pick(&world.peers);
    let t = world.trx("never");
    assert!(matches!(world.pend(c, &t, 2, json!("never")).await.unwrap().unwrap(), PendResult::Success(_)));
    world.wait_idle().await;
    let ghost = TrxId::new("ghost").unwrap();
    let t_at_2 = TrxRev { trx_id: t.clone(), rev: 2 };
    let ghost_at_2 = TrxRev { trx_id: ghost.clone(), rev: 2 };
    let asserted = vec![(t_at_2.clone(), set_value(json!("never")))];
    let before = world.snapshots().await;
    let meta_before: Vec<_> = {
        let mut all = Vec::new();
        for peer in &world.peers {
            all.push(world.storages[peer].list_meta("", 100_000).await.unwrap());
        }
        all
    };
    for peer in world.peers.clone() {
        for mode in [ReadMode::Local, ReadMode::Quorum] {
            let context = TrxContext { committed: vec![t_at_2.clone()], rev: 2, trx_id: None };
            let (latest, value) = world.read(peer, mode, Some(context), asserted.clone(), None).await.unwrap().unwrap();
            assert_eq!(latest.map(|l| l.rev), Some(1));
            assert_eq!(value.unwrap().fields["value"], json!("never"), "the reader's context is in its own answer");
            // The reader's own pending transaction.
            let context = TrxContext { committed: vec![], rev: 1, trx_id: Some(t.clone()) };
            let (_, value) = world
                .read(peer, mode, Some(context), Vec::new(), Some(set_value(json!("never"))))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(value.unwrap().fields["value"], json!("never"));
            // A transaction pending nowhere is left out.
            let context = TrxContext { committed: vec![ghost_at_2.clone()], rev: 2, trx_id: None };
            let (_, value) = world.read(peer, mode, Some(context), Vec::new(), None).await.unwrap().unwrap();
            assert_eq!(value.unwrap().fields["value"], json!(0));
        }
        // The local repository itself (AnswerOnly, as the consensus asks) and the coordinator.
        let node = world.node(peer).unwrap();
        assert_eq!(node.local.read_promotion(), ReadPromotion::AnswerOnly);
        let gets = BlockGets {
            block_ids: vec![x()],
            context: Some(TrxContext { committed: vec![t_at_2.clone(), ghost_at_2.clone()], rev: 2, trx_id: None }),
            read_mode: None,
        };
        let answer = node.local.get(&gets, &MessageOptions::default()).await.unwrap();
        assert_eq!(answer[&x()].block.as_ref().unwrap().fields["value"], json!("never"));
        let answer = node.repo.get(&gets, &MessageOptions::default()).await.unwrap();
        assert_eq!(answer[&x()].block.as_ref().unwrap().fields["value"], json!("never"));
    }
    world.wait_idle().await;
    assert_eq!(world.snapshots().await, before, "a read changed storage");
    for (peer, meta) in world.peers.iter().zip(&meta_before) {
        assert_eq!(
            &world.storages[peer].list_meta("", 100_000).await.unwrap(),
            meta,
            "a read changed {peer}'s metadata"
        );
    }
    // Another transaction takes revision 2; the reader's assertion is then simply out of date.
    let u = world.trx("other");
    assert!(matches!(world.pend(c, &u, 2, json!("other")).await.unwrap().unwrap(), PendResult::Success(_)));
    assert!(matches!(world.commit(c, &u, 2).await.unwrap().unwrap(), CommitResult::Success(_)));
    world.wait_idle().await;
    for peer in world.peers.clone() {
        let context = TrxContext { committed: vec![t_at_2.clone()], rev: 2, trx_id: None };
        let (latest, value) =
            world.read(peer, ReadMode::Quorum, Some(context), asserted.clone(), None).await.unwrap().unwrap();
        assert_eq!(latest, Some(TrxRev { trx_id: u.clone(), rev: 2 }));
        assert_eq!(value.unwrap().fields["value"], json!("other"));
    }
    let trace = world.check().await;
    for snap in world.snapshots().await {
        assert!(snap.blocks[&x()].revisions.iter().all(|r| r.trx_id != t), "{snap:?}");
    }
    trace
}

/// SPEC 4.6: a decided record waiting for catch-up that cannot happen yet is retried at a
/// bounded pace, never in a busy loop: first while every sync answer is lost (each catch-up
/// attempt waits for its timeout), then while every other peer is down (each attempt fails at
/// once). The member catches up once the cluster is back.
async fn waiting_record_backs_off(seed: u64) -> String {
    let world = World::new(seed, 3, SimConfig::default()).await;
    world.bootstrap().await;
    let m = world.pick(&world.peers);
    let rest: Vec<PeerId> = world.peers.iter().copied().filter(|p| *p != m).collect();
    let c = world.pick(&rest);
    // m misses two commits entirely.
    world.sim.partition(&[vec![m], rest.clone()]);
    for i in 0..2 {
        assert!(write_with_retries(&world, c, &format!("p{i}"), 4).await);
    }
    world.wait_idle().await;
    // Past the records' lifetime: the coordinator has stopped re-sending them to m.
    tokio::time::sleep(Duration::from_millis(2 * consensus_config().record_timeout_ms)).await;
    assert_eq!(world.latest_rev(m).await, 1);
    // Sync is cut for m; then the decided records of revision 4 reach it (it is at 1).
    world.sim.heal();
    world.sim.set_filter(Some(Arc::new(move |e: &Envelope<'_>| {
        if e.protocol == ProtocolKind::Sync && (e.from == m || e.to == m) { Verdict::Drop } else { Verdict::Deliver }
    })));
    assert!(write_with_retries(&world, c, "late", 4).await);
    let node = world.node(m).unwrap();
    let window = Duration::from_secs(10);
    let before = node.catch_up.reports();
    tokio::time::sleep(window).await;
    let lost_answers = node.catch_up.reports() - before;
    assert_eq!(world.latest_rev(m).await, 1, "{m} caught up without sync");
    assert!(node.consensus.live_reservations() > 0, "{m} holds the decided records it waits to apply");
    // Every other peer goes down: catch-up attempts now fail at once.
    world.sim.set_filter(None);
    for peer in &rest {
        world.crash(*peer);
    }
    let before = node.catch_up.reports();
    tokio::time::sleep(window).await;
    let peers_down = node.catch_up.reports() - before;
    assert!(
        lost_answers <= 1_000 && peers_down <= 1_000,
        "{m} reported being behind {lost_answers} times in {window:?} with sync answers lost and {peers_down} times with \
         its peers down: a retry loop without backoff"
    );
    world.check().await
}

/// `ReadMode::Quorum` (core/src/reads.rs): "a quorum read never misses an acknowledged commit".
/// A member that missed a commit reads in quorum mode while its catch-up cannot fetch the
/// revisions (its sync `revisions` requests are lost, `latest` answers arrive): the read must not
/// answer the older revision as if it were current (it may fail with a retryable error).
async fn quorum_read_sees_acknowledged_commits(seed: u64) -> String {
    let world = World::new(seed, 3, SimConfig::default()).await;
    world.bootstrap().await;
    let m = world.pick(&world.peers);
    let rest: Vec<PeerId> = world.peers.iter().copied().filter(|p| *p != m).collect();
    world.sim.partition(&[vec![m], rest.clone()]);
    assert!(write_with_retries(&world, rest[0], "acked", 4).await);
    world.wait_idle().await;
    tokio::time::sleep(Duration::from_millis(2 * consensus_config().record_timeout_ms)).await;
    world.sim.heal();
    world.sim.set_filter(Some(Arc::new(move |e: &Envelope<'_>| {
        let revisions = e.body.get("op") == Some(&json!("revisions"));
        if e.protocol == ProtocolKind::Sync && e.from == m && revisions { Verdict::Drop } else { Verdict::Deliver }
    })));
    let answer = world.read(m, ReadMode::Quorum, None, Vec::new(), None).await.unwrap();
    if let Err(e) = &answer {
        assert!(is_retryable(e), "a quorum read failed with {e}");
    }
    world.check().await
}

/// An outside sender (a throw-away id, in no peer set) sends `target` a phase-1 pend of `x`
/// naming `peers` and never decides it; returns the record. The target promises it (x is free).
async fn pin_x(world: &World, target: PeerId, peers: &[PeerId], label: &str) -> ClusterRecord {
    let outsider = made_up_keys(world, 1)[0].public().to_peer_id();
    let net = world.sim.network(outsider);
    let now = world.sim.clock().now_ms();
    let latest = world.latest_rev(target).await;
    let trx = world.trx(label);
    let message = RepoMessage::new(pend_op(&trx, latest + 1, json!(label)), now + world.config.record_timeout_ms);
    let record = record_for(peers, &message);
    let answer = net.request(target, ProtocolKind::Cluster, update_request(&record), Duration::from_secs(1)).await;
    let answer = ClusterRecord::from_value(answer.unwrap()).unwrap();
    assert!(answer.promises[&target.to_base58()].is_approve(), "{target} did not promise the pin: {answer:?}");
    record
}

/// Whether `peer` (running) holds a reservation on `x`.
async fn pins_x(world: &World, peer: PeerId) -> bool {
    world.node(peer).unwrap().consensus.reserved_blocks().await.contains(&x())
}

/// Issue 21 finding 3 / SPEC 4.5: one member answers every recovery status query "pending"
/// forever (it votes honestly otherwise). An outside sender with throw-away ids pins `x` on each
/// honest member with a phase-1 record it never decides, while side writers run. The pins hold
/// until `recovery_bound_ms` past their expiration (the liar may have executed them); then the
/// honest members' signed renounces (a majority of each peer set) release them, writes on `x`
/// succeed, and the history converges.
async fn lying_status_member(seed: u64) -> String {
    let world = World::configured(seed, 3, SimConfig::default(), bounded_config()).await;
    let liar = world.pick(&world.peers);
    let honest: Vec<PeerId> = world.peers.iter().copied().filter(|p| *p != liar).collect();
    world.crash(liar);
    world.liars.lock().unwrap().insert(liar);
    world.start(liar).await;
    world.bootstrap().await;
    random_delays(&world);
    world.start_sampler(Duration::from_millis(50));
    let side = spawn_side_writers(&world);
    for (i, target) in honest.iter().enumerate() {
        pin_x(&world, *target, &world.peers, &format!("pin{i}")).await;
    }
    let pinned_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(world.config.record_timeout_ms + BOUND_MS / 2)).await;
    for target in &honest {
        assert!(pins_x(&world, *target).await, "{target} dropped a pin before the bound");
    }
    tokio::time::sleep(Duration::from_millis(BOUND_MS / 2 + 2 * world.config.recovery_backoff_max_ms)).await;
    for target in &honest {
        assert!(!pins_x(&world, *target).await, "{target} still pinned {:?} after the pin", pinned_at.elapsed());
    }
    for i in 0..3 {
        assert!(
            write_with_retries(&world, world.pick(&honest), &format!("h{i}"), 6).await,
            "write {i} after the bound"
        );
        let _ = world.random_read(world.pick(&honest)).await;
    }
    side.stop().await;
    world.check().await
}

/// Issue 21 finding 3 (variant) / SPEC 4.5: a record's peer set names a peer the members saw,
/// which has since departed (down until the final check). An outside sender pins `x` on one
/// member with a phase-1 record naming the whole cluster; with the departed peer silent, every
/// write on `x` needs that member. Past `recovery_bound_ms` the signed renounces of the live
/// members (a majority) release the pin, honest writes on `x` succeed while the peer is still
/// gone, and the history converges once it is back.
async fn departed_peer_in_peer_set(seed: u64) -> String {
    let world = World::configured(seed, 4, SimConfig::default(), bounded_config()).await;
    world.bootstrap().await;
    let gone = world.pick(&world.peers);
    world.crash(gone);
    let live: Vec<PeerId> = world.peers.iter().copied().filter(|p| *p != gone).collect();
    random_delays(&world);
    world.start_sampler(Duration::from_millis(50));
    let side = spawn_side_writers(&world);
    let target = world.pick(&live);
    pin_x(&world, target, &world.peers, "pin").await;
    tokio::time::sleep(Duration::from_millis(world.config.record_timeout_ms + BOUND_MS / 2)).await;
    assert!(pins_x(&world, target).await, "{target} dropped the pin before the bound");
    tokio::time::sleep(Duration::from_millis(BOUND_MS / 2 + 2 * world.config.recovery_backoff_max_ms)).await;
    assert!(!pins_x(&world, target).await, "{target} still pinned past the bound by a departed peer");
    for i in 0..3 {
        assert!(write_with_retries(&world, world.pick(&live), &format!("h{i}"), 6).await, "write {i} after the bound");
        let _ = world.random_read(world.pick(&live)).await;
    }
    assert!(!world.sim.is_up(gone));
    side.stop().await;
    world.check().await
}

/// Issue 21 finding 2 / SPEC 4.4: one member of block `x`'s cluster votes honestly but forges
/// the result next to each approving commit vote ("stale revision"). Four nodes, clusters of
/// three: clients write through every node, the one outside `x`'s cluster included (its
/// coordinator counts no result of its own). No client is told "stale" (or any failure) for a
/// write that committed (the history checker's `CommittedAfterFailure`), every acknowledged write
/// is on a majority, and the replicas converge. On the code before, the coordinator answered with
/// the first approving member's unsigned result, so writes through the outside node were
/// answered "stale" although they committed.
async fn byzantine_results(seed: u64) -> String {
    let world = World::new_sized(seed, 4, 3, SimConfig::default()).await;
    let cluster = world.cluster_of(&x());
    let byz = world.pick(&cluster);
    let outside: Vec<PeerId> = world.peers.iter().copied().filter(|p| !cluster.contains(p)).collect();
    world.crash(byz);
    world.result_forgers.lock().unwrap().insert(byz);
    world.start(byz).await;
    world.bootstrap().await;
    random_delays(&world);
    world.start_sampler(Duration::from_millis(50));
    let side = spawn_side_writers(&world);
    let writes = world.sim.random(|r| r.gen_range(6..=12usize));
    let mut acknowledged = 0;
    for i in 0..writes {
        // Half the writes go through the node outside the cluster.
        let via = if i % 2 == 0 { world.pick(&outside) } else { world.pick(&world.peers) };
        acknowledged += usize::from(write_with_retries(&world, via, &format!("w{i}"), 6).await);
        if world.sim.random(|r| r.gen_bool(0.3)) {
            let _ = world.random_read(world.pick(&world.peers)).await;
        }
    }
    side.stop().await;
    assert!(acknowledged > 0, "no write was acknowledged");
    world.check().await
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn sim_byzantine_results() {
    run_batched("sim_byzantine_results", |seed| Box::pin(byzantine_results(seed)));
}

#[test]
fn sim_minority_partition() {
    run_batched("sim_minority_partition", |seed| Box::pin(minority_partition(seed)));
}

#[test]
fn sim_coordinator_dies_after_phase1() {
    run_batched("sim_coordinator_dies_after_phase1", |seed| Box::pin(coordinator_crash(seed, true)));
}

#[test]
fn sim_coordinator_dies_in_phase2() {
    run_batched("sim_coordinator_dies_in_phase2", |seed| Box::pin(coordinator_crash(seed, false)));
}

#[test]
fn sim_member_crash_restart() {
    run_batched("sim_member_crash_restart", |seed| Box::pin(member_crash_restart(seed)));
}

#[test]
fn sim_conflicting_writers() {
    run_batched("sim_conflicting_writers", |seed| Box::pin(conflicting_writers(seed)));
}

#[test]
fn sim_refusals() {
    run("sim_refusals", |seed| Box::pin(refusals(seed)));
}

#[test]
fn sim_phase1_asks_everyone_and_waits_for_a_quorum() {
    run("sim_phase1_asks_everyone_and_waits_for_a_quorum", |seed| {
        Box::pin(phase1_asks_everyone_and_waits_for_a_quorum(seed))
    });
}

#[test]
fn sim_restart_keeps_promises() {
    run("sim_restart_keeps_promises", |seed| Box::pin(restart_keeps_promises(seed)));
}

/// A seed replays exactly: the same operations, outcomes and final storage.
#[test]
fn sim_seeds_replay() {
    let scenarios: [Scenario; 4] = [
        |seed| Box::pin(conflicting_writers(seed)),
        |seed| Box::pin(coordinator_crash(seed, false)),
        |seed| Box::pin(member_restarts_during_resends(seed)),
        |seed| Box::pin(byzantine_peer(seed, false)),
    ];
    for scenario in scenarios {
        for seed in [1, 2, 3] {
            assert_eq!(run_seed(scenario, seed), run_seed(scenario, seed), "seed {seed} did not replay");
        }
    }
}

#[test]
fn sim_member_restarts_during_resends() {
    run_batched("sim_member_restarts_during_resends", |seed| Box::pin(member_restarts_during_resends(seed)));
}

#[test]
fn sim_far_behind_member() {
    run_batched("sim_far_behind_member", |seed| Box::pin(far_behind_member(seed)));
}

#[test]
fn sim_byzantine_peer() {
    run_batched("sim_byzantine_peer", |seed| Box::pin(byzantine_peer(seed, false)));
}

/// Evidence whose peer set is the whole view plus more made-up peers than the view has, approved
/// by one real peer and the made-up ones, passes `evidence::verify` (it checks that the peer set
/// covers the view and that a majority of the peer set approved, not that a majority of the view
/// approved): one byzantine peer makes members apply invented revisions.
#[test]
fn sim_byzantine_peer_inflated_evidence() {
    run_batched("sim_byzantine_peer_inflated_evidence", |seed| Box::pin(byzantine_peer(seed, true)));
}

/// Issue 21: a byzantine member lying in catch-up (padding, withheld proof, forged transforms,
/// a huge claimed revision) bends no honest replica and fails no quorum read.
#[test]
fn sim_byzantine_evidence() {
    run("sim_byzantine_evidence", |seed| Box::pin(byzantine_evidence(seed)));
}

#[test]
fn sim_made_up_records_store_nothing() {
    run("sim_made_up_records_store_nothing", |seed| Box::pin(made_up_records_store_nothing(seed)));
}

#[test]
fn sim_read_with_uncommitted_context() {
    run("sim_read_with_uncommitted_context", |seed| Box::pin(read_with_uncommitted_context(seed)));
}

#[test]
fn sim_waiting_record_backs_off() {
    run("sim_waiting_record_backs_off", |seed| Box::pin(waiting_record_backs_off(seed)));
}

#[test]
fn sim_quorum_read_sees_acknowledged_commits() {
    run("sim_quorum_read_sees_acknowledged_commits", |seed| Box::pin(quorum_read_sees_acknowledged_commits(seed)));
}

#[test]
fn sim_lying_status_member() {
    run("sim_lying_status_member", |seed| Box::pin(lying_status_member(seed)));
}

#[test]
fn sim_departed_peer_in_peer_set() {
    run("sim_departed_peer_in_peer_set", |seed| Box::pin(departed_peer_in_peer_set(seed)));
}

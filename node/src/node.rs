//! A full node: host + storage + key network + consensus + coordinator + services, started and
//! stopped as one unit.
//!
//! Start order: identity, storage (and the local repository over it), host (with no handlers
//! yet), key network (over the host's routing), consensus (over the host's network), the
//! coordinator and the read-mode layer; then the handlers are installed. The node is *ready*
//! ([`crate::readiness`]) once it can serve its role, which a task re-evaluates on every
//! connection change; `/ready` and [`Node::readiness`] report it. Stop order is the reverse: the
//! node stops serving, the host shuts down (requests in flight fail cleanly), background tasks end,
//! and storage is flushed and closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use std::collections::HashSet;

use libp2p::PeerId;
use optimystic_core::consensus::{BehindSink, Consensus};
use optimystic_core::coordinator::{CoordinatorRepo, RECORD_ENVELOPE_BYTES};
use optimystic_core::keynet::{ClusterPeers, KeyNetwork, PeerRouting};
use optimystic_core::model::{
    BlockGets, CommitRequest, CommitResult, GetBlockResults, PendRequest, PendResult, TrxBlocks,
};
use optimystic_core::network::PeerNetwork;
use optimystic_core::reads::ClusterReads;
use optimystic_core::record::ClusterRecord;
use optimystic_core::registry::{ConsensusContext, KeyNetworkContext, PluginError, Registry, StorageContext};
use optimystic_core::sync::CatchUp;
use optimystic_core::sync::SyncServer;
use optimystic_core::wire::{RepoMessage, RepoResponse};
use optimystic_core::{BlockId, MessageOptions, RawStorage, ReadPromotion, Repo, RepoError, StorageRepo};
use serde_json::Value;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::NodeConfig;
use crate::host::{Host, HostConfig, HostError, HostHandle};
use crate::identity::{self, IdentityError};
use crate::metrics::{Metrics, MetricsError, MetricsServer};
use crate::ops::{NodeOperator, PluginKinds};
use crate::readiness::{self, Readiness, ReadinessRule};
use crate::service::{Handlers, SyncHandler};

/// How often storage and peer gauges are sampled.
pub const GAUGE_SAMPLE_INTERVAL_MS: u64 = 2_000;
/// Block ids read per page by the restart catch-up.
pub const CATCH_UP_PAGE: usize = 256;
/// How long the restart catch-up waits for the first routing-table entries.
pub const CATCH_UP_ROUTING_WAIT_MS: u64 = 10_000;
/// Shortest gap between replica-repair rounds started by routing-table changes.
pub const REPAIR_MIN_GAP_MS: u64 = 1_000;

/// Why a node could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A configuration value is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The identity key could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A plugin could not be built.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The libp2p host could not start.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// Storage failed to close.
    #[error("closing storage: {0}")]
    Storage(#[from] optimystic_core::StorageError),
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    host: HostHandle,
    consensus: Arc<dyn Consensus>,
    storage: Arc<dyn RawStorage>,
    repo: Arc<dyn Repo>,
    metrics: Arc<Metrics>,
    metrics_server: Option<MetricsServer>,
    readiness: tokio::sync::watch::Receiver<Readiness>,
    readiness_task: JoinHandle<()>,
    /// Gauge sampling, behind catch-up and replica repair: aborted and awaited on shutdown.
    background: JoinSet<()>,
}

/// Blocks reported behind that wait for catch-up at most; more reports are dropped (the next
/// behind vote or waiting record reports again).
pub const MAX_BEHIND_QUEUE: usize = 1_024;
/// Catch-ups of behind blocks running at once.
pub const MAX_BEHIND_CATCH_UPS: usize = 8;

/// The consensus's [`BehindSink`]: queues each reported block (deduplicated, bounded) for the
/// catch-up worker ([`catch_up_behind`]).
#[derive(Debug)]
struct BehindQueue {
    tx: tokio::sync::mpsc::Sender<BlockId>,
    queued: Arc<std::sync::Mutex<HashSet<BlockId>>>,
}

impl BehindSink for BehindQueue {
    fn behind(&self, block_id: &BlockId) {
        let mut queued = self.queued.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if queued.len() >= MAX_BEHIND_QUEUE || !queued.insert(block_id.clone()) {
            return;
        }
        if self.tx.try_send(block_id.clone()).is_err() {
            queued.remove(block_id);
        }
    }
}

/// Catches up each block a member reported behind on, from this node's own view of its cluster
/// (verified, SPEC 4.10), then tells the consensus so decided records waiting for it can run.
/// Each catch-up is a task of this one's: ending this task ends them.
async fn catch_up_behind(
    mut rx: tokio::sync::mpsc::Receiver<BlockId>,
    queued: Arc<std::sync::Mutex<HashSet<BlockId>>>,
    catch_up: CatchUp,
    consensus: Arc<dyn Consensus>,
) {
    let running = Arc::new(tokio::sync::Semaphore::new(MAX_BEHIND_CATCH_UPS));
    let mut catch_ups = JoinSet::new();
    while let Some(block_id) = rx.recv().await {
        let Ok(permit) = running.clone().acquire_owned().await else { return };
        while catch_ups.try_join_next().is_some() {}
        let (catch_up, consensus, queued) = (catch_up.clone(), consensus.clone(), queued.clone());
        catch_ups.spawn(async move {
            queued.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&block_id);
            match catch_up.catch_up(&block_id).await {
                // Only progress wakes the waiting records: a catch-up that applied nothing would
                // have them report behind again at once (their own retries back off instead).
                Ok(applied) if applied > 0 => {
                    tracing::debug!(%block_id, applied, "caught up a block this member was behind on");
                    consensus.caught_up(&block_id).await;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(%block_id, error = %e, "catch-up of a behind block failed"),
            }
            drop(permit);
        });
    }
}

/// The coordinator side of the node's consensus, counting each round's outcome in
/// `optimystic_consensus_rounds_total{outcome}`: `committed`, `stale`, or the error code.
#[derive(Debug)]
struct MeteredConsensus {
    inner: Arc<dyn Consensus>,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl Consensus for MeteredConsensus {
    async fn execute(&self, peers: &ClusterPeers, message: &RepoMessage) -> Result<RepoResponse, RepoError> {
        let result = self.inner.execute(peers, message).await;
        let outcome = match &result {
            Ok(RepoResponse::Pend(PendResult::Stale(_)) | RepoResponse::Commit(CommitResult::Stale(_))) => "stale",
            Ok(_) => "committed",
            Err(e) => e.code().as_str(),
        };
        self.metrics.record_round(outcome);
        result
    }

    async fn on_update(&self, sender: PeerId, record: ClusterRecord) -> Result<ClusterRecord, RepoError> {
        self.inner.on_update(sender, record).await
    }

    async fn handle_request(&self, sender: PeerId, request: Value) -> Result<Value, RepoError> {
        self.inner.handle_request(sender, request).await
    }

    fn read_promotion(&self) -> ReadPromotion {
        self.inner.read_promotion()
    }

    async fn caught_up(&self, block_id: &BlockId) {
        self.inner.caught_up(block_id).await;
    }
}

/// Serves the sync protocol from the local repository.
#[derive(Debug)]
struct SyncAdapter(SyncServer);

#[async_trait]
impl SyncHandler for SyncAdapter {
    async fn handle(&self, sender: PeerId, request: Value) -> Result<Value, RepoError> {
        self.0.handle_from(sender, request).await
    }
}

/// Counts and times every repo operation served.
#[derive(Debug)]
struct MeteredRepo {
    inner: Arc<dyn Repo>,
    metrics: Arc<Metrics>,
}

impl MeteredRepo {
    fn record<T>(&self, op: &str, started: Instant, result: &Result<T, RepoError>, stale: bool) {
        let outcome = match result {
            Ok(_) if stale => "stale",
            Ok(_) => "ok",
            Err(e) => e.code().as_str(),
        };
        self.metrics.record_operation(op, outcome, started.elapsed());
    }
}

#[async_trait]
impl Repo for MeteredRepo {
    async fn get(&self, gets: &BlockGets, options: &MessageOptions) -> Result<GetBlockResults, RepoError> {
        let started = Instant::now();
        let result = self.inner.get(gets, options).await;
        self.record("get", started, &result, false);
        result
    }

    async fn pend(&self, request: &PendRequest, options: &MessageOptions) -> Result<PendResult, RepoError> {
        let started = Instant::now();
        let result = self.inner.pend(request, options).await;
        let stale = matches!(result, Ok(PendResult::Stale(_)));
        self.record("pend", started, &result, stale);
        result
    }

    async fn cancel(&self, trx: &TrxBlocks, options: &MessageOptions) -> Result<(), RepoError> {
        let started = Instant::now();
        let result = self.inner.cancel(trx, options).await;
        self.record("cancel", started, &result, false);
        result
    }

    async fn commit(&self, request: &CommitRequest, options: &MessageOptions) -> Result<CommitResult, RepoError> {
        let started = Instant::now();
        let result = self.inner.commit(request, options).await;
        let stale = matches!(result, Ok(CommitResult::Stale(_)));
        self.record("commit", started, &result, stale);
        result
    }
}

fn parse_addrs(key: &str, addrs: &[String]) -> Result<Vec<Multiaddr>, NodeError> {
    addrs.iter().map(|a| a.parse().map_err(|e| NodeError::Config(format!("{key}: {a:?}: {e}")))).collect()
}

impl Node {
    /// Starts a node from a validated configuration, with the plugins of `registry`.
    ///
    /// A node whose storage is not durable (`memory`) forgets its consensus promises when it stops,
    /// so it never reuses an identity: it starts with a fresh peer id every time and does not write
    /// an identity key (SPEC 4.8).
    pub async fn start(config: &NodeConfig, registry: &Registry) -> Result<Self, NodeError> {
        let data_dir = config.node.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| NodeError::Config(format!("node.data_dir {}: {e}", data_dir.display())))?;

        // The identity is read after storage (a non-durable node never keeps one).
        let cx = StorageContext { local_peer_id: libp2p::PeerId::random(), data_dir: Some(data_dir.clone()) };
        let storage = registry.build_storage(&config.storage.kind, &cx, &config.storage.to_value())?;
        let keypair: Keypair = if storage.durable() {
            identity::load_or_create(&data_dir)?
        } else {
            tracing::info!("storage is not durable: starting with a fresh identity");
            identity::generate()
        };
        let local = StorageRepo::new(storage.clone()).with_max_block_bytes(config.limits.max_block_bytes);

        let mut host_config = HostConfig::new(keypair.clone());
        host_config.listen = parse_addrs("node.listen", &config.node.listen)?;
        host_config.bootstrap = parse_addrs("node.bootstrap", &config.node.bootstrap)?;
        // Static members with an address are dialled like bootstrap peers: their connections are
        // what makes a static member ready.
        if config.key_network.kind == "static" {
            for addr in readiness::static_members(config).into_iter().filter_map(|(_, addr)| addr) {
                if !host_config.bootstrap.contains(&addr) {
                    host_config.bootstrap.push(addr);
                }
            }
        }
        host_config.protocol_prefix = config.node.protocol_prefix.clone();
        let limits = &config.limits;
        host_config.max_repo_frame_bytes = limits.max_repo_frame_bytes;
        host_config.max_cluster_frame_bytes = limits.max_cluster_frame_bytes;
        host_config.max_sync_frame_bytes = limits.max_repo_frame_bytes;
        host_config.max_response_frame_bytes = limits.max_response_frame_bytes;
        host_config.max_inbound_per_protocol = limits.max_inbound_per_protocol;
        host_config.max_queued_inbound_per_protocol = limits.max_queued_inbound_per_protocol;
        host_config.max_outbound_per_protocol = limits.max_outbound_per_protocol;
        host_config.request_timeout_ms = limits.request_timeout_ms.max(limits.operation_timeout_ms);
        host_config.dial_timeout_ms = limits.dial_timeout_ms;
        host_config.peer_departed_after_ms = config.node.peer_departed_after_ms;
        let host = match Host::start(host_config, Handlers::default()).await {
            Ok(host) => host,
            Err(e) => {
                let _ = storage.close().await;
                return Err(e.into());
            }
        };

        match Self::compose(config, registry, keypair, storage.clone(), local, host.clone()).await {
            Ok(node) => Ok(node),
            Err(e) => {
                host.shutdown().await;
                let _ = storage.close().await;
                Err(e)
            }
        }
    }

    async fn compose(
        config: &NodeConfig,
        registry: &Registry,
        keypair: Keypair,
        storage: Arc<dyn RawStorage>,
        local: StorageRepo,
        host: HostHandle,
    ) -> Result<Self, NodeError> {
        let network: Arc<dyn PeerNetwork> = Arc::new(host.clone());
        let routing: Arc<dyn PeerRouting> = Arc::new(host.clone());
        let cx = KeyNetworkContext { local_peer_id: host.local_peer_id(), routing };
        let key_network: Arc<dyn KeyNetwork> =
            registry.build_key_network(&config.key_network.kind, &cx, &config.key_network.to_value())?;
        let (behind_tx, behind_rx) = tokio::sync::mpsc::channel(MAX_BEHIND_QUEUE);
        let behind_queued = Arc::new(std::sync::Mutex::new(HashSet::new()));
        let behind: Arc<dyn BehindSink> = Arc::new(BehindQueue { tx: behind_tx, queued: behind_queued.clone() });
        let cx = ConsensusContext {
            keypair,
            network: network.clone(),
            local_repo: local.clone(),
            key_network: key_network.clone(),
            behind: behind.clone(),
        };
        let consensus = registry.build_consensus(&config.consensus.kind, &cx, &config.consensus.to_value())?;
        // SPEC 2.1: on a cluster member a read never writes storage.
        let read_local = local.with_read_promotion(consensus.read_promotion());

        let timeout = Duration::from_millis(config.limits.request_timeout_ms);
        let metrics = Arc::new(Metrics::new());
        let coordinated: Arc<dyn Consensus> =
            Arc::new(MeteredConsensus { inner: consensus.clone(), metrics: metrics.clone() });
        // A pend must fit in a cluster record; tiny frames keep half for the envelope.
        let frame = config.limits.max_cluster_frame_bytes;
        let max_pend_bytes = frame.saturating_sub(RECORD_ENVELOPE_BYTES.min(frame / 2)) as u64;
        let writes: Arc<dyn Repo> = Arc::new(
            CoordinatorRepo::new(key_network.clone(), coordinated, Arc::new(read_local.clone()))
                .with_max_pend_bytes(max_pend_bytes),
        );
        let reads = ClusterReads::new(writes, read_local, key_network.clone(), network, config.node.read_mode, timeout)
            .with_behind(behind.clone());
        let catch_up = reads.catch_up().clone();
        let repo: Arc<dyn Repo> = Arc::new(MeteredRepo { inner: Arc::new(reads), metrics: metrics.clone() });
        consensus.start().await.map_err(|e| NodeError::Config(format!("consensus did not start: {e}")))?;
        let kinds = PluginKinds {
            storage: config.storage.kind.clone(),
            key_network: config.key_network.kind.clone(),
            consensus: config.consensus.kind.clone(),
        };
        let operator = NodeOperator::new(host.clone(), storage.clone(), key_network.clone(), metrics.clone(), kinds);
        host.set_handlers(
            Handlers::repo(repo.clone())
                .with_cluster(consensus.clone())
                .with_sync(Arc::new(SyncAdapter(SyncServer::new(local.clone()).with_hints(
                    behind,
                    key_network.clone(),
                    host.local_peer_id(),
                ))))
                .with_operator(Arc::new(operator)),
        );

        let metrics_server = if config.metrics.enabled {
            let addr: SocketAddr = config
                .metrics
                .listen
                .parse()
                .map_err(|e| NodeError::Config(format!("metrics.listen {:?}: {e}", config.metrics.listen)))?;
            Some(MetricsServer::start(addr, metrics.clone()).await?)
        } else {
            None
        };

        let mut background = JoinSet::new();
        background.spawn(sample_gauges(storage.clone(), host.clone(), metrics.clone()));
        background.spawn(catch_up_behind(behind_rx, behind_queued, catch_up.clone(), consensus.clone()));
        background.spawn(repair_replicas(
            storage.clone(),
            catch_up,
            consensus.clone(),
            host.clone(),
            RepairPace::of(config),
        ));
        let local_peer_id = host.local_peer_id();
        let rule = ReadinessRule::for_config(config, local_peer_id);
        let (ready_tx, readiness) = tokio::sync::watch::channel(Readiness::not_ready("starting"));
        let readiness_task =
            tokio::spawn(readiness::track(rule, local_peer_id, host.connectivity(), metrics.clone(), ready_tx));
        Ok(Self { host, consensus, storage, repo, metrics, metrics_server, readiness, readiness_task, background })
    }

    /// Whether the node can serve its role ([`crate::readiness`]), updated on every connection
    /// change: await `changed()` to follow it.
    pub fn readiness(&self) -> tokio::sync::watch::Receiver<Readiness> {
        self.readiness.clone()
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> libp2p::PeerId {
        self.host.local_peer_id()
    }

    /// The listen addresses with `/p2p/<peer id>`.
    pub fn p2p_addrs(&self) -> Vec<Multiaddr> {
        self.host.p2p_addrs()
    }

    /// The node's repository (what the repo protocol serves).
    pub fn repo(&self) -> Arc<dyn Repo> {
        self.repo.clone()
    }

    /// The node's storage engine.
    pub fn storage(&self) -> &Arc<dyn RawStorage> {
        &self.storage
    }

    /// The host handle (a `PeerNetwork`).
    pub fn host(&self) -> &HostHandle {
        &self.host
    }

    /// The metrics endpoint's bound address, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(|s| s.local_addr)
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops serving, shuts the host down (requests in flight fail cleanly), ends background tasks
    /// and flushes and closes storage.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        self.readiness_task.abort();
        let _ = self.readiness_task.await;
        self.metrics.set_readiness(Readiness::not_ready("stopping"));
        self.host.shutdown().await;
        self.consensus.shutdown();
        self.background.shutdown().await;
        if let Some(server) = self.metrics_server {
            server.shutdown().await;
        }
        self.storage.close().await?;
        Ok(())
    }
}

async fn sample_gauges(storage: Arc<dyn RawStorage>, host: HostHandle, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_millis(GAUGE_SAMPLE_INTERVAL_MS));
    loop {
        tick.tick().await;
        if let Ok(Some(stats)) = storage.stats().await {
            metrics.stored_blocks.set(i64::try_from(stats.blocks).unwrap_or(i64::MAX));
            metrics.stored_bytes.set(stats.bytes.map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)));
        }
        if let Ok(peers) = host.connected_peers().await {
            metrics.connected_peers.set(i64::try_from(peers.len()).unwrap_or(i64::MAX));
        }
    }
}

/// How replica repair walks the local blocks.
#[derive(Clone, Copy, Debug)]
struct RepairPace {
    /// Between rounds; 0: only the pass after start.
    interval_ms: u64,
    /// Blocks repaired per round.
    blocks_per_round: usize,
}

impl RepairPace {
    fn of(config: &NodeConfig) -> Self {
        Self { interval_ms: config.node.repair_interval_ms, blocks_per_round: config.node.repair_blocks_per_round }
    }
}

/// Replica repair ([`CatchUp::repair`]): after a (re)start, one pass over every locally stored
/// block (this node catches up, and hints lagging members); then every `interval_ms`, and soon
/// after the routing table changes (at most every [`REPAIR_MIN_GAP_MS`]), a round over the next
/// `blocks_per_round` blocks, wrapping around. A block whose cluster no longer includes this
/// node is left alone.
async fn repair_replicas(
    storage: Arc<dyn RawStorage>,
    catch_up: CatchUp,
    consensus: Arc<dyn Consensus>,
    host: HostHandle,
    pace: RepairPace,
) {
    let mut updates = host.routing_updates();
    if *updates.borrow_and_update() == 0 {
        let _ = tokio::time::timeout(Duration::from_millis(CATCH_UP_ROUTING_WAIT_MS), updates.changed()).await;
    }
    let mut after: Option<BlockId> = None;
    let mut applied = 0usize;
    while let Some((last, n)) = repair_page(&storage, &catch_up, &consensus, after.as_ref(), CATCH_UP_PAGE).await {
        applied += n;
        after = Some(last);
    }
    if applied > 0 {
        tracing::info!(applied, "caught up after start");
    }
    if pace.interval_ms == 0 {
        return;
    }
    let mut after: Option<BlockId> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(pace.interval_ms)) => {}
            changed = updates.changed() => {
                if changed.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(REPAIR_MIN_GAP_MS)).await;
                updates.borrow_and_update();
            }
        }
        after = repair_page(&storage, &catch_up, &consensus, after.as_ref(), pace.blocks_per_round)
            .await
            .map(|(last, _)| last);
    }
}

/// Repairs the (at most `limit`) blocks after `after`; returns the last one and the revisions
/// applied, or `None` past the last block (or when storage cannot list them).
async fn repair_page(
    storage: &Arc<dyn RawStorage>,
    catch_up: &CatchUp,
    consensus: &Arc<dyn Consensus>,
    after: Option<&BlockId>,
    limit: usize,
) -> Option<(BlockId, usize)> {
    let page = match storage.block_ids(after, limit).await {
        Ok(page) => page,
        Err(e) => {
            tracing::warn!(error = %e, "replica repair could not list blocks");
            return None;
        }
    };
    let last = page.last().cloned()?;
    let mut applied = 0usize;
    for block_id in &page {
        match catch_up.repair(block_id).await {
            Ok(report) => {
                applied += report.applied;
                if report.applied > 0 {
                    consensus.caught_up(block_id).await;
                }
                if !report.hinted.is_empty() {
                    tracing::debug!(%block_id, hinted = report.hinted.len(), "hinted lagging members");
                }
            }
            Err(e) => tracing::debug!(%block_id, error = %e, "replica repair of a block failed"),
        }
    }
    Some((last, applied))
}

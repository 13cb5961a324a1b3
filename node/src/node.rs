//! A full node: host + storage + key network + consensus + coordinator + services, started and
//! stopped as one unit.
//!
//! Start order: identity, storage (and the local repository over it), host (with no handlers
//! yet), key network (over the host's routing), consensus (over the host's network), the
//! coordinator and the read-mode layer; then the handlers are installed and the node is ready.
//! Stop order is the reverse: the node stops serving, the host shuts down (requests in flight
//! fail cleanly), background tasks end, and storage is flushed and closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use std::collections::HashSet;

use libp2p::PeerId;
use optimystic_core::consensus::Consensus;
use optimystic_core::coordinator::CoordinatorRepo;
use optimystic_core::keynet::{ClusterPeers, KeyNetwork, PeerRouting};
use optimystic_core::record::ClusterRecord;
use optimystic_core::sync::CatchUp;
use optimystic_core::wire::{RepoMessage, RepoOperation, RepoResponse};
use optimystic_core::model::{BlockGets, CommitRequest, CommitResult, GetBlockResults, PendRequest, PendResult, TrxBlocks};
use optimystic_core::network::PeerNetwork;
use optimystic_core::reads::ClusterReads;
use optimystic_core::registry::{PluginContext, PluginError, Registry};
use optimystic_core::sync::SyncServer;
use optimystic_core::{BlockId, MessageOptions, RawStorage, Repo, RepoError, StorageRepo};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::config::NodeConfig;
use crate::host::{Host, HostConfig, HostError, HostHandle};
use crate::identity::{self, IdentityError};
use crate::metrics::{Metrics, MetricsError, MetricsServer, RoundLabels};
use crate::service::{Handlers, SyncHandler};

/// How often storage and peer gauges are sampled.
pub const GAUGE_SAMPLE_INTERVAL_MS: u64 = 2_000;
/// Block ids read per page by the restart catch-up.
pub const CATCH_UP_PAGE: usize = 256;
/// How long the restart catch-up waits for the first routing-table entries.
pub const CATCH_UP_ROUTING_WAIT_MS: u64 = 10_000;

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
    background: Vec<JoinHandle<()>>,
}

/// Most background catch-ups started by reject-as-behind votes at once; more are skipped (the
/// next behind vote retries).
pub const MAX_BEHIND_CATCH_UPS: usize = 8;

/// The member side of the node's consensus: when this node votes reject as behind (it missed a pend
/// or a base revision), it catches the record's blocks up from the record's other peers in the
/// background, so the next round finds it current (SPEC 4.6).
#[derive(Debug)]
struct CatchUpOnBehind {
    inner: Arc<dyn Consensus>,
    catch_up: CatchUp,
    me: PeerId,
    running: Arc<tokio::sync::Semaphore>,
    in_flight: Arc<std::sync::Mutex<HashSet<BlockId>>>,
}

impl CatchUpOnBehind {
    fn new(inner: Arc<dyn Consensus>, catch_up: CatchUp, me: PeerId) -> Self {
        Self {
            inner,
            catch_up,
            me,
            running: Arc::new(tokio::sync::Semaphore::new(MAX_BEHIND_CATCH_UPS)),
            in_flight: Arc::default(),
        }
    }

    /// Starts a catch-up when `answer` (a member's merged record) carries this node's behind vote.
    fn inspect(&self, answer: &Value) {
        let Some(vote) = answer.get("promises").and_then(|p| p.get(self.me.to_string())) else { return };
        let behind = vote.get("type").and_then(Value::as_str) == Some("reject")
            && vote.get("rejectReason").and_then(Value::as_str).is_some_and(|r| r.starts_with("behind"));
        if !behind {
            return;
        }
        let Some(message) = answer.get("message").cloned().and_then(|m| RepoMessage::from_value(m).ok()) else {
            return;
        };
        let blocks: Vec<BlockId> = match message.operation() {
            Ok(RepoOperation::Pend(p)) => p.transforms.block_ids(),
            Ok(RepoOperation::Commit(c)) => c.block_ids.clone(),
            Ok(RepoOperation::Cancel { trx_ref }) => trx_ref.block_ids.clone(),
            _ => return,
        };
        let peers: Vec<PeerId> = answer
            .get("peers")
            .and_then(Value::as_object)
            .map(|p| p.keys().filter_map(|k| k.parse().ok()).filter(|p| *p != self.me).collect())
            .unwrap_or_default();
        let Ok(permit) = self.running.clone().try_acquire_owned() else { return };
        let fresh: Vec<BlockId> = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            blocks.into_iter().filter(|b| in_flight.insert(b.clone())).collect()
        };
        if fresh.is_empty() {
            return;
        }
        let catch_up = self.catch_up.clone();
        let in_flight = self.in_flight.clone();
        tokio::spawn(async move {
            for block_id in &fresh {
                match catch_up.catch_up(block_id, &peers).await {
                    Ok(applied) if applied > 0 => tracing::debug!(%block_id, applied, "caught up after a behind vote"),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(%block_id, error = %e, "catch-up after a behind vote failed"),
                }
            }
            let mut in_flight = in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for block_id in &fresh {
                in_flight.remove(block_id);
            }
            drop(permit);
        });
    }
}

#[async_trait]
impl Consensus for CatchUpOnBehind {
    async fn execute(&self, peers: &ClusterPeers, message: &RepoMessage) -> Result<RepoResponse, RepoError> {
        self.inner.execute(peers, message).await
    }

    async fn on_update(&self, record: ClusterRecord) -> Result<ClusterRecord, RepoError> {
        let merged = self.inner.on_update(record).await?;
        self.inspect(&merged.to_value());
        Ok(merged)
    }

    async fn handle_request(&self, request: Value) -> Result<Value, RepoError> {
        let answer = self.inner.handle_request(request).await?;
        self.inspect(&answer);
        Ok(answer)
    }

    async fn start(&self) -> Result<(), RepoError> {
        self.inner.start().await
    }

    fn shutdown(&self) {
        self.inner.shutdown();
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
        self.metrics.consensus_rounds.get_or_create(&RoundLabels { outcome: outcome.to_owned() }).inc();
        result
    }

    async fn on_update(&self, record: ClusterRecord) -> Result<ClusterRecord, RepoError> {
        self.inner.on_update(record).await
    }

    async fn handle_request(&self, request: Value) -> Result<Value, RepoError> {
        self.inner.handle_request(request).await
    }
}

/// Serves the sync protocol from the local repository.
#[derive(Debug)]
struct SyncAdapter(SyncServer);

#[async_trait]
impl SyncHandler for SyncAdapter {
    async fn handle(&self, request: Value) -> Result<Value, RepoError> {
        self.0.handle(request).await
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
    addrs
        .iter()
        .map(|a| a.parse().map_err(|e| NodeError::Config(format!("{key}: {a:?}: {e}"))))
        .collect()
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

        let mut cx = PluginContext::new(libp2p::PeerId::random());
        cx.data_dir = Some(data_dir.clone());
        let storage = registry.build_storage(&config.storage.kind, &cx, &config.storage.to_value())?;
        let keypair: Keypair = if storage.durable() {
            identity::load_or_create(&data_dir)?
        } else {
            tracing::info!("storage is not durable: starting with a fresh identity");
            identity::generate()
        };
        let local = StorageRepo::new(storage.clone());

        let mut host_config = HostConfig::new(keypair.clone());
        host_config.listen = parse_addrs("node.listen", &config.node.listen)?;
        host_config.bootstrap = parse_addrs("node.bootstrap", &config.node.bootstrap)?;
        host_config.protocol_prefix = config.node.protocol_prefix.clone();
        let limits = &config.limits;
        host_config.max_repo_frame_bytes = limits.max_repo_frame_bytes;
        host_config.max_cluster_frame_bytes = limits.max_cluster_frame_bytes;
        host_config.max_sync_frame_bytes = limits.max_repo_frame_bytes;
        host_config.max_inbound_per_protocol = limits.max_inbound_per_protocol;
        host_config.max_queued_inbound_per_protocol = limits.max_queued_inbound_per_protocol;
        host_config.max_outbound_per_protocol = limits.max_outbound_per_protocol;
        host_config.request_timeout_ms = limits.request_timeout_ms.max(limits.operation_timeout_ms);
        host_config.dial_timeout_ms = limits.dial_timeout_ms;
        let host = match Host::start(host_config, Handlers::default()).await {
            Ok(host) => host,
            Err(e) => {
                let _ = storage.close().await;
                return Err(e.into());
            }
        };

        match Self::compose(config, registry, cx, keypair, storage.clone(), local, host.clone()).await {
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
        mut cx: PluginContext,
        keypair: Keypair,
        storage: Arc<dyn RawStorage>,
        local: StorageRepo,
        host: HostHandle,
    ) -> Result<Self, NodeError> {
        let network: Arc<dyn PeerNetwork> = Arc::new(host.clone());
        let routing: Arc<dyn PeerRouting> = Arc::new(host.clone());
        cx.local_peer_id = host.local_peer_id();
        cx.keypair = Some(keypair);
        cx.network = Some(network.clone());
        cx.routing = Some(routing);
        cx.storage = Some(storage.clone());
        cx.local_repo = Some(local.clone());
        let key_network: Arc<dyn KeyNetwork> =
            registry.build_key_network(&config.key_network.kind, &cx, &config.key_network.to_value())?;
        cx.key_network = Some(key_network.clone());
        let consensus = registry.build_consensus(&config.consensus.kind, &cx, &config.consensus.to_value())?;

        let timeout = Duration::from_millis(config.limits.request_timeout_ms);
        let metrics = Arc::new(Metrics::new());
        let coordinated: Arc<dyn Consensus> = Arc::new(MeteredConsensus { inner: consensus.clone(), metrics: metrics.clone() });
        let writes: Arc<dyn Repo> =
            Arc::new(CoordinatorRepo::new(key_network.clone(), coordinated, Arc::new(local.clone())));
        let reads =
            ClusterReads::new(writes, local.clone(), key_network.clone(), network, config.node.read_mode, timeout);
        let catch_up = reads.catch_up().clone();
        let repo: Arc<dyn Repo> = Arc::new(MeteredRepo { inner: Arc::new(reads), metrics: metrics.clone() });
        let member: Arc<dyn Consensus> =
            Arc::new(CatchUpOnBehind::new(consensus.clone(), catch_up.clone(), host.local_peer_id()));
        consensus.start().await.map_err(|e| NodeError::Config(format!("consensus did not start: {e}")))?;
        host.set_handlers(
            Handlers::repo(repo.clone())
                .with_cluster(member)
                .with_sync(Arc::new(SyncAdapter(SyncServer::new(local.clone())))),
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

        let background = vec![
            tokio::spawn(sample_gauges(storage.clone(), host.clone(), metrics.clone())),
            tokio::spawn(catch_up_after_start(storage.clone(), key_network, catch_up, host.clone())),
        ];
        metrics.set_ready(true);
        Ok(Self { host, consensus, storage, repo, metrics, metrics_server, background })
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
    pub async fn shutdown(self) -> Result<(), NodeError> {
        self.metrics.set_ready(false);
        self.host.shutdown().await;
        self.consensus.shutdown();
        for task in &self.background {
            task.abort();
        }
        for task in self.background {
            let _ = task.await;
        }
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

/// After a (re)start, brings every locally stored block up to its cluster's newest revision.
async fn catch_up_after_start(
    storage: Arc<dyn RawStorage>,
    key_network: Arc<dyn KeyNetwork>,
    catch_up: optimystic_core::sync::CatchUp,
    host: HostHandle,
) {
    let mut updates = host.routing_updates();
    if *updates.borrow() == 0 {
        let _ = tokio::time::timeout(Duration::from_millis(CATCH_UP_ROUTING_WAIT_MS), updates.changed()).await;
    }
    let mut after: Option<BlockId> = None;
    let mut applied = 0usize;
    loop {
        let page = match storage.block_ids(after.as_ref(), CATCH_UP_PAGE).await {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %e, "restart catch-up could not list blocks");
                return;
            }
        };
        let Some(last) = page.last().cloned() else { break };
        for block_id in &page {
            let Ok(cluster) = key_network.find_cluster(block_id).await else { continue };
            let peers: Vec<_> = cluster.keys().copied().collect();
            match catch_up.catch_up(block_id, &peers).await {
                Ok(n) => applied += n,
                Err(e) => tracing::debug!(%block_id, error = %e, "restart catch-up of a block failed"),
            }
        }
        after = Some(last);
    }
    if applied > 0 {
        tracing::info!(applied, "caught up after start");
    }
}

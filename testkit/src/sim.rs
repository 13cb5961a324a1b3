//! A simulated [`PeerNetwork`] for fault tests: in-process nodes, seeded randomness, message
//! drops and delays, partitions, per-message fault injection, and crash / restart of nodes.
//!
//! Run it on a tokio runtime with paused time (`#[tokio::test(start_paused = true)]` or
//! `Builder::new_current_thread().enable_time().start_paused(true)`, both need tokio's
//! `test-util` feature): delays and timeouts then
//! cost no wall time, and with a current-thread runtime a seed replays the same run.
//!
//! Model:
//! - A node is a peer id with a [`SimHandler`] (registered with [`SimNet::register`]). Every
//!   request is served in its own task on the receiving node. A crash ([`SimNet::crash`]) removes
//!   the handler, aborts every task of the node (requests it was serving, messages it was sending,
//!   tasks started with [`SimNet::spawn_on`]) and invalidates its network handles, then calls
//!   [`SimHandler::on_crash`]. A restart is a new [`SimNet::network`] handle and a new
//!   registration.
//! - Each direction of a request is delivered after a uniform random delay, or lost: randomly
//!   (drop probability), across a partition or blocked link, or by the [`Filter`]. A lost message
//!   makes the requester wait for its timeout, as on a real network. A message on the wire is a
//!   task of its sender: it still arrives when the requester stops waiting (timeout, dropped
//!   future), and is lost only when the sender crashes first. A request to a node that is down
//!   fails fast with [`NetworkError::DialFailed`].
//! - Handler errors come back as [`NetworkError::Remote`] with the error's wire code, like an
//!   error envelope on the wire.
//! - [`SimNet::in_flight`] / [`SimNet::wait_quiet`] tell when no message is on the wire, so tests
//!   can await quiescence instead of sleeping.
//! - A node as the real node composes it: [`NodeHandler`] serves the cluster protocol with a
//!   [`Consensus`] and the sync protocol with a [`SyncServer`]; [`SimCatchUp`] is the
//!   [`BehindSink`] that catches up the blocks the consensus reports behind (verified catch-up,
//!   then [`Consensus::caught_up`]), as tasks of the node's incarnation.
//! - `OPTIMYSTIC_SIM_TRACE=1` in the environment prints every routed message and every behind
//!   report and catch-up, with its virtual time ([`SimNet::trace_event`] adds lines of a test's
//!   own).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use libp2p_identity::PeerId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

use optimystic_core::consensus::{BehindSink, Clock, Consensus};
use optimystic_core::error::RepoError;
use optimystic_core::keynet::KeyNetwork;
use optimystic_core::model::BlockId;
use optimystic_core::network::{NetworkError, PeerNetwork, ProtocolKind};
use optimystic_core::repo::StorageRepo;
use optimystic_core::sync::{CatchUp, SyncServer};
use optimystic_core::wire::ErrorEnvelope;

/// The default simulated epoch: 2096-10-02, far in the future, so that code reading the real
/// clock by mistake never sees a simulated record as expired (it would see it as far from expiry).
pub const DEFAULT_START_MS: u64 = 4_000_000_000_000;

/// Serves the requests a simulated node receives.
pub trait SimHandler: Send + Sync + 'static {
    /// Answers one request from `from`. An `Err` reaches the requester as
    /// [`NetworkError::Remote`] with the error's code.
    fn handle(
        &self,
        from: PeerId,
        protocol: ProtocolKind,
        request: Value,
    ) -> BoxFuture<'static, Result<Value, RepoError>>;

    /// Called once when the node crashes, after its tasks were aborted (for example to stop the
    /// background work of a consensus). The default does nothing.
    fn on_crash(&self) {}
}

/// A [`SimHandler`] serving the cluster protocol with a [`Consensus`]
/// ([`Consensus::handle_request`]); other protocols are refused with `bad-request`. A crash calls
/// [`Consensus::shutdown`].
#[derive(Debug, Clone)]
pub struct ConsensusHandler(pub Arc<dyn Consensus>);

impl SimHandler for ConsensusHandler {
    fn handle(
        &self,
        from: PeerId,
        protocol: ProtocolKind,
        request: Value,
    ) -> BoxFuture<'static, Result<Value, RepoError>> {
        let consensus = self.0.clone();
        Box::pin(async move {
            match protocol {
                ProtocolKind::Cluster => consensus.handle_request(from, request).await,
                other => Err(RepoError::BadRequest(format!("this simulated node does not serve {}", other.name()))),
            }
        })
    }

    fn on_crash(&self) {
        self.0.shutdown();
    }
}

/// A [`SimHandler`] serving what a node serves to its peers: the cluster protocol with a
/// [`Consensus`] ([`Consensus::handle_request`]) and the sync protocol (verified catch-up, SPEC
/// 4.10) with a [`SyncServer`] over the node's local repository. The repo protocol is refused with
/// `bad-request` (simulated clients call a node's repository directly). A crash calls
/// [`Consensus::shutdown`].
#[derive(Debug, Clone)]
pub struct NodeHandler {
    /// Serves the cluster protocol.
    pub consensus: Arc<dyn Consensus>,
    /// Serves the sync protocol.
    pub sync: SyncServer,
}

impl NodeHandler {
    /// A handler serving `consensus` and the sync protocol over `local`.
    pub fn new(consensus: Arc<dyn Consensus>, local: StorageRepo) -> Self {
        Self { consensus, sync: SyncServer::new(local) }
    }
}

impl SimHandler for NodeHandler {
    fn handle(
        &self,
        from: PeerId,
        protocol: ProtocolKind,
        request: Value,
    ) -> BoxFuture<'static, Result<Value, RepoError>> {
        let consensus = self.consensus.clone();
        let sync = self.sync.clone();
        Box::pin(async move {
            match protocol {
                ProtocolKind::Cluster => consensus.handle_request(from, request).await,
                ProtocolKind::Sync => sync.handle(request).await,
                other => Err(RepoError::BadRequest(format!("this simulated node does not serve {}", other.name()))),
            }
        })
    }

    fn on_crash(&self) {
        self.consensus.shutdown();
    }
}

/// A [`BehindSink`] for a simulated node, doing what the real node does with the reports of its
/// consensus: each reported block is caught up ([`CatchUp::catch_up`], verified, from the node's
/// own view of the block's cluster), then [`Consensus::caught_up`] is called so decided records
/// waiting for the block can run. The work runs as a task of the node's incarnation (a crash
/// aborts it; a sink of an earlier incarnation does nothing). A block already queued is not queued
/// twice (a report arriving while its catch-up runs queues one more run).
///
/// Build it before the consensus (it goes into the consensus's dependencies), then hand it the
/// consensus with [`SimCatchUp::set_consensus`].
#[derive(Clone)]
pub struct SimCatchUp {
    inner: Arc<CatchUpInner>,
}

struct CatchUpInner {
    network: Arc<SimPeerNetwork>,
    catch_up: CatchUp,
    consensus: std::sync::OnceLock<std::sync::Weak<dyn Consensus>>,
    queued: Mutex<BTreeSet<BlockId>>,
    reports: std::sync::atomic::AtomicU64,
    runs: std::sync::atomic::AtomicU64,
    applied: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for SimCatchUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCatchUp")
            .field("peer", &self.inner.network.peer)
            .field("reports", &self.reports())
            .finish_non_exhaustive()
    }
}

impl SimCatchUp {
    /// A sink for the node behind `network`, catching up over `network` into `local`, with
    /// `key_network` as the node's view of clusters and `timeout` per request.
    pub fn new(
        network: Arc<SimPeerNetwork>,
        local: StorageRepo,
        key_network: Arc<dyn KeyNetwork>,
        timeout: Duration,
    ) -> Self {
        let catch_up = CatchUp::new(network.clone(), local, key_network, timeout);
        Self {
            inner: Arc::new(CatchUpInner {
                network,
                catch_up,
                consensus: std::sync::OnceLock::new(),
                queued: Mutex::new(BTreeSet::new()),
                reports: std::sync::atomic::AtomicU64::new(0),
                runs: std::sync::atomic::AtomicU64::new(0),
                applied: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// The consensus told when a catch-up ran (held weakly: the consensus holds this sink).
    pub fn set_consensus(&self, consensus: &Arc<dyn Consensus>) {
        let _ = self.inner.consensus.set(Arc::downgrade(consensus));
    }

    /// The catch-up client.
    pub fn catch_up(&self) -> &CatchUp {
        &self.inner.catch_up
    }

    /// Reports received so far.
    pub fn reports(&self) -> u64 {
        self.inner.reports.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Catch-ups run so far (reports are deduplicated while queued).
    pub fn runs(&self) -> u64 {
        self.inner.runs.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Revisions applied by this sink's catch-ups and [`SimCatchUp::run`] so far.
    pub fn applied(&self) -> u64 {
        self.inner.applied.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Catches `block_id` up now (in the caller's task), then tells the consensus. Returns the
    /// revisions applied.
    ///
    /// Errors: those of [`CatchUp::catch_up`] (the consensus is not told then).
    pub async fn run(&self, block_id: &BlockId) -> Result<usize, RepoError> {
        Self::run_inner(&self.inner, block_id).await
    }

    async fn run_inner(inner: &CatchUpInner, block_id: &BlockId) -> Result<usize, RepoError> {
        inner.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let applied = inner.catch_up.catch_up(block_id).await?;
        inner
            .network
            .sim
            .trace_event(&format!("{} caught {block_id} up: {applied} revisions", short(&inner.network.peer)));
        inner.applied.fetch_add(applied as u64, std::sync::atomic::Ordering::SeqCst);
        // As the node does: only progress wakes the waiting records.
        let consensus = inner.consensus.get().and_then(std::sync::Weak::upgrade).filter(|_| applied > 0);
        if let Some(consensus) = consensus {
            consensus.caught_up(block_id).await;
        }
        Ok(applied)
    }
}

impl BehindSink for SimCatchUp {
    fn behind(&self, block_id: &BlockId) {
        let n = self.inner.reports.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.inner
            .network
            .sim
            .trace_event(&format!("{} is behind on {block_id} (report {n})", short(&self.inner.network.peer)));
        {
            let mut queued = self.inner.queued.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !queued.insert(block_id.clone()) {
                return;
            }
        }
        let inner = self.inner.clone();
        let id = block_id.clone();
        let task = async move {
            inner.queued.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
            if let Err(e) = Self::run_inner(&inner, &id).await {
                tracing::debug!(block_id = %id, error = %e, "simulated catch-up of a behind block failed");
            }
        };
        if !self.inner.network.spawn(task) {
            self.inner.queued.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(block_id);
        }
    }
}

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the requester to the node serving it.
    Request,
    /// The answer, back to the requester.
    Response,
}

/// A message in flight, as shown to a [`Filter`].
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// The node sending this message (the requester for a request, the server for a response).
    pub from: PeerId,
    /// The node it is for.
    pub to: PeerId,
    /// The protocol.
    pub protocol: ProtocolKind,
    /// Request or response.
    pub direction: Direction,
    /// The JSON body (a response that is an error is shown as its error envelope).
    pub body: &'a Value,
}

/// What a [`Filter`] decides for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it normally (subject to drops, delays and partitions).
    Deliver,
    /// Lose it.
    Drop,
    /// Crash the node sending it; the message is lost.
    CrashSender,
    /// Crash the node it is for; the message is lost.
    CrashReceiver,
}

/// Per-message fault injection. Called with the simulator's lock held: it must not call the
/// [`SimNet`] (count in atomics, decide, return).
pub type Filter = Arc<dyn Fn(&Envelope<'_>) -> Verdict + Send + Sync>;

/// Fault parameters of a simulated network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimConfig {
    /// The wall-clock time, in ms since the Unix epoch, that [`SimNet::clock`] reports at the start.
    pub start_ms: u64,
    /// Probability that one direction of a request is lost, 0.0..=1.0.
    pub drop_probability: f64,
    /// Shortest one-way delay, in ms.
    pub min_delay_ms: u64,
    /// Longest one-way delay, in ms (at least `min_delay_ms`).
    pub max_delay_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self { start_ms: DEFAULT_START_MS, drop_probability: 0.0, min_delay_ms: 1, max_delay_ms: 5 }
    }
}

/// Counters of what the network did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Requests handed to a receiving node.
    pub requests_delivered: u64,
    /// Messages (either direction) lost to drops, partitions, blocked links or filters.
    pub messages_lost: u64,
    /// Requests refused because the receiving node was down.
    pub requests_refused: u64,
    /// Crashes performed (by [`SimNet::crash`] or by a filter).
    pub crashes: u64,
}

#[derive(Default)]
struct Node {
    handler: Option<Arc<dyn SimHandler>>,
    generation: u64,
    tasks: Vec<AbortHandle>,
}

impl Node {
    fn track(&mut self, task: AbortHandle) {
        self.tasks.retain(|t| !t.is_finished());
        self.tasks.push(task);
    }
}

struct State {
    rng: StdRng,
    config: SimConfig,
    nodes: BTreeMap<PeerId, Node>,
    /// Partition group per peer; `None` means no partition.
    groups: Option<BTreeMap<PeerId, usize>>,
    blocked: BTreeSet<(PeerId, PeerId)>,
    filter: Option<Filter>,
    stats: SimStats,
}

impl State {
    fn connected(&self, a: PeerId, b: PeerId) -> bool {
        if self.blocked.contains(&(a, b)) || self.blocked.contains(&(b, a)) {
            return false;
        }
        match &self.groups {
            None => true,
            Some(groups) => groups.get(&a) == groups.get(&b),
        }
    }

    fn delay(&mut self) -> Duration {
        let (lo, hi) = (self.config.min_delay_ms, self.config.max_delay_ms.max(self.config.min_delay_ms));
        Duration::from_millis(self.rng.gen_range(lo..=hi))
    }

    fn generation(&self, peer: &PeerId) -> u64 {
        self.nodes.get(peer).map_or(0, |n| n.generation)
    }

    /// Crashes a node; returns its handler so `on_crash` runs outside the lock.
    fn crash(&mut self, peer: PeerId) -> Option<Arc<dyn SimHandler>> {
        self.stats.crashes += 1;
        let node = self.nodes.entry(peer).or_default();
        node.generation += 1;
        for task in node.tasks.drain(..) {
            task.abort();
        }
        node.handler.take()
    }
}

/// What the serving side made of a request that arrived.
enum Served {
    /// The handler runs in this task of the receiving node.
    Running(JoinHandle<Result<Value, RepoError>>),
    /// Cut off by a partition while in flight.
    Lost,
    /// The receiving node is down.
    Down,
}

/// What became of one message.
enum Route {
    /// Arrives after the delay.
    Deliver(Duration),
    /// Never arrives.
    Lost,
    /// The sending node crashed (by a filter).
    SenderCrashed,
}

struct Inner {
    seed: u64,
    /// Print every message routed (`OPTIMYSTIC_SIM_TRACE` set in the environment).
    trace: bool,
    epoch: Instant,
    state: Mutex<State>,
    /// Requests on the wire: sent and not yet answered, lost or aborted.
    in_flight: watch::Sender<usize>,
}

/// Counts one request as in flight until dropped (answered, lost, or aborted by a crash).
struct InFlight(SimNet);

impl InFlight {
    fn new(sim: SimNet) -> Self {
        sim.inner.in_flight.send_modify(|n| *n += 1);
        Self(sim)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inner.in_flight.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The simulated network shared by every node of a test. Cheap to clone.
#[derive(Clone)]
pub struct SimNet {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SimNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNet").field("seed", &self.inner.seed).finish_non_exhaustive()
    }
}

impl SimNet {
    /// A network whose randomness comes from `seed`. Must be created inside the tokio runtime
    /// that runs the simulation (it reads `tokio::time::Instant::now()` as its epoch).
    pub fn new(seed: u64, config: SimConfig) -> Self {
        let state = State {
            rng: StdRng::seed_from_u64(seed),
            config,
            nodes: BTreeMap::new(),
            groups: None,
            blocked: BTreeSet::new(),
            filter: None,
            stats: SimStats::default(),
        };
        let trace = std::env::var_os("OPTIMYSTIC_SIM_TRACE").is_some_and(|v| !v.is_empty() && v != "0");
        let inner =
            Inner { seed, trace, epoch: Instant::now(), state: Mutex::new(state), in_flight: watch::Sender::new(0) };
        Self { inner: Arc::new(inner) }
    }

    /// The seed this network was built with.
    pub fn seed(&self) -> u64 {
        self.inner.seed
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held already failed the test; keep the state usable.
        self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A draw from the network's seeded generator (for test decisions that must replay with the
    /// seed).
    pub fn random<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        f(&mut self.state().rng)
    }

    /// The simulated wall clock: [`SimConfig::start_ms`] plus the tokio time elapsed since the
    /// network was created.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock_with_skew(0)
    }

    /// The simulated wall clock of a node whose clock is off by `skew_ms` (saturating at 0).
    pub fn clock_with_skew(&self, skew_ms: i64) -> Arc<dyn Clock> {
        Arc::new(SimClock { start_ms: self.state().config.start_ms, epoch: self.inner.epoch, skew_ms })
    }

    /// The network handle of `peer` in its current incarnation. Handles of earlier incarnations
    /// (before a crash) fail with [`NetworkError::Closed`].
    pub fn network(&self, peer: PeerId) -> Arc<SimPeerNetwork> {
        let generation = self.state().nodes.entry(peer).or_default().generation;
        Arc::new(SimPeerNetwork { sim: self.clone(), peer, generation })
    }

    /// Starts serving `peer` with `handler` (a first start or a restart after [`SimNet::crash`]).
    pub fn register(&self, peer: PeerId, handler: Arc<dyn SimHandler>) {
        self.state().nodes.entry(peer).or_default().handler = Some(handler);
    }

    /// Crashes `peer`: its handler is removed, every task of the node is aborted, its network
    /// handles stop working, then [`SimHandler::on_crash`] runs. Idempotent for a node that is
    /// already down apart from the counter.
    pub fn crash(&self, peer: PeerId) {
        let handler = self.state().crash(peer);
        if let Some(handler) = handler {
            handler.on_crash();
        }
    }

    /// Whether `peer` has a handler (is serving).
    pub fn is_up(&self, peer: PeerId) -> bool {
        self.state().nodes.get(&peer).is_some_and(|n| n.handler.is_some())
    }

    /// Runs `future` as a task of `peer`'s current incarnation: a crash of the node aborts it (its
    /// handle then reports a cancelled [`tokio::task::JoinError`]).
    pub fn spawn_on<F>(&self, peer: PeerId, future: F) -> JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handle = tokio::spawn(future);
        self.state().nodes.entry(peer).or_default().track(handle.abort_handle());
        handle
    }

    /// Runs `future` as a task of `peer` if its incarnation is still `generation`; false when the
    /// node crashed since.
    fn spawn_in_generation(
        &self,
        peer: PeerId,
        generation: u64,
        future: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> bool {
        let mut state = self.state();
        let node = state.nodes.entry(peer).or_default();
        if node.generation != generation {
            return false;
        }
        node.track(tokio::spawn(future).abort_handle());
        true
    }

    /// Splits the network: peers in different groups cannot reach each other. Peers named in no
    /// group form one more group together.
    pub fn partition(&self, groups: &[Vec<PeerId>]) {
        let mut map = BTreeMap::new();
        for (i, group) in groups.iter().enumerate() {
            for peer in group {
                map.insert(*peer, i);
            }
        }
        let mut state = self.state();
        let rest = groups.len();
        let known: Vec<PeerId> = state.nodes.keys().copied().collect();
        for peer in known {
            map.entry(peer).or_insert(rest);
        }
        state.groups = Some(map);
    }

    /// Cuts the link between two peers (both directions).
    pub fn block_link(&self, a: PeerId, b: PeerId) {
        self.state().blocked.insert((a, b));
    }

    /// Removes every partition and blocked link.
    pub fn heal(&self) {
        let mut state = self.state();
        state.groups = None;
        state.blocked.clear();
    }

    /// Changes the probability that a message is lost.
    pub fn set_drop_probability(&self, probability: f64) {
        self.state().config.drop_probability = probability.clamp(0.0, 1.0);
    }

    /// Changes the one-way delay range, in ms.
    pub fn set_delay_ms(&self, min_ms: u64, max_ms: u64) {
        let mut state = self.state();
        state.config.min_delay_ms = min_ms;
        state.config.max_delay_ms = max_ms.max(min_ms);
    }

    /// Installs (or with `None` removes) the per-message filter.
    pub fn set_filter(&self, filter: Option<Filter>) {
        self.state().filter = filter;
    }

    /// What the network did so far.
    pub fn stats(&self) -> SimStats {
        self.state().stats
    }

    /// Requests in flight: sent and not yet answered, lost or aborted by a crash of the sender.
    pub fn in_flight(&self) -> usize {
        *self.inner.in_flight.borrow()
    }

    /// Waits until no request is in flight.
    pub async fn wait_quiet(&self) {
        let mut watch = self.inner.in_flight.subscribe();
        // The sender lives in `self.inner`, which outlives this call: waiting cannot fail.
        let _ = watch.wait_for(|n| *n == 0).await;
    }

    /// Prints `text` with the virtual time when tracing (`OPTIMYSTIC_SIM_TRACE`) is on.
    pub fn trace_event(&self, text: &str) {
        if self.inner.trace {
            eprintln!("[sim {:>9} ms] {text}", self.inner.epoch.elapsed().as_millis());
        }
    }

    /// Decides the fate of one message from `from` (incarnation `generation`) to `to`.
    fn route(&self, envelope: &Envelope<'_>, generation: u64) -> (Route, Option<Arc<dyn SimHandler>>) {
        let routed = self.route_inner(envelope, generation);
        if self.inner.trace {
            let fate = match &routed.0 {
                Route::Deliver(delay) => format!("deliver in {} ms", delay.as_millis()),
                Route::Lost => "lost".to_owned(),
                Route::SenderCrashed => "sender down".to_owned(),
            };
            eprintln!(
                "[sim {:>9} ms] {} -> {} {} {:?}: {} ({fate})",
                self.inner.epoch.elapsed().as_millis(),
                short(&envelope.from),
                short(&envelope.to),
                envelope.protocol.name(),
                envelope.direction,
                summary(envelope.body),
            );
        }
        routed
    }

    fn route_inner(&self, envelope: &Envelope<'_>, generation: u64) -> (Route, Option<Arc<dyn SimHandler>>) {
        let mut state = self.state();
        if state.generation(&envelope.from) != generation {
            return (Route::SenderCrashed, None);
        }
        let verdict = state.filter.clone().map_or(Verdict::Deliver, |f| f(envelope));
        let crashed = match verdict {
            Verdict::Deliver => None,
            Verdict::Drop => {
                state.stats.messages_lost += 1;
                return (Route::Lost, None);
            }
            Verdict::CrashSender => {
                let handler = state.crash(envelope.from);
                return (Route::SenderCrashed, handler);
            }
            Verdict::CrashReceiver => Some(state.crash(envelope.to)),
        };
        if let Some(handler) = crashed {
            state.stats.messages_lost += 1;
            return (Route::Lost, handler);
        }
        let probability = state.config.drop_probability;
        let dropped = probability > 0.0 && state.rng.gen_bool(probability);
        if dropped || !state.connected(envelope.from, envelope.to) {
            state.stats.messages_lost += 1;
            return (Route::Lost, None);
        }
        (Route::Deliver(state.delay()), None)
    }

    /// The serving side: runs the handler of `to` as a task of that node.
    fn serve(&self, from: PeerId, to: PeerId, protocol: ProtocolKind, request: Value) -> Served {
        let mut state = self.state();
        if !state.connected(from, to) {
            // Partitioned while in flight: the request never arrives.
            state.stats.messages_lost += 1;
            return Served::Lost;
        }
        let node = state.nodes.entry(to).or_default();
        let Some(handler) = node.handler.clone() else {
            state.stats.requests_refused += 1;
            return Served::Down;
        };
        let task = tokio::spawn(handler.handle(from, protocol, request));
        node.track(task.abort_handle());
        state.stats.requests_delivered += 1;
        Served::Running(task)
    }
}

/// The last characters of a peer id (enough to tell a simulation's peers apart).
fn short(peer: &PeerId) -> String {
    let text = peer.to_base58();
    let skip = text.chars().count().saturating_sub(6);
    text.chars().skip(skip).collect()
}

/// A one-line description of a message body, for traces.
fn summary(body: &Value) -> String {
    if let Some(error) = body.get("error") {
        return format!("error {}", error.get("code").unwrap_or(&Value::Null));
    }
    let record = body.get("record").unwrap_or(body);
    let mut out = Vec::new();
    for key in ["operation", "op", "status"] {
        if let Some(v) = body.get(key).and_then(Value::as_str) {
            out.push(format!("{key}={v}"));
        }
    }
    if let Some(ops) = record.pointer("/message/operations").and_then(Value::as_array) {
        for op in ops {
            if let Some((kind, inner)) = op.as_object().and_then(|o| o.iter().next()) {
                let trx = inner
                    .get("trxId")
                    .or_else(|| inner.pointer("/trxRef/trxId"))
                    .and_then(Value::as_str)
                    .unwrap_or("?");
                let rev = inner.get("rev").map(ToString::to_string).unwrap_or_default();
                out.push(format!("{kind} {trx}@{rev}"));
            }
        }
        let count = |field: &str| {
            record.get(field).and_then(Value::as_object).map_or((0, 0), |m| {
                (m.values().filter(|v| v.get("type") == Some(&Value::from("approve"))).count(), m.len())
            })
        };
        let (pa, pn) = count("promises");
        let (ca, cn) = count("commits");
        out.push(format!("promises {pa}/{pn} commits {ca}/{cn}"));
    }
    if let Some(entries) = body.get("entries").and_then(Value::as_array) {
        out.push(format!("{} entries, latest {}", entries.len(), body.get("latest").unwrap_or(&Value::Null)));
    } else if let Some(latest) = body.get("latest") {
        out.push(format!("latest {latest}"));
    }
    out.join(" ")
}

fn run_on_crash(handler: Option<Arc<dyn SimHandler>>) {
    if let Some(handler) = handler {
        handler.on_crash();
    }
}

/// The simulated wall clock of a node.
#[derive(Debug, Clone, Copy)]
pub struct SimClock {
    start_ms: u64,
    epoch: Instant,
    skew_ms: i64,
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.start_ms.saturating_add(elapsed).saturating_add_signed(self.skew_ms)
    }
}

/// One node's handle on the simulated network (one incarnation of it).
#[derive(Debug)]
pub struct SimPeerNetwork {
    sim: SimNet,
    peer: PeerId,
    generation: u64,
}

impl SimPeerNetwork {
    /// Runs `future` as a task of this handle's node incarnation; false (and nothing runs) when
    /// the node crashed since the handle was made.
    pub fn spawn(&self, future: impl std::future::Future<Output = ()> + Send + 'static) -> bool {
        self.sim.spawn_in_generation(self.peer, self.generation, future)
    }

    /// Sends a request and waits for its answer. The request is routed at once (so filters and
    /// crashes happen in call order); its delivery, service and answer then run in a task of the
    /// sending node, which outlives this call: a requester that stops waiting (timeout, dropped
    /// future) does not stop a message already on the wire, only a crash of the sender does.
    async fn exchange(&self, peer: PeerId, protocol: ProtocolKind, request: Value) -> Result<Value, NetworkError> {
        let envelope = Envelope { from: self.peer, to: peer, protocol, direction: Direction::Request, body: &request };
        let (route, crashed) = self.sim.route(&envelope, self.generation);
        run_on_crash(crashed);
        let delay = match route {
            Route::SenderCrashed => return Err(NetworkError::Closed),
            Route::Lost => return futures::future::pending().await,
            Route::Deliver(delay) => delay,
        };
        let (answer_tx, answer_rx) = oneshot::channel();
        let flight = Flight { sim: self.sim.clone(), from: self.peer, generation: self.generation, to: peer, protocol };
        let in_flight = InFlight::new(self.sim.clone());
        let delivery = async move {
            let _in_flight = in_flight;
            tokio::time::sleep(delay).await;
            if let Some(answer) = flight.deliver(request).await {
                // The requester may have stopped waiting: the answer is then dropped.
                let _ = answer_tx.send(answer);
            }
        };
        if !self.sim.spawn_in_generation(self.peer, self.generation, delivery) {
            return Err(NetworkError::Closed);
        }
        match answer_rx.await {
            Ok(answer) => answer,
            // Lost on the way (the task ended without an answer): the requester times out.
            Err(_) => futures::future::pending().await,
        }
    }
}

/// One request on the wire.
struct Flight {
    sim: SimNet,
    from: PeerId,
    generation: u64,
    to: PeerId,
    protocol: ProtocolKind,
}

impl Flight {
    /// Serves the request at its destination and brings the answer back; `None` when a message
    /// is lost (the requester then times out).
    async fn deliver(self, request: Value) -> Option<Result<Value, NetworkError>> {
        let peer = self.to;
        let task = match self.sim.serve(self.from, peer, self.protocol, request) {
            Served::Running(task) => task,
            Served::Lost => return None,
            Served::Down => {
                return Some(Err(NetworkError::DialFailed {
                    peer,
                    reason: "connection refused: the node is down".into(),
                }));
            }
        };
        let body = match task.await {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => match serde_json::to_value(ErrorEnvelope::from(&e)) {
                Ok(body) => body,
                Err(e) => {
                    return Some(Err(NetworkError::Stream { peer, reason: format!("cannot encode the error: {e}") }));
                }
            },
            Err(_) => {
                return Some(Err(NetworkError::Stream {
                    peer,
                    reason: "connection closed: the node went down".into(),
                }));
            }
        };
        let envelope = Envelope {
            from: peer,
            to: self.from,
            protocol: self.protocol,
            direction: Direction::Response,
            body: &body,
        };
        let (route, crashed) = self.sim.route_response(&envelope, self.generation);
        run_on_crash(crashed);
        match route {
            Route::SenderCrashed | Route::Lost => return None,
            Route::Deliver(delay) => tokio::time::sleep(delay).await,
        }
        if self.sim.state().generation(&self.from) != self.generation {
            return None;
        }
        Some(match ErrorEnvelope::from_response(&body) {
            Some(envelope) => {
                Err(NetworkError::Remote { peer, code: envelope.error.code, message: envelope.error.message })
            }
            None => Ok(body),
        })
    }
}

impl SimNet {
    /// Like [`SimNet::route`] for a response: the serving node's incarnation is not checked (its
    /// task already finished), the requester's is checked at arrival.
    fn route_response(
        &self,
        envelope: &Envelope<'_>,
        requester_generation: u64,
    ) -> (Route, Option<Arc<dyn SimHandler>>) {
        let generation = self.state().generation(&envelope.from);
        let (route, crashed) = self.route(envelope, generation);
        if self.state().generation(&envelope.to) != requester_generation {
            return (Route::Lost, crashed);
        }
        (route, crashed)
    }
}

#[async_trait]
impl PeerNetwork for SimPeerNetwork {
    fn local_peer_id(&self) -> PeerId {
        self.peer
    }

    async fn request(
        &self,
        peer: PeerId,
        protocol: ProtocolKind,
        request: Value,
        timeout: Duration,
    ) -> Result<Value, NetworkError> {
        if peer == self.peer {
            return Err(NetworkError::DialFailed {
                peer,
                reason: "requests to the local peer go through local paths".into(),
            });
        }
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        match tokio::time::timeout(timeout, self.exchange(peer, protocol, request)).await {
            Ok(result) => result,
            Err(_) => Err(NetworkError::Timeout { peer, timeout_ms }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::json;

    use super::*;

    /// Echoes requests; counts how many it served; `"slow"` never finishes (after notifying).
    struct Echo(Arc<AtomicUsize>, Arc<tokio::sync::Notify>);

    impl SimHandler for Echo {
        fn handle(
            &self,
            _from: PeerId,
            _protocol: ProtocolKind,
            request: Value,
        ) -> BoxFuture<'static, Result<Value, RepoError>> {
            let served = self.0.clone();
            let started = self.1.clone();
            Box::pin(async move {
                if request == json!("fail") {
                    return Err(RepoError::Busy("full".into()));
                }
                if request == json!("slow") {
                    started.notify_one();
                    futures::future::pending::<()>().await;
                }
                served.fetch_add(1, Ordering::SeqCst);
                Ok(json!({"echo": request}))
            })
        }
    }

    fn two_nodes(config: SimConfig) -> (SimNet, PeerId, PeerId, Arc<AtomicUsize>, Arc<tokio::sync::Notify>) {
        let sim = SimNet::new(7, config);
        let (a, b) = (PeerId::random(), PeerId::random());
        let served = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(tokio::sync::Notify::new());
        sim.register(a, Arc::new(Echo(served.clone(), started.clone())));
        sim.register(b, Arc::new(Echo(served.clone(), started.clone())));
        (sim, a, b, served, started)
    }

    // These unit tests run on real time (core has no tokio test-util), so delays stay small.
    const T: Duration = Duration::from_millis(100);

    #[tokio::test]
    async fn delivers_with_delay_and_maps_errors() {
        let (sim, a, b, served, _) =
            two_nodes(SimConfig { min_delay_ms: 10, max_delay_ms: 10, ..SimConfig::default() });
        let net = sim.network(a);
        let start = Instant::now();
        let answer = net.request(b, ProtocolKind::Cluster, json!(1), T).await.unwrap();
        assert_eq!(answer, json!({"echo": 1}));
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert_eq!(served.load(Ordering::SeqCst), 1);
        let e = net.request(b, ProtocolKind::Cluster, json!("fail"), T).await.unwrap_err();
        assert!(matches!(e, NetworkError::Remote { ref code, .. } if code == "busy"), "{e}");
        assert!(matches!(
            net.request(a, ProtocolKind::Cluster, json!(1), T).await,
            Err(NetworkError::DialFailed { .. })
        ));
        assert_eq!(sim.in_flight(), 0);
        sim.wait_quiet().await;
        let now = sim.clock().now_ms();
        assert!(now >= DEFAULT_START_MS + 40, "{now}");
        assert!(sim.clock_with_skew(-1_000_000).now_ms() < DEFAULT_START_MS);
    }

    #[tokio::test]
    async fn partitions_and_drops_time_out() {
        let (sim, a, b, served, _) = two_nodes(SimConfig::default());
        sim.partition(&[vec![a], vec![b]]);
        let net = sim.network(a);
        let start = Instant::now();
        assert!(matches!(net.request(b, ProtocolKind::Cluster, json!(1), T).await, Err(NetworkError::Timeout { .. })));
        assert!(start.elapsed() >= T);
        sim.heal();
        net.request(b, ProtocolKind::Cluster, json!(1), T).await.unwrap();
        sim.set_drop_probability(1.0);
        assert!(matches!(net.request(b, ProtocolKind::Cluster, json!(1), T).await, Err(NetworkError::Timeout { .. })));
        sim.set_drop_probability(0.0);
        sim.block_link(b, a);
        assert!(net.request(b, ProtocolKind::Cluster, json!(1), T).await.is_err());
        assert_eq!(served.load(Ordering::SeqCst), 1);
        assert_eq!(sim.stats().messages_lost, 3);
    }

    #[tokio::test]
    async fn crash_aborts_in_flight_work_and_restart_serves_again() {
        let (sim, a, b, served, started) = two_nodes(SimConfig::default());
        let net = sim.network(a);
        let slow = {
            let net = net.clone();
            tokio::spawn(
                async move { net.request(b, ProtocolKind::Cluster, json!("slow"), Duration::from_secs(60)).await },
            )
        };
        let background = sim.spawn_on(b, futures::future::pending::<()>());
        started.notified().await;
        assert_eq!(sim.in_flight(), 1);
        sim.crash(b);
        assert!(!sim.is_up(b));
        assert!(matches!(slow.await.unwrap(), Err(NetworkError::Stream { .. })));
        assert!(background.await.unwrap_err().is_cancelled());
        assert!(matches!(
            net.request(b, ProtocolKind::Cluster, json!(1), T).await,
            Err(NetworkError::DialFailed { .. })
        ));
        // b's old handle is dead; a new incarnation works.
        let old_b = sim.network(b);
        sim.crash(b);
        assert!(matches!(old_b.request(a, ProtocolKind::Cluster, json!(1), T).await, Err(NetworkError::Closed)));
        let new_b = sim.network(b);
        sim.register(b, Arc::new(Echo(served.clone(), started.clone())));
        new_b.request(a, ProtocolKind::Cluster, json!(1), T).await.unwrap();
        net.request(b, ProtocolKind::Cluster, json!(2), T).await.unwrap();
        assert_eq!(served.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn filters_drop_and_crash() {
        let (sim, a, b, _served, _) = two_nodes(SimConfig::default());
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        sim.set_filter(Some(Arc::new(move |e: &Envelope<'_>| {
            counter.fetch_add(1, Ordering::SeqCst);
            match (e.direction, e.body) {
                (Direction::Request, body) if *body == json!("drop") => Verdict::Drop,
                (Direction::Response, body) if body["echo"] == json!("crash") => Verdict::CrashReceiver,
                _ => Verdict::Deliver,
            }
        })));
        let net = sim.network(a);
        assert!(net.request(b, ProtocolKind::Cluster, json!("drop"), T).await.is_err());
        net.request(b, ProtocolKind::Cluster, json!("ok"), T).await.unwrap();
        assert!(net.request(b, ProtocolKind::Cluster, json!("crash"), T).await.is_err());
        assert!(!sim.is_up(a));
        assert!(sim.is_up(b));
        assert_eq!(seen.load(Ordering::SeqCst), 5);
        assert_eq!(sim.stats().crashes, 1);
    }

    #[tokio::test]
    async fn same_seed_same_draws() {
        let x = SimNet::new(42, SimConfig::default()).random(|r| r.r#gen::<u64>());
        let y = SimNet::new(42, SimConfig::default()).random(|r| r.r#gen::<u64>());
        assert_eq!(x, y);
    }
}

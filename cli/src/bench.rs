//! `optimystic bench`: transactions per second and latency on a local cluster (or a running node).
//!
//! The workload is the one a diary append makes: each worker owns one block, inserts it, then
//! appends one entry per transaction (pend + commit of that block at the next revision). Workers
//! talk to the nodes over libp2p from a separate client host. By default every worker sends its
//! transactions to the first node, as the etcd comparison's driver sends every put to the leader:
//! one coordinator then batches all of a peer set's queued operations into each record (SPEC
//! 4.14). `--coordinators N` spreads the workers over the first N nodes in turn instead, which
//! splits the batching N ways.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::multiaddr::Protocol;
use optimystic_core::client::RepoClient;
use optimystic_core::model::{
    Block, BlockId, BlockOperation, CommitRequest, CommitResult, PendPolicy, PendRequest, PendResult, Transform,
    Transforms,
};
use optimystic_core::network::PeerNetwork;
use optimystic_core::registry::Registry;
use optimystic_core::{MessageOptions, Repo, RepoError};
use serde_json::json;

use crate::demo::DemoError;
use optimystic_node::host::{Host, HostConfig, HostHandle};
use optimystic_node::identity;
use optimystic_node::local_cluster::LocalCluster;
use optimystic_node::service::Handlers;
use optimystic_node::txn::new_trx_id;

/// Options of `optimystic bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Nodes in the local cluster (ignored with `--peer`).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Storage engine of the local nodes. Memory by default, unlike `start` and `cluster up`
    /// (lmdb): the bench measures the protocol and the consensus, not the disk, and leaves no data
    /// behind; `--storage lmdb` includes a synced write per commit step.
    #[arg(long, default_value = "memory")]
    pub storage: String,
    /// Transactions in flight.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Transactions to run (ignored with `--seconds`).
    #[arg(long, default_value_t = 2_000)]
    pub transactions: u64,
    /// Run for this long instead of a count.
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Benchmark a running node (`<multiaddr>/p2p/<peer id>`) instead of a local cluster.
    #[arg(long)]
    pub peer: Option<String>,
    /// Keep the local nodes' data here instead of a temporary directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Deadline of each operation.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// How many of the local nodes coordinate: worker w sends its transactions to node
    /// w mod N (ignored with `--peer`). 1 sends everything to the first node.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub coordinators: u64,
}

/// Counters shared by the workers.
#[derive(Debug, Default)]
struct Progress {
    done: AtomicU64,
    errors: AtomicU64,
    stale: AtomicU64,
    started: AtomicUsize,
}

/// One worker's diary: appends to its own block, tracking the revision it expects.
async fn worker(
    repo: RepoClient,
    block_id: BlockId,
    budget: Arc<dyn Fn() -> bool + Send + Sync>,
    progress: Arc<Progress>,
    timeout_ms: u64,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut rev = 0u64;
    let mut entries = 0u64;
    progress.started.fetch_add(1, Ordering::Relaxed);
    while budget() {
        let transform = if rev == 0 {
            Transform {
                insert: Some(Block::new(block_id.clone(), "diary", "bench").with_field("entries", json!([]))),
                ..Transform::default()
            }
        } else {
            let op = BlockOperation("entries".to_owned(), entries, 0, json!([entries]));
            Transform { updates: Some(vec![op]), ..Transform::default() }
        };
        let started = Instant::now();
        match one_transaction(&repo, &block_id, &transform, rev + 1, timeout_ms).await {
            Ok(true) => {
                latencies.push(started.elapsed());
                progress.done.fetch_add(1, Ordering::Relaxed);
                if rev > 0 {
                    entries += 1;
                }
                rev += 1;
            }
            Ok(false) => {
                progress.stale.fetch_add(1, Ordering::Relaxed);
                rev = current_rev(&repo, &block_id, timeout_ms).await.unwrap_or(rev);
            }
            Err(e) => {
                progress.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%block_id, error = %e, "bench transaction failed");
                rev = current_rev(&repo, &block_id, timeout_ms).await.unwrap_or(rev);
            }
        }
    }
    latencies
}

async fn current_rev(repo: &RepoClient, block_id: &BlockId, timeout_ms: u64) -> Result<u64, RepoError> {
    let gets = optimystic_core::model::BlockGets { block_ids: vec![block_id.clone()], context: None, read_mode: None };
    let results = repo.get(&gets, &MessageOptions::expiring_in(timeout_ms)).await?;
    Ok(results.get(block_id).and_then(|r| r.state.latest.as_ref()).map_or(0, |l| l.rev))
}

/// Pend + commit at `rev`: `Ok(true)` committed, `Ok(false)` stale.
async fn one_transaction(
    repo: &RepoClient,
    block_id: &BlockId,
    transform: &Transform,
    rev: u64,
    timeout_ms: u64,
) -> Result<bool, RepoError> {
    let options = MessageOptions::expiring_in(timeout_ms);
    let trx_id = new_trx_id();
    let pend = PendRequest {
        trx_id: trx_id.clone(),
        rev: Some(rev),
        transforms: Transforms::single(block_id, transform),
        policy: PendPolicy::Continue,
    };
    if let PendResult::Stale(_) = repo.pend(&pend, &options).await? {
        return Ok(false);
    }
    let commit =
        CommitRequest { trx_id, block_ids: vec![block_id.clone()], rev, tail_id: block_id.clone(), header_id: None };
    Ok(matches!(repo.commit(&commit, &options).await?, CommitResult::Success(_)))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1_000.0)
}

/// Resident memory of this process, from `/proc/self/status` (0 where unavailable).
pub fn resident_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Runs the benchmark and prints its figures.
pub async fn run(options: BenchOptions, registry: Registry) -> Result<(), DemoError> {
    let temp;
    let client_host = Host::start(HostConfig::new(identity::generate()), Handlers::default()).await?;
    let mut cluster = None;
    let targets: Vec<PeerId> = match &options.peer {
        Some(addr) => {
            let addr: libp2p::Multiaddr =
                addr.parse().map_err(|e| DemoError::Check(format!("--peer {addr:?}: {e}")))?;
            let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                return Err(DemoError::Check("--peer must end with /p2p/<peer id>".into()));
            };
            client_host.add_address(peer, addr).await.map_err(|e| DemoError::Check(e.to_string()))?;
            vec![peer]
        }
        None => {
            if options.coordinators > options.nodes as u64 {
                return Err(DemoError::Check(format!(
                    "--coordinators {} is more than the {} local nodes",
                    options.coordinators, options.nodes
                )));
            }
            let base = match &options.data_dir {
                Some(dir) => dir.clone(),
                None => {
                    temp = tempfile::tempdir()?;
                    temp.path().to_path_buf()
                }
            };
            if !options.json {
                eprintln!("starting {} nodes with {} storage", options.nodes, options.storage);
            }
            let started = LocalCluster::start(options.nodes.max(1), &options.storage, &base, registry).await?;
            let peers = register_nodes(&client_host, &started).await?;
            cluster = Some(started);
            peers
        }
    };
    let outcome = measure(&options, &client_host, &targets).await;
    client_host.shutdown().await;
    if let Some(cluster) = cluster {
        cluster.shutdown().await?;
    }
    outcome
}

async fn register_nodes(client_host: &HostHandle, cluster: &LocalCluster) -> Result<Vec<PeerId>, DemoError> {
    let mut peers = Vec::new();
    for i in 0..cluster.len() {
        if let Some(node) = cluster.node(i) {
            for addr in node.host().listen_addrs() {
                client_host.add_address(node.peer_id(), addr).await.map_err(|e| DemoError::Check(e.to_string()))?;
            }
            peers.push(node.peer_id());
        }
    }
    Ok(peers)
}

async fn measure(options: &BenchOptions, client_host: &HostHandle, targets: &[PeerId]) -> Result<(), DemoError> {
    let progress = Arc::new(Progress::default());
    let deadline = options.seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let claimed = Arc::new(AtomicU64::new(0));
    let total = options.transactions;
    let budget: Arc<dyn Fn() -> bool + Send + Sync> = {
        let claimed = claimed.clone();
        Arc::new(move || match deadline {
            Some(at) => Instant::now() < at,
            None => claimed.fetch_add(1, Ordering::Relaxed) < total,
        })
    };
    let network: Arc<dyn PeerNetwork> = Arc::new(client_host.clone());
    let run_id = new_trx_id();
    let started = Instant::now();
    let mut workers = Vec::new();
    // `run` checked the count against the local nodes; a remote `--peer` is the only target.
    let coordinators = usize::try_from(options.coordinators).unwrap_or(usize::MAX).clamp(1, targets.len().max(1));
    for w in 0..options.concurrency.max(1) {
        let Some(peer) = targets.get(w % coordinators) else { break };
        let repo = RepoClient::new(network.clone(), *peer).with_default_timeout_ms(options.timeout_ms);
        let block_id = BlockId::new(format!("bench-{run_id}-{w}")).map_err(|e| DemoError::Check(e.to_string()))?;
        workers.push(tokio::spawn(worker(repo, block_id, budget.clone(), progress.clone(), options.timeout_ms)));
    }
    let spinner = if options.json { indicatif::ProgressBar::hidden() } else { crate::progress::spinner() };
    let reporter = (!spinner.is_hidden()).then(|| {
        let (progress, spinner) = (progress.clone(), spinner.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let done = progress.done.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64().max(0.001);
                spinner.set_message(format!(
                    "{done} committed  {:.0} tx/s  {} stale  {} errors",
                    done as f64 / secs,
                    progress.stale.load(Ordering::Relaxed),
                    progress.errors.load(Ordering::Relaxed)
                ));
            }
        })
    });
    let mut latencies = Vec::new();
    for w in workers {
        if let Ok(mut l) = w.await {
            latencies.append(&mut l);
        }
    }
    if let Some(r) = reporter {
        r.abort();
    }
    spinner.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64().max(0.001);
    latencies.sort();
    let committed = latencies.len() as u64;
    let rss = resident_bytes();
    let nodes = if options.peer.is_some() { 0 } else { options.nodes.max(1) };
    let report = json!({
        "nodes": nodes,
        "storage": if options.peer.is_some() { "remote".to_owned() } else { options.storage.clone() },
        "concurrency": options.concurrency,
        "coordinators": coordinators,
        "committed": committed,
        "stale": progress.stale.load(Ordering::Relaxed),
        "errors": progress.errors.load(Ordering::Relaxed),
        "seconds": elapsed,
        "txPerSec": committed as f64 / elapsed,
        "latencyMs": { "p50": percentile(&latencies, 0.50), "p99": percentile(&latencies, 0.99),
                       "max": latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1_000.0) },
        "processRssBytes": rss,
        "rssBytesPerNode": if nodes > 0 { rss / nodes as u64 } else { 0 },
    });
    if options.json {
        println!("{report}");
    } else {
        println!(
            "{committed} transactions in {elapsed:.2} s: {:.0} tx/s, latency p50 {:.2} ms, p99 {:.2} ms; \
             {} stale, {} errors; process RSS {} MiB",
            committed as f64 / elapsed,
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            progress.stale.load(Ordering::Relaxed),
            progress.errors.load(Ordering::Relaxed),
            rss / (1024 * 1024)
        );
    }
    Ok(())
}

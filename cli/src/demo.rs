//! `optimystic demo`: a local cluster with a visible workload, a node stopped while writes go on,
//! and the node restarted and caught up.

use std::path::PathBuf;
use std::sync::Arc;

use optimystic_core::client::RepoClient;
use optimystic_core::model::{Block, BlockGets, BlockId, BlockOperation, Transform};
use optimystic_core::network::PeerNetwork;
use optimystic_core::registry::Registry;
use optimystic_core::{MessageOptions, Repo, RepoError};
use serde_json::json;

use optimystic_node::host::{Host, HostConfig, HostError, HostHandle};
use optimystic_node::identity;
use optimystic_node::local_cluster::LocalCluster;
use optimystic_node::node::NodeError;
use optimystic_node::service::Handlers;
use optimystic_node::txn::{self, RetryPolicy, TxnError};

/// Options of `optimystic demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Nodes in the local cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Storage engine of every node.
    #[arg(long, default_value = "lmdb")]
    pub storage: String,
    /// Entries written in each phase.
    #[arg(long, default_value_t = 10)]
    pub writes: usize,
    /// Keep the nodes' data here instead of a temporary directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A node failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The client host failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A write failed.
    #[error(transparent)]
    Txn(#[from] TxnError),
    /// A read failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The demo's own checks failed.
    #[error("demo check failed: {0}")]
    Check(String),
    /// Local I/O failed (in the text, so not also returned by `source()`).
    #[error("demo I/O: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for DemoError {
    fn from(error: std::io::Error) -> Self {
        Self::Io(error)
    }
}

fn say(text: &str) {
    println!("[demo] {text}");
}

/// A client of node `i` over a dedicated client host.
async fn client_of(host: &HostHandle, cluster: &LocalCluster, i: usize) -> Result<RepoClient, DemoError> {
    let node = cluster.node(i).ok_or_else(|| DemoError::Check(format!("node {} is not running", i + 1)))?;
    let peer = node.peer_id();
    for addr in node.host().listen_addrs() {
        host.add_address(peer, addr).await.map_err(|e| DemoError::Check(e.to_string()))?;
    }
    let network: Arc<dyn PeerNetwork> = Arc::new(host.clone());
    Ok(RepoClient::new(network, peer))
}

async fn append_entries(repo: &dyn Repo, block_id: &BlockId, phase: &str, count: usize) -> Result<u64, DemoError> {
    let bar = crate::progress::bar(count as u64, "[demo]   [{bar:30}] {pos}/{len} committed, {msg}");
    let mut rev = 0;
    for n in 1..=count {
        let op = BlockOperation("entries".to_owned(), 0, 0, json!([format!("{phase} entry {n}")]));
        let transform = Transform { updates: Some(vec![op]), ..Transform::default() };
        let done = txn::write_block(repo, block_id, &transform, RetryPolicy::default()).await?;
        rev = done.rev;
        bar.set_message(format!("block at rev {rev}"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    say(&format!("  {count}/{count} committed, block at rev {rev}"));
    Ok(rev)
}

async fn latest_rev(repo: &dyn Repo, block_id: &BlockId) -> Result<Option<u64>, DemoError> {
    let gets = BlockGets { block_ids: vec![block_id.clone()], context: None, read_mode: None };
    let results = repo.get(&gets, &MessageOptions::expiring_in(10_000)).await?;
    Ok(results.get(block_id).and_then(|r| r.state.latest.as_ref()).map(|l| l.rev))
}

/// Runs the demo.
pub async fn run(options: DemoOptions, registry: Registry) -> Result<(), DemoError> {
    let temp;
    let base = match &options.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let count = options.nodes.max(2);
    say(&format!("starting {count} nodes with {} storage under {}", options.storage, base.display()));
    let mut cluster = LocalCluster::start(count, &options.storage, &base, registry).await?;
    for i in 0..cluster.len() {
        if let Some(node) = cluster.node(i) {
            let addrs: Vec<String> = node.p2p_addrs().iter().map(ToString::to_string).collect();
            say(&format!("node {} listening {}", i + 1, addrs.join(" ")));
        }
    }
    let client_host = Host::start(HostConfig::new(identity::generate()), Handlers::default()).await?;
    let outcome = scenario(&options, &mut cluster, &client_host).await;
    client_host.shutdown().await;
    say("stopping every node");
    cluster.shutdown().await?;
    outcome?;
    say("all nodes stopped cleanly");
    Ok(())
}

async fn scenario(
    options: &DemoOptions,
    cluster: &mut LocalCluster,
    client_host: &HostHandle,
) -> Result<(), DemoError> {
    let block_id = BlockId::new("demo-diary").map_err(|e| DemoError::Check(e.to_string()))?;
    let first = client_of(client_host, cluster, 0).await?;
    say("creating block demo-diary through node 1");
    let insert = Transform {
        insert: Some(Block::new(block_id.clone(), "diary", "demo").with_field("entries", json!([]))),
        ..Transform::default()
    };
    txn::write_block(&first, &block_id, &insert, RetryPolicy::default()).await?;
    say(&format!("writing {} entries through node 1", options.writes));
    append_entries(&first, &block_id, "first", options.writes).await?;

    let down = cluster.len() - 1;
    say(&format!("stopping node {}", down + 1));
    cluster.stop(down).await?;
    say(&format!("writing {} more entries while node {} is down", options.writes, down + 1));
    let target = append_entries(&first, &block_id, "second", options.writes).await?;

    say(&format!("restarting node {}", down + 1));
    cluster.restart(down).await?;
    let node = cluster.node(down).ok_or_else(|| DemoError::Check("restarted node missing".into()))?;
    let before = node.storage().latest(&block_id).await.map_err(RepoError::from)?.map_or(0, |l| l.rev);
    say(&format!("node {} holds rev {before} locally; the cluster is at rev {target}", down + 1));
    let read = latest_rev(node.repo().as_ref(), &block_id).await?;
    let after = node.storage().latest(&block_id).await.map_err(RepoError::from)?.map_or(0, |l| l.rev);
    if read != Some(target) || after != target {
        return Err(DemoError::Check(format!(
            "node {} read rev {read:?} and holds rev {after}, expected {target}",
            down + 1
        )));
    }
    say(&format!(
        "a quorum read through node {} returned rev {target}; it caught up and now holds rev {after}",
        down + 1
    ));
    Ok(())
}

//! A local cluster of in-process nodes on 127.0.0.1, for `optimystic demo`, `optimystic bench` and
//! tests: node 0 is the bootstrap peer of the others; a stopped node can be restarted on the same
//! data directory and port.

use std::path::{Path, PathBuf};
use std::time::Duration;

use optimystic_core::keynet::PeerRouting;
use optimystic_core::registry::Registry;

use crate::config::{self, NodeConfig};
use crate::node::{Node, NodeError};

/// How long [`LocalCluster::start`] waits for every node to know every other.
pub const ROUTING_SETTLE_TIMEOUT_MS: u64 = 20_000;

/// A set of local nodes.
#[derive(Debug)]
pub struct LocalCluster {
    configs: Vec<NodeConfig>,
    nodes: Vec<Option<Node>>,
    registry: Registry,
}

/// A free TCP port on 127.0.0.1 (bound and released; another process could take it first).
pub fn free_port() -> Result<u16, NodeError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| NodeError::Config(format!("no free port on 127.0.0.1: {e}")))
}

impl LocalCluster {
    /// Starts `count` nodes with storage `storage_kind` under `base_dir/node-<i>`, waits until every
    /// node's routing table holds every other node, and returns the cluster.
    pub async fn start(
        count: usize,
        storage_kind: &str,
        base_dir: &Path,
        registry: Registry,
    ) -> Result<Self, NodeError> {
        if count == 0 {
            return Err(NodeError::Config("a local cluster needs at least one node".into()));
        }
        let mut cluster = Self { configs: Vec::with_capacity(count), nodes: Vec::with_capacity(count), registry };
        let mut bootstrap: Vec<String> = Vec::new();
        for i in 0..count {
            let mut config = config::defaults();
            config.node.data_dir = base_dir.join(format!("node-{i}"));
            config.node.listen = vec![format!("/ip4/127.0.0.1/tcp/{}", free_port()?)];
            config.node.bootstrap = bootstrap.clone();
            config.storage.kind = storage_kind.to_owned();
            config.metrics.enabled = false;
            let node = Node::start(&config, &cluster.registry).await?;
            if i == 0 {
                bootstrap = node.p2p_addrs().iter().map(ToString::to_string).collect();
            }
            cluster.configs.push(config);
            cluster.nodes.push(Some(node));
        }
        cluster.settle(count.saturating_sub(1)).await?;
        Ok(cluster)
    }

    /// Starts one more node, bootstrapped from the first running node, and returns its index.
    pub async fn add_node(&mut self, storage_kind: &str, base_dir: &Path) -> Result<usize, NodeError> {
        let bootstrap: Vec<String> = self
            .nodes
            .iter()
            .flatten()
            .next()
            .map(|n| n.p2p_addrs().iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        let index = self.nodes.len();
        let mut config = config::defaults();
        config.node.data_dir = base_dir.join(format!("node-{index}"));
        config.node.listen = vec![format!("/ip4/127.0.0.1/tcp/{}", free_port()?)];
        config.node.bootstrap = bootstrap;
        config.storage.kind = storage_kind.to_owned();
        config.metrics.enabled = false;
        let node = Node::start(&config, &self.registry).await?;
        self.configs.push(config);
        self.nodes.push(Some(node));
        Ok(index)
    }

    /// Waits until every running node knows at least `peers` others in its routing table.
    pub async fn settle(&self, peers: usize) -> Result<(), NodeError> {
        let wait = async {
            for node in self.nodes.iter().flatten() {
                let mut probe = 0u32;
                while node.host().known_peers().await.len() < peers {
                    // A DHT lookup walks the network and fills the routing table; a node that joined
                    // before others would otherwise learn of them only at its next bootstrap.
                    probe += 1;
                    let Ok(target) = optimystic_core::BlockId::new(format!("settle-{probe}")) else { break };
                    if node.host().closest_peers(&target).await.is_err() {
                        let mut updates = node.host().routing_updates();
                        if updates.changed().await.is_err() {
                            break;
                        }
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_millis(ROUTING_SETTLE_TIMEOUT_MS), wait).await.map_err(|_| {
            NodeError::Config(format!("nodes did not learn {peers} peers within {ROUTING_SETTLE_TIMEOUT_MS} ms"))
        })
    }

    /// The running node `i`.
    pub fn node(&self, i: usize) -> Option<&Node> {
        self.nodes.get(i).and_then(Option::as_ref)
    }

    /// How many nodes the cluster has (running or stopped).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The data directory of node `i`.
    pub fn data_dir(&self, i: usize) -> Option<PathBuf> {
        self.configs.get(i).map(|c| c.node.data_dir.clone())
    }

    /// Stops node `i` gracefully.
    pub async fn stop(&mut self, i: usize) -> Result<(), NodeError> {
        match self.nodes.get_mut(i).and_then(Option::take) {
            Some(node) => node.shutdown().await,
            None => Ok(()),
        }
    }

    /// Restarts a stopped node `i` on its data directory and port.
    pub async fn restart(&mut self, i: usize) -> Result<(), NodeError> {
        let config = self.configs.get(i).cloned().ok_or_else(|| NodeError::Config(format!("no node {i}")))?;
        let node = Node::start(&config, &self.registry).await?;
        if let Some(slot) = self.nodes.get_mut(i) {
            *slot = Some(node);
        }
        Ok(())
    }

    /// Stops every node.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        let mut first_error = None;
        for i in 0..self.nodes.len() {
            if let Err(e) = self.stop(i).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

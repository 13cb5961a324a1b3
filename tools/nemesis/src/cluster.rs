//! The `optimystic start` processes: configuration files, start and restart, SIGKILL, SIGSTOP and
//! SIGCONT, graceful stop, leave and join, partitions, and the cluster membership of a block.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::net::{Netns, Resources};

/// Where a node stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Running.
    Up,
    /// Killed, not yet restarted.
    Down,
    /// SIGSTOPped.
    Paused,
    /// Left for good.
    Gone,
}

/// One node.
#[derive(Debug)]
pub struct Node {
    /// Its number (never reused).
    pub slot: usize,
    /// Its address (inside its namespace, or 127.0.0.1).
    pub ip: String,
    /// Its libp2p TCP port.
    pub port: u16,
    /// Its metrics address.
    pub metrics: String,
    /// Its directory (config, data, log).
    pub dir: PathBuf,
    /// Its peer id, once started.
    pub peer_id: Option<String>,
    /// `/ip4/.../tcp/.../p2p/<peer id>`, once started.
    pub addr: Option<String>,
    /// Where it stands.
    pub state: NodeState,
    child: Option<Child>,
    pid: Option<i32>,
}

/// Addresses the workload may send to: `(slot, multiaddr)` of every node that has not left.
pub type Targets = Arc<RwLock<Vec<(usize, String)>>>;

/// The nodes of one run.
#[derive(Debug)]
pub struct Cluster {
    /// The `optimystic` binary.
    pub bin: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// Namespaces, when used.
    pub net: Option<Netns>,
    /// Cleanup registry.
    pub res: Arc<Resources>,
    /// Every node ever started, by slot.
    pub nodes: Vec<Node>,
    /// Peers per block cluster.
    pub cluster_size: usize,
    /// What the workload may talk to.
    pub targets: Targets,
    /// Blackholed (from, to) pairs in force.
    pub blocked: Vec<(usize, usize)>,
}

/// A free TCP port on 127.0.0.1 (fallback mode). The probe does not set SO_REUSEPORT.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The DHT key of a peer: sha256 of its peer id bytes (the base58 text decoded).
fn peer_key(peer_id: &str) -> Option<[u8; 32]> {
    let bytes = bs58::decode(peer_id).into_vec().ok()?;
    Some(Sha256::digest(bytes).into())
}

/// The `n` peers closest to `sha256(block)` by XOR distance of their DHT keys (SPEC 4).
pub fn closest(block: &str, peers: &[(usize, String)], n: usize) -> Vec<usize> {
    let key: [u8; 32] = Sha256::digest(block.as_bytes()).into();
    let mut ranked: Vec<([u8; 32], usize)> = peers
        .iter()
        .filter_map(|(slot, id)| {
            let pk = peer_key(id)?;
            let mut d = [0u8; 32];
            for (i, b) in d.iter_mut().enumerate() {
                *b = key.get(i).copied().unwrap_or(0) ^ pk.get(i).copied().unwrap_or(0);
            }
            Some((d, *slot))
        })
        .collect();
    ranked.sort();
    ranked.into_iter().take(n).map(|(_, s)| s).collect()
}

impl Cluster {
    /// A cluster with no nodes yet.
    pub fn new(bin: PathBuf, out: PathBuf, net: Option<Netns>, res: Arc<Resources>, cluster_size: usize) -> Self {
        Self {
            bin,
            out,
            net,
            res,
            nodes: Vec::new(),
            cluster_size,
            targets: Arc::new(RwLock::new(Vec::new())),
            blocked: Vec::new(),
        }
    }

    /// Slots of nodes that have not left.
    pub fn live(&self) -> Vec<usize> {
        self.nodes.iter().filter(|n| n.state != NodeState::Gone).map(|n| n.slot).collect()
    }

    fn node(&self, slot: usize) -> anyhow::Result<&Node> {
        self.nodes.get(slot).ok_or_else(|| anyhow!("no node {slot}"))
    }

    fn node_mut(&mut self, slot: usize) -> anyhow::Result<&mut Node> {
        self.nodes.get_mut(slot).ok_or_else(|| anyhow!("no node {slot}"))
    }

    /// The multiaddr of a node that has started once.
    pub fn addr(&self, slot: usize) -> Option<String> {
        self.nodes.get(slot).and_then(|n| n.addr.clone())
    }

    fn publish_targets(&self) {
        let list: Vec<(usize, String)> = self
            .nodes
            .iter()
            .filter(|n| n.state != NodeState::Gone)
            .filter_map(|n| n.addr.clone().map(|a| (n.slot, a)))
            .collect();
        if let Ok(mut t) = self.targets.write() {
            *t = list;
        }
    }

    /// The cluster members of `block` among the nodes that have not left (harness's view).
    pub fn members(&self, block: &str) -> Vec<usize> {
        let peers: Vec<(usize, String)> = self
            .nodes
            .iter()
            .filter(|n| n.state != NodeState::Gone)
            .filter_map(|n| n.peer_id.clone().map(|p| (n.slot, p)))
            .collect();
        closest(block, &peers, self.cluster_size)
    }

    /// Adds a node slot (namespace and address) without starting it.
    pub fn add_node(&mut self) -> anyhow::Result<usize> {
        let slot = self.nodes.len();
        let (ip, port, metrics) = match &self.net {
            Some(net) => {
                net.add_node(slot)?;
                let ip = Netns::node_ip(slot);
                (ip.clone(), 4001, format!("{ip}:9464"))
            }
            None => ("127.0.0.1".to_owned(), free_port()?, format!("127.0.0.1:{}", free_port()?)),
        };
        let dir = self.out.join("nodes").join(format!("n{slot}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        self.nodes.push(Node {
            slot,
            ip,
            port,
            metrics,
            dir,
            peer_id: None,
            addr: None,
            state: NodeState::Down,
            child: None,
            pid: None,
        });
        Ok(slot)
    }

    fn write_config(&self, slot: usize) -> anyhow::Result<PathBuf> {
        let node = self.node(slot)?;
        let bootstrap: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.slot != slot && matches!(n.state, NodeState::Up | NodeState::Paused))
            .filter_map(|n| n.addr.clone())
            .map(|a| format!("{a:?}"))
            .collect();
        let text = format!(
            "# Written by optimystic-nemesis for node {slot}.\n\
             [node]\n\
             data_dir = {data:?}\n\
             listen = [\"/ip4/{ip}/tcp/{port}\"]\n\
             bootstrap = [{bootstrap}]\n\
             read_mode = \"quorum\"\n\n\
             [storage]\n\
             kind = \"lmdb\"\n\
             map_size_bytes = 268435456\n\n\
             [key_network]\n\
             kind = \"kademlia\"\n\
             cluster_size = {cs}\n\n\
             [consensus]\n\
             kind = \"majority-2pc\"\n\
             promise_threshold = \"majority\"\n\
             commit_threshold = \"majority\"\n\n\
             [metrics]\n\
             enabled = true\n\
             listen = {metrics:?}\n",
            data = node.dir.join("data").display().to_string(),
            ip = node.ip,
            port = node.port,
            bootstrap = bootstrap.join(", "),
            cs = self.cluster_size,
            metrics = node.metrics,
        );
        let path = node.dir.join("config.toml");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Starts (or restarts) a node and waits for its `listening` line.
    pub async fn start(&mut self, slot: usize) -> anyhow::Result<()> {
        let config = self.write_config(slot)?;
        let node = self.node(slot)?;
        let log_path = node.dir.join("node.log");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        writeln!(log, "=== nemesis: starting node {slot} ===")?;
        let stderr = log.try_clone()?;
        let mut cmd = match &self.net {
            Some(net) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &net.node_ns(slot)]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        // `ip netns exec` execs the binary in place: the child's pid is the node's.
        cmd.arg("start")
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .env_remove("OPTIMYSTIC_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting node {slot}"))?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok());
        if let Some(pid) = pid {
            self.res.add_pid(pid);
        }
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut addr = None;
        while addr.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, lines.next_line()).await {
                Ok(Ok(Some(line))) => {
                    let _ = writeln!(log, "{line}");
                    if let Some(a) = line.strip_prefix("listening ") {
                        addr = Some(a.trim().to_owned());
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) => {
                    let status = child.wait().await.ok();
                    if let Some(pid) = pid {
                        self.res.remove_pid(pid);
                    }
                    bail!("node {slot} exited before listening ({status:?}); see {}", log_path.display());
                }
                Err(_) => {
                    let _ = child.start_kill();
                    bail!("node {slot} printed no listening line within 60 s; see {}", log_path.display());
                }
            }
        }
        // Keep draining stdout into the log.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(log, "{line}");
            }
        });
        let addr = addr.unwrap_or_default();
        let peer_id = addr.rsplit("/p2p/").next().map(str::to_owned);
        let node = self.node_mut(slot)?;
        if let (Some(old), Some(new)) = (&node.peer_id, &peer_id)
            && old != new
        {
            bail!("node {slot} restarted with a new peer id ({old} -> {new})");
        }
        node.addr = Some(addr);
        node.peer_id = peer_id;
        node.child = Some(child);
        node.pid = pid;
        node.state = NodeState::Up;
        self.publish_targets();
        Ok(())
    }

    fn signal(&self, slot: usize, sig: Signal) -> anyhow::Result<()> {
        let pid = self.node(slot)?.pid.ok_or_else(|| anyhow!("node {slot} is not running"))?;
        kill(Pid::from_raw(pid), sig).with_context(|| format!("sending {sig} to node {slot} (pid {pid})"))
    }

    async fn reap(&mut self, slot: usize) -> anyhow::Result<()> {
        let res = self.res.clone();
        let node = self.node_mut(slot)?;
        if let Some(mut child) = node.child.take() {
            let _ = child.wait().await;
        }
        if let Some(pid) = node.pid.take() {
            res.remove_pid(pid);
        }
        Ok(())
    }

    /// SIGKILL.
    pub async fn kill(&mut self, slot: usize) -> anyhow::Result<()> {
        self.signal(slot, Signal::SIGKILL)?;
        self.reap(slot).await?;
        self.node_mut(slot)?.state = NodeState::Down;
        Ok(())
    }

    /// SIGSTOP.
    pub fn pause(&mut self, slot: usize) -> anyhow::Result<()> {
        self.signal(slot, Signal::SIGSTOP)?;
        self.node_mut(slot)?.state = NodeState::Paused;
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self, slot: usize) -> anyhow::Result<()> {
        self.signal(slot, Signal::SIGCONT)?;
        self.node_mut(slot)?.state = NodeState::Up;
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`. Returns whether it exited on its own.
    pub async fn stop(&mut self, slot: usize, grace: Duration) -> anyhow::Result<bool> {
        let node = self.node(slot)?;
        if node.pid.is_none() {
            return Ok(true);
        }
        if node.state == NodeState::Paused {
            self.signal(slot, Signal::SIGCONT)?;
        }
        self.signal(slot, Signal::SIGTERM)?;
        let node = self.node_mut(slot)?;
        let mut graceful = true;
        if let Some(child) = node.child.as_mut()
            && tokio::time::timeout(grace, child.wait()).await.is_err()
        {
            graceful = false;
            let _ = child.start_kill();
        }
        self.reap(slot).await?;
        self.node_mut(slot)?.state = NodeState::Down;
        Ok(graceful)
    }

    /// The node leaves for good: graceful stop, its namespace is removed, it is never restarted.
    pub async fn leave(&mut self, slot: usize) -> anyhow::Result<()> {
        self.stop(slot, Duration::from_secs(20)).await?;
        if let Some(net) = &self.net {
            net.remove_node(slot);
        }
        self.blocked.retain(|(a, b)| *a != slot && *b != slot);
        self.node_mut(slot)?.state = NodeState::Gone;
        self.publish_targets();
        Ok(())
    }

    /// A new node joins (bootstrapping from the running ones); returns its slot.
    pub async fn join(&mut self) -> anyhow::Result<usize> {
        let slot = self.add_node()?;
        self.start(slot).await?;
        Ok(slot)
    }

    /// Cuts the network between every node of `a` and every node of `b` (both directions).
    pub fn partition(&mut self, a: &[usize], b: &[usize]) -> anyhow::Result<()> {
        let Some(net) = &self.net else { bail!("partitions need network namespaces") };
        for &x in a {
            for &y in b {
                net.block(x, y)?;
                net.block(y, x)?;
                self.blocked.push((x, y));
                self.blocked.push((y, x));
            }
        }
        Ok(())
    }

    /// Removes every partition.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        if let Some(net) = &self.net {
            for n in self.nodes.iter().filter(|n| n.state != NodeState::Gone) {
                net.heal(n.slot)?;
            }
        }
        self.blocked.clear();
        Ok(())
    }

    /// Brings every node back: heals partitions, resumes paused nodes, restarts killed ones.
    pub async fn heal_all(&mut self) -> anyhow::Result<Vec<usize>> {
        self.heal()?;
        let mut restarted = Vec::new();
        for slot in self.live() {
            match self.node(slot)?.state {
                NodeState::Paused => self.resume(slot)?,
                NodeState::Down => {
                    self.start(slot).await?;
                    restarted.push(slot);
                }
                _ => {}
            }
        }
        Ok(restarted)
    }

    /// Stops every node gracefully (SIGTERM, SIGKILL after `grace`); returns the slots that had to
    /// be killed.
    pub async fn stop_all(&mut self, grace: Duration) -> Vec<usize> {
        let mut killed = Vec::new();
        for slot in self.live() {
            if let Ok(false) = self.stop(slot, grace).await {
                killed.push(slot);
            }
        }
        killed
    }
}

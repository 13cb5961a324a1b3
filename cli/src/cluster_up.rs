//! `optimystic cluster up`: a local cluster of real `optimystic start` processes.
//!
//! Each node gets a generated config file `node<i>.toml`, a data directory `node<i>/` and a log
//! `node<i>.log` (its stderr and stdout) in one directory. Node 1 starts first; the others
//! bootstrap from the exact address it prints (`/p2p/<peer id>` included). The command prints each
//! node's address and a ready-to-paste client command, then waits: SIGINT (Ctrl-C) or SIGTERM
//! stops every node (SIGTERM, then SIGKILL after [`STOP_GRACE_MS`]) and returns normally; a node
//! that exits on its own stops the others and is an error.
//!
//! The nodes run in their own process group, so a Ctrl-C at the terminal reaches only this
//! command, which stops them in order.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use futures::future::select_all;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use optimystic_node::config::{self, NodeConfig};

/// The longest a node may take to print its `listening` and `metrics` lines.
pub const STARTUP_TIMEOUT_MS: u64 = 60_000;
/// How long, once every node listens, to wait for their `ready` lines before printing the
/// cluster anyway (a node that reports ready later is announced then; a binary whose `start`
/// prints no `ready` line only costs this wait).
pub const READY_WAIT_MS: u64 = 5_000;
/// How long a node may take to stop after SIGTERM before it gets SIGKILL.
pub const STOP_GRACE_MS: u64 = 20_000;
/// Most nodes one `cluster up` starts.
pub const MAX_NODES: usize = 64;
/// Most `optimystic-cluster-<n>` directories tried when no `--dir` is given.
const MAX_DIR_ATTEMPTS: usize = 10_000;
/// Peers per block cluster (at most the number of nodes).
const CLUSTER_SIZE: usize = 3;

/// Options of `optimystic cluster up`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterUpOptions {
    /// Nodes to start (1..=64).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Storage engine of every node (`lmdb`, `file`, `memory`, ...).
    #[arg(long, default_value = "lmdb")]
    pub storage: String,
    /// TCP port of node 1; node i listens on base + i - 1. 0: free ports the system picks (also
    /// for metrics).
    #[arg(long, default_value_t = 4101)]
    pub base_port: u16,
    /// Metrics port of node 1; node i serves `/metrics` on base + i - 1.
    #[arg(long, default_value_t = 9101)]
    pub metrics_base_port: u16,
    /// Directory for the config files, data and logs (created if missing; kept afterwards).
    /// Default: a new `optimystic-cluster-<n>` in the current directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Why the cluster could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ClusterUpError {
    /// An option is out of range.
    #[error("{0}")]
    Options(String),
    /// Local I/O failed.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: String,
        /// The error (in the text, so not also returned by `source()`).
        error: std::io::Error,
    },
    /// A generated configuration could not be written as TOML.
    #[error("writing the configuration of node {node}: {error}")]
    Config {
        /// The node (1-based).
        node: usize,
        /// The error.
        error: toml::ser::Error,
    },
    /// A node exited, or never reported that it listens.
    #[error("node {node} {what}; its log: {}", log.display())]
    Node {
        /// The node (1-based).
        node: usize,
        /// What happened.
        what: String,
        /// Its log file.
        log: PathBuf,
    },
}

impl ClusterUpError {
    fn io(what: impl Into<String>, error: std::io::Error) -> Self {
        Self::Io { what: what.into(), error }
    }
}

/// Something a node's stdout said, or its end.
#[derive(Debug)]
enum Event {
    Line(usize, String),
    Closed(usize),
}

/// One running node.
#[derive(Debug)]
struct Running {
    child: Child,
    pid: Option<u32>,
    log: PathBuf,
    addr: Option<String>,
    metrics: Option<String>,
    ready: bool,
}

/// The nodes started so far and their stdout events.
#[derive(Debug)]
struct Cluster {
    nodes: Vec<Running>,
    events: mpsc::UnboundedReceiver<Event>,
    sender: mpsc::UnboundedSender<Event>,
}

/// Starts the cluster with `exe` (this program), prints it (client commands to paste start with
/// `program`, the program as the user invoked it), and runs it until SIGINT or SIGTERM. Returns
/// once every node stopped after a signal; an error when a node failed to start or exited on its
/// own (the other nodes are stopped first).
pub async fn run(options: &ClusterUpOptions, exe: &Path, program: &str) -> Result<(), ClusterUpError> {
    if !(1..=MAX_NODES).contains(&options.nodes) {
        return Err(ClusterUpError::Options(format!("--nodes must be between 1 and {MAX_NODES}")));
    }
    let last_offset = u16::try_from(options.nodes - 1).unwrap_or(u16::MAX);
    if options.base_port != 0
        && (options.base_port.checked_add(last_offset).is_none()
            || options.metrics_base_port.checked_add(last_offset).is_none())
    {
        return Err(ClusterUpError::Options("--base-port or --metrics-base-port leaves no room for every node".into()));
    }
    let dir = cluster_dir(options.dir.as_deref())?;
    let mut signals = Signals::install()?;
    let (sender, events) = mpsc::unbounded_channel();
    let mut cluster = Cluster { nodes: Vec::new(), events, sender };
    let started = start_all(&mut cluster, options, exe, &dir, &mut signals).await;
    let outcome = match started {
        Ok(true) => {
            print_cluster(&cluster, &dir, program);
            watch(&mut cluster, &mut signals).await
        }
        Ok(false) => Ok(()),
        Err(e) => Err(e),
    };
    if outcome.is_ok() {
        say("stopping every node");
    }
    stop_all(&mut cluster).await;
    outcome
}

/// The directory to use: `dir` (created if missing), or a new `optimystic-cluster-<n>` here.
fn cluster_dir(dir: Option<&Path>) -> Result<PathBuf, ClusterUpError> {
    let absolute = |path: &Path| {
        std::path::absolute(path).map_err(|e| ClusterUpError::io(format!("resolving {}", path.display()), e))
    };
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(|e| ClusterUpError::io(format!("creating {}", dir.display()), e))?;
        return absolute(dir);
    }
    for n in 1..=MAX_DIR_ATTEMPTS {
        let candidate = PathBuf::from(format!("optimystic-cluster-{n}"));
        match std::fs::create_dir(&candidate) {
            Ok(()) => return absolute(&candidate),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ClusterUpError::io(format!("creating {}", candidate.display()), e)),
        }
    }
    Err(ClusterUpError::Options("every optimystic-cluster-<n> name is taken here; give --dir".into()))
}

/// SIGINT and SIGTERM.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, ClusterUpError> {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt =
            signal(SignalKind::interrupt()).map_err(|e| ClusterUpError::io("installing the SIGINT handler", e))?;
        let terminate =
            signal(SignalKind::terminate()).map_err(|e| ClusterUpError::io("installing the SIGTERM handler", e))?;
        Ok(Self { interrupt, terminate })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// The configuration of node `i` (1-based).
fn node_config(options: &ClusterUpOptions, dir: &Path, i: usize, bootstrap: Option<&str>) -> NodeConfig {
    let offset = u16::try_from(i - 1).unwrap_or(0);
    let (port, metrics_port) = if options.base_port == 0 {
        (0, 0)
    } else {
        (options.base_port.saturating_add(offset), options.metrics_base_port.saturating_add(offset))
    };
    let mut config = config::defaults();
    config.node.data_dir = dir.join(format!("node{i}"));
    config.node.listen = vec![format!("/ip4/127.0.0.1/tcp/{port}")];
    config.node.bootstrap = bootstrap.map(str::to_owned).into_iter().collect();
    config.storage.kind = options.storage.clone();
    config.key_network.options.insert("cluster_size".into(), Value::from(CLUSTER_SIZE.min(options.nodes)));
    config.metrics.listen = format!("127.0.0.1:{metrics_port}");
    config
}

/// Starts node 1, then the others bootstrapping from it, each once the one before listens.
/// `Ok(false)`: a signal came first.
async fn start_all(
    cluster: &mut Cluster,
    options: &ClusterUpOptions,
    exe: &Path,
    dir: &Path,
    signals: &mut Signals,
) -> Result<bool, ClusterUpError> {
    say(&format!("starting {} nodes with {} storage in {}", options.nodes, options.storage, dir.display()));
    let mut bootstrap: Option<String> = None;
    for i in 1..=options.nodes {
        let config = node_config(options, dir, i, bootstrap.as_deref());
        let path = dir.join(format!("node{i}.toml"));
        let text = toml::to_string_pretty(&config).map_err(|error| ClusterUpError::Config { node: i, error })?;
        let header = format!(
            "# Node {i} of a local cluster written by `optimystic cluster up`; run by hand with\n#   {} start --config {}\n",
            exe.display(),
            path.display()
        );
        std::fs::write(&path, format!("{header}{text}"))
            .map_err(|e| ClusterUpError::io(format!("writing {}", path.display()), e))?;
        spawn(cluster, exe, &path, dir, i)?;
        let deadline = Instant::now() + Duration::from_millis(STARTUP_TIMEOUT_MS);
        let listening = tokio::select! {
            listening = wait_until(cluster, deadline, |c| c.nodes.get(i - 1).is_some_and(|n| n.addr.is_some() && n.metrics.is_some())) => listening,
            () = signals.recv() => return Ok(false),
        };
        match listening {
            Ok(()) => {}
            Err(Stop::Exited(node, what)) => return Err(node_error(cluster, node, what)),
            Err(Stop::Timeout) => {
                let what = format!("printed no listening and metrics lines within {STARTUP_TIMEOUT_MS} ms");
                return Err(node_error(cluster, i, what));
            }
        }
        if bootstrap.is_none() {
            bootstrap = cluster.nodes.first().and_then(|n| n.addr.clone());
        }
    }
    let deadline = Instant::now() + Duration::from_millis(READY_WAIT_MS);
    tokio::select! {
        ready = wait_until(cluster, deadline, |c| c.nodes.iter().all(|n| n.ready)) => {
            // Nodes still not ready are shown as such; a node that exited is an error.
            if let Err(Stop::Exited(node, what)) = ready {
                return Err(node_error(cluster, node, what));
            }
        }
        () = signals.recv() => return Ok(false),
    }
    Ok(true)
}

/// Starts node `i` with its config file; its stdout lines arrive as events.
fn spawn(cluster: &mut Cluster, exe: &Path, config: &Path, dir: &Path, i: usize) -> Result<(), ClusterUpError> {
    let log = dir.join(format!("node{i}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| ClusterUpError::io(format!("opening {}", log.display()), e))?;
    let stderr = file.try_clone().map_err(|e| ClusterUpError::io(format!("opening {}", log.display()), e))?;
    let mut child = Command::new(exe)
        .arg("start")
        .arg("--config")
        .arg(config)
        .env_remove(config::CONFIG_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ClusterUpError::io(format!("starting node {i} ({})", exe.display()), e))?;
    let pid = child.id();
    if let Some(stdout) = child.stdout.take() {
        let sender = cluster.sender.clone();
        tokio::spawn(forward_stdout(i, stdout, file, sender));
    }
    cluster.nodes.push(Running { child, pid, log, addr: None, metrics: None, ready: false });
    Ok(())
}

/// Copies node `i`'s stdout into its log and sends each line as an event.
async fn forward_stdout(
    i: usize,
    stdout: tokio::process::ChildStdout,
    mut log: std::fs::File,
    sender: mpsc::UnboundedSender<Event>,
) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = writeln!(log, "{line}");
        if sender.send(Event::Line(i, line)).is_err() {
            return;
        }
    }
    let _ = sender.send(Event::Closed(i));
}

/// Why [`wait_until`] stopped before its condition held.
#[derive(Debug)]
enum Stop {
    /// A node (1-based) closed its output: it exited, as said.
    Exited(usize, String),
    /// The deadline passed.
    Timeout,
}

/// How long a node that closed its output may take to exit before it is reported as is.
const EXIT_AFTER_CLOSE_MS: u64 = 5_000;

/// Applies events until `done` holds, a node exits, or `deadline` passes.
async fn wait_until(cluster: &mut Cluster, deadline: Instant, done: impl Fn(&Cluster) -> bool) -> Result<(), Stop> {
    while !done(cluster) {
        match tokio::time::timeout_at(deadline, cluster.events.recv()).await {
            Ok(Some(Event::Line(i, line))) => apply_line(cluster, i, &line),
            Ok(Some(Event::Closed(i))) => {
                let status = match cluster.nodes.get_mut(i - 1) {
                    Some(node) => {
                        match tokio::time::timeout(Duration::from_millis(EXIT_AFTER_CLOSE_MS), node.child.wait()).await
                        {
                            Ok(status) => {
                                format!("exited ({})", status.map(describe).unwrap_or_else(|e| e.to_string()))
                            }
                            Err(_) => "closed its output".to_owned(),
                        }
                    }
                    None => "exited".to_owned(),
                };
                return Err(Stop::Exited(i, status));
            }
            // The cluster holds a sender: the channel never closes while it waits.
            Ok(None) | Err(_) => return Err(Stop::Timeout),
        }
    }
    Ok(())
}

/// Records what a `listening`, `metrics` or `ready` line of node `i` says.
fn apply_line(cluster: &mut Cluster, i: usize, line: &str) {
    let Some(node) = cluster.nodes.get_mut(i - 1) else { return };
    if let Some(addr) = line.strip_prefix("listening ") {
        node.addr.get_or_insert_with(|| addr.trim().to_owned());
    } else if let Some(url) = line.strip_prefix("metrics ") {
        node.metrics.get_or_insert_with(|| url.trim().to_owned());
    } else if line.split_whitespace().next() == Some("ready") {
        node.ready = true;
    }
}

/// Most bytes of a node's log read to find its last error line.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// What node `node` did, with the last `error: ` line of its log when there is one.
fn node_error(cluster: &Cluster, node: usize, what: String) -> ClusterUpError {
    let log = cluster.nodes.get(node - 1).map(|n| n.log.clone()).unwrap_or_default();
    let what = match last_error_line(&log) {
        Some(line) => format!("{what}: {line}"),
        None => what,
    };
    ClusterUpError::Node { node, what, log }
}

/// The last line starting `error: ` among the last [`LOG_TAIL_BYTES`] of `log`.
fn last_error_line(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES))).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    String::from_utf8_lossy(&tail).lines().rev().find_map(|l| l.strip_prefix("error: ")).map(|l| l.trim().to_owned())
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// Prints each node and the commands to try.
fn print_cluster(cluster: &Cluster, dir: &Path, program: &str) {
    for (n, node) in cluster.nodes.iter().enumerate() {
        let pid = node.pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
        let ready = if node.ready { "" } else { " (not reported ready yet)" };
        say(&format!(
            "node {} pid {pid} listening {} metrics {}{ready}",
            n + 1,
            node.addr.as_deref().unwrap_or("?"),
            node.metrics.as_deref().unwrap_or("-")
        ));
    }
    say(&format!("configs, data and logs: {}", dir.display()));
    if let Some(first) = cluster.nodes.first().and_then(|n| n.addr.as_deref()) {
        let other = cluster.nodes.get(1).and_then(|n| n.addr.as_deref()).unwrap_or(first);
        say("try:");
        say(&format!(
            "  {program} client --peer {first} write --block diary --insert '{{\"header\":{{\"id\":\"diary\",\"type\":\"log\",\"collectionId\":\"notes\"}},\"entries\":[]}}'"
        ));
        say(&format!("  {program} client --peer {first} write --block diary --append entries '\"hello\"'"));
        say(&format!("  {program} client --peer {other} get diary"));
        say(&format!("  {program} history --peer {other} diary"));
    }
    say("up: Ctrl-C (SIGINT) or SIGTERM stops every node");
}

/// Runs until a signal (`Ok`) or a node's exit (`Err`), announcing nodes that report ready late.
async fn watch(cluster: &mut Cluster, signals: &mut Signals) -> Result<(), ClusterUpError> {
    let mut announced: BTreeSet<usize> =
        (1..=cluster.nodes.len()).filter(|i| cluster.nodes.get(i - 1).is_some_and(|n| n.ready)).collect();
    while !cluster.nodes.is_empty() {
        let exits = select_all(cluster.nodes.iter_mut().map(|n| Box::pin(n.child.wait())));
        let line = tokio::select! {
            () = signals.recv() => return Ok(()),
            (status, index, _) = exits => Err((index + 1, status)),
            event = cluster.events.recv() => Ok(match event {
                Some(Event::Line(i, line)) => Some((i, line)),
                // A closed stdout: the node's exit is the next thing seen.
                Some(Event::Closed(_)) | None => None,
            }),
        };
        let line = match line {
            Ok(line) => line,
            Err((node, status)) => {
                let what = format!("exited ({})", status.map(describe).unwrap_or_else(|e| e.to_string()));
                say(&format!("node {node} {what}; stopping the others"));
                return Err(node_error(cluster, node, what));
            }
        };
        if let Some((i, line)) = line {
            apply_line(cluster, i, &line);
            if cluster.nodes.get(i - 1).is_some_and(|n| n.ready) && announced.insert(i) {
                say(&format!("node {i} ready"));
            }
        }
    }
    Ok(())
}

/// SIGTERM to every running node, then SIGKILL to those still running after [`STOP_GRACE_MS`];
/// reports how each ended.
async fn stop_all(cluster: &mut Cluster) {
    for node in &mut cluster.nodes {
        if matches!(node.child.try_wait(), Ok(None))
            && let Some(pid) = node.pid.and_then(|p| i32::try_from(p).ok())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_millis(STOP_GRACE_MS);
    for (n, node) in cluster.nodes.iter_mut().enumerate() {
        let status = match tokio::time::timeout_at(deadline, node.child.wait()).await {
            Ok(status) => status.map(describe).unwrap_or_else(|e| e.to_string()),
            Err(_) => {
                let _ = node.child.start_kill();
                let status = node.child.wait().await.map(describe).unwrap_or_else(|e| e.to_string());
                format!("{status} after SIGKILL: it did not stop within {STOP_GRACE_MS} ms of SIGTERM")
            }
        };
        say(&format!("node {} stopped ({status})", n + 1));
    }
}

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
//!
//! While it runs, `optimystic cluster stop|start|restart <i> --dir D` and `cluster add --dir D`
//! stop, start again (same config, data and address) or add one node: they send one line to the
//! control socket `D/control.sock` and print the one-line answer. A node stopped this way is not an
//! error; one that exits on its own still stops the others.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use futures::future::select_all;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
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
    /// Directory for the config files, data, logs and control socket (created if missing; kept
    /// afterwards). Default: a new `optimystic-cluster-<n>` in the system's temporary directory
    /// (`$TMPDIR`, else `/tmp`), never inside the current (source) tree.
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

/// Something the stdout of node `i`'s process number `spawn` said, or its end.
#[derive(Debug)]
enum Event {
    Line(usize, u64, String),
    Closed(usize, u64),
}

/// One node's process (running, or stopped on command).
#[derive(Debug)]
struct Running {
    child: Child,
    /// Which process of the cluster this is: events of an earlier process of the node are stale.
    spawn: u64,
    pid: Option<u32>,
    log: PathBuf,
    addr: Option<String>,
    metrics: Option<String>,
    ready: bool,
    /// Its `ready` was said (in the cluster listing or a `node <i> ready` line).
    announced: bool,
    /// Stopped on command: its exit is not an error.
    stopped: bool,
}

/// The nodes started so far and their stdout events.
#[derive(Debug)]
struct Cluster {
    nodes: Vec<Running>,
    events: mpsc::UnboundedReceiver<Event>,
    sender: mpsc::UnboundedSender<Event>,
    spawned: u64,
}

impl Cluster {
    /// Whether an event of process `spawn` of node `i` is about its current process.
    fn current(&self, i: usize, spawn: u64) -> bool {
        self.nodes.get(i - 1).is_some_and(|n| n.spawn == spawn)
    }
}

/// The cluster's command-line settings, for nodes started on command.
struct Setup<'a> {
    options: &'a ClusterUpOptions,
    exe: &'a Path,
    dir: &'a Path,
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
    let mut cluster = Cluster { nodes: Vec::new(), events, sender, spawned: 0 };
    let started = start_all(&mut cluster, options, exe, &dir, &mut signals).await;
    let outcome = match started {
        Ok(true) => match bind_control(&dir) {
            Ok(control) => {
                print_cluster(&mut cluster, &dir, program);
                let setup = Setup { options, exe, dir: &dir };
                let watched = watch(&mut cluster, &mut signals, &control, &setup).await;
                let _ = std::fs::remove_file(dir.join(CONTROL_SOCKET));
                watched
            }
            Err(e) => Err(e),
        },
        Ok(false) => Ok(()),
        Err(e) => Err(e),
    };
    if outcome.is_ok() {
        say("stopping every node");
    }
    stop_all(&mut cluster).await;
    outcome
}

/// The directory to use: `dir` (created if missing), or a new `optimystic-cluster-<n>` in the
/// temporary directory.
fn cluster_dir(dir: Option<&Path>) -> Result<PathBuf, ClusterUpError> {
    let absolute = |path: &Path| {
        std::path::absolute(path).map_err(|e| ClusterUpError::io(format!("resolving {}", path.display()), e))
    };
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(|e| ClusterUpError::io(format!("creating {}", dir.display()), e))?;
        return absolute(dir);
    }
    for n in 1..=MAX_DIR_ATTEMPTS {
        let candidate = std::env::temp_dir().join(format!("optimystic-cluster-{n}"));
        match std::fs::create_dir(&candidate) {
            Ok(()) => return absolute(&candidate),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ClusterUpError::io(format!("creating {}", candidate.display()), e)),
        }
    }
    Err(ClusterUpError::Options(format!(
        "every optimystic-cluster-<n> name is taken in {}; give --dir",
        std::env::temp_dir().display()
    )))
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

/// Writes node `i`'s config file (with a header saying how to run it by hand); returns its path.
fn write_config(exe: &Path, dir: &Path, i: usize, config: &NodeConfig) -> Result<PathBuf, ClusterUpError> {
    let path = dir.join(format!("node{i}.toml"));
    let text = toml::to_string_pretty(config).map_err(|error| ClusterUpError::Config { node: i, error })?;
    let header = format!(
        "# Node {i} of a local cluster written by `optimystic cluster up`; run by hand with\n#   {} start --config {}\n",
        exe.display(),
        path.display()
    );
    std::fs::write(&path, format!("{header}{text}"))
        .map_err(|e| ClusterUpError::io(format!("writing {}", path.display()), e))?;
    Ok(path)
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
        let path = write_config(exe, dir, i, &config)?;
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

/// Starts node `i` with its config file (a new node, or again in place of a stopped one); its
/// stdout lines arrive as events.
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
    cluster.spawned += 1;
    let spawn = cluster.spawned;
    if let Some(stdout) = child.stdout.take() {
        let sender = cluster.sender.clone();
        tokio::spawn(forward_stdout(i, spawn, stdout, file, sender));
    }
    let node =
        Running { child, spawn, pid, log, addr: None, metrics: None, ready: false, announced: false, stopped: false };
    match cluster.nodes.get_mut(i - 1) {
        Some(slot) => *slot = node,
        None => cluster.nodes.push(node),
    }
    Ok(())
}

/// Copies the stdout of process `spawn` of node `i` into its log and sends each line as an event.
async fn forward_stdout(
    i: usize,
    spawn: u64,
    stdout: tokio::process::ChildStdout,
    mut log: std::fs::File,
    sender: mpsc::UnboundedSender<Event>,
) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = writeln!(log, "{line}");
        if sender.send(Event::Line(i, spawn, line)).is_err() {
            return;
        }
    }
    let _ = sender.send(Event::Closed(i, spawn));
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
            Ok(Some(Event::Line(i, spawn, line))) if cluster.current(i, spawn) => apply_line(cluster, i, &line),
            Ok(Some(Event::Closed(i, spawn))) if cluster.current(i, spawn) => {
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
            // An event of an earlier process of a restarted node.
            Ok(Some(_)) => {}
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
fn print_cluster(cluster: &mut Cluster, dir: &Path, program: &str) {
    for (n, node) in cluster.nodes.iter_mut().enumerate() {
        let pid = node.pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
        let ready = if node.ready { "" } else { " (not reported ready yet)" };
        node.announced = node.ready;
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
        say(&format!("  {program} cluster stop 2 --dir {}      # also: start 2, restart 2, add", dir.display()));
    }
    say("up: Ctrl-C (SIGINT) or SIGTERM stops every node");
}

/// What woke [`watch`].
enum Wake {
    Signal,
    /// A running node (1-based) exited on its own.
    Exited(usize, std::io::Result<ExitStatus>),
    Event(Option<Event>),
    Control(std::io::Result<UnixStream>),
}

/// Runs until a signal (`Ok`) or a node's exit (`Err`), announcing nodes that report ready late
/// and serving control commands.
async fn watch(
    cluster: &mut Cluster,
    signals: &mut Signals,
    control: &UnixListener,
    setup: &Setup<'_>,
) -> Result<(), ClusterUpError> {
    loop {
        let wake = {
            let running: Vec<usize> =
                cluster.nodes.iter().enumerate().filter(|(_, n)| !n.stopped).map(|(n, _)| n).collect();
            let nodes = &mut cluster.nodes;
            let exits = async {
                if running.is_empty() {
                    return std::future::pending().await;
                }
                let waits = nodes.iter_mut().filter(|n| !n.stopped).map(|n| Box::pin(n.child.wait()));
                let (status, index, _) = select_all(waits).await;
                (running.get(index).map_or(0, |n| n + 1), status)
            };
            tokio::select! {
                () = signals.recv() => Wake::Signal,
                (node, status) = exits => Wake::Exited(node, status),
                event = cluster.events.recv() => Wake::Event(event),
                accepted = control.accept() => Wake::Control(accepted.map(|(stream, _)| stream)),
            }
        };
        match wake {
            Wake::Signal => return Ok(()),
            Wake::Exited(node, status) => {
                let what = format!("exited ({})", status.map(describe).unwrap_or_else(|e| e.to_string()));
                say(&format!("node {node} {what}; stopping the others"));
                return Err(node_error(cluster, node, what));
            }
            // A closed stdout: the node's exit is the next thing seen.
            Wake::Event(Some(Event::Line(i, spawn, line))) if cluster.current(i, spawn) => {
                apply_line(cluster, i, &line);
                if let Some(node) = cluster.nodes.get_mut(i - 1)
                    && node.ready
                    && !node.announced
                {
                    node.announced = true;
                    say(&format!("node {i} ready"));
                }
            }
            Wake::Event(_) => {}
            Wake::Control(Ok(stream)) => serve_control(cluster, setup, stream).await,
            Wake::Control(Err(e)) => tracing::warn!(error = %e, "control socket: accept failed"),
        }
    }
}

/// SIGTERM to node `node` (0-based) if it runs, then SIGKILL if it still runs after
/// [`STOP_GRACE_MS`]; says how it ended.
async fn stop_node(node: &mut Running) -> String {
    if matches!(node.child.try_wait(), Ok(None))
        && let Some(pid) = node.pid.and_then(|p| i32::try_from(p).ok())
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    finish(node, Instant::now() + Duration::from_millis(STOP_GRACE_MS)).await
}

/// Waits for `node` to exit until `deadline`, then kills it; says how it ended.
async fn finish(node: &mut Running, deadline: Instant) -> String {
    match tokio::time::timeout_at(deadline, node.child.wait()).await {
        Ok(status) => status.map(describe).unwrap_or_else(|e| e.to_string()),
        Err(_) => {
            let _ = node.child.start_kill();
            let status = node.child.wait().await.map(describe).unwrap_or_else(|e| e.to_string());
            format!("{status} after SIGKILL: it did not stop within {STOP_GRACE_MS} ms of SIGTERM")
        }
    }
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
        let status = finish(node, deadline).await;
        say(&format!("node {} stopped ({status})", n + 1));
    }
}

/// The control socket's file name in the cluster directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Longest control command line, in bytes.
const MAX_CONTROL_LINE_BYTES: u64 = 256;
/// The longest a control client may take to send its command.
const CONTROL_READ_TIMEOUT_MS: u64 = 5_000;

/// Listens on the control socket of `dir` (replacing a stale one left by a run that was killed).
fn bind_control(dir: &Path) -> Result<UnixListener, ClusterUpError> {
    let path = dir.join(CONTROL_SOCKET);
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(ClusterUpError::Options(format!("another cluster up runs in {}", dir.display())));
    }
    let _ = std::fs::remove_file(&path);
    UnixListener::bind(&path).map_err(|e| ClusterUpError::io(format!("listening on {}", path.display()), e))
}

/// Reads one command from `stream`, runs it and answers with one line: `ok <what happened>` or
/// `error <why>`.
async fn serve_control(cluster: &mut Cluster, setup: &Setup<'_>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_CONTROL_LINE_BYTES));
    let read = tokio::time::timeout(Duration::from_millis(CONTROL_READ_TIMEOUT_MS), reader.read_line(&mut line)).await;
    let answer = match read {
        Ok(Ok(_)) => match control_command(cluster, setup, line.trim()).await {
            Ok(done) => format!("ok {done}"),
            Err(why) => format!("error {why}"),
        },
        Ok(Err(e)) => format!("error reading the command: {e}"),
        Err(_) => format!("error no command within {CONTROL_READ_TIMEOUT_MS} ms"),
    };
    say(&answer);
    let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
}

/// Runs one control command: `stop <i>`, `start <i>`, `restart <i>` or `add`.
async fn control_command(cluster: &mut Cluster, setup: &Setup<'_>, command: &str) -> Result<String, String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let node = |text: &str| -> Result<usize, String> {
        match text.parse::<usize>() {
            Ok(i) if (1..=cluster.nodes.len()).contains(&i) => Ok(i),
            _ => Err(format!("no node {text}: the nodes are 1..={}", cluster.nodes.len())),
        }
    };
    match words.as_slice() {
        ["stop", i] => {
            let i = node(i)?;
            let running = cluster.nodes.get_mut(i - 1).filter(|n| !n.stopped).ok_or(format!("node {i} is stopped"))?;
            running.stopped = true;
            let status = stop_node(running).await;
            Ok(format!("node {i} stopped ({status})"))
        }
        ["start", i] => {
            let i = node(i)?;
            if cluster.nodes.get(i - 1).is_some_and(|n| !n.stopped) {
                return Err(format!("node {i} is running"));
            }
            start_again(cluster, setup, i).await
        }
        ["restart", i] => {
            let i = node(i)?;
            if let Some(running) = cluster.nodes.get_mut(i - 1).filter(|n| !n.stopped) {
                running.stopped = true;
                stop_node(running).await;
            }
            start_again(cluster, setup, i).await
        }
        ["add"] => add_node(cluster, setup).await,
        _ => Err(format!("unknown command {command:?}: stop <i>, start <i>, restart <i> or add")),
    }
}

/// Starts stopped node `i` again from its config file, on the address it had (a port the system
/// picked is kept in its config file, so its peers find it where they knew it).
async fn start_again(cluster: &mut Cluster, setup: &Setup<'_>, i: usize) -> Result<String, String> {
    let path = setup.dir.join(format!("node{i}.toml"));
    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut config: NodeConfig = toml::from_str(&text).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let known = cluster.nodes.get(i - 1).and_then(|n| n.addr.as_deref()).and_then(|a| a.split("/p2p/").next());
    if let Some(addr) = known {
        config.node.listen = vec![addr.to_owned()];
    }
    let path = write_config(setup.exe, setup.dir, i, &config).map_err(|e| e.to_string())?;
    spawn(cluster, setup.exe, &path, setup.dir, i).map_err(|e| e.to_string())?;
    wait_listening(cluster, i).await
}

/// Adds node `<n + 1>`, bootstrapping from the first running node.
async fn add_node(cluster: &mut Cluster, setup: &Setup<'_>) -> Result<String, String> {
    let i = cluster.nodes.len() + 1;
    if i > MAX_NODES {
        return Err(format!("a cluster has at most {MAX_NODES} nodes"));
    }
    let bootstrap = cluster.nodes.iter().filter(|n| !n.stopped).find_map(|n| n.addr.clone());
    let mut config = node_config(setup.options, setup.dir, i, bootstrap.as_deref());
    config.key_network.options.insert("cluster_size".into(), Value::from(CLUSTER_SIZE.min(setup.options.nodes.max(i))));
    let path = write_config(setup.exe, setup.dir, i, &config).map_err(|e| e.to_string())?;
    spawn(cluster, setup.exe, &path, setup.dir, i).map_err(|e| e.to_string())?;
    wait_listening(cluster, i).await
}

/// Waits for node `i` (just started) to say where it listens.
async fn wait_listening(cluster: &mut Cluster, i: usize) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_millis(STARTUP_TIMEOUT_MS);
    let listening =
        wait_until(cluster, deadline, |c| c.nodes.get(i - 1).is_some_and(|n| n.addr.is_some() && n.metrics.is_some()))
            .await;
    let node = cluster.nodes.get_mut(i - 1).ok_or(format!("node {i} is gone"))?;
    match listening {
        Ok(()) => {
            let pid = node.pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
            Ok(format!("node {i} pid {pid} listening {}", node.addr.as_deref().unwrap_or("?")))
        }
        Err(Stop::Exited(n, what)) if n == i => {
            node.stopped = true;
            Err(format!("node {i} {what}; its log: {}", node.log.display()))
        }
        Err(Stop::Exited(n, what)) => Err(format!("node {n} {what} while node {i} started")),
        Err(Stop::Timeout) => {
            node.stopped = true;
            let _ = node.child.start_kill();
            Err(format!("node {i} printed no listening line within {STARTUP_TIMEOUT_MS} ms"))
        }
    }
}

/// Sends `command` to the `cluster up` running in `dir` and returns its answer: `Ok` for
/// `ok <what happened>`, `Err` for `error <why>` or no cluster there.
pub async fn control(dir: &Path, command: &str) -> Result<String, ClusterUpError> {
    let path = dir.join(CONTROL_SOCKET);
    let stream = UnixStream::connect(&path).await.map_err(|e| {
        ClusterUpError::io(format!("no running cluster up in {} ({})", dir.display(), path.display()), e)
    })?;
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("{command}\n").as_bytes())
        .await
        .map_err(|e| ClusterUpError::io("sending the command", e))?;
    let mut answer = String::new();
    BufReader::new(read.take(64 * 1024))
        .read_line(&mut answer)
        .await
        .map_err(|e| ClusterUpError::io("reading the answer", e))?;
    let answer = answer.trim();
    match (answer.strip_prefix("ok "), answer.strip_prefix("error ")) {
        (Some(done), _) => Ok(done.to_owned()),
        (_, Some(why)) => Err(ClusterUpError::Options(why.to_owned())),
        _ => Err(ClusterUpError::Options(format!("cluster up gave no answer to {command:?}"))),
    }
}

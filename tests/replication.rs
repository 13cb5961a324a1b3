//! Replication across a crash, with real processes: three `optimystic start` processes on
//! 127.0.0.1 (LMDB storage, Kademlia key network with clusters of 3, majority 2PC, quorum reads),
//! driven only through `optimystic client`, the way a user runs them.
//!
//! 1. Node 1 starts alone; nodes 2 and 3 bootstrap to the `/p2p/<id>` address it prints. The test
//!    waits until every node is connected to the two others (`/metrics`), then creates
//!    [`BLOCKS`] log blocks (retrying the first insert until the cluster accepts it) and appends a
//!    few entries through randomly chosen nodes.
//! 2. Node 3 is killed with SIGKILL once it holds every block at its newest revision. While it is
//!    down, [`APPENDS_WHILE_DOWN`] appends are acknowledged through nodes 1 and 2, then node 3 is
//!    restarted at once on the same data directory (same peer id, same address): the coordinators
//!    are still re-sending it the decided records of the last writes, which is the point.
//! 3. After the nodes converge (a bounded poll of local reads), every block is read through every
//!    node with a quorum read, every node is stopped with SIGTERM, and each node's LMDB store is
//!    opened in this process and checked, for every block: revisions are exactly `1..=latest`,
//!    replaying the committed transforms gives the stored value at `latest`, every acknowledged
//!    `(trxId, rev)` is logged at its revision, every acknowledged append is in the entries
//!    exactly once, the entries hold only attempted values, all three nodes hold the same
//!    `latest` and value, and the quorum reads returned what the nodes store.
//!
//! Appends insert at index 0 (`[["entries",0,0,[value]]]`): the newest entry first. An append at
//! index `len` would be refused by a member that applies it on a shorter (older) value, which
//! would hide a member that applies a revision on a base it does not hold.
//!
//! The test runs the already built binary next to the test executable (`target/<profile>/
//! optimystic`; `cargo build --workspace --all-targets` or `cargo build -p optimystic-cli --bin
//! optimystic` first), or the one named by `OPTIMYSTIC_BIN`.
//!
//! - `OPTIMYSTIC_REPLICATION_SEED` replays a run's choices of blocks and nodes (the seed is printed
//!   at the start and on failure); the timing of the processes is not replayed.
//! - `OPTIMYSTIC_REPLICATION_KEEP_DIR=1` keeps the configurations, stores and node logs of a
//!   failed run.
//! - `RUST_LOG` is passed to the nodes (default: the binary's, plus the restart catch-up's debug
//!   lines).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use optimystic_core::{
    Block, BlockGetResult, BlockId, CommittedTransform, GetBlockResults, RawStorage, StorageRepo, TrxId, TrxRev,
};
use optimystic_storage_lmdb::{LmdbKv, LmdbOptions, LmdbStorage};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Blocks written.
const BLOCKS: usize = 3;
/// Appends attempted while every node is up, through any node.
const APPENDS_BEFORE_KILL: usize = 9;
/// Appends acknowledged while node 3 is down, through nodes 1 and 2.
const APPENDS_WHILE_DOWN: usize = 30;
/// At most this many attempts to get [`APPENDS_WHILE_DOWN`] acknowledged.
const MAX_ATTEMPTS_WHILE_DOWN: usize = 3 * APPENDS_WHILE_DOWN;
/// LMDB map size of every node.
const MAP_SIZE_BYTES: usize = 64 << 20;
/// Deadline of one operation inside the client (`--timeout-ms`).
const CLIENT_OP_TIMEOUT_MS: u64 = 5_000;
/// A client process still running after this long is killed (its write's outcome is unknown).
const CLIENT_PROCESS_TIMEOUT: Duration = Duration::from_secs(40);
/// A node prints its `listening` line within this long.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Every node is connected to every other within this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the nodes get to find each other before reads drive DHT lookups.
const NUDGE_AFTER: Duration = Duration::from_secs(5);
/// The cluster accepts its first insert within this long.
const FIRST_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Every node holds every block (before the kill) or the same newest revisions (after the
/// restart) within this long.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Each phase of appends stops attempting after this long (a client that is killed after
/// [`CLIENT_PROCESS_TIMEOUT`] can make one attempt that long).
const APPEND_PHASE_TIMEOUT: Duration = Duration::from_secs(60);
/// A node stops within this long of SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two rounds of a polled condition.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The `optimystic` binary: `OPTIMYSTIC_BIN`, or `target/<profile>/optimystic` next to this test's
/// executable (`target/<profile>/deps/replication-<hash>`). Cargo names a binary to the tests of
/// its own package only (`CARGO_BIN_EXE_optimystic` in `node/tests/binary.rs`), so this package
/// finds it by path.
fn optimystic_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("OPTIMYSTIC_BIN") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "OPTIMYSTIC_BIN={} is not a file", path.display());
        return path;
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let mut dir = exe.parent().expect("the test executable's directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(format!("optimystic{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} does not exist: build it first (`cargo build -p optimystic-cli --bin optimystic`, or \
         `cargo build --workspace --all-targets` as CI does), or name a binary with OPTIMYSTIC_BIN",
        bin.display()
    );
    bin
}

/// `count` distinct free ports on 127.0.0.1. Every probe stays bound until all are chosen, so the
/// ports differ. The probes do not set `SO_REUSEPORT`, so a port some other process listens on
/// (libp2p sets `SO_REUSEPORT`, which would let a second node share it) is never chosen.
fn free_ports(count: usize) -> Vec<u16> {
    let probes: Vec<std::net::TcpListener> =
        (0..count).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe on port 0")).collect();
    probes.iter().map(|p| p.local_addr().expect("probe address").port()).collect()
}

/// A string as a TOML basic string (JSON string escapes are valid TOML escapes).
fn toml_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// Writes node `n`'s configuration file and returns its path.
fn write_config(dir: &Path, n: usize, port: u16, metrics_port: u16, bootstrap: Option<&str>) -> PathBuf {
    let data_dir = dir.join(format!("node{n}"));
    let bootstrap = bootstrap.map(toml_string).unwrap_or_default();
    let config = format!(
        r#"# Node {n} of the replication test.
[node]
data_dir = {data_dir}
listen = ["/ip4/127.0.0.1/tcp/{port}"]
bootstrap = [{bootstrap}]
read_mode = "quorum"

[storage]
kind = "lmdb"
map_size_bytes = {MAP_SIZE_BYTES}

[key_network]
kind = "kademlia"
cluster_size = 3

[consensus]
kind = "majority-2pc"
promise_threshold = "majority"
commit_threshold = "majority"

[metrics]
enabled = true
listen = "127.0.0.1:{metrics_port}"
"#,
        data_dir = toml_string(&data_dir.to_string_lossy()),
    );
    let path = dir.join(format!("node{n}.toml"));
    std::fs::write(&path, config).expect("write a node configuration");
    path
}

/// One `optimystic start` process. Dropping it SIGKILLs the process if it still runs, so a failing
/// test never leaves nodes behind.
struct NodeProc {
    /// 1-based node number.
    n: usize,
    config: PathBuf,
    data_dir: PathBuf,
    /// Every start appends its stderr (the node's logs) here.
    log: PathBuf,
    child: Option<Child>,
    /// The `listening` address, with `/p2p/<peer id>`.
    addr: String,
    /// The `/metrics` URL.
    metrics: String,
    starts: usize,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl NodeProc {
    fn new(n: usize, config: PathBuf, data_dir: PathBuf, log: PathBuf) -> Self {
        Self { n, config, data_dir, log, child: None, addr: String::new(), metrics: String::new(), starts: 0 }
    }

    /// Starts the process and waits for its `listening` and `metrics` lines.
    async fn start(&mut self, bin: &Path) {
        assert!(self.child.is_none(), "node {} is already running", self.n);
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("open the node log");
        {
            use std::io::Write as _;
            writeln!(log, "===== start {} of node {} =====", self.starts, self.n).expect("write the node log");
        }
        let mut child = std::process::Command::new(bin)
            .arg("start")
            .arg("--config")
            .arg(&self.config)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", node_log_filter())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning node {}: {e}", self.n));
        let stdout = child.stdout.take().expect("node stdout");
        self.child = Some(child);
        // A thread forwards stdout lines until the process exits (end of file).
        let (tx, mut rx) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        let (mut addr, mut metrics) = (None, None);
        while addr.is_none() || metrics.is_none() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) => {
                    if let Some(a) = line.strip_prefix("listening ") {
                        addr = Some(a.trim().to_owned());
                    } else if let Some(m) = line.strip_prefix("metrics ") {
                        metrics = Some(m.trim().to_owned());
                    }
                }
                Ok(None) => {
                    let status = self.child.as_mut().and_then(|c| c.wait().ok());
                    panic!(
                        "node {} exited before it was ready ({status:?}); its log:\n{}",
                        self.n,
                        log_tail(&self.log, 40)
                    );
                }
                Err(_) => panic!(
                    "node {} did not print its listening and metrics lines within {STARTUP_TIMEOUT:?}; its log:\n{}",
                    self.n,
                    log_tail(&self.log, 40)
                ),
            }
        }
        let addr = addr.expect("listening line");
        assert!(addr.contains("/p2p/"), "node {} listening line names no peer id: {addr}", self.n);
        self.addr = addr;
        self.metrics = metrics.expect("metrics line");
    }

    /// SIGKILL, as `kill -9`: no shutdown code runs.
    fn sigkill(&mut self) {
        let mut child = self.child.take().expect("the node runs");
        child.kill().expect("SIGKILL the node");
        child.wait().expect("reap the node");
    }

    /// SIGTERM, then waits (bounded) for the process to exit; SIGKILL if it does not.
    async fn sigterm(&mut self) -> Result<ExitStatus, String> {
        let mut child = self.child.take().expect("the node runs");
        let sent = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        if !sent.as_ref().is_ok_and(ExitStatus::success) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("node {}: `kill -TERM` failed: {sent:?}", self.n));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                other => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("node {} did not exit within {STOP_TIMEOUT:?} of SIGTERM ({other:?})", self.n));
                }
            }
        }
    }

    fn storage_dir(&self) -> PathBuf {
        self.data_dir.join(optimystic_storage_lmdb::DEFAULT_SUBDIR)
    }
}

/// The nodes' log filter: `RUST_LOG` if set, else the binary's default plus the debug lines of
/// the restart catch-up (which says why a block could not be caught up).
fn node_log_filter() -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,optimystic=info,optimystic_node::node=debug".into())
}

/// The last `lines` lines of a log file.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `optimystic client --peer <peer> <args>`; `Ok(stdout)` when it exits 0, else `Err` with
/// why. The process is killed if it runs past [`CLIENT_PROCESS_TIMEOUT`] (or the test fails).
async fn client(bin: &Path, peer: &str, args: &[&str]) -> Result<String, String> {
    let mut command = tokio::process::Command::new(bin);
    command
        .arg("client")
        .arg("--peer")
        .arg(peer)
        .arg("--timeout-ms")
        .arg(CLIENT_OP_TIMEOUT_MS.to_string())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(CLIENT_PROCESS_TIMEOUT, command.output()).await {
        Err(_) => Err(format!("killed after {CLIENT_PROCESS_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("cannot run the client: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(Ok(out)) => Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())),
    }
}

/// `client write`: `Ok` with where it committed when acknowledged, `Err` (outcome unknown) else.
async fn write(bin: &Path, peer: &str, block: &str, kind: &str, payload: &str) -> Result<TrxRev, String> {
    let out = client(bin, peer, &["write", "--block", block, kind, payload]).await?;
    serde_json::from_str::<TrxRev>(&out).map_err(|e| format!("unexpected write output {out:?}: {e}"))
}

/// `client get` of every block, as a quorum read (the nodes' default) or a local one.
async fn get(bin: &Path, peer: &str, blocks: &[String], local: bool) -> Result<GetBlockResults, String> {
    let out = if local {
        let gets = json!({ "blockIds": blocks, "readMode": "local" }).to_string();
        client(bin, peer, &["get", "--json", &gets]).await?
    } else {
        let mut args = vec!["get"];
        args.extend(blocks.iter().map(String::as_str));
        client(bin, peer, &args).await?
    };
    serde_json::from_str(&out).map_err(|e| format!("unexpected get output {out:?}: {e}"))
}

/// `optimystic_connected_peers` from a node's `/metrics`.
async fn connected_peers(metrics_url: &str) -> Option<u64> {
    let rest = metrics_url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
        let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), fetch).await.ok()??;
    response
        .lines()
        .find_map(|l| l.strip_prefix("optimystic_connected_peers "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

fn entries_of(block: Option<&Block>) -> Option<Vec<String>> {
    let entries = block?.fields.get("entries")?.as_array()?;
    entries.iter().map(|e| e.as_str().map(str::to_owned)).collect()
}

fn latest_of(results: &GetBlockResults, block: &str) -> Option<TrxRev> {
    results.get(block).and_then(|r| r.state.latest.clone())
}

/// One append (or insert) the test attempted.
#[derive(Debug, Clone)]
struct Attempt {
    block: String,
    /// The appended value (`None` for an insert).
    value: Option<String>,
    via: usize,
    /// `Ok` acknowledged at that revision; `Err` the outcome is unknown.
    outcome: Result<TrxRev, String>,
}

/// What one node's store holds for one block.
#[derive(Debug)]
struct Stored {
    latest: Option<TrxRev>,
    /// `revisions(block, 0, u64::MAX)`.
    log: Vec<TrxRev>,
    /// The committed transform of each logged revision.
    committed: Vec<Option<CommittedTransform>>,
    /// `StorageRepo::latest_value`.
    value: Result<Option<Block>, String>,
    pendings: Vec<TrxId>,
}

impl Stored {
    fn entries(&self) -> Option<Vec<String>> {
        self.value.as_ref().ok().and_then(|v| entries_of(v.as_ref()))
    }

    /// The revision log with each revision's transform, then the value at `latest`.
    fn history(&self) -> String {
        let mut text = format!("    latest {:?}\n", self.latest.as_ref().map(|l| (l.rev, l.trx_id.to_string())));
        for (entry, committed) in self.log.iter().zip(&self.committed) {
            let transform = match committed {
                Some(c) if c.rev == entry.rev => serde_json::to_string(&c.transform).unwrap_or_default(),
                Some(c) => {
                    format!("(committed at rev {}) {}", c.rev, serde_json::to_string(&c.transform).unwrap_or_default())
                }
                None => "(no committed transform)".into(),
            };
            let _ = writeln!(text, "    rev {:>3}  {}  {transform}", entry.rev, entry.trx_id);
        }
        match &self.value {
            Ok(value) => {
                let _ = writeln!(text, "    entries at latest: {:?}", entries_of(value.as_ref()));
            }
            Err(e) => {
                let _ = writeln!(text, "    value at latest: error {e}");
            }
        }
        if !self.pendings.is_empty() {
            let _ =
                writeln!(text, "    pending: {:?}", self.pendings.iter().map(ToString::to_string).collect::<Vec<_>>());
        }
        text
    }
}

/// Reads every block of `blocks` from a stopped node's LMDB store.
async fn read_store(dir: &Path, blocks: &[String]) -> Result<BTreeMap<String, Stored>, String> {
    let storage = LmdbKv::open_with(dir, LmdbOptions { map_size_bytes: MAP_SIZE_BYTES })
        .map(LmdbStorage::over)
        .map_err(|e| format!("opening {}: {e}", dir.display()))?;
    let storage: std::sync::Arc<dyn RawStorage> = std::sync::Arc::new(storage);
    let repo = StorageRepo::new(storage.clone());
    let mut stored = BTreeMap::new();
    for block in blocks {
        let id = BlockId::new(block.as_str()).map_err(|e| e.to_string())?;
        let latest = storage.latest(&id).await.map_err(|e| format!("latest of {block}: {e}"))?;
        let log = storage.revisions(&id, 0, u64::MAX).await.map_err(|e| format!("revisions of {block}: {e}"))?;
        let mut committed = Vec::with_capacity(log.len());
        for entry in &log {
            committed
                .push(storage.committed(&id, &entry.trx_id).await.map_err(|e| format!("committed of {block}: {e}"))?);
        }
        let value = repo.latest_value(&id).await.map(|(_, v)| v).map_err(|e| e.to_string());
        let pendings = storage.pending_trx_ids(&id).await.map_err(|e| format!("pendings of {block}: {e}"))?;
        stored.insert(block.clone(), Stored { latest, log, committed, value, pendings });
    }
    storage.close().await.map_err(|e| format!("closing {}: {e}", dir.display()))?;
    Ok(stored)
}

/// Checks one node's store of one block against what the test attempted; returns the violations.
fn check_stored(block_id: &BlockId, stored: &Stored, attempts: &[&Attempt]) -> Vec<String> {
    let mut failures = Vec::new();
    let Some(latest) = &stored.latest else {
        return vec!["the block is missing (no latest revision)".into()];
    };
    // Revisions are exactly 1..=latest, and the log ends at latest.
    let revs: Vec<u64> = stored.log.iter().map(|e| e.rev).collect();
    let expected: Vec<u64> = (1..=latest.rev).collect();
    if revs != expected {
        let present: BTreeSet<u64> = revs.iter().copied().collect();
        let gaps: Vec<u64> = expected.iter().copied().filter(|r| !present.contains(r)).collect();
        failures.push(format!(
            "revisions are not exactly 1..={}: {} logged, missing revisions {gaps:?}, logged {revs:?}",
            latest.rev,
            revs.len()
        ));
    }
    if stored.log.last() != Some(latest) {
        failures.push(format!("latest {latest:?} is not the last logged revision {:?}", stored.log.last()));
    }
    // Replaying the committed transforms in revision order gives the stored value at latest.
    let mut replayed: Option<Block> = None;
    let mut replay_ok = true;
    for (entry, committed) in stored.log.iter().zip(&stored.committed) {
        let Some(committed) = committed else {
            failures.push(format!("rev {} names {} with no committed transform", entry.rev, entry.trx_id));
            replay_ok = false;
            break;
        };
        if committed.rev != entry.rev {
            failures.push(format!(
                "{} is logged at rev {} but committed at rev {}",
                entry.trx_id, entry.rev, committed.rev
            ));
        }
        match committed.transform.apply(replayed.as_ref(), block_id) {
            Ok(next) => replayed = next,
            Err(e) => {
                failures.push(format!("replaying rev {} ({}) fails: {e}", entry.rev, entry.trx_id));
                replay_ok = false;
                break;
            }
        }
    }
    match &stored.value {
        Err(e) => failures.push(format!("reading the value at latest fails: {e}")),
        Ok(value) if replay_ok && *value != replayed => failures.push(format!(
            "replaying the committed transforms gives entries {:?}, the stored value at latest has {:?}",
            entries_of(replayed.as_ref()),
            entries_of(value.as_ref())
        )),
        Ok(_) => {}
    }
    // Every acknowledged (trxId, rev) is logged at its revision.
    let by_rev: BTreeMap<u64, &TrxId> = stored.log.iter().map(|e| (e.rev, &e.trx_id)).collect();
    for attempt in attempts {
        if let Ok(ack) = &attempt.outcome
            && by_rev.get(&ack.rev) != Some(&&ack.trx_id)
        {
            failures.push(format!(
                "acknowledged {} at rev {} ({}) is not logged there (rev {} holds {:?})",
                ack.trx_id,
                ack.rev,
                attempt.value.as_deref().unwrap_or("insert"),
                ack.rev,
                by_rev.get(&ack.rev).map(ToString::to_string)
            ));
        }
    }
    match stored.entries() {
        None => failures.push("the value at latest has no array of string entries".into()),
        Some(entries) => failures.extend(check_entries(&entries, attempts)),
    }
    failures
}

/// Every acknowledged append is in `entries` exactly once; `entries` holds only attempted values.
fn check_entries(entries: &[String], attempts: &[&Attempt]) -> Vec<String> {
    let mut failures = Vec::new();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for entry in entries {
        *counts.entry(entry.as_str()).or_default() += 1;
    }
    let attempted: BTreeSet<&str> = attempts.iter().filter_map(|a| a.value.as_deref()).collect();
    let mut lost = Vec::new();
    for attempt in attempts {
        if let (Ok(ack), Some(value)) = (&attempt.outcome, &attempt.value) {
            match counts.get(value.as_str()).copied().unwrap_or(0) {
                1 => {}
                0 => lost.push(format!("{value}@{}", ack.rev)),
                n => failures.push(format!("acknowledged {value} (rev {}) is in the entries {n} times", ack.rev)),
            }
        }
    }
    if !lost.is_empty() {
        failures.push(format!("{} acknowledged appends are missing from the entries: {}", lost.len(), lost.join(", ")));
    }
    let unknown: Vec<&str> = counts.keys().copied().filter(|v| !attempted.contains(v)).collect();
    if !unknown.is_empty() {
        failures.push(format!("the entries hold values never attempted: {unknown:?}"));
    }
    failures
}

/// The seed of the run's random choices.
fn seed() -> u64 {
    match std::env::var("OPTIMYSTIC_REPLICATION_SEED") {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("OPTIMYSTIC_REPLICATION_SEED={v:?} is not a u64")),
        Err(_) => rand::random(),
    }
}

/// Node numbers (1-based) to their processes.
struct Cluster {
    bin: PathBuf,
    nodes: Vec<NodeProc>,
}

impl Cluster {
    fn node(&self, n: usize) -> &NodeProc {
        &self.nodes[n - 1]
    }

    fn node_mut(&mut self, n: usize) -> &mut NodeProc {
        &mut self.nodes[n - 1]
    }

    fn addr(&self, n: usize) -> String {
        self.node(n).addr.clone()
    }

    /// The end of every node's log.
    fn logs(&self) -> String {
        let mut text = String::new();
        for node in &self.nodes {
            let _ = writeln!(
                text,
                "--- node {} log ({}), the last 25 lines:\n{}",
                node.n,
                node.log.display(),
                log_tail(&node.log, 25)
            );
        }
        text
    }
}

/// Polls, within [`CONVERGE_TIMEOUT`], until a local read through each of `nodes` reports, for
/// every block, the newest revision a quorum read through node 1 reports. Returns how long it
/// took, or the last round's differences on timeout.
async fn wait_until_converged(cluster: &Cluster, blocks: &[String], nodes: &[usize]) -> Result<Duration, String> {
    let started = Instant::now();
    let deadline = started + CONVERGE_TIMEOUT;
    loop {
        // The cluster's answer (a quorum read through node 1), then each node's local state.
        let mut state = String::new();
        let mut converged = true;
        match get(&cluster.bin, &cluster.addr(1), blocks, false).await {
            Err(e) => {
                converged = false;
                let _ = write!(state, "quorum read through node 1 failed: {e}; ");
            }
            Ok(quorum) => {
                for &n in nodes {
                    match get(&cluster.bin, &cluster.addr(n), blocks, true).await {
                        Err(e) => {
                            converged = false;
                            let _ = write!(state, "local read through node {n} failed: {e}; ");
                        }
                        Ok(local) => {
                            for block in blocks {
                                let (want, have) = (latest_of(&quorum, block), latest_of(&local, block));
                                if want.is_none() || want != have {
                                    converged = false;
                                    let _ = write!(
                                        state,
                                        "node {n} holds {block} at {:?}, the quorum read says {:?}; ",
                                        have.map(|l| l.rev),
                                        want.map(|l| l.rev)
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        if converged {
            return Ok(started.elapsed());
        }
        if Instant::now() >= deadline {
            return Err(state);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// One append of a fresh unique value to `block` through node `via`.
async fn append(cluster: &Cluster, block: &str, value: String, via: usize) -> Attempt {
    let update = json!([["entries", 0, 0, [value]]]).to_string();
    let outcome = write(&cluster.bin, &cluster.addr(via), block, "--update", &update).await;
    Attempt { block: block.to_owned(), value: Some(value), via, outcome }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_with_sigkill_and_restarted_holds_exactly_the_acknowledged_history() {
    let seed = seed();
    eprintln!("replication test: seed {seed} (replay with OPTIMYSTIC_REPLICATION_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1?}] {what}", started.elapsed());
    let bin = optimystic_bin();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ports = free_ports(6);

    // Node 1 first; nodes 2 and 3 bootstrap to the address it prints.
    let config1 = write_config(dir.path(), 1, ports[0], ports[3], None);
    let mut cluster = Cluster {
        bin: bin.clone(),
        nodes: vec![NodeProc::new(1, config1, dir.path().join("node1"), dir.path().join("node1.log"))],
    };
    cluster.node_mut(1).start(&bin).await;
    let bootstrap = cluster.addr(1);
    for n in 2..=3 {
        let config = write_config(dir.path(), n, ports[n - 1], ports[n + 2], Some(&bootstrap));
        let mut node =
            NodeProc::new(n, config, dir.path().join(format!("node{n}")), dir.path().join(format!("node{n}.log")));
        node.start(&bin).await;
        cluster.nodes.push(node);
    }
    phase(&format!("3 nodes listening: {} | {} | {}", cluster.addr(1), cluster.addr(2), cluster.addr(3)));

    // Every node connected to the two others. Nodes 2 and 3 find each other through the DHT; when
    // both bootstrapped before either was in node 1's table, only a lookup introduces them, and a
    // read of a block through a node with a thin table drives one (the key network looks the
    // cluster up). So after a few seconds, each node still missing a peer is asked for a block.
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let nudge_after = Instant::now() + NUDGE_AFTER;
    loop {
        let mut counts = Vec::new();
        for node in &cluster.nodes {
            counts.push(connected_peers(&node.metrics).await);
        }
        if counts.iter().all(|c| c.is_some_and(|c| c >= 2)) {
            break;
        }
        if Instant::now() > nudge_after {
            for (n, count) in counts.iter().enumerate() {
                if count.is_none_or(|c| c < 2) {
                    let _ = client(&cluster.bin, &cluster.addr(n + 1), &["get", "discovery-probe"]).await;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the nodes did not connect to each other within {CONNECT_TIMEOUT:?}: connected peers {counts:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    phase("every node connected to the two others");

    let blocks: Vec<String> = (0..BLOCKS).map(|i| format!("b{i}")).collect();
    let mut attempts: Vec<Attempt> = Vec::new();

    // The cluster works once it acknowledges an insert: retry the first one, bounded.
    for (i, block) in blocks.iter().enumerate() {
        let insert =
            json!({ "header": { "id": block, "type": "log", "collectionId": "t" }, "entries": [] }).to_string();
        let deadline = Instant::now() + FIRST_WRITE_TIMEOUT;
        let mut tries = 0;
        loop {
            tries += 1;
            // `--replace`: a retry after an attempt whose outcome is unknown must not fail because
            // that attempt created the block.
            let args = ["write", "--block", block, "--replace", "--insert", &insert];
            let outcome = client(&bin, &cluster.addr(1), &args).await.and_then(|out| {
                serde_json::from_str::<TrxRev>(&out).map_err(|e| format!("unexpected write output {out:?}: {e}"))
            });
            let acked = outcome.is_ok();
            attempts.push(Attempt { block: block.clone(), value: None, via: 1, outcome });
            if acked {
                break;
            }
            assert!(
                Instant::now() < deadline && (i == 0 || tries < 5),
                "inserting {block} failed {tries} times, last: {:?}\n{}",
                attempts.last().map(|a| &a.outcome),
                cluster.logs()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
    phase(&format!("{BLOCKS} blocks inserted"));

    // A few appends with every node up, through any node.
    let deadline = Instant::now() + APPEND_PHASE_TIMEOUT;
    for seq in 0..APPENDS_BEFORE_KILL {
        if Instant::now() >= deadline {
            break;
        }
        let block = blocks.choose(&mut rng).expect("blocks").clone();
        let via = rng.gen_range(1..=3);
        attempts.push(append(&cluster, &block, format!("{block}-up{seq}-via{via}"), via).await);
    }
    let acked_before = attempts.iter().filter(|a| a.outcome.is_ok()).count();
    phase(&format!("{acked_before} of {} writes acknowledged with every node up", attempts.len()));

    // Node 3 holds every block at its newest revision before it is killed.
    if let Err(state) = wait_until_converged(&cluster, &blocks, &[1, 2, 3]).await {
        panic!("before the kill, the nodes did not converge within {CONVERGE_TIMEOUT:?}: {state}\n{}", cluster.logs());
    }
    let addr3 = cluster.addr(3);
    cluster.node_mut(3).sigkill();
    phase("node 3 killed with SIGKILL");

    // Appends while node 3 is down, through nodes 1 and 2.
    let mut acked_while_down = 0;
    let mut tried_while_down = 0;
    let deadline = Instant::now() + APPEND_PHASE_TIMEOUT;
    while acked_while_down < APPENDS_WHILE_DOWN
        && tried_while_down < MAX_ATTEMPTS_WHILE_DOWN
        && Instant::now() < deadline
    {
        let block = blocks.choose(&mut rng).expect("blocks").clone();
        let via = rng.gen_range(1..=2);
        let attempt = append(&cluster, &block, format!("{block}-down{tried_while_down}-via{via}"), via).await;
        tried_while_down += 1;
        if attempt.outcome.is_ok() {
            acked_while_down += 1;
        }
        attempts.push(attempt);
    }
    phase(&format!("{acked_while_down} of {tried_while_down} appends acknowledged while node 3 was down"));

    // Restart node 3 at once: the coordinators are still re-sending it the last decided records.
    cluster.node_mut(3).start(&bin).await;
    assert_eq!(cluster.addr(3), addr3, "node 3 restarts with the same peer id and address");
    phase("node 3 restarted");

    let mut failures: Vec<String> = Vec::new();
    if acked_while_down < APPENDS_WHILE_DOWN {
        failures.push(format!(
            "only {acked_while_down} of {tried_while_down} appends were acknowledged while node 3 was down \
             (two of three members were up); unknown outcomes: {:?}",
            attempts.iter().filter_map(|a| a.outcome.as_ref().err()).collect::<Vec<_>>()
        ));
    }
    match wait_until_converged(&cluster, &blocks, &[1, 2, 3]).await {
        Ok(took) => phase(&format!("every node holds every block's newest revision (after {took:.1?})")),
        Err(state) => {
            phase("the nodes did not converge");
            failures.push(format!("after the restart the nodes did not converge within {CONVERGE_TIMEOUT:?}: {state}"));
        }
    }

    // Quorum reads (the nodes' default read mode) of every block through every node.
    let mut reads: BTreeMap<usize, Result<GetBlockResults, String>> = BTreeMap::new();
    for n in 1..=3 {
        reads.insert(n, get(&bin, &cluster.addr(n), &blocks, false).await);
    }
    phase("quorum reads through every node done");

    // Graceful stop of every node.
    for n in 1..=3 {
        match cluster.node_mut(n).sigterm().await {
            Ok(status) if status.success() => {}
            Ok(status) => failures.push(format!("node {n} exited with {status} after SIGTERM")),
            Err(e) => failures.push(e),
        }
    }
    phase("every node stopped with SIGTERM");

    // Each node's store, read in this process.
    let mut stores: BTreeMap<usize, BTreeMap<String, Stored>> = BTreeMap::new();
    for n in 1..=3 {
        match read_store(&cluster.node(n).storage_dir(), &blocks).await {
            Ok(stored) => {
                stores.insert(n, stored);
            }
            Err(e) => failures.push(format!("node {n}: cannot read its store: {e}")),
        }
    }

    // Per node and block: the history and the acknowledged writes. Failing (node, block) pairs get
    // their history and a reference node's printed.
    let mut failing: BTreeMap<(usize, String), Vec<String>> = BTreeMap::new();
    for block in &blocks {
        let of_block: Vec<&Attempt> = attempts.iter().filter(|a| &a.block == block).collect();
        for (&n, stored) in &stores {
            let found = check_stored(&BlockId::new(block.as_str()).expect("a block id"), &stored[block], &of_block);
            if !found.is_empty() {
                failing.entry((n, block.clone())).or_default().extend(found);
            }
        }
        // Every node holds the same latest and value.
        if let Some(reference) = stores.get(&1).map(|s| &s[block]) {
            for (&n, stored) in stores.iter().filter(|(n, _)| **n != 1) {
                let stored = &stored[block];
                if stored.latest != reference.latest {
                    failing.entry((n, block.clone())).or_default().push(format!(
                        "latest is {:?}, node 1 holds {:?}",
                        stored.latest.as_ref().map(|l| (l.rev, l.trx_id.to_string())),
                        reference.latest.as_ref().map(|l| (l.rev, l.trx_id.to_string()))
                    ));
                }
                if stored.value != reference.value {
                    failing.entry((n, block.clone())).or_default().push(format!(
                        "the value at latest differs from node 1's: entries {:?} vs {:?}",
                        stored.entries(),
                        reference.entries()
                    ));
                }
            }
        }
        // The quorum reads returned what the nodes store, and every acknowledged append.
        for (&n, read) in &reads {
            let read: Result<&BlockGetResult, String> = read
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|r| r.get(block.as_str()).ok_or_else(|| "no result".to_owned()));
            let problems: Vec<String> = match (read, stores.get(&n).map(|s| &s[block])) {
                (Err(e), _) => vec![format!("the quorum read through node {n} failed: {e}")],
                (Ok(read), stored) => {
                    let entries = entries_of(read.block.as_ref()).unwrap_or_default();
                    let mut problems: Vec<String> = check_entries(&entries, &of_block)
                        .into_iter()
                        .map(|p| format!("quorum read through node {n}: {p}"))
                        .collect();
                    if let Some(stored) = stored
                        && (read.state.latest != stored.latest || Some(&entries) != stored.entries().as_ref())
                    {
                        problems.push(format!(
                            "the quorum read through node {n} returned rev {:?} with entries {entries:?}; \
                             node {n} stores rev {:?} with entries {:?}",
                            read.state.latest.as_ref().map(|l| l.rev),
                            stored.latest.as_ref().map(|l| l.rev),
                            stored.entries()
                        ));
                    }
                    problems
                }
            };
            if !problems.is_empty() {
                failing.entry((n, block.clone())).or_default().extend(problems);
            }
        }
    }

    let acked: usize = attempts.iter().filter(|a| a.outcome.is_ok()).count();
    let unknown: Vec<String> = attempts
        .iter()
        .filter_map(|a| a.outcome.as_ref().err().map(|e| format!("{} {:?} via node {}: {e}", a.block, a.value, a.via)))
        .collect();
    phase(&format!("{acked} writes acknowledged, {} with unknown outcome; checks done", unknown.len()));

    if failing.is_empty() && failures.is_empty() {
        for (n, stored) in &stores {
            let revs: Vec<u64> = blocks.iter().map(|b| stored[b].latest.as_ref().map_or(0, |l| l.rev)).collect();
            eprintln!("node {n}: latest revisions {revs:?}");
        }
        return;
    }
    let mut report = format!("replication test failed (seed {seed}, replay with OPTIMYSTIC_REPLICATION_SEED={seed})\n");
    for failure in &failures {
        let _ = writeln!(report, "- {failure}");
    }
    for ((n, block), problems) in &failing {
        let _ = writeln!(report, "- node {n}, block {block}:");
        for problem in problems {
            let _ = writeln!(report, "    * {problem}");
        }
    }
    let mut histories: BTreeSet<(String, usize)> = BTreeSet::new();
    for (n, block) in failing.keys() {
        histories.insert((block.clone(), *n));
        histories.insert((block.clone(), if *n == 1 { 2 } else { 1 }));
    }
    for (block, m) in &histories {
        {
            match stores.get(m) {
                Some(stored) => {
                    let _ = writeln!(report, "history of {block} on node {m}:\n{}", stored[block].history());
                }
                None => {
                    let _ = writeln!(report, "history of {block} on node {m}: store not read");
                }
            }
        }
    }
    if !unknown.is_empty() {
        let _ = writeln!(report, "writes with unknown outcome:\n  {}", unknown.join("\n  "));
    }
    let _ = write!(report, "{}", cluster.logs());
    if std::env::var_os("OPTIMYSTIC_REPLICATION_KEEP_DIR").is_some() {
        let _ = writeln!(report, "configurations, data and logs kept in {}", dir.keep().display());
    } else {
        let _ = writeln!(report, "(set OPTIMYSTIC_REPLICATION_KEEP_DIR=1 to keep the configurations, data and logs)");
    }
    panic!("{report}");
}

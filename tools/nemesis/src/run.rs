//! `optimystic-nemesis run`: the cluster, the workload, the nemesis schedule, the final phase and
//! the check.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::client::{Invoker, WriteResult, block_of};
use crate::cluster::{Cluster, Targets};
use crate::history::{Event, Kind, Recorder};
use crate::net::{Netns, Resources};

/// A fault the nemesis can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL a node, restart it after a moment.
    Kill,
    /// SIGSTOP a node for a few seconds, then SIGCONT.
    Pause,
    /// Cut one node off from every other node.
    Isolate,
    /// Split the nodes into a majority and a minority.
    Split,
    /// A node leaves for good and a new one joins.
    Churn,
}

impl Fault {
    /// Parses a fault name.
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        Ok(match name.trim() {
            "kill" => Self::Kill,
            "pause" => Self::Pause,
            "isolate" => Self::Isolate,
            "split" => Self::Split,
            "churn" => Self::Churn,
            other => bail!("unknown fault {other:?} (expected kill, pause, isolate, split, churn)"),
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::Pause => "pause",
            Self::Isolate => "isolate",
            Self::Split => "split",
            Self::Churn => "churn",
        }
    }

    /// Whether it needs network namespaces.
    pub fn needs_netns(self) -> bool {
        matches!(self, Self::Isolate | Self::Split)
    }
}

/// Everything `run` takes.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Nodes.
    pub nodes: usize,
    /// Peers per block cluster.
    pub cluster_size: usize,
    /// Blocks the workload appends to.
    pub blocks: usize,
    /// Concurrent client tasks.
    pub clients: usize,
    /// Duration of the fault phase.
    pub seconds: u64,
    /// Seed of the schedule (random when absent).
    pub seed: Option<u64>,
    /// Enabled faults.
    pub faults: Vec<Fault>,
    /// The `optimystic` binary.
    pub bin: PathBuf,
    /// Output directory (a fresh one under the temp dir when absent).
    pub out: Option<PathBuf>,
    /// Never use network namespaces.
    pub no_netns: bool,
    /// Deadline of one client process (it is killed after it).
    pub op_timeout_ms: u64,
    /// The client's own `--timeout-ms`.
    pub client_timeout_ms: u64,
    /// Quiet time between faults, lower bound.
    pub gap_min_ms: u64,
    /// Quiet time between faults, upper bound.
    pub gap_max_ms: u64,
    /// Longest wait for the replicas to converge at the end.
    pub settle_secs: u64,
}

/// What a run produced.
#[derive(Debug)]
pub struct RunSummary {
    /// The seed.
    pub seed: u64,
    /// Output directory.
    pub out: PathBuf,
    /// History file.
    pub history: PathBuf,
    /// Whether namespaces were used.
    pub netns: bool,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// Whether the replicas converged within the settle time.
    pub converged: bool,
}

/// A plain HTTP/1.0 GET (for the nodes' metrics).
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> anyhow::Result<String> {
    let sock = addr.parse().with_context(|| format!("address {addr}"))?;
    let mut stream = TcpStream::connect_timeout(&sock, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text.split_once("\r\n\r\n").map_or(text.clone(), |(_, body)| body.to_owned()))
}

fn log(start: Instant, msg: &str) {
    eprintln!("[{:7.1}s] {msg}", start.elapsed().as_secs_f64());
}

/// Shared state of the run's tasks.
struct Ctx {
    inv: Invoker,
    rec: Recorder,
    blocks: Vec<String>,
    start: Instant,
    self_exe: PathBuf,
    hub: Option<String>,
}

impl Ctx {
    fn nemesis(&self, f: &str, node: Option<usize>, detail: Value) {
        let mut e = Event::new(Kind::Nemesis, 0, "nemesis", f);
        e.node = node;
        e.detail = Some(detail);
        self.rec.record(e);
    }

    /// The value of a metric of a node (None when unreachable).
    async fn metric(&self, metrics_addr: &str, name: &str) -> Option<f64> {
        let body = match &self.hub {
            Some(hub) => {
                let out = tokio::process::Command::new("ip")
                    .args(["netns", "exec", hub])
                    .arg(&self.self_exe)
                    .args(["http-get", metrics_addr, "/metrics"])
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .output();
                let out = tokio::time::timeout(Duration::from_secs(5), out).await.ok()?.ok()?;
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
            None => {
                let addr = metrics_addr.to_owned();
                tokio::task::spawn_blocking(move || http_get(&addr, "/metrics", Duration::from_secs(3)))
                    .await
                    .ok()?
                    .ok()?
            }
        };
        body.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
    }

    /// A read of `blocks` through `addr`, recorded as one read operation per block.
    async fn read_blocks(
        &self,
        process: &str,
        slot: usize,
        addr: &str,
        mode: &str,
        is_final: bool,
        member: Option<&BTreeMap<String, bool>>,
    ) -> bool {
        let mut ids = Vec::new();
        for b in &self.blocks {
            let id = self.rec.next_id();
            let mut e = Event::new(Kind::Invoke, id, process, "read");
            e.block = Some(b.clone());
            e.node = Some(slot);
            e.mode = Some(mode.into());
            e.is_final = is_final;
            e.member = member.and_then(|m| m.get(b).copied());
            ids.push((id, self.rec.record(e)));
        }
        let result = self.inv.get(addr, &self.blocks, mode).await;
        for (b, (_, invoke)) in self.blocks.iter().zip(ids) {
            let mut c = invoke.clone();
            match &result {
                Ok(v) => {
                    let (entries, rev) = block_of(v, b);
                    c.kind = Kind::Ok;
                    c.value = Some(entries.unwrap_or(Value::Null));
                    c.rev = rev;
                }
                Err(e) => {
                    c.kind = Kind::Fail;
                    c.error = Some(e.clone());
                }
            }
            self.rec.record(c);
        }
        result.is_ok()
    }
}

async fn client_loop(ctx: Arc<Ctx>, id: usize, targets: Targets, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let process = format!("c{id}");
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let target = targets.read().ok().and_then(|t| t.choose(&mut rng).cloned());
        let (Some((slot, addr)), Some(block)) = (target, ctx.blocks.choose(&mut rng).cloned()) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if rng.gen_bool(0.5) {
            let value = format!("{id}-{n}");
            n += 1;
            let op = ctx.rec.next_id();
            let mut e = Event::new(Kind::Invoke, op, &process, "append");
            e.block = Some(block.clone());
            e.value = Some(json!(value));
            e.node = Some(slot);
            let invoke = ctx.rec.record(e);
            let mut c = invoke;
            let written = ctx.inv.append(&addr, &block, &value).await;
            if !written.attempts.is_empty() {
                c.detail = Some(json!({ "failed_attempts": written.attempts }));
            }
            match written.result {
                WriteResult::Ok(rev) => {
                    c.kind = Kind::Ok;
                    c.rev = rev;
                }
                WriteResult::Fail(err) => {
                    c.kind = Kind::Fail;
                    c.error = Some(err);
                }
                WriteResult::Info(err) => {
                    c.kind = Kind::Info;
                    c.error = Some(err);
                }
            }
            ctx.rec.record(c);
        } else {
            let op = ctx.rec.next_id();
            let mut e = Event::new(Kind::Invoke, op, &process, "read");
            e.block = Some(block.clone());
            e.node = Some(slot);
            e.mode = Some("quorum".into());
            let mut c = ctx.rec.record(e);
            match ctx.inv.get(&addr, std::slice::from_ref(&block), "quorum").await {
                Ok(v) => {
                    let (entries, rev) = block_of(&v, &block);
                    c.kind = Kind::Ok;
                    c.value = Some(entries.unwrap_or(Value::Null));
                    c.rev = rev;
                }
                Err(err) => {
                    c.kind = Kind::Fail;
                    c.error = Some(err);
                }
            }
            ctx.rec.record(c);
        }
    }
}

impl Ctx {
    /// A read of one block, recorded.
    async fn read_one(&self, process: &str, slot: usize, addr: &str, block: &str, mode: &str, is_final: bool) -> bool {
        let id = self.rec.next_id();
        let mut e = Event::new(Kind::Invoke, id, process, "read");
        e.block = Some(block.to_owned());
        e.node = Some(slot);
        e.mode = Some(mode.into());
        e.is_final = is_final;
        let mut c = self.rec.record(e);
        let result = self.inv.get(addr, &[block.to_owned()], mode).await;
        match &result {
            Ok(v) => {
                let (entries, rev) = block_of(v, block);
                c.kind = Kind::Ok;
                c.value = Some(entries.unwrap_or(Value::Null));
                c.rev = rev;
            }
            Err(err) => {
                c.kind = Kind::Fail;
                c.error = Some(err.clone());
            }
        }
        self.rec.record(c);
        result.is_ok()
    }
}

/// Reads every block through every live node at once (quorum reads catch the members up).
async fn sweep(ctx: &Arc<Ctx>, cluster: &Cluster, process: &str, mode: &str) -> usize {
    let mut set = tokio::task::JoinSet::new();
    for slot in cluster.live() {
        let Some(addr) = cluster.addr(slot) else {
            continue;
        };
        let ctx = ctx.clone();
        let process = process.to_owned();
        let mode = mode.to_owned();
        set.spawn(async move { ctx.read_blocks(&process, slot, &addr, &mode, false, None).await });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        if matches!(r, Ok(true)) {
            ok += 1;
        }
    }
    ok
}

/// Local reads through every live node; true when, for every block, all its members hold the
/// same entries at the same revision.
async fn converged(ctx: &Arc<Ctx>, cluster: &Cluster) -> bool {
    let mut states: BTreeMap<usize, Value> = BTreeMap::new();
    for slot in cluster.live() {
        let Some(addr) = cluster.addr(slot) else {
            continue;
        };
        if let Ok(v) = ctx.inv.get(&addr, &ctx.blocks, "local").await {
            states.insert(slot, v);
        }
    }
    ctx.blocks.iter().all(|b| {
        let members = cluster.members(b);
        let mut views = members.iter().map(|m| states.get(m).map(|v| block_of(v, b)));
        let Some(Some(first)) = views.next() else {
            return false;
        };
        views.all(|v| v.as_ref() == Some(&first))
    })
}

fn pick(rng: &mut StdRng, live: &[usize]) -> anyhow::Result<usize> {
    live.choose(rng).copied().ok_or_else(|| anyhow!("no live node"))
}

/// One fault, then heal it. Every random draw happens before anything is applied, in a fixed
/// order, so a seed replays the same schedule.
async fn inject(ctx: &Arc<Ctx>, cluster: &mut Cluster, rng: &mut StdRng, fault: Fault) -> anyhow::Result<()> {
    let live = cluster.live();
    let start = ctx.start;
    match fault {
        Fault::Kill => {
            let t = pick(rng, &live)?;
            let down = Duration::from_millis(rng.gen_range(200..=3_000));
            log(start, &format!("kill node {t} (down {:.1} s)", down.as_secs_f64()));
            ctx.nemesis("kill", Some(t), json!({"down_ms": down.as_millis() as u64}));
            cluster.kill(t).await?;
            tokio::time::sleep(down).await;
            restart_with_retries(cluster, t).await?;
            ctx.nemesis("restart", Some(t), json!({}));
        }
        Fault::Pause => {
            let t = pick(rng, &live)?;
            let hold = Duration::from_millis(rng.gen_range(1_000..=8_000));
            log(start, &format!("pause node {t} ({:.1} s)", hold.as_secs_f64()));
            ctx.nemesis("pause", Some(t), json!({"hold_ms": hold.as_millis() as u64}));
            cluster.pause(t)?;
            tokio::time::sleep(hold).await;
            cluster.resume(t)?;
            ctx.nemesis("resume", Some(t), json!({}));
        }
        Fault::Isolate => {
            let t = pick(rng, &live)?;
            let hold = Duration::from_millis(rng.gen_range(3_000..=12_000));
            let others: Vec<usize> = live.iter().copied().filter(|s| *s != t).collect();
            log(start, &format!("isolate node {t} ({:.1} s)", hold.as_secs_f64()));
            ctx.nemesis("isolate", Some(t), json!({"hold_ms": hold.as_millis() as u64, "from": others}));
            cluster.partition(&[t], &others)?;
            tokio::time::sleep(hold).await;
            cluster.heal()?;
            ctx.nemesis("heal", None, json!({}));
        }
        Fault::Split => {
            let mut shuffled = live.clone();
            shuffled.shuffle(rng);
            let hold = Duration::from_millis(rng.gen_range(3_000..=12_000));
            let minority_len = ((shuffled.len().saturating_sub(1)) / 2).max(1);
            let (minority, majority) = shuffled.split_at(minority_len.min(shuffled.len()));
            log(start, &format!("split {minority:?} | {majority:?} ({:.1} s)", hold.as_secs_f64()));
            ctx.nemesis(
                "split",
                None,
                json!({"hold_ms": hold.as_millis() as u64, "minority": minority, "majority": majority}),
            );
            cluster.partition(minority, majority)?;
            tokio::time::sleep(hold).await;
            cluster.heal()?;
            ctx.nemesis("heal", None, json!({}));
        }
        Fault::Churn => {
            let t = pick(rng, &live)?;
            let pause = Duration::from_millis(rng.gen_range(500..=3_000));
            log(start, &format!("node {t} leaves for good; a new node joins {:.1} s later", pause.as_secs_f64()));
            ctx.nemesis("leave", Some(t), json!({}));
            cluster.leave(t).await?;
            tokio::time::sleep(pause).await;
            let new = cluster.join().await?;
            ctx.nemesis("join", Some(new), json!({"addr": cluster.addr(new)}));
            log(start, &format!("node {new} joined"));
        }
    }
    Ok(())
}

async fn restart_with_retries(cluster: &mut Cluster, slot: usize) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..5 {
        match cluster.start(slot).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                eprintln!("restart of node {slot} failed: {e:#}; retrying");
                last = Some(e);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("restart failed")))
}

/// Waits until every live node reports at least `want` connected peers (or `timeout`).
async fn wait_connected(ctx: &Arc<Ctx>, cluster: &Cluster, want: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let mut all = true;
        for slot in cluster.live() {
            let Some(node) = cluster.nodes.get(slot) else {
                continue;
            };
            let n = ctx.metric(&node.metrics, "optimystic_connected_peers").await.unwrap_or(0.0);
            if n < want as f64 {
                all = false;
                break;
            }
        }
        if all {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs the whole pass; the caller checks the history.
pub async fn run(opts: RunOptions, res: Arc<Resources>) -> anyhow::Result<RunSummary> {
    let start = Instant::now();
    let seed = opts.seed.unwrap_or_else(rand::random);
    let out = match &opts.out {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("optimystic-nemesis-{seed}-{}", std::process::id())),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!("optimystic-nemesis: seed {seed} (replay the schedule with --seed {seed})");
    eprintln!("optimystic-nemesis: output in {}", out.display());
    if !opts.bin.is_file() {
        bail!(
            "{} is not a file (build it: cargo build -p optimystic-cli --bin optimystic, or pass --bin)",
            opts.bin.display()
        );
    }
    if opts.nodes < 1 || opts.blocks < 1 || opts.clients < 1 {
        bail!("--nodes, --blocks and --clients must be at least 1");
    }

    let net = if opts.no_netns {
        eprintln!("optimystic-nemesis: --no-netns: nodes on 127.0.0.1, kill, pause and churn faults only");
        None
    } else {
        match Netns::create(res.clone()) {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!(
                    "optimystic-nemesis: cannot create network namespaces ({e:#}); this needs root and iproute2. \
                     Falling back to 127.0.0.1 with kill, pause and churn faults only (no partitions)"
                );
                None
            }
        }
    };
    let netns = net.is_some();
    let mut faults = opts.faults.clone();
    if !netns {
        let dropped: Vec<&str> = faults.iter().filter(|f| f.needs_netns()).map(|f| f.name()).collect();
        if !dropped.is_empty() {
            eprintln!("optimystic-nemesis: without namespaces, dropping faults: {}", dropped.join(", "));
        }
        faults.retain(|f| !f.needs_netns());
    }
    let hub = net.as_ref().map(|n| n.hub().to_owned());
    let history = out.join("history.jsonl");
    let rec = Recorder::create(&history, start)?;
    std::fs::write(
        out.join("run.json"),
        serde_json::to_string_pretty(&json!({
            "seed": seed, "nodes": opts.nodes, "cluster_size": opts.cluster_size, "blocks": opts.blocks,
            "clients": opts.clients, "seconds": opts.seconds, "faults": faults.iter().map(|f| f.name()).collect::<Vec<_>>(),
            "bin": opts.bin, "netns": netns, "hub": hub,
        }))?,
    )?;
    let inv = Invoker {
        bin: opts.bin.clone(),
        hub: hub.clone(),
        res: res.clone(),
        op_timeout: Duration::from_millis(opts.op_timeout_ms),
        client_timeout_ms: opts.client_timeout_ms,
    };
    let blocks: Vec<String> = (0..opts.blocks).map(|i| format!("b{i}")).collect();
    let ctx = Arc::new(Ctx { inv, rec, blocks, start, self_exe: std::env::current_exe()?, hub });

    // Nodes: the first alone, then the others bootstrapping from those already up.
    let mut cluster = Cluster::new(opts.bin.clone(), out.clone(), net, res.clone(), opts.cluster_size);
    for _ in 0..opts.nodes {
        let slot = cluster.add_node()?;
        cluster.start(slot).await?;
        log(start, &format!("node {slot} up: {}", cluster.addr(slot).unwrap_or_default()));
    }
    let want = (opts.nodes - 1).min(opts.cluster_size.saturating_sub(1)).max(usize::from(opts.nodes > 1));
    if !wait_connected(&ctx, &cluster, want, Duration::from_secs(30)).await {
        eprintln!("optimystic-nemesis: warning: not every node reports {want} connected peers after 30 s; going on");
    }

    // Blocks, created through node 0 until acknowledged.
    let first = cluster.addr(0).ok_or_else(|| anyhow!("node 0 has no address"))?;
    for b in ctx.blocks.clone() {
        let mut created = false;
        for _ in 0..20 {
            let id = ctx.rec.next_id();
            let mut e = Event::new(Kind::Invoke, id, "setup", "create");
            e.block = Some(b.clone());
            e.node = Some(0);
            let mut c = ctx.rec.record(e);
            let r = ctx.inv.create(&first, &b).await.result;
            match &r {
                WriteResult::Ok(rev) => {
                    c.kind = Kind::Ok;
                    c.rev = *rev;
                }
                WriteResult::Fail(err) | WriteResult::Info(err) => {
                    c.kind = if matches!(r, WriteResult::Fail(_)) { Kind::Fail } else { Kind::Info };
                    c.error = Some(err.clone());
                }
            }
            ctx.rec.record(c);
            if matches!(r, WriteResult::Ok(_)) {
                created = true;
                break;
            }
            // An earlier unknown attempt may have created it.
            if let Ok(v) = ctx.inv.get(&first, std::slice::from_ref(&b), "quorum").await
                && block_of(&v, &b).0.is_some()
            {
                created = true;
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if !created {
            bail!("could not create block {b}");
        }
    }
    let answered = sweep(&ctx, &cluster, "setup", "quorum").await;
    log(
        start,
        &format!(
            "{} blocks created; {answered} of {} nodes answered the first sweep",
            ctx.blocks.len(),
            cluster.live().len()
        ),
    );

    // Workload.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for id in 0..opts.clients {
        clients.spawn(client_loop(ctx.clone(), id, cluster.targets.clone(), stop.clone(), seed));
    }

    // Nemesis.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(opts.seconds);
    let outcome: anyhow::Result<()> = async {
        loop {
            let gap = Duration::from_millis(rng.gen_range(opts.gap_min_ms..=opts.gap_max_ms.max(opts.gap_min_ms)));
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(gap.min(left)).await;
            if Instant::now() >= deadline {
                break;
            }
            let Some(fault) = faults.choose(&mut rng).copied() else {
                continue;
            };
            inject(&ctx, &mut cluster, &mut rng, fault).await?;
            *counts.entry(fault.name()).or_insert(0) += 1;
            let restarted = cluster.heal_all().await?;
            if !restarted.is_empty() {
                log(start, &format!("restarted {restarted:?}"));
            }
            let answered = sweep(&ctx, &cluster, "sweep", "quorum").await;
            log(start, &format!("sweep: {answered} of {} nodes answered", cluster.live().len()));
        }
        Ok(())
    }
    .await;
    stop.store(true, Ordering::SeqCst);
    log(start, "fault phase over; waiting for the clients' last operations");
    while clients.join_next().await.is_some() {}
    outcome?;

    // Final phase: heal everything, wait for catch-up, read everything through everyone.
    cluster.heal_all().await?;
    ctx.nemesis("heal-all", None, json!({}));
    let settle_deadline = Instant::now() + Duration::from_secs(opts.settle_secs);
    let mut is_converged = false;
    let mut rounds = 0;
    while Instant::now() < settle_deadline {
        rounds += 1;
        sweep(&ctx, &cluster, "settle", "quorum").await;
        if converged(&ctx, &cluster).await {
            is_converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    log(
        start,
        &format!(
            "replicas {} after {rounds} settle rounds",
            if is_converged { "converged" } else { "did NOT converge" }
        ),
    );
    for slot in cluster.live() {
        let Some(addr) = cluster.addr(slot) else {
            continue;
        };
        let mut done = false;
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            // Failed attempts are not recorded: they are retried, then block by block.
            if ctx.inv.get(&addr, &ctx.blocks, "quorum").await.is_ok() {
                done = ctx.read_blocks("final", slot, &addr, "quorum", true, None).await;
                break;
            }
        }
        if !done {
            // One block that cannot be read fails the whole get: read each block on its own.
            for b in &ctx.blocks {
                ctx.read_one("final", slot, &addr, b, "quorum", true).await;
            }
        }
    }
    for slot in cluster.live() {
        let Some(addr) = cluster.addr(slot) else {
            continue;
        };
        let members: BTreeMap<String, bool> =
            ctx.blocks.iter().map(|b| (b.clone(), cluster.members(b).contains(&slot))).collect();
        ctx.read_blocks("final", slot, &addr, "local", true, Some(&members)).await;
    }
    let mut memberships = serde_json::Map::new();
    for b in &ctx.blocks {
        memberships.insert(b.clone(), json!(cluster.members(b)));
    }
    ctx.nemesis("final-members", None, Value::Object(memberships));
    let killed = cluster.stop_all(Duration::from_secs(20)).await;
    if !killed.is_empty() {
        eprintln!("optimystic-nemesis: warning: nodes {killed:?} did not stop within 20 s of SIGTERM and were killed");
    }
    log(start, "nodes stopped");
    Ok(RunSummary { seed, out, history, netns, faults: counts, converged: is_converged })
}

/// Removes namespaces (and the processes in them) left by runs whose harness is gone.
pub fn cleanup_stale(all: bool) -> usize {
    crate::net::stale_namespaces(all).iter().filter(|ns| crate::net::delete_namespace(ns)).count()
}

//! `optimystic`: run and operate Optimystic DB-P2P nodes.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use optimystic_core::model::BlockId;
use optimystic_core::record::ClusterRecord;
use optimystic_core::registry::Registry;
use optimystic_core::time::now_ms;
use optimystic_node::config::{self, LogFormat};
use optimystic_node::host::{Host, HostConfig, HostHandle};
use optimystic_node::node::Node;
use optimystic_node::ops::{self, OperatorRequest};
use optimystic_node::service::Handlers;
use optimystic_node::{identity, link_bundled_plugins};
use serde_json::{Value, json};

use crate::bench::BenchOptions;

mod bench;
mod client;
mod cluster_up;
mod demo;
mod error_text;
mod history;
mod progress;

/// A consensus round allocates and frees many small JSON values on two or more threads; glibc's
/// allocator spent about a fifth of a loaded node's CPU on that (perf, `optimystic bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "optimystic",
    version,
    about = "Peer-to-peer block database node",
    after_help = "Every command also takes --log-format text|json (or OPTIMYSTIC_LOG_FORMAT): logs on stderr as \
        human-readable lines (text, the default) or one JSON object per line (json)."
)]
struct Cli {
    /// Log format (said once, in the top-level help).
    #[arg(long, global = true, value_enum, env = "OPTIMYSTIC_LOG_FORMAT", hide = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node until SIGINT or SIGTERM.
    #[command(after_help = "Examples:\n  optimystic start\n  optimystic start --config node1.toml\n  \
        OPTIMYSTIC_NODE__LISTEN='[\"/ip4/127.0.0.1/tcp/4002\"]' optimystic start --storage memory")]
    Start(StartArgs),
    /// Talk to a running node.
    ///
    /// Exit codes: 0 done; 2 error (a `write` certainly committed nothing); 3 a `get` named a block
    /// that does not exist (`not found: <id>` on stderr per block; the JSON is still printed); 4 a
    /// `write`'s outcome is unknown (its commit was sent and never confirmed).
    #[command(
        after_help = "Examples:\n  optimystic client --peer /ip4/127.0.0.1/tcp/4001/p2p/12D3Koo... get diary\n  \
        optimystic client --peer ADDR write --block diary --insert '{\"header\":{\"id\":\"diary\",\"type\":\"log\",\"collectionId\":\"c\"},\"entries\":[]}'\n  \
        optimystic client --peer ADDR write --block diary --update '[[\"entries\",0,0,[\"hello\"]]]'\n  \
        optimystic client --peer ADDR write --block diary --append entries '\"hello\"'"
    )]
    Client(client::ClientArgs),
    /// Show a block's committed revisions as one peer holds them, with the evidence kept for each.
    ///
    /// Each revision comes with its evidence: the decided pend and commit records (cluster
    /// records signed by the block's cluster) that prove it. Default output is text for people;
    /// `--json` prints one JSON object per revision; `--records` prints only the evidence records,
    /// one per line, the input `optimystic verify-record` reads. Exit codes: 0 done; 2 error; 3 the
    /// peer holds no revision of the block (it does not exist, or the peer is not in its cluster).
    #[command(after_help = "Examples:\n  optimystic history --peer /ip4/127.0.0.1/tcp/4101/p2p/12D3Koo... diary\n  \
        optimystic history --peer ADDR diary --from 10 --json\n  \
        optimystic history --peer ADDR diary --records | optimystic verify-record")]
    History(HistoryArgs),
    /// Start a local 3-node cluster, run a workload, stop and restart a node, and stop cleanly.
    #[command(after_help = "Example:\n  optimystic demo")]
    Demo(demo::DemoOptions),
    /// Measure transactions per second and latency on a local cluster.
    #[command(after_help = "Example:\n  optimystic bench --nodes 3 --storage memory --concurrency 64 --json")]
    Bench(BenchOptions),
    /// List the registered plugins, one `<kind> <name>` line each.
    #[command(after_help = "Example:\n  optimystic plugins")]
    Plugins {
        /// Also print each plugin's description and origin.
        #[arg(long)]
        verbose: bool,
        /// Configuration file whose `[plugins] load` libraries to include.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Verify cluster records: digest, message hash, public keys and every vote signature.
    ///
    /// Reads one JSON document or JSON Lines from FILE (or stdin) and prints `ok <messageHash>` or
    /// `invalid <messageHash>: <reason>` per record. Exits 1 if any record is invalid.
    #[command(
        after_help = "Examples:\n  optimystic verify-record record.json\n  cat records.jsonl | optimystic verify-record"
    )]
    VerifyRecord {
        /// The file to read; stdin when absent.
        file: Option<PathBuf>,
        /// Also refuse records whose message has expired.
        #[arg(long)]
        check_expiration: bool,
    },
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Ask a running node how it is: peers, routing table, readiness, storage, counters.
    #[command(after_help = "Examples:\n  optimystic status --peer /ip4/127.0.0.1/tcp/4101/p2p/12D3Koo...\n  \
        optimystic status --peer ADDR --json")]
    Status(OperatorArgs),
    /// Ask a running node where a block lives: its cluster and each member's latest revision.
    #[command(after_help = "Examples:\n  optimystic locate --peer /ip4/127.0.0.1/tcp/4101/p2p/12D3Koo... diary\n  \
        optimystic locate --peer ADDR diary --json")]
    Locate {
        #[command(flatten)]
        operator: OperatorArgs,
        /// The block id.
        id: String,
    },
    /// Local clusters of `optimystic start` processes.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Start N local nodes as separate processes and run them until Ctrl-C (SIGINT) or SIGTERM.
    ///
    /// Writes `node<i>.toml` config files, data directories and `node<i>.log` logs into one
    /// directory (printed; by default a new one in the system's temporary directory), starts node
    /// 1, then the others bootstrapping from it, and prints each node's pid, address and metrics
    /// URL and client commands to paste. `cluster stop|start|restart <i>` and `cluster add` change
    /// one node while it runs. Ctrl-C or SIGTERM stops every node (SIGTERM, then SIGKILL after
    /// 20 s) and exits 0; a node that exits on its own (not stopped on command) stops the others
    /// and exits 2.
    #[command(after_help = "Examples:\n  optimystic cluster up\n  \
        optimystic cluster up --nodes 5 --storage memory --base-port 0\n  \
        optimystic cluster up --dir ./my-cluster   # reuses the data (and peer ids) of an earlier run")]
    Up(cluster_up::ClusterUpOptions),
    /// Stop node I of a running `cluster up` (SIGTERM; its data and config stay).
    #[command(after_help = "Example:\n  optimystic cluster stop 2 --dir /tmp/optimystic-cluster-1")]
    Stop(NodeControl),
    /// Start stopped node I of a running `cluster up` again, on the same address and data.
    #[command(after_help = "Example:\n  optimystic cluster start 2 --dir /tmp/optimystic-cluster-1")]
    Start(NodeControl),
    /// Stop node I of a running `cluster up` and start it again (same address and data).
    #[command(after_help = "Example:\n  optimystic cluster restart 2 --dir /tmp/optimystic-cluster-1")]
    Restart(NodeControl),
    /// Add a node to a running `cluster up`, bootstrapping from its first running node.
    #[command(after_help = "Example:\n  optimystic cluster add --dir /tmp/optimystic-cluster-1")]
    Add {
        /// The directory `cluster up` printed.
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Which node of which running `cluster up`.
#[derive(Debug, Args)]
struct NodeControl {
    /// The node (1-based, as `cluster up` numbers them).
    node: usize,
    /// The directory `cluster up` printed.
    #[arg(long)]
    dir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (defaults < file < environment < flags) as TOML.
    #[command(after_help = "Example:\n  optimystic config show --config node1.toml")]
    Show(StartArgs),
}

/// Flags of `start` (and `config show`); each overrides the same configuration key.
#[derive(Debug, Args)]
struct StartArgs {
    /// Configuration file (TOML); also `OPTIMYSTIC_CONFIG`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// `node.data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// `node.listen` (repeatable).
    #[arg(long)]
    listen: Vec<String>,
    /// `node.bootstrap` (repeatable).
    #[arg(long)]
    bootstrap: Vec<String>,
    /// `storage.kind`.
    #[arg(long)]
    storage: Option<String>,
    /// `metrics.listen`.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Sets `metrics.enabled = false`.
    #[arg(long)]
    no_metrics: bool,
}

impl StartArgs {
    /// The flags as a nested configuration object (only those given).
    fn overrides(&self) -> Value {
        let mut node = serde_json::Map::new();
        if let Some(dir) = &self.data_dir {
            node.insert("data_dir".into(), json!(dir));
        }
        if !self.listen.is_empty() {
            node.insert("listen".into(), json!(self.listen));
        }
        if !self.bootstrap.is_empty() {
            node.insert("bootstrap".into(), json!(self.bootstrap));
        }
        let mut root = serde_json::Map::new();
        if !node.is_empty() {
            root.insert("node".into(), Value::Object(node));
        }
        if let Some(kind) = &self.storage {
            root.insert("storage".into(), json!({ "kind": kind }));
        }
        let mut metrics = serde_json::Map::new();
        if let Some(listen) = &self.metrics_listen {
            metrics.insert("listen".into(), json!(listen));
        }
        if self.no_metrics {
            metrics.insert("enabled".into(), json!(false));
        }
        if !metrics.is_empty() {
            root.insert("metrics".into(), Value::Object(metrics));
        }
        Value::Object(root)
    }
}

#[derive(Debug, Args)]
struct HistoryArgs {
    /// The node to ask: `<multiaddr>/p2p/<peer id>` (a member of the block's cluster).
    #[arg(long)]
    peer: String,
    /// The block.
    block: String,
    /// First revision to show.
    #[arg(long, default_value_t = 1)]
    from: u64,
    /// One JSON object per revision: {"blockId", "rev", "trxId", "transform", "evidence"}.
    #[arg(long, conflicts_with = "records")]
    json: bool,
    /// Only the evidence records (pend, then commit, of each revision), one JSON document per
    /// line: pipe into `optimystic verify-record`.
    #[arg(long)]
    records: bool,
    /// Deadline of each request.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Protocol id prefix of the network.
    #[arg(long, default_value = optimystic_core::wire::DEFAULT_PROTOCOL_PREFIX)]
    protocol_prefix: String,
}

/// Exit code of a `client write` whose commit was sent and never confirmed: it may or may not
/// have committed (2 means it certainly did not).
const EXIT_OUTCOME_UNKNOWN: u8 = 4;
/// Exit code of a `client get` that named a block that does not exist (the answer is printed), and
/// of a `client write` that updates, deletes or appends to one.
const EXIT_NOT_FOUND: u8 = 3;
/// Exit code of a `client` command stopped by SIGINT or SIGTERM (128 + SIGINT, as shells report).
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format.unwrap_or_default();
    // The demo, the bench and the client print their own output; node logs would bury it.
    let quiet = matches!(
        cli.command,
        Command::Demo(_)
            | Command::Bench(_)
            | Command::Client(_)
            | Command::Status(_)
            | Command::Locate { .. }
            | Command::History(_)
            | Command::Cluster(_)
    );
    init_logging(format, if quiet { "warn" } else { "warn,optimystic=info" });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // One runtime with every driver, never paused, owns every libp2p timer: libp2p's per-stream
    // timeouts can live in its timer wheel (vendor/futures-timer/PATCH.md).
    futures_timer::use_tokio_timers(true);
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and each of its causes, every one said once.
pub(crate) fn error_text(error: &anyhow::Error) -> String {
    error_text::chain_text(error.chain())
}

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Colours only for a person at a terminal: not in files, pipes or log collectors.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Plugins { verbose, config } => {
            let mut registry = link_bundled_plugins();
            if let Some(path) = config {
                let loaded = config::extract(Some(&path), &json!({}))?;
                optimystic_dynamic_loader::load_all(&loaded.plugins.load, &mut registry)?;
            }
            for entry in registry.entries() {
                if verbose {
                    println!("{} {}\t{}\t({})", entry.kind(), entry.name, entry.description, entry.origin);
                } else {
                    println!("{} {}", entry.kind(), entry.name);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::VerifyRecord { file, check_expiration } => verify_records(file, check_expiration),
        Command::Config(ConfigCommand::Show(args)) => {
            let registry = registry_for(args.config.as_deref(), &args.overrides())?;
            let loaded = config::load(args.config.as_deref(), &args.overrides(), &registry)?;
            let shown = loaded.with_plugin_defaults(&registry);
            print!("{}", toml::to_string_pretty(&shown).context("printing the configuration")?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Start(args) => start(args).await,
        Command::Client(args) => client::client(args).await,
        Command::Cluster(command) => {
            let (dir, line) = match command {
                ClusterCommand::Up(options) => {
                    let exe = std::env::current_exe().context("finding this program to start the nodes")?;
                    let program = std::env::args().next().unwrap_or_else(|| "optimystic".to_owned());
                    cluster_up::run(&options, &exe, &program).await?;
                    return Ok(ExitCode::SUCCESS);
                }
                ClusterCommand::Stop(n) => (n.dir, format!("stop {}", n.node)),
                ClusterCommand::Start(n) => (n.dir, format!("start {}", n.node)),
                ClusterCommand::Restart(n) => (n.dir, format!("restart {}", n.node)),
                ClusterCommand::Add { dir } => (dir, "add".to_owned()),
            };
            println!("{}", cluster_up::control(&dir, &line).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::History(args) => history(args).await,
        Command::Demo(options) => {
            demo::run(options, link_bundled_plugins()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(options) => {
            bench::run(options, link_bundled_plugins()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => operator_command(args, OperatorRequest::Status).await,
        Command::Locate { operator, id } => {
            let block_id = BlockId::new(id)?;
            operator_command(operator, OperatorRequest::Locate { block_id }).await
        }
    }
}

/// The linked plugins plus the configuration's dynamic libraries.
fn registry_for(file: Option<&Path>, overrides: &Value) -> anyhow::Result<Registry> {
    let mut registry = link_bundled_plugins();
    let raw = config::extract(file, overrides)?;
    optimystic_dynamic_loader::load_all(&raw.plugins.load, &mut registry)?;
    Ok(registry)
}

async fn start(args: StartArgs) -> anyhow::Result<ExitCode> {
    let overrides = args.overrides();
    let registry = registry_for(args.config.as_deref(), &overrides)?;
    let loaded = config::load(args.config.as_deref(), &overrides, &registry)?;
    loaded.check_data_dir()?;
    let node = Node::start(&loaded.config, &registry).await?;
    let mut out = std::io::stdout().lock();
    for addr in node.p2p_addrs() {
        writeln!(out, "listening {addr}")?;
    }
    if let Some(addr) = node.metrics_addr() {
        writeln!(out, "metrics http://{addr}/metrics")?;
    }
    out.flush()?;
    drop(out);
    let announce = tokio::spawn(announce_ready(node.readiness(), node.peer_id()));
    wait_for_signal()?.await?;
    announce.abort();
    tracing::info!("stopping");
    node.shutdown().await?;
    Ok(ExitCode::SUCCESS)
}

/// Installs the SIGINT and SIGTERM handlers now (from here on neither kills the process) and
/// gives a future that ends at the first of them.
fn wait_for_signal() -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok(())
    })
}

/// A client host (a fresh identity, listening nowhere) that knows the address of `peer_text`
/// (`<multiaddr>/p2p/<peer id>`), and that peer's id.
pub(crate) async fn connect(
    peer_text: &str,
    timeout_ms: u64,
    protocol_prefix: &str,
) -> anyhow::Result<(HostHandle, PeerId)> {
    let addr: Multiaddr = peer_text.parse().with_context(|| format!("--peer {peer_text:?}"))?;
    let Some(Protocol::P2p(peer)) = addr.iter().last() else {
        bail!("--peer must end with /p2p/<peer id>");
    };
    let mut host_config = HostConfig::new(identity::generate());
    host_config.protocol_prefix = protocol_prefix.to_owned();
    host_config.request_timeout_ms = timeout_ms;
    let host = Host::start(host_config, Handlers::default()).await?;
    host.add_address(peer, addr).await?;
    Ok((host, peer))
}

async fn history(args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let block_id = BlockId::new(args.block.clone())?;
    let (host, peer) = connect(&args.peer, args.timeout_ms, &args.protocol_prefix).await?;
    let timeout = std::time::Duration::from_millis(args.timeout_ms);
    let mut pages = history::Pages::new(&host, peer, block_id.clone(), args.from, timeout);
    let result = print_history(&mut pages, &block_id, &args).await;
    let latest = pages.latest().cloned();
    host.shutdown().await;
    match result {
        // The reader went away (`| head`): what it wanted was printed.
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) => {
            return Ok(ExitCode::SUCCESS);
        }
        other => other?,
    }
    if latest.is_none() {
        eprintln!(
            "not found: {block_id} (the peer holds no revision of it: no such block, or the peer is not in its cluster)"
        );
        return Ok(ExitCode::from(EXIT_NOT_FOUND));
    }
    Ok(ExitCode::SUCCESS)
}

async fn print_history(pages: &mut history::Pages<'_>, block_id: &BlockId, args: &HistoryArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let mut shown = 0usize;
    while let Some(entries) = pages.next().await? {
        if shown == 0
            && !args.json
            && !args.records
            && let Some(latest) = pages.latest()
        {
            writeln!(out, "block {block_id}: latest rev {} (trx {})", latest.rev, latest.trx_id)?;
        }
        for entry in &entries {
            if args.records {
                for record in history::records(entry) {
                    writeln!(out, "{}", serde_json::to_string(record)?)?;
                }
            } else if args.json {
                writeln!(out, "{}", history::json_line(block_id, entry))?;
            } else {
                write!(out, "{}", history::text(entry))?;
            }
        }
        shown += entries.len();
        out.flush()?;
    }
    if shown == 0
        && !args.json
        && !args.records
        && let Some(latest) = pages.latest()
    {
        writeln!(out, "block {block_id}: latest rev {}; no revision from {} on", latest.rev, args.from)?;
    }
    Ok(())
}

/// Splits input into records: one JSON document, or JSON Lines.
fn read_documents(file: Option<PathBuf>) -> anyhow::Result<Vec<String>> {
    let mut text = String::new();
    match &file {
        Some(path) => {
            text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        }
        None => {
            std::io::stdin().lock().read_to_string(&mut text).context("reading stdin")?;
        }
    }
    if serde_json::from_str::<Value>(&text).is_ok() {
        return Ok(vec![text]);
    }
    Ok(text.as_bytes().lines().map_while(Result::ok).filter(|l| !l.trim().is_empty()).collect())
}

fn verify_records(file: Option<PathBuf>, check_expiration: bool) -> anyhow::Result<ExitCode> {
    let documents = read_documents(file)?;
    if documents.is_empty() {
        bail!("no records in the input");
    }
    let now = check_expiration.then(now_ms);
    let mut all_ok = true;
    for doc in documents {
        let hash_hint = serde_json::from_str::<Value>(&doc)
            .ok()
            .and_then(|v| v.get("messageHash").and_then(|h| h.as_str()).map(str::to_owned))
            .unwrap_or_else(|| "?".to_owned());
        match ClusterRecord::from_json(&doc).and_then(|r| r.verify(now).map(|()| r)) {
            Ok(record) => println!("ok {}", record.message_hash),
            Err(e) => {
                all_ok = false;
                println!("invalid {hash_hint}: {e}");
            }
        }
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Flags of `status` and `locate`.
#[derive(Debug, Args)]
struct OperatorArgs {
    /// The node to ask: `<multiaddr>/p2p/<peer id>`.
    #[arg(long)]
    peer: String,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
    /// Deadline of the request.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Protocol id prefix of the network.
    #[arg(long, default_value = optimystic_core::wire::DEFAULT_PROTOCOL_PREFIX)]
    protocol_prefix: String,
}

/// Prints `ready <peer id>` once, when the node first becomes ready.
async fn announce_ready(
    mut readiness: tokio::sync::watch::Receiver<optimystic_node::readiness::Readiness>,
    peer: PeerId,
) {
    if readiness.wait_for(|r| r.ready).await.is_ok() {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready {peer}");
        let _ = out.flush();
    }
}

/// Sends one operator request to `--peer` and prints the answer (JSON with `--json`).
async fn operator_command(args: OperatorArgs, request: OperatorRequest) -> anyhow::Result<ExitCode> {
    let addr: Multiaddr = args.peer.parse().with_context(|| format!("--peer {:?}", args.peer))?;
    let Some(Protocol::P2p(peer)) = addr.iter().last() else {
        bail!("--peer must end with /p2p/<peer id>");
    };
    let mut host_config = HostConfig::new(identity::generate());
    host_config.protocol_prefix = args.protocol_prefix.clone();
    host_config.request_timeout_ms = args.timeout_ms;
    let host = Host::start(host_config, Handlers::default()).await?;
    let answer = match host.add_address(peer, addr).await {
        Ok(()) => ops::ask(&host, peer, &request, args.timeout_ms).await.map_err(anyhow::Error::from),
        Err(e) => Err(e.into()),
    };
    host.shutdown().await;
    let answer = answer.with_context(|| format!("asking {}", args.peer))?;
    let text = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&answer)?)
    } else {
        match request {
            OperatorRequest::Status => ops::decode::<ops::NodeStatus>(answer)?.to_text(),
            OperatorRequest::Locate { .. } => ops::decode::<ops::Location>(answer)?.to_text(),
        }
    };
    // A reader that stops early (`| head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing the answer"),
        _ => Ok(ExitCode::SUCCESS),
    }
}

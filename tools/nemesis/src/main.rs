//! `optimystic-nemesis`: `run` a soak pass, `check` a history, `cleanup` leftovers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use optimystic_nemesis::net::{Guard, Resources};
use optimystic_nemesis::run::{Fault, RunOptions};
use optimystic_nemesis::{checker, history, run};

#[derive(Debug, Parser)]
#[command(name = "optimystic-nemesis", version, about = "Nemesis soak harness and history checker for optimystic")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a cluster in network namespaces, run the list-append workload under faults, check it.
    #[command(after_help = "Examples:\n  optimystic-nemesis run --seconds 120 --seed 7\n  \
        optimystic-nemesis run --faults kill --seconds 600 --bin target/release/optimystic\n\n\
        Exit status: 0 valid history, 1 violations found, 2 the harness failed, 130 interrupted.")]
    Run(RunArgs),
    /// Check a history file; prints totals and the first violation. Exit 1 on a violation.
    #[command(after_help = "Example:\n  optimystic-nemesis check /tmp/optimystic-nemesis-7-1234/history.jsonl")]
    Check {
        /// The history (JSON lines).
        file: PathBuf,
        /// Violation kinds to report without failing, comma-separated (e.g. no-final-read).
        #[arg(long, value_delimiter = ',')]
        allow: Vec<String>,
    },
    /// Remove namespaces (and the processes inside them) left by harness runs that were killed.
    Cleanup {
        /// Also those of harness processes that are still running.
        #[arg(long)]
        all: bool,
    },
    /// GET http://ADDR/PATH and print the body (used inside the hub namespace for metrics).
    #[command(hide = true)]
    HttpGet { addr: String, path: String },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Nodes.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Peers per block cluster.
    #[arg(long, default_value_t = 3)]
    cluster_size: usize,
    /// Blocks the workload appends to.
    #[arg(long, default_value_t = 4)]
    blocks: usize,
    /// Concurrent client tasks.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Length of the fault phase, in seconds.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Seed of the fault schedule (printed at start; random when absent).
    #[arg(long)]
    seed: Option<u64>,
    /// Faults to inject, comma-separated.
    #[arg(long, default_value = "kill,pause,isolate,split,churn", value_delimiter = ',')]
    faults: Vec<String>,
    /// The optimystic binary (default: target/debug/optimystic next to this binary).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Output directory (history.jsonl, check.txt, node logs).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not use network namespaces (127.0.0.1; kill, pause and churn only).
    #[arg(long)]
    no_netns: bool,
    /// Deadline of one client process, in ms; it is killed after it and the operation is unknown.
    #[arg(long, default_value_t = 20_000)]
    op_timeout_ms: u64,
    /// The client's own --timeout-ms.
    #[arg(long, default_value_t = 5_000)]
    client_timeout_ms: u64,
    /// Quiet time between faults, lower bound in ms.
    #[arg(long, default_value_t = 2_000)]
    gap_min_ms: u64,
    /// Quiet time between faults, upper bound in ms.
    #[arg(long, default_value_t = 6_000)]
    gap_max_ms: u64,
    /// Longest wait for the replicas to converge at the end, in seconds.
    #[arg(long, default_value_t = 90)]
    settle_secs: u64,
    /// Violation kinds to report without failing, comma-separated (e.g. no-final-read).
    #[arg(long, value_delimiter = ',')]
    allow: Vec<String>,
}

fn default_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("optimystic")))
        .unwrap_or_else(|| PathBuf::from("target/debug/optimystic"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Check { file, allow } => match history::load(&file) {
            Ok(events) => {
                let mut report = checker::check(&events);
                report.tolerate(&allow);
                print!("{}", report.render());
                if report.valid() { ExitCode::SUCCESS } else { ExitCode::from(1) }
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
        Cmd::Cleanup { all } => {
            let n = run::cleanup_stale(all);
            println!("removed {n} namespace(s)");
            ExitCode::SUCCESS
        }
        Cmd::HttpGet { addr, path } => match run::http_get(&addr, &path, Duration::from_secs(3)) {
            Ok(body) => {
                print!("{body}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
        Cmd::Run(args) => run_command(args),
    }
}

fn run_command(args: RunArgs) -> ExitCode {
    let allow = args.allow.clone();
    let faults = match args
        .faults
        .iter()
        .filter(|f| !f.trim().is_empty())
        .map(|f| Fault::parse(f))
        .collect::<anyhow::Result<Vec<_>>>()
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let opts = RunOptions {
        nodes: args.nodes,
        cluster_size: args.cluster_size,
        blocks: args.blocks,
        clients: args.clients,
        seconds: args.seconds,
        seed: args.seed,
        faults,
        bin: args.bin.unwrap_or_else(default_bin),
        out: args.out,
        no_netns: args.no_netns,
        op_timeout_ms: args.op_timeout_ms,
        client_timeout_ms: args.client_timeout_ms,
        gap_min_ms: args.gap_min_ms,
        gap_max_ms: args.gap_max_ms,
        settle_secs: args.settle_secs,
    };
    // Namespaces of earlier runs whose harness was SIGKILLed.
    let stale = run::cleanup_stale(false);
    if stale > 0 {
        eprintln!("optimystic-nemesis: removed {stale} namespace(s) left by earlier runs");
    }
    let res = Arc::new(Resources::default());
    // Drops (and so cleans up) on every way out of this function, panics included.
    let guard = Guard(res.clone());
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return Err(anyhow::anyhow!("cannot install the signal handlers"));
        };
        tokio::select! {
            r = run::run(opts, res.clone()) => r.map(Some),
            _ = term.recv() => Ok(None),
            _ = int.recv() => Ok(None),
        }
    });
    // Processes and namespaces go first, then the runtime (without waiting for its tasks).
    res.cleanup();
    runtime.shutdown_timeout(Duration::from_secs(1));
    drop(guard);
    match outcome {
        Ok(None) => {
            eprintln!("optimystic-nemesis: interrupted; every process and namespace was removed");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Ok(Some(summary)) => {
            let events = match history::load(&summary.history) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let mut report = checker::check(&events);
            report.tolerate(&allow);
            let faults: Vec<String> = summary.faults.iter().map(|(k, n)| format!("{k}={n}")).collect();
            let mut text = format!(
                "seed: {}\nnamespaces: {}\nfaults injected: {}\nreplicas converged before the final reads: {}\n",
                summary.seed,
                summary.netns,
                if faults.is_empty() { "none".into() } else { faults.join(" ") },
                summary.converged
            );
            text.push_str(&report.render());
            print!("{text}");
            let _ = std::fs::write(summary.out.join("check.txt"), &text);
            println!("history: {}", summary.history.display());
            if report.valid() { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
    }
}

//! The crash test's child: `crash_child <file|lmdb> <data dir> <seed>` opens a [`StorageRepo`]
//! over the engine on the directory and pends and commits transactions until it is killed,
//! printing every acknowledged commit (after `commit` returned) as one JSON line on stdout.
//! Errors go to stderr with a non-zero exit.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use optimystic_core::repo::StorageRepo;
use optimystic_tests::crash::{Engine, run_workload};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: crash_child <file|lmdb> <data dir> <seed>";
    let engine = Engine::parse(&args.next().context(usage)?)?;
    let dir = PathBuf::from(args.next().context(usage)?);
    let seed: u64 = args.next().context(usage)?.parse().context("the seed must be a u64")?;

    let repo = StorageRepo::new(engine.open(&dir)?);
    let stdout = std::io::stdout();
    run_workload(&repo, seed, |ack| {
        let mut line = serde_json::to_string(ack)?;
        line.push('\n');
        // One write per line, flushed before the next transaction starts.
        let mut out = stdout.lock();
        out.write_all(line.as_bytes())?;
        out.flush()?;
        Ok(())
    })
    .await
}

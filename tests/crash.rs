//! Crash test of the durable storage engines: a child process (`crash_child`) commits
//! transactions through a `StorageRepo` and acknowledges each on stdout; the test kills it with
//! SIGKILL at a random moment after its first acknowledgement, then reopens the directory and
//! checks that every acknowledged commit is there at its revision, that no block is torn (its
//! materialized value equals the replay of its committed transforms) and that no transaction is
//! both pending and committed. Then it restarts the child on the same directory, and so on.
//!
//! - `OPTIMYSTIC_CRASH_CYCLES` — kill cycles per engine (default 50).
//! - `OPTIMYSTIC_CRASH_SEED` — replays a run: the seed is printed at the start and in every failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use optimystic_tests::crash::{Ack, Engine, verify};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DEFAULT_CYCLES: usize = 50;
/// The kill comes this long (at most) after the child's first acknowledgement.
const MAX_KILL_DELAY_MS: u64 = 150;
/// A child that acknowledges nothing for this long is stuck (a failure, not a synchronization).
const FIRST_ACK_TIMEOUT: Duration = Duration::from_secs(60);

fn cycles() -> usize {
    std::env::var("OPTIMYSTIC_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CYCLES)
}

fn seed() -> u64 {
    match std::env::var("OPTIMYSTIC_CRASH_SEED") {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("OPTIMYSTIC_CRASH_SEED={v:?} is not a u64")),
        Err(_) => rand::random(),
    }
}

/// A line from the child: complete lines only (a kill can cut the last one).
enum Line {
    Ack(Ack),
    Eof,
}

/// Runs one child until it is killed; returns its acknowledgements.
fn one_cycle(engine: Engine, dir: &Path, child_seed: u64, kill_delay: Duration) -> anyhow::Result<Vec<Ack>> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crash_child"))
        .arg(engine.name())
        .arg(dir)
        .arg(child_seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning crash_child")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut stderr = child.stderr.take().context("child stderr")?;
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || -> anyhow::Result<()> {
        let mut lines = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            if lines.read_line(&mut line)? == 0 || !line.ends_with('\n') {
                let _ = tx.send(Line::Eof);
                return Ok(());
            }
            let ack: Ack = serde_json::from_str(&line).with_context(|| format!("bad ack line {line:?}"))?;
            if tx.send(Line::Ack(ack)).is_err() {
                return Ok(());
            }
        }
    });

    let mut acks = Vec::new();
    match rx.recv_timeout(FIRST_ACK_TIMEOUT) {
        Ok(Line::Ack(ack)) => acks.push(ack),
        first => {
            let _ = child.kill();
            let _ = child.wait();
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err);
            bail!(
                "the child acknowledged nothing ({}); its stderr: {err}",
                if first.is_err() { "timed out" } else { "it exited" }
            );
        }
    }
    // The random kill delay: the only sleep, and it is the point of the test.
    thread::sleep(kill_delay);
    let early_exit = child.try_wait()?;
    child.kill().context("killing the child")?;
    child.wait()?;
    if let Some(status) = early_exit {
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err);
        bail!("the child exited by itself with {status}; its stderr: {err}");
    }
    // Everything acknowledged before the kill is in the pipe; the reader stops at end of file.
    while let Ok(Line::Ack(ack)) = rx.recv() {
        acks.push(ack);
    }
    reader.join().map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    Ok(acks)
}

/// The engines run one at a time: a child forked for one engine inherits, until its `exec`, the
/// open lock file of a store the other engine's verification holds at that moment, and that would
/// make the next child of that engine find its directory locked.
static ONE_ENGINE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn crash_test(engine: Engine) {
    let _serial = ONE_ENGINE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let seed = seed();
    let cycles = cycles();
    eprintln!("crash test {}: seed {seed} (replay with OPTIMYSTIC_CRASH_SEED={seed}), {cycles} cycles", engine.name());
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join(engine.name());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut all_acks: Vec<Ack> = Vec::new();
    let mut last = Default::default();
    for cycle in 0..cycles {
        let child_seed: u64 = rng.r#gen();
        let delay = Duration::from_millis(rng.gen_range(0..=MAX_KILL_DELAY_MS));
        let result = one_cycle(engine, &data, child_seed, delay).and_then(|acks| {
            all_acks.extend(acks);
            runtime.block_on(async {
                let storage = engine.open(&data)?;
                let verified = verify(&storage, &all_acks).await;
                storage.close().await?;
                verified
            })
        });
        match result {
            Ok(verified) => last = verified,
            Err(e) => panic!(
                "crash test {} failed in cycle {cycle} (seed {seed}, replay with OPTIMYSTIC_CRASH_SEED={seed}): {e:#}",
                engine.name()
            ),
        }
    }
    eprintln!(
        "crash test {}: {cycles} kills, {} acknowledged commits, {} blocks with {} revisions verified, in {:.1?}",
        engine.name(),
        all_acks.len(),
        last.blocks,
        last.revisions,
        started.elapsed()
    );
    assert!(all_acks.len() >= cycles, "every cycle acknowledges at least one commit");
}

#[test]
fn file_engine_survives_sigkill() {
    crash_test(Engine::File);
}

#[test]
fn lmdb_engine_survives_sigkill() {
    crash_test(Engine::Lmdb);
}

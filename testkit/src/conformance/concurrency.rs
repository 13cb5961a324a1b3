//! Random concurrent pend / commit / cancel / get on overlapping blocks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::support::{Harness, Tx, bid, check_block_invariants, opts, set, splice, tid};
use super::{CONCURRENT_TASKS, DEFAULT_OPS_PER_TASK, Fixture, OPS_ENV, SEED_ENV};
use optimystic_core::error::RepoError;
use optimystic_core::model::{BlockGets, BlockOperation, CommitResult, PendPolicy, PendResult, TrxContext, TrxRev};
use optimystic_core::repo::Repo;

const BLOCKS: [&str; 4] = ["c0", "c1", "c2", "c3"];

/// A transaction a worker pended.
#[derive(Clone, Debug)]
struct Trx {
    id: String,
    blocks: Vec<&'static str>,
    rev: u64,
}

/// What a worker did.
#[derive(Debug, Default)]
struct WorkerLog {
    /// Every trx whose pend succeeded.
    pended: Vec<Trx>,
    /// Commits answered success: (trx, blocks, rev).
    acked: Vec<Trx>,
    /// Trxs still pending at the end.
    leftover: Vec<Trx>,
    stale_pends: usize,
    invalid_pends: usize,
    stale_commits: usize,
    invalid_commits: usize,
    /// Commits refused as a revision gap (SPEC 2 item 7): a block of the trx was not at `rev - 1`.
    gap_commits: usize,
    /// Single-block trxs committed to bring a block level with another before a two-block pend.
    fillers: usize,
    cancels: usize,
    reads: usize,
}

/// The seed: from [`SEED_ENV`] if set, else random.
fn seed() -> u64 {
    match std::env::var(SEED_ENV) {
        Ok(text) => text.trim().parse().unwrap_or_else(|e| panic!("{SEED_ENV}={text:?} is not a u64: {e}")),
        Err(_) => rand::random(),
    }
}

/// Operations per task: from [`OPS_ENV`] if set, else [`DEFAULT_OPS_PER_TASK`].
fn ops_per_task() -> usize {
    match std::env::var(OPS_ENV) {
        Ok(text) => text.trim().parse().unwrap_or_else(|e| panic!("{OPS_ENV}={text:?} is not a count: {e}")),
        Err(_) => DEFAULT_OPS_PER_TASK,
    }
}

/// `max(latest.rev) + 1` over some blocks.
async fn next_rev(h: &Harness, blocks: &[&str]) -> Result<u64, String> {
    let mut rev = 0;
    for id in blocks {
        let latest = h.raw().latest(&bid(id)).await.map_err(|e| format!("latest of {id}: {e}"))?;
        rev = rev.max(latest.map_or(0, |l| l.rev));
    }
    Ok(rev + 1)
}

/// The update of one block by `trx`: pushes `trx` on the block's log and names it in `last`,
/// sometimes trimming the log or appending at its end (valid now; past the end if the log shrinks
/// before the commit).
async fn ops_for(h: &Harness, rng: &mut StdRng, trx: &str, id: &str) -> Result<Vec<BlockOperation>, String> {
    let value = h.repo.latest_value(&bid(id)).await.map_err(|e| format!("value of {id}: {e}"))?.1;
    let len = value.as_ref().and_then(|b| b.fields.get("log")).and_then(Value::as_array).map_or(0, Vec::len) as u64;
    let mut ops = Vec::new();
    let mut len_after = len;
    if rng.gen_bool(0.15) {
        ops.push(splice("log", 0, 2, json!([])));
        len_after = len.saturating_sub(2);
    }
    if rng.gen_bool(0.2) {
        ops.push(splice("log", len_after, 0, json!(["tail"])));
    }
    ops.push(splice("log", 0, 0, json!([trx])));
    ops.push(set("last", json!(trx)));
    Ok(ops)
}

/// Revisions are contiguous (SPEC 2 item 7): a trx on two blocks commits only when both are at the
/// same revision. Before most two-block pends, commits single-block "filler" trxs on the block
/// that is behind until the two are level (other tasks move them too: a few tries at most).
/// Fillers that commit are logged as pended and acknowledged; the others are cancelled.
async fn level(
    h: &Harness,
    rng: &mut StdRng,
    trx: &str,
    blocks: &[&'static str],
    log: &mut WorkerLog,
) -> Result<(), String> {
    for attempt in 0..4 {
        let mut revs = Vec::new();
        for id in blocks {
            let latest = h.raw().latest(&bid(id)).await.map_err(|e| format!("latest of {id}: {e}"))?;
            revs.push((latest.map_or(0, |l| l.rev), *id));
        }
        revs.sort_unstable();
        let (Some(&(low, behind)), Some(&(high, _))) = (revs.first(), revs.last()) else { return Ok(()) };
        if low == high {
            return Ok(());
        }
        let filler = format!("{trx}-fill{attempt}");
        let rev = low + 1;
        let transforms = Tx::new().update(behind, ops_for(h, rng, &filler, behind).await?).build();
        match h.pend(&filler, Some(rev), transforms, PendPolicy::Continue).await {
            Ok(PendResult::Success(_)) => {}
            Ok(PendResult::Stale(_)) | Err(RepoError::InvalidTransform { .. }) => continue,
            Err(e) => return Err(format!("pend of filler {filler} on {behind} at {rev}: unexpected error {e}")),
        }
        let filled = Trx { id: filler.clone(), blocks: vec![behind], rev };
        log.pended.push(filled.clone());
        match h.commit(&filler, &[behind], rev).await {
            Ok(CommitResult::Success(_)) => {
                log.acked.push(filled);
                log.fillers += 1;
            }
            Ok(CommitResult::Stale(_)) | Err(RepoError::InvalidTransform { .. }) => {
                h.cancel(&filler, &[behind]).await;
            }
            Err(e) => return Err(format!("commit of filler {filler} on {behind} at {rev}: unexpected error {e}")),
        }
    }
    Ok(())
}

async fn do_pend(h: &Harness, rng: &mut StdRng, trx: String, log: &mut WorkerLog) -> Result<Option<Trx>, String> {
    let count = if rng.gen_bool(0.5) { 1 } else { 2 };
    let mut blocks: Vec<&'static str> = BLOCKS.choose_multiple(rng, count).copied().collect();
    blocks.sort_unstable();
    if blocks.len() > 1 && rng.gen_bool(0.8) {
        level(h, rng, &trx, &blocks, log).await?;
    }
    let rev = next_rev(h, &blocks).await?;
    let mut tx = Tx::new();
    for id in &blocks {
        tx = tx.update(id, ops_for(h, rng, &trx, id).await?);
    }
    let policy = match rng.gen_range(0..100) {
        0..70 => PendPolicy::Continue,
        70..85 => PendPolicy::Fail,
        _ => PendPolicy::Return,
    };
    let pend_rev = rng.gen_bool(0.8).then_some(rev);
    match h.pend(&trx, pend_rev, tx.build(), policy).await {
        Ok(PendResult::Success(s)) => {
            let expected: Vec<_> = blocks.iter().map(|b| bid(b)).collect();
            if s.block_ids != expected {
                return Err(format!("pend {trx}: blockIds {:?}, expected {expected:?}", s.block_ids));
            }
            Ok(Some(Trx { id: trx, blocks, rev }))
        }
        Ok(PendResult::Stale(_)) => {
            log.stale_pends += 1;
            Ok(None)
        }
        Err(RepoError::InvalidTransform { .. }) => {
            log.invalid_pends += 1;
            Ok(None)
        }
        Err(e) => Err(format!("pend {trx} on {blocks:?} (rev {pend_rev:?}, {policy:?}): unexpected error {e}")),
    }
}

async fn worker(h: Arc<Harness>, task: usize, seed: u64, ops: usize, notify: Arc<Notify>) -> Result<WorkerLog, String> {
    let mut rng = StdRng::seed_from_u64(seed ^ (task as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut log = WorkerLog::default();
    let mut pending: Vec<Trx> = Vec::new();
    for op in 0..ops {
        let roll = rng.gen_range(0..100);
        if roll < 40 || pending.is_empty() {
            if let Some(trx) = do_pend(&h, &mut rng, format!("w{task}-{op}"), &mut log).await? {
                log.pended.push(trx.clone());
                pending.push(trx);
            }
        } else if roll < 75 {
            let trx = pending.swap_remove(rng.gen_range(0..pending.len()));
            let rev = if rng.gen_bool(0.5) { trx.rev } else { next_rev(&h, &trx.blocks).await? };
            let mut order = trx.blocks.clone();
            order.shuffle(&mut rng);
            let result = h.commit(&trx.id, &order, rev).await;
            let refused = match &result {
                Ok(CommitResult::Success(_)) => {
                    log.acked.push(Trx { rev, ..trx.clone() });
                    false
                }
                Ok(CommitResult::Stale(_)) => {
                    log.stale_commits += 1;
                    true
                }
                Err(RepoError::InvalidTransform { .. }) => {
                    log.invalid_commits += 1;
                    true
                }
                Err(RepoError::BadRequest(message)) if message.contains("revision gap") => {
                    log.gap_commits += 1;
                    true
                }
                Err(e) => return Err(format!("commit {} at {rev} on {order:?}: unexpected error {e}", trx.id)),
            };
            if refused {
                if rng.gen_bool(0.5) {
                    h.cancel(&trx.id, &trx.blocks).await;
                    log.cancels += 1;
                } else {
                    pending.push(trx);
                }
            }
        } else if roll < 88 {
            let trx = pending.swap_remove(rng.gen_range(0..pending.len()));
            h.cancel(&trx.id, &trx.blocks).await;
            h.cancel(&format!("never-{task}-{op}"), &trx.blocks).await;
            log.cancels += 1;
        } else {
            log.reads += 1;
            let id = *BLOCKS.choose(&mut rng).unwrap_or(&"c0");
            let at = rng.gen_range(0..=next_rev(&h, &[id]).await?);
            let read = h.read_one(id, Some(at)).await;
            // The value read names (in `last`) a trx committed on the block at or before `at`.
            if let Some(Value::String(last)) = read.block.as_ref().and_then(|b| b.fields.get("last")) {
                let committed = h.raw().committed(&bid(id), &tid(last)).await.map_err(|e| e.to_string())?;
                if committed.as_ref().is_none_or(|c| c.rev > at) {
                    return Err(format!("read of {id} at {at} shows {last}, committed {committed:?}"));
                }
            }
            // Own writes of a trx still pending.
            if let Some(mine) = pending.choose(&mut rng) {
                let gets = BlockGets {
                    block_ids: mine.blocks.iter().map(|b| bid(b)).collect(),
                    context: Some(TrxContext { committed: Vec::new(), rev: u64::MAX, trx_id: Some(tid(&mine.id)) }),
                    read_mode: None,
                };
                match h.repo.get(&gets, &opts()).await {
                    Ok(_) | Err(RepoError::InvalidTransform { .. }) => {}
                    Err(e) => return Err(format!("own-writes read of {} on {:?}: {e}", mine.id, mine.blocks)),
                }
            }
        }
        notify.notify_one();
    }
    log.leftover = pending;
    Ok(log)
}

/// Checks, whenever a worker did something, that `latest.rev` of every block never went down
/// and that `latest` reads. Returns the number of rounds.
async fn watch(h: Arc<Harness>, stop: Arc<AtomicBool>, notify: Arc<Notify>) -> Result<u64, String> {
    let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
    let mut rounds = 0;
    loop {
        let last_round = stop.load(Ordering::SeqCst);
        for id in BLOCKS {
            let latest = h.raw().latest(&bid(id)).await.map_err(|e| format!("latest of {id}: {e}"))?;
            let rev = latest.map_or(0, |l| l.rev);
            let previous = seen.insert(id, rev).unwrap_or(0);
            if rev < previous {
                return Err(format!("latest.rev of {id} went down from {previous} to {rev}"));
            }
            let read = h.get(&[id], None).await.map_err(|e| format!("read of {id} at latest: {e}"))?;
            let state_rev = read.get(&bid(id)).and_then(|r| r.state.latest.as_ref()).map_or(0, |l| l.rev);
            if state_rev < rev {
                return Err(format!("get of {id} reports latest.rev {state_rev} after the engine reported {rev}"));
            }
        }
        rounds += 1;
        if last_round {
            return Ok(rounds);
        }
        notify.notified().await;
    }
}

/// Several tasks pend, commit, cancel and read at random on overlapping blocks with a seeded RNG
/// ([`SEED_ENV`] replays, [`OPS_ENV`] sets the operations per task). While they run, a watcher
/// checks that `latest.rev` never goes down. Afterwards every acknowledged commit is readable at
/// its revision on all its blocks, every other trx is committed nowhere, no trx is both pending
/// and committed on a block, and every revision equals a replay of the committed transforms.
pub async fn concurrent_random_operations_keep_invariants(fixture: Fixture) {
    let seed = seed();
    let ops = ops_per_task();
    let replay = format!("seed {seed} (replay with {SEED_ENV}={seed})");
    eprintln!("conformance concurrency: {CONCURRENT_TASKS} tasks x {ops} ops, {replay}");
    let h = Arc::new(Harness::new(fixture));
    let mut init = Tx::new();
    for id in BLOCKS {
        init = init.insert(id, json!({"log": [], "last": null}));
    }
    h.apply("init", 1, init.build()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let notify = Arc::new(Notify::new());
    let watcher = tokio::spawn(watch(h.clone(), stop.clone(), notify.clone()));
    let workers: Vec<_> =
        (0..CONCURRENT_TASKS).map(|task| tokio::spawn(worker(h.clone(), task, seed, ops, notify.clone()))).collect();
    let mut logs = Vec::new();
    let mut failures = Vec::new();
    for (task, joined) in futures::future::join_all(workers).await.into_iter().enumerate() {
        match joined {
            Ok(Ok(log)) => logs.push(log),
            Ok(Err(e)) => failures.push(format!("task {task}: {e}")),
            Err(e) => failures.push(format!("task {task} panicked: {e}")),
        }
    }
    stop.store(true, Ordering::SeqCst);
    notify.notify_one();
    let rounds = match watcher.await {
        Ok(Ok(rounds)) => rounds,
        Ok(Err(e)) => panic!("{replay}: watcher: {e}"),
        Err(e) => panic!("{replay}: watcher panicked: {e}"),
    };
    assert!(failures.is_empty(), "{replay}: {failures:#?}");

    let acked: Vec<&Trx> = logs.iter().flat_map(|l| &l.acked).collect();
    let sum = |f: fn(&WorkerLog) -> usize| logs.iter().map(f).sum::<usize>();
    eprintln!(
        "conformance concurrency: {} pended, {} committed ({} on two blocks, {} fillers), {} stale / {} invalid \
         pends, {} stale / {} invalid / {} revision-gap commits, {} cancels, {} reads, {rounds} watcher rounds",
        sum(|l| l.pended.len()),
        acked.len(),
        acked.iter().filter(|t| t.blocks.len() > 1).count(),
        sum(|l| l.fillers),
        sum(|l| l.stale_pends),
        sum(|l| l.invalid_pends),
        sum(|l| l.stale_commits),
        sum(|l| l.invalid_commits),
        sum(|l| l.gap_commits),
        sum(|l| l.cancels),
        sum(|l| l.reads),
    );
    assert!(!acked.is_empty(), "{replay}: no commit succeeded; the rule tested nothing");

    // Every acknowledged commit is readable at its revision on all its blocks.
    for trx in &acked {
        for id in &trx.blocks {
            let block_id = bid(id);
            let committed = h.raw().committed(&block_id, &tid(&trx.id)).await.expect("committed");
            assert_eq!(committed.map(|c| c.rev), Some(trx.rev), "{replay}: acked {} on {id}", trx.id);
            let log = h.raw().revisions(&block_id, trx.rev, trx.rev).await.expect("revisions");
            assert_eq!(
                log,
                vec![TrxRev { trx_id: tid(&trx.id), rev: trx.rev }],
                "{replay}: log of {id} at {}",
                trx.rev
            );
            let value = h.value(id, Some(trx.rev)).await;
            let last = value.as_ref().and_then(|b| b.fields.get("last")).cloned();
            assert_eq!(last, Some(json!(trx.id)), "{replay}: {id} at rev {} must show {}", trx.rev, trx.id);
        }
    }
    // Every other trx is committed nowhere; leftovers are pending on all their blocks.
    let acked_ids: std::collections::BTreeSet<&str> = acked.iter().map(|t| t.id.as_str()).collect();
    for trx in logs.iter().flat_map(|l| &l.pended).filter(|t| !acked_ids.contains(t.id.as_str())) {
        for id in &trx.blocks {
            let committed = h.raw().committed(&bid(id), &tid(&trx.id)).await.expect("committed");
            assert_eq!(committed, None, "{replay}: {} was never acknowledged but is committed on {id}", trx.id);
        }
    }
    for trx in logs.iter().flat_map(|l| &l.leftover) {
        for id in &trx.blocks {
            let pending = h.raw().pending(&bid(id), &tid(&trx.id)).await.expect("pending");
            assert!(pending.is_some(), "{replay}: {} should still be pending on {id}", trx.id);
        }
    }
    // Per block: invariants, revisions exactly 1..=latest (SPEC 2 item 7), and every revision
    // equals a replay of the committed transforms.
    for id in BLOCKS {
        let block_id = bid(id);
        check_block_invariants(&h.repo, &block_id, &replay).await;
        let log = h.raw().revisions(&block_id, 0, u64::MAX).await.expect("revisions");
        let revs: Vec<u64> = log.iter().map(|e| e.rev).collect();
        assert_eq!(revs, (1..=revs.len() as u64).collect::<Vec<_>>(), "{replay}: revisions of {id} are contiguous");
        let mut value = None;
        for entry in log {
            let committed = h.raw().committed(&block_id, &entry.trx_id).await.expect("committed").expect("in log");
            value = committed.transform.apply(value.as_ref(), &block_id).expect("committed transforms replay");
            let stored = h.repo.value_at(&block_id, entry.rev).await.expect("value_at");
            assert_eq!(stored, value, "{replay}: {id} at rev {} differs from a replay of its log", entry.rev);
        }
    }
}

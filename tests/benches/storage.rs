//! Storage engine benchmarks (not run in CI): both durable engines (`lmdb` and `file`) and a raw
//! heed `put` baseline, in one run so the figures are comparable.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/targets/storage cargo bench -p optimystic-tests --bench storage
//! ```
//!
//! Groups (criterion ids):
//! - `commit/raw_heed_put`: one `put` of a block-sized value per durable (synced) write
//!   transaction, straight through heed: the floor for a durable LMDB write.
//! - `commit/<engine>`: `StorageRepo::commit` of one single-block transaction pended beforehand
//!   (the pend is not timed).
//! - `pend_commit/<engine>`: pend + commit of a transaction, both timed.
//! - `get/<engine>/<N>_blocks`: `StorageRepo::get` of one random block among N stored blocks.
//! - `history/<engine>/{commit,get}/<R>_revs`: commit on, and get of, blocks with R revisions.
//!
//! The machine is shared and its disk latency swings by 10x from minute to minute, so every
//! comparison is also measured interleaved (the two sides alternate, one operation each, and the
//! medians are printed as `interleaved ...` lines on stderr): raw puts vs LMDB commits
//! (`OPTIMYSTIC_BENCH_ROUNDS` rounds, default 500, also used for commits on short vs long
//! histories) and gets on small vs large stores (`OPTIMYSTIC_BENCH_GET_ROUNDS`, default 20000).
//!
//! `OPTIMYSTIC_BENCH_BLOCKS` (default 100000) and `OPTIMYSTIC_BENCH_REVS` (default 10000) set the
//! large sizes, for a quick run; `OPTIMYSTIC_BENCH_ENGINES` (default `lmdb,file`) picks the
//! engines of the `commit`, `pend_commit`, `get` and `history` groups.

// The benchmark opens a raw heed environment for its baseline: see the SAFETY comment there.
#![allow(unsafe_code, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use optimystic_core::repo::{CHECKPOINT_INTERVAL, MessageOptions, Repo, StorageRepo};
use optimystic_core::storage::{BlockCommit, RawStorage};
use optimystic_core::{
    Block, BlockGets, BlockId, BlockOperation, CommitRequest, PendPolicy, PendRequest, PendResult, Transform,
    Transforms, TrxId,
};
use optimystic_storage_file::FileStorage;
use optimystic_storage_lmdb::{LmdbKv, LmdbOptions, LmdbStorage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::runtime::Runtime;

/// Blocks of the commit benchmarks (round robin, so each gets few extra revisions).
const COMMIT_POOL: usize = 256;
/// The "few revisions" size of the history group.
const FEW_REVS: u64 = 10;
/// The "few blocks" size of the get group.
const FEW_BLOCKS: usize = 1_000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Engine {
    Lmdb,
    File,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Self::Lmdb => "lmdb",
            Self::File => "file",
        }
    }

    fn open(self, dir: &Path) -> Arc<dyn RawStorage> {
        match self {
            Self::Lmdb => {
                Arc::new(LmdbStorage::over(LmdbKv::open_with(dir, LmdbOptions { map_size_bytes: 8 << 30 }).unwrap()))
            }
            Self::File => Arc::new(FileStorage::open(dir).unwrap()),
        }
    }

    /// Blocks written concurrently while populating a fixture: LMDB serializes write
    /// transactions, the file system overlaps the fsyncs of different files.
    fn populate_concurrency(self) -> usize {
        match self {
            Self::Lmdb => 1,
            Self::File => 32,
        }
    }

    /// The engines named in `OPTIMYSTIC_BENCH_ENGINES` (default: both).
    fn selected() -> Vec<Self> {
        let names = std::env::var("OPTIMYSTIC_BENCH_ENGINES").unwrap_or_else(|_| "lmdb,file".to_owned());
        [Self::Lmdb, Self::File].into_iter().filter(|e| names.split(',').any(|n| n.trim() == e.name())).collect()
    }
}

fn block_id(prefix: &str, i: usize) -> BlockId {
    BlockId::new(format!("{prefix}-{i:08}")).unwrap()
}

/// A block of about 400 bytes of JSON, as the workload writes.
fn value(id: &BlockId, n: u64) -> Block {
    Block::new(id.clone(), "bench", "bench")
        .with_field("n", json!(n))
        .with_field("log", json!([n, n + 1, n + 2, n + 3, n + 4, n + 5, n + 6, n + 7]))
        .with_field("payload", json!("x".repeat(256)))
}

fn value_bytes() -> Vec<u8> {
    serde_json::to_vec(&value(&block_id("raw", 0), 0)).unwrap()
}

/// Commits revisions 1..=revs on each block directly through the engine, as `StorageRepo` would
/// (values kept at checkpoints only), several blocks at a time.
async fn populate(engine: Engine, storage: &Arc<dyn RawStorage>, ids: &[BlockId], revs: u64) {
    for chunk in ids.chunks(engine.populate_concurrency()) {
        let mut tasks = tokio::task::JoinSet::new();
        for id in chunk {
            let (id, storage) = (id.clone(), storage.clone());
            tasks.spawn(async move {
                for rev in 1..=revs {
                    let transform = if rev == 1 {
                        Transform { insert: Some(value(&id, rev)), ..Transform::default() }
                    } else {
                        Transform { updates: Some(vec![BlockOperation::set("n", json!(rev))]), ..Transform::default() }
                    };
                    let prev = rev - 1;
                    let prune = (prev > 0 && prev / CHECKPOINT_INTERVAL == rev / CHECKPOINT_INTERVAL).then_some(prev);
                    let commit = BlockCommit {
                        trx_id: TrxId::new(format!("p-{rev}")).unwrap(),
                        rev,
                        transform,
                        value: Some(value(&id, rev)),
                        prune_value_at: prune,
                    };
                    storage.commit_block(&id, &commit).await.unwrap();
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    }
}

/// Pends and commits single-block update transactions on a set of blocks, round robin.
struct Writer {
    repo: StorageRepo,
    ids: Vec<BlockId>,
    revs: HashMap<BlockId, u64>,
    next: usize,
    trx: u64,
}

impl Writer {
    fn new(repo: StorageRepo, ids: Vec<BlockId>, rev: u64) -> Self {
        let revs = ids.iter().map(|id| (id.clone(), rev)).collect();
        Self { repo, ids, revs, next: 0, trx: 0 }
    }

    async fn pend(&mut self) -> CommitRequest {
        let id = self.ids[self.next % self.ids.len()].clone();
        self.next += 1;
        self.trx += 1;
        let rev = self.revs[&id] + 1;
        self.revs.insert(id.clone(), rev);
        let trx_id = TrxId::new(format!("w-{}", self.trx)).unwrap();
        let mut transforms = Transforms::default();
        transforms.updates.insert(id.clone(), vec![BlockOperation::set("n", json!(self.trx))]);
        let request = PendRequest { trx_id: trx_id.clone(), rev: Some(rev), transforms, policy: PendPolicy::Continue };
        let pended = self.repo.pend(&request, &MessageOptions::default()).await.unwrap();
        assert!(matches!(pended, PendResult::Success(_)), "{pended:?}");
        CommitRequest { trx_id, block_ids: vec![id.clone()], rev, tail_id: id, header_id: None }
    }

    async fn commit(&self, request: &CommitRequest) {
        let done = self.repo.commit(request, &MessageOptions::default()).await.unwrap();
        assert!(done.is_success(), "{done:?}");
    }

    /// Times `iters` commits, optionally including their pends.
    async fn timed(&mut self, iters: u64, include_pend: bool) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let pend_start = Instant::now();
            let request = self.pend().await;
            let pended = pend_start.elapsed();
            let commit_start = Instant::now();
            self.commit(&request).await;
            let committed = commit_start.elapsed();
            total += if include_pend { pended + committed } else { committed };
        }
        total
    }
}

/// A random block read through `StorageRepo::get`.
async fn get_one(repo: &StorageRepo, ids: &[BlockId], rng: &mut StdRng) {
    let id = ids[rng.gen_range(0..ids.len())].clone();
    let got = repo
        .get(&BlockGets { block_ids: vec![id], context: None, read_mode: None }, &MessageOptions::default())
        .await
        .unwrap();
    assert!(got.values().all(|r| r.block.is_some()));
}

/// A store populated with `blocks` blocks of `revs` revisions each.
struct Fixture {
    _dir: tempfile::TempDir,
    storage: Arc<dyn RawStorage>,
    repo: StorageRepo,
    ids: Vec<BlockId>,
}

impl Fixture {
    fn new(rt: &Runtime, engine: Engine, blocks: usize, revs: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let storage = engine.open(dir.path());
        let ids: Vec<BlockId> = (0..blocks).map(|i| block_id("b", i)).collect();
        let started = Instant::now();
        rt.block_on(populate(engine, &storage, &ids, revs));
        eprintln!("populated {blocks} {} blocks with {revs} revisions in {:.1?}", engine.name(), started.elapsed());
        Self { _dir: dir, repo: StorageRepo::new(storage.clone()), storage, ids }
    }

    fn writer(&self, revs: u64) -> Writer {
        Writer::new(self.repo.clone(), self.ids.clone(), revs)
    }

    fn close(self, rt: &Runtime) {
        rt.block_on(self.storage.close()).unwrap();
    }
}

/// Gets on two fixtures, alternated so both see the same machine: their medians.
fn interleaved_gets(rt: &Runtime, a: &Fixture, b: &Fixture, rounds: usize) -> (Duration, Duration) {
    let mut rng = StdRng::seed_from_u64(3);
    let (mut ta, mut tb) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    rt.block_on(async {
        for _ in 0..rounds {
            for (fixture, times) in [(a, &mut ta), (b, &mut tb)] {
                let start = Instant::now();
                get_one(&fixture.repo, &fixture.ids, &mut rng).await;
                times.push(start.elapsed());
            }
        }
    });
    (median(ta), median(tb))
}

/// Commits through two writers, alternated: their medians.
fn interleaved_commits(rt: &Runtime, a: &mut Writer, b: &mut Writer, rounds: usize) -> (Duration, Duration) {
    let (mut ta, mut tb) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    rt.block_on(async {
        for _ in 0..rounds {
            ta.push(a.timed(1, false).await);
            tb.push(b.timed(1, false).await);
        }
    });
    (median(ta), median(tb))
}

fn growth(what: &str, engine: Engine, small: (&str, Duration), large: (&str, Duration)) {
    eprintln!(
        "interleaved {what} on {}: {} {:.1?}, {} {:.1?}, growth {:.2}x",
        engine.name(),
        small.0,
        small.1,
        large.0,
        large.1,
        large.1.as_secs_f64() / small.1.as_secs_f64()
    );
}

type RawDb = heed::Database<'static, heed::types::Bytes, heed::types::Bytes>;

/// A bare heed environment (in a fresh temporary directory) for the baseline.
fn raw_env() -> (tempfile::TempDir, heed::Env<heed::WithoutTls>, RawDb) {
    let dir = tempfile::tempdir().unwrap();
    let mut options = heed::EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(1 << 30).max_dbs(1);
    // SAFETY: a fresh temporary directory, opened once by this process and by nothing else; no
    // unsafe flags, so commits are durably synced like the engine's.
    let env = unsafe { options.open(dir.path()) }.unwrap();
    let wtxn = env.write_txn().unwrap();
    let db = env
        .create_databases_and_commit(wtxn, |opener, wtxn| {
            opener
                .create_database::<heed::types::Bytes, heed::types::Bytes>(wtxn, Some("raw"))
                .map(heed::CommitOrAbort::<_, ()>::Commit)
        })
        .unwrap()
        .unwrap_commit();
    (dir, env, db)
}

/// One raw `put` in its own durable write transaction.
fn raw_put(env: &heed::Env<heed::WithoutTls>, db: RawDb, key: u64, bytes: &[u8]) {
    let mut wtxn = env.write_txn().unwrap();
    db.put(&mut wtxn, &key.to_be_bytes(), bytes).unwrap();
    wtxn.commit().unwrap();
}

fn raw_heed_put(c: &mut Criterion) {
    let (_dir, env, db) = raw_env();
    let bytes = value_bytes();
    let mut n: u64 = 0;
    c.benchmark_group("commit").sample_size(30).bench_function("raw_heed_put", |b| {
        b.iter(|| {
            n += 1;
            raw_put(&env, db, n, &bytes);
        })
    });
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

/// Raw puts and `StorageRepo` commits on LMDB, alternated so both see the same disk (the machine
/// is shared): prints the medians and the throughput ratio.
fn interleaved_ratio(rt: &Runtime, rounds: usize) {
    let (_raw_dir, env, db) = raw_env();
    let bytes = value_bytes();
    let fixture = Fixture::new(rt, Engine::Lmdb, COMMIT_POOL, 1);
    let mut writer = fixture.writer(1);
    let (mut raw, mut commit, mut pend_commit) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let start = Instant::now();
        raw_put(&env, db, round as u64, &bytes);
        raw.push(start.elapsed());
        commit.push(rt.block_on(writer.timed(1, false)));
        pend_commit.push(rt.block_on(writer.timed(1, true)));
    }
    let (raw, commit, pend_commit) = (median(raw), median(commit), median(pend_commit));
    let ratio = |d: Duration| raw.as_secs_f64() / d.as_secs_f64();
    eprintln!(
        "interleaved x{rounds}: raw heed put {raw:.1?}, StorageRepo commit on LMDB {commit:.1?} (throughput ratio {:.2}), \
         pend+commit {pend_commit:.1?} (ratio {:.2})",
        ratio(commit),
        ratio(pend_commit)
    );
    fixture.close(rt);
}

fn commits(c: &mut Criterion) {
    let rt = runtime();
    interleaved_ratio(&rt, env_usize("OPTIMYSTIC_BENCH_ROUNDS", 500));
    for engine in Engine::selected() {
        let fixture = Fixture::new(&rt, engine, COMMIT_POOL, 1);
        let mut writer = fixture.writer(1);
        let mut group = c.benchmark_group("commit");
        group.sample_size(30);
        group.bench_function(engine.name(), |b| b.iter_custom(|iters| rt.block_on(writer.timed(iters, false))));
        group.finish();
        let mut group = c.benchmark_group("pend_commit");
        group.sample_size(30);
        group.bench_function(engine.name(), |b| b.iter_custom(|iters| rt.block_on(writer.timed(iters, true))));
        group.finish();
        fixture.close(&rt);
    }
}

fn gets(c: &mut Criterion) {
    let rt = runtime();
    let many = env_usize("OPTIMYSTIC_BENCH_BLOCKS", 100_000);
    let rounds = env_usize("OPTIMYSTIC_BENCH_GET_ROUNDS", 20_000);
    for engine in Engine::selected() {
        let small = Fixture::new(&rt, engine, FEW_BLOCKS, 1);
        let large = Fixture::new(&rt, engine, many, 1);
        let (a, b) = interleaved_gets(&rt, &small, &large, rounds);
        growth("get", engine, (&format!("{FEW_BLOCKS} blocks"), a), (&format!("{many} blocks"), b));
        let mut group = c.benchmark_group(format!("get/{}", engine.name()));
        group.sample_size(50);
        for fixture in [&small, &large] {
            let mut rng = StdRng::seed_from_u64(7);
            group.bench_function(BenchmarkId::from_parameter(format!("{}_blocks", fixture.ids.len())), |b| {
                b.iter(|| rt.block_on(get_one(&fixture.repo, &fixture.ids, &mut rng)))
            });
        }
        group.finish();
        small.close(&rt);
        large.close(&rt);
    }
}

fn histories(c: &mut Criterion) {
    let rt = runtime();
    let many = env_usize("OPTIMYSTIC_BENCH_REVS", 10_000) as u64;
    let get_rounds = env_usize("OPTIMYSTIC_BENCH_GET_ROUNDS", 20_000);
    let commit_rounds = env_usize("OPTIMYSTIC_BENCH_ROUNDS", 500);
    for engine in Engine::selected() {
        // Few revisions: a pool of blocks, so each gets only a few more while measuring.
        let short = Fixture::new(&rt, engine, COMMIT_POOL, FEW_REVS);
        let long = Fixture::new(&rt, engine, 1, many);
        let (a, b) = interleaved_gets(&rt, &short, &long, get_rounds);
        growth("get", engine, (&format!("{FEW_REVS} revisions"), a), (&format!("{many} revisions"), b));
        let (mut short_writer, mut long_writer) = (short.writer(FEW_REVS), long.writer(many));
        let (a, b) = interleaved_commits(&rt, &mut short_writer, &mut long_writer, commit_rounds);
        growth("commit", engine, (&format!("{FEW_REVS} revisions"), a), (&format!("{many} revisions"), b));

        let mut group = c.benchmark_group(format!("history/{}", engine.name()));
        group.sample_size(30);
        for (fixture, writer, revs) in [(&short, &mut short_writer, FEW_REVS), (&long, &mut long_writer, many)] {
            let mut rng = StdRng::seed_from_u64(11);
            group.bench_function(BenchmarkId::new("get", format!("{revs}_revs")), |b| {
                b.iter(|| rt.block_on(get_one(&fixture.repo, &fixture.ids, &mut rng)))
            });
            group.bench_function(BenchmarkId::new("commit", format!("{revs}_revs")), |b| {
                b.iter_custom(|iters| rt.block_on(writer.timed(iters, false)))
            });
        }
        group.finish();
        short.close(&rt);
        long.close(&rt);
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    targets = raw_heed_put, commits, gets, histories
}
criterion_main!(benches);

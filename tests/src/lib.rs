//! Shared helpers for the integration tests.

pub mod crash {
    //! The crash test's workload and checks, shared by the `crash_child` binary (which runs the
    //! workload until it is killed) and the `crash` test (which kills it and checks the store).
    //!
    //! The child prints one [`Ack`] per commit, as a JSON line on stdout, after `commit` returned
    //! success: the parent then requires that commit to survive any later SIGKILL.

    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Arc;

    use anyhow::{Context, anyhow, bail, ensure};
    use optimystic_core::repo::{MessageOptions, Repo, StorageRepo};
    use optimystic_core::storage::RawStorage;
    use optimystic_core::{
        Block, BlockGets, BlockId, BlockOperation, CommitRequest, CommitResult, PendPolicy, PendRequest, PendResult,
        Transforms, TrxBlocks, TrxId, TrxRev,
    };
    use optimystic_storage_file::FileStorage;
    use optimystic_storage_lmdb::{LmdbKv, LmdbStorage};
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    /// The blocks the workload writes: a few plain ids and some that must be escaped on disk.
    pub const BLOCK_IDS: &[&str] = &["alpha", "beta", "../../etc/passwd", "sl/ash\\back", "日本語", "nul\0id"];

    /// Longest `log` array the workload keeps in a block.
    const LOG_LEN: usize = 8;

    /// A storage engine under test.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Engine {
        /// `storage file`.
        File,
        /// `storage lmdb`.
        Lmdb,
    }

    impl Engine {
        /// The engine's plugin name.
        pub fn name(self) -> &'static str {
            match self {
                Self::File => "file",
                Self::Lmdb => "lmdb",
            }
        }

        /// The engine with that plugin name.
        pub fn parse(name: &str) -> anyhow::Result<Self> {
            match name {
                "file" => Ok(Self::File),
                "lmdb" => Ok(Self::Lmdb),
                other => bail!("unknown engine {other:?} (expected file or lmdb)"),
            }
        }

        /// Opens the engine on `dir`.
        pub fn open(self, dir: &Path) -> anyhow::Result<Arc<dyn RawStorage>> {
            Ok(match self {
                Self::File => Arc::new(FileStorage::open(dir).with_context(|| format!("opening {}", dir.display()))?),
                Self::Lmdb => Arc::new(LmdbStorage::over(
                    LmdbKv::open(dir).with_context(|| format!("opening {}", dir.display()))?,
                )),
            })
        }
    }

    /// One acknowledged commit, as the child prints it.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Ack {
        /// The transaction.
        pub trx_id: TrxId,
        /// Its revision.
        pub rev: u64,
        /// The blocks it committed on.
        pub block_ids: Vec<BlockId>,
    }

    fn block_ids() -> anyhow::Result<Vec<BlockId>> {
        BLOCK_IDS.iter().map(|s| BlockId::new(*s).map_err(anyhow::Error::from)).collect()
    }

    /// Runs transactions on `repo` forever (until killed or an error): each one pends and commits
    /// inserts, updates or deletes on one block, or two at the same revision, at the next revision, and a few are pended and
    /// cancelled instead. `ack` is called after every successful commit. Transaction ids start with
    /// the seed, so runs with different seeds never reuse one.
    pub async fn run_workload(
        repo: &StorageRepo,
        seed: u64,
        mut ack: impl FnMut(&Ack) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut rng = StdRng::seed_from_u64(seed);
        let ids = block_ids()?;
        let options = MessageOptions::default();
        for n in 0u64.. {
            let roll = rng.gen_range(0..100u32);
            let count = if roll < 25 { 2 } else { 1 };
            let mut chosen: Vec<BlockId> = ids.choose_multiple(&mut rng, count).cloned().collect();
            chosen.sort();
            let trx_id = TrxId::new(format!("{seed:016x}-{n}"))?;

            let mut current =
                repo.get(&BlockGets { block_ids: chosen.clone(), context: None, read_mode: None }, &options).await?;
            // Revisions are contiguous (SPEC 2 item 7): two blocks commit together only when they
            // are at the same revision; otherwise the transaction touches the first alone.
            let revs: Vec<u64> = chosen
                .iter()
                .map(|id| current.get(id).and_then(|r| r.state.latest.as_ref()).map_or(0, |l| l.rev))
                .collect();
            if revs.windows(2).any(|w| w.first() != w.last()) {
                chosen.truncate(1);
                current.retain(|id, _| chosen.contains(id));
            }
            let rev = current.values().filter_map(|r| r.state.latest.as_ref()).map(|l| l.rev).max().unwrap_or(0) + 1;
            let mut transforms = Transforms::default();
            for id in &chosen {
                let existing = current.get(id).and_then(|r| r.block.as_ref());
                match existing {
                    None => {
                        let block = Block::new(id.clone(), "crash", "crash")
                            .with_field("n", json!(n))
                            .with_field("log", json!([]));
                        transforms.inserts.insert(id.clone(), block);
                    }
                    Some(_) if rng.gen_range(0..100u32) < 5 => transforms.deletes.push(id.clone()),
                    Some(block) => {
                        let mut ops = vec![
                            BlockOperation::set("n", json!(n)),
                            BlockOperation::splice("log", 0, 0, vec![json!(n)]),
                        ];
                        let len = block.fields.get("log").and_then(|l| l.as_array()).map_or(0, Vec::len);
                        if len >= LOG_LEN {
                            ops.push(BlockOperation::splice("log", LOG_LEN as u64, 1, Vec::new()));
                        }
                        transforms.updates.insert(id.clone(), ops);
                    }
                }
            }
            let pend = PendRequest { trx_id: trx_id.clone(), rev: Some(rev), transforms, policy: PendPolicy::Continue };
            match repo.pend(&pend, &options).await? {
                PendResult::Success(_) => {}
                PendResult::Stale(stale) => bail!("pend of {trx_id} at rev {rev} was stale: {stale:?}"),
            }
            if roll >= 95 {
                repo.cancel(&TrxBlocks { trx_id, block_ids: chosen }, &options).await?;
                continue;
            }
            let tail_id = chosen.first().cloned().ok_or_else(|| anyhow!("no block chosen"))?;
            let request =
                CommitRequest { trx_id: trx_id.clone(), block_ids: chosen.clone(), rev, tail_id, header_id: None };
            match repo.commit(&request, &options).await? {
                CommitResult::Success(_) => ack(&Ack { trx_id, rev, block_ids: chosen })?,
                CommitResult::Stale(stale) => bail!("commit of {trx_id} at rev {rev} was stale: {stale:?}"),
            }
        }
        Ok(())
    }

    /// What [`verify`] looked at.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Verified {
        /// Blocks checked.
        pub blocks: usize,
        /// Committed revisions replayed, over all blocks.
        pub revisions: usize,
    }

    /// Checks a store after a crash:
    /// - every acknowledged commit is in the revision log at its revision, with its committed transform;
    /// - no block is torn: `latest` is the last revision logged, a value is materialized at `latest`,
    ///   and it equals both [`StorageRepo::value_at`] and the value rebuilt by replaying every
    ///   committed transform from revision 0;
    /// - no transaction is both pending and committed on a block;
    /// - on an engine with atomic storage steps ([`RawStorage::atomic_apply`]), no commit is torn
    ///   across blocks: a transaction committed on one block is pending on none (the workload
    ///   pends and commits a transaction on the same blocks, each commit one storage step).
    pub async fn verify(storage: &Arc<dyn RawStorage>, acks: &[Ack]) -> anyhow::Result<Verified> {
        let repo = StorageRepo::new(storage.clone());
        for ack in acks {
            for id in &ack.block_ids {
                let logged = storage.revisions(id, ack.rev, ack.rev).await?;
                let expected = vec![TrxRev { trx_id: ack.trx_id.clone(), rev: ack.rev }];
                ensure!(logged == expected, "acknowledged {ack:?}: block {id:?} logs {logged:?} at rev {}", ack.rev);
                let committed = storage.committed(id, &ack.trx_id).await?;
                ensure!(
                    committed.as_ref().map(|c| c.rev) == Some(ack.rev),
                    "acknowledged {ack:?}: block {id:?} has committed transform {committed:?}"
                );
            }
        }
        let mut verified = Verified::default();
        let mut after: Option<BlockId> = None;
        let (mut committed, mut pending) = (BTreeMap::new(), BTreeMap::new());
        loop {
            let page = storage.block_ids(after.as_ref(), 100).await?;
            let Some(last) = page.last().cloned() else { break };
            for id in &page {
                let (block_committed, block_pending) = verify_block(storage, &repo, id).await?;
                verified.revisions += block_committed.len();
                verified.blocks += 1;
                for trx_id in block_committed.into_keys() {
                    committed.insert(trx_id, id.clone());
                }
                for trx_id in block_pending {
                    pending.insert(trx_id, id.clone());
                }
            }
            after = Some(last);
        }
        if storage.atomic_apply() {
            for (trx_id, committed_on) in &committed {
                if let Some(pending_on) = pending.get(trx_id) {
                    bail!("commit of {trx_id} is torn: committed on {committed_on:?}, still pending on {pending_on:?}");
                }
            }
        }
        Ok(verified)
    }

    /// Checks one block; its committed transactions (with their revisions) and pending ones.
    async fn verify_block(
        storage: &Arc<dyn RawStorage>,
        repo: &StorageRepo,
        id: &BlockId,
    ) -> anyhow::Result<(BTreeMap<TrxId, u64>, Vec<TrxId>)> {
        let latest = storage.latest(id).await?;
        let log = storage.revisions(id, 0, u64::MAX).await?;
        ensure!(
            log.last() == latest.as_ref(),
            "block {id:?}: latest {latest:?} is not the last logged revision {:?}",
            log.last()
        );
        let mut committed_trxs = BTreeMap::new();
        let mut replayed: Option<Block> = None;
        for entry in &log {
            let committed = storage.committed(id, &entry.trx_id).await?.ok_or_else(|| {
                anyhow!("block {id:?}: rev {} names {} with no committed transform", entry.rev, entry.trx_id)
            })?;
            ensure!(
                committed.rev == entry.rev,
                "block {id:?}: {} is logged at {} but committed at {}",
                entry.trx_id,
                entry.rev,
                committed.rev
            );
            replayed = committed
                .transform
                .apply(replayed.as_ref(), id)
                .map_err(|e| anyhow!("block {id:?}: replaying rev {}: {e}", entry.rev))?;
            committed_trxs.insert(entry.trx_id.clone(), entry.rev);
        }
        if let Some(latest) = &latest {
            let materialized = storage.materialized(id, latest.rev).await?;
            ensure!(
                materialized.as_ref() == Some(&replayed),
                "block {id:?} is torn: materialized value at latest rev {} is {materialized:?}, replay gives {replayed:?}",
                latest.rev
            );
            let read = repo.value_at(id, latest.rev).await?;
            ensure!(read == replayed, "block {id:?}: value_at latest is {read:?}, replay gives {replayed:?}");
        }
        let pending = storage.pending_trx_ids(id).await?;
        for trx_id in &pending {
            ensure!(!committed_trxs.contains_key(trx_id), "block {id:?}: {trx_id} is both pending and committed");
            ensure!(
                storage.pending(id, trx_id).await?.is_some(),
                "block {id:?}: listed pending {trx_id} cannot be read"
            );
        }
        Ok((committed_trxs, pending))
    }
}

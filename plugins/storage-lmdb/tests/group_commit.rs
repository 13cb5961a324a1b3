//! Group commit on real LMDB files: concurrent writes share transactions, and every write
//! acknowledged before the process is killed (SIGKILL, mid-load) is there when the store is
//! opened again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use optimystic_core::storage::{BlockCommit, MetaWrite, RawStorage};
use optimystic_core::{Block, BlockId, Transform, TrxId};
use optimystic_storage_lmdb::{LmdbKv, LmdbStorage};
use serde_json::json;

/// Set in the child process: the data directory it writes to.
const CHILD_DIR: &str = "OPTIMYSTIC_GROUP_COMMIT_CHILD_DIR";
/// Concurrent writers in the child.
const WRITERS: usize = 16;
/// Acknowledged transactions after which the parent kills the child.
const KILL_AFTER: usize = 300;

fn bid(s: &str) -> BlockId {
    BlockId::new(s).unwrap()
}

/// One writer's transaction on its own new block: a pend, its commit at revision 1 and a
/// metadata entry, each its own durable storage call.
async fn transaction(storage: LmdbStorage, name: String) {
    let (block_id, trx) = (bid(&name), TrxId::new(format!("t-{name}")).unwrap());
    let value = Block::new(block_id.clone(), "t", "c").with_field("n", json!(name));
    let transform = Transform { insert: Some(value.clone()), ..Transform::default() };
    storage.save_pending(&block_id, &trx, &transform).await.unwrap();
    let commit = BlockCommit { trx_id: trx.clone(), rev: 1, transform, value: Some(value), prune_value_at: None };
    storage.commit_block(&block_id, &commit).await.unwrap();
    storage.write_meta(&[MetaWrite::Put(format!("done/{name}"), b"1".to_vec())]).await.unwrap();
}

/// The child: writes until it is killed, printing `acked <name>` after each transaction's last
/// write returned and `stats <batches> <writes>` after each round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_writes_until_killed() {
    let Ok(dir) = std::env::var(CHILD_DIR) else { return };
    let storage = LmdbStorage::over(LmdbKv::open(&dir).unwrap());
    for round in 0.. {
        let calls: Vec<_> = (0..WRITERS)
            .map(|i| {
                let (storage, name) = (storage.clone(), format!("b{round}-{i}"));
                tokio::spawn(async move {
                    transaction(storage, name.clone()).await;
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "acked {name}").unwrap();
                    out.flush().unwrap();
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        let stats = storage.group_stats();
        let mut out = std::io::stdout().lock();
        writeln!(out, "stats {} {}", stats.batches, stats.writes).unwrap();
        out.flush().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_kill_and_concurrent_writes_share_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writes_until_killed", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut acked = Vec::new();
    let mut last_stats = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(name) = line.strip_prefix("acked ") {
            acked.push(name.to_owned());
        } else if let Some(stats) = line.strip_prefix("stats ") {
            let figures: Vec<u64> = stats.split(' ').map(|n| n.parse().unwrap()).collect();
            last_stats = Some((figures[0], figures[1]));
        }
        if acked.len() >= KILL_AFTER {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(acked.len() >= KILL_AFTER, "the child stopped after {} transactions", acked.len());

    let (batches, writes) = last_stats.expect("the child finished a round");
    assert!(writes < batches, "{batches} batches in {writes} LMDB transactions: nothing was grouped");

    let storage = LmdbStorage::over(LmdbKv::open(dir.path()).unwrap());
    for name in &acked {
        let block_id = bid(name);
        assert_eq!(storage.latest(&block_id).await.unwrap().map(|l| l.rev), Some(1), "{name}");
        assert_eq!(storage.get_meta(&format!("done/{name}")).await.unwrap(), Some(b"1".to_vec()), "{name}");
    }
    // Whatever the kill cut, the block count is the number of indexed blocks.
    let stats = storage.stats().await.unwrap().unwrap();
    let indexed = storage.block_ids(None, usize::MAX).await.unwrap();
    assert_eq!(stats.blocks, indexed.len() as u64);
    assert!(indexed.len() >= acked.len());
    storage.close().await.unwrap();
}

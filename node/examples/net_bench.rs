//! Measures repo `get` round trips over libp2p (TCP, Noise, Yamux) on loopback: latency p50/p99 of
//! sequential requests, then requests/s with 64 requests in flight.
//!
//! Run: `cargo run --release -p optimystic-node --example net_bench -- [sequential] [concurrent]`
//! (defaults 5000 and 50000 requests; at most 1,000,000 each).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use optimystic_core::client::RepoClient;
use optimystic_core::{
    Block, BlockGets, BlockId, CommitRequest, MessageOptions, PendPolicy, PendRequest, Repo, StorageRepo, Transforms,
    TrxId,
};
use optimystic_node::{Handlers, Host, HostConfig, identity};
use optimystic_storage_memory::MemoryStorage;
use serde_json::json;

const IN_FLIGHT: usize = 64;
const MAX_REQUESTS: usize = 1_000_000;

fn arg(n: usize, default: usize) -> usize {
    std::env::args().nth(n).and_then(|a| a.parse().ok()).unwrap_or(default).clamp(1, MAX_REQUESTS)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    // As the `optimystic` binary does: libp2p's timers in this runtime's timer wheel.
    futures_timer::use_tokio_timers(true);
    let sequential = arg(1, 5_000);
    let concurrent = arg(2, 50_000);

    let repo = StorageRepo::new(Arc::new(MemoryStorage::new()));
    let block_id = BlockId::new("bench-block").unwrap();
    let mut transforms = Transforms::default();
    transforms.inserts.insert(
        block_id.clone(),
        Block::new(block_id.clone(), "note", "bench").with_field("text", json!("x".repeat(200))),
    );
    let trx_id = TrxId::new("bench-trx").unwrap();
    let options = MessageOptions::default();
    repo.pend(
        &PendRequest { trx_id: trx_id.clone(), rev: Some(1), transforms, policy: PendPolicy::Continue },
        &options,
    )
    .await
    .unwrap();
    repo.commit(
        &CommitRequest {
            trx_id,
            block_ids: vec![block_id.clone()],
            rev: 1,
            tail_id: block_id.clone(),
            header_id: None,
        },
        &options,
    )
    .await
    .unwrap();

    let mut server_config = HostConfig::new(identity::generate());
    server_config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    server_config.max_inbound_per_protocol = IN_FLIGHT;
    let server = Host::start(server_config, Handlers::repo(Arc::new(repo))).await.unwrap();
    let mut client_config = HostConfig::new(identity::generate());
    client_config.max_outbound_per_protocol = IN_FLIGHT;
    let client_host = Host::start(client_config, Handlers::default()).await.unwrap();
    client_host.add_address(server.local_peer_id(), server.listen_addrs()[0].clone()).await.unwrap();
    let client = RepoClient::new(Arc::new(client_host.clone()), server.local_peer_id()).with_default_timeout_ms(10_000);
    let gets = BlockGets { block_ids: vec![block_id.clone()], context: None, read_mode: None };

    for _ in 0..200 {
        client.get(&gets, &MessageOptions::default()).await.unwrap();
    }

    let mut latencies = Vec::with_capacity(sequential);
    for _ in 0..sequential {
        let started = Instant::now();
        let got = client.get(&gets, &MessageOptions::default()).await.unwrap();
        latencies.push(started.elapsed());
        assert!(got[&block_id].block.is_some());
    }
    latencies.sort();
    println!(
        "sequential get round trip: n={sequential} p50={:?} p99={:?} max={:?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );

    let remaining = Arc::new(AtomicUsize::new(concurrent));
    let started = Instant::now();
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let client = client.clone();
            let gets = gets.clone();
            let remaining = Arc::clone(&remaining);
            tokio::spawn(async move {
                while remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                    client.get(&gets, &MessageOptions::default()).await.unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let elapsed = started.elapsed();
    println!(
        "{IN_FLIGHT} in flight: n={concurrent} in {elapsed:?} = {:.0} requests/s",
        concurrent as f64 / elapsed.as_secs_f64()
    );

    client_host.shutdown().await;
    server.shutdown().await;
}
